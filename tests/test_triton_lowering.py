"""The JAX binding lowers for CUDA on a CPU-only machine: jax_triton compiles every Triton kernel
(forward, backward, float32 and bfloat16, grouped B/C) to PTX for sm_90 through
`jax.export(..., platforms=["cuda"])`.  This catches codegen errors the interpreter misses.
Each lowered `triton_kernel_call` is then decoded (kernels/lowered_calls.py: kernel name, grid,
num_warps, every parameter in order with the bytes zeroed before the launch, operand and result
types, output aliases) and compared with the launch plan, with and without z/D/delta_bias,
grouped B/C, and under the trainer's data-parallel shard_map (per-device batch).

Needs jax-triton 0.3.1 and jax-cuda13-plugin 0.10.2 (only its Triton bindings; no GPU, no pjrt)
installed in a side directory that only this subprocess sees, so the CUDA plugin never loads in
other tests:  pip install --no-deps --target .venv/jax_cuda_lowering jax-cuda13-plugin==0.10.2
(or point JAXMAMBA_CUDA_PLUGIN_DIR at another such directory).  Skipped when either is missing.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN_DIR = pathlib.Path(os.environ.get("JAXMAMBA_CUDA_PLUGIN_DIR",
                                         ROOT / ".venv" / "jax_cuda_lowering"))

SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxmamba.ops import triton_dispatch as td
  from kernels import launch_plan, lowered_calls
  td._COMPUTE_CAPABILITY = CC = 90
  NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

  def specs(b, d, L, N, dtype, groups=0, optional=("D", "z", "delta_bias")):
    bc = (b, groups, N, L) if groups else (b, N, L)
    name = jnp.dtype(dtype).name
    full = dict(u=((b, d, L), name), delta=((b, d, L), name), A=((d, N), "float32"),
                B=(bc, name), C=(bc, name), D=((d,), "float32"), z=((b, d, L), name),
                delta_bias=((d,), "float32"))
    return {k: (v if k not in ("D", "z", "delta_bias") or k in optional else None)
            for k, v in full.items()}

  def check(what, spec, softplus=True, mesh=None, shards=1):
    present = [k for k in NAMES if spec[k] is not None]
    def sharding(shape):
      return None if mesh is None else NamedSharding(mesh, P("data") if len(shape) >= 3 else P())
    args = [jax.ShapeDtypeStruct(spec[k][0], spec[k][1], sharding=sharding(spec[k][0]))
            for k in present]

    def loss(*a):
      kw = dict(zip(present, a))
      y, last = td.selective_scan(**kw, delta_softplus=softplus)
      return jnp.sum(y.astype(jnp.float32) * 1.5) + jnp.sum(last)
    # value_and_grad: with grad alone XLA rightly drops the forward's y kernel.
    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
    exp = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")])(*args)
    got = lowered_calls.decode(exp.mlir_module())
    # Each device's plan: the batch divided over the data axis.
    local = {k: (v if v is None or k in ("A", "D", "delta_bias")
                 else ((v[0][0] // shards,) + tuple(v[0][1:]), v[1])) for k, v in spec.items()}
    cfg = (td.BLOCK_D, td.CHUNK, td.NUM_WARPS)
    want = (lowered_calls.expected(launch_plan.forward_plan(local, softplus, *cfg), CC)
            + lowered_calls.expected(launch_plan.backward_plan(local, softplus, *cfg), CC))
    problems = lowered_calls.mismatches(got, want)
    assert not problems, (what, problems)
    assert len(got) == 6 and all(g["params"] for g in got), what
    print("lowered as planned:", what, [g["kernel"] for g in got])

  check("float32, L % 16 == 0, z/D/delta_bias", specs(2, 40, 256, 16, jnp.float32))
  check("bfloat16, L = 300, z/D/delta_bias", specs(2, 40, 300, 16, jnp.bfloat16))
  # Grouped B/C (channel blocks of 4 inside groups of 4), L = 1, no optional inputs.
  check("grouped, L = 1, bare", specs(1, 12, 1, 4, jnp.float32, groups=3, optional=()),
        softplus=False)
  # The trainer's data-parallel path: shard_map over a 2-device "data" axis, 2 rows per device.
  mesh = jax.make_mesh((2,), ("data",))
  with jax.set_mesh(mesh):
    check("shard_map over data=2, bfloat16, D and delta_bias, no z",
          specs(4, 8, 32, 4, jnp.bfloat16, optional=("D", "delta_bias")), mesh=mesh, shards=2)
  print("LOWERING OK")
""")


@pytest.mark.slow
def test_lowers_for_cuda_without_a_gpu():
  if not (PLUGIN_DIR / "jax_cuda13_plugin").is_dir():
    pytest.skip(f"no jax-cuda13-plugin in {PLUGIN_DIR} (see the module docstring)")
  if importlib.util.find_spec("jax_triton") is None:
    pytest.skip("jax-triton is not installed")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",   # the shard_map case
             PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGIN_DIR),
                                         os.environ.get("PYTHONPATH", "")]))
  env.pop("TRITON_INTERPRET", None)  # compile for real
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0 and "LOWERING OK" in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-5000:])
