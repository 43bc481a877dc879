"""Evaluation of a trained model on a split: loss and every metric, plus prediction figures."""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba.data.loader import pixels_to_float
from jaxmamba.data.splits import canonical_order
from jaxmamba.train import metrics


def make_eval_step(model, loss_fn, threshold: str, has_bn: bool):
  """jit-able (variables, images uint8, masks uint8, valid bool) -> per-image counts, loss."""
  def step(variables, images, masks, valid):
    x = pixels_to_float(images)
    y = masks.astype(jnp.float32)
    v = variables if has_bn else {"params": variables["params"]}
    logits = model.apply(v, x, train=False).astype(jnp.float32)
    w = valid.astype(jnp.float32)
    paper = metrics.pixel_counts(logits, y, threshold)
    proper = metrics.pixel_counts(logits, y, "sigmoid")
    return {"paper": paper, "proper": proper, "loss": loss_fn(logits, y, weights=w),
            "pred": metrics.binarize(logits, threshold)[..., 0],
            "pred_proper": metrics.binarize(logits, "sigmoid")[..., 0]}
  return step


def _global(array: np.ndarray, sharding):
  """A global jax.Array from host data every process holds in full."""
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def evaluate(eval_step, variables, slice_set, batch_size: int, batch_sharding,
             num_devices: int, keep=None, per_case: bool = False) -> dict:
  """Runs the model over `slice_set` in order, `batch_size` slices per batch.

  Batches are padded to a multiple of the device count (and the last one to full size) with
  weight-0 images so that one compiled shape serves every batch; padding is dropped from counts.
  Returns {"loss", "paper": {...}, "slice": {...}, "patient": {...}}, plus "predictions"
  (bool (k, H, W), the paper's binarisation) for the slice indices in `keep` when given, and
  with `per_case` "cases": one record per patient volume (metrics.case_metrics: Dice, IoU, HD95
  at sigmoid >= 0.5) whose summary (mean, sd, median) joins "patient".
  """
  keep = None if keep is None else np.asarray(keep, np.int64)
  kept = {}
  n = len(slice_set)
  padded = int(math.ceil(batch_size / num_devices) * num_devices)
  paper, proper = metrics.CountAccumulator(), metrics.CountAccumulator()
  batch_losses = []
  proper_preds = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    k = stop - start
    images = np.zeros((padded,) + slice_set.images.shape[1:], np.uint8)
    masks = np.zeros((padded,) + slice_set.masks.shape[1:] + (1,), np.uint8)
    images[:k] = slice_set.images[start:stop]
    masks[:k, ..., 0] = slice_set.masks[start:stop]
    valid = np.arange(padded) < k
    out = eval_step(variables, _global(images, batch_sharding), _global(masks, batch_sharding),
                    _global(valid, batch_sharding))
    if keep is not None:
      for i in keep[(keep >= start) & (keep < stop)]:
        kept[int(i)] = np.asarray(jax.device_get(out["pred"][i - start]))
    if per_case:
      proper_preds.append(np.asarray(jax.device_get(out["pred_proper"]))[:k])
    paper.add(out["paper"], k)
    proper.add(out["proper"], k)
    batch_losses.append(float(out["loss"]))
  result = {"loss": float(np.mean(batch_losses)) if batch_losses else float("nan"),
            "paper": metrics.paper_metrics(*paper.arrays(), batch_size=batch_size)}
  counts = proper.arrays()
  result["slice"] = metrics.slice_metrics(*counts)
  result["patient"] = metrics.patient_metrics(*counts, patients=slice_set.patients)
  if per_case:
    t0 = time.perf_counter()
    pred = np.concatenate(proper_preds) if proper_preds else np.zeros(slice_set.masks.shape, bool)
    result["cases"] = metrics.case_metrics(pred, slice_set.masks > 0, slice_set.patients,
                                           canonical_order(slice_set))
    result["patient"].update(metrics.summarise_cases(result["cases"]))
    result["patient"]["case_metrics_s"] = time.perf_counter() - t0   # mostly HD95
  if keep is not None:
    result["predictions"] = np.stack([kept[int(i)] for i in keep]) if len(keep) else \
        np.zeros((0,) + slice_set.masks.shape[1:], bool)
  return result


def figure_indices(slice_set, count: int) -> np.ndarray:
  """Slices shown in figures: tumour slices first (largest tumours), then empty ones, by name.

  Deterministic given the split, so every model of a comparison shows the same slices.
  """
  area = slice_set.masks.reshape(len(slice_set), -1).sum(axis=1)
  order = sorted(range(len(slice_set)), key=lambda i: (-int(area[i] > 0), slice_set.names[i]))
  positive = [i for i in order if area[i] > 0]
  # Spread over the tumour slices rather than taking neighbours of one patient.
  if len(positive) > count:
    picks = np.linspace(0, len(positive) - 1, count).round().astype(int)
    positive = [positive[i] for i in picks]
  chosen = positive + [i for i in order if area[i] == 0]
  return np.asarray(chosen[:count], np.int64)


def overlay_rgb(image_bgr: np.ndarray) -> np.ndarray:
  """uint8 BGR slice -> RGB float image for display."""
  return pixels_to_float(np.ascontiguousarray(image_bgr[..., ::-1]))


def save_prediction_png(path: str, images, masks, preds, names, title: str) -> None:
  """One row per slice: the input, ground truth (green) and prediction (red) over the input."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
  for i in range(n):
    rgb = overlay_rgb(images[i])
    for j, (label, m, colour) in enumerate(
        (("input", None, None), ("ground truth", masks[i], (0, 1, 0)),
         ("prediction", preds[i], (1, 0, 0)))):
      ax = axes[i, j]
      shown = rgb.copy()
      if m is not None:
        sel = m.astype(bool)
        shown[sel] = 0.5 * shown[sel] + 0.5 * np.asarray(colour, np.float32)
      ax.imshow(shown)
      ax.set_axis_off()
      ax.set_title(f"{names[i]}\n{label}" if j == 0 else label, fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
