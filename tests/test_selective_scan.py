"""selective_scan against mamba_ssm's selective_scan_ref (PyTorch) and a float64 NumPy recurrence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmamba.ops.selective_scan import selective_scan
from third_party import mamba_oracle

IMPLS = ("reference", "associative", "chunked")
selective_scan_ref, _ = mamba_oracle.load()


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_inputs(seed, batch, dim, length, nstate, groups=0, delta_scale=0.5, delta_shift=0.0):
  """Fresh random inputs; groups=0 means ungrouped (batch, N, L) B and C."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  bc_shape = (batch, nstate, length) if groups == 0 else (batch, groups, nstate, length)
  return dict(
      u=f(batch, dim, length), delta=f(batch, dim, length) * delta_scale + delta_shift,
      A=-np.exp(f(dim, nstate) * 0.5), B=f(*bc_shape), C=f(*bc_shape), D=f(dim),
      z=f(batch, dim, length), delta_bias=f(dim) * 0.5)


OPTIONALS = ("D", "z", "delta_bias")


def call_both(inputs, use, softplus, impl, chunk_size=8):
  kw = {k: inputs[k] for k in OPTIONALS if k in use}
  ours = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                        delta_softplus=softplus, return_last_state=True, impl=impl,
                        chunk_size=chunk_size, **kw)
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  theirs = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"] if "D" in use
                              else None, t["z"] if "z" in use else None,
                              t["delta_bias"] if "delta_bias" in use else None, softplus, True)
  return ours, theirs


# Every optional argument on and off, over shapes that stress the edges: L=1, prime L, a dim that
# is a multiple of no block size, grouped B/C, chunk sizes that do not divide L.
# Each optional argument alone, all of them, none of them; softplus on and off.
OPTION_SETS = [(frozenset(), False), (frozenset(), True), (frozenset(OPTIONALS), False),
               (frozenset(OPTIONALS), True), (frozenset({"D"}), False), (frozenset({"z"}), True),
               (frozenset({"delta_bias"}), True)]
SHAPES = [(2, 5, 1, 4, 0), (1, 7, 37, 3, 0), (2, 6, 29, 5, 3), (3, 4, 64, 16, 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b%d_d%d_L%d_N%d_G%d" % s)
def test_forward_matches_mamba_ssm_every_option(impl, shape):
  inputs = make_inputs(sum(shape), *shape)
  for use, softplus in OPTION_SETS:
    (y, last), (y_ref, last_ref) = call_both(inputs, use, softplus, impl)
    assert y.shape == y_ref.shape and last.shape == last_ref.shape
    assert rel_err(y, y_ref.numpy()) <= 1e-5, (use, softplus)
    assert rel_err(last, last_ref.numpy()) <= 1e-5, (use, softplus)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_past_softplus_threshold(impl):
  # delta + bias around 20 exercises both sides of torch's softplus threshold.
  inputs = make_inputs(3, 2, 6, 23, 4, delta_scale=3.0, delta_shift=20.0)
  inputs["A"] = inputs["A"] * 0.01   # keep exp(delta*A) away from 0 so the state is not trivial
  (y, last), (y_ref, last_ref) = call_both(inputs, set(OPTIONALS), True, impl)
  assert rel_err(y, y_ref.numpy()) <= 1e-5
  assert rel_err(last, last_ref.numpy()) <= 1e-5


GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def grads_both(inputs, impl, softplus=True, chunk_size=8):
  rng = np.random.default_rng(99)
  cot = rng.standard_normal(inputs["u"].shape).astype(np.float32)

  def loss(*args):
    y = selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7],
                       delta_softplus=softplus, impl=impl, chunk_size=chunk_size)
    return jnp.sum(y * cot)

  ours = jax.grad(loss, argnums=tuple(range(8)))(*[inputs[k] for k in GRAD_ARGS])
  t = {k: torch.from_numpy(inputs[k]).requires_grad_(True) for k in GRAD_ARGS}
  y = selective_scan_ref(*[t[k] for k in GRAD_ARGS], delta_softplus=softplus)
  (y * torch.from_numpy(cot)).sum().backward()
  return dict(zip(GRAD_ARGS, ours)), {k: t[k].grad.numpy() for k in GRAD_ARGS}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 5, 1, 4, 0), (2, 7, 37, 3, 0), (1, 6, 19, 5, 2)],
                         ids=lambda s: "b%d_d%d_L%d_N%d_G%d" % s)
def test_gradients_match_mamba_ssm(impl, shape):
  inputs = make_inputs(7 + sum(shape), *shape)
  ours, theirs = grads_both(inputs, impl)
  for k in GRAD_ARGS:
    assert ours[k].shape == theirs[k].shape, k
    assert np.all(np.isfinite(ours[k])), k
    assert rel_err(ours[k], theirs[k]) <= 1e-4, k


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_past_softplus_threshold_are_finite_and_match(impl):
  inputs = make_inputs(5, 2, 4, 17, 4, delta_scale=40.0, delta_shift=60.0)  # up to exp overflow
  inputs["A"] = inputs["A"] * 1e-3
  ours, theirs = grads_both(inputs, impl)
  for k in GRAD_ARGS:
    assert np.all(np.isfinite(ours[k])), k
    assert rel_err(ours[k], theirs[k]) <= 1e-4, k


def numpy_recurrence(u, delta, A, B, C, D, z, delta_bias, softplus):
  """The scan written out in float64, step by step: an oracle independent of torch and jax."""
  u, delta, A, B, C, D, z, delta_bias = (np.asarray(a, np.float64)
                                         for a in (u, delta, A, B, C, D, z, delta_bias))
  batch, dim, length = u.shape
  delta = delta + delta_bias[:, None]
  if softplus:
    delta = np.where(delta > 20, delta, np.log1p(np.exp(np.minimum(delta, 20))))
  if B.ndim == 3:
    B, C = B[:, None], C[:, None]
  per_group = dim // B.shape[1]
  h = np.zeros((batch, dim, A.shape[1]))
  y = np.zeros_like(u)
  for t in range(length):
    for d in range(dim):
      g = d // per_group
      h[:, d] = (np.exp(delta[:, d, t, None] * A[d]) * h[:, d]
                 + (delta[:, d, t] * u[:, d, t])[:, None] * B[:, g, :, t])
      y[:, d, t] = np.sum(h[:, d] * C[:, g, :, t], axis=-1)
  y = y + D[:, None] * u
  return y * (z / (1 + np.exp(-z))), h


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 5, 31, 4, 0), (1, 6, 16, 3, 3)],
                         ids=lambda s: "b%d_d%d_L%d_N%d_G%d" % s)
def test_forward_matches_float64_numpy(impl, shape):
  inputs = make_inputs(11, *shape)
  y64, h64 = numpy_recurrence(*[inputs[k] for k in GRAD_ARGS], softplus=True)
  y, last = selective_scan(*[inputs[k] for k in GRAD_ARGS[:5]], D=inputs["D"], z=inputs["z"],
                           delta_bias=inputs["delta_bias"], delta_softplus=True,
                           return_last_state=True, impl=impl, chunk_size=8)
  assert rel_err(y, y64) <= 1e-5
  assert rel_err(last, h64) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
  inputs = make_inputs(13, 2, 8, 33, 4)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
  y = selective_scan(*[bf[k] for k in GRAD_ARGS[:5]], D=bf["D"], z=bf["z"],
                     delta_bias=bf["delta_bias"], delta_softplus=True, impl=impl, chunk_size=8)
  assert y.dtype == jnp.bfloat16
  # Oracle: float64 math on the same bf16-rounded inputs; the only error left is y's rounding.
  y64, _ = numpy_recurrence(*[np.asarray(bf[k], np.float32) for k in GRAD_ARGS], softplus=True)
  assert rel_err(np.asarray(y, np.float32), y64) <= 8e-3
  g = jax.grad(lambda u: jnp.sum(selective_scan(u, *[bf[k] for k in GRAD_ARGS[1:5]],
                                                impl=impl).astype(jnp.float32)))(bf["u"])
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap(impl):
  inputs = make_inputs(17, 3, 4, 20, 4)
  args = [inputs[k] for k in GRAD_ARGS[:5]]
  f = jax.jit(lambda *a: selective_scan(*a, D=inputs["D"], delta_softplus=True, impl=impl,
                                        chunk_size=8))
  eager = selective_scan(*args, D=inputs["D"], delta_softplus=True, impl=impl, chunk_size=8)
  np.testing.assert_allclose(f(*args), eager, rtol=1e-6, atol=1e-6)
  # vmap over a new leading axis (A shared) equals a loop over it.
  stacked = [np.stack([a, a[::-1].copy()]) for a in (args[0], args[1], args[3], args[4])]
  vm = jax.vmap(lambda u, d, b, c: f(u, d, args[2], b, c))(*stacked)
  for i in range(2):
    np.testing.assert_allclose(vm[i], f(stacked[0][i], stacked[1][i], args[2], stacked[2][i],
                                        stacked[3][i]), rtol=1e-6, atol=1e-6)


def test_chunked_memory_stays_linear_in_length():
  """Under grad, the chunked scan must not keep (batch, dim, L, N) intermediates alive."""
  b, d, length, n = 2, 32, 2048, 64
  inputs = make_inputs(0, b, d, length, n)
  args = [inputs[k] for k in GRAD_ARGS[:5]]

  def temp_bytes(impl):
    g = jax.jit(jax.grad(lambda u, dl: jnp.sum(selective_scan(u, dl, *args[2:], impl=impl)),
                         argnums=(0, 1)))
    return g.lower(*args[:2]).compile().memory_analysis().temp_size_in_bytes

  full = b * d * length * n * 4
  assert temp_bytes("associative") >= full          # the associative scan materialises it
  assert temp_bytes("chunked") <= full / 4          # O(batch*dim*L): independent of N


@pytest.mark.parametrize("bad, match", [
    (dict(u=np.zeros((2, 3))), "u must be"),
    (dict(delta=np.zeros((2, 3, 5), np.float32)), "delta must have"),
    (dict(A=np.zeros((4, 2), np.float32)), "A must be"),
    (dict(B=np.zeros((2, 2, 8), np.float32)), "same shape"),
    (dict(B=np.zeros((3, 2), np.float32), C=np.zeros((3, 2), np.float32)), "time-invariant"),
    (dict(B=np.zeros((2, 2, 2, 9), np.float32), C=np.zeros((2, 2, 2, 9), np.float32)),
     "not divisible"),
    (dict(D=np.zeros(4, np.float32)), "D must be"),
    (dict(z=np.zeros((2, 3, 8), np.float32)), "z must have"),
    (dict(A=np.zeros((3, 2), np.complex64)), "complex"),
    (dict(u=np.zeros((2, 3, 9), np.int32)), "floating"),
    (dict(impl="fastest"), "unknown impl"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
  good = dict(u=np.zeros((2, 3, 9), np.float32), delta=np.zeros((2, 3, 9), np.float32),
              A=np.zeros((3, 2), np.float32), B=np.zeros((2, 2, 9), np.float32),
              C=np.zeros((2, 2, 9), np.float32))
  kw = {**good, **bad}
  if "delta" not in bad and "u" in bad and kw["u"].ndim == 3:
    kw["delta"] = kw["u"].astype(np.float32)
  with pytest.raises(ValueError, match=match):
    selective_scan(**kw)
