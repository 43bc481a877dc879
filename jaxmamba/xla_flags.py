"""The one XLA option this project sets: XLA:CPU convolutions on Eigen rather than YNNPACK.

jaxlib 0.10's CPU backend hands each convolution to YNNPACK by default.  Measured on a 2-core
x86-64 (AVX-512) machine, batch 4 at 256x256, images/s train | eval, default -> this option:

  resnet18_seg  7.4 | 29  ->  8.4 | 36      unet          1.87 | 7.2  ->  2.10 | 9.5
  umambabot_pp  1.21 | 4.8 -> 1.45 | 6.4    ulvmunet     15.9 | 49   -> 16.8 | 54
  segformer     2.24 | 10.6 -> 2.30 | 10.7

Turning off YNNPACK's reduce fusions as well made SegFormer's train step 2.7x slower, and its
individual dot fusions ResNet18-seg's ~5% slower, so only convolutions move.  The option is
added to XLA_FLAGS when jaxmamba is imported, before jax starts its backends (it is read once,
then); it does nothing on a GPU, and is set only for the jaxlib versions it was measured with.
A user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is left alone
(`=+individual_convolution` restores the default).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys

OPTION = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions the option was measured with: XLA aborts on a flag or value it does not know,
# so another jaxlib (a GPU image's, say) runs with its defaults until measured and added here.
MEASURED_JAXLIB = ("0.10.",)


def apply() -> bool:
  """Adds OPTION to XLA_FLAGS unless the user set that flag, jaxlib is not a measured version, or
  jax's backends already started (then the environment is no longer read); returns whether it
  was added."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags or not _jaxlib_measured():
    return False
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    started = getattr(xla_bridge, "backends_are_initialized", lambda: False)
    if started():
      return False
  os.environ["XLA_FLAGS"] = f"{flags} {OPTION}".strip()
  return True


def _jaxlib_measured() -> bool:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  return version.startswith(MEASURED_JAXLIB)
