r"""PixelLLM referring localisation, full size (SPEC §3 row 2): from the trace stage (`init_from`), batch
64, 120k steps, AdamW 5e-5, warm-up 1k; RefCOCO, RefCOCO+ and RefCOCOg (UMD) in single-task batches.
Encoder text "where is {expression}"; the box is read at the EOS-predicting position.

Full size (after configs/ln_t5xl.py wrote /ckpt/ln_t5xl; SAM and T5's frozen weights come with it):

    python -m pixelground.train --config=configs/refcoco_t5xl.py --workdir=/ckpt/refcoco_t5xl \
        --config.data.tfds_dir=/data/tfds --multihost

  Not trained here. Compile check `python -m pixelground.compile_check --config=configs/refcoco_t5xl.py
  --topology=v5e:4x4` (mesh data 2 × fsdp 8, batch 64, task referring): 3.76 GiB per chip of 16
  (FITS), 11.7 TFLOP analytic per chip per step → 0.059 s at 100 % MFU, 0.119 s at 50 %.

CPU variant (the same recipe shrunk; chain it to the LN runlocal run with init_from):

    python -m pixelground.train --config=configs/refcoco_t5xl.py:runlocal --workdir=/tmp/refcoco_t5xl \
        --config.init_from.path=/tmp/ln_t5xl

  Measured on 2 CPU cores (data cached): 38 s wall, 2.2 GB peak. 30 steps of batch 8 over the
  three referring tasks (one compiled program; all read the grounded-shapes refs); text CE 7.17 → 6.16;
  held-out Acc@0.5 0.0 on each (from scratch, 30 steps; from the LN run with init_from: see
  tests/test_runlocal.py).
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl"), tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=5e-5, steps=120_000, warmup=1_000, batch_size=64))
  c.init_from.path = "/ckpt/ln_t5xl"
  c.tasks = base.tasks(
      referring=base.task("refcoco/refcoco_unc"),
      referring_plus=base.task("refcoco/refcocoplus_unc", converter="referring"),
      referring_g=base.task("refcoco/refcocog_umd", converter="referring"))
  c.data.update(image_size=384, scale_range=(0.75, 1.25), max_target_len=40, mixing="batch",
                num_workers=8)
  c.checkpoint_every = 5000
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  return c


def get_config(arg=None):
  return recipes.variant(full, arg)
