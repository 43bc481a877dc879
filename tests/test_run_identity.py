"""A workdir knows its run (run.json), and experiments.run's errors: one line for the user's own
mistakes, a traceback for anything else; what an interrupted or a non-paper run tells the user."""
from __future__ import annotations

import json
import os
import warnings

import jax
import pytest

from tests.test_train import _params_of, _run, reference_run, tiny, tiny_config  # noqa: F401


def _train(config, workdir, **kw):
  from jaxmamba.train import train_and_evaluate
  return train_and_evaluate(config, str(workdir), **kw)


def test_changed_run_stops_before_training_naming_each_field(tiny, tmp_path):
  from jaxmamba.train.run_identity import WorkdirMismatchError
  _train(tiny_config(max_steps=2), tmp_path)
  before = _params_of(str(tmp_path))
  changed = tiny_config(max_steps=4, learning_rate=0.02, batch_size=2)
  with pytest.raises(WorkdirMismatchError) as info:
    _train(changed, tmp_path)
  message = str(info.value)
  assert "learning_rate: 0.01 -> 0.02" in message and "batch_size: 4 -> 2" in message
  assert "max_steps" not in message                     # extending a run is allowed
  assert "--workdir" in message and "--restart" in message
  after = _params_of(str(tmp_path))
  assert before[0] == after[0] == 2                     # nothing was trained


def test_synthetic_parameters_are_part_of_the_identity(tiny, tmp_path):
  from jaxmamba.train.run_identity import WorkdirMismatchError
  _train(tiny_config(max_steps=1), tmp_path)
  with pytest.raises(WorkdirMismatchError, match=r"data.synthetic.num_patients: 6 -> 7"):
    _train(tiny_config(max_steps=2, **{"data.synthetic.num_patients": 7}), tmp_path)


def test_extending_resumes_and_restart_starts_over(tiny, tmp_path, capsys):
  _train(tiny_config(max_steps=2), tmp_path)
  capsys.readouterr()
  _train(tiny_config(max_steps=3, progress=False, num_figure_slices=1), tmp_path)
  assert "resumed from step 2" in capsys.readouterr().out
  results = _train(tiny_config(max_steps=2, learning_rate=0.02), tmp_path, restart=True)
  out = capsys.readouterr().out
  assert "--restart: removed" in out and "resumed" not in out and results["steps"] == 2
  recorded = json.loads((tmp_path / "run.json").read_text())["identity"]
  assert recorded["learning_rate"] == 0.02
  # The step-3 checkpoint of the earlier run is gone with it.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
      == [2]


def test_data_folder_identity_is_its_resolved_path_and_file_list(tmp_path):
  from experiments.configs import unet
  from jaxmamba.train import recipe, run_identity
  folder = tmp_path / "kaggle_3m"
  (folder / "P1").mkdir(parents=True)
  (folder / "P1" / "P1_1.tif").write_bytes(b"x" * 10)
  os.symlink(folder, tmp_path / "link")

  def ident(path):
    c = unet.get_config()
    c.data.dir = str(path)
    return run_identity.identity(recipe.resolve_config(c))
  a, b = ident(folder), ident(tmp_path / "link")
  assert a == b and a["data.dir"] == str(folder.resolve()) and a["data.files"].startswith("1 files")
  assert not any(k.startswith("data.synthetic.") for k in a)
  (folder / "P1" / "P1_1.tif").write_bytes(b"x" * 11)     # same names, another size
  assert run_identity.differences(a, ident(folder)) == [
      f"data.files: {a['data.files']!r} -> {ident(folder)['data.files']!r}"]


def test_every_new_config_field_is_in_the_identity():
  from experiments.configs import unet
  from jaxmamba.train import recipe, run_identity
  c = unet.get_config()
  with c.unlocked():
    c.data.fold = 3                                      # e.g. a field added later
  ident = run_identity.identity(recipe.resolve_config(c))
  assert ident["data.fold"] == 3 and "num_epochs" not in ident and "model" in ident


def test_default_workdirs_keep_synthetic_and_real_runs_apart():
  from experiments import run
  assert run.default_workdir("unet", "", "") == os.path.join("runs", "unet-synthetic")
  assert run.default_workdir("unet", "", "PATH/kaggle_3m") == os.path.join("runs", "unet")
  assert run.default_workdir("unet", "runlocal", "") == os.path.join("runs",
                                                                      "unet-runlocal-synthetic")


def test_cli_mismatch_is_one_line_and_trains_nothing(reference_run):
  workdir, _ = reference_run
  before = (workdir / "results.json").read_text()
  proc = _run(workdir, "--config.learning_rate=0.02")
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "learning_rate: 0.01 -> 0.02" in lines[-1]
  assert "Traceback" not in proc.stderr
  assert (workdir / "results.json").read_text() == before


def test_cli_other_exceptions_keep_their_traceback(tmp_path):
  proc = _run(tmp_path, "--config.max_steps=1", extra_env={"TINY_BUG": "1"})
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "ValueError: a bug, not a user error" in proc.stderr


def test_second_ctrl_c_says_what_was_not_saved(tiny, tmp_path, monkeypatch, capsys):
  """Stopped inside a step (its input state donated): no checkpoint for that step, and the
  message names the step a rerun resumes from."""
  _train(tiny_config(max_steps=2), tmp_path)
  real = jax.device_get
  calls = []

  def interrupt_third_step(x):
    if isinstance(x, dict) and "grad_norm" in x:
      calls.append(1)
      if len(calls) == 1:
        raise KeyboardInterrupt
    return real(x)
  monkeypatch.setattr(jax, "device_get", interrupt_third_step)
  capsys.readouterr()
  with pytest.raises(KeyboardInterrupt):
    _train(tiny_config(max_steps=4), tmp_path)
  out = capsys.readouterr().out
  assert "interrupted inside step 3: no checkpoint was saved for it; rerunning the same " \
         "command resumes from step 2" in out


def test_paper_resnet_without_init_from_says_it_starts_from_random_weights(tiny, tmp_path,
                                                                            capsys):
  _train(tiny_config(model="resnet18_seg", max_steps=1), tmp_path / "a")
  out = capsys.readouterr().out
  assert "resnet18_seg starts from random weights" in out and "--config.init_from" in out
  _train(tiny_config(model="unet", max_steps=1), tmp_path / "b")
  assert "random weights" not in capsys.readouterr().out


def test_checkpoint_of_another_shape_is_reported_as_such_not_as_damage(tiny, tmp_path,
                                                                         monkeypatch):
  """Same config, changed model code: the restore names the first leaf that differs and stops
  (no fallback to an older checkpoint, no "damaged")."""
  import flax.linen as nn

  from jaxmamba.checkpoint_io import CheckpointError
  from jaxmamba.models import registry
  _train(tiny_config(max_steps=2), tmp_path)

  class WiderNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(5, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Conv(1, (1, 1))(nn.relu(x))
  monkeypatch.setattr(registry, "build", lambda name, **kw: WiderNet())
  with warnings.catch_warnings():
    warnings.simplefilter("error")       # a "damaged" warning would fail here
    with pytest.raises(CheckpointError) as info:
      _train(tiny_config(max_steps=4), tmp_path)
  message = str(info.value)
  assert "does not fit the current config" in message and "damaged" not in message
  assert "batch_stats/BatchNorm_0/mean is float32[4] in the checkpoint but float32[5] in the " \
         "current model" in message


def test_workdir_from_before_run_json_is_checked_against_its_model_json(tiny, tmp_path, capsys):
  from jaxmamba.train.run_identity import WorkdirMismatchError
  _train(tiny_config(max_steps=2), tmp_path)
  (tmp_path / "run.json").unlink()                      # as a workdir written before run.json
  with pytest.raises(WorkdirMismatchError, match="learning_rate: 0.01 -> 0.02"):
    _train(tiny_config(max_steps=3, learning_rate=0.02), tmp_path)
  capsys.readouterr()
  _train(tiny_config(max_steps=3), tmp_path)
  assert "resumed from step 2" in capsys.readouterr().out
  assert json.loads((tmp_path / "run.json").read_text())["identity"]["learning_rate"] == 0.01


def test_length_of_a_cosine_schedule_is_part_of_the_run(tiny, tmp_path):
  """Under a cosine schedule more steps would change the learning rates already used."""
  from jaxmamba.train.run_identity import WorkdirMismatchError
  _train(tiny_config(max_steps=2, schedule="cosine"), tmp_path)
  with pytest.raises(WorkdirMismatchError, match="max_steps: 2 -> 3"):
    _train(tiny_config(max_steps=3, schedule="cosine"), tmp_path)


def test_split_alias_is_the_same_run_and_the_selection_inputs_are_part_of_it():
  from jaxmamba.train import recipe, run_identity
  ident = lambda **kw: run_identity.identity(recipe.resolve_config(tiny_config(**kw)))  # noqa: E731
  assert ident(**{"data.split": "slice"}) == ident(**{"data.split": "paper"})
  # A Dice-judged best record depends on the binarisation; a val-loss one does not.
  assert ident(best_metric="val_dice_slice", threshold="logit") != \
      ident(best_metric="val_dice_slice", threshold="sigmoid")
  assert ident(best_metric="val_loss", loss="bce", threshold="logit") == \
      ident(best_metric="val_loss", loss="bce", threshold="sigmoid")
  # The paper metric and the pooled Dice loss are pooled over the evaluation batch.
  assert ident(best_metric="val_dice_paper", eval_batch_size=4) != \
      ident(best_metric="val_dice_paper", eval_batch_size=8)
  assert ident(best_metric="val_loss", loss="dice_pooled", eval_batch_size=4) != \
      ident(best_metric="val_loss", loss="dice_pooled", eval_batch_size=8)
  assert ident(best_metric="val_loss", loss="bce", eval_batch_size=4) == \
      ident(best_metric="val_loss", loss="bce", eval_batch_size=8)
