"""The shared model tools: jaxmamba.convert, jaxmamba.checkpoint_io, experiments.predict and
`python -m jaxmamba.models`, exercised on UMambaBot (the torch oracle provides the weights)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from PIL import Image  # noqa: E402

from experiments import predict  # noqa: E402
from jaxmamba import checkpoint_io, convert  # noqa: E402
from jaxmamba.models import __main__ as models_cli  # noqa: E402
from jaxmamba.models import registry  # noqa: E402
from tests._data import lgg_dir  # noqa: E402
from third_party.torch_models import umamba as torch_umamba  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample_images(n: int) -> list[str]:
  """n real slices with tumour (so the masks are not trivially empty), sorted for stability."""
  data_dir = lgg_dir()
  found = []
  for mask in sorted(glob.glob(os.path.join(data_dir, "*", "*_mask.tif"))):
    if np.asarray(Image.open(mask)).any():
      found.append(mask.replace("_mask.tif", ".tif"))
    if len(found) == n:
      return found
  pytest.fail(f"fewer than {n} tumour slices under {data_dir}")


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  torch.set_num_threads(2)
  model = torch_umamba.UMambaBot(False).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def pth(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("pth") / "umambabot.pth"
  torch.save(torch_model.state_dict(), path)
  return str(path)


@pytest.fixture(scope="module")
def converted(pth, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("converted"))
  assert convert.main(["--model", "umambabot", "--torch-checkpoint", pth, "--workdir", workdir,
                       "--overwrite"]) == 0
  return workdir


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------------------------------
# convert + checkpoint_io


def test_convert_writes_checkpoint_readable_by_load_variables(converted, torch_model):
  with open(os.path.join(converted, "model.json")) as f:
    assert json.load(f)["model"] == "umambabot"
  name, variables = checkpoint_io.load_variables(converted, expected_model="umambabot")
  assert name == "umambabot"
  expected = registry.from_torch_state_dict("umambabot", torch_model.state_dict())
  _assert_trees_equal(variables, expected)
  # A torch weight lands, transposed, where the model reads it.
  w = torch_model.state_dict()["decoder.seg_layers.3.weight"].numpy()
  np.testing.assert_array_equal(variables["params"]["decoder"]["seg_layers_3"]["kernel"],
                                w.transpose(2, 3, 1, 0))


@pytest.mark.parametrize("wrap", ["module_prefix", "state_dict", "model"])
def test_convert_accepts_wrapped_state_dicts(wrap, torch_model, converted, tmp_path):
  sd = torch_model.state_dict()
  obj = ({"module." + k: v for k, v in sd.items()} if wrap == "module_prefix"
         else {wrap: sd, "epoch": 100})
  path = tmp_path / "wrapped.pth"
  torch.save(obj, path)
  out = tmp_path / "out"
  assert convert.main(["--model", "umambabot", "--torch-checkpoint", str(path),
                       "--workdir", str(out)]) == 0
  _assert_trees_equal(checkpoint_io.load_variables(str(out))[1],
                      checkpoint_io.load_variables(converted)[1])


@pytest.mark.parametrize("mutation, key", [
    ("missing", "mamba.dt_proj.bias"),
    ("shape", "decoder.stages.1.blocks.0.conv2.conv.weight"),
    ("extra", "decoder.seg_layers.9.bias"),
])
def test_convert_mismatch_is_one_line_error_naming_key(mutation, key, torch_model, tmp_path,
                                                       capsys):
  sd = dict(torch_model.state_dict())
  if mutation == "missing":
    del sd[key]
  elif mutation == "shape":
    sd[key] = sd[key][:, :-1]
  else:
    sd[key] = torch.zeros(1)
  path = tmp_path / "bad.pth"
  torch.save(sd, path)
  rc = convert.main(["--model", "umambabot", "--torch-checkpoint", str(path),
                     "--workdir", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and key in err and len(err.splitlines()) == 1
  assert not (tmp_path / "out" / "model.json").exists()


def test_convert_other_errors(pth, converted, tmp_path, capsys):
  cases = [
      (["--model", "no_such_model", "--torch-checkpoint", pth], "no_such_model"),
      (["--model", "umambabot_pp", "--torch-checkpoint", pth], "ppm.conv_layers.0.weight"),
      (["--model", "umambabot", "--torch-checkpoint", str(tmp_path / "nope.pth")], "nope.pth"),
  ]
  for argv, needle in cases:
    assert convert.main(argv + ["--workdir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
  # An existing checkpoint is not replaced without --overwrite.
  assert convert.main(["--model", "umambabot", "--torch-checkpoint", pth,
                       "--workdir", converted]) == 1
  assert "already exists" in capsys.readouterr().err


def test_load_variables_from_training_workdir(tmp_path):
  """The trainer's layout: CheckpointManager items {params, batch_stats, opt_state, step}."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "model.json").write_text(json.dumps({"model": "unet", "config": {"lr": 3e-4}}))

  def item(scale):
    params = {"conv": {"kernel": scale * jnp.ones((3, 3, 2, 4)), "bias": jnp.arange(4.0)}}
    stats = {"bn": {"mean": scale * jnp.ones(4), "var": jnp.ones(4)}}
    return {"params": params, "batch_stats": stats, "opt_state": optax.adam(1e-3).init(params),
            "step": jnp.asarray(int(scale))}

  manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
  for step in (2, 10, 7):
    manager.save(step, args=ocp.args.StandardSave(item(float(step))))
  manager.wait_until_finished()
  name, variables = checkpoint_io.load_variables(str(workdir), expected_model="unet")
  assert name == "unet" and set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["params"]["conv"]["kernel"], 10.0)   # latest step
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], 10.0)
  # A step folder inside the workdir also works (model.json is found in a parent).
  assert checkpoint_io.load_variables(str(workdir / "checkpoints" / "2"))[1][
      "params"]["conv"]["kernel"][0, 0, 0, 0] == 2.0
  # The trainer's best-by-validation manager (created empty at the start) wins once it holds one.
  best = ocp.CheckpointManager(str(workdir / "checkpoints" / "best"),
                               options=ocp.CheckpointManagerOptions(create=True))
  np.testing.assert_array_equal(
      checkpoint_io.load_variables(str(workdir))[1]["params"]["conv"]["kernel"], 10.0)
  best.save(5, args=ocp.args.StandardSave(item(5.0)))
  best.wait_until_finished()
  np.testing.assert_array_equal(
      checkpoint_io.load_variables(str(workdir))[1]["params"]["conv"]["kernel"], 5.0)
  with pytest.raises(checkpoint_io.CheckpointError, match="'unet', not 'segformer'"):
    checkpoint_io.load_variables(str(workdir), expected_model="segformer")
  with pytest.raises(checkpoint_io.CheckpointError, match="model.json"):
    checkpoint_io.load_variables(str(tmp_path))


def test_save_variables_rejects_unknown_collections(tmp_path):
  with pytest.raises(checkpoint_io.CheckpointError, match="opt_state"):
    checkpoint_io.save_variables(str(tmp_path), "unet", {"params": {"a": np.ones(2)},
                                                        "opt_state": {"b": np.ones(2)}})


# ------------------------------------------------------------------------------------------------
# predict


def test_predict_matches_torch_oracle(converted, torch_model, tmp_path):
  paths = _sample_images(3)
  # The same slice as a PNG must give the same result (same channel order convention).
  png = tmp_path / "as_png.png"
  Image.fromarray(np.asarray(Image.open(paths[0]))).save(png)
  inputs = paths + [str(png)]
  out = tmp_path / "pred"
  assert predict.main(["--model", "umambabot", "--checkpoint", converted, "--output", str(out),
                       "--save-probs", "--batch-size", "3", *inputs]) == 0

  # Oracle: PIL reads RGB; the authors' cv2 gives BGR, i.e. the channels reversed; /255.
  rgb = np.stack([np.asarray(Image.open(p)) for p in paths]).astype(np.float32)
  x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(0, 3, 1, 2) / 255.0))
  with torch.no_grad():
    ref = torch.sigmoid(torch_model(x))[:, 0].numpy()
  for i, p in enumerate(inputs):
    stem = os.path.splitext(os.path.basename(p))[0]
    prob = np.load(out / f"{stem}_prob.npy")
    mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
    assert prob.dtype == np.float32 and prob.shape == (256, 256)
    np.testing.assert_allclose(prob, ref[i if i < 3 else 0], atol=2e-5)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask, np.where(prob >= 0.5, 255, 0))
  assert 0.0 < (ref >= 0.5).mean() < 1.0  # the threshold is actually exercised


def _write_png(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def test_predict_bad_inputs(converted, tmp_path, capsys):
  good = _write_png(tmp_path / "good.png", np.zeros((256, 256, 3), np.uint8))
  small = _write_png(tmp_path / "small.png", np.zeros((128, 256, 3), np.uint8))
  junk = tmp_path / "junk.tif"
  junk.write_bytes(b"II*\x00not really a tiff")
  other = tmp_path / "other"
  checkpoint_io.save_variables(str(other), "umambabot_pp", {"params": {"a": np.ones(2)}})
  cases = [
      (["--model", "umambabot", "--checkpoint", converted, small], "128"),
      (["--model", "umambabot", "--checkpoint", converted, str(junk)], "junk.tif"),
      (["--model", "umambabot", "--checkpoint", converted, str(tmp_path / "gone.tif")], "gone.tif"),
      (["--model", "no_such_model", "--checkpoint", converted, good], "no_such_model"),
      (["--model", "umambabot", "--checkpoint", str(other), good], "umambabot_pp"),
      (["--model", "umambabot", "--checkpoint", str(tmp_path / "nowhere"), good], "nowhere"),
      (["--model", "umambabot", "--checkpoint", converted, good, str(tmp_path / "x" / "good.png")],
       "good_mask.png"),
  ]
  for argv, needle in cases:
    assert predict.main(argv + ["--output", str(tmp_path / "o")]) == 1, argv
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "o").exists()  # nothing written on failure


def test_predict_entry_point_exit_code(converted, tmp_path):
  small = _write_png(tmp_path / "small.png", np.zeros((64, 64, 3), np.uint8))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.predict", "--model", "umambabot", "--checkpoint",
       converted, "--output", str(tmp_path / "o"), small],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"predict: error: {small}: size 64x64, expected 256x256")


# ------------------------------------------------------------------------------------------------
# python -m jaxmamba.models


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(1, (3, 3))(x)


def test_models_table_real_model_without_timing(capsys):
  assert models_cli.main(["--models", "umambabot", "--no-time"]) == 0
  out = capsys.readouterr().out
  row = [line for line in out.splitlines() if line.startswith("umambabot")]
  assert len(row) == 1
  fields = row[0].split()
  assert fields[1] == fields[2] == "9,813,700"
  # GFLOPs per image (a multiply-add is 2), a lower bound: the chunked scan is a loop whose body
  # XLA's cost analysis counts once
  assert fields[3].startswith(">=") and float(fields[3][2:]) > 1.0
  assert fields[4] == "-"                # no timing asked for
  assert "# GFLOPs >=: the forward runs a loop" in out


def test_models_table_gflops_lower_bound_only_where_the_forward_loops():
  """XLA counts a loop's body once (a 10-step fori_loop of a matmul costs one matmul), so a
  model whose forward loops is marked, and one without a loop is not."""
  x = jnp.ones((64, 64))
  looped = jax.jit(lambda x: jax.lax.fori_loop(0, 10, lambda i, a: a @ x, x)).lower(x).compile()
  plain = jax.jit(lambda x: x @ x).lower(x).compile()
  assert models_cli._flops(looped) < 1.01 * models_cli._flops(plain)   # (+ the loop counter's)
  assert models_cli._has_loop(looped) and not models_cli._has_loop(plain)


def test_models_table_timing_and_unavailable(monkeypatch, capsys):
  real_build = registry.build

  def fake_build(name, **kw):
    if name == "segformer":
      raise ImportError("No module named 'jaxmamba.models.segformer'")
    if name == "unet":
      return _Tiny()
    return real_build(name, **kw)

  monkeypatch.setattr(registry, "build", fake_build)
  assert models_cli.main(["--models", "segformer,unet", "--repeats", "2"]) == 0
  out = capsys.readouterr().out
  seg = next(line for line in out.splitlines() if line.startswith("segformer"))
  assert "not available" in seg
  unet = next(line for line in out.splitlines() if line.startswith("unet")).split()
  # 3x3 conv, 3 -> 1 channels: 28 parameters, 2*27 FLOPs per output pixel (+ bias).
  assert unet[1] == "28" and "(!=" in unet
  assert 256 * 256 * 54 / 1e9 <= float(unet[3]) <= 256 * 256 * 56 / 1e9   # no loop: no ">="
  assert "# GFLOPs >=" not in out
  assert float(unet[4]) > 0.0
  assert models_cli.main(["--models", "nope"]) == 1
