"""k-fold cross-validation by patient: every fold an ordinary run, then per-case results.

  python -m experiments.cv --config=ulvmunet --folds=5 [--seeds=1] [--workdir=DIR] \\
      [--config.data.dir=PATH/kaggle_3m] [--config.FIELD=VALUE ...]

Folds are patient-grouped and stratified by whether a patient has tumour
(`jaxmamba.data.splits.fold_split`); fold i of seed s is `train_and_evaluate` of the config with
data.folds=K, data.fold=i, data.split_seed=split_seed+s, seed=seed+s, in WORKDIR/fold_i (or
WORKDIR/fold_i_seed_s when --seeds > 1).  The fold's validation patients (model selection) come
from the other folds.  Rerunning the command skips every fold whose results.json exists and
resumes an interrupted one from its own checkpoint.

Then WORKDIR/cases.csv holds one row per held-out patient (the checkpoint each run selected) and
WORKDIR/summary.json the mean, sd and median over patients and the mean ± sd over folds and
seeds; the console shows the headline (mean per-patient Dice ± sd).  Empty-volume conventions:
jaxmamba.train.metrics.EMPTY_CONVENTIONS (written into summary.json).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments.configs import base

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config name (experiments/configs/NAME.py) or path, optionally :runlocal",
    lock_config=False)
flags.DEFINE_integer("folds", 5, "number of folds K (>= 2)")
flags.DEFINE_integer("seeds", 1, "repeats of the whole K-fold run, each with its own fold "
                     "assignment and initialisation")
flags.DEFINE_string("workdir", None, "output folder (default ./runs/cv_<config name>)")

CASE_COLUMNS = ("patient", "fold", "seed", "slices", "true_pixels", "pred_pixels", "dice", "iou",
                "hd95")


def fold_dir(workdir: str, fold: int, seed: int, seeds: int) -> str:
  return os.path.join(workdir, f"fold_{fold}" + (f"_seed_{seed}" if seeds > 1 else ""))


def fold_config(config, folds: int, fold: int, seed: int):
  """The run config of one fold: the given config with the fold fields set."""
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.folds, c.data.fold = folds, fold
  c.data.split_seed = config.data.split_seed + seed
  c.seed = config.seed + seed
  return c


def _load_results(path: str, folds: int, fold: int) -> dict:
  with open(path) as f:
    results = json.load(f)
  if (results.get("folds"), results.get("fold")) != (folds, fold):
    raise ValueError(f"{path} is from fold {results.get('fold')} of {results.get('folds')}, not "
                     f"fold {fold} of {folds}: use another --workdir")
  return results


def run_folds(config, workdir: str, folds: int, seeds: int) -> list[tuple[int, int, str]]:
  """Trains and evaluates every missing fold; returns [(seed, fold, run dir)]."""
  from jaxmamba.train import train_and_evaluate
  if folds < 2 or seeds < 1:
    raise ValueError(f"need --folds >= 2 and --seeds >= 1, got {folds} and {seeds}")
  runs = []
  for seed in range(seeds):
    for fold in range(folds):
      d = fold_dir(workdir, fold, seed, seeds)
      runs.append((seed, fold, d))
      results = os.path.join(d, "results.json")
      label = f"fold {fold + 1}/{folds}" + (f", seed {seed + 1}/{seeds}" if seeds > 1 else "")
      if os.path.exists(results):
        _load_results(results, folds, fold)
        print(f"{label}: done before ({results}); skipped", flush=True)
        continue
      print(f"{label}: {d}", flush=True)
      t0 = time.perf_counter()
      train_and_evaluate(fold_config(config, folds, fold, seed), d)
      print(f"{label}: finished in {time.perf_counter() - t0:.0f} s", flush=True)
  return runs


def collect_cases(runs) -> tuple[list[dict], list[dict]]:
  """(case rows of every held-out patient, the runs' results) from finished fold folders."""
  cases, all_results = [], []
  for seed, fold, d in runs:
    with open(os.path.join(d, "results.json")) as f:
      results = json.load(f)
    test = results[results.get("selected", "final")]["test"]
    if "cases" not in test:
      raise ValueError(f"{d}/results.json has no per-case results (written by an older version)")
    cases += [{"fold": fold, "seed": seed, **c} for c in test["cases"]]
    all_results.append(results)
  return cases, all_results


def _mean_sd(values) -> dict:
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  return {"mean": float(v.mean()) if len(v) else None,
          "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def summarise(cases: list[dict], all_results: list[dict]) -> dict:
  """Over patients (mean, sd, median), over folds and over seeds (mean ± sd of their means)."""
  from jaxmamba.train import metrics
  first = all_results[0]
  summary = {"model": first["model"], "num_params": first["num_params"],
             "protocol": f"patient {first['folds']}-fold CV (held-out patients)",
             "recipe": first.get("recipe"), "synthetic": first.get("synthetic"),
             "folds": first["folds"], "seeds": len({c["seed"] for c in cases}),
             "epochs": first.get("epochs"), "selected": first.get("selected"),
             "train_time_s": float(sum(r.get("train_time_s") or 0 for r in all_results)),
             "patients": metrics.summarise_cases(cases),
             "empty": metrics.EMPTY_CONVENTIONS}
  for group in ("fold", "seed"):
    keys = sorted({(c["seed"], c["fold"]) if group == "fold" else c["seed"] for c in cases})
    per = {}
    for metric in ("dice", "iou", "hd95"):
      means = []
      for k in keys:
        sel = [c[metric] for c in cases
               if ((c["seed"], c["fold"]) if group == "fold" else c["seed"]) == k]
        means.append(_mean_sd(sel)["mean"])
      per[metric] = _mean_sd([m for m in means if m is not None])
    summary[f"over_{group}s"] = per
  # The paper's batch-pooled test Dice of each fold, for comparison with Table I's metric.
  summary["over_folds"]["dice_paper"] = _mean_sd(
      [r[r.get("selected", "final")]["test"]["paper"]["dice_nanmean"] for r in all_results])
  return summary


def write_outputs(workdir: str, cases: list[dict], summary: dict) -> None:
  with open(os.path.join(workdir, "cases.csv"), "w", newline="") as f:
    f.write(f"# {summary['protocol']}; {summary['empty']}\n")
    w = csv.DictWriter(f, fieldnames=CASE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(cases)
  tmp = os.path.join(workdir, "summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(workdir, "summary.json"))


def headline(summary: dict) -> str:
  p, f = summary["patients"], summary["over_folds"]["dice"]
  fold_sd = f"{f['sd']:.3f}" if f["sd"] is not None else "n/a"
  return (f"{summary['model']} ({summary['protocol']}, {summary['seeds']} seed(s)): per-patient "
          f"Dice {p['dice']:.3f} ± {p['dice_sd']:.3f} (mean ± sd over {p['num_patients']} "
          f"patients; median {p['dice_median']:.3f}; over folds {f['mean']:.3f} ± {fold_sd}), "
          f"IoU {p['iou']:.3f}, HD95 {p['hd95']:.1f} px ({p['hd95_undefined']} undefined)")


def is_cv_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "summary.json"))


def fold_dirs(workdir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(workdir, "fold_*")))


def main(argv, name):
  del argv
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  workdir = os.path.abspath(FLAGS.workdir or os.path.join("runs", f"cv_{name}"))
  os.makedirs(workdir, exist_ok=True)
  runs = run_folds(_CONFIG.value, workdir, FLAGS.folds, FLAGS.seeds)
  t0 = time.perf_counter()
  cases, all_results = collect_cases(runs)
  summary = summarise(cases, all_results)
  write_outputs(workdir, cases, summary)
  print(f"cases in {workdir}/cases.csv, summary in {workdir}/summary.json "
        f"({time.perf_counter() - t0:.1f} s)")
  print(headline(summary), flush=True)


def run(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    argv, name = base.resolve_argv(argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if name is None:
    sys.exit(f"error: --config is required; known configs: {', '.join(base.known_configs())}")

  def _main(args):
    try:
      main(args, name)
    except KeyboardInterrupt:
      sys.exit(130)
    except (ValueError, FloatingPointError) as e:
      sys.exit(f"error: {e}")

  app.run(_main, argv=argv)


if __name__ == "__main__":
  run()
