"""SAM ViT-B image-encoder forward at 1024×1024, batch 1: pixelground (jitted) vs transformers (PyTorch).

Both sides hold the same random weights: transformers builds `SamVisionModel` (its default config is
ViT-B: width 768, 12 blocks, 12 heads, window 14, global blocks 2/5/8/11, neck 256), every parameter is
randomised (HF zero-initialises position embeddings and rel-pos tables), saved with `save_pretrained`,
and loaded into ours with `load_sam_image_encoder`. Float32 on CPU, inputs NCHW for torch and NHWC for
ours (the same numbers).

Compilation is excluded (ours is compiled ahead of time; torch gets one warm-up forward). The two are
timed in interleaved rounds so that outside load hits both alike; each reports its best and median
round. The outputs are compared (max abs difference) as a correctness check.

Last line: JSON {"sam_b_speedup_vs_torch": torch_best / ours_best, ...} (target ≥ 1.2).

Run: .venv/bin/python bench/vision.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pixelground.checkpoints.sam import load_sam_image_encoder  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--size", type=int, default=1024)
  args = parser.parse_args()

  torch.manual_seed(0)
  hf = transformers.SamVisionModel(transformers.SamVisionConfig()).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.02 * torch.randn_like(p))
  n_params = sum(p.numel() for p in hf.parameters())
  log(f"transformers SamVisionModel (ViT-B): {n_params:,} parameters, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads; jax {jax.__version__} on {jax.devices()[0].platform}")

  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    encoder = load_sam_image_encoder(tmp)
  log(f"ours: {encoder.cfg}")

  pixels = np.random.default_rng(0).standard_normal((1, args.size, args.size, 3)).astype(np.float32)
  x_jax = jnp.asarray(pixels)
  x_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

  t = time.perf_counter()
  forward = jax.jit(lambda m, x: m(x)).lower(encoder, x_jax).compile()
  log(f"ours compiled in {time.perf_counter() - t:.1f}s")

  def run_ours():
    return jax.block_until_ready(forward(encoder, x_jax))

  def run_torch():
    with torch.inference_mode():
      return hf(pixel_values=x_torch).last_hidden_state

  ours_out = np.asarray(run_ours())
  ref_out = run_torch().permute(0, 2, 3, 1).numpy()
  err = float(np.abs(ours_out - ref_out).max())
  log(f"outputs {ours_out.shape}: max |ours - torch| = {err:.2e} (scale {np.abs(ref_out).max():.2f})")

  times = {"ours": [], "torch": []}
  for r in range(args.rounds):
    for name, fn in (("ours", run_ours), ("torch", run_torch)):
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    log(f"round {r + 1}/{args.rounds}: ours {times['ours'][-1]:.3f}s  torch {times['torch'][-1]:.3f}s")

  best = {k: min(v) for k, v in times.items()}
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"\n{'':8s} {'best s':>8s} {'median s':>9s}")
  for k in ("ours", "torch"):
    print(f"{k:8s} {best[k]:8.3f} {med[k]:9.3f}")
  print(json.dumps({"sam_b_speedup_vs_torch": round(best["torch"] / best["ours"], 3),
                    "ours_s": round(best["ours"], 4), "torch_s": round(best["torch"], 4),
                    "median_speedup": round(med["torch"] / med["ours"], 3),
                    "max_abs_diff": err, "size": args.size}))


if __name__ == "__main__":
  main()
