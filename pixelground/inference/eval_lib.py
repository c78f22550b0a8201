"""Evaluation of every task with the benchmarks' own metrics (SPEC section 6): the library behind
`python -m pixelground.evaluate` and training's periodic evaluation (the same code, so a checkpoint
evaluated later reproduces the numbers its training run printed).

Per task (by converter, `config.tasks[name].converter`, default the task name):

  referring       teacher-forced on the given expression (PixelLLM reads the box at the EOS position):
                  Acc@0.5 (IoU ≥ 0.5) of the box, and with a refseg model the box-prompted mask's
                  cIoU / gIoU — boxes and masks mapped back to the ORIGINAL image and scored there
  reason_seg      greedy decoding of the answer; the first generated `[SEG]` gives the mask (none → an
                  empty mask); cIoU / gIoU on the original image, ReasonSeg's ignore regions excluded
  referring_seg   the same for LISA's RefCOCO question ("Can you segment {expression} …?"), scored
                  against the referred object's mask
  ln              teacher-forced on the narrative: per-token point L1 (normalised, the in-training
                  `trace_l1`), nDTW of the whole trace (the sequence of per-token box centres against
                  the ground-truth trace boxes' centres) and per word (each token's 2 points against
                  its trace box's 2 corners), LBM distance of the whole trace
  caption         greedy decoding; BLEU-4 / METEOR / ROUGE-L / CIDEr against every reference
                  (pycocoevalcap; `config.eval.java_fallback` skips METEOR where Java is missing)
  region_caption  greedy decoding for the referred box; the same caption metrics against all its
                  expressions
  dense_caption   the proposal head's top-k boxes, each captioned; DenseCap mAP (IoU × METEOR grid,
                  ground truth merged at IoU 0.7) and detection-only mAP
  narrative_grounding  (PNG) teacher-forced on the given noun phrases, each followed by `[SEG]`; each
                  phrase owns the entities its association logit puts above 0 (else its best one); the
                  union of their segments on the ORIGINAL image against the phrase's segments: average
                  recall overall / things / stuff / singular / plural, Acc@0.5 (IoU > 0.5), the PNG
                  benchmark's definitions (`config.eval.png_round_trip`: its 256 × 256 mask round
                  trip); phrases that did not fit the target count as IoU 0 (`truncated` says how many)
  panoptic        greedy decoding of "name [SEG]" per entity from the category list; each entity takes
                  the category of its best-associated named `[SEG]` (stuff entities of a category
                  merged); PQ / SQ / RQ overall / things / stuff against the COCO panoptic ground truth
  (both GELLA tasks use the ground-truth segments as entities, or with `config.eval.entities="sam"`
  SAM's automatic masks of the image: `eval_entities`)

Every task also reports its teacher-forced token accuracy (`train_metrics`). Examples are split over
processes (example i → process i mod P); every process runs the same number of global batches (rows
padded with zeros that count nowhere); per-example records are gathered to every process at the end,
so metrics do not depend on the process count. Records (one per example, JSON-friendly) are what
`evaluate` writes as predictions.jsonl.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pixelground.config import schema
from pixelground.data import pipeline
from pixelground.data import tasks as task_lib
from pixelground.inference import decoding, eval_entities, nonfinite
from pixelground.inference import grounding
from pixelground.models import gella as gella_lib
from pixelground.models import pixelllm as P
from pixelground.models.heads import proposals as prop_lib
from pixelground.parallel import runtime, sharding
from pixelground.inference.scoring import (  # noqa: F401  (re-exported)
    SEG_TASKS, _allgather_objects, _png_record, _Scorer, panoptic_map, summarize, write_outputs)
from pixelground.training import metrics as train_metrics

# Converters `Evaluator` knows how to score.
SUPPORTED = ("referring", "reason_seg", "referring_seg", "ln", "caption", "region_caption",
             "dense_caption", "narrative_grounding", "panoptic")


def eval_options(config, **overrides) -> schema.EvalConfig:
  """`config.eval` with the non-None `overrides` applied (the evaluate CLI's flags, notebooks)."""
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
  return dataclasses.replace(schema.parse(config).eval, **kw)


# ----------------------------------------------------------------------------------------------------
# Jitted per-task device functions: (params, frozen, batch) → replicated outputs
# ----------------------------------------------------------------------------------------------------

# Captions have LN's heads and batch fields (zero token boxes), so their teacher-forced pass is LN's
# compiled program, as in training: the same token accuracy, its (empty) trace terms count nowhere.
_SAME_FORWARD = {"caption": "ln", "region_caption": "ln"}
_DECODED = SEG_TASKS + ("caption", "region_caption", "dense_caption", "panoptic")  # + greedy decoding

def _forward(model: P.PixelLLM, batch, task: str) -> dict[str, jax.Array]:
  """Teacher-forced outputs a task's scoring needs + its in-training metric sums."""
  out = model(batch, heads=P.TASK_HEADS.get(task, ()))
  res = {"tf": train_metrics.batch_metrics(model.cfg, task, out, batch), "index": batch["eval_index"]}
  if task == "referring":
    res["box"] = P.referring_box(out, batch)
    if "ref_logits" in out:
      res["mask_logits"] = out["ref_logits"]
  elif task == "ln":
    res["points"] = out["points"]
  elif task == "narrative_grounding":
    res["assoc_logits"] = out["assoc_logits"]
  return res


def _decode(model: P.PixelLLM, batch, task: str, max_len: int, dense_k: int,
            vocab_limit: int) -> dict[str, jax.Array]:
  """Greedy decoding (cached) for the generative tasks; reason_seg adds the first `[SEG]`'s mask."""
  fused, sam, entities = model.features(batch)
  ids = batch["prompt_ids"]
  if task == "dense_caption":
    heat, ltrb = model.proposal_head(fused)
    boxes, scores = prop_lib.top_proposals(heat, ltrb, dense_k)  # (B, k, 4) normalised, (B, k)
    b, k = boxes.shape[:2]
    visual = model.visual_tokens(jnp.repeat(fused, k, axis=0), boxes.reshape(b * k, 4))
    ids = jnp.repeat(ids, k, axis=0)
    res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                            prefix_embeds=visual, vocab_limit=vocab_limit)
    return {"boxes": boxes, "scores": scores, "tokens": res.tokens.reshape(b, k, -1),
            "lengths": res.lengths.reshape(b, k)}
  visual, prefix, prefix_mask = model.prefix(fused, batch["prompt_box"], entities)
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          prefix_embeds=prefix, prefix_mask=prefix_mask, vocab_limit=vocab_limit)
  out = {"tokens": res.tokens, "lengths": res.lengths}
  # Generated `[SEG]` tokens (B, L), padding after each sequence's end excluded.
  is_seg = (res.tokens == model.cfg.seg_token_id) & (jnp.arange(res.tokens.shape[1]) < res.lengths[:, None])
  if task in SEG_TASKS:
    pos = jnp.argmax(is_seg, axis=1).astype(jnp.int32)
    logits, _ = model.decoded_seg_masks(res.hidden, pos[:, None], sam, visual, batch["image_mask"])
    out.update(has_seg=jnp.any(is_seg, axis=1), mask_logits=logits[:, 0])
  if task == "panoptic":  # the first K generated `[SEG]`s ↔ the entities
    k = batch["seg_positions"].shape[1]
    pos = jax.vmap(lambda r: jnp.nonzero(r, size=k, fill_value=0)[0])(is_seg).astype(jnp.int32)
    emb, _ = model.entity_outputs(entities)
    nouns, ents = model.associate(res.hidden, pos, emb)
    out.update(seg_pos=pos, num_seg=jnp.minimum(jnp.sum(is_seg, axis=1), k),
               assoc_logits=gella_lib.association_logits(nouns, ents))
  return out


# ----------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------

class Evaluator:
  """Evaluates a train state on the held-out split of `config.tasks` (each task's `eval_split`,
  default "validation"). `run(state)` → {"<task>/<metric>": value, ...}; `records` then holds the
  per-example predictions {task: [record, ...]} (gathered from every process, in example order) and
  `kept` {task: {example index: `_Scorer.visual`}} the first `keep_examples` that this process scored
  (referring and reason_seg; the demo figure draws them without compiling inference programs)."""

  def __init__(self, config, setup, tokenizer, *, options: schema.EvalConfig | None = None,
               keep_examples: int = 0, split: str | None = None):
    """`options`: `config.eval` unless given (`eval_options`); `keep_examples`: per task, the first k
    examples' images + predictions are kept in `kept`; `split`: every task's split instead of its
    `eval_split`."""
    from pixelground.training import datasets

    config = schema.parse(config)
    self.setup, self.tok = setup, tokenizer
    self.opts = options or config.eval
    self.keep_examples = keep_examples
    names = list(self.opts.tasks or [n for n in config.tasks if config.converter(n) in SUPPORTED])
    for n in names:
      if n not in config.tasks:
        raise ValueError(f"config.eval.tasks: unknown task '{n}' (config.tasks has {list(config.tasks)}).")
      conv = config.converter(n)
      if conv not in SUPPORTED:
        raise ValueError(f"config.eval.tasks: task '{n}' (converter '{conv}') has no evaluation; "
                         f"supported: {SUPPORTED}.")
    nproc = jax.process_count()
    if self.opts.batch_size % nproc:
      raise ValueError(f"config.eval.batch_size={self.opts.batch_size} must divide by {nproc} processes.")
    self.tasks = {t.name: t for t in datasets.data_tasks(config, tokenizer, split=split,
                                                           train=False, names=names)}
    self.names = [n for n in names if n in self.tasks]
    self.conv = {n: config.converter(n) for n in self.names}
    self.schema = task_lib.schema(config.task_config(train=False))
    self.records: dict[str, list[dict]] = {}
    self.kept: dict[str, dict[int, dict]] = {}
    rep = NamedSharding(setup.mesh, PartitionSpec())
    graphdef, cfg = setup.graphdef, setup.cfg

    def forward(params, frozen, batch, task):
      return _forward(nnx.merge(graphdef, params, frozen), batch, task)

    def decode(params, frozen, batch, task):
      return _decode(nnx.merge(graphdef, params, frozen), batch, task, self.opts.max_decode_len,
                     self.opts.dense_k, tokenizer.num_ids)

    self._forward = runtime.AheadOfTime(jax.jit(forward, static_argnums=3, out_shardings=rep), "forward")
    self._decode = runtime.AheadOfTime(jax.jit(decode, static_argnums=3, out_shardings=rep), "decode")
    self.scorers = {n: _Scorer(self.conv[n], tokenizer, cfg, self._categories(self.tasks[n]),
                               self.opts.png_round_trip) for n in self.names}
    self.auto = (eval_entities.AutoEntities(self.opts.sam_checkpoint, cfg.image_size)
                 if self.opts.entities == "sam" and any(self.conv[n] in eval_entities.TASKS
                                                        for n in self.names) else None)

  @staticmethod
  def _categories(task):
    conv = getattr(task.convert, "__self__", None)
    return getattr(conv, "categories", None)

  def _indices(self, n_total: int) -> tuple[list[int], int]:
    n = min(n_total, self.opts.max_examples) if self.opts.max_examples else n_total
    pid, nproc = jax.process_index(), jax.process_count()
    local = self.opts.batch_size // nproc
    mine = list(range(pid, n, nproc))
    per_process = -(-n // nproc)  # every process runs as many batches as the fullest one
    return mine, -(-per_process // local)

  def precompile(self, pool, state) -> None:
    """Starts compiling every task's programs for `state` on the thread pool `pool` from abstract
    batches (the trainer calls it at the start: they compile beside training, not at the end).
    Tasks whose entities come from the SAM generator compile at their first batch."""
    from pixelground.training import datasets
    mesh, rules = self.setup.mesh, self.setup.rules
    context = lambda: sharding.use(mesh, rules)
    place = lambda nd: NamedSharding(mesh, sharding.batch_spec(nd, rules, mesh))
    params, frozen = datasets.abstract(state["params"]), datasets.abstract(state["frozen"])
    n = self.opts.batch_size
    for name in self.names:
      conv = self.conv[name]
      if self.auto is not None and conv in eval_entities.TASKS:
        continue
      row = self._zero_row(self.tasks[name].schema or self.schema, name)
      row["eval_index"] = np.zeros((), np.int32)
      batch = {k: jax.ShapeDtypeStruct((n,) + v.shape, v.dtype, sharding=place(v.ndim + 1))
               for k, v in row.items()}
      self._forward.precompile(pool, context, params, frozen, batch, _SAME_FORWARD.get(conv, conv))
      if conv in _DECODED:
        self._decode.precompile(pool, context, params, frozen, batch, conv)

  def unused_programs(self) -> list[str]:
    """Precompiled programs no `run` used (an abstract batch unlike the real ones: a schema bug)."""
    return [f"{fn.name}[{task}]" for fn in (self._forward, self._decode) for task in fn.unused()]

  def run(self, state, *, progress: bool = False) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    self.records, self.kept = {}, {}
    if self.auto is not None:
      self.auto.bind(self.setup, state)
    tfs, counts, summaries = {}, {}, {}
    # Each task's summary is computed beside the next task's device work (caption metrics wait ~7 s
    # on Java's METEOR / PTB tokenizer processes). Host↔device copies are explicit (device_put /
    # device_get): an implicit one is an error here.
    with ThreadPoolExecutor(1) as pool, jax.transfer_guard("disallow"):
      for name in self.names:
        recs, tfs[name] = self._run_task(name, state, progress)
        self.records[name], counts[name] = recs, len(recs)
        summaries[name] = pool.submit(summarize, self.conv[name], recs,
                                      java_fallback=self.opts.java_fallback,
                                      categories=self.scorers[name].categories)
    results: dict[str, float] = {}
    for name in self.names:
      nonfinite = sum(1 for r in self.records[name] if r.get("nonfinite"))
      metrics = tfs[name] | summaries[name].result() | {"count": counts[name], "nonfinite": nonfinite}
      results.update({f"{name}/{k}": v for k, v in metrics.items()})
    results["eval_seconds"] = time.perf_counter() - t0
    return results

  def _run_task(self, name: str, state, progress: bool) -> tuple[list[dict], dict[str, float]]:
    task, conv, scorer = self.tasks[name], self.conv[name], self.scorers[name]
    mine, num_batches = self._indices(len(task.source))
    local = self.opts.batch_size // jax.process_count()
    batch_schema = task.schema or self.schema
    task_id = self.names.index(name)
    acc = train_metrics.Accumulator()
    recs: list[tuple[int, dict]] = []
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=num_batches, desc=f"eval {name}", unit="batch", mininterval=2.0)
    for b in range(num_batches):
      idx = mine[b * local:(b + 1) * local]
      exs = [task.source[i] for i in idx]
      rows = [pipeline._pad_to_schema(task.convert(ex, np.random.default_rng(i)), batch_schema, task_id, name)
              for i, ex in zip(idx, exs)]
      maps = [None] * len(rows)
      if self.auto is not None and conv in eval_entities.TASKS:
        rows, maps = self.auto.rows(exs, rows)
      zero = {k: np.zeros_like(v) for k, v in rows[0].items()} if rows else self._zero_row(batch_schema, name)
      padded = rows + [zero] * (local - len(rows))
      batch = {k: np.stack([r[k] for r in padded]) for k in padded[0]}
      batch["eval_index"] = np.asarray(idx + [-1] * (local - len(idx)), np.int32)
      with sharding.use(self.setup.mesh, self.setup.rules):
        gb = sharding.global_batch(batch, self.setup.mesh, self.setup.rules)
        out = self._forward(state["params"], state["frozen"], gb, _SAME_FORWARD.get(conv, conv))
        if conv in _DECODED:
          out |= self._decode(state["params"], state["frozen"], gb, conv)
      acc.add(out.pop("tf"))
      host = {k: np.asarray(v) for k, v in jax.device_get(out).items()}
      host, bad = nonfinite.sanitize(host, self.setup.cfg.image_size)
      where = {int(i): r for r, i in enumerate(host["index"])}  # outputs are replicated: find our rows
      for j, (i, ex) in enumerate(zip(idx, exs)):
        rec = scorer.record(ex, rows[j], host, where[i], maps[j])
        if bad[where[i]]:
          rec["nonfinite"] = True
        recs.append((i, {"index": i} | rec))
        if i < self.keep_examples and conv in ("referring", "narrative_grounding") + SEG_TASKS:
          self.kept.setdefault(name, {})[i] = scorer.visual(ex, rec, host, where[i], maps[j])
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    gathered = [r for part in _allgather_objects(recs) for r in part]
    gathered.sort(key=lambda x: x[0])
    # Of the in-training metrics only the teacher-forced token accuracy is not recomputed here.
    tf = {"token_acc": v for k, v in acc.result().items() if k.endswith("_acc")}
    return [r for _, r in gathered], tf

  def write(self, out_dir: str, tag: str, result: dict) -> None:
    """`write_outputs` of the last `run`, plus each panoptic task's predictions in the COCO panoptic
    results format: out_dir/panoptic_<task>_<tag>/panoptic_pred.json + panoptic_pred/<image id>.png."""
    import os

    write_outputs(out_dir, tag, result, self.records)
    for name, recs in self.records.items():
      if self.conv[name] == "panoptic":
        preds = [(r["image_id"], f"{r['image_id']:012d}.png", panoptic_map(r),
                  [{k: v for k, v in sg.items() if k != "rle"} for sg in r["segments_info"]])
                 for r in recs]
        grounding.write_coco_panoptic(os.path.join(out_dir, f"panoptic_{name}_{tag}"), preds,
                                      self.scorers[name].categories)

  def _zero_row(self, schema, name):
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in schema.items()} | {
        "task_id": np.zeros((), np.int32)}
