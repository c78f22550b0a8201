"""SAM's automatic mask generator in JAX: class-agnostic masks of everything in an image.

A grid of single-point prompts goes through SAM's prompt encoder and mask decoder (three masks per
point), in batches that are one compiled program per batch shape and sharded over the mesh's devices;
masks are kept when the predicted IoU and the stability score pass their thresholds and the mask is not
cut by a crop border; box NMS removes duplicates within each crop and across crops (smaller crops
win); optionally small islands and holes are removed. The options and outputs are those of
segment-anything's `SamAutomaticMaskGenerator` (same names, defaults and record keys), and so are the
results (`tests/test_auto_masks.py` checks parity with segment-anything 1.0 on shared weights).

Work that never reaches an output is skipped: only the masks that pass the predicted-IoU threshold are
upsampled to the image, the resize to the same size is the identity, and masks become RLEs only after
the filters. Images of a call are encoded together (all their crops in batches over the devices).

    gen = AutomaticMaskGenerator.from_sam("/ckpt/sam_vit_h_4b8939.pth", mesh=mesh)
    records = gen.generate(image)                 # image (H, W, 3) uint8 RGB
    for r in records: r["segmentation"], r["bbox"], r["predicted_iou"], ...
    batches = gen.generate_batch([im1, im2])      # one list of records per image

Records (as segment-anything): segmentation ((H, W) bool, or a COCO RLE for output_mode "coco_rle" /
"uncompressed_rle"), area (pixels), bbox (xywh pixels, inclusive max), predicted_iou,
stability_score, point_coords ([[x, y]] image pixels), crop_box (xywh pixels).
"""

from __future__ import annotations

import dataclasses
import time
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixelground.inference import mask_ops as ops

PIXEL_MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)  # SAM's input normalisation
PIXEL_STD = np.asarray([58.395, 57.12, 57.375], np.float32)
OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MIN_SIDE = 16            # smaller images hold no SAM patch: an error, not a result
POST_BUDGET = 1 << 28    # bytes of float32 full-size logits per postprocessing program


@dataclasses.dataclass(frozen=True)
class AutoMaskOptions:
  """segment-anything's `SamAutomaticMaskGenerator` options (same names and defaults)."""
  points_per_side: int | None = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  box_nms_thresh: float = 0.7
  crop_n_layers: int = 0
  crop_nms_thresh: float = 0.7
  crop_overlap_ratio: float = 512 / 1500
  crop_n_points_downscale_factor: int = 1
  point_grids: tp.Sequence[np.ndarray] | None = None
  min_mask_region_area: int = 0
  output_mode: str = "binary_mask"
  mask_threshold: float = 0.0

  def __post_init__(self):
    def bad(msg):
      raise ValueError(f"auto masks: {msg}")

    if (self.points_per_side is None) == (self.point_grids is None):
      bad("give exactly one of points_per_side and point_grids")
    if self.points_per_side is not None and int(self.points_per_side) < 1:
      bad(f"points_per_side must be ≥ 1 (a grid of {self.points_per_side} points per side has no "
          "prompt)")
    if int(self.crop_n_layers) < 0:
      bad(f"crop_n_layers must be ≥ 0, got {self.crop_n_layers}")
    if self.point_grids is not None:
      grids = [np.asarray(g, np.float64) for g in self.point_grids]
      if len(grids) < self.crop_n_layers + 1:
        bad(f"point_grids has {len(grids)} grids; crop_n_layers={self.crop_n_layers} needs "
            f"{self.crop_n_layers + 1}")
      for i, g in enumerate(grids):
        if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
          bad(f"point_grids[{i}] must be a non-empty (N, 2) array of (x, y) in [0, 1], got "
              f"shape {g.shape}")
      object.__setattr__(self, "point_grids", tuple(grids))
    if int(self.points_per_batch) < 1:
      bad(f"points_per_batch must be ≥ 1, got {self.points_per_batch}")
    if int(self.crop_n_points_downscale_factor) < 1:
      bad("crop_n_points_downscale_factor must be ≥ 1")
    if self.output_mode not in OUTPUT_MODES:
      bad(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
    if self.min_mask_region_area < 0:
      bad("min_mask_region_area must be ≥ 0")

  def grids(self) -> list[np.ndarray]:
    if self.point_grids is not None:
      return list(self.point_grids)
    return ops.layer_point_grids(int(self.points_per_side), int(self.crop_n_layers),
                                 int(self.crop_n_points_downscale_factor))


@dataclasses.dataclass
class _Crop:
  image: int                 # index of the image in the call
  box: list[int]             # xyxy, exclusive max, image pixels
  layer: int
  input_hw: tuple[int, int]  # the crop resized to the encoder's long side


class AutomaticMaskGenerator:
  """Masks of everything in an image from SAM's parts (see the module docstring).

  Args:
    encoder: `SamImageEncoder`.
    prompt_encoder, mask_decoder: SAM's `PromptEncoder` and `MaskDecoder` (a decoder built with
      detail channels is not SAM's and is refused). The prompt encoder's `cfg.image_size` is the
      encoder input S: each crop is resized to long side S and zero-padded to S × S.
    mesh: devices the programs are sharded over (prompt and crop batches split over all its axes);
      default one device.
    **options: `AutoMaskOptions` fields.
  """

  def __init__(self, encoder, prompt_encoder, mask_decoder, *, mesh: Mesh | None = None, **options):
    self.options = AutoMaskOptions(**options)
    if getattr(mask_decoder, "detail_channels", 0):
      raise ValueError("auto masks: the mask decoder has detail channels (a fine-tuned [SEG] decoder, "
                       "not SAM's); load SAM's own decoder (AutomaticMaskGenerator.from_sam).")
    size, patch = prompt_encoder.cfg.image_size, encoder.cfg.patch_size
    if size % patch or size // patch != mask_decoder.cfg.grid_size:
      raise ValueError(f"auto masks: the prompt encoder takes {size}-px inputs, which the encoder's "
                       f"{patch}-px patches turn into a {size / patch:g}² grid, but the mask decoder "
                       f"expects {mask_decoder.cfg.grid_size}².")
    self.size = size
    self.mesh = mesh or Mesh(np.asarray(jax.devices()[:1]), ("data",))
    self._spec = PartitionSpec(tuple(self.mesh.axis_names))
    self._ndev = self.mesh.devices.size
    self._graph, state = nnx.split((encoder, prompt_encoder, mask_decoder))
    self._state = jax.tree.map(self._on_mesh, state)
    self._encode = jax.jit(self._encode_fn)
    self._decode = jax.jit(self._decode_fn)
    self._post = jax.jit(self._post_fn, static_argnums=(2, 3, 4))
    self.timings: dict[str, float] = {}
    self.counts: dict[str, int] = {}

  @classmethod
  def from_sam(cls, path: str, *, mesh: Mesh | None = None, **options) -> "AutomaticMaskGenerator":
    """From a SAM checkpoint (original `sam_vit_*.pth` or Hugging Face `SamModel`)."""
    from pixelground.checkpoints.sam import load_sam
    encoder, decoder = load_sam(path, mesh=mesh)
    return cls(encoder, decoder.prompt_encoder, decoder.mask_decoder, mesh=mesh, **options)

  def _on_mesh(self, x):
    """Weights already laid out on the mesh's devices stay as they are; others are replicated."""
    if isinstance(x, jax.Array) and x.sharding.device_set == set(self.mesh.devices.flat):
      return x
    return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

  # -- compiled programs -------------------------------------------------------------------------------
  def _shard(self, x):
    return jax.device_put(x, NamedSharding(self.mesh, self._spec))

  def _encode_fn(self, state, pixels):
    encoder, _, _ = nnx.merge(self._graph, state)
    return encoder(pixels)

  def _decode_fn(self, state, embedding, points):
    """embedding (g, g, D); points (P, 2) input-frame pixels → logits (P·3, 4g, 4g), iou (P·3,)."""
    _, prompt_encoder, mask_decoder = nnx.merge(self._graph, state)
    p = points.shape[0]
    g = embedding.shape[:2]
    sparse, dense = prompt_encoder(points[:, None, :], jnp.ones((p, 1), jnp.int32), grid=g)
    emb = jnp.broadcast_to(embedding[None], (p,) + embedding.shape)
    pe = prompt_encoder.pe.dense_pe(g).astype(prompt_encoder.dtype)
    masks, iou = mask_decoder(emb, pe, sparse, dense, multimask_output=True)
    m = masks.shape[1]
    return (masks.reshape((p * m,) + masks.shape[2:]).astype(jnp.float32),
            iou.reshape(p * m).astype(jnp.float32))

  def _post_fn(self, logits, index, input_hw, crop_hw, thresholds):
    """logits (N, 4g, 4g); index (C,) rows to take → masks (C, h, w) bool at the crop size,
    stability (C,), boxes (C, 4) xyxy crop pixels (inclusive max)."""
    mask_threshold, offset = thresholds
    x = jnp.take(logits, index, axis=0)
    x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self._spec))
    x = ops.resize_bilinear(x, (self.size, self.size))[:, : input_hw[0], : input_hw[1]]
    x = ops.resize_bilinear(x, crop_hw)
    masks = x > mask_threshold
    return masks, ops.stability_score(x, mask_threshold, offset), ops.mask_boxes(masks)

  # -- host side ----------------------------------------------------------------------------------------
  def _check_image(self, image, i: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"auto masks: image {i} must be (H, W, 3) uint8 RGB, got {image.shape} "
                       f"{image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
      raise ValueError(f"auto masks: image {i} is {image.shape[1]}×{image.shape[0]} px; the generator "
                       f"needs at least {MIN_SIDE} px per side")
    return image

  def _pixels(self, crop: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    resized = np.asarray(Image.fromarray(crop).resize((hw[1], hw[0]), Image.BILINEAR), np.float32)
    out = np.zeros((self.size, self.size, 3), np.float32)
    out[: hw[0], : hw[1]] = (resized - PIXEL_MEAN) / PIXEL_STD
    return out

  def _count(self, what: str, n: int) -> None:
    self.counts[what] = self.counts.get(what, 0) + int(n)

  def _tick(self, stage: str, start: float) -> float:
    now = time.perf_counter()
    self.timings[stage] = self.timings.get(stage, 0.0) + now - start
    return now

  def _embed(self, images: list[np.ndarray], crops: list[_Crop]) -> list[jax.Array]:
    """Encodes every crop, `ndev` per program call → one (g, g, D) embedding per crop."""
    out = []
    for start in range(0, len(crops), self._ndev):
      group = crops[start: start + self._ndev]
      batch = np.zeros((self._ndev, self.size, self.size, 3), np.float32)
      for j, c in enumerate(group):
        x0, y0, x1, y1 = c.box
        batch[j] = self._pixels(images[c.image][y0:y1, x0:x1], c.input_hw)
      emb = self._encode(self._state, self._shard(batch))
      out.extend(emb[j] for j in range(len(group)))
    return out

  def _chunk(self, crop_hw: tuple[int, int]) -> int:
    per_mask = 4 * (self.size * self.size + 2 * crop_hw[0] * crop_hw[1])
    c = max(1, min(64, POST_BUDGET // per_mask))
    return -(-c // self._ndev) * self._ndev

  def _crop_masks(self, image_hw, crop: _Crop, embedding, grid: np.ndarray) -> dict[str, tp.Any]:
    """Masks of one crop that pass the filters, after NMS within the crop (image coordinates)."""
    o = self.options
    x0, y0, x1, y1 = crop.box
    crop_hw = (y1 - y0, x1 - x0)
    points = grid * np.asarray(crop_hw[::-1], np.float64)[None]
    scale = np.asarray([crop.input_hw[1] / crop_hw[1], crop.input_hw[0] / crop_hw[0]])
    per_batch = -(-int(o.points_per_batch) // self._ndev) * self._ndev
    chunk = self._chunk(crop_hw)
    rles, boxes, ious, stabs, pts = [], [], [], [], []
    image_box = [0, 0, image_hw[1], image_hw[0]]
    for b0 in range(0, len(points), per_batch):
      t = time.perf_counter()
      batch = points[b0: b0 + per_batch]
      inp = np.zeros((per_batch, 2), np.float32)
      inp[: len(batch)] = batch * scale
      logits, iou = self._decode(self._state, embedding, self._shard(inp))
      iou = np.asarray(iou)
      t = self._tick("decoder", t)
      m = iou.shape[0] // per_batch
      valid = np.arange(iou.shape[0]) < len(batch) * m
      keep = valid & (iou > o.pred_iou_thresh if o.pred_iou_thresh > 0 else True)
      idx = np.flatnonzero(keep)
      self._count("masks", valid.sum())
      self._count("passed_iou", len(idx))
      for c0 in range(0, len(idx), chunk):
        sel = idx[c0: c0 + chunk]
        index = np.zeros(chunk, np.int32)
        index[: len(sel)] = sel
        masks, stab, box = self._post(logits, jnp.asarray(index), crop.input_hw, crop_hw,
                                      (float(o.mask_threshold), float(o.stability_score_offset)))
        stab, box = np.asarray(stab)[: len(sel)], np.asarray(box)[: len(sel)]
        t = self._tick("postprocess", t)
        ok = stab >= o.stability_score_thresh if o.stability_score_thresh > 0 else np.ones(len(sel), bool)
        self._count("passed_stability", ok.sum())
        ok &= ~ops.near_crop_edge(box, crop.box, image_box)
        self._count("passed_crop_edge", ok.sum())
        if ok.any():
          rows = np.flatnonzero(ok)
          rles.extend(ops.encode_rle(np.asarray(masks)[rows]))
          boxes.append(box[rows])
          ious.append(iou[sel[rows]])
          stabs.append(stab[rows])
          pts.append(batch[sel[rows] // m])
        t = self._tick("filter", t)
    t = time.perf_counter()
    data = _concat(rles, boxes, ious, stabs, pts)
    keep = ops.box_nms(data["boxes"], data["iou"], o.box_nms_thresh)
    data = _take(data, keep)
    self._count("kept_crop_nms", len(keep))
    offset = np.asarray([x0, y0], np.float64)
    data["boxes"] = data["boxes"] + np.asarray([x0, y0, x0, y0], data["boxes"].dtype)
    data["points"] = data["points"] + offset
    data["crop"] = np.asarray([crop.box] * len(keep), np.int64).reshape(-1, 4)
    self._tick("nms", t)
    return data

  def generate(self, image: np.ndarray) -> list[dict[str, tp.Any]]:
    """Masks of one (H, W, 3) uint8 RGB image → records (see the module docstring)."""
    return self.generate_batch([image])[0]

  def generate_batch(self, images: tp.Sequence[np.ndarray]) -> list[list[dict[str, tp.Any]]]:
    """Masks of several images in one call (their crops are encoded together) → records per image."""
    o = self.options
    self.timings, self.counts = {}, {}
    images = [self._check_image(im, i) for i, im in enumerate(images)]
    crops = []
    for i, im in enumerate(images):
      boxes, layers = ops.crop_boxes(im.shape[0], im.shape[1], int(o.crop_n_layers),
                                     float(o.crop_overlap_ratio))
      for box, layer in zip(boxes, layers):
        hw = ops.resized_shape(box[3] - box[1], box[2] - box[0], self.size)
        crops.append(_Crop(i, box, layer, hw))
    t = time.perf_counter()
    embeddings = self._embed(images, crops)
    jax.block_until_ready(embeddings)
    self._tick("encoder", t)
    grids = o.grids()
    results = []
    for i, im in enumerate(images):
      parts = [self._crop_masks(im.shape[:2], c, embeddings[k], grids[c.layer])
               for k, c in enumerate(crops) if c.image == i]
      data = _merge(parts)
      t = time.perf_counter()
      if len(parts) > 1:
        crop = data["crop"].astype(np.float32)
        area = (crop[:, 2] - crop[:, 0]) * (crop[:, 3] - crop[:, 1])
        data = _take(data, ops.box_nms(data["boxes"], np.float32(1) / area, o.crop_nms_thresh))
      self._tick("nms", t)
      t = time.perf_counter()
      masks = _full_masks(data, im.shape[:2])
      if o.min_mask_region_area > 0:
        data, masks = _remove_small_regions(data, masks, o.min_mask_region_area,
                                            max(o.box_nms_thresh, o.crop_nms_thresh))
      results.append(_records(data, masks, o.output_mode))
      self._count("returned", len(results[-1]))
      self._tick("output", t)
    return results


# -- mask data (dict of parallel arrays + a list of crop-frame RLEs) --------------------------------------
def _concat(rles, boxes, ious, stabs, pts) -> dict[str, tp.Any]:
  def cat(parts, shape, dtype):
    return np.concatenate(parts) if parts else np.zeros(shape, dtype)

  return {"rles": rles, "boxes": cat(boxes, (0, 4), np.int32), "iou": cat(ious, (0,), np.float32),
          "stability": cat(stabs, (0,), np.float32), "points": cat(pts, (0, 2), np.float64)}


def _take(data: dict[str, tp.Any], idx: np.ndarray) -> dict[str, tp.Any]:
  return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in data.items()}


def _merge(parts: list[dict[str, tp.Any]]) -> dict[str, tp.Any]:
  return {k: (sum((p[k] for p in parts), []) if k == "rles" else np.concatenate([p[k] for p in parts]))
          for k in parts[0]}


def _full_masks(data: dict[str, tp.Any], hw: tuple[int, int]) -> list[tp.Callable[[], np.ndarray]]:
  """Lazy (H, W) bool masks in image coordinates (crop masks placed at their crop box)."""
  def one(rle, crop):
    def get():
      m = ops.decode_rle(rle)
      if tuple(crop) == (0, 0, hw[1], hw[0]):
        return m
      full = np.zeros(hw, bool)
      full[crop[1]: crop[3], crop[0]: crop[2]] = m
      return full
    return get

  return [one(r, c) for r, c in zip(data["rles"], data["crop"])]


def _remove_small_regions(data, masks, min_area: int, nms_thresh: float):
  """Fills small holes and drops small islands of every mask, then NMS again preferring the masks
  that did not change (segment-anything's `postprocess_small_regions`)."""
  if not masks:
    return data, masks
  new, scores = [], []
  for get in masks:
    m, changed_holes = ops.remove_small_regions(get(), min_area, "holes")
    m, changed_islands = ops.remove_small_regions(m, min_area, "islands")
    new.append(m)
    scores.append(0.0 if changed_holes or changed_islands else 1.0)
  boxes = np.asarray(jax.device_get(ops.mask_boxes(jnp.asarray(np.stack(new)))))
  keep = ops.box_nms(boxes, np.asarray(scores, np.float32), nms_thresh)
  data = dict(data, boxes=np.where(np.asarray(scores)[:, None] == 0.0, boxes, data["boxes"]))
  data = _take(data, keep)
  return data, [(lambda m=new[i]: m) for i in keep]


def _records(data, masks, output_mode: str) -> list[dict[str, tp.Any]]:
  out = []
  for i, get in enumerate(masks):
    m = get()
    if output_mode == "binary_mask":
      seg = m
    elif output_mode == "coco_rle":
      seg = ops.encode_rle(m[None])[0]
    else:
      seg = ops.uncompressed_rle(m)
    x0, y0, x1, y1 = (int(v) for v in data["boxes"][i])
    c = [int(v) for v in data["crop"][i]]
    out.append({"segmentation": seg, "area": int(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": float(data["iou"][i]), "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability"][i]),
                "crop_box": [c[0], c[1], c[2] - c[0], c[3] - c[1]]})
  return out


def model_sam_parts(model, hint: str):
  """A PixelLLM's SAM image encoder, prompt encoder and mask decoder for the generator; a ValueError
  naming what is missing (no SAM encoder or decoder, or a decoder with detail channels) and `hint`."""
  missing = ("no SAM encoder" if model.sam_encoder is None else "no SAM mask decoder"
             if model.mask_decoder is None else "a mask decoder with detail channels, not SAM's"
             if model.mask_decoder.detail_channels else None)
  if missing:
    raise ValueError(f"automatic masks need SAM's encoder and mask decoder; this checkpoint has "
                     f"{missing}: {hint}")
  return model.sam_encoder, model.prompt_encoder, model.mask_decoder


def entity_id_map(records: list[dict[str, tp.Any]], hw: tuple[int, int], limit: int | None = None
                  ) -> np.ndarray:
  """Automatic masks → an (H, W) int64 entity id map (0 = void) for GELLA: the `limit` masks of highest
  predicted IoU, painted largest first so a smaller mask lying on a larger one stays visible; ids
  1.. in painting order, a mask left with no visible pixel takes no id."""
  order = sorted(range(len(records)), key=lambda i: -records[i]["predicted_iou"])[:limit]
  order = sorted(order, key=lambda i: -records[i]["area"])
  ids = np.zeros(hw, np.int64)
  for k, i in enumerate(order, start=1):
    seg = records[i]["segmentation"]
    m = seg if isinstance(seg, np.ndarray) else ops.decode_rle(seg)
    ids[m] = k
  present = np.unique(ids)
  present = present[present != 0]
  remap = np.zeros(len(order) + 1, np.int64)
  remap[present] = np.arange(1, len(present) + 1)
  return remap[ids]
