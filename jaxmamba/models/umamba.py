"""UMambaBot and UMambaBot-PP (spec models-conv-umamba.md §5-§7): an nnU-Net residual U-Net whose
bottleneck features go through LayerNorm + one Mamba layer (optionally after pyramid pooling).

Layout NHWC.  Submodule names mirror the authors' torch modules (`encoder.stages.{i}` ->
`encoder/stages_{i}`), see `from_torch_state_dict` for the full key mapping.  All initialisers are
torch defaults (the authors never apply nnU-Net's He init).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba.nn import mamba as mamba_lib
from jaxmamba.nn import torch_compat

FEATURES = (32, 64, 128, 256, 512)
STRIDES = (1, 2, 2, 2, 2)
PPM_BINS = (1, 2, 3, 6)
PPM_CHANNELS = (64, 128, 256, 64)
# The input must survive four stride-2 stages exactly (avg-pool skips floor, convs would round up).
SIZE_MULTIPLE = 16
_SLOPE = 0.01   # nn.LeakyReLU default


def instance_norm(x, eps: float = 1e-5):
  """InstanceNorm2d(affine=False): per sample and channel over H, W, biased variance, in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class ConvNormAct(nn.Module):
  """nnU-Net ConvDropoutNormReLU: conv (padding (k-1)/2) -> InstanceNorm -> [LeakyReLU]."""
  features: int
  kernel: int = 3
  stride: int = 1
  bias: bool = True
  act: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = torch_compat.conv2d(self.features, self.kernel, self.stride, (self.kernel - 1) // 2,
                            bias=self.bias, in_features=x.shape[-1], dtype=self.dtype,
                            name="conv")(x)
    x = instance_norm(x)
    return nn.leaky_relu(x, _SLOPE) if self.act else x


class BasicBlockD(nn.Module):
  """Residual block: two 3x3 ConvNormAct (the first strided), skip = [avg-pool] [1x1 conv + IN]."""
  features: int
  stride: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    out = ConvNormAct(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
    out = ConvNormAct(self.features, 3, 1, act=False, dtype=self.dtype, name="conv2")(out)
    skip = x
    if self.stride != 1:
      skip = nn.avg_pool(skip, (self.stride, self.stride), strides=(self.stride, self.stride))
    if x.shape[-1] != self.features:
      skip = ConvNormAct(self.features, 1, 1, bias=False, act=False, dtype=self.dtype,
                         name="skip")(skip)
    return nn.leaky_relu(out + skip, _SLOPE)


class ResidualEncoder(nn.Module):
  """Stem (3x3 ConvNormAct) then one BasicBlockD per stage; returns every stage's output."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = ConvNormAct(FEATURES[0], dtype=self.dtype, name="stem")(x)
    skips = []
    for i, (f, s) in enumerate(zip(FEATURES, STRIDES)):
      x = BasicBlockD(f, s, dtype=self.dtype, name=f"stages_{i}")(x)
      skips.append(x)
    return skips


class ResidualDecoder(nn.Module):
  """The authors' UNetResDecoder without deep supervision: per stage, coarse to fine, a 2x2 stride-2
  transposed conv, concat [upsampled, skip], one BasicBlockD.  Four 1x1 seg heads exist (and are
  counted), but only the finest one is ever applied."""
  dtype: Any = None

  @nn.compact
  def __call__(self, skips):
    x = skips[-1]
    n = len(skips) - 1
    for s in range(n):
      skip = skips[-(s + 2)]
      f = skip.shape[-1]
      up = torch_compat.ConvTranspose2d(f, STRIDES[-(s + 1)], STRIDES[-(s + 1)], dtype=self.dtype,
                                        name=f"transpconvs_{s}")(x)
      x = BasicBlockD(f, 1, dtype=self.dtype, name=f"stages_{s}")(
          jnp.concatenate([up, skip.astype(up.dtype)], axis=-1))
      head = torch_compat.conv2d(1, 1, in_features=f, dtype=self.dtype, name=f"seg_layers_{s}")
      # The three coarse heads only need to exist (the authors' checkpoints and parameter count
      # include them); calling them at init creates their parameters without using them later.
      if s == n - 1:
        logits = head(x)
      elif self.is_initializing():
        head(x)
    return logits


class UMambaBot(nn.Module):
  """UMambaBot (`pyramid_pooling=False`) / UMambaBot-PP (`True`).

  (B, H, W, 3) float in [0, 1] (BGR), H and W multiples of 16 -> logits (B, H, W, 1) float32.
  The bottleneck (B, H/16, W/16, 512) is optionally replaced by its pyramid pooling, flattened
  row-major into tokens, LayerNormed, passed through Mamba(512), reshaped back, and *replaces*
  the bottleneck skip.  `train` is accepted for the common model interface; nothing here
  depends on it (InstanceNorm, no dropout).
  """
  pyramid_pooling: bool = False
  scan_impl: str = "auto"
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"UMambaBot: expected (batch, H, W, 3) input, got {x.shape}")
    if x.shape[1] % SIZE_MULTIPLE or x.shape[2] % SIZE_MULTIPLE:
      raise ValueError(f"UMambaBot: H and W must be multiples of {SIZE_MULTIPLE}, got "
                       f"{x.shape[1]}x{x.shape[2]}")
    x = x.astype(self.dtype or jnp.float32)
    skips = ResidualEncoder(dtype=self.dtype, name="encoder")(x)
    f = skips[-1]
    if self.pyramid_pooling:
      f = torch_compat.PyramidPooling(PPM_CHANNELS, PPM_BINS, dtype=self.dtype, name="ppm")(f)
    b, h, w, c = f.shape
    tokens = torch_compat.LayerNorm(epsilon=1e-5, name="ln")(f.reshape(b, h * w, c))
    tokens = mamba_lib.Mamba(c, d_state=16, d_conv=4, expand=2, scan_impl=self.scan_impl,
                             dtype=self.dtype, name="mamba")(tokens.astype(f.dtype))
    skips[-1] = tokens.reshape(b, h, w, c).astype(f.dtype)
    logits = ResidualDecoder(dtype=self.dtype, name="decoder")(skips)
    return logits.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The authors' state_dict -> Flax variables.


class _Reader(torch_compat.StateDictReader):
  """StateDictReader that also accepts the duplicate keys nnU-Net modules register: each
  ConvDropoutNormReLU holds its conv as `conv` and as `all_modules.0`, and the decoder re-registers
  the whole encoder as `decoder.encoder.*`.  Duplicates are optional; when present they must equal
  the original, and they count as used."""

  def take_duplicate(self, original: str, duplicate: str) -> None:
    if duplicate not in self.sd:
      return
    a, b = self.take(original), self.take(duplicate)
    if a.shape != b.shape or not np.array_equal(a, b):
      raise ValueError(f"state_dict key {duplicate!r} differs from {original!r}, which it duplicates")

  def cna(self, prefix: str, cin: int, cout: int, k: int, bias: bool = True) -> dict:
    self.take(prefix + ".conv.weight", (cout, cin, k, k))
    if bias:
      self.take(prefix + ".conv.bias", (cout,))
    for suffix in ("weight", "bias") if bias else ("weight",):
      self.take_duplicate(f"{prefix}.conv.{suffix}", f"{prefix}.all_modules.0.{suffix}")
    return {"conv": self.conv(prefix + ".conv", bias=bias)}

  def block(self, prefix: str, cin: int, cout: int, stride: int) -> dict:
    p = {"conv1": self.cna(prefix + ".conv1", cin, cout, 3),
         "conv2": self.cna(prefix + ".conv2", cout, cout, 3)}
    if cin != cout:
      # nn.Sequential index: the AvgPool (no parameters) comes first when the block is strided.
      p["skip"] = self.cna(f"{prefix}.skip.{1 if stride != 1 else 0}", cin, cout, 1, bias=False)
    return p


def _expected_variables(pyramid_pooling: bool):
  model = UMambaBot(pyramid_pooling=pyramid_pooling)
  x = jax.ShapeDtypeStruct((1, SIZE_MULTIPLE, SIZE_MULTIPLE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def from_torch_state_dict(state_dict, pyramid_pooling: bool = False) -> dict:
  """Flax variables `{"params": ...}` from the authors' UMambaBot(-PP) state_dict.

  Every key must be used and have the expected shape (errors name the key); the nnU-Net duplicate
  keys (`*.all_modules.0.*`, `decoder.encoder.*`) may be present or absent.
  """
  r = _Reader(state_dict)
  for key in list(r.sd):
    if key.startswith("decoder.encoder."):
      original = key.removeprefix("decoder.")
      if original not in r.sd:
        raise ValueError(f"state_dict key {key!r} has no original {original!r}")
      r.take_duplicate(original, key)

  enc = {"stem": r.cna("encoder.stem.convs.0", 3, FEATURES[0], 3)}
  cin = FEATURES[0]
  for i, (f, s) in enumerate(zip(FEATURES, STRIDES)):
    enc[f"stages_{i}"] = r.block(f"encoder.stages.{i}.blocks.0", cin, f, s)
    cin = f
  params = {"encoder": enc}

  c = FEATURES[-1]
  if pyramid_pooling:
    params["ppm"] = {}
    for i, oc in enumerate(PPM_CHANNELS):
      r.take(f"ppm.conv_layers.{i}.weight", (oc, c, 1, 1))
      r.take(f"ppm.conv_layers.{i}.bias", (oc,))
      params["ppm"][f"conv_layers_{i}"] = r.conv(f"ppm.conv_layers.{i}")
  r.take("ln.weight", (c,))
  r.take("ln.bias", (c,))
  params["ln"] = r.norm("ln")
  d_inner, n, rank, k = 2 * c, 16, mamba_lib.dt_rank_for(c), 4
  mamba_shapes = {"in_proj.weight": (2 * d_inner, c), "conv1d.weight": (d_inner, 1, k),
                  "conv1d.bias": (d_inner,), "x_proj.weight": (rank + 2 * n, d_inner),
                  "dt_proj.weight": (d_inner, rank), "dt_proj.bias": (d_inner,),
                  "A_log": (d_inner, n), "D": (d_inner,), "out_proj.weight": (c, d_inner)}
  mamba_sd = {k_: r.take("mamba." + k_, shape) for k_, shape in mamba_shapes.items()}
  params["mamba"] = mamba_lib.from_state_dict(mamba_sd)

  dec = {}
  for s in range(len(FEATURES) - 1):
    below, skip = FEATURES[-(s + 1)], FEATURES[-(s + 2)]
    stride = STRIDES[-(s + 1)]
    r.take(f"decoder.transpconvs.{s}.weight", (below, skip, stride, stride))
    r.take(f"decoder.transpconvs.{s}.bias", (skip,))
    dec[f"transpconvs_{s}"] = r.conv_transpose(f"decoder.transpconvs.{s}")
    dec[f"stages_{s}"] = r.block(f"decoder.stages.{s}.blocks.0", 2 * skip, skip, 1)
    r.take(f"decoder.seg_layers.{s}.weight", (1, skip, 1, 1))
    r.take(f"decoder.seg_layers.{s}.bias", (1,))
    dec[f"seg_layers_{s}"] = r.conv(f"decoder.seg_layers.{s}")
  params["decoder"] = dec
  r.finish()

  variables = {"params": jax.tree.map(np.asarray, params)}
  torch_compat.check_variables_match(_expected_variables(pyramid_pooling), variables,
                                     what="UMambaBot variables")
  return variables
