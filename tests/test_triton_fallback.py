"""impl="auto" on a GPU never falls back from the Triton kernel silently: a warning (once per
process) gives the reason, and available()/supports() keep their reasons without raising.

No GPU is needed: the backend jax reports is replaced by "gpu"; on this CPU-only jax,
jax_triton's import fails, which is one of the reasons the warning must carry.
"""
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmamba.ops import triton_dispatch as td

# The module itself (the package exports the function under the same name).
ss = importlib.import_module("jaxmamba.ops.selective_scan")


def _args(dtype=jnp.float32):
  u = jnp.ones((1, 4, 6), dtype)
  BC = jnp.ones((1, 2, 6), dtype)
  return u, 0.1 * u, -jnp.ones((4, 2), dtype), BC, BC


@pytest.fixture
def fake_gpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(ss, "_FALLBACK_WARNED", False, raising=False)


def _auto_warnings(*args):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = ss.selective_scan(*args, impl="auto")
  return y, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_auto_warns_once_with_the_reason_when_jax_triton_is_missing(fake_gpu):
  if importlib_ok("jax_triton"):
    pytest.skip("jax_triton imports here; this checks the missing-jax_triton path")
  args = _args()
  y, msgs = _auto_warnings(*args)
  assert len(msgs) == 1 and "not the Triton kernel" in msgs[0], msgs
  assert "jax_triton does not import" in msgs[0], msgs
  np.testing.assert_allclose(y, ss.selective_scan(*args, impl="chunked"), rtol=1e-6)
  _, again = _auto_warnings(*args)
  assert again == [], again                      # once per process


def test_auto_warns_with_the_reason_for_an_unsupported_call(fake_gpu, monkeypatch):
  monkeypatch.setattr(td, "unavailable_reason", lambda: None, raising=False)  # as if jax_triton imported
  monkeypatch.setattr(td, "available", lambda: True)
  u, delta, A, B, C = _args()
  big = jnp.ones((1, td.MAX_STATE + 1, 6))
  _, msgs = _auto_warnings(u, delta, jnp.ones((4, td.MAX_STATE + 1)), big, big)
  assert len(msgs) == 1 and f"N={td.MAX_STATE + 1} > {td.MAX_STATE} states" in msgs[0], msgs


def test_reasons_are_kept_and_never_raise(monkeypatch):
  assert "not a GPU" in td.unavailable_reason()
  assert td.available() is False
  u, delta, A, B, C = _args()
  assert td.support_reason(u, delta, A, B, C) is None
  assert "B and C must have the same shape" in td.support_reason(u, delta, A, B, C[:, :, :3])
  def broken(*a, **k):
    raise RuntimeError("plan exploded")
  monkeypatch.setattr(td, "unsupported_reason", broken)
  assert "RuntimeError: plan exploded" in td.support_reason(u, delta, A, B, C)
  assert td.supports(u, delta, A, B, C) is False
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(td, "_kernels", broken)
  reason = td.unavailable_reason()
  assert reason is not None and ("jax_triton" in reason or "plan exploded" in reason), reason


def importlib_ok(name):
  try:
    __import__(name)
    return True
  except Exception:  # noqa: BLE001
    return False
