"""ptxas's own report for the Triton kernels at the default launch configuration, on sm_80 and
sm_90, compiled on this CPU-only machine (kernels/resources.py): nothing may spill to local
memory, and every kernel must fit at least one block per SM."""
import pytest

from kernels import launch_plan as LP
from kernels import resources


def test_parse_ptxas_reads_registers_and_spills():
  text = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    16 bytes stack frame, 24 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers"""
  got = resources.parse_ptxas(text, "_k", 90, 512)
  assert got == dict(kernel="_k", arch=90, registers=255, spill_stores=24, spill_loads=8,
                     stack=16, shared=512)
  usage = resources.Usage(config=(16, 64, 4), **got)
  assert usage.warps_per_sm == 8          # 255 regs -> 256 x 32 per warp: 2 blocks of 4 warps
  with pytest.raises(ValueError, match="registers"):
    resources.parse_ptxas("nothing", "_k", 90, 0)


@pytest.mark.parametrize("arch", [80, 90])
def test_default_configuration_does_not_spill(arch):
  rows = resources.report([LP.DEFAULT_CONFIG], [arch], log=lambda s: None)
  kernels = {r.kernel for r in rows}
  assert kernels == {"_fwd_chunk_summary", "_chain_chunks", "_fwd_output",
                     "_bwd_chunk_summary", "_bwd_grads"}, kernels
  spilled = [(r.kernel, r.spill_stores, r.spill_loads) for r in rows
             if r.spill_stores or r.spill_loads]
  assert not spilled, f"sm_{arch}: spills at {LP.DEFAULT_CONFIG}: {spilled}"
  assert all(r.warps_per_sm >= r.config[2] for r in rows), [r.warps_per_sm for r in rows]
