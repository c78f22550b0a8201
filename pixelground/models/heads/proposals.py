"""Class-agnostic CenterNet-style proposal head for dense captioning (SPEC 1.9, first version).

On the fused image map (B, g, g, C) (stride P = S / g model-input pixels per cell):
  * a small conv tower (3×3 convs, GELU) → a centre heatmap logit per cell and a box per cell as
    distances [left, top, right, bottom] from the cell centre, in units of S (softplus ≥ 0);
  * training targets from GT boxes (normalised xyxy of the S×S input): a Gaussian bump per box at its
    centre cell (σ = box size / 6 in cells, peak exactly 1 at the centre cell, max over boxes), and the
    box regression read at each GT centre cell; losses: penalty-reduced focal on the heatmap
    (CenterNet) + GIoU on the boxes decoded at the GT centres;
  * inference: 3×3 max-pool peak finding (the NMS of CenterNet), top-k peaks → boxes (B, k, 4)
    normalised xyxy, scores (B, k) sigmoid.
The design is ours (the reference uses CenterNet2 with an RoI stage); proposals are then captioned by
prompting the extractor with each box ("an object of").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.models.layers import make_param, normal, zeros


class ProposalHead(nnx.Module):
  """Conv tower + heatmap / ltrb heads. Params: conv{i} (3, 3, Cin, W) + bias, heat (W,), box (W, 4)."""

  def __init__(self, in_dim: int, width: int = 256, depth: int = 2, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    dims = [in_dim] + [width] * depth
    self.convs = nnx.List([make_param(rngs, normal((9 * a) ** -0.5), (3, 3, a, b),
                                      (None, None, "embed", "mlp"), param_dtype)
                           for a, b in zip(dims[:-1], dims[1:])])
    self.conv_biases = nnx.List([make_param(rngs, zeros, (b,), ("mlp",), param_dtype) for b in dims[1:]])
    self.heat = make_param(rngs, normal(width ** -0.5), (width, 1), ("mlp", None), param_dtype)
    # Start with a low centre probability everywhere (CenterNet's prior bias −2.19 ≈ σ⁻¹(0.1)).
    self.heat_bias = make_param(rngs, lambda k, s, d: jnp.full(s, -2.19, d), (1,), (None,), param_dtype)
    self.box = make_param(rngs, normal(0.01), (width, 4), ("mlp", None), param_dtype)
    self.box_bias = make_param(rngs, lambda k, s, d: jnp.full(s, -2.0, d), (4,), (None,), param_dtype)

  def __call__(self, fused: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fused (B, g, g, C) → heat logits (B, g, g), ltrb (B, g, g, 4) in units of the input size S."""
    x = fused.astype(self.dtype)
    for w, b in zip(self.convs, self.conv_biases):
      x = jax.lax.conv_general_dilated(x, w[...].astype(self.dtype), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       preferred_element_type=jnp.float32)
      x = jax.nn.gelu(x + b[...].astype(jnp.float32), approximate=False).astype(self.dtype)
    heat = jnp.einsum("bhwc,co->bhwo", x, self.heat[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)[..., 0] + self.heat_bias[0]
    ltrb = jax.nn.softplus(jnp.einsum("bhwc,co->bhwo", x, self.box[...].astype(self.dtype),
                                      preferred_element_type=jnp.float32) + self.box_bias[...])
    return heat, ltrb


def cell_centres(g: int) -> jax.Array:
  """(g, g, 2) [x, y] centre of every cell, normalised to the input (0..1)."""
  c = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g
  return jnp.stack(jnp.meshgrid(c, c, indexing="xy"), axis=-1)


def decode_boxes(ltrb: jax.Array) -> jax.Array:
  """(B, g, g, 4) ltrb distances → (B, g, g, 4) normalised xyxy boxes around each cell centre."""
  ctr = cell_centres(ltrb.shape[1])[None]
  return jnp.concatenate([ctr - ltrb[..., :2], ctr + ltrb[..., 2:]], axis=-1)


def targets(boxes: jax.Array, valid: jax.Array, g: int) -> tuple[jax.Array, jax.Array]:
  """GT boxes (B, R, 4) normalised xyxy, valid (B, R) → heatmap (B, g, g) in [0, 1] (1 at centre
  cells) and each box's centre cell index (B, R) (row · g + col)."""
  ctr = (boxes[..., :2] + boxes[..., 2:]) / 2.0                      # (B, R, 2) normalised
  cell = jnp.clip(jnp.floor(ctr * g).astype(jnp.int32), 0, g - 1)    # (B, R, 2) [col, row]
  size = jnp.maximum((boxes[..., 2:] - boxes[..., :2]) * g, 1e-3)    # in cells
  sigma = jnp.maximum(size / 6.0, 0.5)
  grid = jnp.arange(g, dtype=jnp.float32)
  dx = grid[None, None, :] - cell[..., 0:1].astype(jnp.float32)      # (B, R, g)
  dy = grid[None, None, :] - cell[..., 1:2].astype(jnp.float32)
  gx = jnp.exp(-dx ** 2 / (2 * sigma[..., 0:1] ** 2))
  gy = jnp.exp(-dy ** 2 / (2 * sigma[..., 1:2] ** 2))
  bumps = gy[..., :, None] * gx[..., None, :] * valid[..., None, None]  # (B, R, g, g)
  heat = jnp.max(bumps, axis=1) if boxes.shape[1] else jnp.zeros(boxes.shape[:1] + (g, g))
  return heat, cell[..., 1] * g + cell[..., 0]


def losses(heat: jax.Array, ltrb: jax.Array, boxes: jax.Array, valid: jax.Array
           ) -> dict[str, jax.Array]:
  """Proposal losses: {"proposal_heatmap": focal, "proposal_giou": 1 − GIoU at the GT centres}."""
  from pixelground.training import losses as L

  b, g = heat.shape[0], heat.shape[1]
  gt_heat, idx = targets(boxes, valid, g)
  pred = decode_boxes(ltrb).reshape(b, g * g, 4)
  at_centres = jnp.take_along_axis(pred, idx[..., None], axis=1)       # (B, R, 4)
  return {"proposal_heatmap": L.heatmap_focal_loss(heat, gt_heat),
          "proposal_giou": L.giou_loss(at_centres, boxes, valid)}


def top_proposals(heat: jax.Array, ltrb: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Peaks of the heatmap (3×3 local maxima) → (boxes (B, k, 4) normalised xyxy clipped to [0, 1],
  scores (B, k) in (0, 1), best first)."""
  b, g = heat.shape[0], heat.shape[1]
  prob = jax.nn.sigmoid(heat)
  pooled = jax.lax.reduce_window(prob, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
  peaks = jnp.where(prob >= pooled, prob, 0.0).reshape(b, g * g)
  scores, idx = jax.lax.top_k(peaks, min(k, g * g))
  boxes = jnp.take_along_axis(decode_boxes(ltrb).reshape(b, g * g, 4), idx[..., None], axis=1)
  return jnp.clip(boxes, 0.0, 1.0), scores
