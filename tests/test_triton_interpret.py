"""The Triton selective-scan kernels on the CPU, under TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, and must not leak into other test
files sharing this pytest process, so each check runs in a fresh subprocess (a small script).

  * the kernels' torch launch helpers against mamba_ssm's `selective_scan_ref` and torch autograd
    (an independent oracle): y, last state and every gradient, incl. the last state's cotangent,
    prime L, L = 1, dim not a multiple of the channel block, grouped B/C;
  * the JAX binding (jaxmamba.ops.triton_dispatch, its "interpret" backend: the same launch plan
    as on a GPU, through jax.pure_callback) against impl="reference": custom_vjp under jit, vmap
    folded into the batch, vmap over A (one call per element), vmap of grad, bfloat16 inputs
    end to end, and per-device rows under a data mesh.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, timeout=600, env=None):
  env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             **(env or {}))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0 and "ALL OK" in proc.stdout, (
      proc.stdout[-4000:] + proc.stderr[-4000:])
  return proc.stdout


KERNEL_SCRIPT = """
  import torch
  from kernels import selective_scan_triton as K
  from third_party.mamba_oracle import load
  ref, _ = load()

  def case(batch, dim, L, N, groups=0, D=True, z=True, bias=True, softplus=True, dlast=True,
           chunk=16, block_d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    bc = (batch, groups, N, L) if groups else (batch, N, L)
    ins = [r(batch, dim, L), 0.5 * r(batch, dim, L), -torch.rand(dim, N, generator=g) * 2 - 0.1,
           r(*bc), r(*bc), r(dim) if D else None, r(batch, dim, L) if z else None,
           0.5 * r(dim) if bias else None]
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in ins]
    y_ref, last_ref = ref(*leaves, delta_softplus=softplus, return_last_state=True)
    dout, dl = r(*y_ref.shape), (r(*last_ref.shape) if dlast else None)
    ((y_ref * dout).sum() + ((last_ref * dl).sum() if dlast else 0)).backward()
    y, last, H = K.forward(*ins, delta_softplus=softplus, block_d=block_d, chunk=chunk)
    assert H.shape == (batch, -(-L // chunk), dim, N), H.shape   # chunk states only
    grads = K.backward(dout, dl, H, *ins, delta_softplus=softplus, block_d=block_d, chunk=chunk)
    pairs = [("y", y, y_ref), ("last", last, last_ref)]
    for name, got, x in zip("u delta A B C D z delta_bias".split(), grads, leaves):
      assert (got is None) == (x is None), name
      if x is not None:
        assert got.shape == x.shape and got.dtype == x.dtype, name
        pairs.append(("d" + name, got, x.grad))
    for name, got, want in pairs:
      err = ((got - want).abs().max() / (want.abs().max() + 1e-6)).item()
      assert err < 2e-5, (batch, dim, L, N, groups, name, err)
    print("ok", batch, dim, L, N, groups)

  case(2, 6, 37, 4)                                  # prime L, 3 chunks, dim % block != 0
  case(1, 5, 1, 3, D=False, z=False, bias=False, softplus=False, dlast=False)   # L = 1
  case(2, 8, 32, 3, groups=2, block_d=8, z=False, softplus=False)   # grouped, blocks of 4; L%16=0
  print("ALL OK")
"""

# Shared by the binding scripts: the interpret backend, their inputs and their comparison.
BINDING_PRELUDE = """
  import jax, jax.numpy as jnp
  from jaxmamba.ops import triton_dispatch as td
  td._BACKEND, td.BLOCK_D, td.CHUNK = "interpret", 2, 16     # 2 chunks, 2 channel blocks

  def make_args(seed, b, d=3, L=20, N=2):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    n = jax.random.normal
    return (n(ks[0], (b, d, L)), 0.5 * n(ks[1], (b, d, L)), -jnp.exp(n(ks[2], (d, N))),
            n(ks[3], (b, N, L)), n(ks[4], (b, N, L)), n(ks[5], (d,)), n(ks[6], (b, d, L)),
            0.3 * n(ks[7], (d,)))

  def close(got, want, what, tol=2e-5):
    err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-6))
    assert err < tol, (what, err)
"""

JAX_SCRIPT = BINDING_PRELUDE + """
  args = make_args(1, b=2)
  w = jnp.cos(jnp.arange(args[0].shape[-1]))   # a weight over time for the loss

  def loss(fn):
    def f(*a):
      y, last = fn(*a, delta_softplus=True)
      return jnp.sum(y * w) + jnp.sum(last ** 2)
    return f

  got = jax.jit(jax.value_and_grad(loss(td.selective_scan), argnums=tuple(range(8))))(*args)
  want = jax.value_and_grad(loss(td._reference), argnums=tuple(range(8)))(*args)
  close(got[0], want[0], "value")
  for name, g, r in zip("u delta A B C D z bias".split(), got[1], want[1]):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    close(g, r, "d" + name)
  print("jit value_and_grad ok")

  u, delta, A, B, C, D, z, bias = args
  us, As = jnp.stack([u, -0.5 * u]), jnp.stack([A, 2.0 * A])
  f = lambda uu, AA, fn: fn(uu, delta, AA, B, C, D, z, bias, delta_softplus=True)[0]
  tri = lambda uu, AA: f(uu, AA, td.selective_scan)
  ref = lambda uu, AA: f(uu, AA, td._reference)
  close(jax.vmap(tri, (0, None))(us, A), jax.vmap(ref, (0, None))(us, A), "vmap u (folded)")
  close(jax.vmap(tri, (None, 0))(u, As), jax.vmap(ref, (None, 0))(u, As), "vmap A (map)")
  sq = lambda fn: jax.grad(lambda uu, AA: jnp.sum(fn(uu, AA) ** 2), argnums=(0, 1))
  for g, r, name in zip(jax.vmap(sq(tri), (0, None))(us, A), jax.vmap(sq(ref), (0, None))(us, A),
                        ("du", "dA")):
    close(g, r, "vmap grad " + name)
  print("vmap ok")
  print("ALL OK")
"""


SHARDED_SCRIPT = BINDING_PRELUDE + """
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert len(jax.devices()) == 4

  # Record the batch each kernel launch sees (shapes are static: recorded while tracing).
  seen = []
  for name in ("_triton_forward", "_triton_backward"):
    orig = getattr(td, name)
    def spy(*a, _orig=orig, _name=name):
      seen.append((_name, a[0].shape[0]))
      return _orig(*a)
    setattr(td, name, spy)

  b = 8
  args = make_args(2, b)

  def loss(fn):
    def f(*a):
      y, last = fn(*a, delta_softplus=True)
      return jnp.sum(jnp.sin(y)) + jnp.sum(last ** 2)
    return f

  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data"))
  shared = NamedSharding(mesh, P())
  placed = [jax.device_put(a, rows if a.ndim == 3 else shared) for a in args]
  step = jax.jit(jax.value_and_grad(loss(td.selective_scan), argnums=tuple(range(8))))
  with jax.set_mesh(mesh):
    got = step(*placed)
  assert seen and all(rows_seen == b // 4 for _, rows_seen in seen), seen  # per-device rows
  assert {k for k, _ in seen} == {"_triton_forward", "_triton_backward"}, seen
  want = jax.value_and_grad(loss(td._reference), argnums=tuple(range(8)))(*args)
  close(got[0], want[0], "value")
  for name, g, r in zip("u delta A B C D z bias".split(), got[1], want[1]):
    close(g, r, "d" + name)       # A, D, bias: summed over the 4 devices' rows
  assert got[1][0].sharding.spec == P("data"), got[1][0].sharding

  seen.clear()                      # outside a mesh: one call on the whole batch
  jax.jit(loss(td.selective_scan))(*args)
  assert [r for _, r in seen] == [b], seen
  print("ALL OK")
"""


BF16_SCRIPT = BINDING_PRELUDE + """
  import numpy as np
  from kernels import launch_plan
  # Record the dtypes the torch launches receive: bfloat16 must reach the kernels as bfloat16.
  seen = []
  orig = launch_plan.run_torch
  def spy(plan, arrays):
    seen.append({k: str(v.dtype) for k, v in arrays.items()})
    return orig(plan, arrays)
  launch_plan.run_torch = spy

  bf = jnp.bfloat16
  u, delta, A, B, C, D, z, bias = make_args(3, b=2, d=5, L=37, N=3)
  # Mamba's mixed precision: activations and B/C in bfloat16, A, D and delta_bias in float32.
  args = (u.astype(bf), delta.astype(bf), A, B.astype(bf), C.astype(bf), D, z.astype(bf), bias)
  as32 = [a.astype(jnp.float32) for a in args]
  w = jnp.cos(jnp.arange(u.shape[-1]))

  def loss(fn, *a):
    y, last = fn(*a, delta_softplus=True)
    return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(last ** 2), (y, last)

  grad = lambda fn: jax.grad(lambda *a: loss(fn, *a), argnums=tuple(range(8)), has_aux=True)
  got_g, (got_y, got_last) = jax.jit(grad(td.selective_scan))(*args)
  want_g, (want_y, want_last) = grad(td._reference)(*as32)   # float32 on the same values
  assert got_y.dtype == bf and got_last.dtype == jnp.float32, (got_y.dtype, got_last.dtype)
  assert seen and all(s["u"] == "torch.bfloat16" and s["B"] == "torch.bfloat16"
                      and s["A"] == "torch.float32" for s in seen), seen
  assert any(s.get("dy") == "torch.bfloat16" for s in seen), seen   # the backward too

  # mamba_ssm's bfloat16 tolerances (tests/ops/test_selective_scan.py): rtol 3e-2, atol 5e-2,
  # doubled for du.
  def allclose(got, want, name, scale=1):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ok = np.allclose(got, want, rtol=3e-2 * scale, atol=5e-2 * scale)
    assert ok, (name, float(np.max(np.abs(got - want))), float(np.max(np.abs(want))))
  allclose(got_y, want_y, "y")
  allclose(got_last, want_last, "last")
  for name, g, r, a in zip("u delta A B C D z bias".split(), got_g, want_g, args):
    assert g.dtype == a.dtype and g.shape == a.shape, (name, g.dtype, a.dtype)
    allclose(g, r, "d" + name, 2 if name == "u" else 1)
  print("ALL OK")
"""


@pytest.mark.slow
def test_jax_binding_runs_bfloat16_through_the_kernels():
  """bfloat16 inputs reach the kernels as bfloat16 (cast inside, as on a GPU); y and every
  gradient come back in the inputs' dtypes and match the float32 reference at mamba_ssm's bf16
  tolerances."""
  _run(BF16_SCRIPT)


@pytest.mark.slow
def test_jax_binding_runs_per_device_rows_under_a_data_mesh():
  """With the trainer's context mesh, each (fake) device launches the kernels on its own rows
  (no gather of the batch), and values and every gradient still match impl="reference"."""
  _run(SHARDED_SCRIPT, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})


@pytest.mark.slow
def test_kernels_match_mamba_ssm_under_interpreter():
  _run(KERNEL_SCRIPT)


@pytest.mark.slow
def test_jax_binding_matches_reference_under_interpreter():
  _run(JAX_SCRIPT)


def test_supports_rejects_what_the_kernels_cannot_run():
  from jaxmamba.ops import triton_dispatch as td  # noqa: PLC0415
  u = jnp.zeros((2, 8, 5))
  A, BC = jnp.zeros((8, 4)), jnp.zeros((2, 4, 5))
  assert td.supports(u, u, A, BC, BC)
  assert td.supports(u.astype(jnp.bfloat16), u, A, BC.astype(jnp.bfloat16), BC)
  assert td.supports(u, u, A, jnp.zeros((2, 2, 4, 5)), jnp.zeros((2, 2, 4, 5)))  # grouped
  big_A = jnp.zeros((8, td.MAX_STATE + 1))
  big_BC = jnp.zeros((2, td.MAX_STATE + 1, 5))
  assert not td.supports(u, u, big_A, big_BC, big_BC)
  assert not td.supports(u, u, A, BC[:, :, :3], BC)             # bad shapes: False, no raise
  with pytest.raises(ValueError, match="unsupported call"):
    td.selective_scan(u, u, big_A, big_BC, big_BC)
  if jax.default_backend() == "cpu":
    assert td.available() is False
