"""SegFormer as the authors used it (models/segformer.py, the FrancescoSaverioZuppichini
re-implementation; spec models-conv-umamba.md §4), NHWC.

Encoder: 4 stages of OverlapPatchMerge (conv, no bias, + LN) -> pre-norm blocks
[x + EffAttn(LN x); x + MixMLP(LN x)] -> LN.  EffAttn: K/V from a stride-r conv (+ LN) of the
normed map, torch MultiheadAttention (packed in-proj, head dim 64).  MixMLP: 1x1 -> depthwise-style
3x3 (groups=C, 4 outputs per channel) -> exact GELU -> 1x1.  Decoder: features reversed, each
upsampled (bilinear, align_corners=True) by 8/4/2/1 to H/4, then 1x1 conv to 256; head: concat ->
1x1 (no bias) -> ReLU -> BN -> 1x1 (decoder and head's first conv computed in an equivalent,
cheaper order: SegFormer.__call__).  The authors upsample the (H/4) logits outside the model
(bilinear, align_corners=False); we do it here, so the output is (B, H, W, 1).  H, W: multiples of
32.

torch keys (authors' module; `module.` stripped):
  encoder.stages.{i}.overlap_patch_merge.{0 conv, 1 LN}
  encoder.stages.{i}.blocks.{j}.0.fn.0 (LN), .0.fn.1.reducer.{0 conv, 1 LN},
      .0.fn.1.att.{in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias}
  encoder.stages.{i}.blocks.{j}.1.fn.0 (LN), .1.fn.1.{0, 1, 3} (MixMLP convs; 2 = GELU)
  encoder.stages.{i}.norm, decoder.stages.{j}.1 (conv; 0 = upsample),
  head.fuse.{0 conv, 2 BN} (1 = ReLU), head.predict
Ours: `stage{i}_patch_conv`, `stage{i}_patch_norm`, `stage{i}_block{j}` (`attn_norm`, `attn`
(`reducer_conv`, `reducer_norm`, `in_proj_kernel` (C, 3C) = torch in_proj_weight^T, `in_proj_bias`,
`out_proj`), `mlp_norm`, `mlp_in`, `mlp_dw`, `mlp_out`), `stage{i}_norm`; `decoder{j}`;
`fuse_conv`, `fuse_bn`, `predict`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from jaxmamba.models.cnn_common import (BatchNorm2d, TorchConverter, check_nhwc_input,
                                        expected_variables, layer_norm, torch_default_conv)
from jaxmamba.nn import torch_compat

WIDTHS = (64, 128, 256, 512)
DEPTHS = (3, 4, 6, 3)
HEADS = (1, 2, 4, 8)
PATCH_SIZES = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)
REDUCTIONS = (8, 4, 2, 1)
MLP_EXPANSION = 4
DECODER_CHANNELS = 256


class EfficientAttention(nn.Module):
  """Queries from every pixel, keys/values from a stride-`reduction` conv + LN; torch MHA."""
  reduction: int
  heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kv = torch_compat.PatchConv(c, c, self.reduction, dtype=self.dtype, name="reducer_conv")(x)
    kv = layer_norm("reducer_norm")(kv).reshape(b, -1, c)      # row-major tokens, h*W + w
    q = x.reshape(b, h * w, c)
    # torch packs q, k, v projections in one (3C, C) tensor, xavier-uniform over all of it
    w_in = self.param("in_proj_kernel", torch_compat.uniform_init(math.sqrt(6.0 / (4 * c))),
                      (c, 3 * c))
    b_in = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,))
    dtype = self.dtype or jnp.float32
    w_in, b_in = w_in.astype(dtype), b_in.astype(dtype)
    q, kv = q.astype(dtype), kv.astype(dtype)
    head_dim = c // self.heads
    split = lambda t: t.reshape(b, -1, self.heads, head_dim)
    q = split(q @ w_in[:, :c] + b_in[:c])
    k = split(kv @ w_in[:, c:2 * c] + b_in[c:2 * c])
    v = split(kv @ w_in[:, 2 * c:] + b_in[2 * c:])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, h * w, c)
    out = torch_compat.dense(c, c, bias_init=nn.initializers.zeros, name="out_proj",
                             dtype=self.dtype)(out)
    return out.reshape(b, h, w, c)


class EncoderBlock(nn.Module):
  """x + EffAttn(LN x), then x + MixMLP(LN x) (stochastic depth p=0 is the identity)."""
  reduction: int
  heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = x + EfficientAttention(self.reduction, self.heads, self.dtype, name="attn")(
        layer_norm("attn_norm")(x))
    y = layer_norm("mlp_norm")(x)
    y = torch_compat.PatchConv(c, c, dtype=self.dtype, name="mlp_in")(y)
    # The depthwise conv's four outputs per channel as four C-channel maps, each from y itself,
    # and mlp_out as the sum of their products with its matching kernel rows: the same sums as
    # torch's, without first repeating y's channels four times (jaxmamba.nn.depthwise).
    parts = torch_default_conv(c * MLP_EXPANSION, 3, c, "mlp_dw", padding=1, groups=c,
                               dtype=self.dtype, split_multiplier=True)(y)
    kernel, bias = torch_compat.PatchConv(c, c * MLP_EXPANSION, name="mlp_out")()
    y = bias
    for m, part in enumerate(parts):
      part, k_m = promote_dtype(torch_compat.gelu(part), kernel[m::MLP_EXPANSION],
                                dtype=self.dtype)
      y = y + jnp.dot(part, k_m)
    return x + y.astype(x.dtype)


class SegFormer(nn.Module):
  """The authors' SegFormer (17,782,913 parameters); full-resolution logits (B, H, W, 1)."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_nhwc_input(x, 32, "SegFormer")
    h, w = x.shape[1:3]
    features = []
    y = x
    for i in range(len(WIDTHS)):
      k = PATCH_SIZES[i]
      y = torch_default_conv(WIDTHS[i], k, y.shape[-1], f"stage{i}_patch_conv",
                             stride=PATCH_STRIDES[i], padding=k // 2, bias=False,
                             dtype=self.dtype)(y)
      y = layer_norm(f"stage{i}_patch_norm")(y)
      for j in range(DEPTHS[i]):
        y = EncoderBlock(REDUCTIONS[i], HEADS[i], self.dtype, name=f"stage{i}_block{j}")(y)
      y = layer_norm(f"stage{i}_norm")(y)
      features.append(y)
    # decoder{j} (1x1 conv of the upsampled feature) and fuse_conv (1x1 conv, no bias, of their
    # concatenation) are linear with nothing between them, and a bilinear upsampling commutes
    # with any per-pixel linear map (its weights sum to 1, so biases pass through): the same
    # function is sum_j up_j(f_j @ (Wd_j @ Wf_j) + bd_j @ Wf_j), each term at its own stage's
    # resolution.  That is 15x fewer products than convolving 1024 channels at H/4 (the CPU train
    # step at batch 4, 256x256: 1.54 s -> 1.29 s), with the same parameters and gradients, a
    # float32 rounding apart (tests/test_models_cnn.py compares both with torch).
    wf, _ = torch_compat.PatchConv(DECODER_CHANNELS, DECODER_CHANNELS * len(WIDTHS),
                                   use_bias=False, name="fuse_conv")()
    out_size = features[0].shape[1:3]
    y = 0.0
    for j, f in enumerate(features[::-1]):
      wd, bd = torch_compat.PatchConv(DECODER_CHANNELS, f.shape[-1], name=f"decoder{j}")()
      wf_j = wf[j * DECODER_CHANNELS:(j + 1) * DECODER_CHANNELS]
      w_j = jnp.dot(wd, wf_j, precision=jax.lax.Precision.HIGHEST)
      b_j = jnp.dot(bd, wf_j, precision=jax.lax.Precision.HIGHEST)
      f, w_j, b_j = promote_dtype(f, w_j, b_j, dtype=self.dtype)
      z = jnp.dot(f, w_j) + b_j
      y = y + torch_compat.resize_bilinear(z, out_size, align_corners=True)
    y = BatchNorm2d(name="fuse_bn")(nn.relu(y), train)    # BN after the ReLU, as the authors
    y = torch_compat.PatchConv(1, DECODER_CHANNELS, dtype=self.dtype, name="predict")(y)
    # The authors' F.interpolate of the H/4 logits to the mask size, done inside the model.
    return torch_compat.resize_bilinear(y.astype(jnp.float32), (h, w), align_corners=False)


def from_torch_state_dict(state_dict) -> dict:
  """Flax variables from the authors' SegFormer state_dict (no `module.` prefix)."""
  conv = TorchConverter(state_dict, expected_variables(SegFormer()))
  for i in range(len(WIDTHS)):
    ours, theirs = f"stage{i}", f"encoder.stages.{i}"
    conv.conv((f"{ours}_patch_conv",), f"{theirs}.overlap_patch_merge.0", bias=False)
    conv.layer_norm((f"{ours}_patch_norm",), f"{theirs}.overlap_patch_merge.1")
    for j in range(DEPTHS[i]):
      blk, tb = f"{ours}_block{j}", f"{theirs}.blocks.{j}"
      conv.layer_norm((blk, "attn_norm"), f"{tb}.0.fn.0")
      att = f"{tb}.0.fn.1"
      conv.conv((blk, "attn", "reducer_conv"), f"{att}.reducer.0")
      conv.layer_norm((blk, "attn", "reducer_norm"), f"{att}.reducer.1")
      c = WIDTHS[i]
      conv.array((blk, "attn", "in_proj_kernel"), f"{att}.att.in_proj_weight", np.transpose,
                 torch_shape=(3 * c, c))
      conv.array((blk, "attn", "in_proj_bias"), f"{att}.att.in_proj_bias")
      conv.linear((blk, "attn", "out_proj"), f"{att}.att.out_proj")
      conv.layer_norm((blk, "mlp_norm"), f"{tb}.1.fn.0")
      for name, idx in (("mlp_in", 0), ("mlp_dw", 1), ("mlp_out", 3)):
        conv.conv((blk, name), f"{tb}.1.fn.1.{idx}")
    conv.layer_norm((f"{ours}_norm",), f"{theirs}.norm")
  for j in range(len(WIDTHS)):
    conv.conv((f"decoder{j}",), f"decoder.stages.{j}.1")
  conv.conv(("fuse_conv",), "head.fuse.0", bias=False)
  conv.batchnorm(("fuse_bn",), "head.fuse.2")
  conv.conv(("predict",), "head.predict")
  return conv.finish()
