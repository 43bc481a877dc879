"""The real entry point on a real model: `experiments.run --config=umambabot_pp:runlocal`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_umambabot_pp_runlocal(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config=umambabot_pp:runlocal",
       f"--workdir={tmp_path}", "--config.progress=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].startswith("test (final checkpoint, step 4; patient split (held-out patients)): Dice")
  assert any("--config.data.dir=PATH/kaggle_3m" in line for line in lines)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["model"] == "umambabot_pp" and results["num_params"] == 10_076_356
  assert results["steps"] == 4 and results["synthetic"]
  for f in ("model.json", "split.json", "predictions.png", "checkpoints/4", "metrics/train.jsonl"):
    assert (tmp_path / f).exists(), f
