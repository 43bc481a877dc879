"""The checkpoint that was scored is the one loaded: experiments.predict and config.init_from read
the checkpoint a run's results.json reports as selected, unless told otherwise (which/step)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from tests.test_train import TinyNet, tiny, tiny_config  # noqa: F401


@pytest.fixture
def run(tiny, tmp_path_factory, monkeypatch):
  """A finished tiny run (authors' recipe: the final weights are scored) whose best-validation
  checkpoint is its first epoch's (the validation score is made to worsen every epoch)."""
  import itertools

  from jaxmamba.train import train_and_evaluate, trainer
  worsening = itertools.count()
  monkeypatch.setattr(trainer, "_score", lambda config, val: float(next(worsening)))
  workdir = tmp_path_factory.mktemp("run")
  results = train_and_evaluate(tiny_config(num_epochs=3), str(workdir))
  assert results["selected"] == "final" and results["best"]["step"] < results["final"]["step"]
  return workdir, results


def _params(item_or_variables):
  return jax.tree.map(np.asarray, item_or_variables["params"])


def _checkpoint_params(workdir, which, step):
  from jaxmamba.train.checkpoint import load_checkpoint
  return _params(load_checkpoint(str(workdir), which, step)[0])


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_workdir_loads_the_scored_checkpoint_unless_told_otherwise(run):
  from jaxmamba import checkpoint_io
  workdir, results = run
  final, best = results["final"]["step"], results["best"]["step"]
  _, variables = checkpoint_io.load_variables(str(workdir), "unet")
  _assert_same(_params(variables), _checkpoint_params(workdir, "latest", final))
  assert f"the final checkpoint (step {final})" in checkpoint_io.locate(str(workdir))[1]
  _, variables = checkpoint_io.load_variables(str(workdir), "unet", which="best")
  _assert_same(_params(variables), _checkpoint_params(workdir, "best", best))
  earlier = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[0]
  _, variables = checkpoint_io.load_variables(str(workdir), "unet", which="final", step=earlier)
  _assert_same(_params(variables), _checkpoint_params(workdir, "latest", earlier))
  with pytest.raises(checkpoint_io.CheckpointError, match="no best checkpoint at step 1 "):
    checkpoint_io.locate(str(workdir), "best", 1)


def test_selected_best_is_followed_too(run):
  from jaxmamba import checkpoint_io
  workdir, results = run
  saved = json.loads((workdir / "results.json").read_text())
  saved["selected"] = "best"
  (workdir / "results.json").write_text(json.dumps(saved))
  assert f"the best checkpoint (step {results['best']['step']})" in \
      checkpoint_io.locate(str(workdir))[1]


def test_predict_reads_and_names_the_scored_checkpoint(run, tmp_path, capsys):
  from experiments import predict
  workdir, results = run
  image = tmp_path / "slice.png"
  Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(image)
  assert predict.main(["--model", "unet", "--checkpoint", str(workdir), "--output",
                       str(tmp_path / "out"), str(image)]) == 0
  out = capsys.readouterr().out
  assert f"loaded the final checkpoint (step {results['final']['step']})" in out
  assert predict.main(["--model", "unet", "--checkpoint", str(workdir), "--which", "best",
                       "--output", str(tmp_path / "out"), str(image)]) == 0
  assert f"loaded the best checkpoint (step {results['best']['step']})" in capsys.readouterr().out


def test_init_from_a_workdir_starts_from_the_scored_checkpoint(run, capsys):
  from jaxmamba.train import trainer
  workdir, results = run
  setup = trainer._Setup(tiny_config(init_from=str(workdir)), workdir=None)
  assert f"initial weights from the final checkpoint (step {results['final']['step']})" in \
      capsys.readouterr().out
  _assert_same(_params(setup.state), _checkpoint_params(workdir, "latest",
                                                        results["final"]["step"]))
  setup = trainer._Setup(tiny_config(init_from=str(workdir), init_from_which="best"),
                         workdir=None)
  _assert_same(_params(setup.state), _checkpoint_params(workdir, "best", results["best"]["step"]))
