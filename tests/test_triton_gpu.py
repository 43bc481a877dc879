"""The Triton selective scan on a GPU (jax_triton) against impl="reference": forward, last state
and every gradient, float32 and bfloat16, under jit and vmap, on fresh random shapes.

Skipped unless jax runs on a GPU with jax_triton importable (kernels/gpu_check.sh runs these).
"""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.ops import triton_dispatch as td

# The module itself (the package exports the function under the same name).
ss = importlib.import_module("jaxmamba.ops.selective_scan")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not td.available(), reason="needs a GPU and jax_triton")]

SEED = int.from_bytes(os.urandom(4), "little")
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


# Few shapes: each new dtype or size-1 argument compiles the six kernels again (~20 s on the GPU
# host), and kernels/gpu_check.sh gives the tests ~3 minutes.
FIXED_SHAPES = [(2, 32, 4096, 16, 0), (1, 5, 1, 16, 0), (2, 48, 200, 16, 2)]


def _fresh_shapes(count=2):
  """Drawn at run time (not at collection: pytest-xdist workers must collect the same tests)."""
  rng = np.random.default_rng(SEED)
  return [(int(rng.integers(1, 5)), int(rng.integers(1, 80)), int(rng.integers(1, 3000)),
           int(rng.choice([4, 8, 16])), 0) for _ in range(count)]


def _inputs(key, batch, dim, length, nstate, groups, dtype):
  ks = jax.random.split(key, 8)
  n = jax.random.normal
  bc = (batch, groups, nstate, length) if groups else (batch, nstate, length)
  return (n(ks[0], (batch, dim, length)).astype(dtype),
          (0.5 * n(ks[1], (batch, dim, length)) - 1.0).astype(dtype),
          -jnp.exp(0.5 * n(ks[2], (dim, nstate))),
          n(ks[3], bc).astype(dtype), n(ks[4], bc).astype(dtype),
          n(ks[5], (dim,)), n(ks[6], (batch, dim, length)).astype(dtype),
          0.3 * n(ks[7], (dim,)))


def _close(got, want, tol, what):
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-6))
  assert err < tol, f"{what}: relative max error {err:.2e} >= {tol} (seed {SEED})"


def _loss(impl):
  def f(*a):
    y, last = ss.selective_scan(*a, delta_softplus=True, return_last_state=True, impl=impl)
    w = jnp.cos(jnp.arange(y.shape[-1], dtype=jnp.float32))
    return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(last * 0.1)
  return f


def _check(shape, dtype):
  args = _inputs(jax.random.PRNGKey(SEED % 1000 + shape[2]), *shape, dtype)
  y, last = jax.jit(lambda *a: ss.selective_scan(*a, delta_softplus=True, return_last_state=True,
                                                 impl="triton"))(*args)
  y_ref, last_ref = ss.selective_scan(*args, delta_softplus=True, return_last_state=True,
                                      impl="reference")
  assert y.dtype == args[0].dtype and last.dtype == jnp.float32
  _close(y, y_ref, TOL[dtype], f"y {shape}")
  _close(last, last_ref, TOL[dtype], f"last state {shape}")
  argnums = tuple(range(8))
  got = jax.jit(jax.grad(_loss("triton"), argnums=argnums))(*args)
  want = jax.jit(jax.grad(_loss("reference"), argnums=argnums))(*args)
  for name, g, w, x in zip("u delta A B C D z delta_bias".split(), got, want, args):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    _close(g, w, 3 * TOL[dtype], f"d{name} {shape}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", FIXED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_every_gradient_match_reference(shape, dtype):
  _check(shape, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fresh_random_shapes(dtype):
  for shape in _fresh_shapes():
    _check(shape, dtype)


def test_vmap_folds_into_batch_and_matches_reference():
  batch, dim, length, nstate = 2, 16, 300, 16
  args = _inputs(jax.random.PRNGKey(SEED % 977), batch, dim, length, nstate, 0, jnp.float32)
  u, delta, A, B, C, D, z, bias = args
  us = jnp.stack([u, 0.5 * u, -u])

  def run(impl):
    fn = lambda uu: jnp.sum(ss.selective_scan(uu, delta, A, B, C, D, z, bias, True,
                                              impl=impl) ** 2)
    return jax.jit(jax.vmap(jax.value_and_grad(fn)))(us)
  (v, g), (v_ref, g_ref) = run("triton"), run("reference")
  _close(v, v_ref, 1e-4, "vmap value")
  _close(g, g_ref, 3e-4, "vmap grad")


def test_auto_picks_triton_on_gpu():
  args = _inputs(jax.random.PRNGKey(0), 2, 8, 100, 16, 0, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda *a: ss.selective_scan(*a, impl="auto"))(*args))
  assert "triton_kernel_call" in jaxpr
