"""`load_splits(cfg)`: the one entry point from a data config to in-memory train/val/test."""
from __future__ import annotations

from jaxmamba.data import splits as splits_lib
from jaxmamba.data import synthetic
from jaxmamba.data.slices import SliceSet, Splits


def load_all(cfg) -> SliceSet:
  """Every slice of the configured source, in (patient, slice) order, decoded into memory."""
  if cfg.dir == "":
    return synthetic.from_config(cfg.synthetic)
  from jaxmamba.data import tfds_lgg  # TFDS is imported only for real data
  return tfds_lgg.load_all(cfg.dir, cfg.tfds_dir)


def load_splits(cfg) -> Splits:
  """Loads (building the TFDS cache on first use) and splits the data named by `cfg`.

  Raises DataError for any problem with the data folder, before training starts.
  """
  if cfg.split not in ("patient", "slice"):
    raise ValueError(f"data.split must be 'patient' or 'slice', got {cfg.split!r}")
  return splits_lib.split_slices(load_all(cfg), cfg.split, cfg.split_seed, cfg.paper_random_state)
