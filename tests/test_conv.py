"""jaxmamba.nn.conv: values and gradients equal XLA's native convs, parameters equal nn.Conv's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.nn import conv as fast_conv

DIMS = ("NHWC", "HWIO", "NHWC")

# (kernel, stride, padding, dilation, groups, in, out): every combination the 13 models use
# (UNet/UMamba 3x3 and 1x1, strided 3x3, ResNet 7x7/2 and 1x1/2, SegFormer 7x7/4 and 3x3/2 patch
# and 8/4/2 reducer convs, UltraLight 7x7 dilation 3 padding 9), then odd ones (groups,
# asymmetric channels, dilation 2 with stride 2).
CASES = [
    (3, 1, 1, 1, 1, 8, 16), (1, 1, 0, 1, 1, 12, 4), (3, 2, 1, 1, 1, 8, 8),
    (7, 2, 3, 1, 1, 3, 8), (1, 2, 0, 1, 1, 8, 16), (7, 4, 3, 1, 1, 3, 8),
    (8, 8, 0, 1, 1, 4, 4), (4, 4, 0, 1, 1, 4, 4), (2, 2, 0, 1, 1, 4, 4),
    (7, 1, 9, 3, 1, 2, 1), (3, 1, 1, 1, 2, 8, 6), (3, 2, 2, 2, 4, 8, 12), (5, 3, 1, 1, 1, 5, 7),
]


def _native(x, w, stride, pad, dil, groups):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                      rhs_dilation=(dil, dil), dimension_numbers=DIMS,
                                      feature_group_count=groups)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("k,stride,pad,dil,groups,cin,cout", CASES)
def test_conv2d_value_and_gradients_match_lax(k, stride, pad, dil, groups, cin, cout):
  rng = np.random.default_rng(k * 100 + stride * 10 + groups)
  x = jnp.asarray(rng.standard_normal((2, 24, 20, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)) / k, jnp.float32)
  args = ((stride, stride), ((pad, pad), (pad, pad)), (dil, dil), groups)
  y_ref = _native(x, w, stride, pad, dil, groups)
  ct = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)

  def loss(f):
    return lambda x_, w_: jnp.sum(f(x_, w_) * ct)

  ours = jax.jit(jax.grad(loss(lambda a, b: fast_conv.conv2d(a, b, *args)), argnums=(0, 1)))
  ref = jax.grad(loss(lambda a, b: _native(a, b, stride, pad, dil, groups)), argnums=(0, 1))
  np.testing.assert_array_equal(fast_conv.conv2d(x, w, *args), y_ref)
  (dx, dw), (dx_ref, dw_ref) = ours(x, w), ref(x, w)
  assert _rel(dx, dx_ref) < 1e-6
  assert _rel(dw, dw_ref) < 1e-5


def test_weight_gradient_blocks_sum_over_every_row():
  """More output pixels than one block, and a count that no power of two divides evenly."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 75, 61, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
  args = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  ct = jnp.asarray(rng.standard_normal((3, 75, 61, 5)), jnp.float32)
  dw = jax.grad(lambda w_: jnp.sum(fast_conv.conv2d(x, w_, *args) * ct))(w)
  dw_ref = jax.grad(lambda w_: jnp.sum(_native(x, w_, 1, 1, 1, 1) * ct))(w)
  assert _rel(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("k,cin,cout", [(2, 6, 4), (3, 4, 5)])
def test_conv_transpose_matches_dilated_convolution(k, cin, cout):
  """kernel == stride: torch ConvTranspose2d's output and both gradients."""
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)

  def native(a, b):
    return jax.lax.conv_general_dilated(a, b[::-1, ::-1], (1, 1), [(k - 1, k - 1)] * 2,
                                        lhs_dilation=(k, k), dimension_numbers=DIMS)
  y_ref = native(x, w)
  np.testing.assert_allclose(fast_conv.conv_transpose_nonoverlapping(x, w), y_ref, atol=1e-5)
  ct = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
  grads = jax.grad(lambda a, b: jnp.sum(fast_conv.conv_transpose_nonoverlapping(a, b) * ct),
                   argnums=(0, 1))(x, w)
  grads_ref = jax.grad(lambda a, b: jnp.sum(native(a, b) * ct), argnums=(0, 1))(x, w)
  for g, g_ref in zip(grads, grads_ref):
    assert _rel(g, g_ref) < 1e-6


def test_conv2d_module_has_nn_conv_parameters_and_outputs():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 9, 6)), jnp.float32)
  kw = dict(strides=2, padding=[(1, 1), (1, 1)], kernel_dilation=1, feature_group_count=2)
  ours, ref = fast_conv.Conv2d(4, (3, 3), **kw), nn.Conv(4, (3, 3), **kw)
  v_ours, v_ref = ours.init(jax.random.PRNGKey(0), x), ref.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(jnp.shape, v_ours) == jax.tree_util.tree_map(jnp.shape, v_ref)
  np.testing.assert_array_equal(ours.apply(v_ref, x), ref.apply(v_ref, x))


def test_conv2d_rejects_bad_input():
  with pytest.raises(ValueError, match="divisible by feature_group_count"):
    fast_conv.Conv2d(4, (3, 3), feature_group_count=3).init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="NHWC"):
    fast_conv.Conv2d(4, (3, 3)).init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 4)))
