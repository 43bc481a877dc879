"""Pieces shared by the UNet, ResNet-Seg and SegFormer ports.

* `BatchNorm2d`: torch.nn.BatchNorm2d on NHWC, including its running-variance rule (torch
  normalises with the biased batch variance but stores the *unbiased* one; flax's BatchNorm stores
  the biased one, which would drift from the authors' running statistics by n/(n-1)).
* `layer_norm`: LayerNorm over channels in float32 (torch LN2d / LN, eps 1e-5).
* `TorchConverter`: fills Flax variables from a torch state_dict, checking each torch key's shape
  against the shape the Flax model expects, so errors name the torch key.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba.nn import torch_compat


class BatchNorm2d(nn.Module):
  """torch BatchNorm2d (affine, running stats) over the last axis; computes in float32.

  `momentum` is in torch's convention (weight of the new batch statistic).  Params `scale`/`bias`,
  batch_stats `mean`/`var` (the names `StateDictReader.batchnorm` produces).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    x = x.astype(jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(f"BatchNorm2d: training needs > 1 value per channel, got {x.shape}")
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(var) * (n / (n - 1))
      return y
    mean, var = ra_mean.value, ra_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """Training-mode batch norm over all axes but the last: (y, batch mean, biased batch variance).

  Autodiff of the forward formula made BatchNorm's backward ~10% of UNet's CPU train step
  (several passes over the activations); the gradient written out as torch's batch_norm_backward
  computes it (two sums in one pass, then one elementwise pass).
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.mean(jnp.square(x - mean), axes)   # two-pass, biased: what torch normalises with
  inv_std = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * inv_std * scale + bias
  return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_bwd(epsilon, res, cts):
  del epsilon
  x, mean, inv_std, scale = res
  g, g_mean, g_var = cts
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  centred = x - mean
  sum_g = jnp.sum(g, axes)
  dot_p = jnp.sum(g * centred, axes)
  dx = (g - sum_g / n - centred * (dot_p * inv_std * inv_std / n)) * (inv_std * scale)
  # the batch statistics' own cotangents (zero where, as here, they only feed running stats)
  dx = dx + g_mean / n + centred * (2.0 * g_var / n)
  return dx, dot_p * inv_std, sum_g


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def layer_norm(name: str):
  """torch LayerNorm(C, eps=1e-5) over the last axis, computed and returned in float32."""
  return torch_compat.LayerNorm(epsilon=1e-5, name=name)


def check_nhwc_input(x, multiple: int, model: str) -> None:
  """Clear error for inputs the models cannot take (NHWC, 3 channels, H and W multiples)."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{model}: expected NHWC input (batch, H, W, 3), got shape {x.shape}")
  if x.shape[1] % multiple or x.shape[2] % multiple:
    raise ValueError(f"{model}: H and W must be multiples of {multiple}, got {x.shape[1:3]}")


class TorchConverter:
  """Builds `{"params", "batch_stats"}` from a torch state_dict for a model whose variable shapes
  are `expected` (e.g. `jax.eval_shape(model.init, ...)`).

  Each method takes our path (tuple of names) and the torch key prefix; torch shapes are derived
  from the expected Flax shapes, so a wrong shape, a missing key and (in `finish`) an unused key all
  raise errors naming the torch key.
  """

  def __init__(self, state_dict: dict, expected: dict):
    self.reader = torch_compat.StateDictReader(state_dict)
    self.expected = expected
    self.out: dict = {}

  def _shape(self, collection: str, path: Sequence[str]) -> tuple:
    node = self.expected[collection]
    for p in path:
      node = node[p]
    return tuple(node.shape)

  def _put(self, collection: str, path: Sequence[str], value: np.ndarray) -> None:
    node = self.out.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value

  def _take(self, collection, path, key, torch_shape, to_flax=lambda a: a):
    self._put(collection, path, to_flax(self.reader.take(key, torch_shape)))

  def conv(self, path: Sequence[str], key: str, bias: bool = True) -> None:
    """Conv2d weight (out, in/g, kh, kw) -> kernel (kh, kw, in/g, out)."""
    kh, kw, i, o = self._shape("params", (*path, "kernel"))
    self._take("params", (*path, "kernel"), key + ".weight", (o, i, kh, kw),
               lambda a: np.transpose(a, (2, 3, 1, 0)))
    if bias:
      self._take("params", (*path, "bias"), key + ".bias", (o,))

  def conv_transpose(self, path: Sequence[str], key: str, bias: bool = True) -> None:
    """ConvTranspose2d weight (in, out, kh, kw) -> kernel (kh, kw, in, out)."""
    kh, kw, i, o = self._shape("params", (*path, "kernel"))
    self._take("params", (*path, "kernel"), key + ".weight", (i, o, kh, kw),
               lambda a: np.transpose(a, (2, 3, 0, 1)))
    if bias:
      self._take("params", (*path, "bias"), key + ".bias", (o,))

  def linear(self, path: Sequence[str], key: str, bias: bool = True) -> None:
    i, o = self._shape("params", (*path, "kernel"))
    self._take("params", (*path, "kernel"), key + ".weight", (o, i), np.transpose)
    if bias:
      self._take("params", (*path, "bias"), key + ".bias", (o,))

  def array(self, path: Sequence[str], key: str, to_flax=lambda a: a, torch_shape=None) -> None:
    """A raw tensor (e.g. MHA's packed in_proj); `torch_shape` defaults to the Flax shape."""
    shape = torch_shape or self._shape("params", path)
    self._take("params", path, key, shape, to_flax)

  def layer_norm(self, path: Sequence[str], key: str) -> None:
    (c,) = self._shape("params", (*path, "scale"))
    self._take("params", (*path, "scale"), key + ".weight", (c,))
    self._take("params", (*path, "bias"), key + ".bias", (c,))

  def batchnorm(self, path: Sequence[str], key: str) -> None:
    self.layer_norm(path, key)   # affine weight/bias, same layout
    (c,) = self._shape("batch_stats", (*path, "mean"))
    self._take("batch_stats", (*path, "mean"), key + ".running_mean", (c,))
    self._take("batch_stats", (*path, "var"), key + ".running_var", (c,))
    self.reader.skip(key + ".num_batches_tracked")

  def finish(self) -> dict:
    """Fails on unused torch keys or unfilled variables; returns the variables as jax arrays."""
    self.reader.finish()
    torch_compat.check_variables_match(self.expected, self.out)
    return jax.tree_util.tree_map(jnp.asarray, self.out)


@functools.lru_cache(maxsize=16)
def expected_variables(model: nn.Module, size: int = 64) -> dict:
  """Variable shapes of `model` (no computation), from a (1, size, size, 3) input.

  Cached: tracing a ResNet50 takes seconds, and converters call this for every state_dict.
  (Unbound linen modules are frozen dataclasses, hashed by their fields.)
  """
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def torch_default_conv(features: int, kernel: int, in_features: int, name: str, stride: int = 1,
                       padding: int = 0, groups: int = 1, bias: bool = True, dtype: Any = None,
                       split_multiplier: bool = False):
  """Shorthand for torch_compat.conv2d with torch's default init."""
  return torch_compat.conv2d(features, kernel, stride=stride, padding=padding, groups=groups,
                             bias=bias, in_features=in_features, name=name, dtype=dtype,
                             split_multiplier=split_multiplier)
