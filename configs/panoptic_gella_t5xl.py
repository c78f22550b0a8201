r"""GELLA panoptic segmentation on the PixelLLM backbone, full size (SPEC §1.10, §2 last row): the
prompt lists the 133 COCO panoptic category names (shuffled in training), T5 writes "name `[SEG]`" per
entity, walking the list in its order (a category as often as it has entities), each entity (ground-truth segments in training; SAM automatic masks or a
user's id map at test time) takes the category of its best-associated `[SEG]`.

Sizes: as configs/png_gella_t5xl.py (image 384, colormap 448 through Swin-Tiny, width 256), with the
category list as prompt (≤ 512 T5 tokens) and up to 32 entities / 32 `[SEG]`s per image (COCO val2017:
11 segments per image on average). Loss: text CE + association BCE + 2·entity BCE + 0.5·entity DICE.

Full size:

    python -m pixelground.train --config=configs/panoptic_gella_t5xl.py \
        --workdir=/ckpt/panoptic_gella_t5xl --config.init_from.path=/ckpt/png_gella_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check `python -m pixelground.compile_check
  --config=configs/panoptic_gella_t5xl.py --topology=v5e:4x4` (mesh data 2 × fsdp 8, batch 64, task
  panoptic): 6.67 GiB per chip of 16 (FITS), 25.8 TFLOP analytic per chip per step (the 512-token
  category prompt makes the T5 encoder the largest part, 10.9) → 0.131 s at 100 % MFU, 0.262 s at 50 %.

  Evaluate (PQ / SQ / RQ overall / things / stuff; predictions as COCO panoptic):

    python -m pixelground.evaluate --workdir=/ckpt/panoptic_gella_t5xl

CPU variant (the same recipe shrunk, grounded-shapes panoptic):

    python -m pixelground.train --config=configs/panoptic_gella_t5xl.py:runlocal --workdir=/tmp/panoptic_gella

  Measured on 2 CPU cores (data cached): 96 s wall. 30 steps of batch 8; text CE 7.06 → 5.19,
  association BCE 0.90 → 0.56; held-out PQ 0.0 over 16 images (from scratch, 30 steps: the generated
  lists do not name the images' categories yet).
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl", gella=True, seg_token_id=32099),
                  tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=1e-4, steps=20_000, warmup=500, batch_size=64))
  c.tasks = base.tasks(panoptic=base.task("coco_panoptic/2017"))
  c.data.update(image_size=384, scale_range=(0.75, 1.25), max_prompt_len=512, max_target_len=128,
                max_seg=32, max_entities=32, num_workers=8)
  c.loss.update(assoc_weight=1.0, entity_bce_weight=2.0, entity_dice_weight=0.5)
  c.init_from.path = "/ckpt/png_gella_t5xl"
  c.checkpoint_every = 2000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
