"""jaxmamba.nn.conv: the matrix-product ConvTranspose equals XLA's dilated conv, with grads."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.nn import conv as fast_conv
from jaxmamba.nn import torch_compat

DIMS = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _dilated(x, w, k):
  """torch ConvTranspose2d(kernel k, stride k, padding 0) as XLA computes it natively."""
  return jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), [(k - 1, k - 1)] * 2,
                                      lhs_dilation=(k, k), dimension_numbers=DIMS)


# 2x2 (the U-Nets' upsampling, UMambaBot's 128->64 among them), 3x3 and 1x1; the last shape has
# more input pixels (3*75*61) than one block of the weight gradient, in a count no power of two
# divides, so every block and the remainder handling are exercised.
@pytest.mark.parametrize("k,shape,cout", [(2, (2, 5, 7, 6), 4), (3, (2, 5, 7, 4), 5),
                                          (1, (1, 4, 4, 3), 2), (2, (3, 75, 61, 4), 3)])
def test_conv_transpose_value_and_gradients_match_dilated_convolution(k, shape, cout):
  rng = np.random.default_rng(k + shape[1])
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, shape[-1], cout)), jnp.float32)
  y_ref = _dilated(x, w, k)
  np.testing.assert_allclose(fast_conv.conv_transpose_nonoverlapping(x, w), y_ref, atol=1e-5)
  ct = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
  grads = jax.jit(jax.grad(
      lambda a, b: jnp.sum(fast_conv.conv_transpose_nonoverlapping(a, b) * ct),
      argnums=(0, 1)))(x, w)
  grads_ref = jax.grad(lambda a, b: jnp.sum(_dilated(a, b, k) * ct), argnums=(0, 1))(x, w)
  for g, g_ref in zip(grads, grads_ref):
    assert _rel(g, g_ref) < 1e-6


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1)])
def test_conv_transpose_module_same_with_and_without_the_cpu_path(monkeypatch, kernel, stride,
                                                                  padding):
  """torch_compat.ConvTranspose2d takes the product only where it applies; values and gradients
  agree with the native path (switched off through conv.ENABLED) in both cases."""
  layer = torch_compat.ConvTranspose2d(6, kernel, stride, padding)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5, 3)), jnp.float32)
  v = layer.init(jax.random.PRNGKey(0), x)

  def value_and_grads():
    f = lambda v_, x_: jnp.sum(jnp.sin(layer.apply(v_, x_)))  # noqa: E731
    return jax.value_and_grad(f, argnums=(0, 1))(v, x)
  fast = value_and_grads()
  monkeypatch.setattr(fast_conv, "ENABLED", False)
  native = value_and_grads()
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(native)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _dilated_general(x, w, stride, padding):
  """torch ConvTranspose2d(kernel k, stride, padding) as XLA computes it natively."""
  pad = w.shape[0] - 1 - padding
  return jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), [(pad, pad)] * 2,
                                      lhs_dilation=(stride, stride), dimension_numbers=DIMS)


# ResNet-Seg's 4/2/1 at its decoder's narrowest shape, then kernels that are not a multiple of
# the stride (zero taps), stride 1 and 3, padding 0 and above the stride, odd and uneven sizes.
@pytest.mark.parametrize("k,s,p,shape,cout", [
    (4, 2, 1, (2, 8, 8, 5), 4), (4, 2, 1, (1, 5, 7, 3), 1), (3, 2, 1, (2, 6, 5, 4), 3),
    (5, 3, 2, (1, 4, 6, 2), 3), (3, 1, 1, (2, 5, 4, 3), 2), (5, 2, 3, (1, 7, 6, 2), 2),
    (2, 3, 0, (1, 4, 5, 3), 2), (4, 4, 1, (1, 3, 4, 2), 3), (3, 2, 0, (2, 3, 3, 2), 2)])
def test_conv_transpose_phases_value_and_gradients_match_dilated_convolution(k, s, p, shape,
                                                                             cout):
  rng = np.random.default_rng(10 * k + s + p)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, shape[-1], cout)), jnp.float32)
  y_ref = _dilated_general(x, w, s, p)
  y = fast_conv.conv_transpose_phases(x, w, s, p)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  ct = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
  grads = jax.jit(jax.grad(lambda a, b: jnp.sum(fast_conv.conv_transpose_phases(a, b, s, p) * ct),
                           argnums=(0, 1)))(x, w)
  grads_ref = jax.grad(lambda a, b: jnp.sum(_dilated_general(a, b, s, p) * ct),
                       argnums=(0, 1))(x, w)
  for g, g_ref in zip(grads, grads_ref):
    assert _rel(g, g_ref) < 1e-5


def test_conv_transpose_phases_rejects_an_empty_output_and_a_rectangular_kernel():
  x = jnp.zeros((1, 1, 1, 2))
  with pytest.raises(ValueError, match="non-empty output"):
    fast_conv.conv_transpose_phases(x, jnp.zeros((2, 2, 2, 1)), 2, 1)
  with pytest.raises(ValueError, match="square kernel"):
    fast_conv.conv_transpose_phases(x, jnp.zeros((2, 3, 2, 1)), 2, 0)


def _bn_relu_conv(conv_cls):
  """A BatchNorm-like affine map and ReLU before a 3x3 conv: the pattern of UNet and ResNet."""
  layer = conv_cls(6, (3, 3), padding=[(1, 1)] * 2)

  def loss(v, x, s):
    return jnp.sum(jnp.sin(layer.apply(v, jnp.maximum(x * s + s, 0))))
  return layer, loss


def test_conv_values_and_gradients_equal_nn_conv_exactly():
  """fast_conv.Conv has nn.Conv's parameters and, being an exact identity around it, its values
  and gradients bit for bit (x / (1 + 0 * x) == x for every finite x)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
  s = jnp.asarray(rng.standard_normal(5), jnp.float32)
  results = []
  for cls in (fast_conv.Conv, nn.Conv):
    layer, loss = _bn_relu_conv(cls)
    v = layer.init(jax.random.PRNGKey(0), x)
    results.append((v, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(v, x, s)))
  (v_fast, got), (v_ref, want) = results
  assert jax.tree.structure(v_fast) == jax.tree.structure(v_ref)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


# torch Conv2d settings of the 13 models (kernel, stride, padding, dilation, groups: ResNet's 7x7
# stem and 1x1 stride-2 shortcut, UNet's and ResNet's 3x3, a dilated and a grouped one) and
# random ones, among them asymmetric padding and a kernel wider than the padded input is tall
@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,shape", [
    ((3, 3), 1, [(1, 1)] * 2, 1, 1, (2, 9, 7, 5)),
    ((3, 3), 2, [(1, 1)] * 2, 1, 1, (2, 9, 8, 5)),
    ((7, 7), 2, [(3, 3)] * 2, 1, 1, (2, 13, 11, 3)),
    ((1, 1), 2, [(0, 0)] * 2, 1, 1, (2, 8, 8, 4)),
    ((3, 3), 1, [(2, 2)] * 2, 2, 1, (1, 10, 9, 4)),
    ((3, 3), 1, [(1, 1)] * 2, 1, 2, (2, 6, 6, 4)),
    ((2, 4), 3, [(0, 2), (1, 3)], 1, 1, (3, 7, 10, 2)),
    ((5, 1), 1, [(4, 0), (0, 1)], (1, 2), 1, (1, 5, 6, 3)),
])
def test_conv_equals_nn_conv_for_every_padding_stride_dilation(kernel, stride, padding, dilation,
                                                             groups, shape):
  """fast_conv.Conv (materialized input, padded beforehand where the convolution pads) against
  nn.Conv (lax.conv_general_dilated): outputs, and gradients of input, kernel and bias."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  s = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  results = []
  for cls in (fast_conv.Conv, nn.Conv):
    layer = cls(4, kernel, strides=stride, padding=padding, kernel_dilation=dilation,
                feature_group_count=groups)
    v = layer.init(jax.random.PRNGKey(0), x)

    def loss(v, x, s):
      y = layer.apply(v, jnp.maximum(x * s + s, 0))
      return jnp.sum(jnp.sin(y)), y
    results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(v, x, s))
  (got, want) = results
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _transposing_fusions(hlo: str, shape: str) -> list[str]:
  """Bodies of the fused computations of `hlo` that write a transposed array of `shape`."""
  bodies = re.findall(r"\n(%fused\S* \([^\n]*\) -> " + re.escape(shape) + r" \{\n.*?\n\})",
                      hlo, re.S)
  return [b for b in bodies if " transpose(" in b]


def test_conv_gradient_reads_the_materialized_activation(monkeypatch):
  """The weight gradient's (C, H, W, N) copy of the activation: with nn.Conv XLA:CPU recomputes
  the affine map and ReLU inside it; with fast_conv.Conv it copies the stored activation, padded
  by the forward pass (a pure transpose of a 34x34 array), and the forward convolution reads
  that padded array without padding of its own."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 8)), jnp.float32)
  s = jnp.ones(8)
  copies, hlos = {}, {}
  for enabled in (False, True):
    monkeypatch.setattr(fast_conv, "ENABLED", enabled)
    layer, loss = _bn_relu_conv(fast_conv.Conv)
    v = layer.init(jax.random.PRNGKey(0), x)
    # s stands for BatchNorm's parameters: the activation is differentiated, as in a network
    hlos[enabled] = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(v, x, s).compile().as_text()
    copies[enabled] = _transposing_fusions(hlos[enabled],
                                           "f32[8,34,34,2]" if enabled else "f32[8,32,32,2]")
  assert copies[False] and all("maximum(" in b for b in copies[False])
  assert copies[True] and not any(op in b for b in copies[True]
                                  for op in ("maximum(", "multiply(", "pad("))
  forward = re.findall(r"convolution\(%\S+, %v\S*kernel\S*\), window=\{([^}]*)\}", hlos[True])
  assert forward == ["size=3x3"]


def test_conv_inference_computes_no_division():
  layer = fast_conv.Conv(4, (3, 3))
  x = jnp.ones((1, 5, 5, 3))
  v = layer.init(jax.random.PRNGKey(0), x)
  assert "div" not in str(jax.make_jaxpr(layer.apply)(v, x))
