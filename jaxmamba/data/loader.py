"""Batches from an in-memory SliceSet: uint8 on the host, optionally sharded over devices.

Batches are uint8 so that the host only copies bytes (the slices are already decoded in memory);
`to_float` turns them into float32 on the device, inside the jitted step.
"""
from __future__ import annotations

import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba.data.slices import SliceSet


def _check_batch_size(batch_size) -> int:
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return int(batch_size)


def num_batches(slice_set: SliceSet, batch_size: int, drop_remainder: bool = True) -> int:
  """How many batches `batches` yields for these arguments."""
  batch_size = _check_batch_size(batch_size)
  whole = len(slice_set) // batch_size
  return whole if drop_remainder else math.ceil(len(slice_set) / batch_size)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
  """Slice order of one epoch: a permutation fixed by (seed, epoch), or 0..n-1."""
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def _batch_shards(sharding) -> int:
  """How many pieces the batch axis is cut into by `sharding` (the `data` axis size)."""
  spec = sharding.spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def process_rows(sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) of the global batch's rows that this process's devices hold under `sharding`.

  With one host that is the whole batch; with several, each process loads only its own rows.
  """
  global_batch = global_shape[0]
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  spans = sorted({(s[0].indices(global_batch)[:2]) for s in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  if covered != stop - start or any(b != a2 for (_, b), (a2, _) in zip(spans, spans[1:])):
    raise ValueError(f"this process's devices hold non-contiguous batch rows {spans}; order the "
                     "mesh so each process's devices are adjacent on the 'data' axis")
  return start, stop


def batches(slice_set: SliceSet, batch_size: int, shuffle: bool = True, seed: int = 0,
            epoch: int = 0, drop_remainder: bool = True,
            sharding: jax.sharding.NamedSharding | None = None) -> Iterator[dict]:
  """Yields {"image": uint8 (B,H,W,3), "mask": uint8 (B,H,W,1) in {0,1}}.

  Args:
    slice_set: the slices (in memory).
    batch_size: GLOBAL batch size (over all devices and hosts).
    shuffle: visit the slices in a permutation fixed by (seed, epoch); else in stored order.
    drop_remainder: drop the last partial batch; if False it is yielded as is (smaller).
    sharding: None -> numpy arrays.  A NamedSharding whose spec shards axis 0 (e.g.
      `NamedSharding(mesh, P("data"))`) -> global jax.Arrays laid out by it; each process reads
      only the rows its devices hold.  Every batch (the partial last one too) must then divide
      by the number of shards on the batch axis, else ValueError.
  """
  batch_size = _check_batch_size(batch_size)
  n = len(slice_set)
  order = epoch_order(n, shuffle, seed, epoch)
  count = num_batches(slice_set, batch_size, drop_remainder)
  if sharding is not None:
    shards = _batch_shards(sharding)
    sizes = {min(batch_size, n - i * batch_size) for i in range(count)}
    bad = sorted(s for s in sizes if s % shards)
    if bad:
      raise ValueError(f"batch size(s) {bad} do not divide by the {shards} devices of the "
                       f"sharding's batch axis (len={n}, batch_size={batch_size}, "
                       f"drop_remainder={drop_remainder}); pad or change batch_size")
  images, masks = slice_set.images, slice_set.masks
  for b in range(count):
    rows = order[b * batch_size:(b + 1) * batch_size]
    size = len(rows)
    if sharding is not None:
      start, stop = process_rows(sharding, (size,) + images.shape[1:])
      rows = rows[start:stop]
    image = np.take(images, rows, axis=0)
    mask = np.take(masks, rows, axis=0)[..., None]
    if sharding is None:
      yield {"image": image, "mask": mask}
    else:
      yield {"image": jax.make_array_from_process_local_data(sharding, image,
                                                             (size,) + image.shape[1:]),
             "mask": jax.make_array_from_process_local_data(sharding, mask,
                                                            (size,) + mask.shape[1:])}


# v / 255 for every byte v, divided on the host in IEEE float32 as torch's ToTensor does.  XLA
# may rewrite a division by 255 into a multiplication by 1/255, which differs in the last bit
# for about a third of the values; a 256-entry lookup is exact and as cheap.
_BYTE_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def pixels_to_float(images):
  """Stored uint8 pixels -> float32 model input v / 255: the one conversion that training,
  evaluation, prediction, figures and benchmarks use, bit-identical to float32(v) / 255.

  A numpy array gives a numpy array (host code: figures); anything else (a jax.Array, a tracer
  inside a jitted step) gives a jax.Array.
  """
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (stored pixels), got {images.dtype}")
  if isinstance(images, np.ndarray):
    return _BYTE_TO_UNIT[images]
  return jnp.asarray(_BYTE_TO_UNIT)[images]


def to_float(batch) -> tuple[jax.Array, jax.Array]:
  """(images / 255, masks) as float32 jnp arrays; call on device, e.g. inside the jitted step.

  The images are bit-identical to float32(v) / 255 (the authors' ToTensor values).
  """
  image = jnp.asarray(batch["image"])
  if image.dtype != jnp.uint8:
    raise ValueError(f"batch['image'] must be uint8, got {image.dtype}")
  masks = jnp.asarray(batch["mask"]).astype(jnp.float32)
  return pixels_to_float(image), masks
