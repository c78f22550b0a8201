r"""PixelLLM Localized-Narratives trace stage, full size (SPEC §3 row 1).

SAM-H (frozen) + EVA02-L + FLAN-T5-XL with LoRA r32 on q/v of encoder self-, decoder self- and cross-
attention; 384 px; batch 256; 10k steps; AdamW 5e-5, warm-up 250, cosine; COCO captions 1 : LN 2
(single-task batches). Trains EVA02, the prompt extractor + projection, LoRA and the point head; SAM and
T5's base weights are frozen (no optimizer state). The published recipe starts from WebLI pretraining;
point `init_from` at a pretraining run to do the same.

Full size (pretrained files in their original formats; on every TPU VM host):

    python -m pixelground.train --config=configs/ln_t5xl.py --workdir=/ckpt/ln_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=/data/tfds --multihost

  Not trained here (no TPU, no data). Compile check (`python -m pixelground.compile_check
  --config=configs/ln_t5xl.py --topology=v5e:4x4`, mesh data 2 × fsdp 8): 6.67 GiB per chip of 16
  (FITS), 55.1 TFLOP analytic per chip per step → 0.28 s at 100 % MFU, 0.56 s at 50 %.

CPU variant (same recipe shrunk; grounded-shapes data built on first use):

    python -m pixelground.train --config=configs/ln_t5xl.py:runlocal --workdir=/tmp/ln_t5xl

  Measured on 2 CPU cores (grounded-shapes build included, ~15 s of it): 55 s wall, 2.0 GB peak.
  30 steps of batch 8, 0.10M of 0.47M parameters trained (EVA02, extractor, LoRA, point head); LN text
  CE 7.17 → 6.81; held-out (16 per task) LN point L1 0.171, nDTW 0.086, caption CIDEr 0.03. A model
  from scratch after 30 steps: it shows the recipe runs end to end, not what it learns.
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl"), tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=5e-5, steps=10_000, warmup=250, batch_size=256))
  c.tasks = base.tasks(ln=base.task("localized_narratives/coco", weight=2.0),
                       caption=base.task("coco_captions/2017", weight=1.0))
  c.data.update(image_size=384, scale_range=(1.0, 1.0), max_target_len=128, mixing="batch",
                num_workers=8)
  c.eval.tasks = ("ln", "caption")
  c.checkpoint_every = 1000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
