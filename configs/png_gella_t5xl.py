r"""GELLA panoptic narrative grounding on the PixelLLM backbone, full size (SPEC §1.10): the narrative
is the prompt, T5 writes its noun phrases each followed by `[SEG]` (the top T5 sentinel, id 32099);
the phrase's `[SEG]` state is associated with the entities (ground-truth panoptic segments in
training; SAM automatic masks, ground truth or a user's id map at test time), painted as a colormap.

Sizes (ours; the paper gives the structure only): image 384 px (EVA02-L/14 → 27×27 grid, SAM-H frozen),
colormap 448 px (Swin-Tiny: 112/56/28/14 maps, windows of 7 tile them exactly; 448 > 384 so the
colormap keeps boundaries the 27×27 image grid cannot), ResoBlend / entity decoder width 256, 8 heads,
3 decoder layers, association 256 wide; FLAN-T5-XL + LoRA r32. Up to 32 entities and 16 noun phrases
per image (PNG val: 11 phrases, 12 segments per image on average), narratives ≤ 96 prompt tokens.
Loss: text CE + association BCE + 2·entity BCE + 0.5·entity DICE. Trains EVA02, the extractor, LoRA
and every GELLA part.

Full size:

    python -m pixelground.train --config=configs/png_gella_t5xl.py --workdir=/ckpt/png_gella_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check `python -m pixelground.compile_check --config=configs/png_gella_t5xl.py
  --topology=v5e:4x4` (mesh data 2 × fsdp 8, batch 64, task png): 6.27 GiB per chip of 16 (FITS).

  Evaluate (PNG average recall, things / stuff / singular / plural, Acc@0.5):

    python -m pixelground.evaluate --workdir=/ckpt/png_gella_t5xl

CPU variant (the same recipe shrunk, grounded-shapes PNG):

    python -m pixelground.train --config=configs/png_gella_t5xl.py:runlocal --workdir=/tmp/png_gella

  Measured on 2 CPU cores (data cached): 97 s wall. 30 steps of batch 8; text CE 7.16 → 6.23,
  association BCE 0.70 → 0.57, entity BCE 1.06 → 0.43; held-out PNG AR 0.24 (things 0.17, stuff 0.35)
  over 75 phrases of 16 narratives (from scratch, 30 steps).
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl", gella=True, seg_token_id=32099),
                  tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=1e-4, steps=20_000, warmup=500, batch_size=64))
  c.tasks = base.tasks(png=base.task("panoptic_narrative_grounding/2017",
                                     converter="narrative_grounding"))
  c.data.update(image_size=384, scale_range=(0.75, 1.25), max_prompt_len=96, max_target_len=80,
                max_seg=16, max_entities=32, num_workers=8)
  c.loss.update(assoc_weight=1.0, entity_bce_weight=2.0, entity_dice_weight=0.5)
  c.checkpoint_every = 2000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
