"""Training losses for every pixelground head, in pure JAX (SPEC sections 1.7-1.10 and 2).

Conventions shared by every function here:

* Static shapes only: padding and absent entries are described by boolean masks (`mask`, `valid`,
  `ignore`), never removed by boolean indexing, so every loss is `jax.jit`-able and vmap-able.
* All arithmetic is float32, whatever the input dtype (bfloat16 logits are upcast first); every
  returned value is float32.
* "Mean over valid X" means sum over the valid entries divided by their count; when nothing is valid
  the loss is exactly 0 (not NaN) and so are its gradients.
* Masks: `logits` / `targets` of shape (..., H, W) hold one mask per leading index; `valid` has the
  leading shape (...) and says which masks exist; `ignore` (..., H, W) marks pixels that are never
  scored (e.g. the padding added around a resized image). Targets are probabilities in [0, 1]
  (normally 0 or 1).

Loss weights (PixelLLM: points x 0.1, focal x 20 + dice + IoU MSE; LISA: CE + 2 BCE + 0.5 dice) are
applied by the trainer, not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _safe_mean(values: Array, selected: Array) -> Array:
  """Mean of `values` over the entries where `selected` (bool or 0/1) is set; 0 when none is.

  Unselected entries are replaced by 0 before summing, so a NaN or inf there cannot leak into the
  result or its gradient.
  """
  selected = jnp.broadcast_to(jnp.asarray(selected), values.shape).astype(jnp.bool_)
  total = jnp.sum(selected.astype(jnp.float32))
  return jnp.sum(jnp.where(selected, values, 0.0)) / jnp.maximum(total, 1.0)


def _mask_setup(logits, targets, valid, ignore):
  """Upcasts mask inputs and returns (logits, targets, pixel keep weights, valid (...) float32)."""
  logits = _f32(logits)
  targets = _f32(targets)
  if logits.shape != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must have the same shape")
  if logits.ndim < 2:
    raise ValueError(f"mask logits need shape (..., H, W), got {logits.shape}")
  lead = logits.shape[:-2]
  if valid is None:
    valid = jnp.ones(lead, jnp.bool_)
  valid = jnp.asarray(valid)
  if valid.shape != lead:
    raise ValueError(f"valid {valid.shape} must be the leading shape {lead} of the masks")
  if ignore is None:
    keep = jnp.ones(logits.shape, jnp.float32)
  else:
    ignore = jnp.asarray(ignore)
    if ignore.shape != logits.shape:
      raise ValueError(f"ignore {ignore.shape} must match the masks {logits.shape}")
    keep = _f32(~ignore.astype(jnp.bool_))
  return logits, targets, keep, _f32(valid)


def _per_mask_pixel_mean(per_pixel: Array, keep: Array, valid: Array) -> Array:
  """Mean over kept pixels per mask, then mean over valid masks that have at least one kept pixel."""
  n_pix = jnp.sum(keep, axis=(-2, -1))
  per_mask = jnp.sum(jnp.where(keep > 0, per_pixel, 0.0), axis=(-2, -1)) / jnp.maximum(n_pix, 1.0)
  return _safe_mean(per_mask, valid * (n_pix > 0))


# ----------------------------------------------------------------------------------------------- text


def text_cross_entropy(logits, targets, mask, *, label_smoothing: float = 0.1) -> tuple[Array, Array]:
  """Softmax cross-entropy with label smoothing spread over the other V−1 classes (SPEC section 2).

  The target distribution puts 1 − ε on the target id and ε / (V − 1) on every other id (this is not
  PyTorch's convention, which gives ε / V to all V ids including the target; the two agree at ε = 0).
  The value is the plain cross-entropy −Σ_j q_j log p_j against that distribution, so its minimum is
  the entropy of q (> 0 for ε > 0), not 0. With ε > 0 every logit enters the loss, so logits must be
  finite (mask a padded vocabulary with a large negative number, not −inf).

  Args:
    logits: (B, T, V) unnormalised scores, any float dtype (computed in float32).
    targets: (B, T) int target ids in [0, V); ids at masked positions may be anything (e.g. -1).
    mask: (B, T) bool, True for real (non-pad) target tokens.
    label_smoothing: ε in [0, 1).

  Returns:
    loss: () float32, nats per token: mean over all non-masked tokens of the batch (token-weighted);
      0 when no token is valid.
    per_example: (B,) float32, mean over each example's own non-masked tokens (0 for an example with
      none), e.g. to average a loss over the examples of one task.
  """
  logits = _f32(logits)
  vocab = logits.shape[-1]
  mask = _f32(mask)
  ids = jnp.clip(jnp.asarray(targets).astype(jnp.int32), 0, vocab - 1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  logp_target = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0] - lse
  nll = -logp_target
  if label_smoothing:
    if vocab < 2:
      raise ValueError("label smoothing over the other classes needs V >= 2")
    eps = float(label_smoothing)
    off = eps / (vocab - 1)
    sum_logp = jnp.sum(logits, axis=-1) - vocab * lse  # Σ_j log p_j over all V classes
    # −[(1 − ε) log p_t + ε/(V−1) Σ_{j≠t} log p_j] = −[(1 − ε − off) log p_t + off Σ_j log p_j]
    nll = -((1.0 - eps - off) * logp_target + off * sum_logp)
  per_token = jnp.where(mask > 0, nll, 0.0)
  count = jnp.sum(mask, axis=-1)
  per_example = jnp.sum(per_token, axis=-1) / jnp.maximum(count, 1.0)
  loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(count), 1.0)
  return loss, per_example


def token_accuracy(logits, targets, mask) -> Array:
  """Fraction of non-masked tokens whose argmax logit is the target id.

  Args:
    logits: (B, T, V); targets: (B, T) int; mask: (B, T) bool.

  Returns:
    () float32 in [0, 1], mean over non-masked tokens of the batch; 0 when none is valid.
  """
  pred = jnp.argmax(_f32(logits), axis=-1)
  hit = _f32(pred == jnp.asarray(targets).astype(pred.dtype))
  return _safe_mean(hit, mask)


# ---------------------------------------------------------------------------------------- locations


def point_l1(pred, target, valid) -> Array:
  """L1 loss of the per-token location head on absolute pixel coordinates (SPEC section 1.7).

  Per token, the absolute errors of its 4 coordinates (2 points × (x, y)) are summed; the loss is the
  mean of that sum over the scored tokens. A token is scored when `valid` is True and its target is
  not all zeros (the LN convention for "no trace segment aligned to this word").

  Args:
    pred: (B, T, 2, 2) or (B, T, 4) predicted corners in pixels of the unpadded model input (any leading
      shape matching `valid` works; trailing dims are flattened to 4 coordinates).
    target: the same shape, in the same pixel units.
    valid: (B, T) bool.

  Returns:
    () float32, pixels per token (sum over 4 coordinates, mean over scored tokens); 0 when none.
  """
  valid = jnp.asarray(valid)
  pred = _f32(pred).reshape(valid.shape + (-1,))
  target = _f32(target).reshape(valid.shape + (-1,))
  scored = valid.astype(jnp.bool_) & jnp.any(target != 0, axis=-1)
  per_token = jnp.sum(jnp.abs(pred - target), axis=-1)
  return _safe_mean(per_token, scored)


def attention_grounding(probs, boxes, valid) -> Array:
  """−log(attention mass inside the target box), the demo's auxiliary grounding loss.

  Args:
    probs: (B, T, k²) float attention probabilities of each decoder position over a k×k grid of image
      tokens (row-major, covering the S×S model input); they need not sum to 1 (the rest of the
      attention goes to other tokens, and counts as outside).
    boxes: (B, T, 4) target boxes, normalised xyxy of the S×S input.
    valid: (B, T) bool; tokens whose box is all zeros are not scored (as in `point_l1`).

  Returns:
    () float32, mean over scored tokens of −log Σ_{cells inside} p (eps 1e-6); 0 when none. A cell is
    inside when its centre is; a box too small to hold any centre gets the cell holding its centre.
  """
  probs = _f32(probs)
  boxes = _f32(boxes)
  k = int(round(probs.shape[-1] ** 0.5))
  c = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
  cy, cx = jnp.meshgrid(c, c, indexing="ij")
  cx, cy = cx.reshape(-1), cy.reshape(-1)  # (k²,)
  x0, y0, x1, y1 = (boxes[..., i:i + 1] for i in range(4))
  inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)  # (B, T, k²)
  mx, my = (x0 + x1) / 2, (y0 + y1) / 2
  centre = (jnp.floor(jnp.clip(my, 0, 1 - 1e-6) * k) * k + jnp.floor(jnp.clip(mx, 0, 1 - 1e-6) * k))
  fallback = jnp.arange(k * k, dtype=jnp.float32) == centre
  inside = jnp.where(jnp.any(inside, axis=-1, keepdims=True), inside, fallback)
  mass = jnp.sum(jnp.where(inside, probs, 0.0), axis=-1)
  scored = jnp.asarray(valid).astype(jnp.bool_) & jnp.any(boxes != 0, axis=-1)
  return _safe_mean(-jnp.log(mass + 1e-6), scored)


# -------------------------------------------------------------------------------------------- masks


def sigmoid_focal_loss(logits, targets, valid, *, alpha: float = 0.25, gamma: float = 2.0,
                       ignore=None) -> Array:
  """Binary focal loss on mask logits (PixelLLM's referring-segmentation loss, weight 20).

  Per pixel: FL = α_t (1 − p_t)^γ · BCE(logit, t), with p = σ(logit), p_t = p·t + (1 − p)(1 − t) and
  α_t = α·t + (1 − α)(1 − t) (no α weighting when α < 0). Reduction as in SAM's training recipe:
  mean over the non-ignored pixels of each mask, then mean over valid masks (masks with no scored pixel
  are skipped).

  Args:
    logits: (..., H, W) mask logits; targets: (..., H, W) in [0, 1]; valid: (...) bool or None (all);
    alpha, gamma: focal parameters; ignore: (..., H, W) bool or None, True = pixel not scored.

  Returns:
    () float32 (nats per pixel, averaged over masks); 0 when no mask is valid.
  """
  logits, targets, keep, valid = _mask_setup(logits, targets, valid, ignore)
  prob = jax.nn.sigmoid(logits)
  bce = _bce_with_logits(logits, targets)
  p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
  loss = bce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return _per_mask_pixel_mean(loss, keep, valid)


def dice_loss(logits, targets, valid, *, ignore=None, eps: float = 1.0) -> Array:
  """Soft dice loss on sigmoid probabilities (PixelLLM weight 1, LISA weight 0.5).

  Per mask: 1 − (2 Σ p·t + eps) / (Σ p + Σ t + eps), sums over the non-ignored pixels, p = σ(logits);
  then mean over valid masks.

  Args:
    logits: (..., H, W); targets: (..., H, W) in [0, 1]; valid: (...) bool or None (all);
    ignore: (..., H, W) bool or None; eps: smoothing added to numerator and denominator (pixels).

  Returns:
    () float32 in [0, 1), mean over valid masks; 0 when no mask is valid.
  """
  logits, targets, keep, valid = _mask_setup(logits, targets, valid, ignore)
  prob = jax.nn.sigmoid(logits) * keep
  targets = targets * keep
  inter = jnp.sum(prob * targets, axis=(-2, -1))
  denom = jnp.sum(prob, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
  per_mask = 1.0 - (2.0 * inter + eps) / (denom + eps)
  return _safe_mean(per_mask, valid)


def mask_bce(logits, targets, valid, *, ignore=None) -> Array:
  """Per-pixel binary cross-entropy on mask logits (LISA weight 2, GELLA entity masks).

  Mean BCE over the non-ignored pixels of each mask, then mean over valid masks (masks with no scored
  pixel are skipped).

  Args:
    logits: (..., H, W); targets: (..., H, W) in [0, 1]; valid: (...) bool or None (all);
    ignore: (..., H, W) bool or None.

  Returns:
    () float32, nats per pixel averaged over masks; 0 when no mask is valid.
  """
  logits, targets, keep, valid = _mask_setup(logits, targets, valid, ignore)
  return _per_mask_pixel_mean(_bce_with_logits(logits, targets), keep, valid)


def mask_iou(logits, targets, *, ignore=None) -> Array:
  """IoU of the binarised prediction (logits > 0) with the binarised target (targets > 0.5).

  Args:
    logits, targets: (..., H, W); ignore: (..., H, W) bool or None.

  Returns:
    (...) float32 in [0, 1]; 1 where both prediction and target are empty. No gradient.
  """
  logits, targets, keep, _ = _mask_setup(logits, targets, None, ignore)
  pred = _f32(logits > 0) * keep
  gt = _f32(targets > 0.5) * keep
  inter = jnp.sum(pred * gt, axis=(-2, -1))
  union = jnp.sum(jnp.maximum(pred, gt), axis=(-2, -1))
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
  return jax.lax.stop_gradient(iou)


def iou_mse(pred_iou, logits, targets, valid, *, ignore=None) -> Array:
  """MSE between SAM's predicted IoU and the actual IoU of its mask (PixelLLM, weight 1).

  The actual IoU is `mask_iou(logits, targets)` (prediction binarised at logit 0, target at 0.5; 1 when
  both are empty) and is a constant: the gradient reaches only `pred_iou`.

  Args:
    pred_iou: (...) predicted IoU per mask; logits, targets: (..., H, W); valid: (...) bool or None;
    ignore: (..., H, W) bool or None.

  Returns:
    () float32, mean squared error over valid masks; 0 when no mask is valid.
  """
  logits, targets, keep, valid = _mask_setup(logits, targets, valid, ignore)
  pred_iou = _f32(pred_iou)
  if pred_iou.shape != valid.shape:
    raise ValueError(f"pred_iou {pred_iou.shape} must have the masks' leading shape {valid.shape}")
  actual = mask_iou(logits, targets, ignore=ignore)
  return _safe_mean((pred_iou - actual) ** 2, valid)


def _bce_with_logits(logits: Array, targets: Array) -> Array:
  """Elementwise −[t log σ(x) + (1 − t) log(1 − σ(x))], stable for any x."""
  return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


# ---------------------------------------------------------------------------------- dense proposals


def heatmap_focal_loss(pred_logits, gt_heatmap, *, alpha: float = 2.0, beta: float = 4.0,
                       ignore=None) -> Array:
  """CenterNet's penalty-reduced pixel focal loss for the class-agnostic proposal heatmap.

  With p = σ(logit) and y the Gaussian-splatted ground truth (y == 1 exactly at object centres):
    positives (y == 1): −(1 − p)^α log p
    others:             −(1 − y)^β p^α log(1 − p)
  summed over all pixels of the batch and divided by the number of positives (at least 1).
  log p and log(1 − p) come from log-sigmoid, so no probability clamp is needed.

  Args:
    pred_logits: (B, H, W) logits (any leading shape); gt_heatmap: same shape, values in [0, 1];
    alpha, beta: focal exponents; ignore: same shape bool or None, True = pixel not scored (padding).

  Returns:
    () float32, loss summed over the batch's pixels divided by max(number of positives, 1).
  """
  logits = _f32(pred_logits)
  gt = _f32(gt_heatmap)
  if logits.shape != gt.shape:
    raise ValueError(f"pred_logits {logits.shape} and gt_heatmap {gt.shape} must match")
  keep = jnp.ones_like(gt) if ignore is None else _f32(~jnp.asarray(ignore).astype(jnp.bool_))
  pos = _f32(gt >= 1.0) * keep
  neg = (1.0 - _f32(gt >= 1.0)) * keep
  prob = jax.nn.sigmoid(logits)
  pos_loss = -((1.0 - prob) ** alpha) * jax.nn.log_sigmoid(logits)
  neg_loss = -((1.0 - gt) ** beta) * prob ** alpha * jax.nn.log_sigmoid(-logits)
  total = jnp.sum(jnp.where(pos > 0, pos_loss, 0.0)) + jnp.sum(jnp.where(neg > 0, neg_loss, 0.0))
  return total / jnp.maximum(jnp.sum(pos), 1.0)


def giou_loss(pred_boxes, target, valid, *, eps: float = 1e-7) -> Array:
  """1 − generalised IoU between boxes, for the proposal head's box regression.

  Widths and heights are clipped at 0 when computing areas (a box with x2 < x1 is empty). Invalid
  entries are replaced by a unit box before any division, so they give exactly zero gradients.

  Args:
    pred_boxes: (..., 4) float (x1, y1, x2, y2), any consistent units (pixels);
    target: (..., 4) the same; valid: (...) bool or None (all).
    eps: added to the union and enclosing areas (units²).

  Returns:
    () float32 in [0, 2], mean over valid boxes; 0 when none is valid.
  """
  pred = _f32(pred_boxes)
  tgt = _f32(target)
  if pred.shape != tgt.shape or pred.shape[-1] != 4:
    raise ValueError(f"boxes need matching (..., 4) shapes, got {pred.shape} and {tgt.shape}")
  lead = pred.shape[:-1]
  valid = jnp.ones(lead, jnp.bool_) if valid is None else jnp.asarray(valid).astype(jnp.bool_)
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  pred = jnp.where(valid[..., None], pred, unit)
  tgt = jnp.where(valid[..., None], tgt, unit)

  def area(b):
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)

  lo = jnp.maximum(pred[..., :2], tgt[..., :2])
  hi = jnp.minimum(pred[..., 2:], tgt[..., 2:])
  inter = jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)
  union = area(pred) + area(tgt) - inter
  iou = inter / (union + eps)
  enc_lo = jnp.minimum(pred[..., :2], tgt[..., :2])
  enc_hi = jnp.maximum(pred[..., 2:], tgt[..., 2:])
  enclosing = jnp.prod(jnp.maximum(enc_hi - enc_lo, 0.0), axis=-1)
  giou = iou - (enclosing - union) / (enclosing + eps)
  return _safe_mean(1.0 - giou, valid)


# ------------------------------------------------------------------------------------- association


def association_bce(noun_emb, entity_emb, gt, noun_valid, entity_valid) -> Array:
  """GELLA's noun ↔ entity association loss: BCE(FC(Evl) · FC(Evc)ᵀ, GA) (SPEC section 1.10).

  The logit of pair (k, e) is the dot product noun_emb[b, k] · entity_emb[b, e] (the FC projections
  are applied by the model before this call). One noun may own several entities.

  Args:
    noun_emb: (B, K, D) projected `[SEG]` embeddings, one per noun slot.
    entity_emb: (B, E, D) projected entity embeddings.
    gt: (B, K, E) bool, True where noun k owns entity e.
    noun_valid: (B, K) bool; entity_valid: (B, E) bool.

  Returns:
    () float32, nats per pair: mean BCE over pairs with a valid noun and a valid entity; 0 when none.
  """
  logits = jnp.einsum("bkd,bed->bke", _f32(noun_emb), _f32(entity_emb),
                      precision=jax.lax.Precision.HIGHEST)
  pairs = (jnp.asarray(noun_valid).astype(jnp.bool_)[:, :, None]
           & jnp.asarray(entity_valid).astype(jnp.bool_)[:, None, :])
  return _safe_mean(_bce_with_logits(logits, _f32(gt)), pairs)
