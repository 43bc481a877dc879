"""DepthwiseConv: the same parameters, outputs and gradients as flax's grouped nn.Conv."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.nn import depthwise
from jaxmamba.nn.depthwise import DepthwiseConv


def _pair(features, kernel_size, padding, use_bias=True, dtype=None):
  kw = dict(use_bias=use_bias, dtype=dtype, kernel_init=nn.initializers.normal(0.5),
            bias_init=nn.initializers.normal(0.5))
  ours = DepthwiseConv(features, kernel_size, padding=padding, **kw)
  theirs = lambda c: nn.Conv(features, kernel_size, padding=padding, feature_group_count=c, **kw)
  return ours, theirs


@pytest.mark.parametrize("shape,features,kernel_size,padding", [
    ((2, 37, 6), 6, (4,), [(3, 0)]),                    # Mamba's causal conv1d
    ((2, 9, 11, 5), 20, (3, 3), [(1, 1), (1, 1)]),      # SegFormer's MixMLP: 4 outputs per channel
    ((1, 6, 7, 3), 3, (2, 3), [(0, 1), (2, 0)]),        # uneven kernel and padding
])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("block_elements", [1 << 17, 50])
def test_matches_grouped_conv(monkeypatch, shape, features, kernel_size, padding, use_bias,
                              block_elements):
  """At 50 values a block the kernel gradient loops over blocks of rows, the last one padded."""
  monkeypatch.setattr(depthwise, "_BLOCK_ELEMENTS", block_elements)
  ours, theirs = _pair(features, kernel_size, padding, use_bias)
  theirs = theirs(shape[-1])
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  v = theirs.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == \
      jax.tree.map(jnp.shape, v)
  got, want = ours.apply(v, x), theirs.apply(v, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.PRNGKey(2), want.shape)
  g_ours = jax.grad(lambda v, x: jnp.sum(ours.apply(v, x) * cot), argnums=(0, 1))(v, x)
  g_theirs = jax.grad(lambda v, x: jnp.sum(theirs.apply(v, x) * cot), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_bias", [True, False])
def test_split_multiplier_gives_each_multiplier_its_channels(use_bias):
  """split_multiplier: M maps, the m-th torch's channels c * M + m, with the same gradients."""
  shape, features = (2, 9, 11, 5), 20
  ours, theirs = _pair(features, (3, 3), [(1, 1), (1, 1)], use_bias)
  split = DepthwiseConv(features, (3, 3), padding=[(1, 1), (1, 1)], use_bias=use_bias,
                        split_multiplier=True)
  theirs = theirs(shape[-1])
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  v = theirs.init(jax.random.PRNGKey(1), x)
  want = theirs.apply(v, x)
  parts = split.apply(v, x)
  assert len(parts) == 4
  for m, part in enumerate(parts):
    np.testing.assert_allclose(part, want[..., m::4], rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.PRNGKey(2), want.shape)
  g_split = jax.grad(lambda v, x: sum(jnp.sum(p * cot[..., m::4])
                                      for m, p in enumerate(split.apply(v, x))),
                     argnums=(0, 1))(v, x)
  g_theirs = jax.grad(lambda v, x: jnp.sum(theirs.apply(v, x) * cot), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_accumulates_in_float32():
  ours, _ = _pair(8, (3, 3), [(1, 1), (1, 1)], dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 8))
  v = ours.init(jax.random.PRNGKey(1), x)
  y = ours.apply(v, x)
  assert y.dtype == jnp.bfloat16
  exact, _ = _pair(8, (3, 3), [(1, 1), (1, 1)])
  as_bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)   # what the layer computes on
  want = exact.apply(jax.tree.map(as_bf16, v), as_bf16(x))
  # one bfloat16 rounding of the float32 result (relative 2^-9), not one per tap
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2.0 ** -8, atol=1e-6)


def test_bad_inputs_get_clear_errors():
  x = jnp.ones((1, 4, 4, 3))
  with pytest.raises(ValueError, match="not a multiple of the 3 input channels"):
    DepthwiseConv(4, (3, 3), [(1, 1)] * 2).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="needs .* input"):
    DepthwiseConv(3, (3,), [(1, 1)]).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="larger than the padded input"):
    DepthwiseConv(3, (7, 7), [(0, 0)] * 2).init(jax.random.PRNGKey(0), x)
