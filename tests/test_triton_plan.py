"""The launch plan (kernels/launch_plan.py) against the kernels' own signatures: every launch
passes each kernel parameter exactly once, in order (arrays where the kernel takes pointers,
the right scalars, outputs last), sets exactly the kernel's constexprs, and every array it reads
exists by then.  Both executors (torch/interpreter, jax_triton) only walk this plan."""
import inspect

import pytest

from kernels import launch_plan as LP
from kernels import selective_scan_triton as K

# Plan names whose kernel parameter is named otherwise (the rest: name + "_ptr").
PARAM_OF = {"delta_bias": "bias_ptr", "dy": "dout_ptr", "Gloc": "G_ptr"}
SCALARS = ("L", "dim", "nchunks", "groups", "width")


def _specs(b=2, d=12, L=37, N=4, groups=0, dtype="bfloat16", optional=True):
  bc = (b, groups, N, L) if groups else (b, N, L)
  row = ((b, d, L), dtype)
  return dict(u=row, delta=row, A=((d, N), "float32"), B=(bc, dtype), C=(bc, dtype),
              D=((d,), "float32") if optional else None, z=row if optional else None,
              delta_bias=((d,), "float32") if optional else None)


def _params(kernel):
  """(runtime parameter names, constexpr names) of a @triton.jit kernel."""
  sig = inspect.signature(kernel.fn)
  const = [p.name for p in sig.parameters.values() if "constexpr" in str(p.annotation)]
  return [n for n in sig.parameters if n not in const], const


def _check(plan, length, dim, nc, groups):
  known = set(plan.inputs) | set(plan.zeros)
  scalar_values = {"L": length, "dim": dim, "nchunks": nc, "groups": groups}
  for launch in plan.launches:
    runtime, const = _params(getattr(K, launch.kernel))
    passed = list(launch.args) + [o.name for o in launch.outputs]
    assert len(passed) == len(runtime), (launch.kernel, passed, runtime)
    for arg, param in zip(passed, runtime):
      if isinstance(arg, int):
        assert param in SCALARS, (launch.kernel, param, arg)
        if param in scalar_values:
          assert arg == scalar_values[param], (launch.kernel, param, arg)
        continue
      assert param.endswith("_ptr"), (launch.kernel, param, arg)
      if launch.kernel != "_chain_chunks" and arg != "dummy":   # the chain is generic
        assert PARAM_OF.get(arg, arg + "_ptr") == param, (launch.kernel, param, arg)
    for arg in launch.args:
      assert not isinstance(arg, str) or arg in known, (launch.kernel, arg, "read before made")
    known |= {o.name for o in launch.outputs}
    assert sorted(dict(launch.constexprs)) == sorted(const), (launch.kernel, const)
  assert all(r is None or r in known for r in plan.results)


@pytest.mark.parametrize("kw", [dict(), dict(groups=3), dict(optional=False, L=1),
                                dict(dtype="float32", L=256)])
def test_plans_match_the_kernel_signatures(kw):
  specs = _specs(**kw)
  b, d, L = specs["u"][0]
  groups = specs["B"][0][1] if len(specs["B"][0]) == 4 else 1
  for make in (LP.forward_plan, LP.backward_plan):
    plan = make(specs, softplus=True, block_d=4, chunk=16)
    _, _, nc, _ = LP.tiles(d, L, groups, 4, 16)
    _check(plan, L, d, nc, groups)


def test_plan_outputs_carry_the_inputs_dtypes_and_zero_only_the_atomics():
  fwd = LP.forward_plan(_specs(), softplus=True)
  y, last, H = fwd.result_outputs()
  assert (y.shape, y.dtype) == ((2, 12, 37), "bfloat16")
  assert (last.shape, last.dtype) == ((2, 12, 4), "float32")
  assert H.shape == (2, 1, 12, 4) and H.dtype == "float32"       # one chunk of 64 holds L=37
  bwd = LP.backward_plan(_specs(), softplus=True)
  outs = bwd.result_outputs()
  assert [o.dtype for o in outs[:3]] == ["bfloat16"] * 3             # du, ddelta, dz
  zeroed = [o.name for launch in bwd.launches + fwd.launches for o in launch.outputs if o.zeroed]
  assert zeroed == ["dB", "dC"]                                      # atomic_add targets only
  bare = LP.backward_plan(_specs(optional=False), softplus=False)
  assert bare.results[2] is None and bare.results[6:] == (None, None)


def test_plan_refuses_a_dtype_the_kernels_do_not_take():
  specs = _specs()
  specs["u"] = (specs["u"][0], "float64")
  with pytest.raises(ValueError, match="float64"):
    LP.forward_plan(specs, softplus=True)
