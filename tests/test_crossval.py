"""Cross-validation by patient: fold assignment, resumable folds, per-case outputs, protocol labels."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxmamba.data import splits as splits_lib
from tests.test_train import tiny, tiny_config  # noqa: F401  (tiny is a fixture)


def _patients(n, tumour_every=3):
  ids = [f"P{i:02d}" for i in range(n)]
  return ids, [i % tumour_every != 0 for i in range(n)]


@pytest.mark.parametrize("n,k", [(21, 5), (10, 3), (5, 5), (110, 22)])
def test_folds_are_disjoint_complete_and_stratified(n, k):
  ids, tumour = _patients(n)
  folds = splits_lib.patient_folds(ids, tumour, k, seed=3)
  assert len(folds) == k
  flat = [p for f in folds for p in f]
  assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))   # complete, disjoint
  sizes = [len(f) for f in folds]
  assert max(sizes) - min(sizes) <= 1
  has = dict(zip(ids, tumour))
  per_fold_tumour = [sum(has[p] for p in f) for f in folds]
  assert max(per_fold_tumour) - min(per_fold_tumour) <= 1              # stratified
  per_fold_free = [len(f) - t for f, t in zip(folds, per_fold_tumour)]
  assert max(per_fold_free) - min(per_fold_free) <= 1


def test_folds_ignore_input_order_and_follow_the_seed():
  ids, tumour = _patients(21)
  perm = np.random.default_rng(0).permutation(21)
  a = splits_lib.patient_folds(ids, tumour, 5, seed=1)
  b = splits_lib.patient_folds([ids[i] for i in perm], [tumour[i] for i in perm], 5, seed=1)
  assert a == b
  assert splits_lib.patient_folds(ids, tumour, 5, seed=2) != a


def test_fold_split_keeps_validation_out_of_the_held_out_fold():
  ids, tumour = _patients(21)
  folds = splits_lib.patient_folds(ids, tumour, 5, seed=0)
  tests = []
  for fold in range(5):
    train, val, test = splits_lib.fold_split(ids, tumour, 5, fold, seed=0)
    assert test == folds[fold]
    assert not set(val) & set(test) and not set(train) & set(test) and not set(train) & set(val)
    assert sorted(train + val + test) == sorted(ids)
    assert len(val) == 2 and any(dict(zip(ids, tumour))[p] for p in val)
    tests += test
  assert sorted(tests) == sorted(ids)          # every patient is held out exactly once


def test_bad_fold_arguments_are_clear_errors():
  ids, tumour = _patients(6)
  with pytest.raises(ValueError, match="k >= 2"):
    splits_lib.patient_folds(ids, tumour, 1)
  with pytest.raises(splits_lib.DataError, match="at least 7 patients"):
    splits_lib.patient_folds(ids, tumour, 7)
  with pytest.raises(ValueError, match=r"fold must be an integer in \[0, 3\)"):
    splits_lib.fold_split(ids, tumour, 3, 3)


def test_split_slices_folds_cover_every_slice_once_in_any_order():
  from jaxmamba import data
  c = data.default_config()
  c.synthetic.update(num_patients=7, slices_per_patient=3, image_size=16)
  slices = data.load_all(c)
  perm = np.random.default_rng(4).permutation(len(slices))
  held_out = []
  for fold in range(3):
    a = splits_lib.split_slices(slices, "patient", 0, folds=3, fold=fold)
    b = splits_lib.split_slices(slices.subset(perm), "patient", 0, folds=3, fold=fold)
    assert [x.names for x in a] == [x.names for x in b]
    held_out += a.test.names
    assert not set(a.test.patient_ids()) & set(a.train.patient_ids() + a.val.patient_ids())
  assert sorted(held_out) == sorted(slices.names)
  with pytest.raises(ValueError, match="needs data.split='patient'"):
    splits_lib.split_slices(slices, "paper", folds=3, fold=0)


def test_split_names_and_protocol_labels():
  from jaxmamba import data
  c = data.default_config()
  assert c.split == "patient"
  assert splits_lib.protocol(c) == "patient split (held-out patients)"
  c.folds, c.fold = 5, 2
  assert splits_lib.protocol(c) == "patient 5-fold CV, fold 2 (held-out patients)"
  c.split, c.folds = "slice", 0                 # the earlier name of the paper's split
  assert "patients shared between training and test" in splits_lib.protocol(c)
  with pytest.raises(ValueError, match="data.split must be one of patient, paper"):
    splits_lib.split_mode("slices")


def _cv_config():
  return tiny_config(**{"data.synthetic.num_patients": 6, "num_epochs": 2, "tensorboard": False})


def test_interrupted_cross_validation_resumes_where_it_stopped(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                               capsys):
  import jaxmamba.train
  from jaxmamba.train import crossval, trainer
  workdir = str(tmp_path / "cv")
  # Ctrl-C during fold 2 (index 1), at its second training step: the trainer saves a checkpoint
  # and raises KeyboardInterrupt, as on a real Ctrl-C.
  real_write = trainer.MetricWriter.write
  fired = []

  def write(self, stream, step, record):
    real_write(self, stream, step, record)
    if stream == "train" and step == 2 and "fold_1" in self.dir and not fired:
      fired.append(step)
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(trainer.MetricWriter, "write", write)
  with pytest.raises(KeyboardInterrupt):
    crossval.run_folds(_cv_config(), workdir, folds=3, seeds=1)
  assert fired
  assert os.path.exists(os.path.join(workdir, "fold_0", "results.json"))
  assert not os.path.exists(os.path.join(workdir, "fold_1", "results.json"))
  assert not os.path.exists(os.path.join(workdir, "fold_2"))
  capsys.readouterr()

  called = []
  real_train = jaxmamba.train.train_and_evaluate
  monkeypatch.setattr(jaxmamba.train, "train_and_evaluate",
                      lambda config, d, **kw: called.append(os.path.basename(d))
                      or real_train(config, d, **kw))
  runs = crossval.run_folds(_cv_config(), workdir, folds=3, seeds=1)
  out = capsys.readouterr().out
  assert called == ["fold_1", "fold_2"]                         # fold 1 was not redone
  assert "fold 0 (1 of 3): done before" in out and "resumed from step 2" in out

  cases, results = crossval.collect_cases(runs)
  summary = crossval.summarise(cases, results)
  crossval.write_outputs(workdir, cases, summary)
  with open(os.path.join(workdir, "cases.csv")) as f:
    assert f.readline().startswith("# patient 3-fold CV")
    rows = list(csv.DictReader(f))
  assert sorted(r["patient"] for r in rows) == [f"SYN_{i:03d}" for i in range(6)]
  for r in rows:
    split = json.load(open(os.path.join(workdir, f"fold_{r['fold']}", "split.json")))
    assert split["test"] == sorted(x["patient"] for x in rows if x["fold"] == r["fold"])
    assert r["patient"] not in split["train"] + split["val"]
  dice = np.array([float(r["dice"]) for r in rows])
  saved = json.load(open(os.path.join(workdir, "summary.json")))
  assert saved["patients"]["dice"] == pytest.approx(dice.mean())
  assert saved["patients"]["dice_sd"] == pytest.approx(dice.std(ddof=1))
  fold_means = [dice[[int(r["fold"]) == f for r in rows]].mean() for f in range(3)]
  assert saved["over_folds"]["dice"]["mean"] == pytest.approx(np.mean(fold_means))
  assert saved["over_folds"]["dice"]["sd"] == pytest.approx(np.std(fold_means, ddof=1))
  assert "both prediction and ground truth empty" in saved["empty"]
  assert crossval.headline(summary).startswith("unet (patient 3-fold CV")

  # A finished fold is reused only for the same run: another learning rate stops the command
  # before anything is trained or summarised under the new command's name.
  from jaxmamba.train import run_identity
  other = _cv_config()
  other.learning_rate = 2 * other.learning_rate
  called.clear()
  with pytest.raises(run_identity.WorkdirMismatchError, match="learning_rate"):
    crossval.run_folds(other, workdir, folds=3, seeds=1)
  assert called == []


def test_a_workdir_of_other_folds_is_refused(tiny, tmp_path):  # noqa: F811
  from jaxmamba.train import crossval
  d = tmp_path / "fold_0"
  d.mkdir()
  (d / "results.json").write_text(json.dumps({"folds": 5, "fold": 0}))
  from jaxmamba.errors import UserError
  with pytest.raises(UserError, match="fold 0 of 5, not fold 0 of 3"):
    crossval.run_folds(_cv_config(), str(tmp_path), folds=3, seeds=1)


@pytest.mark.parametrize("split", ["paper", "patient"])
def test_every_output_names_the_protocol(tiny, tmp_path, capsys, split):  # noqa: F811
  from jaxmamba.train import train_and_evaluate
  results = train_and_evaluate(tiny_config(**{"data.split": split, "num_epochs": 1}),
                               str(tmp_path))
  out = capsys.readouterr().out.strip().splitlines()
  saved = json.loads((tmp_path / "results.json").read_text())
  epochs = [json.loads(x) for x in (tmp_path / "metrics/epochs.jsonl").read_text().splitlines()]
  label = saved["protocol"]
  assert label == results["protocol"] and all(e["protocol"] == label for e in epochs)
  assert label in out[-1] and any(label in line for line in out[:3])
  if split == "paper":
    assert "patients shared between training and test" in label
    assert "per-patient (fragments: also trained on) Dice" in out[-1]
    assert "fragments" in saved["metric_notes"]["patient"]
  else:
    assert label == "patient split (held-out patients)" and "fragments" not in out[-1]
  cases = saved["final"]["test"]["cases"]
  assert len(cases) == saved["final"]["test"]["patient"]["num_patients"]
  assert np.mean([c["dice"] for c in cases]) == pytest.approx(
      saved["final"]["test"]["patient"]["dice"])
  timing = saved["timing_s"]
  assert set(timing) == {"setup", "validation", "final_evaluation", "case_metrics", "process_wall"}
  assert 0 < timing["case_metrics"] < timing["final_evaluation"] < timing["process_wall"]
  if saved["best"]["step"] == saved["final"]["step"]:     # one pass serves both
    assert saved["best"]["test"] == saved["final"]["test"]


def test_cli_checks_its_arguments(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "experiments.cv", "--config=unet", "--folds=1",
                         f"--workdir={tmp_path}"], cwd=root, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "need --folds >= 2" in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "experiments.cv", "--config=nosuch"], cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "unknown config 'nosuch'" in proc.stderr
