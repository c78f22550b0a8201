"""Automatic mask generation: pixelground's `AutomaticMaskGenerator` vs segment-anything's
`SamAutomaticMaskGenerator`, same weights, same image, same run.

SAM-B-sized model (ViT-B encoder 768 wide, 12 blocks, global blocks 2/5/8/11, window 14; 256-d prompt
encoder and mask decoder) with random weights (`tests/sam_reference.build_sam`), saved in
segment-anything's layout and loaded into ours through `load_sam`. One 1024×1024 synthetic image of
shapes; segment-anything's default options (32×32 points, 64 per batch, predicted-IoU 0.88, stability
0.95, box NMS 0.7). Random weights give masks that are random blobs, so `--hyper_scale` (default 8)
multiplies the hypernetworks' last layer to give sharper, SAM-like logits and non-trivial stability
scores; `--iou_bias` (default 0.25) is added to the IoU head's output bias so that a part of the masks
passes the 0.88 threshold as with a trained SAM. Both sides see the same modified weights.

Per-stage times: encoder (image → embedding), decoder (prompt encoder + mask decoder over the point
batches), postprocess (low-res → full-size logits, stability, binarisation, boxes; for
segment-anything: `postprocess_masks` plus the rest of its batch processing), NMS, and the rest. Each
side runs `--rounds` times (ours after one warm-up run that compiles); the best total is reported.

    .venv/bin/python bench/amg.py [--rounds 2] [--points_per_side 32] [--iou_bias 0.25] [--hyper_scale 8]

Last line: JSON with `speedup_vs_torch` = torch best total / ours best total (target ≥ 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sam_reference as ref  # noqa: E402

SAM_B = dict(image_size=1024, width=768, depth=12, heads=12, global_blocks=(2, 5, 8, 11), window=14,
             prompt_dim=256, decoder_heads=8, decoder_mlp=2048)


def shapes_image(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
  """(H, W, 3) uint8: n rectangles / ellipses of random colours and sizes on a random background."""
  image = np.empty((h, w, 3), np.uint8)
  image[:] = rng.integers(0, 256, 3)
  ys, xs = np.mgrid[:h, :w]
  for _ in range(n):
    sh, sw = rng.integers(h // 10, h // 3), rng.integers(w // 10, w // 3)
    y0, x0 = rng.integers(0, h - sh), rng.integers(0, w - sw)
    if rng.random() < 0.5:
      inside = (ys >= y0) & (ys < y0 + sh) & (xs >= x0) & (xs < x0 + sw)
    else:
      inside = ((ys - y0 - sh / 2) / (sh / 2)) ** 2 + ((xs - x0 - sw / 2) / (sw / 2)) ** 2 <= 1
    image[inside] = rng.integers(0, 256, 3)
  return image


class Timer:
  def __init__(self):
    self.t: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, stage):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.t[stage] = self.t.get(stage, 0.0) + time.perf_counter() - start

  def wrap(self, obj, name, stage):
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
      with self(stage):
        return fn(*args, **kwargs)
    setattr(obj, name, timed)


def torch_generator(sam, timer: Timer, **options):
  """segment-anything's generator with its stages timed (encoder, decoder, upsampling, NMS)."""
  import segment_anything.automatic_mask_generator as amg_mod
  gen = ref.generator(sam, **options)
  timer.wrap(gen.predictor, "set_image", "encoder")
  timer.wrap(sam.mask_decoder, "forward", "decoder")
  timer.wrap(sam.prompt_encoder, "forward", "decoder")
  timer.wrap(sam, "postprocess_masks", "postprocess")
  if not getattr(amg_mod, "_timed", False):
    nms = amg_mod.batched_nms

    def timed_nms(*args, **kwargs):
      with timer("nms"):
        return nms(*args, **kwargs)
    amg_mod.batched_nms, amg_mod._timed = timed_nms, True
  return gen


def _keep(results: dict, side: str, r: int, total: float, timings: dict[str, float]) -> None:
  """Stores one round's (total, stages incl. the untimed rest) and prints it."""
  stages = dict(timings)
  stages["rest"] = total - sum(stages.values())
  results[side].append((total, stages))
  print(f"round {r}: {side:5s} {total:.2f} s {json.dumps({k: round(v, 2) for k, v in stages.items()})}",
        flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--points_per_side", type=int, default=32)
  parser.add_argument("--hyper_scale", type=float, default=8.0)
  parser.add_argument("--iou_bias", type=float, default=0.25)
  args = parser.parse_args()

  from pixelground.checkpoints.sam import load_sam
  from pixelground.inference.auto_masks import AutomaticMaskGenerator

  sam = ref.build_sam(**SAM_B, seed=0)
  with torch.no_grad():
    for mlp in sam.mask_decoder.output_hypernetworks_mlps:
      mlp.layers[-1].weight.mul_(args.hyper_scale)
      mlp.layers[-1].bias.mul_(args.hyper_scale)
    sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(args.iou_bias)
  image = shapes_image(np.random.default_rng(0), 1024, 1024, 12)
  options = dict(points_per_side=args.points_per_side)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "sam_vit_b_random.pth")
    torch.save(sam.state_dict(), path)
    encoder, decoder = load_sam(path)
  ours = AutomaticMaskGenerator(encoder, decoder.prompt_encoder, decoder.mask_decoder, **options)
  print(f"SAM-B random weights, {image.shape[1]}×{image.shape[0]} image, {args.points_per_side}² points, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
  t = time.perf_counter()
  mine = ours.generate(image)
  print(f"ours: warm-up (compiles) {time.perf_counter() - t:.1f} s", flush=True)

  results = {"ours": [], "torch": []}
  for r in range(args.rounds):
    timer = Timer()
    gen = torch_generator(sam, timer, **options)
    t = time.perf_counter()
    with torch.inference_mode():
      theirs = gen.generate(image)
    _keep(results, "torch", r, time.perf_counter() - t, timer.t)
    t = time.perf_counter()
    mine = ours.generate(image)
    _keep(results, "ours", r, time.perf_counter() - t, ours.timings)

  best = {k: min(v, key=lambda x: x[0]) for k, v in results.items()}
  ious = []
  for a in mine:
    m = a["segmentation"]
    ious.append(max(((m & b["segmentation"]).sum() / max(1, (m | b["segmentation"]).sum())
                     for b in theirs), default=0.0))
  print(f"masks: ours {len(mine)}, segment-anything {len(theirs)}; worst best-match IoU "
        f"{min(ious, default=1.0):.4f}; ours' filter counts {ours.counts}")
  print("| stage | ours (s) | segment-anything (s) |\n|---|---|---|")
  for stage in ("encoder", "decoder", "postprocess", "filter", "nms", "output", "rest"):
    print(f"| {stage} | {best['ours'][1].get(stage, 0.0):.2f} | "
          f"{best['torch'][1].get(stage, 0.0) if stage in best['torch'][1] else '—'} |")
  print(f"| total | {best['ours'][0]:.2f} | {best['torch'][0]:.2f} |")
  summary = {"ours_s": round(best["ours"][0], 3), "torch_s": round(best["torch"][0], 3),
             "speedup_vs_torch": round(best["torch"][0] / best["ours"][0], 3),
             "masks_ours": len(mine), "masks_torch": len(theirs), "filter_counts": ours.counts,
             "ours_stages_s": {k: round(v, 3) for k, v in best["ours"][1].items()},
             "torch_stages_s": {k: round(v, 3) for k, v in best["torch"][1].items()}}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
