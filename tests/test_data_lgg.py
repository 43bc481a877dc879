"""Tests of the kaggle_3m pipeline on the real LGG subset (21 patients, 442 slices).

The subset lives outside the repository: <repo>/../shared/data/lgg_subset, or $JAXMAMBA_LGG_DIR
(tests/_data.py; under CI=true a missing subset fails these tests instead of skipping them).
Damaged copies are made in temporary folders only.
"""
import glob
import importlib
import os
import random
import shutil
import sys

import numpy as np
import pytest
import tifffile

from jaxmamba import data
from jaxmamba.data import kaggle3m
from jaxmamba.data import splits as splits_lib

from tests._data import in_ci, lgg_dir, lgg_path

LGG_DIR = lgg_path()
# tensorflow-datasets is a dependency: under CI its absence fails the module instead of skipping.
tfds_lgg = (importlib.import_module if in_ci() else pytest.importorskip)("jaxmamba.data.tfds_lgg")


@pytest.fixture(scope="session", autouse=True)
def _subset_present():
  """Every test here needs the subset: skipped without it, failed under CI=true (tests/_data.py)."""
  lgg_dir()


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def lgg(tfds_dir):
  """All slices of the subset, through one TFDS build in a temporary folder (once per session)."""
  return tfds_lgg.load_all(LGG_DIR, tfds_dir)


def _cfg(tfds_dir, **kw):
  cfg = data.default_config()
  cfg.dir, cfg.tfds_dir = LGG_DIR, tfds_dir
  cfg.update(kw)
  return cfg


def test_counts(lgg):
  # The numbers stated in the subset's PROVENANCE.md, and a plain glob of the folder.
  assert len(lgg) == 442 == len(glob.glob(os.path.join(LGG_DIR, "*", "*_mask.tif")))
  assert len(lgg.patient_ids()) == 21
  assert int(lgg.has_tumour.sum()) == 166
  assert lgg.images.shape == (442, 256, 256, 3) and lgg.masks.shape == (442, 256, 256)


def test_pixels_bit_exact_against_tifffile(lgg):
  for i, (patient, name) in enumerate(zip(lgg.patients, lgg.names)):
    stem = os.path.join(LGG_DIR, patient, name)
    image = tifffile.imread(stem + ".tif")
    mask = tifffile.imread(stem + "_mask.tif")
    np.testing.assert_array_equal(lgg.images[i], image[..., ::-1])     # cv2's BGR order
    np.testing.assert_array_equal(lgg.masks[i], (mask / 255.0 >= 0.5).astype(np.uint8))


def test_direct_read_equals_the_tfds_copy(lgg):
  """data.tfds_dir="" reads the TIFFs straight into the same arrays as the TFDS copy."""
  direct = data.load_all(_cfg(""))
  assert direct.names == lgg.names
  np.testing.assert_array_equal(direct.patients, lgg.patients)
  np.testing.assert_array_equal(direct.images, lgg.images)
  np.testing.assert_array_equal(direct.masks, lgg.masks)


def test_without_tensorflow_datasets(damaged, tmp_path, monkeypatch):
  """Where TFDS is not installed (the GPU machines' image): a clear error naming the way out,
  which works."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # import raises
  monkeypatch.delitem(sys.modules, "jaxmamba.data.tfds_lgg", raising=False)
  monkeypatch.delattr(data, "tfds_lgg", raising=False)   # else `from ... import` finds it
  with pytest.raises(data.DataError, match="tensorflow-datasets.*tfds_dir= "):
    _load(damaged, tmp_path, "tfds")
  assert len(_load(damaged, tmp_path, "direct")) == 20


def test_slice_order_is_patient_then_number(lgg):
  keys = [(p, int(n.rsplit("_", 1)[1])) for p, n in zip(lgg.patients, lgg.names)]
  assert keys == sorted(keys)


def test_tfds_build_is_reused(lgg, tfds_dir, monkeypatch):
  def no_rebuild(*args, **kwargs):
    raise AssertionError("the TFDS copy was rebuilt")
  monkeypatch.setattr(tfds_lgg.LggKaggle3m, "download_and_prepare", no_rebuild)
  tfds_lgg.clear_memory_cache()   # read the TFDS files again, not the in-memory copy
  again = tfds_lgg.load_all(LGG_DIR, tfds_dir)
  assert again.names == lgg.names


def test_patient_split_disjoint_and_deterministic(lgg, tfds_dir, tmp_path):
  splits = data.load_splits(_cfg(tfds_dir))
  patients = [set(s.patient_ids()) for s in splits]
  assert [len(p) for p in patients] == [17, 2, 2]
  assert set.union(*patients) == set(lgg.patient_ids())
  assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
  assert sum(len(s) for s in splits) == 442
  again = data.load_splits(_cfg(tfds_dir))
  assert all(a.names == b.names for a, b in zip(splits, again))
  other = data.load_splits(_cfg(tfds_dir, split_seed=1))
  assert any(a.names != b.names for a, b in zip(splits, other))
  path = data.write_split_json(splits, tmp_path)
  assert os.path.exists(path)


def test_splits_ignore_file_listing_order(lgg, monkeypatch):
  """Shuffle what the file system lists: the scan, and so every split, stays the same."""
  expected_scan = kaggle3m.scan(LGG_DIR)
  listdir, rng = os.listdir, random.Random(0)

  def shuffled_listdir(path):
    names = listdir(path)
    rng.shuffle(names)
    return names
  monkeypatch.setattr(os, "listdir", shuffled_listdir)
  assert kaggle3m.scan(LGG_DIR) == expected_scan
  monkeypatch.undo()
  perm = np.random.default_rng(0).permutation(len(lgg))
  for mode in ("patient", "slice"):
    a = splits_lib.split_slices(lgg, mode)
    b = splits_lib.split_slices(lgg.subset(perm), mode)
    assert all(x.names == y.names for x, y in zip(a, b))


def test_paper_slice_split_matches_sklearn_on_sorted_files(tfds_dir):
  model_selection = pytest.importorskip("sklearn.model_selection")
  files = sorted(os.path.relpath(p, LGG_DIR)
                 for p in glob.glob(os.path.join(LGG_DIR, "*", "*_mask*")))
  train, rest = model_selection.train_test_split(files, train_size=0.8, random_state=37)
  val, test = model_selection.train_test_split(rest, train_size=0.5, random_state=37)
  splits = data.load_splits(_cfg(tfds_dir, split="slice"))
  for expected, part in zip((train, val, test), splits):
    assert [f"{p}/{n}_mask.tif" for p, n in zip(part.patients, part.names)] == expected


# ---------------------------------------------------------------- bad input

PATIENT = "TCGA_CS_4942_19970222"


@pytest.fixture
def damaged(tmp_path):
  """A writable copy of one patient (20 slices) in a kaggle_3m-like folder."""
  root = tmp_path / "kaggle_3m"
  shutil.copytree(os.path.join(LGG_DIR, PATIENT), root / PATIENT)
  return root


@pytest.fixture(params=["tfds", "direct"])
def via(request):
  """Each bad-input test reads through the TFDS copy and straight from the TIFFs."""
  return request.param


def _load(root, tmp_path, via="tfds"):
  cfg = data.default_config()
  cfg.dir, cfg.tfds_dir = str(root), str(tmp_path / "tfds") if via == "tfds" else ""
  return data.load_all(cfg)


def test_undamaged_copy_loads(damaged, tmp_path, via):
  assert len(_load(damaged, tmp_path, via)) == 20


def test_missing_folder(tmp_path, via):
  with pytest.raises(data.DataError, match="does not exist"):
    _load(tmp_path / "nowhere", tmp_path, via)


def test_image_without_mask(damaged, tmp_path, via):
  (damaged / PATIENT / f"{PATIENT}_3_mask.tif").unlink()
  with pytest.raises(data.DataError, match=rf"{PATIENT}_3\.tif: image has no mask"):
    _load(damaged, tmp_path, via)


def test_mask_without_image(damaged, tmp_path, via):
  (damaged / PATIENT / f"{PATIENT}_4.tif").unlink()
  with pytest.raises(data.DataError, match=rf"{PATIENT}_4_mask\.tif: mask has no image"):
    _load(damaged, tmp_path, via)


def test_misnamed_file_is_not_dropped(damaged, tmp_path, via):
  shutil.copy(damaged / PATIENT / f"{PATIENT}_5.tif", damaged / PATIENT / "stray.tif")
  with pytest.raises(data.DataError, match=r"stray\.tif: name does not follow"):
    _load(damaged, tmp_path, via)


@pytest.mark.parametrize("suffix,array,match", [
    ("", np.zeros((128, 128, 3), np.uint8), "image shape"),
    ("", np.zeros((256, 256), np.uint8), "image shape"),
    ("", np.zeros((256, 256, 3), np.uint16), "image dtype"),
    ("_mask", np.zeros((256, 256), np.float32), "mask dtype"),
    ("_mask", np.zeros((256, 128), np.uint8), "mask shape"),
    ("_mask", np.full((256, 256), 128, np.uint8), "values other than 0 and 255"),
])
def test_wrong_content(damaged, tmp_path, suffix, array, match, via):
  path = damaged / PATIENT / f"{PATIENT}_7{suffix}.tif"
  tifffile.imwrite(path, array)
  with pytest.raises(data.DataError, match=match) as info:
    _load(damaged, tmp_path, via)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 5])
def test_truncated_file(damaged, tmp_path, keep, via):
  path = damaged / PATIENT / f"{PATIENT}_9.tif"
  content = path.read_bytes()
  path.write_bytes(content[:int(keep * len(content)) if keep < 1 else keep])
  with pytest.raises(data.DataError, match="truncated|unreadable") as info:
    _load(damaged, tmp_path, via)
  assert str(path) in str(info.value)


def test_unreadable_file(damaged, tmp_path, via):
  path = damaged / PATIENT / f"{PATIENT}_2_mask.tif"
  path.write_bytes(b"this is not a TIFF file" * 100)
  with pytest.raises(data.DataError, match="unreadable") as info:
    _load(damaged, tmp_path, via)
  assert str(path) in str(info.value)


def test_a_repaired_folder_builds(damaged, tmp_path, via):
  """A failed build leaves nothing behind that a later good build would pick up."""
  path = damaged / PATIENT / f"{PATIENT}_7_mask.tif"
  good = path.read_bytes()
  tifffile.imwrite(path, np.full((256, 256), 7, np.uint8))
  with pytest.raises(data.DataError):
    _load(damaged, tmp_path, via)
  path.write_bytes(good)
  assert len(_load(damaged, tmp_path, via)) == 20
