"""UMambaBot / UMambaBot-PP against the PyTorch oracle (nnU-Net blocks + mamba_ssm's Mamba)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxmamba.models import registry  # noqa: E402
from jaxmamba.models import umamba  # noqa: E402
from third_party.torch_models import umamba as torch_umamba  # noqa: E402

NAMES = {"umambabot": False, "umambabot_pp": True}
# The paper's (summary.txt) parameter counts, typed in from the spec, not computed.
PAPER_PARAMS = {"umambabot": 9_813_700, "umambabot_pp": 10_076_356}


def setup_module():
  torch.set_num_threads(2)


def _torch_model(pyramid_pooling: bool, seed: int = 0):
  """The oracle with every parameter moved away from its init (biases non-zero, LN non-trivial)."""
  torch.manual_seed(seed)
  model = torch_umamba.UMambaBot(pyramid_pooling).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * p.abs().mean().clamp(min=0.05) * torch.randn_like(p))
  return model


def _rel_err(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _compare(name: str, size: int, batch: int, seed: int = 0) -> float:
  tmodel = _torch_model(NAMES[name], seed)
  x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
  with torch.no_grad():
    ref = tmodel(x).numpy().transpose(0, 2, 3, 1)
  variables = registry.from_torch_state_dict(name, tmodel.state_dict())
  model = registry.build(name)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert out.shape == (batch, size, size, 1) and out.dtype == jnp.float32
  return _rel_err(out, ref)


@pytest.fixture(scope="module")
def state_dicts():
  return {name: {k: v.numpy() for k, v in _torch_model(pp).state_dict().items()}
          for name, pp in NAMES.items()}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_parameter_counts_match_paper(name):
  model = registry.build(name)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert set(shapes) == {"params"}  # InstanceNorm: no running statistics
  n = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert n == PAPER_PARAMS[name] == registry.entry(name).paper_params
  # The three unused deep-supervision heads are there and counted.
  assert sorted(k for k in shapes["params"]["decoder"] if k.startswith("seg_layers")) == [
      f"seg_layers_{i}" for i in range(4)]
  # The oracle agrees (guards the oracle itself).
  tmodel = torch_umamba.UMambaBot(NAMES[name])
  assert sum(p.numel() for p in tmodel.parameters()) == PAPER_PARAMS[name]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_parity_64(name):
  assert _compare(name, 64, 2) <= 1e-4


@pytest.mark.slow
def test_parity_pp_256():
  assert _compare("umambabot_pp", 256, 1, seed=3) <= 1e-4


def test_duplicate_keys_optional(state_dicts):
  sd = state_dicts["umambabot_pp"]
  assert any(".all_modules.0." in k for k in sd) and any(k.startswith("decoder.encoder.") for k in sd)
  lean = {k: v for k, v in sd.items()
          if ".all_modules.0." not in k and not k.startswith("decoder.encoder.")}
  full = registry.from_torch_state_dict("umambabot_pp", sd)
  slim = registry.from_torch_state_dict("umambabot_pp", lean)
  jax.tree.map(np.testing.assert_array_equal, full, slim)
  # DataParallel's prefix is stripped by the registry.
  prefixed = registry.from_torch_state_dict("umambabot_pp", {"module." + k: v for k, v in lean.items()})
  jax.tree.map(np.testing.assert_array_equal, full, prefixed)


@pytest.mark.parametrize("mutation, key", [
    ("missing", "decoder.transpconvs.2.weight"),
    ("missing", "mamba.A_log"),
    ("shape", "encoder.stages.3.blocks.0.conv1.conv.weight"),
    ("shape", "ln.bias"),
    ("extra", "decoder.seg_layers.4.weight"),
    ("differs", "encoder.stages.1.blocks.0.skip.1.all_modules.0.weight"),
    ("differs", "decoder.encoder.stem.convs.0.conv.bias"),
])
def test_mismatched_state_dict_names_key(state_dicts, mutation, key):
  sd = dict(state_dicts["umambabot"])
  if mutation == "missing":
    del sd[key]
  elif mutation == "shape":
    sd[key] = np.zeros(sd[key].shape[:-1] + (sd[key].shape[-1] + 1,), np.float32)
  elif mutation == "extra":
    sd[key] = np.zeros((1, 16, 1, 1), np.float32)
  else:
    sd[key] = sd[key] + 1.0
  with pytest.raises((KeyError, ValueError), match=key.replace(".", r"\.")):
    registry.from_torch_state_dict("umambabot", sd)


def test_ppm_keys_rejected_without_pyramid_pooling(state_dicts):
  with pytest.raises(ValueError, match=r"ppm\.conv_layers"):
    registry.from_torch_state_dict("umambabot", state_dicts["umambabot_pp"])


@pytest.mark.slow
def test_init_follows_torch_defaults():
  """Each Flax parameter's initial spread matches the torch model's fresh init (same key map)."""
  torch.manual_seed(0)
  ref = registry.from_torch_state_dict("umambabot_pp", umamba_torch_fresh())["params"]
  model = registry.build("umambabot_pp")
  ours = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
  for path, value in jax.tree_util.tree_flatten_with_path(ours)[0]:
    a, b = np.asarray(value), flat_ref[path]
    name = jax.tree_util.keystr(path)
    assert a.shape == b.shape, name
    if b.size > 1 and np.ptp(b) == 0:  # constants (LN weight/bias, D) must be equal
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    if b.size < 256:  # too few draws to compare distributions
      continue
    # Both inits are bounded (uniform / log-uniform / log n): the largest |value| converges fast.
    np.testing.assert_allclose(np.abs(a).max(), np.abs(b).max(), rtol=0.1, err_msg=name)
    # Means of n draws differ by a few std/sqrt(n).
    np.testing.assert_allclose(np.mean(a), np.mean(b), atol=6 * np.std(b) / np.sqrt(b.size),
                               err_msg=name)
    if b.size >= 2048:  # sample std is within ~1% from here on
      np.testing.assert_allclose(np.std(a), np.std(b), rtol=0.1, err_msg=name)


def umamba_torch_fresh():
  return {k: v.numpy() for k, v in torch_umamba.UMambaBot(True).state_dict().items()}


def test_bfloat16_compute_close_to_float32(state_dicts):
  variables = registry.from_torch_state_dict("umambabot", state_dicts["umambabot"])
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3))
  f32 = jax.jit(registry.build("umambabot").apply)(variables, x)
  bf16 = jax.jit(registry.build("umambabot", dtype=jnp.bfloat16).apply)(variables, x)
  assert bf16.dtype == jnp.float32
  assert jax.tree.leaves(variables)[0].dtype == np.float32
  assert _rel_err(bf16, np.asarray(f32)) < 0.05


@pytest.mark.parametrize("shape", [(1, 40, 64, 3), (1, 64, 64, 1), (64, 64, 3)])
def test_bad_input_shapes(shape):
  model = umamba.UMambaBot()
  with pytest.raises(ValueError, match="UMambaBot"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
