"""LISA's `[SEG]` projection (SPEC 1.8): decoder state → one SAM sparse prompt token."""

from __future__ import annotations

import jax
from flax import nnx

from pixelground.models.layers import Projection


class SegProjection(nnx.Module):
  """LISA: Linear(d→d) → ReLU → Linear(d→P) from `[SEG]`-predicting decoder states to a SAM prompt."""

  def __init__(self, d_model: int, prompt_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Projection((d_model,), (d_model,), ("embed",), ("mlp",), use_bias=True, **common)
    self.fc2 = Projection((d_model,), (prompt_dim,), ("mlp",), ("embed",), use_bias=True, **common)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(h)))
