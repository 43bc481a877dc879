"""Starting from given weights: torchvision encoders through the converter, and config.init_from."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmamba import checkpoint_io, convert
from jaxmamba.models import registry
from tests.test_train import tiny, tiny_config  # noqa: F401  (fixture)
from third_party.torch_models import resnet_seg as torch_resnet


@pytest.mark.slow
def test_torchvision_encoder_through_the_converter(tmp_path):
  torch.manual_seed(0)
  backbone = torch_resnet.resnet(18)
  with torch.no_grad():   # non-trivial BN statistics, so a missed buffer would show
    for name, buf in backbone.named_buffers():
      if "running" in name:
        buf.uniform_(0.5, 1.5)
  pth = tmp_path / "resnet18.pth"
  torch.save(backbone.state_dict(), pth)

  out = tmp_path / "ckpt"
  assert convert.main(["--model", "resnet18_seg", "--torchvision-encoder", str(pth),
                       "--workdir", str(out)]) == 0
  name, got = checkpoint_io.load_variables(str(out), expected_model="resnet18_seg")
  assert name == "resnet18_seg"

  # Oracle: the authors' ResNetSeg around the same backbone, converted in full.
  full = registry.from_torch_state_dict(
      "resnet18_seg", torch_resnet.ResNetSeg(18, backbone=backbone).state_dict())
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)  # noqa: E731
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  got_flat, full_flat = flat(got), flat(full)
  assert got_flat.keys() == full_flat.keys()
  encoder = [k for k in full_flat if "deconv" not in k]
  decoder = [k for k in full_flat if "deconv" in k]
  assert encoder and decoder
  for k in encoder:
    np.testing.assert_array_equal(got_flat[k], full_flat[k], err_msg=k)
  # The decoder is a fresh init, not the backbone's (it has none) nor zeros.
  assert all(np.any(got_flat[k] != full_flat[k]) for k in decoder if k.endswith("'kernel']"))


def test_torchvision_encoder_is_refused_for_other_models(tmp_path, capsys):
  pth = tmp_path / "x.pth"
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, pth)
  assert convert.main(["--model", "unet", "--torchvision-encoder", str(pth),
                       "--workdir", str(tmp_path / "o")]) == 1
  assert "ResNet-seg" in capsys.readouterr().err


def test_init_from_starts_training_from_saved_weights(tiny, tmp_path):  # noqa: F811
  from jaxmamba.train import trainer
  fresh = trainer._Setup(tiny_config(), workdir=None)
  given = jax.tree.map(lambda a: np.full(a.shape, 0.25, np.float32),
                       {"params": fresh.state["params"], "batch_stats": fresh.state["batch_stats"]})
  checkpoint_io.save_variables(str(tmp_path / "w"), "unet", given)

  started = trainer._Setup(tiny_config(init_from=str(tmp_path / "w")), workdir=None)
  for col in ("params", "batch_stats"):
    for leaf in jax.tree.leaves(started.state[col]):
      np.testing.assert_array_equal(leaf, 0.25)
  # The optimiser state is fresh for the new parameters (Adam moments at zero).
  assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(started.state["opt_state"])
             if hasattr(m, "shape") and m.ndim > 0)

  checkpoint_io.save_variables(str(tmp_path / "other"), "segformer", given)
  with pytest.raises(checkpoint_io.CheckpointError, match="segformer"):
    trainer._Setup(tiny_config(init_from=str(tmp_path / "other")), workdir=None)
