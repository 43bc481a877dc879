"""The Flax Mamba layer against mamba_ssm's Mamba (PyTorch path) with the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmamba.nn.mamba import Mamba, from_state_dict, state_dict_keys, to_state_dict
from third_party import mamba_oracle


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  denom = np.linalg.norm(b)     # some gradients are exactly zero (e.g. A_log's at L=1)
  return np.linalg.norm(a - b) / denom if denom > 0 else np.linalg.norm(a - b)


def torch_mamba(d_model, seed, **kw):
  torch.manual_seed(seed)
  m = mamba_oracle.mamba(d_model, **kw)
  with torch.no_grad():   # move every parameter off its init so nothing passes by symmetry
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m


@pytest.mark.parametrize("impl, d_model, length", [
    ("reference", 16, 1), ("associative", 16, 1), ("chunked", 16, 1),
    ("reference", 24, 37), ("associative", 24, 37), ("chunked", 24, 37), ("chunked", 64, 130)])
def test_forward_and_gradients_match_mamba_ssm(impl, d_model, length):
  tm = torch_mamba(d_model, seed=d_model + length)
  x = torch.randn(2, length, d_model, requires_grad=True)
  y_t = tm(x)
  cot = torch.randn_like(y_t)
  (y_t * cot).sum().backward()

  model = Mamba(d_model, scan_impl=impl)
  params = from_state_dict(tm.state_dict())

  def loss(params, x):
    y = model.apply({"params": params}, x)
    return jnp.sum(y * cot.numpy()), y

  (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params, x.detach().numpy())
  assert rel_err(y, y_t.detach().numpy()) <= 1e-5
  assert rel_err(g_x, x.grad.numpy()) <= 1e-4
  # Parameter gradients, compared in torch's layout.
  g_sd = to_state_dict(g_params)
  for name, p in tm.named_parameters():
    assert rel_err(g_sd[name], p.grad.numpy()) <= 1e-4, name


def test_state_dict_round_trip_and_keys():
  tm = torch_mamba(32, seed=0)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  assert sorted(state_dict_keys()) == sorted(sd)
  back = to_state_dict(from_state_dict(sd))
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize("d_model", [8, 48, 512])
def test_parameter_shapes_and_count_match_mamba_ssm(d_model):
  tm = mamba_oracle.mamba(d_model)
  shapes = jax.eval_shape(Mamba(d_model).init, jax.random.key(0), jnp.zeros((1, 4, d_model)))
  ours = to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape), shapes["params"]))
  assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in
                                                   tm.state_dict().items()}
  assert sum(p.numel() for p in tm.parameters()) == sum(v.size for v in ours.values())
  if d_model == 512:
    assert sum(v.size for v in ours.values()) == 1_694_720   # spec §7/§8


def test_mamba_initialisation_follows_mamba_ssm():
  d_model, dt_min, dt_max = 64, 1e-3, 0.1
  params = Mamba(d_model).init(jax.random.key(1), jnp.zeros((1, 4, d_model)))["params"]
  dt = np.asarray(jax.nn.softplus(params["dt_proj_bias"]))
  assert np.all(dt >= dt_min * 0.999) and np.all(dt <= dt_max * 1.001)
  assert np.log(dt).std() > 0.5          # log-uniform spread, not a constant
  np.testing.assert_allclose(params["A_log"], np.log(np.tile(np.arange(1, 17), (128, 1))),
                             rtol=1e-6)
  np.testing.assert_array_equal(params["D"], np.ones(128))
  rank = 4
  assert np.abs(params["dt_proj_kernel"]).max() <= rank ** -0.5
  bound = 1 / np.sqrt(d_model)           # torch Linear default: U(+-1/sqrt(fan_in))
  w = np.asarray(params["in_proj"]["kernel"])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_ultralight_initialisation_scheme():
  params = Mamba(16, init_scheme="ultralight").init(jax.random.key(2),
                                                    jnp.zeros((1, 4, 16)))["params"]
  np.testing.assert_array_equal(params["dt_proj_bias"], np.zeros(32))
  assert abs(float(np.std(params["in_proj"]["kernel"])) - 0.02) < 0.004
  conv_std = float(np.std(params["conv1d"]["kernel"]))
  assert abs(conv_std - np.sqrt(2 / (4 * 32))) < 0.04


def test_bad_input_and_scheme_raise():
  with pytest.raises(ValueError, match="expected"):
    Mamba(8).init(jax.random.key(0), jnp.zeros((1, 4, 9)))
  with pytest.raises(ValueError, match="init_scheme"):
    Mamba(8, init_scheme="xavier").init(jax.random.key(0), jnp.zeros((1, 4, 8)))


def test_bfloat16_computation():
  tm = torch_mamba(16, seed=3)
  params = from_state_dict(tm.state_dict())
  x = np.random.default_rng(0).standard_normal((2, 20, 16)).astype(np.float32)
  y32 = Mamba(16, scan_impl="chunked").apply({"params": params}, x)
  y16 = Mamba(16, scan_impl="chunked", dtype=jnp.bfloat16).apply({"params": params},
                                                                  x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert rel_err(np.asarray(y16, np.float32), y32) <= 3e-2
