"""Gather training runs into Table I and draw Figures 2 and 3.

  python -m experiments.table runs/unet runs/umambabot_pp ... [--out=table]

Reads each RUN_DIR/results.json (and figure_slices.npz) written by experiments.run and writes to
--out: table.md and table.csv (model, parameters, test Dice/IoU under the paper's batch-pooled
metric and per-slice, per-patient Dice, train time, images/s, recipe and data; for the
checkpoint each run selected), figure2.png (paper-metric test Dice against parameter count, log
x-axis, labelled points) and figure3.png (the same test slices segmented by every model, with the
ground truth).
"""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
from absl import app, flags

flags.DEFINE_string("out", "table", "output folder")
FLAGS = flags.FLAGS

COLUMNS = ("model", "params", "dice_paper", "iou_paper", "dice_slice", "iou_slice",
           "dice_patient", "checkpoint", "train_time", "images_per_s", "recipe", "data")


def _fmt_time(seconds) -> str:
  if seconds is None:
    return ""
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def load_run(run_dir: str) -> dict:
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    raise ValueError(f"{run_dir}: no results.json (has the run finished?)")
  with open(path) as f:
    return json.load(f)


def row(results: dict) -> dict:
  which = results.get("selected", "final")
  test = results[which]["test"]
  return {"model": results["model"], "params": results["num_params"],
          "dice_paper": test["paper"]["dice"], "iou_paper": test["paper"]["iou"],
          "dice_slice": test["slice"]["dice"], "iou_slice": test["slice"]["iou"],
          "dice_patient": test["patient"]["dice"], "checkpoint": which,
          "train_time": results.get("train_time_s"), "images_per_s": results.get("images_per_s"),
          "recipe": results.get("recipe"), "data": _data(results)}


def _data(results: dict) -> str | None:
  """Which data a run saw: rows on different data are not comparable, so the table says."""
  if "synthetic" not in results:
    return None
  if results["synthetic"]:
    return "synthetic"
  return f"real, {results.get('data_split', '?')} split"


def labels(rows: list[dict], run_dirs: list[str]) -> list[str]:
  """Figure labels: the model name, plus recipe and data, then the run folder, where needed to
  tell runs of one model apart."""
  out = [r["model"] for r in rows]
  for extend in (lambda i: f"{out[i]} ({rows[i]['recipe']}, {rows[i]['data']})",
                 lambda i: f"{out[i]} [{os.path.basename(os.path.normpath(run_dirs[i]))}]"):
    repeated = {x for x in out if out.count(x) > 1}
    out = [extend(i) if x in repeated else x for i, x in enumerate(out)]
  return out


def _cell(key, value) -> str:
  if value is None:
    return ""
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
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
  header = ["Model", "Params", "Dice (paper)", "IoU (paper)", "Dice (slice)", "IoU (slice)",
            "Dice (patient)", "Checkpoint", "Train time", "Images/s", "Recipe", "Data"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append("| " + " | ".join(_cell(k, r[k]) for k in COLUMNS) + " |")
  notes = ("\nDice/IoU (paper): pooled over each test batch, mean over batches (spec §9.6). "
           "(slice): per-slice mean, empty-on-empty = 1. (patient): per-patient 3-D Dice.\n")
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
    print("figure3.png not drawn: the runs share no test slices (different data or splits)")


if __name__ == "__main__":
  app.run(main)
