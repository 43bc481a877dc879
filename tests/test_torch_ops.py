"""torch_compat's pooling and resizing and BatchNorm2d's written-out gradient, against PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.models import cnn_common
from jaxmamba.nn import torch_compat

torch = pytest.importorskip("torch")


def _nchw(a):
  return torch.tensor(np.asarray(a).transpose(0, 3, 1, 2).copy(), requires_grad=True)


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


# UNet's and UltraLight's 2x2 pooling, ResNet-Seg's 3x3/2/1, uneven sizes (floor mode).
@pytest.mark.parametrize("shape,k,s,p", [((2, 8, 8, 3), 2, 2, 0), ((2, 9, 11, 3), 3, 2, 1),
                                         ((1, 7, 5, 2), 2, 2, 0), ((1, 10, 9, 2), 3, 3, 1)])
def test_max_pool2d_values_and_gradient_match_torch_with_ties_and_nans(shape, k, s, p):
  """Rounded ReLU outputs tie often; torch sends the gradient to the first maximum in row-major
  window order, and a NaN wins its window."""
  rng = np.random.default_rng(sum(shape))
  x = np.maximum(rng.standard_normal(shape), 0).round(1).astype(np.float32)
  x[0, 1, 1, 0] = np.nan
  y = torch_compat.max_pool2d(jnp.asarray(x), k, s, p)
  g = rng.standard_normal(y.shape).astype(np.float32)
  dx = jax.vjp(lambda a: torch_compat.max_pool2d(a, k, s, p), jnp.asarray(x))[1](jnp.asarray(g))[0]
  xt = _nchw(x)
  yt = torch.nn.functional.max_pool2d(xt, k, s, p)
  yt.backward(_nchw(g))
  np.testing.assert_array_equal(y, _nhwc(yt))
  np.testing.assert_array_equal(dx, _nhwc(xt.grad))


def test_max_pool2d_rejects_padding_torch_rejects():
  with pytest.raises(ValueError, match="padding"):
    torch_compat.max_pool2d(jnp.zeros((1, 4, 4, 1)), 2, 2, 2)


@pytest.mark.parametrize("shape,size,align", [((2, 8, 8, 5), (64, 64), True),
                                              ((2, 16, 16, 1), (64, 64), False),
                                              ((1, 7, 9, 3), (13, 20), True),
                                              ((1, 9, 7, 3), (4, 5), False),
                                              ((1, 5, 6, 2), (5, 11), True)])
def test_resize_bilinear_values_and_gradient_match_torch(shape, size, align):
  rng = np.random.default_rng(len(shape) + size[0])
  x = rng.standard_normal(shape).astype(np.float32)
  y, vjp = jax.vjp(lambda a: torch_compat.resize_bilinear(a, size, align), jnp.asarray(x))
  g = rng.standard_normal(y.shape).astype(np.float32)
  xt = _nchw(x)
  yt = torch.nn.functional.interpolate(xt, size=size, mode="bilinear", align_corners=align)
  yt.backward(_nchw(g))
  np.testing.assert_allclose(y, _nhwc(yt), rtol=0, atol=2e-6)
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], _nhwc(xt.grad), rtol=0, atol=2e-5)


def _batch_norm_by_autodiff(x, scale, bias, eps):
  mean = x.mean((0, 1, 2))
  var = jnp.square(x - mean).mean((0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (4, 16, 16, 8)])
def test_batch_norm_gradient_matches_autodiff_and_torch(shape):
  """Forward as before (bit for bit), gradients of y and of the batch statistics as autodiff of
  the formula gives them, and y's gradients as torch's BatchNorm2d computes them."""
  rng = np.random.default_rng(shape[1])
  x, g = (jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32) for _ in range(2))
  scale, bias, g_mean, g_var = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
                                for _ in range(4))
  ours = lambda a, s, b: cnn_common.batch_norm_train(a, s, b, 1e-5)  # noqa: E731
  out, vjp = jax.vjp(ours, x, scale, bias)
  ref, vjp_ref = jax.vjp(lambda a, s, b: _batch_norm_by_autodiff(a, s, b, 1e-5), x, scale, bias)
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(vjp((g, g_mean, g_var)), vjp_ref((g, g_mean, g_var))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
  xt, st, bt = _nchw(x), torch.tensor(np.asarray(scale), requires_grad=True), \
      torch.tensor(np.asarray(bias), requires_grad=True)
  torch.nn.functional.batch_norm(xt, None, None, st, bt, training=True).backward(_nchw(g))
  dx, ds, db = vjp((g, jnp.zeros_like(g_mean), jnp.zeros_like(g_var)))
  np.testing.assert_allclose(dx, _nhwc(xt.grad), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ds, st.grad.numpy(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_gelu_value_and_gradient_match_torch():
  """torch's exact GELU (erf form) and its backward formula, across the range where erf
  saturates and where the erf and erfc forms round differently."""
  x = np.concatenate([np.linspace(-12, 12, 4001, dtype=np.float32),
                      np.random.default_rng(0).normal(0, 3, 4000).astype(np.float32)])
  ct = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  xt = torch.tensor(x, requires_grad=True)
  want = torch.nn.functional.gelu(xt)
  want.backward(torch.tensor(ct))
  got, vjp = jax.vjp(torch_compat.gelu, jnp.asarray(x))
  (grad,) = vjp(jnp.asarray(ct))
  # float32 erf differs by ~1 ulp of 1 where it nears -1 (the cdf's tail): absolute slack
  np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-5, atol=2e-6)
  # and a gradient that autodiff of the same formula agrees with
  auto = jax.grad(lambda v: jnp.sum(v * (0.5 + 0.5 * jax.lax.erf(v * np.sqrt(0.5))) * ct))(x)
  np.testing.assert_allclose(grad, auto, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 7, 5, 16), (2, 33, 64)])
def test_layer_norm_value_and_gradients_match_torch_and_autodiff(shape):
  rng = np.random.default_rng(2)
  x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
  scale = rng.normal(size=shape[-1:]).astype(np.float32)
  bias = rng.normal(size=shape[-1:]).astype(np.float32)
  ct = rng.normal(size=shape).astype(np.float32)
  xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
  want = torch.nn.functional.layer_norm(xt, shape[-1:], st, bt, eps=1e-5)
  want.backward(torch.tensor(ct))
  got, vjp = jax.vjp(lambda *a: torch_compat.layer_norm(*a, 1e-5), x, scale, bias)
  np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)
  for ours, theirs in zip(vjp(jnp.asarray(ct)), (xt.grad, st.grad, bt.grad)):
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)

  def autodiff(x, scale, bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
  for ours, auto in zip(vjp(jnp.asarray(ct)), jax.vjp(autodiff, x, scale, bias)[1](ct)):
    np.testing.assert_allclose(ours, auto, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_patch_conv_matches_strided_conv(patch):
  """PatchConv: nn.Conv's parameters, and its outputs and gradients for kernel = stride."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 5))
  ours = torch_compat.PatchConv(7, 5, patch)
  conv = torch_compat.conv2d(7, patch, stride=patch, in_features=5)
  v = conv.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(ours.apply(v, x), conv.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(v, x)),
                  jax.tree.leaves(jax.grad(loss(conv), argnums=(0, 1))(v, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if patch > 1:
    with pytest.raises(ValueError, match="multiples of the patch"):
      ours.apply(v, x[:, :7])
