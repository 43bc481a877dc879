"""Orbax checkpoints of a training run: periodic ones and the best-by-validation one.

Layout (read by `jaxmamba.checkpoint_io`):

  WORKDIR/checkpoints/<step>/...       periodic checkpoints (latest `max_to_keep` kept)
  WORKDIR/checkpoints/best/<step>/...  the best-by-validation checkpoint (one kept)
  WORKDIR/checkpoints/best.json        {"step": ..., "metric": ..., "value": ...}

Each checkpoint is one item, the dict {"params", "batch_stats" (only for models with BN),
"opt_state", "step"}.  A checkpoint whose tree or shapes differ from the current state's is an
error naming the first differing leaf; one that fails to restore otherwise (damaged files) is
skipped with a warning and the next older one is tried.
"""
from __future__ import annotations

import json
import logging
import os
import warnings

import jax
import orbax.checkpoint as ocp

from jaxmamba import checkpoint_io
from jaxmamba.checkpoint_io import CheckpointError, step_numbers

log = logging.getLogger(__name__)


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) to restore `tree`'s structure in place."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def _leaves_by_path(tree) -> dict:
  """{"params/Conv_0/kernel": leaf}: container types aside (Orbax's metadata stores a namedtuple
  as a dict), the same paths as the tree that was saved."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _saved_tree(step_dir: str):
  """The tree of ArrayMetadata (shape, dtype) of the item saved in `step_dir`; CheckpointError
  if it cannot be read (damaged files)."""
  return checkpoint_io.metadata_tree(os.path.join(step_dir, "default"))


def describe_mismatch(saved_tree, like) -> str | None:
  """The first leaf where a checkpoint's tree (metadata) and the expected tree differ, or None."""
  saved, expected = _leaves_by_path(saved_tree), _leaves_by_path(like)
  for path, leaf in expected.items():
    if path not in saved:
      return f"{path} is in the current model/optimiser state but not in the checkpoint"
    have = (tuple(saved[path].shape), str(saved[path].dtype))
    want = (tuple(leaf.shape), str(leaf.dtype))
    if have != want:
      return (f"{path} is {have[1]}{list(have[0])} in the checkpoint but "
              f"{want[1]}{list(want[0])} in the current model/optimiser state")
  extra = [p for p in saved if p not in expected]
  if extra:
    return f"{extra[0]} is in the checkpoint but not in the current model/optimiser state"
  return None


class Checkpointer:
  """Periodic + best checkpoints under `WORKDIR/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.latest = _manager(self.root, max_to_keep)
    self.best = _manager(os.path.join(self.root, "best"), 1)
    self.best_json = os.path.join(self.root, "best.json")

  # -- saving -----------------------------------------------------------------------------------
  def save(self, step: int, item: dict) -> None:
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=ocp.args.StandardSave(item), force=True)

  def save_best(self, step: int, item: dict, metric: str, value: float) -> None:
    self.best.save(step, args=ocp.args.StandardSave(item), force=True)
    self.best.wait_until_finished()
    if jax.process_index() == 0:
      with open(self.best_json, "w") as f:
        json.dump({"step": int(step), "metric": metric, "value": float(value)}, f)

  def drop_best_after(self, step: int) -> None:
    """Forgets a best checkpoint newer than `step`, the step a run resumes from.

    It was chosen by steps that the resumed run computes again (an older checkpoint restores when
    the newest is lost), and the best score the resumed run starts from is that of `step`.
    """
    newer = [s for s in self.best.all_steps() if s > step]
    for s in newer:
      self.best.delete(s)
    record = self.best_record()
    if record is not None and record["step"] > step and jax.process_index() == 0:
      os.remove(self.best_json)
    if newer:
      log.warning("resuming from step %d: dropped the best checkpoint of step(s) %s", step, newer)

  def best_record(self) -> dict | None:
    if not os.path.exists(self.best_json):
      return None
    with open(self.best_json) as f:
      return json.load(f)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()

  # -- restoring --------------------------------------------------------------------------------
  @staticmethod
  def _restore_newest(manager, like: dict, what: str):
    """(item, step) from the newest checkpoint that restores, or (None, None) if there is none."""
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        mismatch = describe_mismatch(_saved_tree(os.path.join(manager.directory, str(step))),
                                     like)
      except Exception:  # noqa: BLE001  unreadable metadata: the restore below reports it
        mismatch = None
      if mismatch:
        # A readable checkpoint of another model or optimiser: not damage, so no fallback.
        raise CheckpointError(
            f"the {what} checkpoint at step {step} under {manager.directory} does not fit the "
            f"current config: {mismatch}. The model or optimiser changed since it was saved; use "
            "a new --workdir, or --restart to start over in this one")
      try:
        item = manager.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
        return item, step
      except Exception as e:  # noqa: BLE001  (orbax raises many types for damaged files)
        msg = f"{what} checkpoint at step {step} is damaged ({type(e).__name__}: {e}); " \
              "falling back to the one before"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        errors.append(step)
    if errors:
      raise CheckpointError(f"every {what} checkpoint under {manager.directory} is damaged "
                            f"(steps {errors}); delete them to start over")
    return None, None

  def restore_latest(self, like: dict):
    return self._restore_newest(self.latest, like, "latest")

  def restore_best(self, like: dict):
    return self._restore_newest(self.best, like, "best")


def load_checkpoint(workdir: str, which: str = "latest",
                    step: int | None = None) -> tuple[dict, int]:
  """(item, step) of a run's checkpoint on the default device, whatever topology saved it.

  `which` is "latest" (WORKDIR/checkpoints) or "best" (WORKDIR/checkpoints/best); `step` picks
  one step instead of the newest.  For analysis and tests; training restores with Checkpointer.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  root = os.path.join(os.path.abspath(workdir), "checkpoints")
  root = root if which == "latest" else os.path.join(root, "best")
  steps = step_numbers(root) if os.path.isdir(root) else []
  if not steps:
    raise CheckpointError(f"no {which} checkpoint under {root}")
  step = steps[-1] if step is None else int(step)
  tree = _saved_tree(os.path.join(root, str(step)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  checkpointer = ocp.StandardCheckpointer()
  item = checkpointer.restore(os.path.join(root, str(step), "default"), abstract)
  checkpointer.close()
  return item, step
