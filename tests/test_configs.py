"""The 13 Table I configs: present, loadable, and carrying the authors' recipe (per the specs)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from experiments.configs import base
from jaxmamba.models import registry
from jaxmamba.train import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (train batch, test batch, loss, optimiser, lr, weight decay, threshold, train image size), from
# spec models-conv-umamba.md §9.2/§9.6 and models-ultralight.md §6.
UL = (2, 16, "bce_dice", "adamw", 3e-4, 0.01, "sigmoid", 0)
EXPECTED = {
    "unet": (64, 64, "dice_pooled", "adam", 3e-4, 0.0, "logit", 0),
    "resnet18_seg": (64, 16, "dice_pooled", "adam", 3e-4, 0.0, "logit", 0),
    "resnet50_seg": (64, 16, "dice_pooled", "adam", 3e-4, 0.0, "logit", 0),
    "segformer": (16, 16, "bce", "adamw", 1e-4, 5e-5, "sigmoid", 224),
    "umambabot": (32, 16, "dice_pooled", "adam", 3e-4, 0.0, "logit", 0),
    "umambabot_pp": (64, 16, "dice_pooled", "adam", 3e-4, 0.0, "logit", 0),
    **{name: UL for name in ("ulvmunet", "ulvmunet_v1", "ulvmunet_v2", "ulvmunet_v3",
                             "ulvmunet_v4", "ulvmunet_v5", "ulvmunet_v6")},
}


def _load(name, arg=None):
  return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


def test_one_config_per_registered_model():
  assert sorted(base.known_configs()) == sorted(registry.names())
  assert set(EXPECTED) == set(registry.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_recipe(name):
  c = _load(name)
  got = (c.batch_size, c.eval_batch_size, c.loss, c.optimizer, c.learning_rate, c.weight_decay,
         c.threshold, c.train_image_size)
  assert got == EXPECTED[name]
  assert c.model == name and c.num_epochs == 100 and c.max_steps == 0
  assert c.schedule == "constant" and c.select == "final" and c.recipe == "paper"
  assert c.plateau_patience == 0 and c.early_stopping_patience == 0
  assert c.data.dir == "" and c.data.split == "patient" and not c.data.augment.enabled
  assert ("scan_impl" in c) == (registry.entry(name).family in ("umamba", "ultralight"))
  # On real data nothing is shrunk.
  c.data.dir = ROOT
  r = recipe.resolve_config(c)
  assert (r.batch_size, r.num_epochs, r.max_steps) == (EXPECTED[name][0], 100, 0)
  assert not r.synthetic_quick


@pytest.mark.parametrize("name", ["umambabot_pp", "segformer", "ulvmunet_v5"])
def test_synthetic_run_and_runlocal_shrink_but_keep_the_model(name):
  r = recipe.resolve_config(_load(name))
  assert r.synthetic_quick and r.model == name
  assert r.batch_size < EXPECTED[name][0] or r.batch_size <= 4
  assert 0 < r.max_steps <= 100 and r.data.synthetic.image_size <= 128  # fits 10 min on 2 cores
  local = recipe.resolve_config(_load(name, "runlocal"))
  assert local.model == name and local.max_steps <= 4 and local.data.synthetic.image_size == 64
  if name == "segformer":
    assert 0 < local.train_image_size < 64 and 0 < r.train_image_size < 128
  on_real_data = _load(name, "runlocal")
  on_real_data.data.dir = ROOT   # as --config.data.dir=PATH does: the real recipe, 4 steps
  on_real_data = recipe.resolve_config(on_real_data)
  assert not on_real_data.synthetic_quick and on_real_data.max_steps == 4
  assert on_real_data.batch_size == EXPECTED[name][0]
  with pytest.raises(ValueError, match="unknown config argument"):
    _load(name, "fast")


def test_improved_recipe_applies_at_run_time():
  c = _load("unet")
  c.recipe = "improved"
  c.data.dir = ROOT
  r = recipe.resolve_config(c)
  assert (r.loss, r.schedule, r.select, r.data.split) == ("dice_bce_per_image", "cosine", "best",
                                                          "patient")
  assert r.data.augment.enabled and r.optimizer == "adamw"
  c.data.split = "paper"           # the improved recipe keeps the split it is given
  assert recipe.resolve_config(c).data.split == "paper"
  c.data.split = "patient"
  # the paper's recipe keeps the authors' 4-GPU DataParallel BatchNorm chunks; improved does not
  assert recipe.resolve_config(_load("unet")).bn_chunks == 4 and r.bn_chunks == 1
  c.recipe = "best-ever"
  with pytest.raises(ValueError, match="unknown recipe"):
    recipe.resolve_config(c)


def test_config_names_and_paths_resolve():
  path = base.resolve_config_path("umambabot_pp:runlocal")
  assert path.endswith(os.path.join("configs", "umambabot_pp.py:runlocal"))
  assert base.resolve_config_path(path) == path
  with pytest.raises(ValueError, match="not one of: .*umambabot_pp"):
    base.resolve_config_path("umambabot_ppp")
  argv, name = base.resolve_argv(["run", "--config", "unet", "--workdir=x"])
  assert name == "unet" and argv[2].endswith("unet.py")


def test_optimizers_follow_torch_semantics():
  import jax.numpy as jnp
  import optax
  c = recipe.resolve_config(_load("ulvmunet"))
  tx = recipe.make_optimizer(c, 10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  zero_grad = {"w": jnp.zeros(3)}
  updates, _ = tx.update(zero_grad, state, params)
  # AdamW with a zero gradient: only decoupled decay, lr * wd * w = 3e-4 * 0.01.
  assert jnp.allclose(updates["w"], -3e-4 * 0.01)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(3e-4)
  assert isinstance(tx, optax.GradientTransformation)


def test_cli_config_override_and_bad_value(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config=unet:runlocal", f"--workdir={tmp_path}",
       "--config.synthetic_run.batch_size=-3"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert "batch_size must be a positive integer" in proc.stderr
