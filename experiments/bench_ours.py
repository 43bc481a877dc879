"""Our side of the benchmarks: a config's jit-compiled train step and forward pass as callables,
and the authors' timing harness.  No flags here: `experiments.bench_torch.Worker` imports this
module in a process of its own.
"""
from __future__ import annotations

import importlib
import math

import jax


def step_fns(config):
  """(facts, callables): our jit-compiled train step and inference-mode forward pass of `config`
  on one synthetic batch, keyed "train" and "eval", each blocking until its result is ready (the
  train step carries its state from call to call); the first call of each compiles."""
  from jaxmamba import data
  from jaxmamba.train import recipe, trainer
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.dir = ""
    config.synthetic_run.enabled = False
    config.data.split = "patient"
    # Just enough synthetic slices for one training batch (patient split keeps ~80% for train).
    config.data.synthetic.num_patients = 10
    config.data.synthetic.slices_per_patient = max(2, math.ceil(config.batch_size / 8) + 1)
  config = recipe.resolve_config(config)
  setup = trainer._Setup(config, workdir=None)
  batch = next(iter(data.batches(setup.splits.train, config.batch_size, shuffle=False,
                                 sharding=setup.batch_sharding)))
  carried = {"state": setup.state}

  def train():
    carried["state"], stats = setup.train_step(carried["state"], batch)
    carried["stats"] = jax.block_until_ready(stats)

  forward = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))
  images, _ = data.to_float(batch)

  def evaluate():
    state = carried["state"]
    variables = {k: state[k] for k in ("params", "batch_stats") if k in state}
    jax.block_until_ready(forward(variables, images))

  facts = {"model": config.model, "devices": setup.num_devices,
           "platform": setup.devices[0].platform, "dtype": config.dtype,
           "batch_size": config.batch_size, "image_size": setup.train_size,
           "loss": lambda: float(carried["stats"]["loss"])}
  return facts, {"train": train, "eval": evaluate}


def authors_harness(name: str, dtype: str, batch_size: int, image_size: int):
  """`name`'s config set to the authors' timing harness (not their per-model training recipe)."""
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  config.batch_size = batch_size
  config.dtype = dtype
  config.loss, config.optimizer, config.weight_decay = "dice_pooled", "adam", 0.0
  config.train_image_size = 0          # SegFormer too: the rates were taken at 256x256
  config.bn_chunks = 1                 # one GPU, no DataParallel
  config.data.synthetic.image_size = image_size
  return config
