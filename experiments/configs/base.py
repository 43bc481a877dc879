"""Shared pieces of the Table I configs (one file per model in this folder).

Every config file defines `get_config(arg=None)`; `arg == "runlocal"` (as in
`--config=umambabot_pp:runlocal`) shrinks everything for a quick local smoke run.  The defaults are
the authors' recipe (spec models-conv-umamba.md §9, models-ultralight.md §6).  Two parts apply at
run time (see jaxmamba.train.recipe): `improved` when `recipe="improved"`, and `synthetic_run` when
`data.dir` is empty (built-in synthetic data: small set, few steps, small batch, same model).

Fields:
  model, recipe ("paper" | "improved"), seed, dtype ("float32" | "bfloat16"), scan_impl (Mamba
  families), batch_size (train), eval_batch_size (the paper's test batch size, also used for
  validation), num_epochs, max_steps (0 = no cap), loss ("dice_pooled" | "bce" | "bce_dice" |
  "dice_bce_per_image"), loss_smooth (<= 0: the loss's own default), optimizer ("adam" | "adamw"),
  bn_chunks (BatchNorm statistics per torch.chunk piece of the batch, as nn.DataParallel on 4 GPUs
  computed them; 1 = over the whole batch; no effect on models without BatchNorm),
  learning_rate, weight_decay, b1, b2, eps, schedule ("constant" | "cosine"), warmup_steps,
  min_lr_ratio, plateau_patience / plateau_factor (ReduceLROnPlateau on val loss; 0 = off),
  early_stopping_patience (epochs without a better best_metric; 0 = off), train_image_size
  (0 = data size; SegFormer 224), threshold ("logit" | "sigmoid", the paper's test binarisation),
  best_metric, select ("final" | "best": the checkpoint behind the headline numbers),
  init_from / init_from_which / init_from_step (start from converted weights or a run's checkpoint),
  checkpoint_every_steps (0 = once per epoch), keep_checkpoints, progress, tensorboard,
  num_figure_slices, data (jaxmamba.data config).
"""
from __future__ import annotations

import glob
import os

import ml_collections

from jaxmamba import data
from jaxmamba.models import registry

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
# Mamba families take a scan implementation.
_MAMBA_FAMILIES = ("umamba", "ultralight")


def known_configs() -> list[str]:
  return sorted(os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if not os.path.basename(p).startswith("_") and not p.endswith("base.py"))


def resolve_config_path(value: str) -> str:
  """`NAME[:ARG]` or `PATH[:ARG]` -> `PATH[:ARG]` for config_flags; unknown names list the known."""
  name, sep, arg = value.partition(":")
  if os.path.exists(name):
    return value
  if os.sep not in name and not name.endswith(".py"):
    path = os.path.join(CONFIG_DIR, name + ".py")
    if os.path.exists(path):
      return path + sep + arg
  raise ValueError(f"unknown config {name!r}: not a file and not one of: "
                   f"{', '.join(known_configs())}")


def _config_arg_index(argv):
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return i, a.split("=", 1)[1], True
    if a == "--config" and i + 1 < len(argv):
      return i, argv[i + 1], False
  return None, None, None


def config_value(argv: list[str]) -> str:
  """The `--config` value as given (`NAME[:ARG]`), or "" without one."""
  return _config_arg_index(argv)[1] or ""


def resolve_argv(argv: list[str]) -> tuple[list[str], str | None]:
  """Rewrites a bare `--config=NAME[:arg]` into the config file path; returns (argv, NAME)."""
  argv = list(argv)
  i, value, joined = _config_arg_index(argv)
  if i is None:
    return argv, None
  path = resolve_config_path(value)
  if joined:
    argv[i] = "--config=" + path
  else:
    argv[i + 1] = path
  name = os.path.splitext(os.path.basename(path.partition(":")[0]))[0]
  return argv, name


def base_config(model: str, *, batch_size: int, eval_batch_size: int, loss: str, optimizer: str,
                learning_rate: float, weight_decay: float, threshold: str,
                train_image_size: int = 0) -> ml_collections.ConfigDict:
  """The authors' recipe for `model` with the given per-model values."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.recipe = "paper"
  c.seed = 0
  c.dtype = "float32"
  if registry.entry(model).family in _MAMBA_FAMILIES:
    c.scan_impl = "auto"

  c.data = data.default_config()
  # Patient split by default: the paper's slice split (--config.data.split=paper, Table I's
  # protocol) puts slices of most test patients into training too (spec §10.1).
  c.data.split = "patient"
  c.batch_size = batch_size
  c.eval_batch_size = eval_batch_size
  c.num_epochs = 100
  c.max_steps = 0
  # The authors trained under nn.DataParallel on 4 GPUs: BatchNorm layers saw ceil(B/4)-row
  # chunks, and the running statistics kept are the first chunk's (spec §9.4).
  c.bn_chunks = 4

  c.loss = loss
  c.loss_smooth = 0.0
  c.optimizer = optimizer
  c.learning_rate = learning_rate
  c.weight_decay = weight_decay
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  c.schedule = "constant"
  c.warmup_steps = 0
  c.min_lr_ratio = 0.0
  c.plateau_patience = 0
  c.plateau_factor = 0.1
  c.early_stopping_patience = 0
  c.train_image_size = train_image_size
  c.threshold = threshold
  c.best_metric = "val_loss"
  c.select = "final"                # the paper tested the final (epoch-100) weights

  # Start from converted or trained weights (`python -m jaxmamba.convert ...` output or a run's
  # workdir) instead of a random init, e.g. the authors' ImageNet ResNet encoders.
  c.init_from = ""
  # From a training workdir: which of its checkpoints ("selected" = the one its results.json
  # scored, "best", "final") and which step of that kind (0 = the newest).
  c.init_from_which = "selected"
  c.init_from_step = 0

  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 3
  c.progress = True
  c.tensorboard = True
  c.num_figure_slices = 6

  # recipe="improved": per-image Dice + BCE, cosine schedule with warm-up, AdamW, BatchNorm over
  # the whole batch, light augmentation, selection of the best-validation (per-slice Dice)
  # checkpoint (on the same patient split as the authors' recipe).
  c.improved = ml_collections.ConfigDict({
      "loss": "dice_bce_per_image", "optimizer": "adamw", "bn_chunks": 1,
      "weight_decay": 1e-4 if weight_decay == 0 else weight_decay,
      "schedule": "cosine", "warmup_steps": 200, "min_lr_ratio": 0.01,
      "best_metric": "val_dice_slice", "select": "best", "threshold": "sigmoid",
      "data": {"augment": {"enabled": True}},
  })

  # No data folder: a run that finishes in minutes on 2 CPU cores, same model, smaller images.
  c.synthetic_run = ml_collections.ConfigDict({
      # 4.3 min for umambabot_pp on 2 CPU cores (compile and evaluation included); by then the
      # synthetic tumours are found (per-slice test Dice 0.92 in that run).
      "enabled": True, "batch_size": 4, "eval_batch_size": 16, "num_epochs": 3, "max_steps": 80,
      "data": {"synthetic": {"num_patients": 12, "slices_per_patient": 16, "image_size": 128}},
      "warmup_steps": 5,
  })
  return c


def with_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config-file argument (`--config=NAME:runlocal`); anything else is an error."""
  if arg == "runlocal":
    return runlocal(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; known: runlocal")
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config for a quick smoke run (tiny synthetic set, 64x64, a few steps).

  With `--config.data.dir=PATH` added it is a smoke run on the real data: 4 steps of the
  recipe's batch size, then the full validation and test passes.
  """
  c.data.dir = ""
  c.max_steps = 4
  small = {"enabled": True, "batch_size": 2, "eval_batch_size": 4, "num_epochs": 2,
           "max_steps": c.max_steps,
           "data": {"synthetic": {"num_patients": 5, "slices_per_patient": 4, "image_size": 64}}}
  c.synthetic_run.update(small)
  if c.train_image_size:
    # SegFormer: train below the test size (224/256 in the paper), on a multiple of 32.
    c.train_image_size = 32
    c.synthetic_run.train_image_size = 32
  c.num_figure_slices = 2
  c.tensorboard = True
  return c
