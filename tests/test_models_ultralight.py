"""UltraLight VM-UNet and variants v1-v6: parameter counts, exact parity with a PyTorch oracle built
on mamba_ssm's Mamba (third_party/torch_models/ultralight.py), gradients, initialisation, the scan
shapes each PVM runs, and state_dict errors."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxmamba.models import registry  # noqa: E402
from third_party.torch_models import ultralight as torch_ul  # noqa: E402

UL_NAMES = ["ulvmunet", "ulvmunet_v1", "ulvmunet_v2", "ulvmunet_v3", "ulvmunet_v4", "ulvmunet_v5",
            "ulvmunet_v6"]
# Table I / summary.txt of the paper's repository.
PAPER_PARAMS = {"ulvmunet": 49_457, "ulvmunet_v1": 217_165, "ulvmunet_v2": 42_737,
                "ulvmunet_v3": 176_453, "ulvmunet_v4": 1_135_309, "ulvmunet_v5": 703_885,
                "ulvmunet_v6": 769_677}
TOL = 1e-4
# The XLA CPU backend's default optimisation makes a whole-model compile take tens of seconds on two
# cores; level 0 keeps the same HLO (same arithmetic) and compiles about three times faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(autouse=True)
def _torch_threads():
  torch.set_num_threads(2)


def variant_of(name):
  return registry.entry(name).fixed_kwargs["variant"]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturbed_torch_model(name, seed=0):
  """The authors' model with every parameter moved off its (often constant) initial value."""
  torch.manual_seed(seed)
  model = torch_ul.build(variant_of(name)).eval()
  with torch.no_grad():
    for p in model.parameters():
      std = float(p.std()) if p.numel() > 1 else 0.0
      p.add_(torch.randn_like(p) * (0.5 * std if std > 1e-6 else 0.1))
  return model


def compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def nhwc(t):
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def check_forward(name, size, batch, scan_impl, seed=0):
  model_t = perturbed_torch_model(name, seed)
  x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
  with torch.no_grad():
    probs_t = model_t(x).numpy()
    logits_t = model_t.forward_logits(x).numpy()
  variables = registry.from_torch_state_dict(name, model_t.state_dict())
  model = registry.build(name, scan_impl=scan_impl)
  logits = nchw(compiled(model.apply, variables, nhwc(x))(variables, nhwc(x)))
  assert logits.shape == (batch, 1, size, size)
  # Logits against the oracle before its sigmoid, and our sigmoid against its actual output.
  assert rel_err(logits, logits_t) <= TOL, rel_err(logits, logits_t)
  assert rel_err(jax.nn.sigmoid(logits), probs_t) <= TOL
  assert np.std(logits_t) > 0.1  # a meaningful comparison, not two near-constant maps


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UL_NAMES)
def test_param_count_matches_paper(name):
  assert registry.entry(name).paper_params == PAPER_PARAMS[name]
  model = registry.build(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"])) == PAPER_PARAMS[name]
  assert set(shapes) == {"params"}  # no BatchNorm, no other state
  torch_count = sum(p.numel() for p in torch_ul.build(variant_of(name)).parameters())
  assert torch_count == PAPER_PARAMS[name]


@pytest.mark.parametrize("name", UL_NAMES)
def test_forward_matches_torch_small(name):
  # 64x64: the 6-level models reach a 2x2 bottleneck, the 5-level ones 4x4.
  check_forward(name, 64, 2, "reference")


@pytest.mark.slow
@pytest.mark.parametrize("name,scan_impl", [("ulvmunet", "chunked"), ("ulvmunet_v4", "reference")])
def test_forward_matches_torch_256(name, scan_impl):
  check_forward(name, 256, 1, scan_impl, seed=3)


def test_gradients_match_torch():
  name = "ulvmunet"
  model_t = perturbed_torch_model(name, seed=5)
  gen = torch.Generator().manual_seed(6)
  x = torch.rand(2, 3, 32, 32, generator=gen, requires_grad=True)
  weights = torch.randn(2, 1, 32, 32, generator=gen)
  (model_t.forward_logits(x) * weights).sum().backward()
  grads_t = registry.from_torch_state_dict(
      name, {k: p.grad for k, p in model_t.named_parameters()})["params"]

  variables = registry.from_torch_state_dict(name, model_t.state_dict())
  model = registry.build(name, scan_impl="associative")
  w = jnp.asarray(weights.numpy().transpose(0, 2, 3, 1))

  def loss(params, xj):
    return jnp.sum(model.apply({"params": params}, xj) * w)

  xj = nhwc(x)
  g_params, g_x = compiled(jax.grad(loss, argnums=(0, 1)), variables["params"], xj)(
      variables["params"], xj)
  assert rel_err(nchw(g_x), x.grad.numpy()) <= TOL
  flat_t = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(grads_t)}
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(g_params)}
  assert flat.keys() == flat_t.keys()
  everything = rel_err(np.concatenate([np.ravel(flat[k]) for k in flat_t]),
                       np.concatenate([np.ravel(flat_t[k]) for k in flat_t]))
  assert everything <= TOL
  # Per tensor too, so a small tensor cannot hide in the total.  The absolute slack covers float32
  # cancellation in tiny sums (e.g. a bias whose gradient is a sum of +- terms ~1e3 times larger),
  # and exactly-zero gradients (A_log at a 1x1 bottleneck: with L = 1, exp(delta*A) never acts).
  scale = max(float(np.abs(v).max()) for v in flat_t.values())
  for k in flat_t:
    err = np.linalg.norm(np.ravel(flat[k]) - np.ravel(flat_t[k]))
    assert err <= 1e-3 * np.linalg.norm(flat_t[k]) + 1e-6 * scale, (k, err, np.linalg.norm(flat_t[k]))


def test_bfloat16_close_to_float32():
  """dtype=bfloat16 computes in bf16 (norms and scan in float32) and stays near the float32 oracle."""
  model_t = perturbed_torch_model("ulvmunet", seed=7)
  x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
  with torch.no_grad():
    logits_t = model_t.forward_logits(x).numpy()
  variables = registry.from_torch_state_dict("ulvmunet", model_t.state_dict())
  model = registry.build("ulvmunet", scan_impl="reference", dtype=jnp.bfloat16)
  out = compiled(model.apply, variables, nhwc(x))(variables, nhwc(x))
  assert out.dtype == jnp.float32 and out.shape == (2, 32, 32, 1)
  assert jax.tree.leaves(variables)[0].dtype == np.float32
  # Not float32-exact (so bf16 really ran), but close.
  assert 1e-4 < rel_err(nchw(out), logits_t) < 0.1


def test_init_follows_authors_reinitialisation():
  """Per-tensor statistics of our init against the authors' constructor (spec §1.6).  v4 has
  every kind of layer (convs, PVMs with PPMs, bridge)."""
  name = "ulvmunet_v4"
  ours = compiled(registry.build(name).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  torch.manual_seed(0)
  theirs = registry.from_torch_state_dict(name, torch_ul.build(variant_of(name)).state_dict())
  ours = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(ours)}
  for path, ref in jax.tree_util.tree_leaves_with_path(theirs["params"]):
    key, ref = jax.tree_util.keystr(path), np.asarray(ref)
    got = ours[key]
    if np.all(ref == ref.flat[0]) or "A_log" in key:  # constants: zeros, ones, A_log
      np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=key)
    elif ref.size >= 200:
      assert 0.8 < got.std() / ref.std() < 1.25, (key, got.std(), ref.std())
      assert abs(got.mean()) < 0.2 * ref.std() + 1e-3, key
      assert np.abs(got).max() <= 1.5 * np.abs(ref).max() + 1e-6, key


# Spec §5: (batch multiplier k, d_inner, L) of the one Mamba call each PVM makes, at 256x256,
# in call order encoder4/5/6, decoder1/2/3 (5-level: encoder3/4/5, decoder1/2/3).
SCAN_SHAPES_256 = {
    "ulvmunet": [(4, 12, 1024), (4, 16, 256), (4, 24, 64), (4, 32, 64), (4, 24, 64), (4, 16, 256)],
    "ulvmunet_v3": [(8, 8, 4096), (8, 16, 1024), (8, 32, 256), (8, 64, 256), (8, 32, 256),
                    (8, 16, 1024)],
    "ulvmunet_v4": [(8, 16, 1024), (8, 32, 256), (8, 64, 64), (8, 128, 64), (8, 64, 64),
                    (8, 32, 256)],
}


@pytest.mark.parametrize("name", sorted(SCAN_SHAPES_256))
def test_each_pvm_runs_one_scan_with_chunks_in_batch(name, monkeypatch):
  import jaxmamba.nn.mamba as mamba_mod
  calls = []
  real = mamba_mod.selective_scan

  def recording(u, *args, **kwargs):
    calls.append(u.shape)
    return real(u, *args, **kwargs)

  monkeypatch.setattr(mamba_mod, "selective_scan", recording)
  model = registry.build(name)
  x = jnp.zeros((2, 256, 256, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  calls.clear()
  jax.eval_shape(model.apply, variables, x)
  assert calls == [(2 * k, di, length) for k, di, length in SCAN_SHAPES_256[name]]


def test_state_dict_errors_name_the_key():
  sd = {k: v.clone() for k, v in torch_ul.build("base").state_dict().items()}
  registry.from_torch_state_dict("ulvmunet", sd)  # the intact one converts
  # DataParallel checkpoints carry a `module.` prefix.
  registry.from_torch_state_dict("ulvmunet", {"module." + k: v for k, v in sd.items()})

  for key in ("encoder4.0.mamba.A_log", "scab.catt.att3.bias", "dbn2.weight", "final.bias"):
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises((KeyError, ValueError), match=re.escape(key)):
      registry.from_torch_state_dict("ulvmunet", missing)
  for key in ("encoder5.0.proj.weight", "scab.satt.shared_conv2d.0.weight", "decoder1.0.skip_scale"):
    wrong = dict(sd, **{key: torch.zeros(tuple(sd[key].shape) + (1,))})
    with pytest.raises(ValueError, match=re.escape(key)):
      registry.from_torch_state_dict("ulvmunet", wrong)
  with pytest.raises(ValueError, match=re.escape("encoder4.0.ppm.conv_layers.0.weight")):
    registry.from_torch_state_dict(
        "ulvmunet", dict(sd, **{"encoder4.0.ppm.conv_layers.0.weight": torch.zeros(3, 24, 1, 1)}))
  # A v5 checkpoint is not a v4 one: v4's PVMs need PPM weights.
  with pytest.raises(KeyError, match=re.escape("encoder4.0.ppm.conv_layers.0.weight")):
    registry.from_torch_state_dict("ulvmunet_v4", torch_ul.build("v5").state_dict())


def test_bad_inputs_raise():
  from jaxmamba.models.ultralight import UltraLightVMUNet
  model = registry.build("ulvmunet")
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="input"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
  # 5-level models only need multiples of 16.
  jax.eval_shape(registry.build("ulvmunet_v1").init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="unknown variant"):
    jax.eval_shape(UltraLightVMUNet(variant="v7").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
