"""Losses against PyTorch's own ops and direct numpy formulas."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmamba.train import losses


def _data(seed=0, shape=(3, 8, 8, 1), scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal(shape) * scale).astype(np.float32)
  masks = (rng.random(shape) < 0.3).astype(np.float32)
  return logits, masks


def test_pooled_dice_matches_formula():
  logits, masks = _data()
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = 1 - (2 * (p * masks).sum() + 100) / (p.sum() + masks.sum() + 100)
  got = float(losses.dice_loss_pooled(jnp.asarray(logits), jnp.asarray(masks)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_pooled_dice_is_not_per_image():
  """Pooling over the batch differs from averaging per-image Dice when images differ."""
  logits, masks = _data()
  masks[0] = 0
  pooled = float(losses.dice_loss_pooled(jnp.asarray(logits), jnp.asarray(masks), smooth=1.0))
  per_image = float(losses.dice_loss_per_image(jnp.asarray(logits), jnp.asarray(masks), 1.0))
  assert abs(pooled - per_image) > 1e-3


def test_bce_with_logits_matches_torch():
  logits, masks = _data(scale=30.0)
  expected = torch.nn.functional.binary_cross_entropy_with_logits(
      torch.from_numpy(logits), torch.from_numpy(masks)).item()
  got = float(losses.bce_with_logits(jnp.asarray(logits), jnp.asarray(masks)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ultralight_bce_dice_matches_torch_on_probabilities():
  """The authors' BceDiceLoss on sigmoid outputs (BCELoss + per-image Dice, smooth 1)."""
  logits, masks = _data(seed=1, scale=2.0)
  lt, mt = torch.from_numpy(logits), torch.from_numpy(masks)
  p = torch.sigmoid(lt)
  bce = torch.nn.BCELoss()(p, mt)
  b = p.shape[0]
  pf, mf = p.reshape(b, -1), mt.reshape(b, -1)
  dice = (2 * (pf * mf).sum(1) + 1) / (pf.sum(1) + mf.sum(1) + 1)
  expected = (bce + 1 - dice.mean()).item()
  got = float(losses.bce_dice_loss(jnp.asarray(logits), jnp.asarray(masks)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("scale", [10.0, 60.0])
def test_clamped_bce_elements_at_large_logits(scale):
  """Where torch's float32 sigmoid rounds to 1 its BCE term is the clamp (100); elsewhere ours is
  the exact value (torch's own float32 1 - p loses digits there, so compare with float64)."""
  logits, masks = _data(seed=1, scale=scale)
  got = np.asarray(losses._bce_elements(jnp.asarray(logits), jnp.asarray(masks)))
  p32 = torch.sigmoid(torch.from_numpy(logits)).numpy()
  saturated = (p32 == 1.0) & (masks == 0)
  assert saturated.any()
  np.testing.assert_array_equal(got[saturated], 100.0)
  p64 = torch.sigmoid(torch.from_numpy(logits).double())
  exact = torch.nn.BCELoss(reduction="none")(p64, torch.from_numpy(masks).double()).numpy()
  np.testing.assert_allclose(got[~saturated], exact[~saturated], rtol=1e-5, atol=1e-6)
  # Confidently wrong positives are capped at 100 per pixel, as in torch.
  wrong = jnp.full((1, 2, 2, 1), -1e4)
  assert float(losses.clamped_bce_from_logits(wrong, jnp.ones_like(wrong))) == pytest.approx(100.0)


def test_clamped_bce_gradient_matches_torch():
  logits, masks = _data(seed=3, scale=12.0)
  lt = torch.from_numpy(logits).requires_grad_()
  torch.nn.BCELoss()(torch.sigmoid(lt), torch.from_numpy(masks)).backward()
  import jax
  grad = jax.grad(losses.clamped_bce_from_logits)(jnp.asarray(logits), jnp.asarray(masks))
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(np.asarray(grad), lt.grad.numpy(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_weight_zero_images_do_not_count(name):
  logits, masks = _data(seed=2)
  fn = losses.get_loss(name)
  plain = float(fn(jnp.asarray(logits[:2]), jnp.asarray(masks[:2])))
  padded_logits = np.concatenate([logits[:2], np.full_like(logits[:1], 5.0)])
  padded_masks = np.concatenate([masks[:2], np.zeros_like(masks[:1])])
  weighted = float(fn(jnp.asarray(padded_logits), jnp.asarray(padded_masks),
                      weights=jnp.asarray([1.0, 1.0, 0.0])))
  np.testing.assert_allclose(weighted, plain, rtol=1e-5)


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown loss 'focal'"):
    losses.get_loss("focal")
