"""GELLA evaluation with class-agnostic entities from SAM's automatic mask generator (SPEC 1.10: entity
masks are ground-truth segments in training and a class-agnostic segmenter's at test time).

`config.eval.entities = "sam"` makes the evaluator (`eval_lib.Evaluator`) replace the ground-truth
entities of every `narrative_grounding` / `panoptic` row by the automatic masks of the example's
ORIGINAL image (`auto_masks.entity_id_map`: up to the row's entity slots, highest predicted IoU,
smaller masks on top): entity slot e holds automatic entity e + 1. Scoring then unions / labels those
masks (not the ground-truth segments) and compares them with the ground truth as before. The row's
association (used only by the teacher-forced training metrics) becomes: noun / entry k owns entity e
when more than half of e's pixels lie in k's ground-truth mask (`seg_masks`).

The generator is `config.eval.sam_checkpoint` (loaded on this process's devices), or, in a
single-process run, the model's own SAM encoder, prompt encoder and mask decoder.
"""

from __future__ import annotations

import typing as tp

import jax
import numpy as np

from pixelground.data import tasks as task_lib
from pixelground.data import transforms as T

TASKS = ("narrative_grounding", "panoptic")


def auto_row(row: dict[str, np.ndarray], entity_map: np.ndarray, image_size: int
             ) -> dict[str, np.ndarray]:
  """A converter row with its entities replaced by `entity_map` ((H, W) ids of the original image,
  0 = void, ids 1..n) resized with the evaluation geometry; `entity_ids` = the map's ids."""
  e = row["entity_masks"].shape[0]
  h, w = entity_map.shape
  geom = T.resize_pad(h, w, image_size)
  small = T.apply_label_map(entity_map, geom, fill=0)
  labels = np.arange(1, min(int(entity_map.max()), e) + 1)
  masks = np.zeros_like(row["entity_masks"])
  masks[: len(labels)] = small[None] == labels[:, None, None]
  valid = masks.any(axis=(1, 2))
  area = masks.reshape(e, -1).sum(-1)
  inside = np.einsum("kyx,eyx->ke", row["seg_masks"].astype(np.float32), masks.astype(np.float32))
  assoc = (inside > 0.5 * np.maximum(area, 1)[None]) & valid[None] & row["seg_valid"][:, None]
  ids = np.zeros(e, np.int32)
  ids[: len(labels)] = labels
  return row | {"entity_masks": masks, "entity_valid": valid, "entity_ids": ids, "association": assoc}


class AutoEntities:
  """Automatic entity maps for evaluation rows (see the module docstring)."""

  def __init__(self, sam_checkpoint: str, image_size: int):
    self.sam_checkpoint, self.image_size = sam_checkpoint, image_size
    self.generator = None

  def bind(self, setup, state) -> None:
    """Builds the generator once (from the checkpoint, or from the state's SAM parts)."""
    if self.generator is not None:
      return
    from jax.sharding import Mesh

    from pixelground.inference.auto_masks import AutomaticMaskGenerator, model_sam_parts
    if self.sam_checkpoint:
      local = Mesh(np.asarray(jax.local_devices()), ("devices",))
      self.generator = AutomaticMaskGenerator.from_sam(self.sam_checkpoint, mesh=local)
      return
    if jax.process_count() > 1:
      raise ValueError("config.eval.entities='sam' on several processes needs "
                       "config.eval.sam_checkpoint (the generator runs on each process's devices)")
    from flax import nnx
    model = nnx.merge(setup.graphdef, state["params"], state["frozen"])
    parts = model_sam_parts(model, "set config.eval.sam_checkpoint (config.eval.entities='sam')")
    self.generator = AutomaticMaskGenerator(*parts, mesh=setup.mesh)

  def rows(self, examples: tp.Sequence[dict], rows: list[dict[str, np.ndarray]]
           ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Rows with automatic entities and the entity maps (original resolution) they came from."""
    from pixelground.inference.auto_masks import entity_id_map
    if not rows:
      return rows, []
    images = [np.asarray(T.to_rgb_uint8(ex["image"])) for ex in examples]
    records = self.generator.generate_batch(images)
    maps = [entity_id_map(rec, task_lib.image_hw(im), r["entity_masks"].shape[0])
            for rec, im, r in zip(records, images, rows)]
    return [auto_row(r, m, self.image_size) for r, m in zip(rows, maps)], maps
