"""Train/val/test splits: by patient (default), k-fold by patient, or the paper's slice split.

* `patient_split`: 80/10/10 of the patients with a fixed seed, stratified by whether a patient has
  any tumour slice.  It depends only on the set of patient IDs (they are sorted first), never on
  the order in which a file system lists them.
* `patient_folds` / `fold_split`: k-fold cross-validation by patient, stratified the same way;
  fold i is the test set, and the validation patients (model selection) are drawn from the other
  folds, never from the held-out one.
* `paper_slice_split`: the authors' split (spec models-conv-umamba.md §9.1): sklearn
  `train_test_split(train_size=0.8, random_state=37)`, then the rest `train_size=0.5,
  random_state=37`, first part = val, second = test.  Reimplemented with numpy's legacy
  `RandomState` exactly as sklearn draws it, on the file list sorted by mask path
  ("PATIENT/PATIENT_N_mask.tif", plain string order) rather than the authors' unsorted glob.
  WARNING: it splits slices, not patients, so neighbouring slices of one patient land in train,
  val and test and test scores are optimistic (patient leakage).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from jaxmamba.data.errors import DataError
from jaxmamba.errors import ConfigError
from jaxmamba.data.slices import SliceSet, Splits

FRACTIONS = (0.8, 0.1, 0.1)


def _largest_remainder(total: int, weights: list[int]) -> list[int]:
  """Splits `total` into integer parts proportional to `weights` (Hamilton's method)."""
  exact = [total * w / sum(weights) for w in weights]
  parts = [math.floor(e) for e in exact]
  by_remainder = sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))
  for i in by_remainder[: total - sum(parts)]:
    parts[i] += 1
  return parts


# Split modes: "paper" is the authors' slice split; "slice" is its earlier name, still accepted.
SPLIT_MODES = ("patient", "paper")
_ALIASES = {"slice": "paper"}


def split_mode(mode: str) -> str:
  """The canonical name of a split mode ("slice" -> "paper"); ConfigError for unknown ones."""
  mode = _ALIASES.get(mode, mode)
  if mode not in SPLIT_MODES:
    raise ConfigError(f"data.split must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
  return mode


def protocol(cfg) -> str:
  """How test patients relate to training, for labelling every metric of a run (data config)."""
  if split_mode(cfg.split) == "paper":
    return "paper slice split (patients shared between training and test)"
  if cfg.get("folds", 0):
    return f"patient {cfg.folds}-fold CV, fold {cfg.fold} (held-out patients)"
  return "patient split (held-out patients)"


def _tumour_map(patients, has_tumour) -> dict[str, bool]:
  tumour = dict(zip((str(p) for p in patients), (bool(t) for t in has_tumour)))
  if len(tumour) != len(patients):
    raise ValueError("patient IDs must be distinct")
  return tumour


def _strata(tumour: dict[str, bool]) -> list[list[str]]:
  """[tumour patients, tumour-free patients], each sorted (so file order never matters)."""
  return [sorted(p for p, t in tumour.items() if t), sorted(p for p, t in tumour.items() if not t)]


def patient_folds(patients, has_tumour, k: int, seed: int = 0) -> list[list[str]]:
  """Deals the patients into `k` folds, stratified by `has_tumour`; each fold sorted.

  Each stratum is shuffled by `seed` and dealt round-robin, the second stratum continuing where
  the first stopped, so fold sizes differ by at most one and so do each fold's tumour counts.
  """
  tumour = _tumour_map(patients, has_tumour)
  if isinstance(k, bool) or not isinstance(k, int) or k < 2:
    raise ValueError(f"cross-validation needs an integer k >= 2 folds, got {k!r}")
  if len(tumour) < k:
    raise DataError(f"{k} folds need at least {k} patients, got {len(tumour)}")
  rng = np.random.default_rng(seed)
  dealt = [stratum[i] for stratum in _strata(tumour) for i in rng.permutation(len(stratum))]
  return [sorted(dealt[i::k]) for i in range(k)]


def fold_split(patients, has_tumour, k: int, fold: int,
               seed: int = 0) -> tuple[list[str], list[str], list[str]]:
  """(train, val, test) patients of fold `fold` (0-based) of a stratified k-fold split.

  test = fold `fold`; val = round(10% of all patients) (at least one) drawn stratified from the
  other folds (seeded by `seed` and `fold`); train = the rest of the other folds.
  """
  if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < k:
    raise ValueError(f"fold must be an integer in [0, {k}), got {fold!r}")
  tumour = _tumour_map(patients, has_tumour)
  test = patient_folds(patients, has_tumour, k, seed)[fold]
  rest = {p: t for p, t in tumour.items() if p not in set(test)}
  if len(rest) < 2:
    raise DataError(f"fold {fold} leaves {len(rest)} patient(s) for training and validation")
  strata = _strata(rest)
  n_val = max(1, round(FRACTIONS[1] * len(tumour)))
  val_parts = _largest_remainder(n_val, [len(s) for s in strata])
  rng = np.random.default_rng([seed, fold])
  val = [p for stratum, nv in zip(strata, val_parts)
         for p in [stratum[i] for i in rng.permutation(len(stratum))][:nv]]
  train = [p for p in rest if p not in set(val)]
  return sorted(train), sorted(val), test


def patient_split(patients, has_tumour, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
  """Splits patient IDs 80/10/10 into (train, val, test), stratified by `has_tumour`.

  Args:
    patients: distinct patient IDs (any order).
    has_tumour: for each patient, whether any of its slices has tumour.
    seed: the split seed; the result depends only on (set of patients, their strata, seed).

  Val and test each get round(10% of the patients) (at least one), shared out between the
  tumour / tumour-free strata in proportion to their sizes; train gets the rest.
  """
  tumour = _tumour_map(patients, has_tumour)
  n = len(tumour)
  if n < 3:
    raise DataError(f"a patient split needs at least 3 patients, got {n}")
  n_val = n_test = max(1, round(FRACTIONS[1] * n))
  strata = _strata(tumour)
  sizes = [len(s) for s in strata]
  val_parts = _largest_remainder(n_val, sizes)
  test_parts = _largest_remainder(n_test, sizes)
  rng = np.random.default_rng(seed)
  train, val, test = [], [], []
  for stratum, nv, nt in zip(strata, val_parts, test_parts):
    order = [stratum[i] for i in rng.permutation(len(stratum))]
    test += order[:nt]
    val += order[nt:nt + nv]
    train += order[nt + nv:]
  return sorted(train), sorted(val), sorted(test)


def sklearn_train_test_indices(n: int, train_size: float, random_state: int):
  """(train, test) indices exactly as sklearn's train_test_split(shuffle=True) picks them.

  sklearn takes n_train = floor(train_size * n), n_test = n - n_train, draws one permutation
  with `np.random.RandomState(random_state)`, and uses its first n_test entries as test and the
  next n_train as train (both in permutation order).
  """
  if not 0.0 < train_size < 1.0:
    raise ValueError(f"train_size must be in (0, 1), got {train_size}")
  n_train = math.floor(train_size * n)
  n_test = n - n_train
  if n_train == 0 or n_test == 0:
    raise DataError(f"cannot split {n} slices with train_size={train_size}")
  permutation = np.random.RandomState(random_state).permutation(n)
  return permutation[n_test:], permutation[:n_test]


def paper_slice_split(n: int, random_state: int = 37):
  """(train, val, test) positions for n slices (listed in sorted file order), as the paper."""
  train, rest = sklearn_train_test_indices(n, 0.8, random_state)
  val_pos, test_pos = sklearn_train_test_indices(len(rest), 0.5, random_state)
  return train, rest[val_pos], rest[test_pos]


def _slice_number(name: str) -> int:
  tail = name.rsplit("_", 1)[-1]
  return int(tail) if tail.isdigit() else -1


def canonical_order(slices: SliceSet) -> np.ndarray:
  """Indices sorting the slices by (patient, slice number), whatever order they came in."""
  keys = [(p, _slice_number(n), n) for p, n in zip(slices.patients.tolist(), slices.names)]
  return np.array(sorted(range(len(keys)), key=keys.__getitem__), np.int64)


def split_slices(slices: SliceSet, mode: str = "patient", seed: int = 0,
                 paper_random_state: int = 37, folds: int = 0, fold: int = 0) -> Splits:
  """Splits a SliceSet by patient (`mode="patient"`) or by slice as the paper (`"paper"`).

  `folds` > 0 (patient mode only): fold `fold` of a `folds`-fold cross-validation by patient.
  The result does not depend on the order of `slices`.  Patient splits are in (patient, slice)
  order; slice splits keep sklearn's permutation order (the order the paper's test loader used).
  """
  mode = split_mode(mode)
  if folds and mode != "patient":
    raise ConfigError(f"data.folds={folds} (cross-validation) needs data.split='patient'")
  if mode == "patient":
    ids = slices.patient_ids()
    tumour_patients = set(slices.patients[slices.has_tumour].tolist())
    has_tumour = [p in tumour_patients for p in ids]
    parts = (fold_split(ids, has_tumour, folds, fold, seed) if folds
             else patient_split(ids, has_tumour, seed))
    order = canonical_order(slices)
    return Splits(*(slices.subset(order[np.isin(slices.patients[order], part)])
                    for part in parts))
  if mode == "paper":
    mask_paths = [f"{p}/{name}_mask.tif" for p, name in zip(slices.patients, slices.names)]
    sorted_order = np.array(sorted(range(len(slices)), key=mask_paths.__getitem__), np.int64)
    parts = paper_slice_split(len(slices), paper_random_state)
    return Splits(*(slices.subset(sorted_order[part]) for part in parts))


def split_patients(splits: Splits) -> dict[str, list[str]]:
  """{"train": [...], "val": [...], "test": [...]}: sorted distinct patient IDs of each split."""
  return {name: part.patient_ids() for name, part in zip(Splits._fields, splits)}


def write_split_json(splits: Splits, path: str) -> str:
  """Writes the patient IDs of each split as JSON; `path` is a file or a folder (-> split.json).

  Returns the path written.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "split.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(split_patients(splits), f, indent=1)
    f.write("\n")
  return path
