"""Trainer tests on a tiny BN conv model monkeypatched into the registry (32x32 synthetic data).

Subprocess tests run `tests/test_train.py` itself as a script (see `_script_main`): it patches the
registry the same way and calls experiments.run, so kill -9, Ctrl-C and 8 fake devices are tested
on the real entry point.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  """Conv-BN-ReLU-Conv: small, has batch_stats, any input size.

  The first conv has no bias: before BN its gradient is zero up to rounding, which Adam would
  amplify into device-count-dependent noise.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x)
    return nn.Conv(1, (1, 1), dtype=self.dtype)(x)


def _patch_registry():
  from jaxmamba.models import registry
  registry.build = lambda name, **kw: TinyNet(dtype=kw.get("dtype", jnp.float32))


def tiny_config(**overrides):
  from experiments.configs import unet
  c = unet.get_config()
  c.synthetic_run.enabled = False
  c.data.dir = ""
  c.data.synthetic.update(dict(num_patients=6, slices_per_patient=6, image_size=32))
  c.batch_size = 4
  c.eval_batch_size = 5
  c.num_epochs = 2
  c.progress = False
  c.num_figure_slices = 2
  c.learning_rate = 1e-2
  for k, v in overrides.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return c


@pytest.fixture
def tiny(monkeypatch):
  from jaxmamba.models import registry
  monkeypatch.setattr(registry, "build", lambda name, **kw: TinyNet(dtype=kw.get("dtype",
                                                                                  jnp.float32)))


def _params_of(workdir, step=None):
  """Parameters of a workdir's latest (or given) checkpoint, as numpy leaves by path."""
  from jaxmamba.train.checkpoint import load_checkpoint
  item, step = load_checkpoint(workdir, "latest", step)
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(item["params"])}


def test_missing_tensorboardx_is_a_clear_error_before_training(tmp_path, monkeypatch):
  from jaxmamba.train.writers import MetricWriter
  monkeypatch.setitem(sys.modules, "tensorboardX", None)   # import raises, as where it is absent
  with pytest.raises(ImportError, match="tensorboard=False"):
    MetricWriter(str(tmp_path), tensorboard=True)
  MetricWriter(str(tmp_path), tensorboard=False).write("train", 1, {"loss": 0.5})
  assert json.loads((tmp_path / "metrics" / "train.jsonl").read_text()) == {"step": 1, "loss": 0.5}


def test_end_to_end_writes_everything(tiny, tmp_path, capsys):
  from jaxmamba.train import train_and_evaluate
  results = train_and_evaluate(tiny_config(), str(tmp_path))
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("test (final checkpoint")
  assert "Dice" in out[-1] and "IoU" in out[-1]
  for f in ("model.json", "split.json", "results.json", "predictions.png", "figure_slices.npz",
            "metrics/train.jsonl", "metrics/epochs.jsonl", "checkpoints/best.json"):
    assert (tmp_path / f).exists(), f
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  model_json = json.loads((tmp_path / "model.json").read_text())
  assert model_json["model"] == "unet" and model_json["has_batch_stats"]
  # 36 slices, patient split 80/10/10 -> train steps per epoch = len(train) // 4, two epochs.
  steps = results["steps"]
  train_lines = (tmp_path / "metrics/train.jsonl").read_text().splitlines()
  assert len(train_lines) == steps and steps > 2
  assert len((tmp_path / "metrics/epochs.jsonl").read_text().splitlines()) == 2
  assert os.path.isdir(tmp_path / "checkpoints" / str(steps))
  assert glob.glob(str(tmp_path / "checkpoints" / "best" / "*"))
  saved = json.loads((tmp_path / "results.json").read_text())
  for which in ("final", "best"):
    for split in ("val", "test"):
      r = saved[which][split]
      assert set(r) >= {"loss", "paper", "slice", "patient"}
      assert 0.0 <= r["slice"]["dice"] <= 1.0 and 0.0 <= r["patient"]["dice"] <= 1.0
  assert saved["num_params"] == 4 * 27 + 8 + 5
  losses = [json.loads(line)["loss"] for line in train_lines]
  assert np.isfinite(losses).all()


def test_resume_matches_uninterrupted(tiny, tmp_path, capsys):
  from jaxmamba.train import train_and_evaluate
  train_and_evaluate(tiny_config(max_steps=6), str(tmp_path / "straight"))
  train_and_evaluate(tiny_config(max_steps=3), str(tmp_path / "split"))
  capsys.readouterr()
  train_and_evaluate(tiny_config(max_steps=6), str(tmp_path / "split"))
  assert "resumed from step 3" in capsys.readouterr().out
  step_a, a = _params_of(str(tmp_path / "straight"))
  step_b, b = _params_of(str(tmp_path / "split"))
  assert step_a == step_b == 6
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_damaged_latest_checkpoint_falls_back(tiny, tmp_path, capsys):
  from jaxmamba.train import train_and_evaluate
  train_and_evaluate(tiny_config(max_steps=4, checkpoint_every_steps=2), str(tmp_path))
  for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "**"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"\0garbage")
  capsys.readouterr()
  with pytest.warns(RuntimeWarning, match="step 4 is damaged"):
    train_and_evaluate(tiny_config(max_steps=5, checkpoint_every_steps=2), str(tmp_path))
  assert "resumed from step 2" in capsys.readouterr().out


def _book(workdir, step):
  """The loop bookkeeping stored with `step`'s checkpoint, without the wall-clock fields."""
  by_step = json.loads((workdir / "checkpoints" / "host_state.json").read_text())
  return {k: v for k, v in by_step[str(step)].items()
          if not k.endswith("_time_s") and k not in ("timed_s", "timed_images")}


def test_resume_after_losing_the_newest_checkpoint_restores_that_steps_bookkeeping(tiny, tmp_path):
  """Each saved step keeps its own counters: resuming from an older checkpoint (the newest one
  lost, as after a kill during an async save) ends exactly as the uninterrupted run."""
  from jaxmamba.train import train_and_evaluate
  config = tiny_config(num_epochs=4, early_stopping_patience=3, learning_rate=0.05)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(config, str(straight))
  train_and_evaluate(config, str(resumed))
  steps = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
  last, previous = steps[-1], steps[-2]
  assert _book(resumed, previous) != _book(resumed, last)   # the counters moved in between
  shutil.rmtree(resumed / "checkpoints" / str(last))
  train_and_evaluate(config, str(resumed))
  step_a, a = _params_of(str(straight))
  step_b, b = _params_of(str(resumed))
  assert step_a == step_b == last
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _book(resumed, last) == _book(straight, last)
  best = [json.loads((d / "checkpoints" / "best.json").read_text()) for d in (straight, resumed)]
  assert best[0] == best[1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
  from jaxmamba.train import losses, train_and_evaluate
  train_and_evaluate(tiny_config(max_steps=2), str(tmp_path))
  monkeypatch.setattr(losses, "get_loss",
                      lambda name, smooth=None: lambda lg, m, weights=None: jnp.sum(lg) * jnp.nan)
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*step 2"):
    train_and_evaluate(tiny_config(max_steps=4), str(tmp_path))
  steps = sorted(int(os.path.basename(p))
                 for p in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*")))
  assert steps == [2]


@pytest.mark.parametrize("overrides, message", [
    ({"model": "nosuchnet"}, "unknown model 'nosuchnet'; known models: unet"),
    ({"batch_size": -4}, "batch_size must be a positive integer"),
    ({"data.dir": "/no/such/folder"}, "is not an existing folder"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"loss": "focal"}, "loss must be one of"),
    ({"bn_chunks": 0}, "bn_chunks must be a positive integer"),
    ({"data.split": "slices"}, "data.split must be one of patient, paper"),
    ({"data.split": "paper", "data.folds": 5}, r"needs data.split='patient'"),
    ({"data.folds": 5, "data.fold": 5}, r"data.fold in \[0, folds\)"),
])
def test_bad_config_values(overrides, message, tmp_path):
  from jaxmamba.train import train_and_evaluate
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(tiny_config(**overrides), str(tmp_path))


def test_steps_trace_under_the_data_mesh(tiny, tmp_path, monkeypatch):
  """The jitted steps see the trainer's mesh as the context mesh, which the Triton scan needs to
  run per device (jaxmamba.ops.triton_dispatch._per_data_shard)."""
  from jaxmamba.models import registry
  from jaxmamba.train import train_and_evaluate
  seen = []

  class SpyNet(TinyNet):
    @nn.compact
    def __call__(self, x, train: bool = False):
      seen.append(jax.sharding.get_abstract_mesh().axis_names)
      return TinyNet.__call__(self, x, train)

  monkeypatch.setattr(registry, "build", lambda name, **kw: SpyNet())
  train_and_evaluate(tiny_config(max_steps=1, num_epochs=1), str(tmp_path))
  assert ("data",) in seen


def test_bfloat16_and_train_resize(tiny, tmp_path):
  """dtype=bfloat16 trains; train_image_size resizes images and masks inside the step."""
  from jaxmamba.train import train_and_evaluate
  results = train_and_evaluate(tiny_config(dtype="bfloat16", train_image_size=24, max_steps=3),
                               str(tmp_path))
  assert results["steps"] == 3 and np.isfinite(results["final"]["test"]["loss"])
  model_json = json.loads((tmp_path / "model.json").read_text())
  assert model_json["train_image_size"] == 24 and model_json["image_size"] == 32


def test_batch_size_not_divisible_by_devices_is_an_error(tiny, tmp_path, monkeypatch):
  from jaxmamba.train import train_and_evaluate
  monkeypatch.setattr(jax, "devices", lambda *a: [jax.local_devices()[0]] * 3)
  with pytest.raises(ValueError, match="multiple of the 3 devices"):
    train_and_evaluate(tiny_config(batch_size=4), str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Subprocess tests: the real entry point.

def _cli(workdir, *extra, devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  args = [sys.executable, os.path.abspath(__file__), "--config=unet", f"--workdir={workdir}",
          "--config.synthetic_run.enabled=False", "--config.data.synthetic.num_patients=6",
          "--config.data.synthetic.slices_per_patient=6", "--config.data.synthetic.image_size=32",
          "--config.batch_size=8", "--config.eval_batch_size=5", "--config.num_epochs=3",
          "--config.learning_rate=0.01", "--config.progress=False", "--config.num_figure_slices=2",
          "--config.tensorboard=False", *extra]
  return args, env


def _run(workdir, *extra, devices=1, timeout=300, extra_env=None):
  args, env = _cli(workdir, *extra, devices=devices)
  env.update(extra_env or {})
  return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted CLI run (1 device) that the kill -9 and 8-device runs are compared with."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_cli_last_line_has_test_dice_and_iou(reference_run):
  _, proc = reference_run
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("test (final checkpoint") and "Dice" in last and "IoU" in last


def test_kill_9_then_rerun_matches_uninterrupted(reference_run, tmp_path):
  ref_dir, _ = reference_run
  args, env = _cli(tmp_path, "--config.checkpoint_every_steps=1")
  env["TINY_STEP_SLEEP"] = "0.5"   # slow the steps down so the kill lands mid-run
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(tmp_path / "checkpoints" / "2"):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "results.json").exists()
  again = _run(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stdout
  step_a, a = _params_of(str(ref_dir))
  step_b, b = _params_of(str(tmp_path))
  assert step_a == step_b
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_ctrl_c_saves_then_resumes(tmp_path):
  args, env = _cli(tmp_path)
  env["TINY_STEP_SLEEP"] = "0.5"
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    train_log = tmp_path / "metrics" / "train.jsonl"
    if train_log.exists() and len(train_log.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "interrupted: saved a checkpoint at step" in out
  saved = int(out.split("saved a checkpoint at step")[1].split(";")[0])
  assert os.path.isdir(tmp_path / "checkpoints" / str(saved)) and saved >= 2
  again = _run(tmp_path)
  assert again.returncode == 0 and f"resumed from step {saved}" in again.stdout


def test_eight_fake_devices_match_one_device(reference_run, tmp_path):
  ref_dir, _ = reference_run
  proc = _run(tmp_path, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 8 device(s)" in proc.stdout
  step_a, a = _params_of(str(ref_dir))
  step_b, b = _params_of(str(tmp_path))
  assert step_a == step_b
  for k in a:   # same math, different reduction order across devices
    np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  ra = json.loads((ref_dir / "results.json").read_text())["final"]["test"]["slice"]["dice"]
  rb = json.loads((tmp_path / "results.json").read_text())["final"]["test"]["slice"]["dice"]
  assert abs(ra - rb) < 1e-3


def test_multihost_flag_single_process(tmp_path):
  """--multihost with an explicit one-process coordinator (all one machine can test)."""
  proc = _run(tmp_path, "--multihost", "--coordinator_address=localhost:34587",
              "--num_processes=1", "--process_id=0", "--config.max_steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, tmp_path):
  """Two jax.distributed processes on this machine (1 CPU device each, sharing the workdir as
  hosts share a file system): the same parameters as the one-process run."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = []
  for pid in range(2):
    args, env = _cli(tmp_path, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={pid}")
    procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    outs = [p.communicate(timeout=420) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = [f"process {i}:\n{p.communicate()[1][-1500:]}" for i, p in enumerate(procs)]
    pytest.fail("the two processes did not finish in 420 s (a hang, or a badly overloaded "
                "machine); their stderr tails:\n" + "\n".join(tails))
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "on 2 device(s)" in outs[0][0]
  ref_dir, _ = reference_run
  step_a, a = _params_of(str(ref_dir))
  step_b, b = _params_of(str(tmp_path))
  assert step_a == step_b
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  assert (tmp_path / "predictions.png").exists()


def test_cli_unknown_config_lists_known(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.run", "--config=nosuch",
                         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert "unknown config 'nosuch'" in proc.stderr and "umambabot_pp" in proc.stderr


def _script_main():
  """Entry for the subprocess tests: the tiny model, optional per-step sleep, experiments.run."""
  sys.path.insert(0, ROOT)
  _patch_registry()
  if os.environ.get("TINY_BUG"):   # an exception that is not the user's: keeps its traceback
    from jaxmamba.train import recipe
    def bug(config):
      raise ValueError("a bug, not a user error")
    recipe.validate_config = bug
  delay = float(os.environ.get("TINY_STEP_SLEEP", "0"))
  if delay:
    from jaxmamba import data
    real = data.batches

    def slow(*args, **kwargs):
      for batch in real(*args, **kwargs):
        time.sleep(delay)
        yield batch
    data.batches = slow
  from experiments import run
  run.run(sys.argv)


if __name__ == "__main__":
  _script_main()
