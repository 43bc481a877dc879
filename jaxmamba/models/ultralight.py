"""UltraLight VM-UNet and the Crews & Whalen variants v1-v6 (spec models-ultralight.md §2-4).

One class, `UltraLightVMUNet(variant=...)`, builds all seven from a table of (channel list, chunks
per PVM, where the pyramid pooling sits).  With n = len(c_list) levels:

* encoder1..n-3 are Conv3x3 stages, encoder n-2..n are PVM stages; every encoder stage but the
  last runs op -> GroupNorm -> MaxPool2 -> GELU and its output is a skip t_i;
* the SC_Att_Bridge reweights the skips t_1..t_{n-1}; the main path continues un-bridged into
  encoder n (op -> GELU, no norm, no pool);
* decoder1..3 are PVMs, decoder4..n-1 Conv3x3: op -> GroupNorm -> [Upsample x2, from decoder2 on]
  -> GELU -> + bridged skip;
* final Conv1x1 -> Upsample x2.  The authors end with a sigmoid; this returns the logits.

Upsampling is bilinear with align_corners=True.  The side of the input must be a multiple of
2^(n-1) (32 for the 6-level models, 16 for the 5-level v1/v3).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmamba.models.ultralight_blocks import (PVMLayer, SCAttBridge, gelu, group_norm,
                                                ppm_channels, ul_conv2d)
from jaxmamba.nn import torch_compat

IN_CHANNELS = 3
NUM_PVM_ENCODERS = 3  # the last three encoder stages and the first three decoder stages are PVMs


@dataclasses.dataclass(frozen=True)
class Variant:
  c_list: tuple[int, ...]
  chunks: int                 # k: contiguous channel chunks sharing one Mamba in every PVM
  ppm: str = "none"           # "none", "all" (every PVM, v4) or "bottleneck" (encoder n, v6)

  @property
  def levels(self) -> int:
    return len(self.c_list)


_SIX = (8, 16, 24, 32, 48, 64)
_FIVE_WIDE = (16, 32, 64, 128, 256)
_SIX_WIDE = (16, 32, 64, 128, 256, 512)
VARIANTS = {
    "base": Variant(_SIX, 4),
    "v1": Variant(_FIVE_WIDE, 4),
    "v2": Variant(_SIX, 8),
    "v3": Variant(_FIVE_WIDE, 8),
    "v4": Variant(_SIX_WIDE, 8, "all"),
    "v5": Variant(_SIX_WIDE, 8),
    "v6": Variant(_SIX_WIDE, 8, "bottleneck"),
}


def get_variant(variant: str) -> Variant:
  try:
    return VARIANTS[variant]
  except KeyError:
    raise ValueError(f"UltraLightVMUNet: unknown variant {variant!r}; "
                     f"choose one of {sorted(VARIANTS)}") from None


def encoder_is_pvm(v: Variant, i: int) -> bool:
  """Encoder stage i (1-based) is a PVM."""
  return i > v.levels - NUM_PVM_ENCODERS


def decoder_is_pvm(i: int) -> bool:
  return i <= NUM_PVM_ENCODERS


def encoder_has_ppm(v: Variant, i: int) -> bool:
  return encoder_is_pvm(v, i) and (v.ppm == "all" or (v.ppm == "bottleneck" and i == v.levels))


def decoder_has_ppm(v: Variant, i: int) -> bool:
  return decoder_is_pvm(i) and v.ppm == "all"


def upsample2(x):
  h, w = x.shape[1:3]
  return torch_compat.resize_bilinear(x, (2 * h, 2 * w), align_corners=True)


def max_pool2(x):
  return torch_compat.max_pool2d(x, 2)


class UltraLightVMUNet(nn.Module):
  """UltraLight VM-UNet family on NHWC (B, H, W, 3) BGR in [0, 1] -> logits (B, H, W, 1)."""
  variant: str = "base"
  scan_impl: str = "auto"
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no BatchNorm: train and eval compute the same function
    v = get_variant(self.variant)
    n, c = v.levels, v.c_list
    if x.ndim != 4 or x.shape[-1] != IN_CHANNELS:
      raise ValueError(f"UltraLightVMUNet: expected (B, H, W, {IN_CHANNELS}) input, got {x.shape}")
    mult = 2 ** (n - 1)
    if x.shape[1] % mult or x.shape[2] % mult:
      raise ValueError(f"UltraLightVMUNet({self.variant}): height and width must be multiples of "
                       f"{mult}, got {x.shape[1:3]}")

    def stage(op_in, channels_out, name, is_pvm, ppm):
      if is_pvm:
        return PVMLayer(channels_out, chunks=v.chunks, pyramid_pooling=ppm,
                        scan_impl=self.scan_impl, dtype=self.dtype, name=name)(op_in)
      return ul_conv2d(channels_out, 3, padding=1, name=name, dtype=self.dtype)(op_in)

    out = x.astype(jnp.float32)
    skips = []
    for i in range(1, n):
      out = stage(out, c[i - 1], f"encoder{i}", encoder_is_pvm(v, i),
                  encoder_has_ppm(v, i))
      out = gelu(max_pool2(group_norm(f"ebn{i}")(out)))
      skips.append(out)
    bridged = SCAttBridge(dtype=self.dtype, name="scab")(skips)
    # The bottleneck continues from the un-bridged deepest skip.
    out = gelu(stage(out, c[n - 1], f"encoder{n}", True, encoder_has_ppm(v, n)))
    for i in range(1, n):
      out = stage(out, c[n - 1 - i], f"decoder{i}", decoder_is_pvm(i), decoder_has_ppm(v, i))
      out = group_norm(f"dbn{i}")(out)
      if i > 1:
        out = upsample2(out)
      out = gelu(out) + bridged[n - 1 - i]
    out = ul_conv2d(1, 1, name="final", dtype=self.dtype)(out)
    return upsample2(out).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The authors' PyTorch state_dict (keys as in §4, without a DataParallel `module.` prefix).


def _pvm_from_torch(r: torch_compat.StateDictReader, prefix: str, cin: int, cout: int,
                    chunks: int, ppm: bool) -> dict:
  dm = cin // chunks
  di, rank, n = 2 * dm, math.ceil(dm / 16), 16
  t = lambda key, shape: r.take(prefix + key, shape)  # noqa: E731
  p = {
      "norm": {"scale": t("norm.weight", (cin,)), "bias": t("norm.bias", (cin,))},
      "proj": {"kernel": t("proj.weight", (cout, cin)).T, "bias": t("proj.bias", (cout,))},
      "skip_scale": t("skip_scale", (1,)),
      "mamba": {
          "in_proj": {"kernel": t("mamba.in_proj.weight", (2 * di, dm)).T},
          "conv1d": {"kernel": t("mamba.conv1d.weight", (di, 1, 4)).transpose(2, 1, 0),
                     "bias": t("mamba.conv1d.bias", (di,))},
          "x_proj": {"kernel": t("mamba.x_proj.weight", (rank + 2 * n, di)).T},
          "dt_proj_kernel": t("mamba.dt_proj.weight", (di, rank)).T,
          "dt_proj_bias": t("mamba.dt_proj.bias", (di,)),
          "A_log": t("mamba.A_log", (di, n)),
          "D": t("mamba.D", (di,)),
          "out_proj": {"kernel": t("mamba.out_proj.weight", (dm, di)).T},
      },
  }
  if ppm:
    p["ppm"] = {f"conv_layers_{j}": {
        "kernel": t(f"ppm.conv_layers.{j}.weight", (oc, cin, 1, 1)).transpose(2, 3, 1, 0),
        "bias": t(f"ppm.conv_layers.{j}.bias", (oc,))} for j, oc in enumerate(ppm_channels(cin))}
  return p


def _conv_from_torch(r, prefix: str, cin: int, cout: int, k: int) -> dict:
  return {"kernel": r.take(prefix + ".weight", (cout, cin, k, k)).transpose(2, 3, 1, 0),
          "bias": r.take(prefix + ".bias", (cout,))}


def _norm_from_torch(r, prefix: str, ch: int) -> dict:
  return {"scale": r.take(prefix + ".weight", (ch,)), "bias": r.take(prefix + ".bias", (ch,))}


def from_torch_state_dict(state_dict, variant: str = "base") -> dict:
  """Flax variables of `UltraLightVMUNet(variant)` from the authors' torch state_dict.

  Checks every key's presence and shape (errors name the key) and that no key is left unused.
  """
  v = get_variant(variant)
  n, c = v.levels, v.c_list
  r = torch_compat.StateDictReader(state_dict)
  params: dict[str, Any] = {}
  for i in range(1, n + 1):
    cin = IN_CHANNELS if i == 1 else c[i - 2]
    name = f"encoder{i}"
    if encoder_is_pvm(v, i):
      params[name] = _pvm_from_torch(r, f"{name}.0.", cin, c[i - 1], v.chunks,
                                     encoder_has_ppm(v, i))
    else:
      params[name] = _conv_from_torch(r, f"{name}.0", cin, c[i - 1], 3)
  for i in range(1, n):
    cin, cout = c[n - i], c[n - 1 - i]
    name = f"decoder{i}"
    if decoder_is_pvm(i):
      params[name] = _pvm_from_torch(r, f"{name}.0.", cin, cout, v.chunks, decoder_has_ppm(v, i))
    else:
      params[name] = _conv_from_torch(r, f"{name}.0", cin, cout, 3)
    params[f"ebn{i}"] = _norm_from_torch(r, f"ebn{i}", c[i - 1])
    params[f"dbn{i}"] = _norm_from_torch(r, f"dbn{i}", cout)
  total = sum(c[:-1])
  catt = {"get_all_att": {"kernel": r.take("scab.catt.get_all_att.weight", (1, 1, 3)
                                           ).transpose(2, 1, 0)}}
  for i in range(1, n):
    catt[f"att{i}"] = {"kernel": r.take(f"scab.catt.att{i}.weight", (c[i - 1], total)).T,
                       "bias": r.take(f"scab.catt.att{i}.bias", (c[i - 1],))}
  params["scab"] = {"catt": catt,
                    "satt": {"shared_conv2d": _conv_from_torch(r, "scab.satt.shared_conv2d.0",
                                                               2, 1, 7)}}
  params["final"] = _conv_from_torch(r, "final", c[0], 1, 1)
  r.finish()
  return {"params": params}
