"""PixelLLM's prompt feature extractor (SPEC 1.5): learned queries + prompt tokens through a two-way
transformer over the fused image map → the visual tokens T5 reads."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.models import sam_decoder as dec_lib
from pixelground.models.layers import LayerNorm, Projection, make_param, normal, zeros

if tp.TYPE_CHECKING:
  from pixelground.models.pixelllm import PixelLLMConfig


def cell_centres(k: int) -> np.ndarray:
  """(k², 2) float32 (x, y) centres of a k×k grid over the S×S input, row-major, in [-1, 1] units."""
  c = (np.arange(k, dtype=np.float32) + 0.5) / k * 2 - 1
  return np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(k * k, 2)


class PromptExtractor(nnx.Module):
  """PixelLLM's prompt feature extractor (SPEC 1.5) → (B, num_queries, d_model) visual tokens."""

  def __init__(self, cfg: PixelLLMConfig, *, rngs: nnx.Rngs):
    w, p, q, hq, d = (cfg.extractor_width, cfg.prompt.prompt_dim, cfg.num_queries, cfg.query_hidden,
                      cfg.t5.d_model)
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.num_queries = q
    self.proj_feat = Projection((cfg.feature_dim,), (w,), ("embed",), ("extractor",), use_bias=True,
                                **common)
    self.proj_pe = Projection((p,), (w,), ("embed",), ("extractor",), use_bias=True, **common)
    self.proj_sparse = Projection((p,), (w,), ("embed",), ("extractor",), use_bias=True, **common)
    self.proj_dense = Projection((p,), (w,), ("embed",), ("extractor",), use_bias=True, **common)
    self.queries = make_param(rngs, normal(0.02), (q, w), (None, "extractor"), cfg.weight_dtype)
    self.transformer = dec_lib.TwoWayTransformer(cfg.extractor_depth, w, cfg.extractor_heads,
                                                 cfg.extractor_mlp, 2, **common)
    self.query_kernel = make_param(rngs, normal(w ** -0.5), (q, w, hq), (None, "extractor", "mlp"),
                                   cfg.weight_dtype)
    self.query_bias = make_param(rngs, zeros, (q, hq), (None, "mlp"), cfg.weight_dtype)
    self.out = Projection((hq,), (d,), ("mlp",), ("embed",), use_bias=True, **common)
    self.norm = LayerNorm(d, "embed", eps=1e-6, **common)
    self.spatial = cfg.spatial_tokens
    if self.spatial:
      self.spatial_coords = Projection((2,), (w,), (None,), ("extractor",), use_bias=False, **common)
      self.spatial_out = Projection((w,), (d,), ("extractor",), ("embed",), use_bias=True, **common)
      self.spatial_norm = LayerNorm(d, "embed", eps=1e-6, **common)
    self.dtype = cfg.compute_dtype

  def __call__(self, feats: jax.Array, pe: jax.Array, sparse: jax.Array, dense: jax.Array) -> jax.Array:
    """feats (B, g, g, C) fused map; pe (g, g, P) image PE; sparse (B, N, P) prompt tokens; dense
    (B, g, g, P) dense prompt → (B, Q, d_model), or (B, Q + k², d_model) with `spatial_tokens` = k."""
    b = feats.shape[0]
    keys = self.proj_feat(feats) + self.proj_dense(dense)
    key_pe = self.proj_pe(pe)
    queries = jnp.broadcast_to(self.queries[...].astype(self.dtype)[None], (b,) + self.queries.shape)
    tokens = jnp.concatenate([queries, self.proj_sparse(sparse)], axis=1)
    out, image = self.transformer(tokens, keys, key_pe)
    q = out[:, : self.num_queries]
    h = jnp.einsum("bqw,qwh->bqh", q, self.query_kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32) + self.query_bias[...].astype(jnp.float32)
    visual = self.norm(self.out(h.astype(self.dtype)))
    if not self.spatial:
      return visual
    g, k = feats.shape[1], self.spatial
    grid = (image.reshape(feats.shape[:3] + (-1,)) + key_pe[None]).astype(jnp.float32)
    grid = grid.reshape(b, k, g // k, k, g // k, -1).mean(axis=(2, 4)).reshape(b, k * k, -1)
    xy = cell_centres(k)
    grid = grid + self.spatial_coords(jnp.asarray(xy, self.dtype)).astype(jnp.float32)[None]
    return jnp.concatenate([visual, self.spatial_norm(self.spatial_out(grid.astype(self.dtype)))],
                           axis=1)
