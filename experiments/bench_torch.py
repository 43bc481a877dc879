"""The PyTorch side of `python -m experiments.bench_train --compare_torch`: the models of
`third_party/torch_models` (the authors' modules, mamba_ssm's Mamba on its CPU path) timed with
the harness our train step uses (pooled Dice loss + Adam, BatchNorm over the whole batch), and
the convolution micro-benchmark.  Needs the test dependencies (`bash .ci/setup --test`).
"""
from __future__ import annotations

import time

import numpy as np

DIMS = ("NHWC", "HWIO", "NHWC")


def _median_s(fn, steps: int) -> float:
  fn()                                  # warm-up (allocator, oneDNN primitive caches)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


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


def rates(name: str, batch_size: int, image_size: int, steps: int) -> dict:
  """PyTorch train-step and eval images/s of `name` (float32, NCHW, random data)."""
  import torch
  model, logits_fn = build(name)
  x = torch.rand(batch_size, 3, image_size, image_size)
  with torch.no_grad():
    shape = logits_fn(x[:1]).shape[1:]
  y = (torch.rand((batch_size,) + tuple(shape)) > 0.7).float()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)

  def train_step():
    opt.zero_grad(set_to_none=True)
    p = torch.sigmoid(logits_fn(x))
    loss = 1 - (2 * (p * y).sum() + 100.0) / (p.sum() + y.sum() + 100.0)   # pooled Dice
    loss.backward()
    opt.step()

  def eval_step():
    with torch.no_grad():
      logits_fn(x)

  model.train()
  train_s = _median_s(train_step, steps)
  model.eval()
  eval_s = _median_s(eval_step, steps)
  return {"train": batch_size / train_s, "eval": batch_size / eval_s}


def conv_micro(batch_size: int, image_size: int, steps: int) -> list[tuple[str, float, float]]:
  """(what, PyTorch ms, ours ms) for forward + backward of the two convolutions that dominate
  the U-Nets: a 3x3 conv 64->64 at full size (ours: XLA's) and a 2x2 stride-2 ConvTranspose
  128->64 (ours as the models compute it: jaxmamba.nn.conv, or XLA's if that is switched off)."""
  import jax
  import jax.numpy as jnp
  import torch

  from jaxmamba.nn import conv as fast_conv
  rows = []
  s = image_size
  cases = [(f"conv 3x3 64->64, {batch_size}x{s}x{s}, fwd+bwd", s, 64, 64, False),
           (f"ConvTranspose 2x2/2 128->64, {batch_size}x{s // 2}x{s // 2}, fwd+bwd",
            s // 2, 128, 64, True)]
  for what, size, cin, cout, transpose in cases:
    xt = torch.randn(batch_size, cin, size, size, requires_grad=True)
    layer = (torch.nn.ConvTranspose2d(cin, cout, 2, stride=2) if transpose
             else torch.nn.Conv2d(cin, cout, 3, padding=1))

    def torch_step():
      layer(xt).square().sum().backward()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch_size, size, size, cin)),
                    jnp.float32)
    fast = fast_conv.use_fast_cpu_path()
    if transpose:
      w = jnp.zeros((2, 2, cin, cout), jnp.float32) + 0.01
      f = (fast_conv.conv_transpose_nonoverlapping if fast else
           lambda a, b: jax.lax.conv_general_dilated(a, b[::-1, ::-1], (1, 1), [(1, 1)] * 2,
                                                     lhs_dilation=(2, 2), dimension_numbers=DIMS))
    else:
      w = jnp.zeros((3, 3, cin, cout), jnp.float32) + 0.01
      f = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), [(1, 1)] * 2,  # noqa: E731
                                                    dimension_numbers=DIMS)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.square(f(a, b))), argnums=(0, 1)))
    rows.append((what, _median_s(torch_step, steps) * 1e3,
                 _median_s(lambda: jax.block_until_ready(grad(x, w)), steps) * 1e3))
  return rows
