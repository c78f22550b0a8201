"""PyTorch-exact 1-D/2-D resizing as small interpolation matrices (numpy, built at trace time).

Position embeddings and rel-pos tables must be resized exactly like the PyTorch code that trained them,
or imported checkpoints drift. `jax.image.resize` does not match: its cubic kernel uses a = -0.5 and it
always antialiases when shrinking, while torch's plain bicubic uses a = -0.75 with clamped borders and
its `antialias=True` path (used by timm) uses a = -0.5 with a kernel widened by the shrink factor and
weights renormalised at the borders. Each rule here is an (n_out, n_in) matrix; a 2-D resize is two
matrix products (shapes are static, so the matrices are constants in the compiled program).

All functions take `align_corners=False` semantics (pixel centres at i + 0.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch `F.interpolate(mode="linear", align_corners=False)`."""
  m = np.zeros((n_out, n_in), np.float64)
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)  # torch clamps at 0
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel with parameter `a`, support [-2, 2]."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) weights of torch `F.interpolate(mode="bicubic", align_corners=False)` on one axis.

  Keys cubic convolution with a = -0.75, taps at floor(src)-1 .. floor(src)+2 with indices clamped to
  the border (torch's bounded access), no antialiasing.
  """
  m = np.zeros((n_out, n_in), np.float64)
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # no clamp at 0 for cubic
  base = np.floor(src).astype(np.int64)
  t = src - base
  for k in range(4):
    np.add.at(m, (np.arange(n_out), np.clip(base - 1 + k, 0, n_in - 1)), _cubic(t + 1 - k, a))
  return m


def bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`.

  The PIL-style separable filter: cubic kernel a = -0.5 stretched by max(scale, 1) (scale = n_in/n_out),
  taps inside the input only (no border clamping), weights divided by their sum.
  """
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) / stretch, -0.5)
    total = w.sum()
    m[i, lo:hi] = w / total if total != 0 else w
  return m


def resize_bicubic(x: jax.Array, size: tuple[int, int], *, antialias: bool = False) -> jax.Array:
  """Resizes NHWC `x` (B, h, w, C) to (B, size[0], size[1], C) like torch bicubic, align_corners=False.

  `antialias=True` follows torch's `antialias=True` (timm's position-embedding resampling); the default
  follows plain `F.interpolate(mode="bicubic")` (SAM, PixelLLM's feature fusion). Computed in float32,
  returned in `x.dtype`.
  """
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  build = bicubic_aa_matrix if antialias else bicubic_matrix
  mh = jnp.asarray(build(h, size[0]), jnp.float32)
  mw = jnp.asarray(build(w, size[1]), jnp.float32)
  y = jnp.einsum("Yy,Xx,byxc->bYXc", mh, mw, x.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
