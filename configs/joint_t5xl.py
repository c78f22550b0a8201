r"""PixelLLM joint training, full size (SPEC §3 row 5): every PixelLLM task at once, batch 128, 240k
steps, AdamW 1e-4, wd 0.05, warm-up 2k; single-task batches sampled by weight. The published run starts
from WebLI pretraining, which is not public: set `init_from` to a web-data pretraining run.

Full size:

    python -m pixelground.train --config=configs/joint_t5xl.py --workdir=/ckpt/joint_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check `python -m pixelground.compile_check --config=configs/joint_t5xl.py
  --topology=v5e:4x4` (mesh data 2 × fsdp 8, batch 128, task ln): 4.72 GiB per chip of 16
  (FITS), 27.5 TFLOP analytic per chip per step → 0.140 s at 100 % MFU, 0.280 s at 50 %.

CPU variant (the same recipe shrunk):

    python -m pixelground.train --config=configs/joint_t5xl.py:runlocal --workdir=/tmp/joint_t5xl

  Measured on 2 CPU cores (data cached): 164 s wall (five task programs compile), 3.4 GB peak. 30
  steps of batch 8 over the five tasks; held-out LN point L1 0.175, caption CIDEr 0.02, referring
  mask gIoU 0.011, DenseCap mAP 0.009 (from scratch, 30 steps).
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl"), tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=1e-4, steps=240_000, warmup=2_000, batch_size=128,
                                                     weight_decay=0.05))
  c.model.refseg = True
  c.model.proposals = True
  c.tasks = base.tasks(
      ln=base.task("localized_narratives/coco", weight=2.0),
      caption=base.task("coco_captions/2017"),
      referring=base.task("refcoco/refcoco_unc"),
      region_caption=base.task("refcoco/refcocog_umd"),
      dense_caption=base.task("vg_densecap/default", eval_split="test"))
  c.data.update(image_size=384, scale_range=(0.75, 1.25), max_target_len=128, mixing="batch",
                num_workers=8)
  c.checkpoint_every = 5000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
