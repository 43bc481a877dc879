"""Training losses of the paper's recipes, all taking logits (B, H, W, 1) and masks in [0, 1].

Every loss accepts optional per-image `weights` (B,) in {0, 1}: images with weight 0 are padding
(used by evaluation to keep one compiled shape) and contribute nothing.  All sums are float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("dice_pooled", "bce", "bce_dice", "dice_bce_per_image")


def _per_image(x, weights):
  w = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
  return w.reshape((-1,) + (1,) * (x.ndim - 1)), w


def dice_loss_pooled(logits, masks, smooth: float = 100.0, weights=None):
  """The authors' DiceLoss: sigmoid inside, counts pooled over the whole batch tensor.

  L = 1 - (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth), smooth 100 (spec §9.3).
  """
  w, _ = _per_image(logits, weights)
  p = jax.nn.sigmoid(logits.astype(jnp.float32)) * w
  y = masks.astype(jnp.float32) * w
  return 1.0 - (2.0 * jnp.sum(p * y) + smooth) / (jnp.sum(p) + jnp.sum(y) + smooth)


def bce_with_logits(logits, masks, weights=None):
  """torch BCEWithLogitsLoss (mean over valid elements), SegFormer's loss."""
  w, wi = _per_image(logits, weights)
  x = logits.astype(jnp.float32)
  y = masks.astype(jnp.float32)
  # max(x, 0) - x y + log(1 + exp(-|x|)): the overflow-free form torch also uses.
  elem = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  per_image_count = x[0].size
  return jnp.sum(elem * w) / jnp.maximum(jnp.sum(wi) * per_image_count, 1.0)


def _clamped_logs(x):
  """(log p, log(1 - p)) of p = float32 sigmoid(x), each clamped at -100 as torch BCELoss does.

  log_sigmoid keeps both finite for any x.  One float32 effect is kept on purpose: above x ~ 16.6
  torch's sigmoid rounds to exactly 1, so its log(1 - p) is log(0), clamped to -100; the same is
  done here where sigmoid(x) == 1.  (sigmoid only reaches 0 below x ~ -103, already clamped.)
  """
  saturated = jax.nn.sigmoid(x) == 1.0
  log_p = jnp.maximum(jax.nn.log_sigmoid(x), -100.0)
  log_1mp = jnp.maximum(jax.nn.log_sigmoid(-jnp.where(saturated, 0.0, x)), -100.0)
  return log_p, jnp.where(saturated, -100.0, log_1mp)


@jax.custom_vjp
def _bce_elements(x, y):
  log_p, log_1mp = _clamped_logs(x)
  return -(y * log_p + (1.0 - y) * log_1mp)


def _bce_fwd(x, y):
  return _bce_elements(x, y), (x, y)


def _bce_bwd(res, g):
  # torch: dL/dp = (p - y) / max(p (1 - p), 1e-12), then sigmoid's backward multiplies by
  # p (1 - p); the epsilon damps the gradient of confidently wrong pixels (|x| > ~27.6) and
  # zeroes it where p rounds to 0 or 1.
  x, y = res
  p = jax.nn.sigmoid(x)
  s = p * (1.0 - p)
  log_p, log_1mp = _clamped_logs(x)
  return g * (p - y) * s / jnp.maximum(s, 1e-12), g * (log_1mp - log_p)


_bce_elements.defvjp(_bce_fwd, _bce_bwd)


def clamped_bce_from_logits(logits, masks, weights=None):
  """torch BCELoss (mean) on float32 sigmoid(logits), computed from logits without inf/NaN.

  Values and gradients equal the authors' loss on their models' probability output, including
  the log clamp at -100 and BCELoss's backward epsilon (see `_clamped_logs`, `_bce_bwd`).
  """
  w, wi = _per_image(logits, weights)
  elem = _bce_elements(logits.astype(jnp.float32), masks.astype(jnp.float32))
  return jnp.sum(elem * w) / jnp.maximum(jnp.sum(wi) * logits[0].size, 1.0)


def dice_loss_per_image(logits, masks, smooth: float = 1.0, weights=None):
  """1 - mean over images of (2 sum_i(p y) + smooth) / (sum_i p + sum_i y + smooth)."""
  _, wi = _per_image(logits, weights)
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  y = masks.astype(jnp.float32)
  axes = tuple(range(1, p.ndim))
  dice = (2.0 * jnp.sum(p * y, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(y, axes) + smooth)
  return 1.0 - jnp.sum(dice * wi) / jnp.maximum(jnp.sum(wi), 1.0)


def bce_dice_loss(logits, masks, smooth: float = 1.0, weights=None):
  """The UltraLight BceDiceLoss (weights 1 and 1): clamped BCE + per-image Dice (smooth 1)."""
  return (clamped_bce_from_logits(logits, masks, weights)
          + dice_loss_per_image(logits, masks, smooth, weights))


def dice_bce_per_image(logits, masks, smooth: float = 1.0, weights=None):
  """The improved recipe's loss: BCE with logits + per-image soft Dice (smooth 1)."""
  return (bce_with_logits(logits, masks, weights)
          + dice_loss_per_image(logits, masks, smooth, weights))


def get_loss(name: str, smooth: float | None = None):
  """Loss function `fn(logits, masks, weights=None) -> scalar` by config name."""
  if name == "dice_pooled":
    s = 100.0 if smooth is None else smooth
    return lambda lg, m, weights=None: dice_loss_pooled(lg, m, s, weights)
  if name == "bce":
    return bce_with_logits
  if name == "bce_dice":
    s = 1.0 if smooth is None else smooth
    return lambda lg, m, weights=None: bce_dice_loss(lg, m, s, weights)
  if name == "dice_bce_per_image":
    s = 1.0 if smooth is None else smooth
    return lambda lg, m, weights=None: dice_bce_per_image(lg, m, s, weights)
  raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
