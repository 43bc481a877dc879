"""Tests of jaxmamba.data that need no files: synthetic source, splits, batches, augment."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba import data
from jaxmamba.data import splits as splits_lib
from jaxmamba.data import synthetic


@pytest.fixture(scope="module")
def small():
  """A small synthetic set: 6 pseudo-patients x 10 slices of 32x32."""
  return synthetic.generate(num_patients=6, slices_per_patient=10, image_size=32, seed=3)


# ---------------------------------------------------------------- synthetic source

def test_synthetic_shapes_dtypes_and_names(small):
  assert len(small) == 60
  assert small.images.shape == (60, 32, 32, 3) and small.images.dtype == np.uint8
  assert small.masks.shape == (60, 32, 32) and small.masks.dtype == np.uint8
  assert set(np.unique(small.masks).tolist()) <= {0, 1}
  assert small.patient_ids() == [f"SYN_{p:03d}" for p in range(6)]
  assert small.names[:2] == ["SYN_000_1", "SYN_000_2"] and small.names[-1] == "SYN_005_10"
  assert (small.patients == np.repeat(small.patient_ids(), 10)).all()


def test_synthetic_is_deterministic_and_seeded():
  a = synthetic.generate(3, 8, 32, seed=5)
  b = synthetic.generate(3, 8, 32, seed=5)
  c = synthetic.generate(3, 8, 32, seed=6)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.masks, b.masks)
  assert not np.array_equal(a.images, c.images)


def test_synthetic_default_size_and_tumour_free_share():
  cfg = data.default_config().synthetic
  s = synthetic.from_config(cfg)
  assert len(s) == cfg.num_patients * cfg.slices_per_patient
  assert s.images.shape[1:] == (256, 256, 3)
  free = 1 - s.has_tumour.mean()
  assert 0.55 <= free <= 0.75, free            # kaggle_3m: 1 - 1373/3929 = 0.65
  # Every pseudo-patient has tumour slices, in one contiguous run (as a real volume would).
  for p in s.patient_ids():
    hits = np.flatnonzero(s.has_tumour[s.patients == p])
    assert hits.size and (np.diff(hits) == 1).all()


def test_synthetic_tumour_is_bright_inside_the_brain(small):
  """Learnability: tumour pixels are brighter (FLAIR-like channel) than the other brain pixels."""
  flair = small.images[..., 1].astype(float)
  tumour = small.masks == 1
  brain = flair > 40
  assert tumour.any() and (brain | ~tumour).all()   # tumour only where there is brain
  assert flair[tumour].mean() > flair[brain & ~tumour].mean() + 40


@pytest.mark.parametrize("kwargs", [dict(num_patients=0), dict(slices_per_patient=1.5),
                                    dict(image_size=4)])
def test_synthetic_rejects_bad_sizes(kwargs):
  with pytest.raises(ValueError):
    synthetic.generate(**kwargs)


# ---------------------------------------------------------------- splits

def _ids(n):
  return [f"P{i:03d}" for i in range(n)]


def test_patient_split_partitions_80_10_10_and_is_deterministic():
  ids = _ids(50)
  tumour = [i % 3 != 0 for i in range(50)]
  train, val, test = splits_lib.patient_split(ids, tumour, seed=0)
  assert (len(train), len(val), len(test)) == (40, 5, 5)
  assert sorted(train + val + test) == ids
  assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
  assert (train, val, test) == splits_lib.patient_split(ids, tumour, seed=0)
  assert (train, val, test) != splits_lib.patient_split(ids, tumour, seed=1)


def test_patient_split_ignores_listing_order():
  ids = _ids(30)
  tumour = [i % 4 != 0 for i in range(30)]
  perm = np.random.default_rng(0).permutation(30)
  shuffled = splits_lib.patient_split([ids[i] for i in perm], [tumour[i] for i in perm], seed=7)
  assert shuffled == splits_lib.patient_split(ids, tumour, seed=7)


def test_patient_split_is_stratified_by_tumour():
  ids = _ids(40)
  tumour = dict(zip(ids, [i < 20 for i in range(40)]))   # half the patients tumour-free
  for seed in range(5):
    _, val, test = splits_lib.patient_split(ids, [tumour[p] for p in ids], seed)
    assert sum(tumour[p] for p in val) == 2 and sum(tumour[p] for p in test) == 2


def test_patient_split_needs_three_patients():
  with pytest.raises(data.DataError):
    splits_lib.patient_split(["a", "b"], [True, False])


@pytest.mark.parametrize("n", [442, 3929, 101, 10])
def test_sklearn_split_reimplementation_matches_sklearn(n):
  model_selection = pytest.importorskip("sklearn.model_selection")
  items = np.arange(n) * 7 + 3
  train, rest = model_selection.train_test_split(items, train_size=0.8, random_state=37)
  val, test = model_selection.train_test_split(rest, train_size=0.5, random_state=37)
  ours = splits_lib.paper_slice_split(n, 37)
  for expected, positions in zip((train, val, test), ours):
    np.testing.assert_array_equal(items[positions], expected)


def test_paper_split_sizes_on_full_dataset():
  # Spec §9.1: the authors' 3,929 slices split 3,143 / 393 / 393.
  assert [len(p) for p in splits_lib.paper_slice_split(3929)] == [3143, 393, 393]


def test_split_slices_does_not_depend_on_input_order(small):
  perm = np.random.default_rng(1).permutation(len(small))
  for mode in ("patient", "slice"):
    a = splits_lib.split_slices(small, mode, seed=2)
    b = splits_lib.split_slices(small.subset(perm), mode, seed=2)
    for part_a, part_b in zip(a, b):
      assert part_a.names == part_b.names
      np.testing.assert_array_equal(part_a.images, part_b.images)


def test_slice_split_covers_every_slice_once_and_leaks_patients(small):
  train, val, test = splits_lib.split_slices(small, "slice")
  names = train.names + val.names + test.names
  assert sorted(names) == sorted(small.names)
  assert set(train.patient_ids()) & set(test.patient_ids())   # the documented leak


def test_load_splits_synthetic_and_split_json(tmp_path):
  cfg = data.default_config()
  cfg.synthetic.update(num_patients=10, slices_per_patient=4, image_size=16)
  splits = data.load_splits(cfg)
  assert isinstance(splits, data.Splits)
  assert sum(len(s) for s in splits) == 40
  patients = [set(s.patient_ids()) for s in splits]
  assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
  path = data.write_split_json(splits, tmp_path)            # a folder -> folder/split.json
  assert path == str(tmp_path / "split.json")
  written = json.loads((tmp_path / "split.json").read_text())
  assert written == {name: sorted(set(s.patients.tolist())) for name, s in
                     zip(("train", "val", "test"), splits)}
  data.write_split_json(splits, tmp_path / "sub" / "s.json")
  assert json.loads((tmp_path / "sub" / "s.json").read_text()) == written


def test_load_splits_rejects_unknown_split_mode():
  cfg = data.default_config()
  cfg.split = "random"
  with pytest.raises(ValueError, match="split"):
    data.load_splits(cfg)


# ---------------------------------------------------------------- batches

def test_batches_shapes_dtypes_and_count(small):
  out = list(data.batches(small, 16, seed=0, epoch=0))
  assert len(out) == data.num_batches(small, 16, True) == 3
  for b in out:
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["mask"].shape == (16, 32, 32, 1) and b["mask"].dtype == np.uint8
    assert set(np.unique(b["mask"]).tolist()) <= {0, 1}


def test_batches_partial_last_batch_and_full_coverage(small):
  out = list(data.batches(small, 16, shuffle=True, seed=4, epoch=2, drop_remainder=False))
  assert [len(b["image"]) for b in out] == [16, 16, 16, 12]
  assert data.num_batches(small, 16, drop_remainder=False) == 4
  # Each slice exactly once: match every yielded image to its source row.
  images = np.concatenate([b["image"] for b in out]).reshape(60, -1)
  masks = np.concatenate([b["mask"] for b in out]).reshape(60, -1)
  source = {row.tobytes(): i for i, row in enumerate(small.images.reshape(60, -1))}
  rows = [source[r.tobytes()] for r in images]
  assert sorted(rows) == list(range(60))
  np.testing.assert_array_equal(masks, small.masks.reshape(60, -1)[rows])


def test_batches_are_deterministic_per_seed_and_epoch(small):
  def first(**kw):
    return next(data.batches(small, 8, **kw))["image"]
  np.testing.assert_array_equal(first(seed=1, epoch=3), first(seed=1, epoch=3))
  assert not np.array_equal(first(seed=1, epoch=3), first(seed=1, epoch=4))
  assert not np.array_equal(first(seed=1, epoch=3), first(seed=2, epoch=3))


def test_batches_without_shuffle_follow_stored_order(small):
  out = list(data.batches(small, 7, shuffle=False, drop_remainder=False))
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in out]), small.images)
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in out])[..., 0], small.masks)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_batches_reject_bad_batch_size(small, bad):
  with pytest.raises(ValueError, match="batch_size"):
    next(data.batches(small, bad))


def test_to_float_matches_numpy(small):
  batch = next(data.batches(small, 4))
  images, masks = data.to_float(batch)
  assert images.dtype == jnp.float32 and masks.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(images),
                                batch["image"].astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(np.asarray(masks), batch["mask"].astype(np.float32))


# ---------------------------------------------------------------- augment

def _float_batch(small, n=4):
  return data.to_float(next(data.batches(small, n, shuffle=False)))


def _augment_cfg(**kw):
  cfg = data.default_config().augment
  cfg.update(enabled=True, flip_lr=0.0, flip_ud=0.0, rotate_deg=0.0, scale_min=1.0,
             scale_max=1.0, brightness=0.0, contrast=0.0)
  cfg.update(**kw)
  return cfg


def test_augment_is_identity_by_default(small):
  images, masks = _float_batch(small)
  cfg = data.default_config().augment
  assert not cfg.enabled
  out_i, out_m = data.augment(jax.random.key(0), images, masks, cfg)
  np.testing.assert_array_equal(out_i, images)
  np.testing.assert_array_equal(out_m, masks)


@pytest.mark.parametrize("key,axis", [("flip_lr", 2), ("flip_ud", 1)])
def test_augment_flips_image_and_mask_together(small, key, axis):
  images, masks = _float_batch(small)
  out_i, out_m = jax.jit(lambda r, i, m: data.augment(r, i, m, _augment_cfg(**{key: 1.0})))(
      jax.random.key(0), images, masks)
  np.testing.assert_allclose(out_i, np.flip(np.asarray(images), axis), atol=1e-6)
  np.testing.assert_array_equal(out_m, np.flip(np.asarray(masks), axis))


def test_warp_quarter_turn_matches_rot90(small):
  from jaxmamba.data.augment import warp
  images, masks = _float_batch(small, 2)
  quarter = jnp.array([[[0.0, 1.0], [-1.0, 0.0]]] * 2)   # output (r, c) <- input (c, -r)
  out_i, out_m = warp(images, masks, quarter)
  np.testing.assert_allclose(out_i, np.rot90(np.asarray(images), 1, axes=(1, 2)), atol=1e-5)
  np.testing.assert_array_equal(out_m, np.rot90(np.asarray(masks), 1, axes=(1, 2)))


def test_augment_random_keeps_masks_binary_and_range(small):
  images, masks = _float_batch(small, 8)
  cfg = _augment_cfg(flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0, scale_min=0.8, scale_max=1.2,
                     brightness=0.1, contrast=0.2)
  step = jax.jit(lambda r, i, m: data.augment(r, i, m, cfg))
  out_i, out_m = step(jax.random.key(1), images, masks)
  again_i, _ = step(jax.random.key(1), images, masks)
  other_i, _ = step(jax.random.key(2), images, masks)
  assert out_i.shape == images.shape and out_m.shape == masks.shape
  assert set(np.unique(np.asarray(out_m)).tolist()) <= {0.0, 1.0}
  assert float(out_i.min()) >= 0.0 and float(out_i.max()) <= 1.0
  np.testing.assert_array_equal(out_i, again_i)
  assert not np.array_equal(np.asarray(out_i), np.asarray(images))
  assert not np.array_equal(np.asarray(out_i), np.asarray(other_i))


def test_augment_rejects_bad_config(small):
  images, masks = _float_batch(small)
  with pytest.raises(ValueError):
    data.augment(jax.random.key(0), images, masks, _augment_cfg(flip_lr=1.5))
  with pytest.raises(ValueError):
    data.augment(jax.random.key(0), images, masks, _augment_cfg(scale_min=0.0))


def test_data_error_is_a_value_error():
  assert issubclass(data.DataError, ValueError)


def test_synthetic_data_is_learnable():
  """A tiny conv net trained briefly through the whole pipeline gets a clearly rising Dice."""
  import flax.linen as nn
  import optax

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      return nn.Conv(1, (1, 1))(x)

  cfg = data.default_config()
  cfg.synthetic.update(num_patients=6, slices_per_patient=12, image_size=32, seed=0)
  cfg.augment.update(enabled=True, rotate_deg=10.0)
  train, val, _ = data.load_splits(cfg)
  model, opt = Tiny(), optax.adam(3e-2)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  state = opt.init(params)

  def dice(logits, masks):
    p = jax.nn.sigmoid(logits)
    return (2 * (p * masks).sum() + 1) / (p.sum() + masks.sum() + 1)

  @jax.jit
  def step(params, state, batch, rng):
    images, masks = data.augment(rng, *data.to_float(batch), cfg.augment)
    grads = jax.grad(lambda p: 1 - dice(model.apply(p, images), masks))(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  def val_dice(params):
    images, masks = data.to_float(next(data.batches(val, len(val), shuffle=False)))
    pred = (model.apply(params, images) > 0).astype(jnp.float32)
    return float((2 * (pred * masks).sum()) / (pred.sum() + masks.sum()))

  before = val_dice(params)
  for epoch in range(8):
    for i, batch in enumerate(data.batches(train, 16, seed=0, epoch=epoch)):
      params, state = step(params, state, batch, jax.random.key(epoch * 100 + i))
  after = val_dice(params)
  print("val Dice before/after", before, after)
  assert after > 0.6 and after > before + 0.3, (before, after)
