r"""LISA-style reasoning and referring segmentation on the PixelLLM backbone, full size: `[SEG]` in the
vocabulary (the top T5 sentinel, id 32099), its decoder state → Linear → ReLU → Linear → one prompt of
SAM's mask decoder. Loss CE + 2·BCE + 0.5·DICE; trains the mask decoder, the projection, LoRA, EVA02 and
the extractor; ReasonSeg and RefCOCO (as "Can you segment {expression} in this image?" → "It is
[SEG].") in one batch (per-example mixing, as LISA).

Full size:

    python -m pixelground.train --config=configs/lisa_t5xl.py --workdir=/ckpt/lisa_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check: COMPILE_EXPECT

CPU variant (the same recipe shrunk):

    python -m pixelground.train --config=configs/lisa_t5xl.py:runlocal --workdir=/tmp/lisa_t5xl

  RUNLOCAL_EXPECT
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
