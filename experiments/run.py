"""Train and evaluate one model of Table I.

  python -m experiments.run --config=umambabot_pp               # synthetic data, minutes on a CPU
  python -m experiments.run --config=umambabot_pp --config.data.dir=PATH/kaggle_3m   # full recipe
  python -m experiments.run --config=umambabot_pp:runlocal         # tiny smoke run
  python -m experiments.run --config=unet --config.recipe=improved --workdir=runs/unet_improved

`--config` takes a bare name (a file of experiments/configs/, e.g. `unet`, `ulvmunet_v5`) or a path
to a config file, optionally followed by `:runlocal`; `--config.FIELD=VALUE` overrides any field
(see experiments/configs/base.py).  The workdir defaults to `./runs/<config name>` for a data folder
and `./runs/<config name>-synthetic` for the built-in synthetic data (`-runlocal-synthetic` etc.
with `:runlocal`), so the demo never resumes into a real-data run.  Rerunning the same command
resumes from its latest checkpoint; a rerun whose config differs in anything but the fields that
extend or observe a run (num_epochs, max_steps, progress, ...; jaxmamba/train/run_identity.py)
stops and names the differing fields: use a new --workdir, or --restart to start over in the
same folder.  Ctrl-C saves a checkpoint before exiting.  Errors in the input (config, data,
checkpoint, workdir) are printed as one line; anything else keeps its traceback.

Several hosts (`--multihost`): start the same command on every host, naming the coordinator
(process 0's host and a free port), the number of processes and each one's index, e.g. on 2 hosts

  host0$ python -m experiments.run --config=unet --config.data.dir=/data/kaggle_3m \\
           --workdir=/shared/runs/unet --multihost --coordinator_address=host0:1234 \\
           --num_processes=2 --process_id=0
  host1$ (the same with --process_id=1)

Without these three flags `jax.distributed.initialize()` detects them itself on SLURM, Open MPI
and Cloud TPU.  The global batch (config.batch_size) is split over every device of every host;
each host loads the data folder and feeds only its own rows.  The workdir must be on a file system
every host reaches (Orbax writes checkpoints collectively); only process 0 writes logs, figures
and results.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments.configs import base
from jaxmamba import host_memory

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config name (experiments/configs/NAME.py) or path, optionally :runlocal",
    lock_config=True)
flags.DEFINE_string("workdir", None, "output folder (default ./runs/<config name>, with "
                    "-synthetic appended without --config.data.dir)")
flags.DEFINE_bool("restart", False, "delete the workdir's previous run (checkpoints, metrics, "
                  "results) and start over, instead of resuming it")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (several hosts)")
flags.DEFINE_string("coordinator_address", None, "--multihost: HOST:PORT of process 0")
flags.DEFINE_integer("num_processes", None, "--multihost: number of processes")
flags.DEFINE_integer("process_id", None, "--multihost: index of this process")


def default_workdir(name: str, config_arg: str, data_dir: str) -> str:
  """runs/NAME[-ARG][-synthetic]: a synthetic demo and a real-data run never share a folder."""
  parts = [name] + ([config_arg] if config_arg else []) + ([] if data_dir else ["synthetic"])
  return os.path.join("runs", "-".join(parts))


def main(argv, name, config_arg=""):
  del argv
  if not FLAGS["verbosity"].present:
    # Orbax logs every save and restore at INFO through absl; keep the console to warnings.
    absl_logging.set_verbosity(absl_logging.WARNING)
  if FLAGS.multihost:
    import jax
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from jaxmamba.train import train_and_evaluate
  workdir = FLAGS.workdir or default_workdir(name, config_arg, _CONFIG.value.data.dir)
  train_and_evaluate(_CONFIG.value, workdir, restart=FLAGS.restart)


def run(argv=None, entry=None):
  """The CLI: resolves `--config=NAME[:ARG]`, then calls `entry(argv, NAME, ARG)` (default `main`)."""
  argv = sys.argv if argv is None else argv
  entry = entry or main
  try:
    argv, name = base.resolve_argv(argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if name is None:
    sys.exit(f"error: --config is required; known configs: {', '.join(base.known_configs())}")

  config_arg = base.config_value(argv).partition(":")[2]

  def _main(args):
    from jaxmamba.errors import UserError
    try:
      entry(args, name, config_arg)
    except KeyboardInterrupt:
      sys.exit(130)
    except (UserError, FloatingPointError) as e:   # fixable from the message: one line
      sys.exit(f"error: {e}")

  app.run(_main, argv=argv)


if __name__ == "__main__":
  host_memory.reexec()
  run()
