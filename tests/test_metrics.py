"""Metrics on hand-worked examples (counts written out by hand, not produced by the code)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.train import metrics


def test_thresholds_follow_the_paper():
  logits = jnp.asarray([[-1.0], [0.2], [0.5], [0.7]])
  # raw-logit rule (UNet/ResNet/UMamba): >= 0.5; sigmoid rule (SegFormer/UL): logit >= 0.
  assert metrics.binarize(logits, "logit").ravel().tolist() == [False, False, True, True]
  assert metrics.binarize(logits, "sigmoid").ravel().tolist() == [False, True, True, True]
  with pytest.raises(ValueError, match="unknown threshold"):
    metrics.binarize(logits, "otsu")


def test_pixel_counts_per_image():
  logits = np.full((2, 2, 2, 1), -5.0, np.float32)
  masks = np.zeros((2, 2, 2, 1), np.float32)
  logits[0, 0, 0] = logits[0, 0, 1] = 5.0      # image 0 predicts 2 pixels
  masks[0, 0, 0] = masks[0, 1, 1] = 1.0        # image 0 has 2 true pixels, 1 shared
  masks[1, 1, 0] = 1.0                         # image 1: 1 true pixel, no prediction
  c = metrics.pixel_counts(jnp.asarray(logits), jnp.asarray(masks), "sigmoid")
  assert np.asarray(c["inter"]).tolist() == [1, 0]
  assert np.asarray(c["pred"]).tolist() == [2, 0]
  assert np.asarray(c["true"]).tolist() == [2, 1]


def test_paper_metric_pools_each_batch_and_weights_batches_equally():
  # 3 slices, batch size 2 -> batches {0, 1} and {2} (partial, weighted like the full one).
  inter = [3, 1, 2]
  pred = [4, 1, 2]
  true = [4, 3, 6]
  m = metrics.paper_metrics(inter, pred, true, batch_size=2)
  # batch 1: I=4, P=5, G=7 -> Dice 8/12, IoU 4/8; batch 2: I=2, P=2, G=6 -> Dice 4/8, IoU 2/6.
  assert m["dice"] == pytest.approx((8 / 12 + 4 / 8) / 2)
  assert m["iou"] == pytest.approx((4 / 8 + 2 / 6) / 2)
  assert m["num_batches"] == 2 and m["nan_batches"] == 0


def test_paper_metric_nan_when_a_batch_is_all_empty():
  m = metrics.paper_metrics([2, 0, 0], [2, 0, 0], [2, 0, 0], batch_size=1)
  assert math.isnan(m["dice"]) and m["nan_batches"] == 2
  assert m["dice_nanmean"] == pytest.approx(1.0)
  assert m["iou"] == pytest.approx(1 / 3)          # empty union counts as IoU 0


def test_paper_metric_depends_on_batch_size():
  inter, pred, true = [9, 0], [10, 5], [10, 0]     # a good slice and a false-positive one
  by_one = metrics.paper_metrics(inter, pred, true, 1)["dice"]
  by_two = metrics.paper_metrics(inter, pred, true, 2)["dice"]
  assert by_one == pytest.approx((18 / 20 + 0.0) / 2)
  assert by_two == pytest.approx(18 / 25)


def test_slice_metric_empty_handling():
  # (a) hit, (b) empty-on-empty, (c) false positive on empty, (d) missed tumour.
  inter = [1, 0, 0, 0]
  pred = [1, 0, 3, 0]
  true = [3, 0, 0, 2]
  m = metrics.slice_metrics(inter, pred, true)
  assert m["dice"] == pytest.approx((2 / 4 + 1 + 0 + 0) / 4)
  assert m["iou"] == pytest.approx((1 / 3 + 1 + 0 + 0) / 4)
  assert m["dice_tumour"] == pytest.approx((2 / 4 + 0) / 2)
  assert m["false_positive_rate_empty"] == pytest.approx(0.5)
  assert m["num_tumour_slices"] == 2


def test_patient_dice_sums_volumes():
  inter = [1, 1, 0, 0]
  pred = [2, 1, 0, 0]
  true = [1, 2, 0, 0]
  patients = ["A", "A", "B", "B"]
  m = metrics.patient_metrics(inter, pred, true, patients)
  # A: 2*2 / (3 + 3) ; B: empty volume predicted empty -> 1.
  assert m["per_patient"] == {"A": pytest.approx(4 / 6), "B": 1.0}
  assert m["dice"] == pytest.approx((4 / 6 + 1) / 2)


def test_accumulator_drops_padding():
  acc = metrics.CountAccumulator()
  acc.add({"inter": np.array([1, 2, 9]), "pred": np.array([1, 2, 9]),
           "true": np.array([1, 2, 9])}, valid=2)
  inter, _, _ = acc.arrays()
  assert inter.tolist() == [1, 2]


def _brute_hd95(pred, true):
  """HD95 from every pairwise distance between surface voxels (face-neighbour rule, by hand)."""
  def surface(m):
    padded = np.pad(m, 1)
    inner = np.ones_like(m)
    for axis in range(m.ndim):
      for shift in (-1, 1):
        inner &= np.roll(padded, shift, axis)[tuple(slice(1, -1) for _ in range(m.ndim))]
    return np.argwhere(m & ~inner).astype(np.float64)
  sp, st = surface(pred), surface(true)
  d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
  return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force_on_random_volumes(seed):
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  shape = (int(rng.integers(2, 6)), 20, 24)
  # Blobby random masks (smoothed noise), some touching the volume's edge.
  pred = ndimage.uniform_filter(rng.random(shape), 3) > 0.55
  true = ndimage.uniform_filter(rng.random(shape), 3) > 0.55
  if seed == 0:
    pred[:, :3] = True                       # on the border
  if not pred.any() or not true.any():
    pytest.skip("empty draw")
  assert metrics.hd95(pred, true) == pytest.approx(_brute_hd95(pred, true), rel=1e-9)
  assert metrics.hd95(true, pred) == pytest.approx(metrics.hd95(pred, true))


def test_hd95_simple_cases_and_empty_conventions():
  a = np.zeros((3, 10, 10), bool)
  a[1, 2:5, 2:5] = True
  b = np.roll(a, 4, axis=2)                  # the same square moved 4 pixels
  assert metrics.hd95(a, a) == 0.0
  assert metrics.hd95(a, b) == pytest.approx(4.0)
  empty = np.zeros_like(a)
  assert metrics.hd95(empty, empty) == 0.0                   # both empty: perfect
  assert np.isnan(metrics.hd95(a, empty)) and np.isnan(metrics.hd95(empty, a))
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.hd95(a, a[:2])


def test_case_metrics_stack_slices_in_order_and_summarise():
  true = np.zeros((5, 8, 8), bool)
  true[1:4, 2:5, 2:5] = True                 # patient A: slices 0..3 ; patient B: slice 4 (empty)
  pred = true.copy()
  pred[2:4] = False                          # only slice 1 found
  patients = np.array(["A", "A", "A", "A", "B"])
  shuffled = np.array([2, 0, 4, 3, 1])       # the split's order; `order` restores slice order
  cases = metrics.case_metrics(pred[shuffled], true[shuffled], patients[shuffled],
                               order=np.argsort(shuffled))
  a, b = cases
  assert (a["patient"], a["slices"], a["true_pixels"], a["pred_pixels"]) == ("A", 4, 27, 9)
  assert a["dice"] == pytest.approx(2 * 9 / 36) and a["iou"] == pytest.approx(9 / 27)
  assert a["hd95"] == pytest.approx(metrics.hd95(pred[:4], true[:4]))
  # stacked in the split's order instead, the volume (and its HD95) would differ
  assert a["hd95"] != pytest.approx(metrics.hd95(pred[[2, 0, 3, 1]], true[[2, 0, 3, 1]]))
  assert (b["dice"], b["iou"], b["hd95"]) == (1.0, 1.0, 0.0)
  s = metrics.summarise_cases(cases + [dict(b, dice=0.0, iou=0.0, hd95=float("nan"))])
  assert s["num_patients"] == 3 and s["hd95_undefined"] == 1
  assert s["dice"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert s["hd95"] == pytest.approx(a["hd95"] / 2)            # NaN left out of the mean
