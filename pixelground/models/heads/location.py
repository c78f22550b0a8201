"""PixelLLM's per-token location head (SPEC 1.7), with the optional pointer over grid tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.models.extractor import cell_centres
from pixelground.models.layers import LayerNorm, Projection


class LocationHead(nnx.Module):
  """SPEC 1.7: LN + MLP (GELU) on decoder states → raw (…, 4) = 2 points (x, y) in [-1, 1] units.

  With `pointer` (the demo's `pointer_head`): a single-head attention from each LN'd state to the k×k
  grid tokens (query/key width `hidden`); the attended tokens (projected d → d) are added to the MLP's
  input, and the attention-weighted cell centre c is returned so that the caller places the 2 points at
  c + MLP output (offsets). `window` r > 0: called with `local`, c and the read use the attention
  within the (2r + 1)² cells around its argmax only (renormalised)."""

  def __init__(self, d_model: int, hidden: int, num_layers: int, *, pointer: bool = False,
               window: int = 0, dtype, param_dtype, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(d_model, "embed", eps=1e-6, **common)
    dims = [d_model] + [hidden] * (num_layers - 1) + [4]
    self.layers = nnx.List([Projection((a,), (c,), ("embed" if i == 0 else "mlp",),
                                       ("mlp" if i < num_layers - 1 else None,), use_bias=True, **common)
                            for i, (a, c) in enumerate(zip(dims[:-1], dims[1:]))])
    self.pointer, self.window = pointer, window
    if pointer:
      self.grid_norm = LayerNorm(d_model, "embed", eps=1e-6, **common)
      self.query = Projection((d_model,), (hidden,), ("embed",), ("mlp",), use_bias=False, **common)
      self.key = Projection((d_model,), (hidden,), ("embed",), ("mlp",), use_bias=False, **common)
      self.value = Projection((d_model,), (d_model,), ("embed",), ("mlp",), use_bias=False, **common)
    self.dtype = dtype

  def __call__(self, hidden: jax.Array, grid: jax.Array | None = None, *, local: bool = False
               ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """hidden (B, T, d); grid (B, k², d) tokens (pointer only) → (raw (B, T, 4) float32, attention
    (B, T, k²) float32 (always the full one) and centre (B, T, 2) in [-1, 1] units — both None without
    the pointer). `local`: apply `window`."""
    x = self.norm(hidden)
    probs = centre = None
    if self.pointer:
      g = self.grid_norm(grid)
      q, k = self.query(x), self.key(g)
      logits = jnp.einsum("btd,bnd->btn", q, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
      k = int(round(grid.shape[1] ** 0.5))
      use = local_window(probs, k, self.window) if self.window and local else probs
      centre = jnp.einsum("btn,nc->btc", use, jnp.asarray(cell_centres(k), jnp.float32))
      read = jnp.einsum("btn,bnd->btd", use.astype(self.dtype), g, preferred_element_type=jnp.float32)
      x = x + self.value(read.astype(self.dtype))
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)
    return x.astype(jnp.float32), probs, centre


def local_window(probs: jax.Array, k: int, r: int) -> jax.Array:
  """probs (..., k²) over a row-major k×k grid → the same restricted to the (2r + 1)² cells around
  each argmax (clipped at the border) and renormalised to sum 1."""
  am = jnp.argmax(probs, axis=-1)[..., None]
  cells = jnp.arange(k * k)
  inside = (jnp.abs(cells // k - am // k) <= r) & (jnp.abs(cells % k - am % k) <= r)
  local = jnp.where(inside, probs, 0.0)
  return local / jnp.sum(local, axis=-1, keepdims=True)
