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


def disk_sam(*, image_size: int = 128, frequencies: int = 16, sigma: float = 1.0, sharpness: float = 4.0,
             levels=(0.4, 0.55, 0.7), iou_base=(0.93, 0.9, 0.87), iou_spread: float = 0.08, seed: int = 0):
  """A segment-anything `Sam` whose weights are set by hand so that a point prompt gives point-local
  masks: random weights give image-sized blobs (every box covers the image and box NMS keeps one mask),
  which exercise none of the generator's filters.

  The construction (SAM's 256-d decoder, a 64-wide one-block encoder):
    * the positional encoding uses `frequencies` random frequencies (std `sigma`, the other 128 - F are
      zero), so z(x) = [sin, cos](2π·(2x - 1)·G) over those F is a random-Fourier code of position x
      whose inner product z(p)·z(x) peaks at x = p and decays with distance (a kernel);
    * the encoder ignores the pixels (patch embedding and every block's output projection are zero):
      the image embedding is [z, -z] of each grid cell's centre, from the position table;
    * the decoder's first token self-attention copies the point token (its positional code + a label
      dimension) into every output token; every other attention / MLP output is zero;
    * the two transposed convolutions of the upscaling rotate each (sin, cos) pair by the phase of their
      sub-pixel offset, so the upscaled map holds 6 + √2·z(x) at every low-res mask pixel (6 keeps GELU
      linear; the ±z copies cancel it between the convolutions);
    * mask token m's hypernetwork writes `sharpness`·z(p) (mean removed) and a bias for the threshold
      `levels[m]` × the kernel's peak: masks are blobs around the point of three sizes;
    * the IoU head predicts `iou_base[m]` ± `iou_spread` (a sine of the point's position).
  Every parameter the construction does not use is random. Returns the model (eval mode)."""
  import math

  with torchvision_standin():
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
  g = image_size // 16
  d, f = 256, frequencies
  torch.manual_seed(seed)
  encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=64, depth=1, num_heads=2,
                            mlp_ratio=2, out_chans=d, qkv_bias=True,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                            window_size=4, global_attn_indexes=())
  prompt = PromptEncoder(embed_dim=d, image_embedding_size=(g, g), input_image_size=(image_size,) * 2,
                         mask_in_chans=16)
  decoder = MaskDecoder(num_multimask_outputs=3,
                        transformer=TwoWayTransformer(depth=2, embedding_dim=d, mlp_dim=256, num_heads=8),
                        transformer_dim=d, iou_head_depth=3, iou_head_hidden_dim=256)
  sam = Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375]).eval()
  used = list(range(f)) + list(range(128, 128 + f))  # the sin and cos dims of the F frequencies
  label = 64                                           # a sin dim of a zero frequency: free
  rng = np.random.default_rng(seed)
  gauss = np.zeros((2, 128), np.float32)
  gauss[:, :f] = sigma * rng.standard_normal((2, f))

  def code(xy):  # (..., 2) normalised (x, y) → (..., 2F) [sin, cos]
    phase = 2 * np.pi * ((2 * np.asarray(xy, np.float64) - 1) @ gauss[:, :f])
    return np.concatenate([np.sin(phase), np.cos(phase)], -1)

  def rotation(dx, dy):  # (2F, 2F): shifts the code by (dx, dy) (normalised)
    phi = 2 * np.pi * 2 * (dx * gauss[0, :f] + dy * gauss[1, :f])
    r = np.zeros((2 * f, 2 * f))
    i = np.arange(f)
    r[i, i], r[i, f + i] = np.cos(phi), np.sin(phi)          # sin(θ+φ)
    r[f + i, i], r[f + i, f + i] = -np.sin(phi), np.cos(phi)  # cos(θ+φ)
    return r

  t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
  with torch.no_grad():
    for name, p in sam.named_parameters():
      p.copy_(0.1 * torch.randn_like(p))
    for module in sam.modules():
      if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
        module.weight.fill_(1.0)
        module.bias.zero_()
    prompt.pe_layer.positional_encoding_gaussian_matrix.copy_(t(gauss))
    # encoder: embedding = [z, -z, 0] of the cell centres
    encoder.patch_embed.proj.weight.zero_()
    encoder.patch_embed.proj.bias.zero_()
    for blk in encoder.blocks:
      for lin in (blk.attn.proj, blk.mlp.lin2):
        lin.weight.zero_()
        lin.bias.zero_()
    centres = (np.arange(g) + 0.5) / g
    grid = np.stack(np.meshgrid(centres, centres, indexing="xy"), -1)  # (g, g, 2) (x, y)
    z = code(grid)
    encoder.pos_embed.copy_(t(np.concatenate([z, -z], -1)[None]))
    encoder.neck[0].weight.zero_()
    encoder.neck[0].weight[: 4 * f, : 4 * f, 0, 0] = torch.eye(4 * f)
    encoder.neck[2].weight.zero_()
    encoder.neck[2].weight[:, :, 1, 1] = torch.eye(d)
    # prompt encoder: a positive point = its code + a label dim; no dense prompt
    for emb in (*prompt.point_embeddings, prompt.not_a_point_embed, prompt.no_mask_embed):
      emb.weight.zero_()
    prompt.point_embeddings[1].weight[0, label] = 13.0
    decoder.iou_token.weight.zero_()
    decoder.mask_tokens.weight.zero_()
    # transformer: only the first self-attention writes (every token ← the point token)
    tr = decoder.transformer
    attns = [a for layer in tr.layers for a in (layer.self_attn, layer.cross_attn_token_to_image,
                                                layer.cross_attn_image_to_token)] + [tr.final_attn_token_to_image]
    for a in attns:
      a.out_proj.weight.zero_()
      a.out_proj.bias.zero_()
    for layer in tr.layers:
      layer.mlp.lin2.weight.zero_()
      layer.mlp.lin2.bias.zero_()
    first = tr.layers[0].self_attn
    head = d // 8
    first.q_proj.weight.zero_()
    first.q_proj.bias.zero_()
    first.q_proj.bias[::head] = 13.0
    first.k_proj.weight.zero_()
    first.k_proj.bias.zero_()
    first.k_proj.weight[::head, label] = 1.0
    first.v_proj.weight.copy_(torch.eye(d))
    first.v_proj.bias.zero_()
    first.out_proj.weight.copy_(torch.eye(d))
    # upscaling: rotate the code to each sub-pixel (cell 1/g; conv1 offsets ∓1/(4g), conv2 ∓1/(8g))
    up1, norm, _, up2, _ = decoder.output_upscaling
    up1.weight.zero_()
    up1.bias.zero_()
    up2.weight.zero_()
    for a in range(2):
      for b in range(2):
        r1 = rotation((2 * b - 1) / (4 * g), (2 * a - 1) / (4 * g))
        up1.weight[: 2 * f, : 2 * f, a, b] = t(r1.T)
        up1.weight[: 2 * f, 2 * f: 4 * f, a, b] = t(-r1.T)
        r2 = rotation((2 * b - 1) / (8 * g), (2 * a - 1) / (8 * g))
        up2.weight[: 2 * f, :, a, b] = t(r2.T / 2)
        up2.weight[2 * f: 4 * f, :, a, b] = t(-r2.T / 2)
    norm.bias[: 4 * f] = 6.0
    up2.bias.fill_(6.0)
    # hypernetworks: sharpness · (code of the point, mean removed) and the level's threshold
    centre = np.eye(2 * f) - 1.0 / (2 * f)
    peak = math.sqrt(2) * 2 * f * sharpness  # ≈ the logit at the point before the threshold
    for m, mlp in enumerate(decoder.output_hypernetworks_mlps):
      l0, l1, l2 = mlp.layers
      for lin in (l0, l1, l2):
        lin.weight.zero_()
        lin.bias.zero_()
      l0.weight[: 2 * f, used] = t(centre)
      l0.weight[2 * f: 4 * f, used] = t(-centre)
      l1.weight[: 4 * f, : 4 * f] = torch.eye(4 * f)
      l2.weight[:, : 2 * f] = sharpness * torch.eye(2 * f)
      l2.weight[:, 2 * f: 4 * f] = -sharpness * torch.eye(2 * f)
      level = levels[max(m - 1, 0)] * 0.5  # the kernel's peak is about half the code's norm²
      l2.bias.fill_(-level * peak / (6 * 2 * f))
    # IoU head: iou_base[m] ± iou_spread·sin(phase of the first frequency)
    l0, l1, l2 = decoder.iou_prediction_head.layers
    for lin in (l0, l1, l2):
      lin.weight.zero_()
      lin.bias.zero_()
    l0.weight[0, used[0]], l0.weight[1, used[0]] = 1.0, -1.0
    l1.weight[0, 0], l1.weight[1, 1] = 1.0, 1.0
    l2.weight[1:, 0], l2.weight[1:, 1] = iou_spread, -iou_spread
    l2.bias.copy_(t([0.5, *iou_base]))
  return sam
