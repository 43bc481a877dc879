"""BatchNorm statistics per chunk of the batch, as the authors' `nn.DataParallel` computed them.

The paper's models were trained under `nn.DataParallel` on 4 GPUs (spec models-conv-umamba.md
§9.4): the batch is cut with `torch.chunk` into pieces of ceil(B/4) rows, each GPU replica runs
its piece, so a BatchNorm layer normalises with that piece's statistics (16 rows for batch 64, 4
for SegFormer's 16) rather than the whole batch's; the loss is taken on the gathered outputs, and
only the first replica's running-statistics update survives (replica 0 shares its buffers with the
wrapped module; the others are thrown away after the forward pass).

`apply_in_chunks` reproduces exactly that inside one jitted step: equal chunks go through one
`vmap` (one traced model, so compile time does not grow with the chunk count), a smaller last
chunk (when B is not a multiple of ceil(B/4)) through one more call.  Models without BatchNorm
are unaffected by chunking, and the trainer does not chunk them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def chunk_sizes(batch: int, num_chunks: int) -> list[int]:
  """Row counts of `torch.chunk(x, num_chunks)` for `batch` rows (fewer chunks when B is small)."""
  if num_chunks < 1:
    raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
  size = math.ceil(batch / num_chunks)
  full, rest = divmod(batch, size)
  return [size] * full + ([rest] if rest else [])


def apply_in_chunks(model, variables: dict, images, num_chunks: int, **kwargs):
  """`model.apply(variables, images, train=True, mutable=["batch_stats"])`, with BatchNorm
  statistics per `torch.chunk` piece of the batch; returns (outputs, updates of chunk 0)."""
  def run(x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)

  sizes = chunk_sizes(images.shape[0], num_chunks)
  if len(sizes) == 1:
    return run(images)
  size, full = sizes[0], sizes.count(sizes[0])
  head = images[:size * full].reshape((full, size) + images.shape[1:])
  out, updates = jax.vmap(run)(head)
  out = out.reshape((size * full,) + out.shape[2:])
  if full < len(sizes):
    tail, _ = run(images[size * full:])   # the last replica's statistics are discarded
    out = jnp.concatenate([out, tail], axis=0)
  return out, jax.tree.map(lambda u: u[0], updates)
