"""k-fold cross-validation by patient: the folds as ordinary runs, then per-case results.

`run_folds` trains fold i of seed s as `train_and_evaluate` of the config with data.folds=K,
data.fold=i, data.split_seed=split_seed+s, seed=seed+s in WORKDIR/fold_i (WORKDIR/fold_i_seed_s
with several seeds), skipping folds whose results.json exists (an interrupted fold resumes from
its own checkpoint).  `collect_cases`, `summarise` and `write_outputs` turn the finished folds
into cases.csv (one row per held-out patient) and summary.json (mean, sd, median over patients;
mean ± sd over folds and over seeds).  The CLI is experiments/cv.py.
"""
from __future__ import annotations

import csv
import json
import os
import time

import ml_collections
import numpy as np

from jaxmamba.errors import ConfigError, UserError
from jaxmamba.train import metrics, recipe, run_identity, writers

CASE_COLUMNS = ("patient", "fold", "seed", "slices", "true_pixels", "pred_pixels", "dice", "iou",
                "hd95")


def fold_dir(workdir: str, fold: int, seed: int, seeds: int) -> str:
  return os.path.join(workdir, f"fold_{fold}" + (f"_seed_{seed}" if seeds > 1 else ""))


def fold_config(config, folds: int, fold: int, seed: int):
  """The run config of one fold: the given config with the fold fields set."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.folds, c.data.fold = folds, fold
  c.data.split_seed = config.data.split_seed + seed
  c.seed = config.seed + seed
  return c


def _load_results(path: str, folds: int, fold: int) -> dict:
  with open(path) as f:
    results = json.load(f)
  if (results.get("folds"), results.get("fold")) != (folds, fold):
    raise UserError(f"{path} is from fold {results.get('fold')} of {results.get('folds')}, not "
                     f"fold {fold} of {folds}: use another --workdir")
  return results


def run_folds(config, workdir: str, folds: int, seeds: int,
              restart: bool = False) -> list[tuple[int, int, str]]:
  """Trains and evaluates every missing fold (every fold anew with `restart`); returns
  [(seed, fold, run dir)].  A finished fold is reused only if it is a run of this config."""
  from jaxmamba.train import train_and_evaluate
  if folds < 2 or seeds < 1:
    raise ConfigError(f"need --folds >= 2 and --seeds >= 1, got {folds} and {seeds}")
  runs = []
  for seed in range(seeds):
    for fold in range(folds):
      d = fold_dir(workdir, fold, seed, seeds)
      runs.append((seed, fold, d))
      results = os.path.join(d, "results.json")
      # fold_i and seed s are 0-based, as in the folder names, cases.csv and results.json.
      label = f"fold {fold} ({fold + 1} of {folds})" + (
          f", seed {seed} ({seed + 1} of {seeds})" if seeds > 1 else "")
      run_config = fold_config(config, folds, fold, seed)
      if os.path.exists(results) and not restart:
        _load_results(results, folds, fold)
        run_identity.check_finished(recipe.resolve_config(run_config), d)
        print(f"{label}: done before ({results}); skipped", flush=True)
        continue
      print(f"{label}: {d}", flush=True)
      t0 = time.perf_counter()
      train_and_evaluate(run_config, d, restart=restart)
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
      raise UserError(f"{d}/results.json has no per-case results (written by an older version)")
    cases += [{"fold": fold, "seed": seed, **c} for c in test["cases"]]
    all_results.append(results)
  return cases, all_results


def _mean_sd(values) -> dict:
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  return {"mean": float(v.mean()) if len(v) else None,
          "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def summarise(cases: list[dict], all_results: list[dict]) -> dict:
  """Over patients (mean, sd, median), over folds and over seeds (mean ± sd of their means)."""
  first = all_results[0]
  summary = {"model": first["model"], "num_params": first["num_params"],
             "protocol": f"patient {first['folds']}-fold CV (held-out patients)",
             "recipe": first.get("recipe"), "synthetic": first.get("synthetic"),
             "folds": first["folds"], "seeds": len({c["seed"] for c in cases}),
             "epochs": first.get("epochs"), "selected": first.get("selected"),
             "train_time_s": float(sum(r.get("train_time_s") or 0 for r in all_results)),
             "patients": metrics.summarise_cases(cases),
             "empty": metrics.EMPTY_CONVENTIONS}
  for name, key in (("over_folds", lambda c: (c["seed"], c["fold"])),
                    ("over_seeds", lambda c: c["seed"])):
    groups = {}
    for c in cases:
      groups.setdefault(key(c), []).append(c)
    means = {m: [_mean_sd([c[m] for c in g])["mean"] for g in groups.values()]
             for m in ("dice", "iou", "hd95")}
    summary[name] = {m: _mean_sd([v for v in vs if v is not None]) for m, vs in means.items()}
  # Each fold's paper-metric (batch-pooled) and per-slice test scores, as in single-run tables.
  tests = [r[r.get("selected", "final")]["test"] for r in all_results]
  for key, family, metric in (("dice_paper", "paper", "dice_nanmean"), ("iou_paper", "paper", "iou"),
                              ("dice_slice", "slice", "dice"), ("iou_slice", "slice", "iou")):
    summary["over_folds"][key] = _mean_sd([t[family][metric] for t in tests])
  return summary


def write_outputs(workdir: str, cases: list[dict], summary: dict) -> None:
  with open(os.path.join(workdir, "cases.csv"), "w", newline="") as f:
    f.write(f"# {summary['protocol']}; {summary['empty']}\n")
    w = csv.DictWriter(f, fieldnames=CASE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(cases)
  # NaN (undefined) -> null: strict JSON
  writers.write_json(os.path.join(workdir, "summary.json"), writers.plain(summary))


def _num(x, digits: int = 3) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def headline(summary: dict) -> str:
  p, f = summary["patients"], summary["over_folds"]["dice"]
  return (f"{summary['model']} ({summary['protocol']}, {summary['seeds']} seed(s)): per-patient "
          f"Dice {_num(p['dice'])} ± {_num(p['dice_sd'])} (mean ± sd over {p['num_patients']} "
          f"patients; median {_num(p['dice_median'])}; over folds {_num(f['mean'])} ± "
          f"{_num(f['sd'])}), IoU {_num(p['iou'])}, HD95 {_num(p['hd95'], 1)} px "
          f"({p['hd95_undefined']} undefined)")


def is_cv_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "summary.json"))
