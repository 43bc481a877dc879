"""In-memory slice collections: `SliceSet` (one split) and `Splits` (train/val/test)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass
class SliceSet:
  """Decoded slices held in memory.

  Attributes:
    images: uint8 (n, H, W, 3), BGR channel order (the file's order reversed, as cv2 reads it).
    masks: uint8 (n, H, W), values in {0, 1}.
    patients: str array (n,), patient ID (folder name) of each slice.
    names: slice names (n,), e.g. "TCGA_CS_4942_19970222_7" (file name without ".tif").
  """
  images: np.ndarray
  masks: np.ndarray
  patients: np.ndarray
  names: list[str]

  def __post_init__(self):
    n = len(self.images)
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (n, H, W, 3), got {self.images.dtype} "
                       f"{self.images.shape}")
    if self.masks.dtype != np.uint8 or self.masks.shape != self.images.shape[:3]:
      raise ValueError(f"masks must be uint8 {self.images.shape[:3]}, got {self.masks.dtype} "
                       f"{self.masks.shape}")
    self.patients = np.asarray(self.patients, dtype=str)
    self.names = list(self.names)
    if len(self.patients) != n or len(self.names) != n:
      raise ValueError(f"{n} images but {len(self.patients)} patient IDs and "
                       f"{len(self.names)} names")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def has_tumour(self) -> np.ndarray:
    """bool (n,): whether each slice's mask has any tumour pixel."""
    return self.masks.reshape(len(self), -1).any(axis=1)

  def patient_ids(self) -> list[str]:
    """Distinct patient IDs, sorted."""
    return sorted(set(self.patients.tolist()))

  def subset(self, indices) -> "SliceSet":
    """The slices at `indices`, in that order (copies the pixels)."""
    indices = np.asarray(indices, dtype=np.int64)
    return SliceSet(self.images[indices], self.masks[indices], self.patients[indices],
                    [self.names[i] for i in indices])


class Splits(NamedTuple):
  """The three splits; unpacks as `train, val, test = splits`."""
  train: SliceSet
  val: SliceSet
  test: SliceSet
