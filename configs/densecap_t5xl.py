r"""PixelLLM dense captioning, full size (SPEC §3 row 4): from the trace stage (`init_from`) + the
class-agnostic proposal head (CenterNet-style heatmap + ltrb boxes on the fused map,
`pixelground.models.heads.proposals`); ground-truth regions are captioned through the extractor with
the prompt "an object of". Batch 64, 40k steps, AdamW 1e-4, wd 0.05, warm-up 1k, EVA02 layer decay
0.8; Visual Genome with scale jitter 0.1–2.0 and flips.

Full size (after configs/ln_t5xl.py wrote /ckpt/ln_t5xl):

    python -m pixelground.train --config=configs/densecap_t5xl.py --workdir=/ckpt/densecap_t5xl \
        --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check `python -m pixelground.compile_check --config=configs/densecap_t5xl.py
  --topology=v5e:4x4` (mesh data 2 × fsdp 8, batch 64, task dense_caption): 7.98 GiB per chip of 16
  (FITS), 49.9 TFLOP analytic per chip per step → 0.253 s at 100 % MFU, 0.506 s at 50 %.

CPU variant (the same recipe shrunk; dense captioning reads grounded-shapes panoptic segments, the
synthetic data has no Visual Genome files):

    python -m pixelground.train --config=configs/densecap_t5xl.py:runlocal --workdir=/tmp/densecap_t5xl

  Measured on 2 CPU cores (data cached): 71 s wall, 2.1 GB peak. 30 steps of batch 8; region CE
  6.73 → 4.72, proposal heatmap 1.42 → 0.85; held-out DenseCap mAP 0.028, detection mAP 0.165.
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl"), tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=1e-4, steps=40_000, warmup=1_000, batch_size=64,
                                                     weight_decay=0.05, layer_decay={"eva": 0.8}))
  c.model.proposals = True
  c.init_from.path = "/ckpt/ln_t5xl"
  c.tasks = base.tasks(dense_caption=base.task("vg_densecap/default", eval_split="test"))
  c.data.update(image_size=384, scale_range=(0.1, 2.0), flip=True, max_regions=16, max_region_len=40,
                mixing="batch", num_workers=8)
  c.eval.update(dense_k=100, max_decode_len=40)
  c.checkpoint_every = 5000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
