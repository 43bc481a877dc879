"""What jax_triton put into a lowered program, decoded, and what the launch plan says it should be.

Each Triton launch lowers to a `stablehlo.custom_call @triton_kernel_call` whose backend_config
is a zlib-compressed `TritonAnyKernelCall` protobuf (jaxlib/gpu/triton.proto): the kernel's name,
num_warps and PTX, the grid, and one parameter per kernel argument -- an array (with the bytes
the launcher zeroes first) or a scalar.  jax_triton drops integer scalars equal to 1 (it
specialises on them).  `decode(mlir_text)` reads every such call (operand and result types, output
aliases included); `expected(plan)` gives the same records from a kernels.launch_plan.Plan, so a
test can compare the two field by field on a CPU-only machine (tests/test_triton_lowering.py).
"""
from __future__ import annotations

import math
import re
import zlib

MLIR_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------------
# Protobuf wire format (only what triton.proto uses: varints and length-delimited fields).


def _varint(buf, i):
  value = shift = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, i


def _fields(buf):
  """[(field number, value)]: ints for varints, bytes for length-delimited fields."""
  out, i = [], 0
  while i < len(buf):
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 2:
      size, i = _varint(buf, i)
      value, i = bytes(buf[i:i + size]), i + size
    else:
      raise ValueError(f"unexpected protobuf wire type {wire} (field {number})")
    out.append((number, value))
  return out


def _one(fields, number, default=0):
  values = [v for n, v in fields if n == number]
  return values[0] if values else default


def _signed(value, bits):
  return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _parameter(buf):
  """('array', bytes zeroed first) or ('int', value)."""
  (number, value), = _fields(buf)      # a oneof: exactly one field
  if number == 1:
    return ("array", _one(_fields(value), 1))
  if number in (3, 5):                  # i32, i64
    return ("int", _signed(value, 32 if number == 3 else 64))
  if number in (4, 6, 2):               # u32, u64, bool
    return ("int", value)
  raise ValueError(f"unknown TritonKernelCall.Parameter field {number}")


def decode_backend_config(raw):
  """A triton_kernel_call's backend_config -> {kernel, num_warps, compute_capability, grid,
  params}."""
  top = _fields(zlib.decompress(raw))
  call = _one(top, 1, None)
  if call is None:
    raise ValueError("not a plain TritonKernelCall (autotuned calls are not used here)")
  call = _fields(call)
  kernel = _fields(_one(call, 1))
  return dict(kernel=_one(kernel, 1).decode(), num_warps=_one(kernel, 2),
              compute_capability=_one(kernel, 6),
              grid=(_one(call, 2), _one(call, 3), _one(call, 4)),
              params=[_parameter(v) for n, v in call if n == 5])


# ------------------------------------------------------------------------------------------------
# The lowered module.

_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")


def _tensor_type(text):
  m = _TENSOR.fullmatch(str(text))
  if not m:
    raise ValueError(f"not a ranked tensor type: {text}")
  return tuple(int(d) for d in m.group(1).split("x") if d), m.group(2)


def decode(mlir_text):
  """Every triton_kernel_call of a lowered module, in program order, as dicts: the decoded
  backend_config plus operands/results ((shape, element type)) and aliases (str or None)."""
  from jax._src.interpreters import mlir  # noqa: PLC0415
  from jax._src.lib.mlir import ir  # noqa: PLC0415

  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          attrs = inner.operation.attributes
          if (inner.operation.name == "stablehlo.custom_call"
              and ir.StringAttr(attrs["call_target_name"]).value == "triton_kernel_call"):
            record = decode_backend_config(ir.StringAttr(attrs["backend_config"]).value_bytes)
            record["operands"] = [_tensor_type(v.type) for v in inner.operation.operands]
            record["results"] = [_tensor_type(r.type) for r in inner.operation.results]
            record["aliases"] = (str(attrs["output_operand_aliases"])
                                 if "output_operand_aliases" in attrs else None)
            calls.append(record)
          walk(inner.operation)

  with mlir.make_ir_context():
    walk(ir.Module.parse(mlir_text).operation)
  return calls


def expected(plan, compute_capability):
  """The records `decode` should find for a launch plan, launch by launch."""
  types = {name: (spec.shape, spec.dtype) for name, spec in {**plan.inputs, **plan.zeros}.items()}
  records = []
  for launch in plan.launches:
    operands, params = [], []
    for arg in launch.args:
      if isinstance(arg, str):
        shape, dtype = types[arg]
        operands.append((tuple(shape), MLIR_DTYPES[dtype]))
        params.append(("array", 0))
      elif arg != 1:                       # jax_triton specialises scalars equal to 1
        params.append(("int", arg))
    for out in launch.outputs:
      types[out.name] = (out.shape, out.dtype)
      zeroed = math.prod(out.shape) * ITEMSIZE[out.dtype] if out.zeroed else 0
      params.append(("array", zeroed))
    records.append(dict(
        kernel=launch.kernel, num_warps=launch.num_warps, compute_capability=compute_capability,
        grid=tuple(launch.grid) + (1,) * (3 - len(launch.grid)), params=params,
        operands=operands, results=[(tuple(o.shape), MLIR_DTYPES[o.dtype])
                                    for o in launch.outputs],
        aliases=None))
  return records


def mismatches(got, want):
  """Human-readable differences between decoded and expected records ([] when they agree)."""
  problems = []
  if len(got) != len(want):
    problems.append(f"{len(got)} triton_kernel_calls lowered, the plan has {len(want)}: "
                    f"{[g['kernel'] for g in got]} vs {[w['kernel'] for w in want]}")
  for i, (g, w) in enumerate(zip(got, want)):
    for key in w:
      if g.get(key) != w[key]:
        problems.append(f"call {i} ({w['kernel']}) {key}: lowered {g.get(key)}, plan {w[key]}")
  return problems
