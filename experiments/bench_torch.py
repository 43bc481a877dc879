"""The PyTorch side of `python -m experiments.bench_train --compare_torch`: the models of
`third_party/torch_models` (the authors' modules, mamba_ssm's Mamba on its CPU path) timed with
the harness our train step uses (pooled Dice loss + Adam, BatchNorm over the whole batch), and
the convolution micro-benchmark.  Needs the test dependencies (`bash .ci/setup --test`).
"""
from __future__ import annotations

import functools
import multiprocessing
import time
import traceback

import numpy as np

DIMS = ("NHWC", "HWIO", "NHWC")


def interleaved_medians(fns: dict, steps: int) -> dict:
  """Median seconds of each callable in `fns`, timed in turn: one call of each (warm-up:
  allocator, oneDNN primitive caches, XLA's compilation), then `steps` rounds that call each once.
  A callable that returns a float returns its own seconds (a `Worker` timing itself).

  Taking turns, call by call, lets both frameworks see the same machine: on a shared machine
  the speed drifts by 20-30% within minutes, which would otherwise land on whichever side ran
  during the slow minutes."""
  for fn in fns.values():
    fn()
  times = {key: [] for key in fns}
  for _ in range(steps):
    for key, fn in fns.items():
      t0 = time.perf_counter()
      own = fn()
      times[key].append(own if isinstance(own, float) else time.perf_counter() - t0)
  return {key: float(np.median(t)) for key, t in times.items()}


def _serve(conn, side: str, name: str, batch_size: int, image_size: int, threads: int,
           native_conv: bool):
  """A Worker's process: builds one side's step callables, then runs and times each asked for."""
  try:
    if side == "torch":
      import torch
      torch.set_num_threads(threads)
      fns = step_fns(name, batch_size, image_size)
    else:
      from experiments import bench_ours
      from jaxmamba.nn import conv
      conv.ENABLED = not native_conv
      _, fns = bench_ours.step_fns(
          bench_ours.authors_harness(name, "float32", batch_size, image_size))
    conn.send(("ready", None))
    while (kind := conn.recv()) is not None:
      t0 = time.perf_counter()
      fns[kind]()
      conn.send(("seconds", time.perf_counter() - t0))
  except Exception:                      # reported by the parent, with the worker's traceback
    conn.send(("error", traceback.format_exc()))


class Worker:
  """One side of the comparison ("torch" or "ours") for one model, in a process of its own.

  Each framework keeps its own heap: in one process, PyTorch's cached tensors fragment the
  memory XLA maps afresh every step, and the kernel's compaction of huge pages then stalls our
  steps (hundreds of ms of system time on alternate steps, measured), which no user running one
  framework sees.  Calling the worker with "train" or "eval" runs that step there and returns
  its seconds.  `native_conv`: ours with XLA's own convolutions (jaxmamba.nn.conv.ENABLED off)."""

  def __init__(self, side: str, name: str, batch_size: int, image_size: int, threads: int,
               native_conv: bool = False):
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked XLA threads
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_serve, daemon=True,
                             args=(child, side, name, batch_size, image_size, threads,
                                   native_conv))
    self._proc.start()
    self._what = f"{side} {name}"
    self._receive("ready")

  def _receive(self, expected: str):
    try:
      tag, value = self._conn.recv()
    except EOFError:
      raise RuntimeError(f"the {self._what} worker died (exit code {self._proc.exitcode})")
    if tag == "error":
      raise RuntimeError(f"the {self._what} worker failed:\n{value}")
    assert tag == expected, (tag, expected)
    return value

  def __call__(self, kind: str) -> float:
    self._conn.send(kind)
    return self._receive("seconds")

  def close(self):
    if self._proc.is_alive():
      self._conn.send(None)
      self._proc.join(60)
    if self._proc.is_alive():
      self._proc.kill()


def build(name: str):
  """The PyTorch model of our registry name `name`, and its logits function."""
  from jaxmamba.models import registry
  if name == "unet":
    from third_party.torch_models import unet
    model = unet.UNet()
  elif name in ("resnet18_seg", "resnet50_seg"):
    from third_party.torch_models import resnet_seg
    model = resnet_seg.ResNetSeg(int(name[6:8]))
  elif name == "segformer":
    from third_party.torch_models import segformer
    model = segformer.SegFormer()
    return model, model.forward_full       # ours also returns input-size logits
  elif name in ("umambabot", "umambabot_pp"):
    from third_party.torch_models import umamba
    model = umamba.UMambaBot(pyramid_pooling=name == "umambabot_pp")
  elif name.startswith("ulvmunet"):
    from third_party.torch_models import ultralight
    model = ultralight.build(registry.entry(name).fixed_kwargs["variant"])
    return model, model.forward_logits
  else:
    raise ValueError(f"no PyTorch model for {name!r}")
  return model, model


def step_fns(name: str, batch_size: int, image_size: int) -> dict:
  """PyTorch train-step and eval callables of `name` (float32, NCHW, random data), keyed
  "train" and "eval"; each sets the model's mode itself, so the two can take turns."""
  import torch
  model, logits_fn = build(name)
  x = torch.rand(batch_size, 3, image_size, image_size)
  with torch.no_grad():
    shape = logits_fn(x[:1]).shape[1:]
  y = (torch.rand((batch_size,) + tuple(shape)) > 0.7).float()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    p = torch.sigmoid(logits_fn(x))
    loss = 1 - (2 * (p * y).sum() + 100.0) / (p.sum() + y.sum() + 100.0)   # pooled Dice
    loss.backward()
    opt.step()

  def eval_step():
    model.eval()
    with torch.no_grad():
      logits_fn(x)

  return {"train": train_step, "eval": eval_step}


def _ours(x, w, k, stride, pad, transpose, fast):
  """Our convolution as the models compute it (jaxmamba.nn.conv on a CPU unless switched off)."""
  import jax

  from jaxmamba.nn import conv as fast_conv
  if transpose and fast and k == stride and pad == 0:
    return fast_conv.conv_transpose_nonoverlapping(x, w)
  if transpose and fast:
    return fast_conv.conv_transpose_phases(x, w, stride, pad)
  if transpose:
    return jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), [(k - 1 - pad,) * 2] * 2,
                                        lhs_dilation=(stride, stride), dimension_numbers=DIMS)
  if fast:   # fast_conv.Conv's path: the input padded by the forward pass, the cotangent stored
    return fast_conv.materialize_cotangent(fast_conv.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=DIMS))
  return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                      dimension_numbers=DIMS)


def conv_micro(batch_size: int, image_size: int, steps: int) -> list[tuple[str, float, float]]:
  """(what, PyTorch ms, ours ms) for forward + backward of the convolutions that dominate the
  CNNs: a 3x3 conv 64->64 at full size, the U-Nets' 2x2 stride-2 ConvTranspose 128->64 and
  ResNet-Seg's 4x4 stride-2 padding-1 one 128->64 at 1/8 size (ours as the models compute them:
  jaxmamba.nn.conv, or XLA's if that is switched off)."""
  import jax
  import jax.numpy as jnp
  import torch

  from jaxmamba.nn import conv as fast_conv
  rows = []
  s = image_size
  # (label, input size, in, out, kernel, stride, padding, transposed)
  cases = [(f"conv 3x3 64->64, {batch_size}x{s}x{s}", s, 64, 64, 3, 1, 1, False),
           (f"ConvTranspose 2x2/2 128->64, {batch_size}x{s // 2}x{s // 2}", s // 2, 128, 64,
            2, 2, 0, True),
           (f"ConvTranspose 4x4/2 pad 1 128->64, {batch_size}x{s // 8}x{s // 8}", s // 8, 128,
            64, 4, 2, 1, True)]
  fast = fast_conv.use_fast_cpu_path()
  for what, size, cin, cout, k, stride, pad, transpose in cases:
    xt = torch.randn(batch_size, cin, size, size, requires_grad=True)
    layer = (torch.nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=pad) if transpose
             else torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad))

    def torch_step():
      layer(xt).square().sum().backward()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch_size, size, size, cin)),
                    jnp.float32)
    w = jnp.zeros((k, k, cin, cout), jnp.float32) + 0.01
    f = functools.partial(_ours, k=k, stride=stride, pad=pad, transpose=transpose, fast=fast)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.square(f(a, b))), argnums=(0, 1)))
    t = interleaved_medians({"torch": torch_step,
                             "ours": lambda: jax.block_until_ready(grad(x, w))}, steps)
    rows.append((what + ", fwd+bwd", t["torch"] * 1e3, t["ours"] * 1e3))
  return rows
