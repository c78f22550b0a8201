r"""PixelLLM web-scale pretraining: image captioning on WebLI-like image–text shards (SPEC §3, §5.8).

SAM-H (frozen) + EVA02-L (frozen) + FLAN-T5-XL (frozen, LoRA r32 on q/v of every attention); 384 px.
What trains: the prompt feature extractor (its queries, two-way transformer and projection into T5)
and the LoRA factors — the parts the later stages start from: `configs/ln_t5xl.py` with
`--config.init_from.path=<this workdir>` loads every parameter it shares with this run (at :runlocal,
all 225 of them, EVA02 and the extractor included). Task `web`: the `image_text` builder's `webdataset` shards,
converter `web_caption` (prompt "A short image caption:", the alt-text as target, cut to 64 tokens),
with record filters driven by each record's own fields: English only, score ≥ 0.3, shorter image side
≥ 64 px, captions of 3–64 tokens. Dropped records never take a batch slot; they are counted by reason
and logged (`filtered: … — web: language …, low_score …`, scalars `data/dropped/web/<reason>`).
Global batch 4096 on v5e:16x16 (256 chips: data 16 × fsdp 16), 100k steps (≈ 410M examples), AdamW
1e-4, warm-up 2k, cosine, 16 Grain worker processes per host; each host reads whole array_record
files of its own (`config.data.shard_by="file"`). Analytic FLOPs: 8.51 PFLOP per step, so
0.337 s per step at 50 % MFU and 190 examples/s per 4-chip host; the input pipeline converts 256
examples/s per core here (640×480 JPEGs; `bench/input_pipeline.py --task web`).

Data: prepared once from webdataset tar shards (e.g. img2dataset's output) on a Beam runner — every
host then reads whole array_record files of its own, so write many (here 16,384 = 256 per host; the
Dataflow, Flink and Spark variants, the file count and the reading side: tfds_builders/README.md,
"Preparing at scale"; not run here, no cloud):

    python -m tfds_builders.prepare --builder=image_text --config=webdataset \
        --manual_dir=gs://bucket/raw/webli --data_dir=gs://bucket/tfds --num_shards=16384 \
        --beam_runner=DataflowRunner --beam_options="--project=my-project --region=us-central1 \
          --temp_location=gs://bucket/beam/tmp --setup_file=./setup.py \
          --requirements_file=/tmp/beam_requirements.txt --max_num_workers=512"

then, on every TPU VM host:

    python -m pixelground.train --config=configs/webli_pretrain_t5xl.py --workdir=gs://bucket/webli \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl --config.data.tfds_dir=gs://bucket/tfds --multihost

  Not trained here (no TPU, no data). Compiled for v5e:4x4 / 8x8 / 16x16 and v5p:4x4x4 at 16 examples
  per chip (`python -m pixelground.compile_check --config=configs/webli_pretrain_t5xl.py
  --topology=v5e:16x16`): 3.1–3.7 GiB per chip of 16 (v5e), compiled / analytic FLOPs 1.14, FSDP
  all-gathers 14–50 GiB per chip per step (docs/compile_check.md).

CPU variant (same recipe shrunk; the grounded-shapes train images written as 4 web-style tar shards,
a tenth of them planted to fail each of three filters, built on first use):

    python -m pixelground.train --config=configs/webli_pretrain_t5xl.py:runlocal --workdir=/tmp/webli

  Measured on 2 CPU cores (grounded-shapes build included, 3.5 s of it): 32 s wall, 1.9 GB peak. 30
  steps of batch 8, 0.06M of 0.47M parameters trained (extractor + LoRA); text CE 6.92 → 5.63, token
  accuracy 0.22. Each log step prints the filter counts since the process started; the last:
  "filtered: 106 of 346 records read (30.6%) — web: language 33, low_score 35, caption_too_short 38"
  (a tenth of the records is planted to fail each). No evaluation task (web captions have no held-out
  split here): the final line reports only the training figures.
"""

from pixelground.config import base, recipes


def full():
  c = base.config(model=recipes.model_config("xl"), tokenizer="spiece.model",
                  optimizer=recipes.optimizer_config(lr=1e-4, steps=100_000, warmup=2_000,
                                                     batch_size=4096))
  c.tasks = base.tasks(web=base.task("image_text/webdataset", converter="web_caption",
                                     min_caption_tokens=3, max_caption_tokens=64, languages=("en",),
                                     min_score=0.3, min_image_side=64))
  c.trainable = (r"^extractor\.",)
  c.data.update(image_size=384, scale_range=(1.0, 1.0), max_target_len=64, num_workers=16,
                shard_by="file")
  c.checkpoint_every = 2000
  c.eval_every = 0
  c.mesh.update(data=-1, fsdp=16, tensor=1)
  return c


def get_config(arg=None):
  c = recipes.variant(full, arg)
  if arg == "runlocal":
    c.tasks.web.min_image_side = 32  # the 64-px synthetic images pass; the other filters as at full size
  return c
