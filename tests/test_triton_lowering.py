"""The JAX binding lowers for CUDA on a CPU-only machine: jax_triton compiles every Triton kernel
(forward, backward, float32 and bfloat16, grouped B/C) to PTX for sm_90 through
`jax.export(..., platforms=["cuda"])`.  This catches codegen errors the interpreter misses.

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
  from jaxmamba.ops import triton_dispatch as td
  td._COMPUTE_CAPABILITY = 90

  def export(fn, *args):
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")])(*args)
    text = exp.mlir_module()
    return text.count("custom_call @triton_kernel_call")

  def inputs(b, d, L, N, dtype, groups=0):
    bc = (b, groups, N, L) if groups else (b, N, L)
    s = jax.ShapeDtypeStruct
    return (s((b, d, L), dtype), s((b, d, L), dtype), s((d, N), jnp.float32), s(bc, dtype),
            s(bc, dtype), s((d,), jnp.float32), s((b, d, L), dtype), s((d,), jnp.float32))

  def loss(*a):
    y, last = td.selective_scan(*a, delta_softplus=True)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(last)

  # value_and_grad: with grad alone XLA rightly drops the forward's y kernel.
  grad_all = jax.value_and_grad(loss, argnums=tuple(range(8)))
  for dtype, length in ((jnp.float32, 256), (jnp.bfloat16, 300)):   # ALIGNED and not
    n = export(grad_all, *inputs(2, 40, length, 16, dtype))
    assert n == 6, n          # 3 forward + 3 backward kernels
    print("lowered fwd+bwd", jnp.dtype(dtype).name, n)
  # Grouped B/C (channel blocks of 4 inside groups of 4), L = 1, no optional inputs.
  bare = lambda u, dl, A, B, C: jnp.sum(td.selective_scan(u, dl, A, B, C)[0])
  n = export(jax.value_and_grad(bare, argnums=(0, 1, 2, 3, 4)),
             *inputs(1, 12, 1, 4, jnp.float32, groups=3)[:5])
  assert n == 6, n
  print("lowered grouped, bare", n)
  print("LOWERING OK")
""")


@pytest.mark.slow
def test_lowers_for_cuda_without_a_gpu():
  if not (PLUGIN_DIR / "jax_cuda13_plugin").is_dir():
    pytest.skip(f"no jax-cuda13-plugin in {PLUGIN_DIR} (see the module docstring)")
  if importlib.util.find_spec("jax_triton") is None:
    pytest.skip("jax-triton is not installed")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGIN_DIR),
                                         os.environ.get("PYTHONPATH", "")]))
  env.pop("TRITON_INTERPRET", None)  # compile for real
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0 and "LOWERING OK" in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-5000:])
