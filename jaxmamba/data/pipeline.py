"""`load_splits(cfg)`: the one entry point from a data config to in-memory train/val/test."""
from __future__ import annotations

from jaxmamba.data import kaggle3m
from jaxmamba.data import splits as splits_lib
from jaxmamba.data import synthetic
from jaxmamba.data.errors import DataError
from jaxmamba.data.slices import SliceSet, Splits


def load_all(cfg) -> SliceSet:
  """Every slice of the configured source, in (patient, slice) order, decoded into memory."""
  if cfg.dir == "":
    return synthetic.from_config(cfg.synthetic)
  if not cfg.tfds_dir:
    return kaggle3m.load_all(cfg.dir)
  try:
    from jaxmamba.data import tfds_lgg  # TFDS is imported only for real data
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in ("tensorflow_datasets", "array_record"):
      raise
    raise DataError(f"the TFDS copy of {cfg.dir} needs tensorflow-datasets and array_record "
                    f"({e}); install them, or pass --config.data.tfds_dir= (empty) to read the "
                    "TIFF files directly on every run") from e
  return tfds_lgg.load_all(cfg.dir, cfg.tfds_dir)


def load_splits(cfg) -> Splits:
  """Loads (building the TFDS cache on first use) and splits the data named by `cfg`.

  Raises DataError for any problem with the data folder, before training starts.
  """
  splits_lib.split_mode(cfg.split)   # a bad value fails before the data is read
  return splits_lib.split_slices(load_all(cfg), cfg.split, cfg.split_seed, cfg.paper_random_state,
                                 cfg.get("folds", 0), cfg.get("fold", 0))
