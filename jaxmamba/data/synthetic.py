"""A built-in synthetic source: procedurally drawn brain-like MRI slices with tumour masks.

Each pseudo-patient is a stack of axial slices through an ellipsoidal head: a bright skull ring,
tissue with smooth texture, two dark ventricles in the middle slices, Gaussian noise, and one
irregular ellipsoidal "tumour" spanning a contiguous run of about 35% of the slices (so about 65%
of slices are tumour-free, as in kaggle_3m).  The tumour is brighter than the tissue around it
(most of all in the FLAIR-like channel) and always lies inside the brain, so it is learnable.
Everything is vectorised numpy and deterministic for a given config.
"""
from __future__ import annotations

import numpy as np

from jaxmamba.data.slices import SliceSet

TUMOUR_SHARE = 0.35   # share of each patient's slices crossed by the tumour (kaggle_3m: 1373/3929)
_CHUNK = 8            # slices drawn at once; small enough for temporaries to stay in cache

# Per-channel intensities (BGR = post-contrast, FLAIR, pre-contrast), as a loose caricature.
_TISSUE = np.array([0.42, 0.38, 0.40], np.float32)
_SKULL = np.array([0.85, 0.30, 0.80], np.float32)
_VENTRICLE = np.array([0.12, 0.08, 0.12], np.float32)
_TUMOUR_GAIN = np.array([0.22, 0.40, 0.10], np.float32)


def _patient_params(rng, num_patients: int, slices: int) -> dict[str, np.ndarray]:
  p = num_patients
  run = np.clip(np.round(TUMOUR_SHARE * slices + rng.integers(-1, 2, p)), 1, slices).astype(int)
  return {
      "centre": rng.uniform(-0.05, 0.05, (p, 2)),
      "radii": np.stack([rng.uniform(0.72, 0.82, p), rng.uniform(0.56, 0.66, p)], 1),
      "texture_phase": rng.uniform(0, 2 * np.pi, (p, 3)),
      "tumour_run": run,
      "tumour_start": np.array([rng.integers(max(0, slices // 6), max(1, slices - r - slices // 6)
                                             + 1) for r in run]),
      "tumour_angle": rng.uniform(0, 2 * np.pi, p),
      "tumour_dist": rng.uniform(0.15, 0.45, p),       # in units of the brain radius
      "tumour_radius": rng.uniform(0.14, 0.24, p),     # in units of the half image
      "tumour_lobes": rng.uniform(0, 2 * np.pi, (p, 2)),
  }


def _lobed_radius(ey, ex, base, lobes):
  """base * (1 + 0.18 sin(3t + a) + 0.10 sin(5t + b)), t = atan2(ey, ex), via polynomials.

  sin(k t) and cos(k t) are Chebyshev-type polynomials of sin t and cos t; this avoids a costly
  per-pixel arctan2.
  """
  r = np.sqrt(ey * ey + ex * ex) + np.float32(1e-6)
  s, c = ey / r, ex / r
  s2, c2 = s * s, c * c
  sin3, cos3 = s * (3 - 4 * s2), c * (4 * c2 - 3)
  sin5, cos5 = s * (16 * s2 * s2 - 20 * s2 + 5), c * (16 * c2 * c2 - 20 * c2 + 5)
  ca, sa = np.cos(lobes[:, 0])[:, None, None], np.sin(lobes[:, 0])[:, None, None]
  cb, sb = np.cos(lobes[:, 1])[:, None, None], np.sin(lobes[:, 1])[:, None, None]
  wiggle = 1 + 0.18 * (sin3 * ca + cos3 * sa) + 0.10 * (sin5 * cb + cos5 * sb)
  return r, base[:, None, None] * wiggle


def _draw(params, pidx, sidx, slices, size, rng):
  """Draws slices (patient pidx[i], slice sidx[i]); returns uint8 images (n,H,W,3), masks."""
  f32 = np.float32
  grid = ((np.arange(size, dtype=f32) + f32(0.5)) / f32(size) * 2 - 1)   # pixel centres, [-1, 1]
  col = lambda v: np.asarray(v, f32)[:, None, None]
  y, x = grid[None, :, None], grid[None, None, :]
  pos = (sidx + 0.5) / slices * 2 - 1                                 # -1..1 through the head
  shrink = np.sqrt(np.clip(1 - 0.75 * pos**2, 0.05, 1))
  cy, cx = params["centre"][pidx].T
  ry, rx = params["radii"][pidx].T * shrink
  dy, dx = y - col(cy), x - col(cx)
  radius = np.sqrt((dy / col(ry))**2 + (dx / col(rx))**2)             # 1 on the brain edge

  # Tissue classes as labels, turned into colours by one palette lookup.
  label = np.zeros(radius.shape, np.uint8)
  label[radius < 1] = 1
  label[(radius >= 1.02) & (radius < 1.12)] = 3
  ventricle_r = 2 * 0.10 * np.clip(1 - 2 * pos**2, 0, 1)
  for side in (-1, 1):
    vy, vx = dy / col(ry * 0.9), (dx - col(side * 0.22 * rx)) / col(rx * 0.5)
    label[(vy * vy + vx * vx < col(ventricle_r**2)) & (label == 1)] = 2

  # Smooth texture inside the brain; separable, so drawn from (n,H,1) and (n,1,W) factors.
  ph = params["texture_phase"][pidx]
  tex = (np.sin(5 * y + col(ph[:, 0])) * np.cos(4 * x + col(ph[:, 1]))
         + 0.5 * (np.sin(9 * x + col(ph[:, 2])) * np.cos(9 * y)
                  + np.cos(9 * x + col(ph[:, 2])) * np.sin(9 * y)))
  shade = f32(0.04 * 255) * tex * (label == 1)   # grey levels added to every channel

  # Tumour: an ellipsoid along the slice axis with a lobed outline, drawn on its slices only.
  masks = np.zeros(radius.shape, np.uint8)
  start, run = params["tumour_start"][pidx], params["tumour_run"][pidx]
  hit = np.flatnonzero((sidx >= start) & (sidx < start + run))
  if hit.size:
    along = (sidx[hit] + 0.5 - start[hit]) / run[hit] * 2 - 1
    base = params["tumour_radius"][pidx[hit]] * (0.45 + 0.55 * np.sqrt(1 - along**2))
    angle, dist = params["tumour_angle"][pidx[hit]], params["tumour_dist"][pidx[hit]]
    ty = cy[hit] + dist * ry[hit] * np.sin(angle)
    tx = cx[hit] + dist * rx[hit] * np.cos(angle)
    r, outline = _lobed_radius(y - col(ty), x - col(tx), base.astype(f32),
                               params["tumour_lobes"][pidx[hit]].astype(f32))
    tumour = (r < outline) & (radius[hit] < 1)
    masks[hit] = tumour
    label[(label == 2) & (masks == 1)] = 1   # the tumour displaces the ventricle

  # Channel by channel: palette lookup + texture + tumour gain + uniform noise of sd ~4.6 grey
  # levels (a random byte >> 4, in -8..7).
  image = np.empty(radius.shape + (3,), np.uint8)
  plane = np.empty(radius.shape, f32)
  for c in range(3):
    palette = np.array([0.0, _TISSUE[c], _VENTRICLE[c], _SKULL[c]], f32) * 255 + f32(0.5)
    np.take(palette, label, out=plane)
    plane += shade
    plane += masks * f32(_TUMOUR_GAIN[c] * 255)
    plane += np.frombuffer(rng.bytes(plane.size), np.int8).reshape(plane.shape) >> 4
    np.clip(plane, 0, 255, out=plane)
    image[..., c] = plane
  return image, masks


def generate(num_patients: int = 12, slices_per_patient: int = 16, image_size: int = 256,
             seed: int = 0) -> SliceSet:
  """All synthetic slices in (patient, slice) order; patients are named SYN_000, SYN_001, ...

  Images are uint8 BGR like the real loader's, masks uint8 {0, 1}; slice names follow kaggle_3m
  ("SYN_000_1" .. "SYN_000_16") so the same split code runs.
  """
  for name, value, low in (("num_patients", num_patients, 1),
                           ("slices_per_patient", slices_per_patient, 1),
                           ("image_size", image_size, 8)):
    if int(value) != value or value < low:
      raise ValueError(f"synthetic.{name} must be an integer >= {low}, got {value!r}")
  num_patients, slices, size = int(num_patients), int(slices_per_patient), int(image_size)
  rng = np.random.default_rng(seed)
  params = _patient_params(rng, num_patients, slices)
  total = num_patients * slices
  pidx_all, sidx_all = np.divmod(np.arange(total), slices)
  images = np.empty((total, size, size, 3), np.uint8)
  masks = np.empty((total, size, size), np.uint8)
  for lo in range(0, total, _CHUNK):
    hi = min(total, lo + _CHUNK)
    images[lo:hi], masks[lo:hi] = _draw(params, pidx_all[lo:hi], sidx_all[lo:hi], slices, size,
                                        rng)
  patients = np.array([f"SYN_{p:03d}" for p in pidx_all])
  names = [f"SYN_{p:03d}_{s + 1}" for p, s in zip(pidx_all, sidx_all)]
  return SliceSet(images, masks, patients, names)


def from_config(cfg) -> SliceSet:
  """generate() from a `data.synthetic` ConfigDict."""
  return generate(cfg.num_patients, cfg.slices_per_patient, cfg.image_size, cfg.seed)
