"""Segmentation metrics, computed from per-image pixel counts.

Two families:

* **paper** (spec models-conv-umamba.md §9.6): counts pooled over every pixel of each *test batch*
  (the paper's test batch size, split order, last partial batch included), IoU_b = I / U (0 when
  U = 0), Dice_b = 2I / (|P| + |G|) (NaN when both are empty), then the plain mean over batches,
  each batch weighted equally.  Binarisation: `logits >= 0.5` for UNet, ResNets and UMamba
  ("logit" mode, as the authors did on raw logits), `sigmoid >= 0.5` for SegFormer and UltraLight.
* **proper**: binarised at sigmoid >= 0.5 for every model and independent of batch size:
  - per-slice mean Dice / IoU over all slices, with an empty prediction on an empty mask counted as
    1 (a correct negative) and any prediction on an empty mask, or an empty one on a tumour, as 0;
  - the same mean over tumour-positive slices only (where the empty-mask rule does not apply);
  - per-patient 3-D Dice (Buda et al. 2019): counts summed over all of a patient's slices in the
    split, Dice per patient volume (1 if both volumes are empty), mean over patients.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS = ("logit", "sigmoid")


def binarize(logits, threshold: str):
  """Predicted mask (bool) from logits under the paper's rule for the model."""
  if threshold == "logit":
    return logits >= 0.5           # the authors thresholded raw logits at 0.5
  if threshold == "sigmoid":
    return logits >= 0.0           # sigmoid(x) >= 0.5  <=>  x >= 0
  raise ValueError(f"unknown threshold {threshold!r}; known: {', '.join(THRESHOLDS)}")


def pixel_counts(logits, masks, threshold: str) -> dict:
  """Per-image counts (B,) as int32: intersection, predicted and true pixel totals (jit-able)."""
  pred = binarize(logits.astype(jnp.float32), threshold)
  gt = masks > 0.5
  axes = tuple(range(1, pred.ndim))
  return {"inter": jnp.sum(pred & gt, axes, dtype=jnp.int32),
          "pred": jnp.sum(pred, axes, dtype=jnp.int32),
          "true": jnp.sum(gt, axes, dtype=jnp.int32)}


def _dice(inter, pred, true, empty_value):
  denom = pred + true
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), empty_value)


def _iou(inter, pred, true, empty_value):
  union = pred + true - inter
  return np.where(union > 0, inter / np.maximum(union, 1), empty_value)


def paper_metrics(inter, pred, true, batch_size: int) -> dict:
  """The paper's batch-pooled, batch-averaged Dice and IoU over slices in split order."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  inter, pred, true = (np.asarray(a, np.int64) for a in (inter, pred, true))
  n = len(inter)
  starts = np.arange(0, n, batch_size)
  bi, bp, bt = (np.add.reduceat(a, starts) if n else a for a in (inter, pred, true))
  dice_b = _dice(bi, bp, bt, np.nan)
  iou_b = _iou(bi, bp, bt, 0.0)
  nan_batches = int(np.isnan(dice_b).sum())
  return {
      "dice": float(np.mean(dice_b)) if n else float("nan"),   # NaN if any batch is all-empty
      "dice_nanmean": (float(np.nanmean(dice_b)) if n and nan_batches < len(dice_b)
                       else float("nan")),
      "iou": float(np.mean(iou_b)) if n else float("nan"),
      "num_batches": int(len(starts)),
      "nan_batches": nan_batches,
      "batch_size": int(batch_size),
  }


def slice_metrics(inter, pred, true) -> dict:
  """Per-slice mean Dice/IoU (empty-on-empty = 1) and the same over tumour-positive slices."""
  inter, pred, true = (np.asarray(a, np.int64) for a in (inter, pred, true))
  dice = _dice(inter, pred, true, 1.0)
  iou = _iou(inter, pred, true, 1.0)
  pos = true > 0
  empty = ~pos
  return {
      "dice": float(dice.mean()) if len(dice) else float("nan"),
      "iou": float(iou.mean()) if len(iou) else float("nan"),
      "dice_tumour": float(dice[pos].mean()) if pos.any() else float("nan"),
      "iou_tumour": float(iou[pos].mean()) if pos.any() else float("nan"),
      # How often an empty slice gets a false-positive prediction.
      "false_positive_rate_empty": float((pred[empty] > 0).mean()) if empty.any() else float("nan"),
      "num_slices": int(len(dice)),
      "num_tumour_slices": int(pos.sum()),
  }


def patient_metrics(inter, pred, true, patients) -> dict:
  """Per-patient volume Dice (Buda et al. 2019): counts summed per patient, mean over patients."""
  inter, pred, true = (np.asarray(a, np.int64) for a in (inter, pred, true))
  patients = np.asarray(patients, dtype=str)
  ids, which = np.unique(patients, return_inverse=True)
  sums = [np.bincount(which, weights=a, minlength=len(ids)) for a in (inter, pred, true)]
  dice = _dice(*sums, 1.0)
  return {"dice": float(dice.mean()) if len(ids) else float("nan"),
          "num_patients": int(len(ids)),
          "per_patient": {str(p): float(d) for p, d in zip(ids, dice)}}


@dataclasses.dataclass
class CountAccumulator:
  """Collects per-image counts batch by batch (host side), in split order."""
  inter: list = dataclasses.field(default_factory=list)
  pred: list = dataclasses.field(default_factory=list)
  true: list = dataclasses.field(default_factory=list)

  def add(self, counts: dict, valid: int | None = None) -> None:
    counts = jax.device_get(counts)
    k = len(counts["inter"]) if valid is None else valid
    for key in ("inter", "pred", "true"):
      getattr(self, key).append(np.asarray(counts[key])[:k])

  def arrays(self):
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.int64)
    return cat(self.inter), cat(self.pred), cat(self.true)
