"""Non-finite predictions at evaluation: each one scores as a miss and is counted, never a traceback.

A diverged or half-trained model can emit NaN / inf points, boxes, scores or logits. Before scoring,
`sanitize` replaces every non-finite value of a prediction batch with one that can only miss:

  points (B, T, 4) / box (B, 4), model-input pixels      → −image_size: a point one image outside the
                                                          top-left corner, a zero-area box there (IoU 0)
  boxes (B, K, 4) normalised (dense captioning)          → −1 (zero-area, outside; IoU 0)
  scores (B, K)                                          → 0 (ranked last)
  mask_logits (B, ..., H, W)                             → −1e4 (background: an empty mask)

(a point, box or mask with one non-finite entry is replaced whole)
  assoc_logits (B, K, E)                                 → left non-finite: `inference.grounding`
                                                          reads a non-finite logit as "no association"
                                                          (the phrase owns nothing, the entity is void)

and returns which examples had any (`(B,) bool`), so the evaluator can count them per task
(`<task>/nonfinite`) and flag them in the predictions JSONL.
"""

from __future__ import annotations

import numpy as np

_FILL_PIXELS = ("points", "box")
_FILL = {"boxes": -1.0, "scores": 0.0, "mask_logits": -1e4}
KEYS = _FILL_PIXELS + tuple(_FILL) + ("assoc_logits",)


def sanitize(out: dict[str, np.ndarray], image_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Host prediction batch {key: (B, ...) array} → (the batch with non-finite values replaced as in
  the module docstring, (B,) bool: the examples that had any)."""
  batch = len(out["index"]) if "index" in out else len(next(iter(out.values())))
  bad = np.zeros(batch, bool)
  fixed = dict(out)
  for key in KEYS:
    if key not in out:
      continue
    x = np.asarray(out[key])
    if not np.issubdtype(x.dtype, np.floating):
      continue
    finite = np.isfinite(x)
    if finite.all():
      continue
    bad |= ~finite.reshape(batch, -1).all(axis=1)
    if key == "assoc_logits":
      continue
    # The whole point / box / mask goes, not just its non-finite entries.
    axes = {"mask_logits": (-2, -1), "scores": ()}.get(key, (-1,))
    whole = finite.all(axis=axes, keepdims=True) if axes else finite
    fill = -float(image_size) if key in _FILL_PIXELS else _FILL[key]
    fixed[key] = np.where(whole, x, np.asarray(fill, x.dtype))
  return fixed, bad
