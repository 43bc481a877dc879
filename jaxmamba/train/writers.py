"""Metric sinks: JSON lines files and TensorBoard event files, and whole JSON files written
atomically (process 0 only)."""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def plain(v):
  """JSON-safe scalars (NaN/inf become null, numpy/jax scalars become floats)."""
  if isinstance(v, dict):
    return {k: plain(x) for k, x in v.items()}
  if isinstance(v, (str, bool)) or v is None:
    return v
  if isinstance(v, (int, np.integer)):
    return int(v)
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


def write_json(path: str, obj, **dump_kwargs) -> None:
  """Writes `obj` to `path` as indented JSON from process 0, atomically: a kill never leaves
  half a file."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, **dump_kwargs)
  os.replace(tmp, path)


class MetricWriter:
  """Appends records to WORKDIR/metrics/<stream>.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.dir = os.path.join(workdir, "metrics")
    self._files = {}
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.dir, exist_ok=True)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # imported lazily: slow import
      except ImportError as e:   # before any training, so nothing is lost
        raise ImportError(f"TensorBoard logging needs tensorboardX ({e}): install it, or pass "
                          "--config.tensorboard=False (the JSON-lines metrics stay)") from e
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, stream: str, step: int, record: dict) -> None:
    if not self.enabled:
      return
    if stream not in self._files:
      self._files[stream] = open(os.path.join(self.dir, f"{stream}.jsonl"), "a")
    f = self._files[stream]
    f.write(json.dumps({"step": int(step), **plain(record)}) + "\n")
    f.flush()
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
          if math.isfinite(float(v)):
            self._tb.add_scalar(f"{stream}/{k}", float(v), int(step))

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files = {}
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
