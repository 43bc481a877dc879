"""One conversion from stored uint8 pixels to model input: training, evaluation, prediction and
figures feed bit-identical float32 arrays for the same slice (float32(v) / 255, torch's ToTensor)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba import data

# Every byte value, in a 2 x 16 x 16 x 3 BGR batch of uint8 "slices".
_PIXELS = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
_BATCH = np.stack([_PIXELS, _PIXELS[::-1, ::-1]])
_EXACT = _BATCH.astype(np.float32) / np.float32(255)   # numpy divides in IEEE float32


class _Recorder:
  """A stand-in model that records the float input it is fed (as a host copy)."""

  def __init__(self):
    self.seen = []

  def apply(self, variables, x, train=False):
    del variables, train
    jax.debug.callback(lambda a: self.seen.append(np.asarray(a)), x)
    return x[..., :1]


def _train_input() -> np.ndarray:
  batch = {"image": _BATCH, "mask": np.zeros(_BATCH.shape[:3] + (1,), np.uint8)}
  return np.asarray(jax.jit(lambda b: data.to_float(b)[0])(batch))   # as in the train step


def _eval_input() -> np.ndarray:
  from jaxmamba.train import evaluate as ev
  model = _Recorder()
  step = jax.jit(ev.make_eval_step(model, lambda lg, y, weights=None: jnp.mean(lg), "sigmoid",
                                   has_bn=False))
  step({"params": {}}, _BATCH, np.zeros(_BATCH.shape[:3] + (1,), np.uint8),
       np.ones(len(_BATCH), bool))
  jax.effects_barrier()
  return model.seen[-1]


def _predict_input(monkeypatch) -> np.ndarray:
  from experiments import predict
  from jaxmamba.models import registry
  model = _Recorder()
  monkeypatch.setattr(registry, "build", lambda name, **kw: model)
  predict.make_predictor("unet", {"params": {}})(_BATCH)
  jax.effects_barrier()
  return model.seen[-1]


def test_train_eval_predict_feed_bit_identical_inputs(monkeypatch):
  train, evaluated, predicted = _train_input(), _eval_input(), _predict_input(monkeypatch)
  for name, x in (("train", train), ("evaluate", evaluated), ("predict", predicted)):
    assert x.dtype == np.float32, name
    np.testing.assert_array_equal(x.view(np.uint32), _EXACT.view(np.uint32), err_msg=name)


def test_figures_use_the_same_values():
  from jaxmamba.train.evaluate import overlay_rgb
  shown = overlay_rgb(_BATCH[0])
  np.testing.assert_array_equal(shown.view(np.uint32), _EXACT[0, ..., ::-1].view(np.uint32))


def test_pixels_to_float_rejects_non_uint8():
  import pytest
  with pytest.raises(ValueError, match="must be uint8"):
    data.pixels_to_float(np.zeros((2, 2), np.float32))
