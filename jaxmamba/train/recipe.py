"""Turning a run config into concrete pieces: resolved values, checks, the optimiser.

Two parts of a config apply only at run time, so that command-line overrides can switch them:

* `config.improved` is merged into the config when `config.recipe == "improved"`;
* `config.synthetic_run` is merged when `config.data.dir` is empty (the built-in synthetic source)
  and `config.synthetic_run.enabled` is true: a small data set, few steps and a smaller batch, so
  that the bare command finishes in minutes on a CPU.  Its own fields are overridden as
  `--config.synthetic_run.batch_size=8`; `--config.synthetic_run.enabled=False` turns it off.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import optax

from jaxmamba.data import splits
from jaxmamba.errors import ConfigError
from jaxmamba.models import registry
from jaxmamba.train import losses, metrics

RECIPES = ("paper", "improved")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BEST_METRICS = ("val_loss", "val_dice_slice", "val_dice_paper")


def _merge(config, overrides) -> None:
  overrides = overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else overrides
  overrides = {k: v for k, v in overrides.items() if k != "enabled"}
  with config.unlocked():
    config.update(overrides)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the recipe and synthetic-run overrides applied, then checked."""
  config = ml_collections.ConfigDict(config.to_dict())
  recipe = config.get("recipe", "paper")
  if recipe not in RECIPES:
    raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
  if recipe == "improved" and "improved" in config:
    _merge(config, config.improved)
  run = config.get("synthetic_run")
  if not config.data.dir and run is not None and run.get("enabled", True):
    _merge(config, run)
  with config.unlocked():
    config.synthetic_quick = bool(not config.data.dir and run is not None
                                  and run.get("enabled", True))
  validate_config(config)
  return config


def validate_config(config) -> None:
  """Clear ConfigErrors for bad values before anything expensive happens."""
  if config.model not in registry.names():
    raise ConfigError(f"unknown model {config.model!r}; known models: {', '.join(registry.names())}")
  for key in ("batch_size", "eval_batch_size"):
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ConfigError(f"config.{key} must be a positive integer, got {config[key]!r}")
  if config.num_epochs <= 0:
    raise ConfigError(f"config.num_epochs must be positive, got {config.num_epochs}")
  if isinstance(config.bn_chunks, bool) or not isinstance(config.bn_chunks, int) \
      or config.bn_chunks < 1:
    raise ConfigError(f"config.bn_chunks must be a positive integer (1 = BatchNorm over the "
                     f"whole batch), got {config.bn_chunks!r}")
  if config.max_steps < 0:
    raise ConfigError(f"config.max_steps must be >= 0 (0 = no cap), got {config.max_steps}")
  if config.learning_rate <= 0:
    raise ConfigError(f"config.learning_rate must be positive, got {config.learning_rate}")
  if config.weight_decay < 0:
    raise ConfigError(f"config.weight_decay must be >= 0, got {config.weight_decay}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config.dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
  if config.optimizer not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                     f"got {config.optimizer!r}")
  if config.schedule not in SCHEDULES:
    raise ConfigError(f"config.schedule must be one of {', '.join(SCHEDULES)}, "
                     f"got {config.schedule!r}")
  if config.schedule != "constant" and config.plateau_patience > 0:
    raise ConfigError("config.plateau_patience needs config.schedule='constant'")
  if config.loss not in losses.LOSSES:
    raise ConfigError(f"config.loss must be one of {', '.join(losses.LOSSES)}, got {config.loss!r}")
  if config.threshold not in metrics.THRESHOLDS:
    raise ConfigError(f"config.threshold must be one of {', '.join(metrics.THRESHOLDS)}, "
                     f"got {config.threshold!r}")
  if config.best_metric not in BEST_METRICS:
    raise ConfigError(f"config.best_metric must be one of {', '.join(BEST_METRICS)}, "
                     f"got {config.best_metric!r}")
  if config.get("init_from_which", "selected") not in ("selected", "best", "final"):
    raise ConfigError(f"config.init_from_which must be selected, best or final, "
                      f"got {config.init_from_which!r}")
  if config.select not in ("final", "best"):
    raise ConfigError(f"config.select must be 'final' or 'best', got {config.select!r}")
  if config.train_image_size < 0:
    raise ConfigError(f"config.train_image_size must be >= 0 (0 = data size), "
                     f"got {config.train_image_size}")
  splits.split_mode(config.data.split)
  folds, fold = config.data.get("folds", 0), config.data.get("fold", 0)
  if folds:
    if splits.split_mode(config.data.split) != "patient":
      raise ConfigError(f"config.data.folds={folds} (cross-validation) needs data.split='patient'")
    if folds < 2 or not 0 <= fold < folds:
      raise ConfigError(f"config.data.folds must be >= 2 and config.data.fold in [0, folds), got "
                        f"folds={folds}, fold={fold}")
  if config.data.dir:
    path = os.path.expanduser(config.data.dir)
    if not os.path.isdir(path):
      raise ConfigError(f"config.data.dir={config.data.dir!r} is not an existing folder; point it "
                       "at the kaggle_3m folder or leave it empty for synthetic data")


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """The recipe's optimiser; the learning rate is an injected hyper-parameter (plateau, logging)."""
  if config.schedule == "cosine":
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else config.learning_rate, peak_value=config.learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=config.learning_rate * config.min_lr_ratio)
  else:
    lr = config.learning_rate

  def build(learning_rate):
    if config.optimizer == "adam":
      # torch Adam with weight_decay adds wd * param to the gradient (L2, not decoupled).
      base = optax.adam(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps)
      if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
      return base
    # torch AdamW: decoupled decay on every parameter (mask=None), scaled by the lr.
    return optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay)

  return optax.inject_hyperparams(build)(learning_rate=lr)


def model_kwargs(config) -> dict:
  """Constructor overrides for registry.build: dtype always, scan_impl for Mamba families."""
  kwargs = {"dtype": DTYPES[config.dtype]}
  if registry.entry(config.model).family in ("umamba", "ultralight"):
    kwargs["scan_impl"] = config.get("scan_impl", "auto")
  return kwargs
