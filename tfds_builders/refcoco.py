"""RefCOCO / RefCOCO+ / RefCOCOg (SPEC.md section 5.4) as a TensorFlow-free TFDS builder.

One example per referred object ("ref"): a ref is one annotated object of one image with all the
referring expressions written for it (a RefCOCO ref has about three, RefCOCOg about two). The image is
stored again with every ref of it. Keys are the ref ids.

  image                  the image (uint8, (height, width, 3)), the original JPEG bytes
  image/id, image/width, image/height   COCO image id; image size in pixels
  ref_id, ann_id, category_id           the ref, its COCO instance annotation, its COCO category
  sentences              the expressions (the refer `sent` field: lower-cased, tokens joined by spaces)
  raw_sentences          the same expressions as written (`raw`), same order; both with surrounding
                         whitespace stripped and UTF-8 that Python 2 pickled as bytes decoded (`fix_text`)
  sent_ids               their sentence ids, same order
  box                    `tfds.features.BBox`: normalised to the image size, [ymin, xmin, ymax, xmax]
  box_xyxy               float32 [xmin, ymin, xmax, ymax] in pixels
  mask                   uint8 (height, width, 1), 1 on the object, 0 elsewhere (stored as PNG)

Both boxes come from the instance annotation's `bbox` (xywh, pixels), clipped to the image. The mask
is the annotation's segmentation (polygons or RLE, compressed or not) rasterised with pycocotools.

Configs (`{dataset}/refs({split_by}).p` and `{dataset}/instances.json` under manual_dir):
`refcoco_unc`, `refcocoplus_unc` (train/val/testA/testB), `refcoco_google`, `refcocog_umd`
(train/val/test), `refcocog_google` (train/val); images `images/train2014/COCO_train2014_{id:012d}.jpg`.
`grounded_shapes`: `grounded_shapes/refs(unc).p` and `grounded_shapes/instances.json`, refs split
"val" is the split `validation`, images `images/{split}/{id:012d}.jpg`.

Bad refs are skipped and counted (`common.skipped_counts`): a ref lacking a required field
("malformed_json"), a repeated ref id ("duplicate_id"), an `ann_id` not in instances.json
("missing_annotation") or annotating another image ("annotation_image_mismatch"), a NaN or zero-area
box ("nan_coordinate" / "zero_area_box"), no non-empty sentence ("empty_caption"; single empty
sentences of an otherwise good ref are dropped and counted as "empty_sentence"), a missing or
undecodable image ("missing_image" / "corrupt_image"), and a segmentation that is unusable
("bad_segmentation"), sized for another image ("mask_size_mismatch") or empty ("empty_mask").
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import typing as tp

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common



@dataclasses.dataclass(eq=False)
class RefCocoConfig(tfds.core.BuilderConfig):
  """`dataset`: the folder holding the refs and instances; `split_by`: the refs file's variant;
  `splits`: (TFDS split, the refs' `split` value); `coco_images`: COCO train2014 file names (else
  grounded shapes' `images/{split}/{id:012d}.jpg`)."""
  dataset: str = "refcoco"
  split_by: str = "unc"
  splits: tuple[tuple[str, str], ...] = ()
  coco_images: bool = True


def _same(*names: str) -> tuple[tuple[str, str], ...]:
  return tuple((n, n) for n in names)


_CONFIGS = [
    RefCocoConfig(name="refcoco_unc", dataset="refcoco", split_by="unc",
                  splits=_same("train", "val", "testA", "testB"),
                  description="RefCOCO, UNC splits (Yu et al. 2016): testA people, testB other objects."),
    RefCocoConfig(name="refcoco_google", dataset="refcoco", split_by="google",
                  splits=_same("train", "val", "test"), description="RefCOCO, Google splits."),
    RefCocoConfig(name="refcocoplus_unc", dataset="refcoco+", split_by="unc",
                  splits=_same("train", "val", "testA", "testB"),
                  description="RefCOCO+ (no location words), UNC splits."),
    RefCocoConfig(name="refcocog_umd", dataset="refcocog", split_by="umd",
                  splits=_same("train", "val", "test"),
                  description="RefCOCOg, UMD splits (Nagaraja et al. 2016)."),
    RefCocoConfig(name="refcocog_google", dataset="refcocog", split_by="google",
                  splits=_same("train", "val"), description="RefCOCOg, Google splits (Mao et al. 2016)."),
    RefCocoConfig(name="grounded_shapes", dataset="grounded_shapes", split_by="unc",
                  splits=(("train", "train"), ("validation", "val"), ("test", "test")),
                  coco_images=False, description="Grounded-shapes refs in the refer format."),
]


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Loads only plain data (lists, dicts, strings, numbers): any class or function is refused, so a
  pickle cannot run code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs files hold only plain data")


def load_refs(path) -> list:
  """The refs list of a refer-format Python 2 pickle (byte strings read as latin-1)."""
  try:
    with open(path, "rb") as f:
      refs = _NoGlobalsUnpickler(f, encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"refs file {path} is not a plain-data pickle: {e}") from None
  if not isinstance(refs, list):
    raise ValueError(f"refs file {path}: expected a list of refs, got {type(refs).__name__}")
  return refs


def fix_text(text: str) -> str:
  """Undoes latin-1 decoding of a Python 2 byte string that held UTF-8 (text already decoded right, such
  as a pickled `unicode`, is returned as it is), and strips surrounding whitespace."""
  try:
    text = text.encode("latin1").decode("utf-8")
  except (UnicodeEncodeError, UnicodeDecodeError):
    pass
  return text.strip()


def decode_segmentation(segm: tp.Any, height: int, width: int) -> tuple[np.ndarray | None, str | None]:
  """COCO segmentation -> (uint8 (height, width) mask of 0/1, None), or (None, skip kind).

  `segm` is a list of polygons (flat [x0, y0, x1, y1, ...] lists in pixels) or an RLE dict
  `{size: [height, width], counts}` with `counts` a compressed string or an uncompressed list.
  """
  from pycocotools import mask as mask_utils

  if isinstance(segm, list):
    polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    if not polys:
      return None, "bad_segmentation"
    try:
      polys = [[float(v) for v in p] for p in polys]
    except (TypeError, ValueError):
      return None, "bad_segmentation"
    if not common.finite(*(v for p in polys for v in p)):
      return None, "nan_coordinate"
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
  elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
    if list(segm["size"]) != [height, width]:
      return None, "mask_size_mismatch"
    counts = segm["counts"]
    if isinstance(counts, list):
      rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(counts, (str, bytes)):
      rle = {"size": [height, width], "counts": counts}
    else:
      return None, "bad_segmentation"
  else:
    return None, "bad_segmentation"
  try:
    mask = mask_utils.decode(rle)
  except (ValueError, TypeError) as e:
    del e
    return None, "bad_segmentation"
  return np.ascontiguousarray(mask, dtype=np.uint8), None


def png_bytes(mask: np.ndarray) -> bytes:
  """A (height, width) uint8 mask as single-channel PNG bytes."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(mask, mode="L").save(buf, format="PNG")
  return buf.getvalue()


_REF_FIELDS = {"ref_id": int, "ann_id": int, "image_id": int, "split": str, "sentences": list}


class RefCoco(common.Builder):
  """RefCOCO, RefCOCO+ and RefCOCOg referring expressions, one example per ref (see the module
  docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = _CONFIGS
  HOMEPAGE = "https://github.com/lichengunc/refer"
  DESCRIPTION = ("Referring expressions for objects of COCO train2014 images: RefCOCO and RefCOCO+ "
                 "(Kazemzadeh et al., 2014; Yu et al., 2016) and RefCOCOg (Mao et al., 2016). One "
                 "example per referred object with its expressions, box and mask.")
  CITATION = r"""@inproceedings{kazemzadeh2014referitgame,
  title={{ReferItGame}: Referring to Objects in Photographs of Natural Scenes},
  author={Kazemzadeh, Sahar and Ordonez, Vicente and Matten, Mark and Berg, Tamara L.},
  booktitle={Proceedings of the 2014 Conference on Empirical Methods in Natural Language Processing
             (EMNLP)},
  pages={787--798},
  year={2014}
}
@inproceedings{mao2016generation,
  title={Generation and Comprehension of Unambiguous Object Descriptions},
  author={Mao, Junhua and Huang, Jonathan and Toshev, Alexander and Camburu, Oana and Yuille, Alan L.
          and Murphy, Kevin},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={11--20},
  year={2016}
}
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.},
  booktitle={European Conference on Computer Vision (ECCV)},
  pages={69--85},
  year={2016}
}
@inproceedings{nagaraja2016modeling,
  title={Modeling Context Between Objects for Referring Expression Understanding},
  author={Nagaraja, Varun K. and Morariu, Vlad I. and Davis, Larry S.},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2016}
}
""" + common.COCO_CITATION
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Nothing is downloaded. Put under manual_dir:
  refcoco/refs(unc).p, refcoco/refs(google).p, refcoco/instances.json,
  refcoco+/refs(unc).p, refcoco+/instances.json,
  refcocog/refs(umd).p, refcocog/refs(google).p, refcocog/instances.json
    (the refer toolkit's data: refcoco.zip, refcoco+.zip, refcocog.zip, linked from
    https://github.com/lichengunc/refer; only the files of the configs you build are needed),
  images/train2014/COCO_train2014_{image_id:012d}.jpg (train2014.zip from https://cocodataset.org).
  config grounded_shapes: grounded_shapes/refs(unc).p, grounded_shapes/instances.json and
    images/{train,validation,test}/{image_id:012d}.jpg, as `python -m tfds_builders.grounded_shapes
    --out DIR` writes them (manual_dir=DIR).
"""

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/id": np.int64,
        "image/width": np.int64,
        "image/height": np.int64,
        "ref_id": np.int64,
        "ann_id": np.int64,
        "category_id": np.int64,
        "sentences": tfds.features.Sequence(tfds.features.Text()),
        "raw_sentences": tfds.features.Sequence(tfds.features.Text()),
        "sent_ids": tfds.features.Sequence(np.int64),
        "box": tfds.features.BBoxFeature(),
        "box_xyxy": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
    })

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    refs_path = self.manual_file(dl_manager, f"{cfg.dataset}/refs({cfg.split_by}).p",
                                 f"{cfg.dataset} refs file")
    inst_path = self.manual_file(dl_manager, f"{cfg.dataset}/instances.json",
                                 f"{cfg.dataset} instances file")
    refs = load_refs(refs_path)
    instances = common.load_json(inst_path, "instances file")
    if not (isinstance(instances, dict) and isinstance(instances.get("annotations"), list)):
      raise ValueError(f"instances file {inst_path}: expected a JSON object with an 'annotations' list")
    anns = {a["id"]: a for a in instances["annotations"] if isinstance(a, dict) and "id" in a}

    by_split: dict[str, list[tuple[int, dict]]] = {s: [] for s, _ in cfg.splits}
    tfds_split = {raw: s for s, raw in cfg.splits}
    left_out = collections.Counter()  # refs of no split this config builds, by their `split` value
    for i, ref in enumerate(refs):
      raw = ref.get("split") if isinstance(ref, dict) else None
      if isinstance(raw, str) and raw in tfds_split:
        by_split[tfds_split[raw]].append((i, ref))
      else:
        left_out[repr(raw)] += 1
    if left_out:
      common.log.warning("%s/%s: refs left out, their split is not one of %s: %s", self.name, cfg.name,
                         [raw for _, raw in cfg.splits], dict(left_out))
    splits = [s for s, _ in cfg.splits if by_split[s]]  # splits with refs (users may hold a subset)
    if not splits:
      raise ValueError(f"{refs_path}: no refs of the splits {[raw for _, raw in cfg.splits]}")
    if cfg.coco_images:
      image_dirs = {s: self.manual_file(dl_manager, "images/train2014", "COCO train2014 image folder")
                    for s in splits}
    else:
      image_dirs = {s: self.manual_file(dl_manager, f"images/{s}", f"{s} image folder") for s in splits}
    return {s: self.counted(s, self._generate_examples(s, by_split[s], anns, image_dirs[s]))
            for s in splits}

  def _image_path(self, image_dir, split: str, image_id: int) -> str:
    if self.builder_config.coco_images:
      return os.path.join(str(image_dir), f"COCO_train2014_{image_id:012d}.jpg")
    return os.path.join(str(image_dir), f"{image_id:012d}.jpg")

  def _generate_examples(self, split: str, refs: list[tuple[int, dict]], anns: dict, image_dir):
    images: dict[int, tuple] = {}  # image id -> image_from_file(path): each image decoded once
    seen: set[int] = set()
    for i, ref in refs:  # in file order: of a repeated ref id, the first is kept
      where = f"refs[{i}]"
      bad = [k for k, t in _REF_FIELDS.items() if not isinstance(ref.get(k), t)]
      if bad:
        self.skip(split, "malformed_json", where, f"missing or mistyped fields {bad}")
        continue
      ref_id, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
      where = f"ref {ref_id}"
      if ref_id in seen:
        self.skip(split, "duplicate_id", where, "ref id repeated")
        continue
      seen.add(ref_id)

      sentences = self._sentences(split, where, ref)
      if sentences is None:
        continue

      ann = anns.get(ann_id)
      if ann is None:
        self.skip(split, "missing_annotation", where, f"ann_id {ann_id} is not in instances.json")
        continue
      if ann.get("image_id") != image_id:
        self.skip(split, "annotation_image_mismatch", where,
                  f"annotation {ann_id} is of image {ann.get('image_id')}, the ref of image {image_id}")
        continue
      bbox = ann.get("bbox")
      if not (isinstance(bbox, list) and len(bbox) == 4 and "segmentation" in ann
              and all(isinstance(v, (int, float)) for v in bbox)
              and isinstance(ann.get("category_id"), int)):
        self.skip(split, "malformed_json", where,
                  f"annotation {ann_id} lacks a bbox, segmentation or category_id")
        continue
      kind = common.box_ok(*bbox)
      if kind is not None:
        self.skip(split, kind, where, f"annotation {ann_id} bbox {bbox}")
        continue

      if image_id not in images:
        images[image_id] = common.image_from_file(self._image_path(image_dir, split, image_id))
      image, size, kind = images[image_id]
      if kind is not None:
        self.skip(split, kind, where, self._image_path(image_dir, split, image_id))
        continue
      width, height = size

      x, y, w, h = (float(v) for v in bbox)
      x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
      x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
      if x1 <= x0 or y1 <= y0:
        self.skip(split, "zero_area_box", where, f"annotation {ann_id} bbox {bbox} is outside the image")
        continue

      mask, kind = decode_segmentation(ann["segmentation"], height, width)
      if kind is None and not mask.any():
        kind = "empty_mask"
      if kind is not None:
        self.skip(split, kind, where, f"annotation {ann_id} segmentation")
        continue

      yield ref_id, {
          "image": image,
          "image/id": image_id,
          "image/width": width,
          "image/height": height,
          "ref_id": ref_id,
          "ann_id": ann_id,
          "category_id": ann["category_id"],
          "sentences": [s[1] for s in sentences],
          "raw_sentences": [s[2] for s in sentences],
          "sent_ids": [s[0] for s in sentences],
          "box": tfds.features.BBox(ymin=y0 / height, xmin=x0 / width, ymax=y1 / height,
                                    xmax=x1 / width),
          "box_xyxy": np.array([x0, y0, x1, y1], np.float32),
          "mask": png_bytes(mask),
      }

  def _sentences(self, split: str, where: str, ref: dict) -> list[tuple[int, str, str]] | None:
    """[(sent_id, sent, raw)] of the ref's non-empty sentences (`fix_text`), or None, counted, when there
    is none or one is malformed."""
    sent_ids = ref.get("sent_ids") if isinstance(ref.get("sent_ids"), list) else []
    out, empty = [], []
    for j, s in enumerate(ref["sentences"]):
      s = s if isinstance(s, dict) else {}
      sid = s.get("sent_id", sent_ids[j] if j < len(sent_ids) else None)
      text = s.get("sent", s.get("raw"))
      raw = s.get("raw", text)
      if not (isinstance(sid, int) and isinstance(text, str) and isinstance(raw, str)):
        self.skip(split, "malformed_json", where, f"sentence {j} lacks a sent_id or text")
        return None
      text, raw = fix_text(text), fix_text(raw)
      if text:
        out.append((sid, text, raw))
      else:
        empty.append(sid)
    if not out:
      self.skip(split, "empty_caption", where, "no non-empty sentence")
      return None
    for sid in empty:
      self.skip(split, "empty_sentence", where, f"sentence {sid}")
    return out
