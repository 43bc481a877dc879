"""kernels.bench and experiments.bench_train on the CPU: tiny shapes, every column filled, the
table written, bad input refused."""
import argparse
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_cpu_writes_a_full_table(tmp_path, capsys):
  out = tmp_path / "table.md"
  rc = bench.main(["--mode", "cpu", "--impls", "chunked,associative,reference", "--chunks",
                   "4,16", "--shapes", "2,3,20,4", "1x2x7x2", "--repeats", "1", "--out",
                   str(out)])  # ~40 s on 2 shared cores: 8 rows, each compiling fwd and fwd+bwd
  assert rc == 0
  text = out.read_text()
  rows = [line for line in text.splitlines() if line.startswith("| ") and "impl" not in line]
  names = sorted({r.split("|")[1].strip() for r in rows})
  assert names == ["associative", "chunked(16)", "chunked(4)", "reference"]
  assert len(rows) == 8                       # 4 implementations x 2 shapes
  for r in rows:
    cells = [c.strip() for c in r.strip("|").split("|")]
    assert len(cells) == 8
    ms_fwd, gbs, ms_fb = float(cells[2]), float(cells[3]), float(cells[5])
    assert ms_fwd > 0 and gbs > 0 and ms_fb > 0
    assert cells[4].endswith("%") and cells[6].endswith("%")
  assert "copy bandwidth" in capsys.readouterr().out


def test_budget_stops_new_rows():
  _, rows = bench.run("cpu", ["chunked"], [(1, 2, 8, 2), (1, 2, 9, 2)], [4], [(16, 64, 8)],
                      jnp.float32,
                      repeats=1, budget_s=0.0, log=lambda s: None)
  assert rows == []


def test_min_bytes_counts_each_array_once():
  b, d, L, n = 2, 3, 5, 4
  fwd, fb = bench.min_bytes((b, d, L, n), jnp.float32)
  assert fwd == 4 * (4 * b * d * L + 2 * b * n * L)     # u, delta, z, y; B, C
  assert fb == fwd + 4 * (4 * b * d * L + 2 * b * n * L)  # dy, du, ddelta, dz; dB, dC
  assert bench.min_bytes((b, d, L, n), jnp.bfloat16)[0] == fwd // 2


def test_config_pick_is_the_lowest_geometric_mean_over_shapes_all_finished():
  def row(cfg, shape, ms):
    return (f"triton({cfg})", shape, 1.0, 1.0, 0.5, ms, 0.5, 0.0)
  s1, s2 = (1, 2, 3, 4), (5, 6, 7, 8)
  rows = [row("16x64x8", s1, 2.0), row("16x64x8", s2, 8.0),      # geo mean 4
          row("8x64x4", s1, 1.0), row("8x64x4", s2, 9.0),        # geo mean 3: picked
          row("16x32x8", s1, 0.1),                               # did not finish s2: left out
          ("triton(16x128x8)", s2, None, None, None, None, None, None)]   # failed
  configs = [(16, 64, 8), (8, 64, 4), (16, 32, 8), (16, 128, 8)]
  text = bench.pick_config(rows, configs)
  assert "**8x64x4**" in text and "1.33x the best" in text, text
  assert "16x32x8" in text and "not every shape" in text, text
  assert bench.parse_config("16x64x8") == (16, 64, 8)
  with pytest.raises(argparse.ArgumentTypeError):
    bench.parse_config("16x64")


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,0", "a,b,c,d"])
def test_bad_shapes_are_refused(text):
  with pytest.raises((argparse.ArgumentTypeError, ValueError)):
    bench.parse_shape(text)


def test_bench_train_compare_authors_cli(tmp_path):
  """The authors' timing harness (batch, Dice + Adam, BN over the whole batch) and its table.

  experiments.* modules define absl flags at import, so they are only imported in subprocesses
  (two of them in one pytest worker would define --out twice)."""
  probe = subprocess.run(
      [sys.executable, "-c", "from experiments import bench_train as b; "
       "c = b.authors_harness('segformer', 'bfloat16', 64, 256); "
       "print(c.batch_size, c.dtype, c.loss, c.optimizer, c.bn_chunks, c.train_image_size, "
       "c.data.synthetic.image_size); print(*b.AUTHORS_H100['resnet18_seg'])"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert probe.returncode == 0, probe.stderr[-2000:]
  harness, rates = probe.stdout.splitlines()[-2:]
  assert harness.split() == ["64", "bfloat16", "dice_pooled", "adam", "1", "0", "256"]
  authors = [int(r) for r in rates.split()]
  assert authors == [3086, 4922]       # issue 7's quoted ResNet18-seg rates
  out = tmp_path / "table.md"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--compare_authors",
       "--models=resnet18_seg", "--batch_size=2", "--image_size=32", "--steps=1", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [l for l in out.read_text().splitlines() if l.startswith("| resnet18_seg")]
  assert [r.split("|")[2].strip() for r in rows] == ["float32", "bfloat16"]
  for row, theirs in zip(rows, authors):
    cells = [x.strip() for x in row.split("|")[1:-1]]
    ours = float(cells[6])
    assert ours > 0 and int(cells[7]) == theirs
    assert float(cells[8]) == pytest.approx(ours / theirs, abs=0.006)
  bad = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--compare_authors",
                        "--models=vgg"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "no authors' rate for ['vgg']" in bad.stderr


def test_bench_train_compare_torch_cli(tmp_path):
  """PyTorch and our rates side by side: ratios are ours / PyTorch, the conv rows follow."""
  pytest.importorskip("torch")
  out = tmp_path / "torch.md"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--compare_torch", "--models=unet",
       "--batch_size=2", "--image_size=32", "--steps=1", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = out.read_text()
  (row,) = [l for l in text.splitlines() if l.startswith("| unet")]
  cells = [float(x) for x in row.split("|")[2:-1]]
  assert min(cells) > 0
  for torch_rate, ours, ratio in (cells[:3], cells[3:]):
    # the rates are printed to 2 decimals: the ratio of printed rates carries their rounding
    assert ratio == pytest.approx(ours / torch_rate, abs=0.006 + 0.005 * (1 + ratio) / torch_rate)
  convs = [l for l in text.splitlines() if l.startswith(("| conv 3x3", "| ConvTranspose"))]
  assert len(convs) == 3 and "ours with jaxmamba.nn.conv's CPU paths, XLA_FLAGS=" in text
  assert "; batch 2, 32x32" in text
  bad = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--compare_torch",
                        "--models=vgg"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "unknown model(s) ['vgg']" in bad.stderr


def test_bench_train_compare_torch_repeats_lists_every_run(tmp_path):
  """--repeats=2: two runs in fresh processes, each run's ratios listed under the table, the
  table's ratio their median (for two runs, their mean)."""
  pytest.importorskip("torch")
  out = tmp_path / "torch.md"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--compare_torch", "--models=ulvmunet",
       "--batch_size=1", "--image_size=32", "--steps=1", "--repeats=2", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = out.read_text()
  rows = [l for l in text.splitlines() if l.startswith("| ulvmunet")]
  assert len(rows) == 2, text
  median_ratios = [float(x) for x in rows[0].split("|")[2:-1]][2::3]
  each_run = [[float(r) for r in cell.split(",")] for cell in rows[1].split("|")[2:-1]]
  assert [len(runs) for runs in each_run] == [2, 2]
  for median, runs in zip(median_ratios, each_run):
    # each printed to 2 decimals
    assert median == pytest.approx(sum(runs) / 2, abs=0.011), (median, runs)
  assert "in 2 runs of fresh processes, its rates and ratios the medians" in text
  progress = [l for l in proc.stdout.splitlines() if l.startswith("ulvmunet run ")]
  assert [l.split(":")[0] for l in progress] == ["ulvmunet run 1/2", "ulvmunet run 2/2"]
  for flags, message in ((["--compare_torch", "--repeats=0"], "--repeats must be at least 1"),
                         (["--compare_authors", "--repeats=2"], "--repeats is for --compare_torch")):
    bad = subprocess.run([sys.executable, "-m", "experiments.bench_train", *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-500:]


def test_compare_worker_reports_its_failure_and_times_its_steps():
  """The comparison's sides run in processes of their own: a failure there reaches the caller
  with the worker's traceback; a working one returns each step's own seconds."""
  pytest.importorskip("torch")
  from experiments import bench_torch
  with pytest.raises(RuntimeError, match="no PyTorch model for 'vgg'"):
    bench_torch.Worker("torch", "vgg", 1, 32, 1)
  worker = bench_torch.Worker("torch", "ulvmunet", 1, 32, 1)
  try:
    seconds = bench_torch.interleaved_medians({"train": lambda: worker("train")}, 2)
  finally:
    worker.close()
  assert 0 < seconds["train"] < 60
