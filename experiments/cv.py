"""k-fold cross-validation by patient: every fold an ordinary run, then per-case results.

  python -m experiments.cv --config=ulvmunet --folds=5 [--seeds=1] [--workdir=DIR] \\
      [--config.data.dir=PATH/kaggle_3m] [--config.FIELD=VALUE ...]

Folds are patient-grouped and stratified by whether a patient has tumour
(`jaxmamba.data.splits.fold_split`; the runs: `jaxmamba.train.crossval`); fold i of seed s is `train_and_evaluate` of the config with
data.folds=K, data.fold=i, data.split_seed=split_seed+s, seed=seed+s, in WORKDIR/fold_i (or
WORKDIR/fold_i_seed_s when --seeds > 1).  The fold's validation patients (model selection) come
from the other folds.  Rerunning the command skips every fold whose results.json exists and
resumes an interrupted one from its own checkpoint; a finished fold whose run.json differs from
the config's stops the command (WorkdirMismatchError), and `--restart` reruns every fold anew.

Then WORKDIR/cases.csv holds one row per held-out patient (the checkpoint each run selected) and
WORKDIR/summary.json the mean, sd and median over patients and the mean ± sd over folds and
seeds; the console shows the headline (mean per-patient Dice ± sd).  Empty-volume conventions:
jaxmamba.train.metrics.EMPTY_CONVENTIONS (written into summary.json).
"""
from __future__ import annotations

import os
import time

from absl import flags
from absl import logging as absl_logging

from experiments import run as run_cli
from jaxmamba import host_memory
from jaxmamba.errors import ConfigError
from jaxmamba.train import crossval

FLAGS = flags.FLAGS
# --config and --workdir are experiments.run's flags (the same CLI, see run_cli.run).
flags.DEFINE_integer("folds", 5, "number of folds K (>= 2)")
flags.DEFINE_integer("seeds", 1, "repeats of the whole K-fold run, each with its own fold "
                     "assignment and initialisation")


def main(argv, name, config_arg=""):
  del argv
  if FLAGS.multihost:
    # Every fold's outputs and cases.csv/summary.json are written by one process here.
    raise ConfigError("experiments.cv runs on one host; --multihost is for experiments.run")
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  workdir = os.path.abspath(FLAGS.workdir or run_cli.default_workdir(
      f"cv_{name}", config_arg, FLAGS.config.data.dir))
  os.makedirs(workdir, exist_ok=True)
  runs = crossval.run_folds(FLAGS.config, workdir, FLAGS.folds, FLAGS.seeds, FLAGS.restart)
  t0 = time.perf_counter()
  cases, all_results = crossval.collect_cases(runs)
  summary = crossval.summarise(cases, all_results)
  crossval.write_outputs(workdir, cases, summary)
  print(f"cases in {workdir}/cases.csv, summary in {workdir}/summary.json "
        f"({time.perf_counter() - t0:.1f} s)")
  print(crossval.headline(summary), flush=True)


if __name__ == "__main__":
  host_memory.reexec()
  run_cli.run(entry=main)
