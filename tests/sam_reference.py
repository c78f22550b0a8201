"""segment-anything 1.0 as the reference for the automatic mask generator (test and `bench/amg.py`).

segment-anything imports two torchvision modules: `torchvision.ops.boxes` (`batched_nms`, `box_area`,
used by the automatic mask generator) and `torchvision.transforms.functional` (`resize`,
`to_pil_image`, used to resize the input image). torchvision cannot be installed here without pulling a
CUDA build of torch (SPEC.md section 9), so `torchvision_standin()` registers those four functions,
written from torchvision's documented behaviour, for the duration of a `with` block (a real torchvision
install is used instead when present):
  * `batched_nms(boxes, scores, idxs, iou_threshold)`: boxes of different `idxs` never suppress each
    other; within a category greedy NMS by decreasing score (a stable sort, as torchvision's CPU kernel);
    box j is dropped when IoU(i, j) > iou_threshold with a kept i; areas (x1 - x0)·(y1 - y0); returns
    kept indices by decreasing score;
  * `box_area(boxes)`: (x1 - x0)·(y1 - y0) in the boxes' dtype;
  * `resize(pil_image, (h, w))`: PIL's bilinear resize (what torchvision does for a PIL image);
  * `to_pil_image(hwc_uint8)`: `PIL.Image.fromarray`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import numpy as np
import torch


def _batched_nms(boxes, scores, idxs, iou_threshold):
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.int64)
  offsets = idxs.to(boxes) * (boxes.max() + 1)
  b = boxes + offsets[:, None]
  order = torch.sort(scores, descending=True, stable=True).indices
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  suppressed = torch.zeros(len(b), dtype=torch.bool)
  keep = []
  for i in order.tolist():
    if suppressed[i]:
      continue
    keep.append(i)
    w = (torch.minimum(b[i, 2], b[:, 2]) - torch.maximum(b[i, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(b[i, 3], b[:, 3]) - torch.maximum(b[i, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    suppressed |= inter / (area[i] + area - inter) > iou_threshold
  return torch.tensor(keep, dtype=torch.int64)


def _box_area(boxes):
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _resize(img, size, *args, **kwargs):
  from PIL import Image
  return img.resize((int(size[1]), int(size[0])), Image.BILINEAR)


def _to_pil_image(pic, mode=None):
  from PIL import Image
  return Image.fromarray(np.asarray(pic), mode)


@contextlib.contextmanager
def torchvision_standin():
  """Inside the block `import segment_anything` works (with torchvision or the stand-in above)."""
  try:
    importlib.import_module("torchvision")
    yield
    return
  except ImportError:
    pass
  names = {"torchvision": {}, "torchvision.ops": {}, "torchvision.transforms": {},
           "torchvision.ops.boxes": {"batched_nms": _batched_nms, "box_area": _box_area},
           "torchvision.transforms.functional": {"resize": _resize, "to_pil_image": _to_pil_image}}
  saved = {n: sys.modules.get(n) for n in names}
  for name, attrs in names.items():
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
  try:
    yield
  finally:
    for name, old in saved.items():
      if old is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = old


def build_sam(*, image_size: int, width: int, depth: int, heads: int, global_blocks, window: int,
              prompt_dim: int, decoder_heads: int = 8, decoder_mlp: int = 2048, seed: int = 0,
              weight_scale: float = 1.0):
  """A segment-anything `Sam` (eval mode) of the given size with every parameter random (the library
  zero-initialises biases, position tables and relative-position tables). Returns the model."""
  with torchvision_standin():
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
  torch.manual_seed(seed)
  grid = image_size // 16
  encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=width, depth=depth,
                            num_heads=heads, mlp_ratio=4, out_chans=prompt_dim, qkv_bias=True,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                            use_rel_pos=True, window_size=window, global_attn_indexes=tuple(global_blocks))
  prompt = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                         input_image_size=(image_size, image_size), mask_in_chans=16)
  decoder = MaskDecoder(num_multimask_outputs=3,
                        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim,
                                                      mlp_dim=decoder_mlp, num_heads=decoder_heads),
                        transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256)
  sam = Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375]).eval()
  with torch.no_grad():
    for name, p in sam.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias") or "pos" in name:
        p.copy_(0.02 * torch.randn_like(p))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(weight_scale * torch.randn_like(p) / fan_in ** 0.5)
  return sam


def generator(sam, **options):
  """segment-anything's `SamAutomaticMaskGenerator` over `sam`."""
  with torchvision_standin():
    from segment_anything import SamAutomaticMaskGenerator
  return SamAutomaticMaskGenerator(sam, **options)
