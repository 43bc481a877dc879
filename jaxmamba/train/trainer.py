"""Training loop: `train_and_evaluate(config, workdir)`.

Data parallel over every visible device (one process or several hosts after
`jax.distributed.initialize`): a Mesh with one `data` axis, parameters and optimiser state
replicated, each batch split along its first axis.  The same code runs on one CPU, on fake CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on GPUs.  BatchNorm statistics
are computed per `config.bn_chunks` pieces of the batch, as the authors' 4-GPU DataParallel did
(spec §9.4; `jaxmamba.train.bn_chunks`), or over the global batch with `bn_chunks=1`.

Deterministic for a given config: initialisation, shuffling (`data.batches(seed, epoch)`) and
augmentation (key folded with the step) depend only on `config.seed` and the step, so a run resumed
from a checkpoint ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmamba import checkpoint_io, data
from jaxmamba.errors import ConfigError
from jaxmamba.models import registry
from jaxmamba.nn import torch_compat
from jaxmamba.nn.torch_compat import resize_bilinear
from jaxmamba.data import splits as splits_lib
from jaxmamba.train import evaluate as ev
from jaxmamba.train import bn_chunks, losses, metrics, recipe, run_identity, writers
from jaxmamba.train.checkpoint import Checkpointer
from jaxmamba.train.writers import MetricWriter

REAL_DATA_HINT = ("To train on the real data with the full recipe, pass "
                  "--config.data.dir=PATH/kaggle_3m (the folder of 110 patient folders).")
# The models whose paper runs started from torchvision's ImageNet encoder weights.
IMAGENET_STARTED = ("resnet18_seg", "resnet50_seg")


def start_notice(config) -> str | None:
  """What a user should know before a run that cannot be the paper's, or None."""
  if config.model in IMAGENET_STARTED and config.recipe == "paper" and not config.get("init_from"):
    return (f"note: {config.model} starts from random weights; the paper started its encoder from "
            "torchvision's ImageNet weights. To do the same, convert a local torchvision .pth "
            f"(python -m jaxmamba.convert --model {config.model} --torchvision-encoder FILE.pth "
            "--workdir DIR) and pass --config.init_from=DIR.")
  return None


def say(msg: str) -> None:
  """User-facing message on stdout (process 0 only)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def _write_json(path: str, obj) -> None:
  writers.write_json(path, obj, default=float)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _under_mesh(mesh, fn):
  """`fn` traced and run with `mesh` as the context mesh: ops that XLA cannot partition (the
  Triton selective scan) read its "data" axis and run on each device's rows."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return call


class _Setup:
  """Everything built once per run: mesh, data, model, optimiser, jitted steps."""

  def __init__(self, config, workdir):
    self.config = config
    self.devices = jax.devices()
    self.num_devices = len(self.devices)
    if config.batch_size % self.num_devices:
      raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of the "
                       f"{self.num_devices} devices (data parallelism splits each batch evenly)")
    self.mesh = Mesh(np.asarray(self.devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))

    self.splits = data.load_splits(config.data)
    train = self.splits.train
    self.image_size = train.images.shape[1]
    self.train_size = config.train_image_size or self.image_size
    self.steps_per_epoch = data.num_batches(train, config.batch_size, True)
    if self.steps_per_epoch == 0:
      raise ConfigError(f"the training split has {len(train)} slices, fewer than "
                       f"config.batch_size={config.batch_size}")
    total = self.steps_per_epoch * config.num_epochs
    self.total_steps = min(total, config.max_steps) if config.max_steps else total

    self.model = registry.build(config.model, **recipe.model_kwargs(config))
    self.tx = recipe.make_optimizer(config, self.total_steps)
    smooth = config.loss_smooth if config.loss_smooth > 0 else None
    self.loss_fn = losses.get_loss(config.loss, smooth)
    init_rng, self.aug_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init = jax.jit(self._init_state, out_shardings=self.replicated).lower(init_rng)
    # XLA's CPU optimiser spends about a minute on the threefry bits of a 10M-parameter init
    # that runs once; unoptimised it compiles 4x faster (same values).
    options = ({"xla_backend_optimization_level": 0}
               if self.devices[0].platform == "cpu" else None)
    self.state = init.compile(compiler_options=options)(init_rng)
    self.has_bn = "batch_stats" in self.state
    if config.get("init_from"):
      self.state = self._start_from(config.init_from)
    self.num_params = count_params(self.state["params"])

    train_step = jax.jit(self._train_step, in_shardings=(self.replicated, self.batch_sharding),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
    eval_fn = ev.make_eval_step(self.model, self.loss_fn, config.threshold, self.has_bn)
    eval_step = jax.jit(eval_fn, in_shardings=(self.replicated,) + (self.batch_sharding,) * 3,
                        out_shardings=self.replicated)
    self.train_step = _under_mesh(self.mesh, train_step)
    self.eval_step = _under_mesh(self.mesh, eval_step)

  def _init_state(self, rng):
    x = jnp.zeros((1, self.train_size, self.train_size, 3), jnp.float32)
    variables = self.model.init(rng, x, train=False)
    params = variables["params"]
    state = {"params": params, "opt_state": self.tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state

  def _start_from(self, path):
    """The initial state with params (and BatchNorm statistics) read from `path`."""
    which, step = self.config.get("init_from_which", "selected"), self.config.get("init_from_step")
    _, variables, what = checkpoint_io.load_located(path, self.config.model, which, step or None)
    for col in ("params", "batch_stats") if self.has_bn else ("params",):
      if col in variables:
        torch_compat.check_variables_match(self.state[col], variables[col], f"{col} in {path}")
    params = jax.device_put(variables["params"], self.replicated)
    state = dict(self.state, params=params,
                 opt_state=jax.jit(self.tx.init, out_shardings=self.replicated)(params))
    if self.has_bn and "batch_stats" in variables:
      state["batch_stats"] = jax.device_put(variables["batch_stats"], self.replicated)
    say(f"initial weights from {what}")
    return state

  def _train_step(self, state, batch):
    images, masks = data.to_float(batch)
    rng = jax.random.fold_in(self.aug_rng, state["step"])
    images, masks = data.augment(rng, images, masks, self.config.data.augment)
    if self.train_size != images.shape[1]:
      # SegFormer's recipe: torch Resize (bilinear, no antialias) of the image and of the
      # binarised mask, giving soft targets at the edges (spec §9.5).
      size = (self.train_size, self.train_size)
      images = resize_bilinear(images, size, align_corners=False)
      masks = resize_bilinear(masks.astype(jnp.float32), size, align_corners=False)

    def compute(params):
      variables = {"params": params}
      if self.has_bn:
        variables["batch_stats"] = state["batch_stats"]
        logits, updates = bn_chunks.apply_in_chunks(self.model, variables, images,
                                                    self.config.bn_chunks)
      else:
        logits, updates = self.model.apply(variables, images, train=True), {}
      return self.loss_fn(logits.astype(jnp.float32), masks), updates

    (loss, updates), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
    deltas, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], deltas), "opt_state": opt_state,
           "step": state["step"] + 1}
    if self.has_bn:
      new["batch_stats"] = updates["batch_stats"]
    stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": opt_state.hyperparams["learning_rate"]}
    return new, stats

  def variables(self, state) -> dict:
    v = {"params": state["params"]}
    if self.has_bn:
      v["batch_stats"] = state["batch_stats"]
    return v

  def evaluate(self, state, slice_set, keep=None, per_case=False) -> dict:
    return ev.evaluate(self.eval_step, self.variables(state), slice_set,
                       self.config.eval_batch_size, self.batch_sharding, self.num_devices, keep,
                       per_case)


def _score(config, val: dict) -> float:
  """The best-checkpoint criterion as a number to minimise."""
  if config.best_metric == "val_loss":
    return val["loss"]
  if config.best_metric == "val_dice_slice":
    return -val["slice"]["dice"]
  return -val["paper"]["dice_nanmean"]


def _summary(split_result: dict) -> dict:
  """The scalars worth a line in the epoch log."""
  return {"loss": split_result["loss"], "dice_paper": split_result["paper"]["dice_nanmean"],
          "iou_paper": split_result["paper"]["iou"], "dice_slice": split_result["slice"]["dice"],
          "dice_patient": split_result["patient"]["dice"]}


class _HostState:
  """Loop bookkeeping that is not in the Orbax item, saved next to it, keyed by step."""

  def __init__(self, path):
    self.path = path
    self.by_step = {}
    if os.path.exists(path):
      with open(path) as f:
        self.by_step = json.load(f)

  def get(self, step: int) -> dict:
    return dict(self.by_step.get(str(step), {}))

  def put(self, step: int, values: dict) -> None:
    # A copy: the loop keeps updating its dict, and each step must keep the values it had.
    self.by_step[str(step)] = dict(values)
    keep = sorted(self.by_step, key=int)[-20:]
    self.by_step = {k: self.by_step[k] for k in keep}
    _write_json(self.path, self.by_step)


def train_and_evaluate(config, workdir: str, restart: bool = False) -> dict:
  """Trains `config.model` per `config`, evaluates it, and writes everything under `workdir`.

  Leaves: run.json, model.json, split.json, checkpoints/ (periodic + best/), metrics/*.jsonl,
  tensorboard/, results.json, predictions.png, figure_slices.npz.  Rerunning in the same workdir
  resumes from the latest checkpoint if the run is the same (`run_identity`: only fields that
  extend or observe it may change), and stops with WorkdirMismatchError otherwise; `restart`
  deletes the previous run's outputs first.  Returns the results dict.
  """
  started = time.perf_counter()
  config = recipe.resolve_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  if restart:
    removed = run_identity.restart(workdir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("restart")
    say(f"--restart: removed {', '.join(removed)} from {workdir}" if removed
        else f"--restart: nothing to remove in {workdir}")
  run_identity.check_and_record(config, workdir)
  notice = start_notice(config)
  if notice:
    say(notice)
  if config.synthetic_quick:
    say("No data folder given (config.data.dir is empty): training on the built-in synthetic "
        "source with a shrunken run (config.synthetic_run). " + REAL_DATA_HINT)

  s = _Setup(config, workdir)
  setup_s = time.perf_counter() - started
  e = registry.entry(config.model)
  if jax.process_index() == 0:
    data.write_split_json(s.splits, os.path.join(workdir, "split.json"))
  _write_json(os.path.join(workdir, "model.json"), {
      "model": config.model, "family": e.family, "num_params": s.num_params,
      "paper_params": e.paper_params, "has_batch_stats": s.has_bn,
      "model_kwargs": {k: str(v) if k == "dtype" else v
                       for k, v in recipe.model_kwargs(config).items()},
      "threshold": config.threshold, "image_size": s.image_size, "train_image_size": s.train_size,
      "config": config.to_dict()})
  say(f"{config.model}: {s.num_params:,} parameters on {s.num_devices} device(s) "
      f"({s.devices[0].platform}); {len(s.splits.train)}/{len(s.splits.val)}/{len(s.splits.test)} "
      f"train/val/test slices, {splits_lib.protocol(config.data)}; {s.total_steps} steps of "
      f"batch {config.batch_size}")

  ckpt = Checkpointer(workdir, config.keep_checkpoints)
  host = _HostState(os.path.join(ckpt.root, "host_state.json"))
  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  state = s.state
  restored, step = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    say(f"resumed from step {int(step)}")
  step = int(jax.device_get(state["step"]))
  ckpt.drop_best_after(step)
  book = host.get(step)
  book.setdefault("best_score", math.inf)
  book.setdefault("since_best", 0)
  book.setdefault("best_val_loss", math.inf)
  book.setdefault("since_val_loss", 0)
  book.setdefault("train_time_s", 0.0)
  book.setdefault("timed_images", 0)
  book.setdefault("timed_s", 0.0)
  book.setdefault("val_time_s", 0.0)
  book.setdefault("early_stopped", False)

  def checkpoint(at_step, at_state):
    ckpt.save(at_step, at_state)
    host.put(at_step, book)

  try:
    state, step = _loop(s, config, state, step, book, ckpt, writer, checkpoint)
  except _Interrupted as stopped:
    state, step = stopped.state, stopped.step
    if not any(x.is_deleted() for x in jax.tree.leaves(state)):
      checkpoint(step, state)
      ckpt.wait()
      say(f"interrupted: saved a checkpoint at step {step}; rerun the same command to resume")
    else:
      ckpt.wait()
      say(_unsaved_message(step, ckpt.latest.all_steps()))
    writer.close()
    raise KeyboardInterrupt from None
  except FloatingPointError:
    ckpt.wait()
    writer.close()
    raise
  checkpoint(step, state)
  ckpt.wait()
  writer.close()

  results = _final_evaluation(s, config, state, step, book, ckpt, workdir,
                              {"setup_s": setup_s, "started": started})
  ckpt.close()
  return results


def _loop(s, config, state, step, book, ckpt, writer, checkpoint):
  """The epoch/step loop; returns (state, step) when done (or early-stopped)."""
  from tqdm import tqdm

  main = jax.process_index() == 0
  bar = tqdm(total=s.total_steps, initial=step, disable=not (main and config.progress),
             desc=config.model, unit="step", dynamic_ncols=True)
  last_good = max(ckpt.latest.all_steps(), default=None)
  first_step_of_process = True
  loop_start = time.perf_counter()
  time_base = book["train_time_s"]
  epoch = step // s.steps_per_epoch
  stop = _InterruptFlag()
  try:
    while step < s.total_steps and not book["early_stopped"]:
      skip = step - epoch * s.steps_per_epoch
      batches = data.batches(s.splits.train, config.batch_size, shuffle=True, seed=config.seed,
                             epoch=epoch, drop_remainder=True, sharding=s.batch_sharding)
      for i, batch in enumerate(batches):
        if i < skip:
          continue
        if step >= s.total_steps:
          break
        t0 = time.perf_counter()
        new_state, stats = s.train_step(state, batch)
        stats = jax.device_get(stats)
        dt = time.perf_counter() - t0
        loss = float(stats["loss"])
        if not math.isfinite(loss):
          where = (f"step {last_good} in {ckpt.root}" if last_good is not None
                   else "none (no checkpoint was written yet)")
          raise FloatingPointError(
              f"training loss is {loss} at step {step + 1}; stopping. Last good checkpoint: "
              f"{where}. Lower the learning rate or use dtype=float32.")
        state, step = new_state, step + 1
        if not first_step_of_process:   # the first step of a process includes compilation
          book["timed_images"] += config.batch_size
          book["timed_s"] += dt
        first_step_of_process = False
        ips = book["timed_images"] / book["timed_s"] if book["timed_s"] else 0.0
        book["train_time_s"] = time_base + time.perf_counter() - loop_start
        writer.write("train", step, {"loss": loss, "grad_norm": float(stats["grad_norm"]),
                                     "lr": float(stats["lr"]), "images_per_s": ips,
                                     "epoch": epoch})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          checkpoint(step, state)
          last_good = step
        if stop.requested:
          raise KeyboardInterrupt
      if step % s.steps_per_epoch == 0 or step >= s.total_steps:
        state = _end_of_epoch(s, config, state, step, epoch, book, ckpt, writer)
        epoch = step // s.steps_per_epoch
        book["train_time_s"] = time_base + time.perf_counter() - loop_start
        checkpoint(step, state)
        last_good = step
  except KeyboardInterrupt:
    raise _Interrupted(state, step) from None
  finally:
    stop.restore()
    bar.close()
  return state, step


def _unsaved_message(step: int, saved_steps) -> str:
  """What a second Ctrl-C (which stops inside a step) leaves behind."""
  last = max(saved_steps, default=None)
  resume = (f"rerunning the same command resumes from step {last}" if last is not None
            else "no checkpoint was saved yet, so rerunning the same command starts from step 0")
  return f"interrupted inside step {step + 1}: no checkpoint was saved for it; {resume}"


class _Interrupted(KeyboardInterrupt):
  """Ctrl-C, carrying the last completed (not donated) state to save."""

  def __init__(self, state, step):
    super().__init__()
    self.state, self.step = state, step


class _InterruptFlag:
  """Defers Ctrl-C to the end of the current step, so the state is whole when it is saved.

  A second Ctrl-C interrupts at once.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    if self.requested:
      say("\nCtrl-C again: stopping now, without waiting for the current step to finish")
      raise KeyboardInterrupt
    self.requested = True
    say("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)")

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None


def _end_of_epoch(s, config, state, step, epoch, book, ckpt, writer):
  """Validation, best checkpoint, plateau LR and early stopping after an epoch."""
  t0 = time.perf_counter()
  val = s.evaluate(state, s.splits.val)
  book["val_time_s"] += time.perf_counter() - t0
  record = {"epoch": epoch + 1, **{f"val_{k}": v for k, v in _summary(val).items()},
            "protocol": splits_lib.protocol(config.data)}
  score = _score(config, val)
  if score < book["best_score"]:
    book["best_score"], book["since_best"] = score, 0
    ckpt.save_best(step, state, config.best_metric, score)
  else:
    book["since_best"] += 1
  if val["loss"] < book["best_val_loss"]:
    book["best_val_loss"], book["since_val_loss"] = val["loss"], 0
  else:
    book["since_val_loss"] += 1
  if config.plateau_patience and book["since_val_loss"] > config.plateau_patience:
    # ReduceLROnPlateau: scale the injected learning rate, reset the patience counter.
    hp = dict(state["opt_state"].hyperparams)
    lr = float(hp["learning_rate"]) * config.plateau_factor
    hp["learning_rate"] = jax.device_put(jnp.asarray(lr, jnp.float32), s.replicated)
    state = {**state, "opt_state": state["opt_state"]._replace(hyperparams=hp)}
    book["since_val_loss"] = 0
    say(f"validation loss plateaued: learning rate now {lr:.3g}")
  if config.early_stopping_patience and book["since_best"] >= config.early_stopping_patience:
    book["early_stopped"] = True
    say(f"early stopping after epoch {epoch + 1}: no improvement in "
        f"{config.early_stopping_patience} epochs")
  record["lr"] = float(state["opt_state"].hyperparams["learning_rate"])
  writer.write("epochs", step, record)
  return state


def _final_evaluation(s, config, state, step, book, ckpt, workdir, timing) -> dict:
  """Metrics of the final and best checkpoints on val and test; results.json and figures."""
  fragments = splits_lib.split_mode(config.data.split) == "paper"
  evaluation_start = time.perf_counter()
  results = {
      "model": config.model, "num_params": s.num_params,
      "paper_params": registry.entry(config.model).paper_params,
      "steps": step, "epochs": step / s.steps_per_epoch,
      "train_time_s": book["train_time_s"],
      "images_per_s": book["timed_images"] / book["timed_s"] if book["timed_s"] else None,
      "devices": [str(d) for d in s.devices], "dtype": config.dtype,
      "recipe": config.recipe, "synthetic": not config.data.dir,
      "data_split": splits_lib.split_mode(config.data.split),
      "protocol": splits_lib.protocol(config.data),
      "folds": config.data.get("folds", 0), "fold": config.data.get("fold", 0),
      "split_seed": config.data.split_seed,
      "threshold": config.threshold, "select": config.select,
      "metric_notes": {
          "paper": "pooled over each test batch, mean over batches (spec §9.6); dice is NaN if "
                   "any batch is all-empty, dice_nanmean skips those batches",
          "slice": "per-slice mean at sigmoid>=0.5; empty prediction on empty mask = 1, "
                   "otherwise empty mask = 0; *_tumour: tumour-positive slices only",
          "patient": "per-patient 3-D Dice (Buda et al. 2019), IoU and HD95 at sigmoid>=0.5, mean "
                     "over patients; cases: one record per test patient. " + (
                         "Under the paper's slice split each patient's test slices are fragments "
                         "of a volume whose other slices were trained on."
                         if fragments else ""),
          "empty": metrics.EMPTY_CONVENTIONS},
  }
  # The test passes also keep the figure slices' predictions (every process runs them: their
  # steps are collectives), so the chosen checkpoint's figures need no extra pass.
  test = s.splits.test
  idx = ev.figure_indices(test, config.num_figure_slices)
  figure_preds = {}
  case_times = []

  def on_test(which, at_state):
    result = s.evaluate(at_state, test, keep=idx, per_case=True)
    figure_preds[which] = result.pop("predictions")
    case_times.append(result["patient"]["case_metrics_s"])
    return result

  results["final"] = {"step": step, "val": s.evaluate(state, s.splits.val),
                      "test": on_test("final", state)}
  best_state, best_step = ckpt.restore_best(state)
  if best_state is not None and int(best_step) == step:
    # The best checkpoint holds the final parameters: same scores, no second pass.
    results["best"] = {"step": step, "metric": config.best_metric, **{
        k: results["final"][k] for k in ("val", "test")}}
    figure_preds["best"] = figure_preds["final"]
  elif best_state is not None:
    results["best"] = {"step": int(best_step), "metric": config.best_metric,
                       "val": s.evaluate(best_state, s.splits.val),
                       "test": on_test("best", best_state)}
  else:
    results["best"] = None
  chosen_state = best_state if config.select == "best" and best_state is not None else state
  chosen = "best" if chosen_state is best_state else "final"
  results["selected"] = chosen
  # Time spent besides training steps: this process's setup (data loading, split, initial state)
  # and final val/test passes (per-case metrics included), and the per-epoch validation passes
  # of the whole run (also inside train_time_s).
  results["timing_s"] = {"setup": timing["setup_s"], "validation": book["val_time_s"],
                         "final_evaluation": time.perf_counter() - evaluation_start,
                         "case_metrics": sum(case_times),
                         "process_wall": time.perf_counter() - timing["started"]}
  _write_json(os.path.join(workdir, "results.json"), results)

  preds = figure_preds[chosen]
  if jax.process_index() == 0:
    names = [test.names[i] for i in idx]
    np.savez_compressed(os.path.join(workdir, "figure_slices.npz"), names=np.asarray(names),
                        images=test.images[idx], masks=test.masks[idx], preds=preds)
    ev.save_prediction_png(os.path.join(workdir, "predictions.png"), test.images[idx],
                           test.masks[idx], preds, names,
                           f"{config.model} ({chosen} checkpoint, step {results[chosen]['step']})")
  r = results[chosen]["test"]
  say(f"results in {os.path.join(workdir, 'results.json')}; predictions in "
      f"{os.path.join(workdir, 'predictions.png')}")
  if config.synthetic_quick:
    say(REAL_DATA_HINT)
  patient = "per-patient (fragments: also trained on)" if fragments else "per-patient"
  say(f"test ({chosen} checkpoint, step {results[chosen]['step']}; {results['protocol']}): "
      f"Dice {r['paper']['dice']:.4f} IoU {r['paper']['iou']:.4f} (paper metric); "
      f"per-slice Dice {r['slice']['dice']:.4f} IoU {r['slice']['iou']:.4f}; "
      f"{patient} Dice {r['patient']['dice']:.4f} IoU {r['patient']['iou']:.4f} "
      f"HD95 {r['patient']['hd95']:.1f} px")
  return results
