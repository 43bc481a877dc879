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
* **per case** (`case_metrics`): one record per patient volume (its slices stacked in slice
  order): Dice, IoU and HD95.  EMPTY_CONVENTIONS states what an empty volume scores.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS = ("logit", "sigmoid")

EMPTY_CONVENTIONS = (
    "per patient volume: both prediction and ground truth empty -> Dice 1, IoU 1, HD95 0; "
    "exactly one empty -> Dice 0, IoU 0, HD95 undefined (NaN, left out of HD95 means and "
    "counted as hd95_undefined). HD95 in pixels (kaggle_3m has no spacing), slices stacked in "
    "slice order one pixel apart.")


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


def _surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of `mask` with a face-neighbour outside it (the volume's edge counts as outside)."""
  from scipy import ndimage
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
  """95th-percentile symmetric Hausdorff distance between the surfaces of two bool volumes.

  As MONAI's `compute_hausdorff_distance(percentile=95)`: the larger of the two directed 95th
  percentiles (pred surface -> true surface, true -> pred), Euclidean, in voxel units.  Both
  empty: 0; exactly one empty: NaN (EMPTY_CONVENTIONS).
  """
  from scipy import ndimage
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  if pred.shape != true.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {true.shape} differ in shape")
  if not pred.any() and not true.any():
    return 0.0
  if not pred.any() or not true.any():
    return float("nan")
  # Crop to the box holding both masks: distances between their surfaces are unchanged.
  box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(pred | true))
  sp, st = _surface(pred[box]), _surface(true[box])
  to_true = ndimage.distance_transform_edt(~st)[sp]
  to_pred = ndimage.distance_transform_edt(~sp)[st]
  return float(max(np.percentile(to_true, 95), np.percentile(to_pred, 95)))


def case_metrics(pred: np.ndarray, true: np.ndarray, patients, order) -> list[dict]:
  """One record per patient: slices, true/predicted tumour pixels, Dice, IoU, HD95.

  Args:
    pred, true: bool (n, H, W) binarised prediction and ground truth of n slices.
    patients: (n,) patient ID of each slice.
    order: indices putting the slices in (patient, slice number) order, so that each patient's
      volume is stacked in anatomical order whatever order the split holds them in.
  """
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  patients = np.asarray(patients, dtype=str)
  order = np.asarray(order, np.int64)
  cases = []
  for patient in sorted(set(patients.tolist())):
    rows = order[patients[order] == patient]
    p, t = pred[rows], true[rows]
    inter, n_pred, n_true = int((p & t).sum()), int(p.sum()), int(t.sum())
    cases.append({"patient": patient, "slices": int(len(rows)), "true_pixels": n_true,
                  "pred_pixels": n_pred,
                  "dice": float(_dice(inter, n_pred, n_true, 1.0)),
                  "iou": float(_iou(inter, n_pred, n_true, 1.0)),
                  "hd95": hd95(p, t)})
  return cases


def summarise_cases(cases: list[dict]) -> dict:
  """Mean, sd (n-1) and median over cases of Dice, IoU and HD95 (HD95 over defined cases)."""
  out = {"num_patients": len(cases)}
  for key in ("dice", "iou", "hd95"):
    values = np.asarray([c[key] for c in cases], np.float64)
    values = values[np.isfinite(values)]
    out[key] = float(values.mean()) if len(values) else float("nan")
    out[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    out[f"{key}_median"] = float(np.median(values)) if len(values) else float("nan")
  out["hd95_undefined"] = int(sum(not np.isfinite(c["hd95"]) for c in cases))
  return out


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
