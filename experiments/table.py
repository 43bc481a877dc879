"""Gather training runs and cross-validations into Table I and draw Figures 2 to 4.

  python -m experiments.table runs/unet runs/cv_ulvmunet ... [--out=table]

Reads each RUN_DIR/results.json (and figure_slices.npz) written by experiments.run, or a
cross-validation folder's summary.json and cases.csv written by experiments.cv, and writes to
--out: table.md and table.csv (model, parameters, protocol, per-patient test Dice/IoU/HD95, test
Dice/IoU under the paper's batch-pooled metric and per slice, train time, images/s, recipe and
data; for the checkpoint each run selected; a cross-validation row shows mean ± sd: over
patients for the per-patient columns, over folds for the others), figure2.png (paper-metric test
Dice against parameter count, log x-axis, labelled points), figure3.png (the same test slices
segmented by every model, with the ground truth) and figure4.png (each model's per-patient Dice
distribution, with the paper's Table I Dice and Buda et al.'s 83.6 % as reference lines).
"""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
from absl import app, flags

from jaxmamba.train import crossval

flags.DEFINE_string("out", "table", "output folder")
FLAGS = flags.FLAGS

# Metrics that a cross-validation row gives as mean ± sd (the sd in "<name>_sd").
METRICS = ("dice_patient", "iou_patient", "hd95_patient", "dice_paper", "iou_paper", "dice_slice",
           "iou_slice")
COLUMNS = ("model", "params", "protocol", *METRICS, "checkpoint", "train_time", "images_per_s",
           "recipe", "data")
CSV_COLUMNS = COLUMNS + tuple(f"{m}_sd" for m in METRICS)
HEADER = ("Model", "Params", "Protocol", "Dice (patient)", "IoU (patient)", "HD95 px (patient)",
          "Dice (paper)", "IoU (paper)", "Dice (slice)", "IoU (slice)", "Checkpoint",
          "Train time", "Images/s", "Recipe", "Data")
# Table I's test Dice (spec models-conv-umamba.md §9.7: slice split, batch-pooled metric).
PAPER_DICE = {"umambabot_pp": 0.8867, "umambabot": 0.8799, "unet": 0.8929, "segformer": 0.8454,
              "resnet18_seg": 0.8648, "resnet50_seg": 0.8672, "ulvmunet": 0.7955,
              "ulvmunet_v1": 0.8409, "ulvmunet_v2": 0.8243, "ulvmunet_v3": 0.8109,
              "ulvmunet_v4": 0.8549, "ulvmunet_v5": 0.8633, "ulvmunet_v6": 0.8628}
# Buda et al. 2019: U-Net, 22-fold cross-validation by patient, mean Dice per patient volume.
BUDA_DICE = 0.836
PAPER_SPLIT = "paper slice split"


def _fmt_time(seconds) -> str:
  if seconds is None:
    return ""
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def load_run(run_dir: str) -> dict:
  """results.json of a run, or summary.json of a cross-validation folder (key "cv": True)."""
  if crossval.is_cv_dir(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
      return {**json.load(f), "cv": True}
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    raise ValueError(f"{run_dir}: no results.json nor summary.json (has the run finished?)")
  with open(path) as f:
    return json.load(f)


def _protocol(results: dict) -> str | None:
  if "protocol" in results:
    return results["protocol"]
  # Runs written before protocols were recorded: the split name says it.
  split = {"slice": "paper"}.get(results.get("data_split"), results.get("data_split"))
  return {"paper": PAPER_SPLIT + " (patients shared between training and test)",
          "patient": "patient split (held-out patients)"}.get(split)


def row(results: dict) -> dict:
  if results.get("cv"):
    return _cv_row(results)
  which = results.get("selected", "final")
  test = results[which]["test"]
  patient = test["patient"]
  r = {"model": results["model"], "params": results["num_params"],
       "protocol": _protocol(results),
       "dice_patient": patient["dice"], "iou_patient": patient.get("iou"),
       "hd95_patient": patient.get("hd95"),
       "dice_paper": test["paper"]["dice"], "iou_paper": test["paper"]["iou"],
       "dice_slice": test["slice"]["dice"], "iou_slice": test["slice"]["iou"],
       "checkpoint": which,
       "train_time": results.get("train_time_s"), "images_per_s": results.get("images_per_s"),
       "recipe": results.get("recipe"), "data": _data(results)}
  return {**r, **{f"{m}_sd": None for m in METRICS}}


def _cv_row(summary: dict) -> dict:
  """mean ± sd: over patients for the per-patient metrics, over folds for the others."""
  r = {"model": summary["model"], "params": summary["num_params"],
       "protocol": f"{summary['protocol']}, {summary['seeds']} seed(s)",
       "checkpoint": summary.get("selected"), "train_time": summary.get("train_time_s"),
       "images_per_s": None, "recipe": summary.get("recipe"),
       "data": _data(summary)}
  patients, folds = summary["patients"], summary["over_folds"]
  for m in METRICS:
    name, group = m.rsplit("_", 1)
    if group == "patient":
      r[m], r[f"{m}_sd"] = patients[name], patients[f"{name}_sd"]
    else:
      r[m], r[f"{m}_sd"] = folds[m]["mean"], folds[m]["sd"]
  return r


def _data(results: dict) -> str | None:
  """Which data a run saw: rows on different data are not comparable, so the table says."""
  if "synthetic" not in results:
    return None
  return "synthetic" if results["synthetic"] else "real"


def labels(rows: list[dict], run_dirs: list[str]) -> list[str]:
  """Figure labels: the model name, plus recipe and data, then the run folder, where needed to
  tell runs of one model apart."""
  out = [r["model"] for r in rows]
  for extend in (lambda i: f"{out[i]} ({rows[i]['recipe']}, {rows[i]['data']}, "
                           f"{_short(rows[i]['protocol'])})",
                 lambda i: f"{out[i]} [{os.path.basename(os.path.normpath(run_dirs[i]))}]"):
    repeated = {x for x in out if out.count(x) > 1}
    out = [extend(i) if x in repeated else x for i, x in enumerate(out)]
  return out


def _short(protocol: str | None) -> str:
  """"paper slice split (patients shared ...)" -> "paper slice split"."""
  return (protocol or "?").split(" (")[0]


def _cell(key, value, sd=None) -> str:
  if value is None:
    return ""
  if sd is not None:
    return f"{_cell(key, value)} ± {_cell(key, sd)}"
  if key == "hd95_patient":
    return "NaN" if np.isnan(value) else f"{value:.1f}"
  if key == "params":
    return f"{int(value):,}"
  if key == "train_time":
    return _fmt_time(value)
  if key == "images_per_s":
    return f"{value:.1f}"
  if isinstance(value, float):
    return "NaN" if np.isnan(value) else f"{value:.4f}"
  return str(value)


def write_tables(rows: list[dict], out: str) -> None:
  with open(os.path.join(out, "table.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    w.writeheader()
    w.writerows(rows)
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in rows:
    cells = [_cell(k, r[k], r.get(f"{k}_sd")) for k in COLUMNS]
    if _short(r["protocol"]) == PAPER_SPLIT and cells[3]:
      cells[3] += " (fragments)"   # the test patients' other slices were trained on
    lines.append("| " + " | ".join(cells) + " |")
  notes = ("\nDice/IoU (paper): pooled over each test batch, mean over batches (spec §9.6). "
           "(slice): per-slice mean, empty-on-empty = 1. (patient): per patient volume "
           "(Dice, IoU, HD95 in pixels), mean over patients; under the paper's slice split a "
           "test patient is a few slices of a volume trained on (fragments). Cross-validation "
           "rows: mean ± sd over patients (patient columns) or over folds (the others); train time "
           "summed over folds.\n")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n" + notes)


def _compact(v: float) -> str:
  """50000 -> "50k", 2e7 -> "20M"."""
  for scale, unit in ((1e6, "M"), (1e3, "k")):
    if v >= scale:
      return f"{v / scale:g}{unit}"
  return f"{v:g}"


def figure2(rows: list[dict], names: list[str], path: str) -> None:
  """Dice against parameter count, log x-axis, one labelled point per run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r, name in zip(rows, names):
    ax.scatter(r["params"], r["dice_paper"], s=30)
    ax.annotate(name, (r["params"], r["dice_paper"]), textcoords="offset points",
                xytext=(4, 4), fontsize=8)
  ax.set_xscale("log")
  # Labels at 1x, 2x and 5x each power of ten, compact ("50k", "10M"): matplotlib's default minor
  # labels collide when the runs span one or two decades.
  ticks = matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0))
  ax.xaxis.set_major_locator(ticks)
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _compact(v)))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.margins(x=0.12)   # room for the rightmost point's label
  ax.set_xlabel("parameters")
  ax.set_ylabel("test Dice (paper metric)")
  ax.set_title("Dice against model size")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def figure3(run_dirs: list[str], names: list[str], path: str) -> bool:
  """Rows: test slices shown by every run; columns: input, ground truth, then each model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxmamba.train.evaluate import overlay_rgb  # the one pixel conversion, as in training
  figs = []
  for d in run_dirs:
    p = os.path.join(d, "figure_slices.npz")
    if os.path.exists(p):
      figs.append(dict(np.load(p)))
    else:
      figs.append(None)
  have = [(n, f) for n, f in zip(names, figs) if f is not None]
  if not have:
    return False
  common = set(have[0][1]["names"].tolist())
  for _, f in have[1:]:
    common &= set(f["names"].tolist())
  slices = [s for s in have[0][1]["names"].tolist() if s in common]
  if not slices:
    return False
  ref = have[0][1]
  cols = 2 + len(have)
  fig, axes = plt.subplots(len(slices), cols, figsize=(1.9 * cols, 1.9 * len(slices)),
                           squeeze=False)
  for i, s in enumerate(slices):
    j = ref["names"].tolist().index(s)
    rgb = overlay_rgb(ref["images"][j])       # BGR -> RGB for display
    panels = [("input", rgb, None), ("ground truth", rgb, ref["masks"][j])]
    for name, f in have:
      k = f["names"].tolist().index(s)
      panels.append((name, rgb, f["preds"][k]))
    for c, (title, img, mask) in enumerate(panels):
      shown = img.copy()
      if mask is not None:
        sel = mask.astype(bool)
        colour = (0, 1, 0) if c == 1 else (1, 0, 0)
        shown[sel] = 0.5 * shown[sel] + 0.5 * np.asarray(colour)
      axes[i, c].imshow(shown)
      axes[i, c].set_axis_off()
      if i == 0:
        axes[i, c].set_title(title, fontsize=7)
    # Below the input image: above it the name would run into the column titles.
    axes[i, 0].text(0, rgb.shape[0] + 4, s, fontsize=5, va="top")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def patient_dice(run_dir: str, results: dict) -> list[float]:
  """The per-patient test Dice values of a run or of a cross-validation folder."""
  if results.get("cv"):
    with open(os.path.join(run_dir, "cases.csv")) as f:
      return [float(c["dice"]) for c in csv.DictReader(line for line in f
                                                       if not line.startswith("#"))]
  test = results[results.get("selected", "final")]["test"]
  if "cases" in test:
    return [c["dice"] for c in test["cases"]]
  return list(test["patient"].get("per_patient", {}).values())


def figure4(rows: list[dict], names: list[str], dice: list[list[float]], path: str) -> None:
  """Per-patient Dice of each run (box and points), with the paper's and Buda et al.'s Dice."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.5))
  positions = np.arange(1, len(rows) + 1)
  ax.boxplot(dice, positions=positions, widths=0.5, showfliers=False)
  jitter = np.random.default_rng(0)
  for x, values in zip(positions, dice):
    ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.6, zorder=3)
  shown = False
  for x, r in zip(positions, rows):
    if r["model"] in PAPER_DICE:
      ax.hlines(PAPER_DICE[r["model"]], x - 0.35, x + 0.35, colors="tab:red", linestyles="--",
                label=None if shown else "paper Table I (slice split, batch-pooled)")
      shown = True
  ax.axhline(BUDA_DICE, color="tab:green", linestyle=":",
             label="Buda et al. 2019: 83.6 % (22-fold CV by patient)")
  labels = [f"{n}\n{'fragments: ' if _short(r['protocol']) == PAPER_SPLIT else ''}"
            f"{_short(r['protocol'])}" for n, r in zip(names, rows)]
  ax.set_xticks(positions, labels, fontsize=7)
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel("test Dice per patient volume")
  ax.set_title("Per-patient test Dice (protocol under each model)", fontsize=10)
  ax.legend(fontsize=7, loc="lower left")
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def make_table(run_dirs: list[str], out: str) -> tuple[list[dict], list[str]]:
  """Writes the tables and figures; returns the rows and the names of the files written."""
  os.makedirs(out, exist_ok=True)
  results = [load_run(d) for d in run_dirs]
  rows = [row(r) for r in results]
  write_tables(rows, out)
  names = labels(rows, run_dirs)
  figure2(rows, names, os.path.join(out, "figure2.png"))
  written = ["table.md", "table.csv", "figure2.png"]
  if figure3(run_dirs, names, os.path.join(out, "figure3.png")):
    written.append("figure3.png")
  dice = [patient_dice(d, r) for d, r in zip(run_dirs, results)]
  if all(dice):
    figure4(rows, names, dice, os.path.join(out, "figure4.png"))
    written.append("figure4.png")
  return rows, written


def main(argv):
  run_dirs = argv[1:]
  if not run_dirs:
    sys.exit("usage: python -m experiments.table RUN_DIR [RUN_DIR ...] [--out=DIR]")
  try:
    _, written = make_table(run_dirs, FLAGS.out)
  except ValueError as e:
    sys.exit(f"error: {e}")
  with open(os.path.join(FLAGS.out, "table.md")) as f:
    print(f.read())
  print(f"wrote {FLAGS.out}/{', '.join(written)}")
  if "figure3.png" not in written:
    print("figure3.png not drawn: no test slice is in every run's figure_slices.npz (different "
          "data or splits; cross-validation folders keep none)")


if __name__ == "__main__":
  app.run(main)
