"""TFDS builder for the LGG kaggle_3m slices, and reading it back without TensorFlow.

Manual download (the dataset cannot be downloaded automatically)
------------------------------------------------------------------
Download "Brain MRI segmentation" (LGG Segmentation Dataset) by Mateusz Buda from Kaggle,
https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation , unzip it and point `data.dir`
(the builder's `manual_dir`) at the `kaggle_3m` folder: 110 patient folders, 3,929 slices, each
`PATIENT/PATIENT_N.tif` (256x256x3) with `PATIENT/PATIENT_N_mask.tif`.

Licence: CC BY-NC-SA 4.0 (attribution, non-commercial, share-alike); research use only, not for
clinical purposes.  Cite: M. Buda, A. Saha, M. A. Mazurowski, "Association of genomic subtypes of
lower-grade gliomas with shape features automatically extracted by a deep learning algorithm",
Computers in Biology and Medicine 109 (2019) 218-225, doi:10.1016/j.compbiomed.2019.05.002; and
M. A. Mazurowski et al., "Radiogenomics of lower-grade glioma: algorithmically-assessed tumor shape
is associated with tumor genomic subtypes and patient outcomes in a multi-institutional study with
The Cancer Genome Atlas data", Journal of Neuro-Oncology (2017).  Images come from The Cancer
Imaging Archive (TCGA-LGG).

What is stored
--------------
One split, "slices", in array_record format, in (patient, slice number) order (shuffling on write
is disabled).  Each example: `image` (PNG, the file's channel order), `mask` (PNG, 0/255 as
stored), `patient`, `number`.  Every file is checked while building (see `kaggle3m.read_slice`),
so a damaged folder raises `DataError` before anything is written.  Reading back uses
`builder.as_data_source` (array_record random access, PIL decoding): TensorFlow is never needed.
The build goes to `TFDS_DIR/<fingerprint of the folder>/lgg_kaggle3m/1.0.0`, made once, reused after.
"""
from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jaxmamba.data import kaggle3m
from jaxmamba.data.errors import DataError
from jaxmamba.data.slices import SliceSet

SPLIT = "slices"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the LGG Segmentation Dataset ("Brain MRI segmentation", M. Buda) from
https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation , unzip it, and pass the
`kaggle_3m` folder (110 patient folders of PATIENT_N.tif / PATIENT_N_mask.tif) as manual_dir
(jaxmamba: config `data.dir`). Licence CC BY-NC-SA 4.0; cite Buda et al., Computers in Biology
and Medicine 109 (2019) 218-225, doi:10.1016/j.compbiomed.2019.05.002.
"""

_CITATION = """\
@article{buda2019association,
  title={Association of genomic subtypes of lower-grade gliomas with shape features
         automatically extracted by a deep learning algorithm},
  author={Buda, Mateusz and Saha, Ashirbani and Mazurowski, Maciej A.},
  journal={Computers in Biology and Medicine},
  volume={109},
  pages={218--225},
  year={2019},
  doi={10.1016/j.compbiomed.2019.05.002}
}
"""


def _png(array: np.ndarray) -> bytes:
  # Encoded bytes (not numpy arrays) keep TFDS from needing TensorFlow to encode images.
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


class LggKaggle3m(tfds.core.GeneratorBasedBuilder):
  """LGG FLAIR-abnormality segmentation slices (kaggle_3m), all in one split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "All slices of a kaggle_3m folder, one split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="LGG brain MRI slices (pre-contrast, FLAIR, post-contrast) with FLAIR "
                    "abnormality masks; licence CC BY-NC-SA 4.0.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=kaggle3m.IMAGE_SHAPE, encoding_format="png"),
            "mask": tfds.features.Image(shape=kaggle3m.MASK_SHAPE + (1,), encoding_format="png"),
            "patient": tfds.features.Text(),
            "number": tfds.features.Scalar(dtype=np.int32),
        }),
        homepage="https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation",
        citation=_CITATION,
        license="CC BY-NC-SA 4.0",
        disable_shuffling=True,  # keep (patient, slice) order; splits are made after reading
    )

  def _split_generators(self, dl_manager):
    # Pairing problems surface here, before any pixel is read or any record written.
    return {SPLIT: self._generate_examples(kaggle3m.scan(os.fspath(dl_manager.manual_dir)))}

  def _generate_examples(self, slices):
    for files in slices:
      image, mask = kaggle3m.read_slice(files)
      yield files.name, {"image": _png(image), "mask": _png(mask),
                         "patient": files.patient, "number": files.number}


# The last folder decoded in this process: {TFDS folder: SliceSet with read-only arrays}.
_MEMORY: dict[str, SliceSet] = {}


def clear_memory_cache() -> None:
  """Forgets the decoded slices kept by `load_all`."""
  _MEMORY.clear()


def _cache_dir(data_dir: str, tfds_dir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(tfds_dir)),
                      kaggle3m.fingerprint(data_dir))


def build(data_dir: str, tfds_dir: str) -> LggKaggle3m:
  """Builds (once) the TFDS copy of kaggle_3m folder `data_dir` under `tfds_dir`."""
  kaggle3m.scan(data_dir)  # cheap; fails before the (slower) build on a broken layout
  builder = LggKaggle3m(data_dir=_cache_dir(data_dir, tfds_dir), file_format="array_record")
  if not builder.is_prepared():
    manual = os.path.abspath(os.path.expanduser(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def load_all(data_dir: str, tfds_dir: str) -> SliceSet:
  """Every slice of the folder, decoded into memory, sorted by (patient, slice number).

  Images come back in the authors' BGR order (the file's channel order reversed) and masks
  binarised at 0.5 (stored value / 255 >= 0.5) to {0, 1}.  The decoded slices are kept in
  memory (read-only) for later calls on the same unchanged folder.
  """
  key = _cache_dir(data_dir, tfds_dir)
  if key not in _MEMORY:
    slices = _decode(build(data_dir, tfds_dir))
    for array in (slices.images, slices.masks):
      array.flags.writeable = False
    _MEMORY.clear()  # hold one data set at a time: the full one is about 1 GB
    _MEMORY[key] = slices
  return _MEMORY[key]


def _decode(builder: LggKaggle3m) -> SliceSet:
  source = builder.as_data_source(split=SPLIT)
  n = len(source)
  if n == 0:
    raise DataError(f"{builder.data_dir}: the TFDS copy holds no slices")
  images = np.empty((n,) + kaggle3m.IMAGE_SHAPE, np.uint8)
  masks = np.empty((n,) + kaggle3m.MASK_SHAPE, np.uint8)
  keys = []
  for i in range(n):
    example = source[i]
    images[i], masks[i] = kaggle3m.to_training_layout(example["image"], example["mask"][..., 0])
    keys.append((_text(example["patient"]), int(example["number"])))
  order = sorted(range(n), key=keys.__getitem__)  # independent of the stored order
  return SliceSet(images[order], masks[order], np.array([keys[i][0] for i in order]),
                  [f"{keys[i][0]}_{keys[i][1]}" for i in order])
