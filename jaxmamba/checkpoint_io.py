"""Model variables on disk: one reader for converted weights and for training work directories.

Two layouts are read, both with a `model.json` (`{"model": NAME, ...}`) naming the registry model:

* converter output (`save_variables`): `DIR/model.json` + `DIR/variables/`, an Orbax PyTree
  checkpoint of `{"params": ..., ["batch_stats": ...]}`;
* a training work directory: `WORKDIR/model.json` + `WORKDIR/checkpoints/<step>/<item>/` written by
  an Orbax `CheckpointManager` whose item is a dict holding at least "params" (and "batch_stats",
  "opt_state", "step", ...), with the best-by-validation one under `WORKDIR/checkpoints/best`.
  By default the checkpoint the run's results.json reports as selected is read (`locate`):
  the final weights under the authors' recipe, the best under recipe=improved; `which` and
  `step` choose another.

Only "params" and "batch_stats" are restored (partially, as numpy arrays), so neither the optimizer
structure nor the devices the checkpoint was written on are needed.  `load_variables` also accepts
a step or item directory inside a work directory; `model.json` is then looked up in its parents.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmamba.errors import UserError

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
COLLECTIONS = ("params", "batch_stats")
FORMAT = "jaxmamba.variables/1"
# How far above a given path `model.json` is looked for (item -> step -> checkpoints -> workdir).
_MAX_PARENT_LEVELS = 3


class CheckpointError(UserError):
  """A checkpoint that is missing, malformed, or of another model than expected."""


def save_variables(directory: str, model_name: str, variables: dict, *,
                   extra: dict | None = None, overwrite: bool = False) -> str:
  """Writes `variables` ({"params", ["batch_stats"]}) and `model.json` into `directory`.

  Args:
    directory: target folder (created; must not already hold variables unless `overwrite`).
    model_name: the registry name recorded in model.json.
    variables: Flax variables; collections other than params/batch_stats are rejected.
    extra: more JSON-serialisable fields for model.json (e.g. where the weights came from).
    overwrite: replace an existing checkpoint in `directory`.
  Returns:
    The absolute path of `directory`.
  """
  directory = os.path.abspath(directory)
  unknown = sorted(set(variables) - set(COLLECTIONS))
  if unknown or "params" not in variables:
    raise CheckpointError(f"variables must hold 'params' (and optionally 'batch_stats'), got "
                          f"collections {sorted(variables)}")
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target) and not overwrite:
    raise CheckpointError(f"{target} already exists (pass overwrite=True / --overwrite to replace)")
  os.makedirs(directory, exist_ok=True)
  # Empty collections (e.g. no BatchNorm) are left out: Orbax cannot store an empty subtree.
  tree = {k: jax.tree.map(np.asarray, v) for k, v in variables.items() if jax.tree.leaves(v)}
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(target, tree, force=overwrite)
  meta = {"model": model_name, "format": FORMAT, **(extra or {})}
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump(meta, f, indent=2)
  return directory


def read_model_json(path: str) -> tuple[str, dict]:
  """(directory holding model.json, its contents), looking in `path` and up to 3 parents."""
  d = os.path.abspath(path)
  for _ in range(_MAX_PARENT_LEVELS + 1):
    candidate = os.path.join(d, MODEL_JSON)
    if os.path.isfile(candidate):
      try:
        with open(candidate) as f:
          meta = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{candidate}: unreadable ({e})") from e
      if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{candidate}: has no \"model\" name")
      return d, meta
    d = os.path.dirname(d)
  raise CheckpointError(f"{path}: no {MODEL_JSON} here or in its parents; not a jaxmamba "
                        "checkpoint (convert torch weights with `python -m jaxmamba.convert`)")


def _is_pytree_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "_METADATA"))


def step_numbers(directory: str) -> list[int]:
  """The finished checkpoint steps of an Orbax CheckpointManager folder, ascending."""
  # Unfinished Orbax saves live in "<step>.orbax-checkpoint-tmp-*" folders: only plain integers.
  return sorted(int(e) for e in os.listdir(directory)
                if re.fullmatch(r"\d+", e) and os.path.isdir(os.path.join(directory, e)))


def _resolve(directory: str) -> str:
  """The PyTree item under `directory`: the directory itself, its newest step (a CheckpointManager
  root), or, inside a step, the item that holds "params"."""
  if _is_pytree_checkpoint(directory):
    return directory
  steps = step_numbers(directory)
  if steps:
    return _resolve(os.path.join(directory, str(steps[-1])))
  items = sorted(e for e in os.listdir(directory)
                 if _is_pytree_checkpoint(os.path.join(directory, e)))
  if not items:
    raise CheckpointError(f"{directory}: no Orbax checkpoint inside")
  # A manager may keep several items (e.g. "state" and "metrics"); take the one with params.
  for name in items:
    if "params" in metadata_tree(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise CheckpointError(f"{directory}: no checkpoint item holds 'params' (items: {items})")


def find_checkpoint(path: str) -> str:
  """The Orbax PyTree directory that `load_variables(path)` reads."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint directory does not exist")
  if os.path.isdir(os.path.join(path, VARIABLES_DIR)):
    return os.path.join(path, VARIABLES_DIR)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    path = os.path.join(path, CHECKPOINTS_DIR)
  best = os.path.join(path, BEST_DIR)
  # The trainer creates best/ before its first validation; an empty one does not count.
  if os.path.basename(path) == CHECKPOINTS_DIR and os.path.isdir(best) and _has_checkpoint(best):
    return _resolve(best)
  return _resolve(path)


WHICH = ("selected", "best", "final")


def _selection(workdir: str) -> tuple[str, int | None, str]:
  """(which, step or None for the newest, why) a training workdir's own choice points at.

  results.json names the checkpoint its headline numbers come from; without one (a run not
  finished yet) model.json's config.select says which the run will score; a workdir with neither
  falls back to best-if-any, else the newest.
  """
  results = os.path.join(workdir, "results.json")
  if os.path.isfile(results):
    try:
      with open(results) as f:
        saved = json.load(f)
      which = saved["selected"]
      return which, int(saved[which]["step"]), "the one results.json reports"
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{results}: unreadable or without a selected checkpoint "
                            f"({type(e).__name__}: {e}); pass --which best|final") from e
  _, meta = read_model_json(workdir)
  select = (meta.get("config") or {}).get("select")
  if select in ("best", "final"):
    return select, None, "config.select of a run that has not finished"
  best = os.path.join(workdir, CHECKPOINTS_DIR, BEST_DIR)
  has_best = os.path.isdir(best) and _has_checkpoint(best)
  return ("best" if has_best else "final"), None, "best if any, else the newest"


def locate(path: str, which: str = "selected", step: int | None = None) -> tuple[str, str]:
  """(the Orbax PyTree directory to read, what it is in words) for `path`.

  For a training workdir, `which` is "selected" (the checkpoint its results.json scored, e.g. the
  final weights under the authors' recipe), "best" (the best-by-validation one) or "final" (the
  newest periodic one); `step` picks another step of that kind.  Converter output and a folder
  inside a workdir (a step or item) are read as given.
  """
  if which not in WHICH:
    raise CheckpointError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint directory does not exist")
  root = os.path.join(path, CHECKPOINTS_DIR)
  if not os.path.isdir(root):
    if which != "selected" or step is not None:
      raise CheckpointError(f"{path} is not a training workdir (no {CHECKPOINTS_DIR}/): "
                            "which/step choose among a workdir's checkpoints")
    item = find_checkpoint(path)
    kind = "converted weights" if item.endswith(os.sep + VARIABLES_DIR) else "checkpoint"
    return item, f"{kind} {item}"
  why = f"--which {which}"
  if which == "selected":
    which, chosen, why = _selection(path)
  else:
    chosen = None
  chosen = chosen if step is None else int(step)
  folder = os.path.join(root, BEST_DIR) if which == "best" else root
  steps = step_numbers(folder) if os.path.isdir(folder) else []
  if not steps:
    raise CheckpointError(f"{path} has no {which} checkpoint")
  chosen = steps[-1] if chosen is None else chosen
  if chosen not in steps:
    raise CheckpointError(f"{path} has no {which} checkpoint at step {chosen} (it keeps steps "
                          f"{steps}); pass --which best|final [--step N] to choose another")
  return (_resolve(os.path.join(folder, str(chosen))),
          f"the {which} checkpoint (step {chosen}) of {path}, {why}")


def _has_checkpoint(directory: str) -> bool:
  return (_is_pytree_checkpoint(directory) or bool(step_numbers(directory))
          or any(_is_pytree_checkpoint(os.path.join(directory, e)) for e in os.listdir(directory)))


def metadata_tree(item: str) -> dict:
  """The saved tree of an Orbax item as ArrayMetadata leaves (shape, dtype); CheckpointError if
  unreadable."""
  # Orbax logs a warning for every checkpoint written without step metadata; it is harmless here.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    meta = ocp.PyTreeCheckpointer().metadata(item)
  except Exception as e:  # Orbax raises many types for damaged or foreign folders
    raise CheckpointError(f"{item}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from e
  finally:
    absl_logger.setLevel(level)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict):
    raise CheckpointError(f"{item}: checkpoint is not a dict of collections")
  return dict(tree)


def load_variables(path: str, expected_model: str | None = None, which: str = "selected",
                   step: int | None = None) -> tuple[str, dict[str, Any]]:
  """Reads (model name, {"params", ["batch_stats"]}) from a converter output or a training workdir
  (the checkpoint `locate(path, which, step)` names: by default the one its results.json scored).

  Raises CheckpointError if nothing readable is there, or if `expected_model` is given and the
  checkpoint belongs to another model.  Arrays come back as numpy arrays.
  """
  model, variables, _ = load_located(path, expected_model, which, step)
  return model, variables


def load_located(path: str, expected_model: str | None = None, which: str = "selected",
                 step: int | None = None) -> tuple[str, dict[str, Any], str]:
  """`load_variables`, plus what was read in words (`locate`'s description), locating it once."""
  _, meta = read_model_json(path)
  model = meta["model"]
  if expected_model is not None and model != expected_model:
    raise CheckpointError(f"{path} is a checkpoint of model {model!r}, not {expected_model!r}")
  item, what = locate(path, which, step)
  tree = metadata_tree(item)
  wanted = {k: tree[k] for k in COLLECTIONS if k in tree}
  if "params" not in wanted:
    raise CheckpointError(f"{item}: checkpoint holds no 'params' (has {sorted(tree)})")
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  try:
    variables = ocp.PyTreeCheckpointer().restore(
        item, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                          partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"{item}: could not restore ({type(e).__name__}: {e})") from e
  return model, dict(variables), what
