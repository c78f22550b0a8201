"""Interim main job: trains a tiny T5 to reverse token sequences, then decodes held-out sequences.

It runs the parts of pixelground that exist today (the T5 core, sharding, cached decoding) on data it
generates itself; the PixelLLM demo trainer (`pixelground.train`) replaces it as the main job.

    python -m pixelground.lm_demo --config=configs/t5_lm_demo.py --workdir=DIR

Writes DIR/metrics.json; the last printed line is the same JSON.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelground import decoding, sharding
from pixelground.configlib import from_config
from pixelground.models import t5 as t5_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/t5_lm_demo.py", "Demo config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/lm_demo", "Where metrics are written.")

EOS, PAD, FIRST_TOKEN = 1, 0, 2


def make_batch(rng: np.random.Generator, n: int, cfg, vocab: int):
  """Source: random tokens + EOS (right-padded); target: the tokens reversed + EOS."""
  src = np.full((n, cfg.max_len + 1), PAD, np.int32)
  tgt = np.full((n, cfg.max_len + 1), PAD, np.int32)
  for i in range(n):
    k = rng.integers(cfg.min_len, cfg.max_len + 1)
    seq = rng.integers(FIRST_TOKEN, vocab, k)
    src[i, :k], src[i, k] = seq, EOS
    tgt[i, :k], tgt[i, k] = seq[::-1], EOS
  dec_in = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"ids": src, "dec": dec_in, "labels": tgt}


def main(argv):
  del argv
  cfg = _CONFIG.value
  os.makedirs(_WORKDIR.value, exist_ok=True)
  t5_cfg = from_config(t5_lib.T5Config, cfg.t5, where="config.t5")
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.sharding_rules)

  # Mesh and sharded model.
  mesh = sharding.make_mesh(dict(cfg.mesh))
  logging.info("mesh %s", dict(mesh.shape))
  model = sharding.create_sharded(lambda: t5_lib.T5(t5_cfg, rngs=nnx.Rngs(cfg.seed)), mesh, rules)
  graphdef, params = nnx.split(model, nnx.Param)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  # Optimizer: AdamW with linear warm-up and cosine decay.
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps)
  tx = optax.adamw(schedule, weight_decay=0.0)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)

  def loss_fn(params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["ids"], batch["ids"] != PAD, batch["dec"])
    weights = (batch["labels"] != PAD).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32)
    return (ce * weights).sum() / weights.sum(), (correct * weights).sum() / weights.sum()

  def train_step(params, opt_state, batch):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "token_acc": acc}

  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  rng = np.random.default_rng(cfg.seed)
  start = time.time()
  print(f"Training a {n_params / 1e6:.2f}M-parameter T5 to reverse sequences for {cfg.steps} steps "
        f"on mesh {dict(mesh.shape)}", flush=True)
  with jax.set_mesh(mesh):
    for step in range(1, cfg.steps + 1):
      batch = sharding.global_batch(make_batch(rng, cfg.batch_size, cfg, t5_cfg.vocab_size), mesh, rules)
      params, opt_state, metrics = train_step(params, opt_state, batch)
      if step % cfg.log_every == 0 or step == cfg.steps:
        m = jax.device_get(metrics)
        print(f"step {step:5d}/{cfg.steps}  loss {m['loss']:.4f}  token_acc {m['token_acc']:.3f}  "
              f"{step / (time.time() - start):.1f} steps/s", flush=True)

  # Held-out evaluation with cached greedy and beam decoding.
  eval_batch = make_batch(np.random.default_rng(cfg.seed + 1), cfg.eval_examples, cfg, t5_cfg.vocab_size)
  results = {}
  for name, beams in (("greedy", 1), ("beam", cfg.decode.num_beams)):
    @jax.jit
    def run(params, ids):
      return decoding.generate(nnx.merge(graphdef, params), ids, ids != PAD, max_len=ids.shape[1],
                               num_beams=beams, length_penalty=cfg.decode.length_penalty)

    out = jax.device_get(run(params, jnp.asarray(eval_batch["ids"])))
    exact = (out.tokens == eval_batch["labels"]).all(axis=1).mean()
    results[f"{name}_exact_match"] = round(float(exact), 4)
  results.update(steps=cfg.steps, params=int(n_params), train_seconds=round(time.time() - start, 1),
                 final_loss=round(float(m["loss"]), 4))
  with open(os.path.join(_WORKDIR.value, "metrics.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results), flush=True)


if __name__ == "__main__":
  app.run(main)
