"""jaxmamba.xla_flags: importing jaxmamba moves XLA:CPU's convolutions off YNNPACK, once."""
import os
import subprocess
import sys
from pathlib import Path

from jaxmamba import xla_flags

ROOT = Path(__file__).resolve().parents[1]

# Prints XLA_FLAGS and whether a 3x3 convolution compiled to a YNNPACK fusion.
PROBE = """
import os, jaxmamba, jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
text = conv.lower(jnp.zeros((2, 64, 64, 64)), jnp.zeros((3, 3, 64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""))
print("ynn" in text)
"""


def _probe(xla_flags_env):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags_env is not None:
    env["XLA_FLAGS"] = xla_flags_env
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  return out[-2], out[-1] == "True"


def test_import_puts_convolutions_on_eigen_and_keeps_other_flags():
  flags, ynn = _probe("--xla_cpu_enable_fast_math=false")
  assert flags == f"--xla_cpu_enable_fast_math=false {xla_flags.OPTION}"
  assert not ynn


def test_a_users_own_setting_is_left_alone():
  """`=+individual_convolution` restores XLA's default: the convolution is a YNNPACK fusion again
  (which also shows the probe can see one)."""
  flags, ynn = _probe("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
  assert flags == "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  assert ynn


def test_apply_does_nothing_once_backends_have_started(monkeypatch):
  import jax
  jax.devices()        # this test process's backends are up; the environment is read no more
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_flags.apply() is False
  assert "XLA_FLAGS" not in os.environ


def test_option_is_in_effect_in_this_test_process():
  """The test run itself (which imports jaxmamba first) runs with the option."""
  assert xla_flags.OPTION in os.environ.get("XLA_FLAGS", "")


def test_only_measured_jaxlib_versions_get_the_option(monkeypatch):
  """XLA aborts on an unknown flag or value, so another jaxlib keeps its defaults."""
  assert xla_flags._jaxlib_measured()           # the pinned jaxlib
  monkeypatch.setattr(xla_flags, "MEASURED_JAXLIB", ("0.9.",))
  assert not xla_flags._jaxlib_measured()
