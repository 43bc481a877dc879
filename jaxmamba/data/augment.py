"""On-device data augmentation (off by default, as in the paper): a pure JAX function.

`augment(rng, images, masks, cfg)` runs inside the jitted train step on float32 batches
(images (B,H,W,C) in [0,1], masks (B,H,W,1) in {0,1}).  Per sample it draws a left-right and an
up-down flip, a rotation and a zoom about the image centre (one affine map shared by image and
mask; images sampled bilinearly with zero padding, masks sampled bilinearly then re-binarised
at 0.5), then a brightness offset and contrast gain on the image (clipped to [0,1]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _bilinear(image: jax.Array, src_y: jax.Array, src_x: jax.Array) -> jax.Array:
  """Samples image (H,W,C) at float source coordinates (H,W) each; zero outside."""
  h, w = image.shape[:2]
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
  out = jnp.zeros(src_y.shape + image.shape[2:], image.dtype)
  for dy, fy in ((0, 1 - wy), (1, wy)):
    for dx, fx in ((0, 1 - wx), (1, wx)):
      yy, xx = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
      inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
      pixel = image[jnp.clip(yy, 0, h - 1), jnp.clip(xx, 0, w - 1)]
      out = out + jnp.where(inside, pixel, 0) * fy * fx
  return out


def warp(images: jax.Array, masks: jax.Array, matrices: jax.Array):
  """Applies per-sample 2x2 maps about the image centre (output pixel p <- input M (p - c) + c).

  Args:
    images: (B,H,W,C) float.  masks: (B,H,W,1) float in {0,1}.
    matrices: (B,2,2), acting on (row, column) offsets from the centre.
  Returns:
    Warped images and masks (masks re-binarised at 0.5).
  """
  h, w = images.shape[1:3]
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2,
                            jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2, indexing="ij")

  def one(image, mask, m):
    src_y = m[0, 0] * rows + m[0, 1] * cols + (h - 1) / 2
    src_x = m[1, 0] * rows + m[1, 1] * cols + (w - 1) / 2
    return _bilinear(image, src_y, src_x), _bilinear(mask, src_y, src_x)

  images, masks = jax.vmap(one)(images, masks, matrices)
  return images, (masks >= 0.5).astype(masks.dtype)


def _check(cfg):
  for key in ("flip_lr", "flip_ud"):
    if not 0.0 <= cfg[key] <= 1.0:
      raise ValueError(f"augment.{key} is a probability in [0, 1], got {cfg[key]}")
  if cfg.rotate_deg < 0 or cfg.brightness < 0 or cfg.contrast < 0:
    raise ValueError("augment.rotate_deg, brightness and contrast must be >= 0")
  if not 0 < cfg.scale_min <= cfg.scale_max:
    raise ValueError(f"augment needs 0 < scale_min <= scale_max, got {cfg.scale_min}, "
                     f"{cfg.scale_max}")


def augment(rng: jax.Array, images: jax.Array, masks: jax.Array, cfg):
  """Randomly augments a float32 batch; returns (images, masks) unchanged unless cfg.enabled.

  Args:
    rng: a jax PRNG key (fold in the step so each step differs).
    images: float32 (B,H,W,C) in [0, 1].  masks: float32 (B,H,W,1) in {0, 1}.
    cfg: the `data.augment` ConfigDict (static: read while tracing).
  """
  if not cfg.enabled:
    return images, masks
  _check(cfg)
  if images.ndim != 4 or masks.shape != images.shape[:3] + (1,):
    raise ValueError(f"expected images (B,H,W,C) and masks (B,H,W,1), got {images.shape} and "
                     f"{masks.shape}")
  b = images.shape[0]
  k_lr, k_ud, k_rot, k_scale, k_bright, k_contrast = jax.random.split(rng, 6)
  sign_lr = jnp.where(jax.random.bernoulli(k_lr, cfg.flip_lr, (b,)), -1.0, 1.0)
  sign_ud = jnp.where(jax.random.bernoulli(k_ud, cfg.flip_ud, (b,)), -1.0, 1.0)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (b,), minval=-cfg.rotate_deg,
                                         maxval=cfg.rotate_deg))
  scale = jax.random.uniform(k_scale, (b,), minval=cfg.scale_min, maxval=cfg.scale_max)
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  # Output -> input map: undo the zoom and rotation, then the flips.
  matrices = jnp.stack([jnp.stack([sign_ud * cos, -sign_ud * sin], -1),
                        jnp.stack([sign_lr * sin, sign_lr * cos], -1)], -2)
  images, masks = warp(images, masks, matrices)
  offset = jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-cfg.brightness,
                              maxval=cfg.brightness)
  gain = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=1 - cfg.contrast,
                            maxval=1 + cfg.contrast)
  return jnp.clip(images * gain + offset, 0.0, 1.0), masks
