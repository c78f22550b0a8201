"""pixelground.training.losses against independent references (NumPy float64 and PyTorch written here), hand-
computed tiny cases, masking / validity / ignore semantics, jit, gradients and bfloat16 inputs."""

import functools
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pixelground.training import losses  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 vs float64 references
BF16_TOL = dict(rtol=2e-2, atol=2e-2)

# Jitted once per shape: eager op-by-op dispatch would compile every primitive separately (slow on CPU).
L = types.SimpleNamespace(
    text_cross_entropy=jax.jit(losses.text_cross_entropy, static_argnames="label_smoothing"),
    token_accuracy=jax.jit(losses.token_accuracy),
    point_l1=jax.jit(losses.point_l1),
    attention_grounding=jax.jit(losses.attention_grounding),
    sigmoid_focal_loss=jax.jit(losses.sigmoid_focal_loss, static_argnames=("alpha", "gamma")),
    dice_loss=jax.jit(losses.dice_loss, static_argnames="eps"),
    mask_bce=jax.jit(losses.mask_bce),
    mask_iou=jax.jit(losses.mask_iou),
    iou_mse=jax.jit(losses.iou_mse),
    heatmap_focal_loss=jax.jit(losses.heatmap_focal_loss, static_argnames=("alpha", "beta")),
    giou_loss=jax.jit(losses.giou_loss),
    association_bce=jax.jit(losses.association_bce),
)


def rng(seed=0):
  return np.random.default_rng(seed)


def t64(x):
  return torch.from_numpy(np.asarray(x, np.float64))


# ------------------------------------------------------------------------------------------ references


def np_smoothed_ce(logits, targets, mask, eps):
  """SPEC section 2: q = 1 − ε on the target, ε/(V−1) on every other id; returns (loss, per_example)."""
  logits = np.asarray(logits, np.float64)
  b, t, v = logits.shape
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  q = np.full((b, t, v), eps / (v - 1))
  for i in range(b):
    for j in range(t):
      if mask[i, j]:
        q[i, j, targets[i, j]] = 1.0 - eps
  nll = -(q * logp).sum(-1) * mask
  per_example = nll.sum(-1) / np.maximum(mask.sum(-1), 1)
  return nll.sum() / max(mask.sum(), 1), per_example


def torch_focal(logits, targets, valid, alpha, gamma, keep=None):
  x, y = t64(logits), t64(targets)
  keep = torch.ones_like(x) if keep is None else t64(keep)
  p = torch.sigmoid(x)
  ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
  pt = p * y + (1 - p) * (1 - y)
  loss = ce * (1 - pt) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * y + (1 - alpha) * (1 - y))
  per_mask = (loss * keep).sum((-2, -1)) / keep.sum((-2, -1))
  v = t64(valid)
  return float((per_mask * v).sum() / v.sum())


def torch_dice(logits, targets, valid, eps):
  p = torch.sigmoid(t64(logits)).flatten(-2)
  y = t64(targets).flatten(-2)
  per_mask = 1 - (2 * (p * y).sum(-1) + eps) / (p.sum(-1) + y.sum(-1) + eps)
  v = t64(valid)
  return float((per_mask * v).sum() / v.sum())


def torch_bce(logits, targets, valid):
  per_mask = F.binary_cross_entropy_with_logits(t64(logits), t64(targets), reduction="none").mean((-2, -1))
  v = t64(valid)
  return float((per_mask * v).sum() / v.sum())


def np_centernet(logits, gt, alpha, beta):
  p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  pos = gt == 1
  pos_loss = (np.log(p) * (1 - p) ** alpha)[pos].sum()
  neg_loss = (np.log(1 - p) * p ** alpha * (1 - gt) ** beta)[~pos].sum()
  return -(pos_loss + neg_loss) / max(pos.sum(), 1)


def torch_giou(a, b):
  a, b = t64(a), t64(b)
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  ewh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
  enc = ewh[..., 0] * ewh[..., 1]
  return inter / union - (enc - union) / enc


def random_boxes(r, shape, size=64.0):
  xy = r.uniform(0, size, shape + (2,))
  wh = r.uniform(1, size / 2, shape + (2,))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def masks_case(seed=0, shape=(2, 3, 8, 8)):
  r = rng(seed)
  logits = (r.normal(size=shape) * 3).astype(np.float32)
  targets = (r.uniform(size=shape) > 0.6).astype(np.float32)
  valid = np.array([[True, False, True], [True, True, False]])
  return logits, targets, valid


# ---------------------------------------------------------------------------------------------- text


def text_case(seed=0, b=3, t=5, v=11):
  r = rng(seed)
  logits = (r.normal(size=(b, t, v)) * 2).astype(np.float32)
  targets = r.integers(0, v, size=(b, t)).astype(np.int32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  return logits, targets, mask


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_numpy_spec_convention(eps):
  logits, targets, mask = text_case()
  loss, per_ex = L.text_cross_entropy(logits, targets, mask, label_smoothing=eps)
  ref_loss, ref_per_ex = np_smoothed_ce(logits, targets, mask, eps)
  np.testing.assert_allclose(float(loss), ref_loss, **TOL)
  np.testing.assert_allclose(np.asarray(per_ex), ref_per_ex, **TOL)
  assert loss.dtype == jnp.float32 and per_ex.shape == (3,)


def test_cross_entropy_unsmoothed_equals_torch():
  logits, targets, mask = text_case(1)
  loss, _ = L.text_cross_entropy(logits, targets, mask, label_smoothing=0.0)
  ref = F.cross_entropy(t64(logits)[torch.from_numpy(mask)], torch.from_numpy(targets[mask]).long())
  np.testing.assert_allclose(float(loss), float(ref), **TOL)


def test_cross_entropy_smoothing_is_torch_with_rescaled_epsilon():
  # SPEC's q equals torch's (1 − ε')·onehot + ε'/V with ε' = ε·V/(V−1); torch's own ε gives another value.
  logits, targets, mask = text_case(2)
  v = logits.shape[-1]
  eps = 0.1
  loss, _ = L.text_cross_entropy(logits, targets, mask, label_smoothing=eps)
  sel = torch.from_numpy(mask)
  x, y = t64(logits)[sel], torch.from_numpy(targets[mask]).long()
  ref = F.cross_entropy(x, y, label_smoothing=eps * v / (v - 1))
  np.testing.assert_allclose(float(loss), float(ref), **TOL)
  assert abs(float(loss) - float(F.cross_entropy(x, y, label_smoothing=eps))) > 1e-4


def test_cross_entropy_masking_and_empty():
  logits, targets, mask = text_case(3)
  loss, per_ex = L.text_cross_entropy(logits, targets, mask)
  # Masked positions may hold anything, including out-of-range ids and huge logits.
  logits2 = np.where(mask[..., None], logits, 1e30).astype(np.float32)
  targets2 = np.where(mask, targets, -100)
  loss2, per_ex2 = L.text_cross_entropy(logits2, targets2, mask)
  np.testing.assert_allclose(float(loss2), float(loss), **TOL)
  np.testing.assert_allclose(np.asarray(per_ex2), np.asarray(per_ex), **TOL)
  none = np.zeros_like(mask)
  loss0, per_ex0 = L.text_cross_entropy(logits, targets, none)
  assert float(loss0) == 0.0 and np.all(np.asarray(per_ex0) == 0.0)
  g = jax.grad(lambda x: L.text_cross_entropy(x, targets, none)[0])(jnp.asarray(logits))
  assert np.all(np.asarray(g) == 0.0)


def test_cross_entropy_perfect_prediction_hits_the_entropy_floor():
  v, eps = 7, 0.1
  targets = np.array([[2, 5]], np.int32)
  mask = np.ones((1, 2), bool)
  # logits whose softmax is exactly q: log q (up to a constant).
  q = np.full((1, 2, v), eps / (v - 1))
  q[0, 0, 2] = q[0, 1, 5] = 1 - eps
  loss, _ = L.text_cross_entropy(np.log(q).astype(np.float32), targets, mask, label_smoothing=eps)
  entropy = -(q[0, 0] * np.log(q[0, 0])).sum()
  np.testing.assert_allclose(float(loss), entropy, rtol=1e-5)
  onehot = np.where(np.arange(v) == targets[..., None], 30.0, -30.0).astype(np.float32)
  loss0, _ = L.text_cross_entropy(onehot, targets, mask, label_smoothing=0.0)
  assert float(loss0) < 1e-6


def test_cross_entropy_grad_and_bfloat16():
  logits, targets, mask = text_case(4)
  g = jax.grad(lambda x: L.text_cross_entropy(x, targets, mask)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[~mask] == 0.0)
  # The gradient of CE w.r.t. the logits is (softmax − q) / n_tokens at each valid position.
  np.testing.assert_allclose(np.asarray(g).sum(-1), 0.0, atol=1e-6)
  lb = jnp.asarray(logits, jnp.bfloat16)
  loss_b, per_b = L.text_cross_entropy(lb, targets, mask)
  ref, _ = np_smoothed_ce(np.asarray(lb.astype(jnp.float32)), targets, mask, 0.1)
  assert loss_b.dtype == jnp.float32 and per_b.dtype == jnp.float32
  np.testing.assert_allclose(float(loss_b), ref, rtol=1e-5)
  gb = jax.grad(lambda x: L.text_cross_entropy(x, targets, mask)[0])(lb)
  assert gb.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gb.astype(jnp.float32))))


def test_token_accuracy():
  logits, targets, mask = text_case(5)
  pred = logits.argmax(-1)
  targets = targets.copy()
  targets[1, :3] = pred[1, :3]  # guarantee a few hits
  ref = (pred == targets)[mask].mean()
  np.testing.assert_allclose(float(L.token_accuracy(logits, targets, mask)), ref, rtol=1e-6)
  assert float(L.token_accuracy(logits, targets, np.zeros_like(mask))) == 0.0
  assert float(L.token_accuracy(jnp.asarray(logits, jnp.bfloat16), pred, mask)) == 1.0


# ----------------------------------------------------------------------------------------- locations


def test_point_l1_reference_and_shapes():
  r = rng(6)
  b, t = 2, 6
  pred = r.uniform(0, 384, (b, t, 2, 2)).astype(np.float32)
  target = r.uniform(0, 384, (b, t, 2, 2)).astype(np.float32)
  target[0, 1] = 0.0  # all-zero target: ignored although valid
  valid = np.array([[1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]], bool)
  scored = valid & np.any(target.reshape(b, t, 4) != 0, -1)
  ref = np.abs(pred - target).reshape(b, t, 4).sum(-1)[scored].mean()
  got = L.point_l1(pred, target, valid)
  np.testing.assert_allclose(float(got), ref, rtol=1e-6)
  flat = L.point_l1(pred.reshape(b, t, 4), target.reshape(b, t, 4), valid)
  np.testing.assert_allclose(float(flat), ref, rtol=1e-6)
  # Hand case: one scored token, errors 1, 2, 3, 4 pixels → 10.
  p1 = np.array([[[1.0, 2.0, 3.0, 4.0]]], np.float32)
  t1 = np.array([[[2.0, 4.0, 6.0, 8.0]]], np.float32)
  assert float(L.point_l1(p1, t1, np.ones((1, 1), bool))) == pytest.approx(10.0)
  # A partly-zero target (point at the origin) is still scored.
  t2 = np.array([[[0.0, 0.0, 6.0, 8.0]]], np.float32)
  assert float(L.point_l1(p1, t2, np.ones((1, 1), bool))) == pytest.approx(1 + 2 + 3 + 4)


def test_point_l1_masking_empty_grad_bf16():
  r = rng(7)
  pred = r.uniform(0, 100, (2, 4, 4)).astype(np.float32)
  target = r.uniform(1, 100, (2, 4, 4)).astype(np.float32)
  valid = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], bool)
  base = float(L.point_l1(pred, target, valid))
  pred2 = np.where(valid[..., None], pred, 1e6).astype(np.float32)
  assert float(L.point_l1(pred2, target, valid)) == pytest.approx(base, rel=1e-6)
  assert float(L.point_l1(pred, target, np.zeros_like(valid))) == 0.0
  assert float(L.point_l1(pred, np.zeros_like(target), valid)) == 0.0
  g = jax.grad(L.point_l1)(jnp.asarray(pred), target, valid)
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~valid] == 0)
  got = L.point_l1(jnp.asarray(pred, jnp.bfloat16), target, valid)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), base, **BF16_TOL)


def test_attention_grounding_by_hand():
  """2×2 grid (cell centres at 0.25 / 0.75): the mass on the cells whose centres the box holds."""
  p = np.zeros((1, 4, 4), np.float32)
  p[0, 0] = [0.1, 0.2, 0.3, 0.1]     # box over the left column: cells 0 and 2 → 0.4
  p[0, 1] = [0.5, 0.1, 0.1, 0.1]     # tiny box around (0.8, 0.8), no centre inside → cell 3: 0.1
  p[0, 2] = [0.25, 0.25, 0.25, 0.25]  # not valid
  p[0, 3] = [0.0, 0.0, 0.0, 0.0]     # valid, but an all-zero box (no trace segment): not scored
  boxes = np.array([[[0.0, 0.0, 0.5, 1.0], [0.78, 0.78, 0.82, 0.82], [0, 0, 1, 1], [0, 0, 0, 0]]],
                   np.float32)
  valid = np.array([[True, True, False, True]])
  want = (-np.log(0.4 + 1e-6) - np.log(0.1 + 1e-6)) / 2
  assert float(L.attention_grounding(p, boxes, valid)) == pytest.approx(want, rel=1e-5)
  assert float(L.attention_grounding(p, boxes, np.zeros_like(valid))) == 0.0
  # The whole-image box holds every centre: loss −log(Σp); the gradient only reaches inside cells.
  g = jax.grad(L.attention_grounding)(jnp.asarray(p), boxes, valid)
  assert np.all(np.asarray(g)[0, 0, [1, 3]] == 0) and np.all(np.asarray(g)[0, 0, [0, 2]] < 0)
  assert np.all(np.asarray(g)[0, 2:] == 0)


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_focal_matches_torch(alpha, gamma):
  logits, targets, valid = masks_case()
  fn = functools.partial(L.sigmoid_focal_loss, alpha=alpha, gamma=gamma)
  got = fn(logits, targets, valid)
  np.testing.assert_allclose(float(got), torch_focal(logits, targets, valid, alpha, gamma), **TOL)


def test_focal_gamma0_is_weighted_bce():
  logits, targets, valid = masks_case(1)
  got = L.sigmoid_focal_loss(logits, targets, valid, alpha=-1, gamma=0.0)
  np.testing.assert_allclose(float(got), float(L.mask_bce(logits, targets, valid)), **TOL)


def test_dice_matches_torch_and_hand_cases():
  logits, targets, valid = masks_case(2)
  for eps in (1.0, 1e-3):
    got = L.dice_loss(logits, targets, valid, eps=eps)
    np.testing.assert_allclose(float(got), torch_dice(logits, targets, valid, eps), **TOL)
  # 2×2 hand case: p = 0.5 everywhere, one target pixel: 1 − (2·0.5 + 1) / (2 + 1 + 1) = 0.5.
  zero = np.zeros((1, 2, 2), np.float32)
  tgt = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
  assert float(L.dice_loss(zero, tgt, np.ones(1, bool))) == pytest.approx(0.5)
  assert float(losses.dice_loss(zero, tgt, np.ones(1, bool))) == pytest.approx(0.5)  # eager
  # eps = 0: 1 − 1 / 3 = 2/3.
  assert float(L.dice_loss(zero, tgt, np.ones(1, bool), eps=0.0)) == pytest.approx(2 / 3, rel=1e-6)
  # Perfect confident prediction → ~0.
  perfect = np.where(tgt > 0, 40.0, -40.0).astype(np.float32)
  assert float(L.dice_loss(perfect, tgt, np.ones(1, bool))) < 1e-6


def test_bce_matches_torch():
  logits, targets, valid = masks_case(3)
  got = L.mask_bce(logits, targets, valid)
  np.testing.assert_allclose(float(got), torch_bce(logits, targets, valid), **TOL)
  # Soft targets and extreme logits stay finite and exact.
  soft = rng(3).uniform(size=targets.shape).astype(np.float32)
  big = (logits * 100).astype(np.float32)
  np.testing.assert_allclose(float(L.mask_bce(big, soft, valid)), torch_bce(big, soft, valid), **TOL)


def test_perfect_masks_give_zero():
  tgt = (rng(4).uniform(size=(3, 6, 6)) > 0.5).astype(np.float32)
  perfect = np.where(tgt > 0, 50.0, -50.0).astype(np.float32)
  valid = np.ones(3, bool)
  assert float(L.sigmoid_focal_loss(perfect, tgt, valid)) < 1e-12
  assert float(L.mask_bce(perfect, tgt, valid)) < 1e-12
  assert float(L.iou_mse(np.ones(3, np.float32), perfect, tgt, valid)) == 0.0


MASK_LOSSES = {
    "focal": L.sigmoid_focal_loss,
    "dice": L.dice_loss,
    "bce": L.mask_bce,
    "iou_mse": lambda lg, tg, v, **kw: L.iou_mse(jnp.full(v.shape, 0.3), lg, tg, v, **kw),
}


@pytest.mark.parametrize("name", sorted(MASK_LOSSES))
def test_mask_losses_validity_ignore_grad_bf16(name):
  fn = MASK_LOSSES[name]
  logits, targets, valid = masks_case(5)
  base = float(jax.jit(fn)(logits, targets, valid))
  assert np.isfinite(base) and base > 0
  # Invalid masks do not matter, whatever they hold.
  lg2 = np.where(valid[..., None, None], logits, 1e4).astype(np.float32)
  tg2 = np.where(valid[..., None, None], targets, 0.37).astype(np.float32)
  np.testing.assert_allclose(float(fn(lg2, tg2, valid)), base, **TOL)
  # Valid masks are averaged: the loss equals the mean of one-mask L.
  singles = [float(fn(logits[i, j][None], targets[i, j][None], np.ones(1, bool)))
             for i, j in zip(*np.nonzero(valid))]
  np.testing.assert_allclose(base, np.mean(singles), **TOL)
  # All invalid → 0 with zero, finite gradients.
  none = np.zeros_like(valid)
  assert float(fn(logits, targets, none)) == 0.0
  g0 = jax.grad(lambda x: fn(x, targets, none))(jnp.asarray(logits))
  assert np.all(np.asarray(g0) == 0.0)
  # Ignored pixels: the same as scoring only the kept crop; their contents do not matter.
  ignore = np.zeros(logits.shape, bool)
  ignore[..., 5:, :] = True
  ignore[..., :, 6:] = True
  cropped = float(fn(logits[..., :5, :6], targets[..., :5, :6], valid))
  lg3 = np.where(ignore, -7.0, logits).astype(np.float32)
  tg3 = np.where(ignore, 1.0, targets).astype(np.float32)
  np.testing.assert_allclose(float(fn(lg3, tg3, valid, ignore=ignore)), cropped, **TOL)
  np.testing.assert_allclose(float(fn(logits, targets, valid, ignore=ignore)), cropped, **TOL)
  # Gradients are finite and vanish on invalid masks and ignored pixels.
  g = np.asarray(jax.grad(lambda x: fn(x, targets, valid, ignore=ignore))(jnp.asarray(logits)))
  assert np.all(np.isfinite(g))
  assert np.all(g[~valid] == 0) and np.all(g[..., 5:, :] == 0)
  # bfloat16 logits are accepted and computed in float32.
  lb = jnp.asarray(logits, jnp.bfloat16)
  out = fn(lb, targets, valid)
  assert out.dtype == jnp.float32
  ref = float(fn(np.asarray(lb.astype(jnp.float32)), targets, valid))
  np.testing.assert_allclose(float(out), ref, rtol=1e-5)
  gb = jax.grad(lambda x: fn(x, targets, valid))(lb)
  assert gb.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gb.astype(jnp.float32))))


def test_mask_with_every_pixel_ignored_is_skipped():
  logits, targets, valid = masks_case(6)
  ignore = np.zeros(logits.shape, bool)
  ignore[0, 0] = True  # a valid mask with nothing left to score
  v2 = valid.copy()
  v2[0, 0] = False
  for fn in (L.sigmoid_focal_loss, L.mask_bce):
    np.testing.assert_allclose(float(fn(logits, targets, valid, ignore=ignore)),
                               float(fn(logits, targets, v2)), **TOL)


def test_iou_mse_hand_case_and_gradient():
  # Prediction covers 3 pixels, target 2, overlap 1 → IoU = 1 / 4.
  logits = np.array([[[5.0, 5.0, 5.0], [-5.0, -5.0, -5.0]]], np.float32)
  tgt = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], np.float32)
  np.testing.assert_allclose(np.asarray(L.mask_iou(logits, tgt)), [0.25])
  valid = np.ones(1, bool)
  got = L.iou_mse(np.array([0.75], np.float32), logits, tgt, valid)
  assert float(got) == pytest.approx(0.25)
  g_iou, g_logits = jax.grad(L.iou_mse, argnums=(0, 1))(
      jnp.array([0.75]), jnp.asarray(logits), tgt, valid)
  np.testing.assert_allclose(np.asarray(g_iou), [2 * (0.75 - 0.25)])
  assert np.all(np.asarray(g_logits) == 0)  # the target IoU is a constant
  # Both empty → IoU 1.
  empty = np.zeros((1, 2, 3), np.float32)
  np.testing.assert_allclose(np.asarray(L.mask_iou(-np.ones_like(empty), empty)), [1.0])


# ---------------------------------------------------------------------------------------- proposals


def heatmap_case(seed=8):
  r = rng(seed)
  b, h, w = 2, 12, 10
  yy, xx = np.mgrid[:h, :w]
  gt = np.zeros((b, h, w))
  for i, (cy, cx) in enumerate([(3, 4), (8, 2)]):
    gt[i] = np.maximum(gt[i], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0))
  gt[0] = np.maximum(gt[0], np.exp(-((yy - 9) ** 2 + (xx - 8) ** 2) / 2.0))
  logits = r.normal(size=(b, h, w)).astype(np.float32) * 2
  return logits, gt.astype(np.float32)


def test_heatmap_focal_matches_numpy():
  logits, gt = heatmap_case()
  assert (gt == 1).sum() == 3
  for alpha, beta in [(2.0, 4.0), (1.0, 2.0)]:
    got = L.heatmap_focal_loss(logits, gt, alpha=alpha, beta=beta)
    np.testing.assert_allclose(float(got), np_centernet(logits, gt, alpha, beta), **TOL)
  # No positives: normalised by 1, still finite.
  zero_gt = np.zeros_like(gt)
  np.testing.assert_allclose(float(L.heatmap_focal_loss(logits, zero_gt)),
                             np_centernet(logits, zero_gt, 2.0, 4.0), **TOL)
  # Near-perfect prediction → ~0; extreme logits stay finite (no clamp needed).
  perfect = np.where(gt == 1, 30.0, -30.0).astype(np.float32)
  assert float(L.heatmap_focal_loss(perfect, gt)) < 1e-6
  worst = np.where(gt == 1, -200.0, 200.0).astype(np.float32)
  val, g = jax.value_and_grad(L.heatmap_focal_loss)(jnp.asarray(worst), gt)
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))


def test_heatmap_focal_ignore_grad_bf16():
  logits, gt = heatmap_case(9)
  ignore = np.zeros(gt.shape, bool)
  ignore[:, :, 9:] = True
  ref = np_centernet(logits[..., :9], gt[..., :9], 2.0, 4.0)
  lg = np.where(ignore, 99.0, logits).astype(np.float32)
  np.testing.assert_allclose(float(L.heatmap_focal_loss(lg, gt, ignore=ignore)), ref, **TOL)
  g = np.asarray(jax.grad(L.heatmap_focal_loss)(jnp.asarray(logits), gt, ignore=ignore))
  assert np.all(np.isfinite(g)) and np.all(g[ignore] == 0)
  out = L.heatmap_focal_loss(jnp.asarray(logits, jnp.bfloat16), gt)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), np_centernet(logits, gt, 2.0, 4.0), **BF16_TOL)


def test_giou_matches_torch_and_hand_cases():
  r = rng(10)
  pred = random_boxes(r, (3, 5))
  tgt = random_boxes(r, (3, 5))
  tgt[0, 0] = pred[0, 0] + np.array([2, 1, 3, -1], np.float32)  # overlapping pair
  valid = r.uniform(size=(3, 5)) > 0.3
  ref = (1 - torch_giou(pred, tgt)).numpy()[valid].mean()
  np.testing.assert_allclose(float(L.giou_loss(pred, tgt, valid)), ref, **TOL)
  one = np.ones(1, bool)
  box = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
  assert float(L.giou_loss(box, box, one)) == pytest.approx(0.0, abs=1e-6)
  # Disjoint unit boxes 1 apart: IoU 0, union 2, enclosing 3 → GIoU −1/3, loss 4/3.
  far = np.array([[2.0, 0.0, 3.0, 1.0]], np.float32)
  assert float(L.giou_loss(box, far, one)) == pytest.approx(4 / 3, rel=1e-6)
  # Half-overlapping: inter 0.5, union 1.5, enclosing 1.5 → loss 1 − 1/3.
  half = np.array([[0.5, 0.0, 1.5, 1.0]], np.float32)
  assert float(L.giou_loss(box, half, one)) == pytest.approx(2 / 3, rel=1e-6)


def test_giou_validity_grad_bf16():
  r = rng(11)
  pred = random_boxes(r, (4, 6))
  tgt = random_boxes(r, (4, 6))
  valid = r.uniform(size=(4, 6)) > 0.5
  base = float(L.giou_loss(pred, tgt, valid))
  zeros = np.where(valid[..., None], pred, 0.0).astype(np.float32)
  np.testing.assert_allclose(float(L.giou_loss(zeros, np.where(valid[..., None], tgt, 0.0), valid)),
                             base, **TOL)
  assert float(L.giou_loss(pred, tgt, np.zeros_like(valid))) == 0.0
  # Degenerate (zero-area) invalid and valid boxes keep gradients finite.
  g = np.asarray(jax.grad(L.giou_loss)(jnp.zeros((4, 6, 4)), jnp.zeros((4, 6, 4)), valid))
  assert np.all(np.isfinite(g))
  g = np.asarray(jax.grad(L.giou_loss)(jnp.asarray(pred), tgt, valid))
  assert np.all(np.isfinite(g)) and np.all(g[~valid] == 0)
  out = L.giou_loss(jnp.asarray(pred, jnp.bfloat16), tgt, valid)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), base, **BF16_TOL)


# --------------------------------------------------------------------------------------- association


def test_association_bce_matches_torch():
  r = rng(12)
  b, k, e, d = 2, 4, 5, 8
  nouns = r.normal(size=(b, k, d)).astype(np.float32)
  ents = r.normal(size=(b, e, d)).astype(np.float32)
  gt = r.uniform(size=(b, k, e)) > 0.7
  nv = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  ev = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], bool)
  logits = torch.einsum("bkd,bed->bke", t64(nouns), t64(ents))
  per_pair = F.binary_cross_entropy_with_logits(logits, t64(gt), reduction="none")
  pairs = torch.from_numpy(nv[:, :, None] & ev[:, None, :])
  ref = float(per_pair[pairs].mean())
  got = L.association_bce(nouns, ents, gt, nv, ev)
  np.testing.assert_allclose(float(got), ref, **TOL)
  # Invalid nouns / entities do not matter; none valid → 0; grads finite and zero on padding.
  nouns2 = np.where(nv[..., None], nouns, 1e3).astype(np.float32)
  gt2 = np.where(pairs.numpy(), gt, ~gt)
  np.testing.assert_allclose(float(L.association_bce(nouns2, ents, gt2, nv, ev)), ref, **TOL)
  assert float(L.association_bce(nouns, ents, gt, np.zeros_like(nv), ev)) == 0.0
  gn, ge = jax.grad(L.association_bce, argnums=(0, 1))(jnp.asarray(nouns), jnp.asarray(ents), gt, nv, ev)
  gn, ge = np.asarray(gn), np.asarray(ge)
  assert np.all(np.isfinite(gn)) and np.all(gn[~nv] == 0) and np.all(ge[~ev] == 0)
  out = L.association_bce(jnp.asarray(nouns, jnp.bfloat16), jnp.asarray(ents, jnp.bfloat16), gt, nv, ev)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), ref, rtol=5e-2)
  # Perfectly separated logits → ~0.
  strong = np.where(gt, 50.0, -50.0)
  eye_n = np.zeros((b, k, k * e))
  eye_e = np.zeros((b, e, k * e))
  for kk in range(k):
    for ee in range(e):
      eye_n[:, kk, kk * e + ee] = strong[:, kk, ee]
      eye_e[:, ee, kk * e + ee] = 1.0
  assert float(L.association_bce(eye_n, eye_e, gt, nv, ev)) < 1e-12
