r"""LISA-style reasoning and referring segmentation on the PixelLLM backbone, full size: `[SEG]` in the
vocabulary (the top T5 sentinel, id 32099), its decoder state → Linear → ReLU → Linear → one prompt of
SAM's mask decoder. Loss CE + 2·BCE + 0.5·DICE; trains the mask decoder, the projection, LoRA, EVA02 and
the extractor; ReasonSeg and RefCOCO (as "Can you segment {expression} in this image?" → "It is
[SEG].") in one batch (per-example mixing, as LISA).

Full size:

    python -m pixelground.train --config=configs/lisa_t5xl.py --workdir=/ckpt/lisa_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check `python -m pixelground.compile_check --config=configs/lisa_t5xl.py
  --topology=v5e:4x4` (mesh data 2 × fsdp 8, batch 64, task mixed): 3.98 GiB per chip of 16
  (FITS), 11.7 TFLOP analytic per chip per step → 0.060 s at 100 % MFU, 0.119 s at 50 %.

CPU variant (the same recipe shrunk):

    python -m pixelground.train --config=configs/lisa_t5xl.py:runlocal --workdir=/tmp/lisa_t5xl

  Measured on 2 CPU cores (data cached): 82 s wall, 2.6 GB peak. 30 steps of batch 8 (rows of both
  tasks mixed in each batch); text CE 7.35 → 5.70, mask BCE 0.49 → 0.20; held-out `[SEG]` generated
  for 1 of 16 RefCOCO questions, gIoU 0.0 (from scratch, 30 steps).
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl", lisa=True, seg_token_id=32099), tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=5e-5, steps=20_000, warmup=500, batch_size=64))
  c.tasks = base.tasks(reason_seg=base.task("reasonseg/default"),
                       referring_seg=base.task("refcoco/refcoco_unc", weight=3.0))
  c.data.update(image_size=384, scale_range=(0.75, 1.25), max_target_len=40, max_seg=4, mixing="example",
                num_workers=8)
  c.loss.update(mask_bce_weight=2.0, mask_dice_weight=0.5)
  c.checkpoint_every = 2000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
