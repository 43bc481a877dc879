"""Segments kaggle_3m-style slices with a trained or converted model.

  python -m experiments.predict --model NAME --checkpoint DIR --output OUTDIR [--save-probs]
      [--batch-size N] [--which selected|best|final] [--step N] IMAGE [IMAGE ...]

From a training workdir the checkpoint read is the one its results.json reports as selected (the
final weights under the authors' recipe, the best-validation ones under recipe=improved) unless
--which/--step say otherwise; the first line of output names the checkpoint and step read.

Images (.tif/.tiff or .png, 256x256, 8-bit, 3 channels; 1-channel images are repeated to 3 and an
alpha channel is dropped, as OpenCV's imread does) are fed exactly as the authors fed them: the
stored channel order reversed (cv2's BGR) and divided by 255 (`jaxmamba.data.pixels_to_float`,
the conversion training and evaluation use).  For each image OUTDIR receives
`<stem>_mask.png` (uint8, 255 where sigmoid(logit) >= 0.5, else 0) and, with --save-probs,
`<stem>_prob.npy` (float32 HxW probabilities).

Note: the authors' own test notebooks thresholded the *raw logits* at 0.5 for UNet/ResNet/UMamba
(= probability 0.6225, spec §9.6); this tool uses probability 0.5 for every model.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from jaxmamba import host_memory

IMAGE_SIZE = (256, 256)
_EXTENSIONS = (".tif", ".tiff", ".png")
THRESHOLD = 0.5


class InputError(ValueError):
  """An image that cannot be used (unreadable, wrong size or type)."""


def read_image(path: str) -> np.ndarray:
  """uint8 (256, 256, 3) in cv2's BGR order (the stored channel order reversed)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in _EXTENSIONS:
    raise InputError(f"{path}: unsupported file type {ext or '(none)'}; expected .tif or .png")
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  try:
    if ext == ".png":
      from PIL import Image  # noqa: PLC0415
      with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "RGB", "RGBA"):
          raise InputError(f"{path}: PNG mode {im.mode} is not 8-bit gray/RGB/RGBA")
        image = np.asarray(im)
    else:
      # The data pipeline's reader: first page, with its checks for truncated files.
      from jaxmamba.data.kaggle3m import read_tiff  # noqa: PLC0415
      image = read_tiff(path)
  except InputError:
    raise
  except Exception as e:  # PIL/tifffile raise many types for damaged files
    raise InputError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
  if image.dtype != np.uint8:
    raise InputError(f"{path}: pixel type {image.dtype}, expected 8-bit (uint8)")
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  elif image.ndim == 3 and image.shape[-1] == 4:
    image = image[..., :3]
  if image.ndim != 3 or image.shape[-1] != 3:
    raise InputError(f"{path}: shape {image.shape}, expected (H, W, 3)")
  if image.shape[:2] != IMAGE_SIZE:
    raise InputError(f"{path}: size {image.shape[1]}x{image.shape[0]}, expected "
                     f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}")
  return np.ascontiguousarray(image[..., ::-1])


def _stems(paths) -> list[str]:
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  seen: dict[str, str] = {}
  for stem, path in zip(stems, paths):
    if stem in seen:
      raise InputError(f"{path} and {seen[stem]} would both write {stem}_mask.png")
    seen[stem] = path
  return stems


def make_predictor(model_name: str, variables: dict, scan_impl: str | None = None):
  """A jitted function uint8 BGR (B, H, W, 3) -> float32 probabilities (B, H, W)."""
  import jax  # noqa: PLC0415 (keeps `--help` fast)
  import jax.numpy as jnp  # noqa: PLC0415

  from jaxmamba.data.loader import pixels_to_float  # noqa: PLC0415
  from jaxmamba.models import registry  # noqa: PLC0415
  overrides = {"scan_impl": scan_impl} if scan_impl else {}
  model = registry.build(model_name, **overrides)
  variables = jax.device_put(variables)

  @jax.jit
  def predict(images):
    x = pixels_to_float(images)   # the training and evaluation conversion, bit for bit
    logits = model.apply(variables, x, train=False)
    return jax.nn.sigmoid(logits[..., 0].astype(jnp.float32))

  return predict


def predict_files(model_name: str, checkpoint: str, paths, output: str, save_probs: bool = False,
                  batch_size: int = 16, progress: bool | None = None, which: str = "selected",
                  step: int | None = None) -> list[str]:
  """Writes the masks (and probabilities) of `paths` into `output`; returns the mask paths.

  From a training workdir it reads the checkpoint that `which` and `step` name (by default the
  one the run's results.json scored; jaxmamba.checkpoint_io.locate) and says which it read.
  """
  from jaxmamba import checkpoint_io  # noqa: PLC0415
  from jaxmamba.models import registry  # noqa: PLC0415

  registry.entry(model_name)
  if batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {batch_size}")
  if not paths:
    raise InputError("no images given")
  stems = _stems(paths)
  for p in paths:  # fail on a bad file before loading the model or writing anything
    read_image(p)
  _, variables, what = checkpoint_io.load_located(checkpoint, model_name, which, step)
  print(f"loaded {what}", flush=True)
  predict = make_predictor(model_name, variables)
  os.makedirs(output, exist_ok=True)

  batches = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]
  if progress is None:
    progress = len(batches) > 1
  if progress:
    from tqdm import tqdm  # noqa: PLC0415
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr)
  written = []
  for idx in batches:
    images = np.stack([read_image(paths[i]) for i in idx])
    # Pad the last batch to the full size so that it reuses the compiled function.
    pad = batch_size - len(images) if len(batches) > 1 else 0
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    probs = np.asarray(predict(images))[:len(idx)]
    for i, prob in zip(idx, probs):
      mask_path = os.path.join(output, f"{stems[i]}_mask.png")
      _write_png(mask_path, np.where(prob >= THRESHOLD, 255, 0).astype(np.uint8))
      if save_probs:
        np.save(os.path.join(output, f"{stems[i]}_prob.npy"), prob.astype(np.float32))
      written.append(mask_path)
    if progress:
      bar.update(len(idx))
  if progress:
    bar.close()
  return written


def _write_png(path: str, mask: np.ndarray) -> None:
  from PIL import Image  # noqa: PLC0415
  Image.fromarray(mask).save(path)  # 2-D uint8 -> 8-bit grayscale PNG


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="registry name, e.g. umambabot_pp")
  parser.add_argument("--checkpoint", required=True,
                      help="converter output or training work directory")
  parser.add_argument("--output", required=True, help="folder for the masks")
  parser.add_argument("--save-probs", action="store_true", help="also write <stem>_prob.npy")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--which", choices=("selected", "best", "final"), default="selected",
                      help="from a training workdir: the checkpoint its results.json scored "
                           "(default), the best-by-validation one, or the final one")
  parser.add_argument("--step", type=int, default=None,
                      help="from a training workdir: this step of the --which kind")
  parser.add_argument("images", nargs="+", metavar="IMAGE")
  args = parser.parse_args(argv)
  from jaxmamba.checkpoint_io import CheckpointError  # noqa: PLC0415
  try:
    written = predict_files(args.model, args.checkpoint, args.images, args.output,
                            args.save_probs, args.batch_size, which=args.which, step=args.step)
  except (InputError, CheckpointError, ValueError, OSError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {len(written)} masks to {args.output}")
  return 0


if __name__ == "__main__":
  host_memory.reexec()
  sys.exit(main())
