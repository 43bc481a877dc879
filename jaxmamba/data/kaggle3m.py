"""Finding, pairing and reading the slices of a kaggle_3m folder (no TensorFlow, no TFDS).

Layout: `ROOT/PATIENT/PATIENT_N.tif` (256x256x3 uint8 image) and `ROOT/PATIENT/PATIENT_N_mask.tif`
(256x256 uint8 mask, values {0, 255}).  Files at ROOT (data.csv, README.md) and hidden entries are
ignored; every `.tif` inside a patient folder must follow the naming scheme and have its partner.
Every problem raises `DataError` naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re

import numpy as np
import tifffile

from jaxmamba.data.errors import DataError
from jaxmamba.data.slices import SliceSet

IMAGE_SHAPE = (256, 256, 3)
MASK_SHAPE = (256, 256)
# Cap on how many pairing problems one error message lists.
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class SliceFiles:
  """One slice of the folder: its patient, 1-based slice number and two files."""
  patient: str
  number: int
  image_path: str
  mask_path: str

  @property
  def name(self) -> str:
    return f"{self.patient}_{self.number}"


def _check_folder(root: str) -> str:
  if not root:
    raise DataError("no data folder given (data.dir is empty)")
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.exists(root):
    raise DataError(f"{root}: data folder does not exist")
  if not os.path.isdir(root):
    raise DataError(f"{root}: data folder is not a directory")
  return root


def _visible(names):
  return sorted(n for n in names if not n.startswith("."))


def scan(root: str) -> list[SliceFiles]:
  """Lists the slices of a kaggle_3m folder, sorted by (patient, slice number).

  The result does not depend on the order in which the file system lists entries.  Raises
  DataError, listing every unpaired or misnamed file, before any pixel is read.
  """
  root = _check_folder(root)
  patients = [p for p in _visible(os.listdir(root)) if os.path.isdir(os.path.join(root, p))]
  if not patients:
    raise DataError(f"{root}: no patient folders (expected ROOT/PATIENT/PATIENT_N.tif)")
  problems, found = [], []
  for patient in patients:
    folder = os.path.join(root, patient)
    pattern = re.compile(rf"^{re.escape(patient)}_(\d+)(_mask)?\.tif$")
    images, masks = {}, {}
    for fname in _visible(os.listdir(folder)):
      path = os.path.join(folder, fname)
      if not fname.lower().endswith((".tif", ".tiff")):
        continue  # not a slice file (notes, thumbnails): not part of the dataset layout
      match = pattern.match(fname)
      if match is None or not os.path.isfile(path):
        problems.append(f"{path}: name does not follow {patient}_N.tif / {patient}_N_mask.tif")
        continue
      number = int(match.group(1))
      (masks if match.group(2) else images)[number] = path
    for number in sorted(images.keys() - masks.keys()):
      problems.append(f"{images[number]}: image has no mask "
                      f"(expected {patient}_{number}_mask.tif)")
    for number in sorted(masks.keys() - images.keys()):
      problems.append(f"{masks[number]}: mask has no image (expected {patient}_{number}.tif)")
    paired = sorted(images.keys() & masks.keys())
    if not images and not masks:
      problems.append(f"{folder}: patient folder holds no slices")
    found += [SliceFiles(patient, n, images[n], masks[n]) for n in paired]
  if problems:
    extra = len(problems) - _MAX_LISTED
    listed = problems[:_MAX_LISTED] + ([f"... and {extra} more"] if extra > 0 else [])
    raise DataError(f"{len(problems)} problem(s) in data folder {root}:\n  " + "\n  ".join(listed))
  return found


def fingerprint(root: str) -> str:
  """A short hash of the folder's path and file listing (names, sizes, mtimes).

  Identifies the TFDS cache built from this folder, so a changed folder gets a fresh build.
  """
  root = _check_folder(root)
  digest = hashlib.sha256(root.encode())
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fname in sorted(filenames):
      if fname.lower().endswith((".tif", ".tiff")):
        st = os.stat(os.path.join(dirpath, fname))
        rel = os.path.relpath(os.path.join(dirpath, fname), root)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


class _DropRecords(logging.Filter):
  def filter(self, record):
    return False


@contextlib.contextmanager
def _quiet_tifffile():
  """tifffile logs its own complaints about damaged files; we raise DataError instead."""
  logger, drop = logging.getLogger("tifffile"), _DropRecords()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def read_tiff(path: str) -> np.ndarray:
  """Reads the first page of a TIFF, raising DataError if it is unreadable or truncated."""
  try:
    size = os.path.getsize(path)
    with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
      if not tif.pages:
        raise DataError(f"{path}: unreadable or truncated TIFF (no image directory)")
      page = tif.pages[0]
      ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
      if not ends or max(ends) > size:
        raise DataError(f"{path}: truncated TIFF (pixel data ends past the file's "
                        f"{size} bytes)")
      return page.asarray()
  except DataError:
    raise
  except Exception as e:  # tifffile raises many types for damaged files
    raise DataError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from e


def read_slice(files: SliceFiles) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one slice.

  Returns:
    image: uint8 (256, 256, 3) in the FILE's channel order (RGB: pre-contrast, FLAIR,
      post-contrast); reverse the last axis for the authors' cv2 BGR order.
    mask: uint8 (256, 256) with values in {0, 255} exactly as stored.
  """
  image = read_tiff(files.image_path)
  if image.dtype != np.uint8:
    raise DataError(f"{files.image_path}: image dtype is {image.dtype}, expected uint8")
  if image.shape != IMAGE_SHAPE:
    raise DataError(f"{files.image_path}: image shape is {image.shape}, expected {IMAGE_SHAPE}")
  mask = read_tiff(files.mask_path)
  if mask.dtype != np.uint8:
    raise DataError(f"{files.mask_path}: mask dtype is {mask.dtype}, expected uint8")
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.shape != MASK_SHAPE:
    raise DataError(f"{files.mask_path}: mask shape is {mask.shape}, expected {MASK_SHAPE}")
  values = np.unique(mask)
  bad = values[(values != 0) & (values != 255)]
  if bad.size:
    raise DataError(f"{files.mask_path}: mask has values other than 0 and 255 "
                    f"({bad.size} distinct, e.g. {bad[:5].tolist()})")
  return image, mask


def to_training_layout(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A stored slice as the authors' code held it: the image's channels reversed (cv2's BGR
  order) and the mask binarised at half its range (stored {0, 255} -> {0, 1})."""
  return image[..., ::-1], (mask >= 128).astype(np.uint8)


def load_all(root: str) -> SliceSet:
  """Every slice read straight from the TIFF files (`data.tfds_dir=""`: no TFDS copy, nothing
  written), sorted by (patient, slice number), in the layout `to_training_layout` gives; the
  same arrays as `tfds_lgg.load_all`, with the same checks (`read_slice`)."""
  from tqdm import tqdm
  files = scan(root)
  images = np.empty((len(files),) + IMAGE_SHAPE, np.uint8)
  masks = np.empty((len(files),) + MASK_SHAPE, np.uint8)
  # ~5 ms a slice: the full 3,929 take about 20 s, worth a progress bar.
  for i, slice_files in enumerate(tqdm(files, desc="reading TIFFs", unit="slice", leave=False)):
    images[i], masks[i] = to_training_layout(*read_slice(slice_files))
  return SliceSet(images, masks, [f.patient for f in files], [f.name for f in files])
