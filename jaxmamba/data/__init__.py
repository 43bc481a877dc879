"""Input pipeline: the LGG kaggle_3m slices (via TFDS) or a built-in synthetic source.

API (what the trainer calls)::

  from jaxmamba import data
  cfg = data.default_config()        # dir="" -> synthetic; split="patient"|"paper"; split_seed;
                                     # tfds_dir; synthetic.{num_patients, slices_per_patient,
                                     # image_size, seed}; augment.{enabled=False, flip_lr, ...}
  splits = data.load_splits(cfg)     # data.Splits(train, val, test) of data.SliceSet:
                                     #   .images uint8 (n,H,W,3) BGR, .masks uint8 (n,H,W) {0,1},
                                     #   .patients str (n,), .names list[str]; len(slice_set)
  data.write_split_json(splits, workdir)   # WORKDIR/split.json: patient IDs of each split
  for batch in data.batches(slice_set, batch_size, shuffle=True, seed=0, epoch=e,
                            drop_remainder=True, sharding=None):
    batch["image"]  # uint8 (B,H,W,3); batch["mask"] uint8 (B,H,W,1) in {0,1}
                    # numpy, or global jax.Arrays when a NamedSharding (e.g. P("data")) is given
  data.num_batches(slice_set, batch_size, drop_remainder) -> int
  images, masks = data.to_float(batch)                        # on device: images/255, masks
  x = data.pixels_to_float(uint8_images)     # the one uint8 -> float32 v/255 conversion (train,
                                             # evaluation, predict, figures): bit-identical
  images, masks = data.augment(rng, images, masks, cfg.augment)  # identity unless enabled

Real data: `cfg.dir` is a kaggle_3m folder (PATIENT/PATIENT_N.tif + PATIENT/PATIENT_N_mask.tif).
It is checked and written once, by the TFDS builder `tfds_lgg.LggKaggle3m` (manual_dir = that
folder), to array_record files under `cfg.tfds_dir`, then read back without TensorFlow and kept
in memory.  Pixels are as the authors read them with cv2: BGR (the file's channel order
reversed), float conversion /255 on device; masks binarised at 0.5.  Bad input (missing folder,
unpaired file, wrong shape or dtype, unreadable or truncated TIFF, mask values other than 0 and
255) raises `DataError` naming the file.

Manual download: the dataset cannot be downloaded automatically.  Get "Brain MRI segmentation"
(LGG Segmentation Dataset, M. Buda) from
https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation and point `data.dir` at its
`kaggle_3m` folder.  Licence CC BY-NC-SA 4.0 (research, non-commercial).  Cite Buda, Saha,
Mazurowski, Computers in Biology and Medicine 109 (2019) 218-225,
doi:10.1016/j.compbiomed.2019.05.002.  (Full text: `tfds_lgg.MANUAL_DOWNLOAD_INSTRUCTIONS`.)

Splits: by patient by default (80/10/10, stratified by tumour presence, seeded, independent of
file-listing order); `folds=k, fold=i` make fold i of a k-fold cross-validation by patient the
test set; `split="paper"` reproduces the paper's sklearn slice split (random_state 37) on the
sorted file list and leaks patients across splits.  Determinism: batches depend only
on (seed, epoch).
"""
from jaxmamba.data.augment import augment
from jaxmamba.data.config import default_config
from jaxmamba.data.errors import DataError
from jaxmamba.data.loader import batches, num_batches, pixels_to_float, to_float
from jaxmamba.data.pipeline import load_all, load_splits
from jaxmamba.data.slices import SliceSet, Splits
from jaxmamba.data.splits import split_patients, write_split_json

__all__ = [
    "DataError", "SliceSet", "Splits", "augment", "batches", "default_config", "load_all",
    "load_splits", "num_batches", "pixels_to_float", "split_patients", "to_float",
    "write_split_json",
]
