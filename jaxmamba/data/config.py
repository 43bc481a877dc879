"""Default configuration of the input pipeline (`jaxmamba.data.default_config()`)."""
from __future__ import annotations

import ml_collections

# Where the TFDS copy of a kaggle_3m folder is written; built once per folder, reused after.
# Empty: no copy, the TIFF files are read on every run (where tensorflow-datasets is missing).
DEFAULT_TFDS_DIR = "~/.cache/jaxmamba/tfds"


def default_config() -> ml_collections.ConfigDict:
  """Returns the data config; `dir == ""` selects the built-in synthetic source."""
  cfg = ml_collections.ConfigDict()
  # kaggle_3m folder (PATIENT/PATIENT_N.tif + PATIENT/PATIENT_N_mask.tif); "" = synthetic data.
  cfg.dir = ""
  # "patient": 80/10/10 by patient, stratified by tumour presence (seeded by split_seed).
  # "paper": the paper's slice-level split (sklearn train_test_split, random_state
  #   paper_random_state) on the sorted file list; it leaks patients across splits ("slice" is
  #   accepted as its earlier name).
  cfg.split = "patient"
  cfg.split_seed = 0
  # Cross-validation by patient (experiments/cv.py sets these): folds = k > 0 makes fold `fold`
  # (0-based) the test set, validation patients come from the other folds; 0 = the 80/10/10 split.
  cfg.folds = 0
  cfg.fold = 0
  cfg.paper_random_state = 37
  cfg.tfds_dir = DEFAULT_TFDS_DIR

  cfg.synthetic = ml_collections.ConfigDict()
  cfg.synthetic.num_patients = 12
  cfg.synthetic.slices_per_patient = 16
  cfg.synthetic.image_size = 256
  cfg.synthetic.seed = 0

  # On-device augmentation (jaxmamba.data.augment); off by default, as in the paper.
  cfg.augment = ml_collections.ConfigDict()
  cfg.augment.enabled = False
  cfg.augment.flip_lr = 0.5        # probability of a left-right flip
  cfg.augment.flip_ud = 0.0        # probability of an up-down flip
  cfg.augment.rotate_deg = 10.0    # rotation angle drawn from U(-rotate_deg, rotate_deg)
  cfg.augment.scale_min = 0.9      # zoom factor drawn from U(scale_min, scale_max)
  cfg.augment.scale_max = 1.1
  cfg.augment.brightness = 0.05    # added offset drawn from U(-brightness, brightness)
  cfg.augment.contrast = 0.1       # gain drawn from U(1 - contrast, 1 + contrast)
  return cfg
