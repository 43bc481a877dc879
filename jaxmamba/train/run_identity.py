"""A workdir knows its run: `WORKDIR/run.json` holds the identity of the run that wrote it.

The identity is the resolved config, flattened to `field: value`, less the fields that only extend
or observe a run (`EXTENDS_OR_OBSERVES`), with the data source pinned: for a data folder its
resolved path and a fingerprint of its file list and sizes (no file contents are read), for the
synthetic source its parameters.  Every other field, including any added to the config later, is
part of the identity; so is the run's length (num_epochs, max_steps) under a decaying (cosine)
learning-rate schedule, which is laid out over that length.

A rerun in a workdir that holds checkpoints must have the same identity, or it stops before
training and names every field that differs; `restart=True` (`experiments.run --restart`) deletes
the previous run's outputs and starts over in the same folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax

from jaxmamba.data import splits
from jaxmamba.errors import UserError
from jaxmamba.train import writers

RUN_JSON = "run.json"
FORMAT = "jaxmamba.run/1"
# Fields that may change between a run and its resumption: they only extend it (more steps), or
# change how it is watched or evaluated, never the steps already taken.  Prefixes end with ".".
EXTENDS_OR_OBSERVES = (
    "num_epochs", "max_steps", "progress", "tensorboard", "eval_batch_size", "num_figure_slices",
    "checkpoint_every_steps", "keep_checkpoints", "select", "threshold",
    "scan_impl",        # the same scan computed another way (e.g. Triton on a GPU, lax on a CPU)
    "data.tfds_dir",    # where the cached copy of the same folder lives
    "improved.", "synthetic_run.",   # templates, already merged into the resolved fields
)
# What a run writes into its workdir: removed by a restart (nothing else in the folder is touched).
RUN_OUTPUTS = ("checkpoints", "metrics", "tensorboard", "results.json", "predictions.png",
               "figure_slices.npz", "split.json", "model.json", RUN_JSON)


class WorkdirMismatchError(UserError):
  """The workdir holds checkpoints of a run whose identity differs from the current config's."""


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _excluded(field: str) -> bool:
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in EXTENDS_OR_OBSERVES)


def folder_fingerprint(path: str) -> str:
  """`N files, B bytes, sha256 H` over the sorted (relative path, size) of every visible file."""
  entries = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if not name.startswith("."):
        full = os.path.join(root, name)
        entries.append((os.path.relpath(full, path), os.path.getsize(full)))
  entries.sort()
  digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
  return f"{len(entries)} files, {sum(s for _, s in entries)} bytes, sha256 {digest}"


def identity(config) -> dict:
  """The run's identity from a resolved config (`recipe.resolve_config`)."""
  flat = _flatten(config.to_dict())
  fields = {k: v for k, v in flat.items() if not _excluded(k)}
  if config.schedule != "constant":
    # A decaying schedule is laid out over the run's length: more steps change the learning rate
    # of the steps already taken, so the length is part of the run, not an extension of it.
    fields.update({k: flat[k] for k in ("num_epochs", "max_steps")})
  # The best record and early stopping so far were judged by a validation score: what that score
  # depends on is part of the run too (the binarisation for a Dice; the eval batch for a score
  # pooled over it).
  if config.best_metric != "val_loss":
    fields["threshold"] = flat["threshold"]
  if config.best_metric == "val_dice_paper" or (config.best_metric == "val_loss"
                                                and config.loss == "dice_pooled"):
    fields["eval_batch_size"] = flat["eval_batch_size"]
  _canonical_split(fields)
  if config.data.dir:
    path = os.path.realpath(os.path.expanduser(config.data.dir))
    fields = {k: v for k, v in fields.items() if not k.startswith("data.synthetic.")}
    fields["data.dir"] = path
    fields["data.files"] = folder_fingerprint(path)
  return json.loads(json.dumps(fields, default=str))   # as it reads back from run.json


def _canonical_split(fields: dict) -> None:
  """"slice" is an alias of "paper": the same split must not read as a different run."""
  if "data.split" in fields:
    fields["data.split"] = splits.split_mode(fields["data.split"])


def differences(old: dict, new: dict) -> list[str]:
  """`field: old -> new` for every field that differs (absent on one side: `(none)`)."""
  def shown(fields, key):
    return repr(fields[key]) if key in fields else "(none)"
  return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(set(old) | set(new))
          if key not in old or key not in new or old[key] != new[key]]


def _has_checkpoints(workdir: str) -> bool:
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any(e.isdigit() for e in os.listdir(root))


def _recorded(workdir: str) -> dict | None:
  """The identity recorded in the workdir: run.json, or for a workdir written before run.json
  existed, the config in its model.json (without the data fingerprint, which it never had)."""
  path = os.path.join(workdir, RUN_JSON)
  if os.path.exists(path):
    with open(path) as f:
      fields = json.load(f)["identity"]
    _canonical_split(fields)
    return fields
  legacy = os.path.join(workdir, "model.json")
  if os.path.exists(legacy):
    with open(legacy) as f:
      config = json.load(f).get("config")
    if isinstance(config, dict):
      fields = {k: v for k, v in _flatten(config).items() if not _excluded(k)}
      if fields.get("data.dir"):
        fields["data.dir"] = os.path.realpath(os.path.expanduser(fields["data.dir"]))
      _canonical_split(fields)
      return fields
  return None


def restart(workdir: str) -> list[str]:
  """Deletes the outputs of the run in `workdir` (RUN_OUTPUTS only); returns what it removed."""
  removed = []
  if jax.process_index() == 0:
    for name in RUN_OUTPUTS:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
      else:
        continue
      removed.append(name)
  return removed


def _raise_if_different(workdir: str, current: dict) -> None:
  recorded = _recorded(workdir)
  if recorded is None:
    return
  if not os.path.exists(os.path.join(workdir, RUN_JSON)):
    # A workdir from before run.json: compare what it recorded (no data fingerprint).
    current = {k: v for k, v in current.items() if k in recorded or k == "model"}
    recorded = {k: v for k, v in recorded.items() if k in current}
  diff = differences(recorded, current)
  if diff:
    raise WorkdirMismatchError(
        f"{workdir} holds checkpoints of a different run; resuming it would mix two runs. "
        f"Differing: {'; '.join(diff)}. Use a new --workdir, or pass --restart (in Python: "
        "train_and_evaluate(config, workdir, restart=True)) to delete that run's outputs and "
        "start over in this folder.")


def check_finished(config, workdir: str) -> None:
  """For a finished run about to be reused instead of rerun (cross-validation skips finished
  folds): stops (WorkdirMismatchError) unless its recorded identity is that of `config`."""
  if _recorded(workdir) is None:
    raise WorkdirMismatchError(
        f"{workdir} holds results but no record of the run that wrote them (run.json); use a new "
        "--workdir, or pass --restart to delete them and run again.")
  _raise_if_different(workdir, identity(config))


def check_and_record(config, workdir: str) -> dict:
  """Stops (WorkdirMismatchError) if `workdir` holds checkpoints of another run; else records
  the identity of `config` in WORKDIR/run.json and returns it.

  Without checkpoints there is nothing to resume, so the identity is simply (re)written.
  """
  current = identity(config)
  if _has_checkpoints(workdir):
    _raise_if_different(workdir, current)
  writers.write_json(os.path.join(workdir, RUN_JSON), {"format": FORMAT, "identity": current},
                     sort_keys=True)
  return current
