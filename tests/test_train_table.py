"""experiments.table on hand-made run folders (results.json + figure_slices.npz)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(dice_paper, iou_paper, dice_slice):
  return {"loss": 0.1,
          "paper": {"dice": dice_paper, "dice_nanmean": dice_paper, "iou": iou_paper},
          "slice": {"dice": dice_slice, "iou": dice_slice - 0.1},
          "patient": {"dice": dice_slice + 0.01}}


def _fake_run(path, model, params, dice, select="final"):
  os.makedirs(path)
  results = {"model": model, "num_params": params, "train_time_s": 3725.0, "images_per_s": 12.5,
             "selected": select,
             "final": {"step": 10, "val": _split(0.5, 0.4, 0.6), "test": _split(dice, 0.7, 0.8)},
             "best": {"step": 5, "val": _split(0.6, 0.5, 0.7), "test": _split(0.11, 0.12, 0.13)}}
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)
  names = np.asarray(["P_1", "P_2"])
  images = np.zeros((2, 16, 16, 3), np.uint8)
  masks = np.zeros((2, 16, 16), np.uint8)
  masks[:, 4:8, 4:8] = 1
  np.savez(os.path.join(path, "figure_slices.npz"), names=names, images=images, masks=masks,
           preds=masks.astype(bool))


def test_table_rows_figures_and_selected_checkpoint(tmp_path):
  from experiments import table
  _fake_run(tmp_path / "a", "unet", 7_765_985, 0.8929)
  _fake_run(tmp_path / "b", "ulvmunet", 49_457, 0.7955, select="best")
  out = tmp_path / "out"
  rows, written = table.make_table([str(tmp_path / "a"), str(tmp_path / "b")], str(out))
  assert written == ["table.md", "table.csv", "figure2.png", "figure3.png"]
  assert [r["model"] for r in rows] == ["unet", "ulvmunet"]
  assert rows[0]["dice_paper"] == pytest.approx(0.8929)
  assert rows[1]["dice_paper"] == pytest.approx(0.11)       # the best checkpoint was selected
  md = (out / "table.md").read_text()
  assert "| unet | 7,765,985 |  | 0.8100 |  |  | 0.8929 | 0.7000 |" in md and "1h02m05s" in md
  with open(out / "table.csv") as f:
    assert [r["model"] for r in csv.DictReader(f)] == ["unet", "ulvmunet"]
  for png in ("figure2.png", "figure3.png"):
    assert (out / png).stat().st_size > 1000


def test_runs_of_one_model_are_told_apart(tmp_path):
  from experiments import table
  paper = "paper slice split (patients shared between training and test)"
  patient = "patient split (held-out patients)"
  rows = [{"model": "ulvmunet", "recipe": "paper", "data": "real", "protocol": paper},
          {"model": "ulvmunet", "recipe": "improved", "data": "real", "protocol": patient},
          {"model": "ulvmunet", "recipe": "paper", "data": "real", "protocol": paper},
          {"model": "unet", "recipe": "paper", "data": "synthetic", "protocol": patient}]
  dirs = ["runs/a", "runs/b", "runs/c/", "runs/d"]
  assert table.labels(rows, dirs) == [
      "ulvmunet (paper, real, paper slice split) [a]",
      "ulvmunet (improved, real, patient split)",
      "ulvmunet (paper, real, paper slice split) [c]", "unet"]
  results = {"model": "unet", "num_params": 1, "selected": "final", "recipe": "improved",
             "synthetic": False, "data_split": "patient",
             "final": {"test": _split(0.5, 0.4, 0.6)}}
  r = table.row(results)
  assert (r["recipe"], r["data"], r["protocol"]) == ("improved", "real", patient)


def test_figure3_is_skipped_and_said_when_runs_share_no_slices(tmp_path):
  from experiments import table
  _fake_run(tmp_path / "a", "unet", 7_765_985, 0.8929)
  _fake_run(tmp_path / "b", "ulvmunet", 49_457, 0.7955)
  other = dict(np.load(tmp_path / "b" / "figure_slices.npz"))
  other["names"] = np.array([f"other_{n}" for n in other["names"]])
  np.savez(tmp_path / "b" / "figure_slices.npz", **other)
  _, written = table.make_table([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "o"))
  assert "figure3.png" not in written and not (tmp_path / "o" / "figure3.png").exists()


def test_table_cli_rejects_unfinished_run(tmp_path):
  os.makedirs(tmp_path / "empty")
  proc = subprocess.run([sys.executable, "-m", "experiments.table", str(tmp_path / "empty"),
                         f"--out={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "no results.json" in proc.stderr


def _fake_cv(path, model, dice_by_fold):
  """A cross-validation folder as experiments.cv leaves it, from hand-made fold results."""
  from jaxmamba.train import crossval
  runs, folds = [], len(dice_by_fold)
  for fold, dice in enumerate(dice_by_fold):
    d = os.path.join(path, f"fold_{fold}")
    os.makedirs(d)
    test = _split(0.6 + 0.1 * fold, 0.5, 0.7)
    test["cases"] = [{"patient": f"P{fold}_{i}", "slices": 3, "true_pixels": 10,
                      "pred_pixels": 9, "dice": x, "iou": x / 2, "hd95": 4.0 * (i + 1)}
                     for i, x in enumerate(dice)]
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({"model": model, "num_params": 49_457, "folds": folds, "fold": fold,
                 "recipe": "paper", "synthetic": False, "selected": "final", "epochs": 4.0,
                 "train_time_s": 100.0, "final": {"test": test}}, f)
    runs.append((0, fold, d))
  cases, results = crossval.collect_cases(runs)
  crossval.write_outputs(path, cases, crossval.summarise(cases, results))


def test_cross_validation_rows_show_mean_and_sd_and_the_dice_figure(tmp_path):
  from experiments import table
  _fake_cv(str(tmp_path / "cv"), "ulvmunet", [[0.9, 0.7], [0.5, 0.3], [0.8]])
  _fake_run(tmp_path / "p", "ulvmunet_v2", 42_737, 0.8243)
  results = json.loads((tmp_path / "p" / "results.json").read_text())
  results["protocol"] = "paper slice split (patients shared between training and test)"
  results["final"]["test"]["cases"] = [{"dice": 0.4}, {"dice": 0.6}]
  (tmp_path / "p" / "results.json").write_text(json.dumps(results))
  out = tmp_path / "out"
  rows, written = table.make_table([str(tmp_path / "cv"), str(tmp_path / "p")], str(out))
  assert "figure4.png" in written and (out / "figure4.png").stat().st_size > 1000
  cv_row = rows[0]
  dice = np.array([0.9, 0.7, 0.5, 0.3, 0.8])
  assert cv_row["dice_patient"] == pytest.approx(dice.mean())
  assert cv_row["dice_patient_sd"] == pytest.approx(dice.std(ddof=1))
  assert cv_row["hd95_patient"] == pytest.approx(np.mean([4, 8, 4, 8, 4]))
  paper = np.array([0.6, 0.7, 0.8])             # the folds' paper-metric Dice
  assert cv_row["dice_paper"] == pytest.approx(paper.mean())
  assert cv_row["dice_paper_sd"] == pytest.approx(paper.std(ddof=1))
  md = (out / "table.md").read_text()
  assert (f"| ulvmunet | 49,457 | patient 3-fold CV (held-out patients), 1 seed(s) | "
          f"{dice.mean():.4f} ± {dice.std(ddof=1):.4f} |") in md
  assert f"{paper.mean():.4f} ± {paper.std(ddof=1):.4f}" in md
  assert "| paper slice split (patients shared between training and test) | 0.8100 (fragments) |" in md
  with open(out / "table.csv") as f:
    got = list(csv.DictReader(f))
  assert float(got[0]["dice_patient_sd"]) == pytest.approx(dice.std(ddof=1))
  assert got[1]["dice_patient_sd"] == ""
  assert table.patient_dice(str(tmp_path / "cv"), table.load_run(str(tmp_path / "cv"))) == \
      pytest.approx(dice.tolist())
