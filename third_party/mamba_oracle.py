"""mamba_ssm on the CPU: the PyTorch oracle for our selective scan and Mamba layer.

mamba_ssm is installed without its CUDA extensions (MAMBA_SKIP_CUDA_BUILD=TRUE, see .ci/run).  Its
package imports `selective_scan_cuda` at import time, so an empty stand-in is registered first; the
simple `Mamba` module is then pointed at the pure-PyTorch `selective_scan_ref`, and with
`causal_conv1d` not installed it takes its PyTorch conv path.  Nothing here is ours: the math is
mamba_ssm's own.
"""
from __future__ import annotations

import sys
import types


def load():
  """Returns (selective_scan_ref, Mamba) from mamba_ssm, wired for the CPU."""
  sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
  from mamba_ssm.modules import mamba_simple  # noqa: PLC0415
  from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: PLC0415
  mamba_simple.selective_scan_fn = selective_scan_ref
  return selective_scan_ref, mamba_simple.Mamba


def mamba(d_model, **kwargs):
  """mamba_ssm's simple Mamba on its PyTorch path (no fused CUDA kernels)."""
  _, cls = load()
  return cls(d_model, use_fast_path=False, **kwargs)
