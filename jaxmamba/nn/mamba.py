"""mamba_ssm's simple `Mamba` (v1) as a Flax linen module, with state_dict conversion both ways.

Parameters, shapes, initialisation and forward follow mamba_ssm 1.2.0.post1 / 2.x
`modules/mamba_simple.py` (spec: models-conv-umamba.md §7, models-ultralight.md §1.3).  Flax keeps
kernels as (in, out); the torch names map one to one (see `to_state_dict`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba.nn import torch_compat
from jaxmamba.nn.depthwise import DepthwiseConv
from jaxmamba.ops.selective_scan import selective_scan

INIT_SCHEMES = ("mamba", "ultralight")


def dt_rank_for(d_model: int, dt_rank: int | str = "auto") -> int:
  return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def _dt_bias_init(dt_min, dt_max, dt_init_floor):
  """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], floored (mamba_ssm's dt init)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A_log[d, n] = log(n + 1)."""
  del key
  d_inner, d_state = shape
  return jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
                 ).astype(dtype)


class Mamba(nn.Module):
  """Mamba-1 mixer on (batch, L, d_model) sequences.

  init_scheme "mamba" is mamba_ssm's own; "ultralight" is what UltraLight VM-UNet's model-level
  re-initialisation leaves behind (spec models-ultralight.md §1.6: Linear trunc-normal std 0.02 with
  zero bias, dt bias included; conv1d weight normal(0, sqrt(2/(d_conv*d_inner))), default bias).
  """
  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_scale: float = 1.0
  dt_init_floor: float = 1e-4
  init_scheme: str = "mamba"
  scan_impl: str = "auto"
  dtype: Any = None            # computation dtype of the projections (None: the input's)
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u):
    if self.init_scheme not in INIT_SCHEMES:
      raise ValueError(f"Mamba: init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
    if u.ndim != 3 or u.shape[-1] != self.d_model:
      raise ValueError(f"Mamba: expected (batch, L, {self.d_model}) input, got {u.shape}")
    d_inner = self.expand * self.d_model
    rank = dt_rank_for(self.d_model, self.dt_rank)
    n = self.d_state
    ul = self.init_scheme == "ultralight"

    def linear(features, name):  # mamba_ssm's projections have no bias
      kernel_init = (torch_compat.trunc_normal_init(0.02) if ul
                     else torch_compat.torch_kernel_init())
      return nn.Dense(features, use_bias=False, kernel_init=kernel_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

    xz = linear(2 * d_inner, "in_proj")(u)
    x, z = jnp.split(xz, 2, axis=-1)

    conv_init = (nn.initializers.normal(math.sqrt(2.0 / (self.d_conv * d_inner))) if ul
                 else torch_compat.torch_kernel_init())
    # causal depthwise conv1d (nn.Conv(feature_group_count=d_inner) parameters, faster gradient)
    x = DepthwiseConv(d_inner, (self.d_conv,), padding=[(self.d_conv - 1, 0)],
                      use_bias=True, kernel_init=conv_init,
                      bias_init=torch_compat.torch_bias_init(self.d_conv), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv1d")(x)
    x = jax.nn.silu(x)

    x_dbl = linear(rank + 2 * n, "x_proj")(x)
    dt, b_t, c_t = jnp.split(x_dbl, [rank, rank + n], axis=-1)

    dt_std = rank ** -0.5 * self.dt_scale
    dt_kernel = self.param(
        "dt_proj_kernel",
        torch_compat.trunc_normal_init(0.02) if ul else torch_compat.uniform_init(dt_std),
        (rank, d_inner), self.param_dtype)
    dt_bias = self.param(
        "dt_proj_bias",
        nn.initializers.zeros if ul else _dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
        (d_inner,), self.param_dtype)
    a_log = self.param("A_log", _a_log_init, (d_inner, n), jnp.float32)
    d_skip = self.param("D", nn.initializers.ones, (d_inner,), jnp.float32)

    # mamba_ssm computes dt_proj without its bias and hands the bias to the scan (delta_bias),
    # which adds it in float32 before the softplus.
    delta = jnp.einsum("blr,rd->bld", dt, dt_kernel.astype(dt.dtype),
                       precision=jax.lax.Precision.HIGHEST)
    y = selective_scan(
        jnp.swapaxes(x, 1, 2), jnp.swapaxes(delta, 1, 2), -jnp.exp(a_log.astype(jnp.float32)),
        jnp.swapaxes(b_t, 1, 2), jnp.swapaxes(c_t, 1, 2), d_skip, z=jnp.swapaxes(z, 1, 2),
        delta_bias=dt_bias, delta_softplus=True, impl=self.scan_impl)
    return linear(self.d_model, "out_proj")(jnp.swapaxes(y, 1, 2))


# ------------------------------------------------------------------------------------------------
# mamba_ssm state_dict <-> Flax params.  Torch Linear weights are (out, in); Flax kernels (in, out).

_LINEARS = ("in_proj", "x_proj", "out_proj")


def from_state_dict(sd: dict, prefix: str = "") -> dict:
  """Flax params of `Mamba` from a mamba_ssm state_dict (numpy arrays or torch tensors)."""
  get = lambda k: torch_compat.to_numpy(sd[prefix + k])  # noqa: E731
  params = {name: {"kernel": get(f"{name}.weight").T} for name in _LINEARS}
  params["conv1d"] = {"kernel": np.transpose(get("conv1d.weight"), (2, 1, 0)),  # (I,1,K)->(K,1,I)
                      "bias": get("conv1d.bias")}
  params["dt_proj_kernel"] = get("dt_proj.weight").T
  params["dt_proj_bias"] = get("dt_proj.bias")
  params["A_log"] = get("A_log")
  params["D"] = get("D")
  return params


def to_state_dict(params: dict, prefix: str = "") -> dict:
  """mamba_ssm state_dict (numpy) from Flax params of `Mamba`."""
  p = jax.tree.map(np.asarray, params)
  sd = {f"{prefix}{name}.weight": p[name]["kernel"].T for name in _LINEARS}
  sd[f"{prefix}conv1d.weight"] = np.transpose(p["conv1d"]["kernel"], (2, 1, 0))
  sd[f"{prefix}conv1d.bias"] = p["conv1d"]["bias"]
  sd[f"{prefix}dt_proj.weight"] = p["dt_proj_kernel"].T
  sd[f"{prefix}dt_proj.bias"] = p["dt_proj_bias"]
  sd[f"{prefix}A_log"] = p["A_log"]
  sd[f"{prefix}D"] = p["D"]
  return sd


def state_dict_keys(prefix: str = "") -> list[str]:
  """The mamba_ssm keys one Mamba consumes (for converters that check every key is used)."""
  return [prefix + k for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                               "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight")]
