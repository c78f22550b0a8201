"""One T5 training step (forward, backward, AdamW update): pixelground (JAX/Flax NNX) vs transformers (torch).

Model: T5 v1.1-small shape (~60M parameters): d_model 512, 8 + 8 layers, 6 heads x 64, d_ff 1024 gated-GELU,
vocab 32128, lm_head tied to the shared embedding without the d_model**-0.5 output scaling. Both sides
start from identical weights (the torch model is saved with `save_pretrained` and loaded with `load_t5`).
Batch 8, 64 input / 128 target tokens (random ids, no padding), float32, AdamW(lr 1e-4, weight decay 0.01
on both sides), loss = mean token cross-entropy with decoder inputs = targets shifted right (start id 0),
i.e. what transformers computes for `model(input_ids=..., labels=...)`.

Ours is measured in two styles and the faster one is reported:
  * "functional": nnx.split -> jax.jit(train_step(params, opt_state, batch)) with donated params and
    optimizer state, nnx.merge inside;
  * "nnx.Optimizer": nnx.Optimizer + nnx.jit (model and optimizer updated in place).
Compilation is excluded (two warm-up steps each); then each implementation runs its timed steps in a block
(interleaving single steps would let torch's still-spinning OpenMP workers slow down the next step) and
the median is reported. A forward-only timing of each side is printed as a breakdown.

Denormals: XLA:CPU runs with flush-to-zero / denormals-are-zero; PyTorch does not by default. With this
random initialisation (tied, unscaled logits of std ~20) the softmax backward produces denormal floats and
torch's backward slows down ~10x, which would measure an artefact rather than the implementations, so
torch is run with `torch.set_flush_denormal(True)` (same numerics as XLA). `--torch-denormals` keeps torch's
default to show the effect.

The last line printed is a JSON summary (see bench/README.md).
Run: .venv/bin/python bench/t5_train_step.py [--steps N] [--torch-denormals]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pixelground.checkpoints.t5 import load_t5  # noqa: E402

BATCH, SRC_LEN, TGT_LEN = 8, 64, 128
VOCAB = 32128
LR, WEIGHT_DECAY = 1e-4, 0.01  # torch.optim.AdamW's default weight decay (optax.adamw's is 1e-4)
T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def hf_t5_small() -> transformers.T5ForConditionalGeneration:
  torch.manual_seed(0)
  # transformers 5 always ties lm_head to `shared`; tie_word_embeddings=False only switches off the
  # d_model**-0.5 output scaling (T5 v1.1 behaviour), giving "tied, unscaled".
  cfg = transformers.T5Config(vocab_size=VOCAB, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                              num_decoder_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                              dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0,
                              pad_token_id=0, eos_token_id=1)
  return transformers.T5ForConditionalGeneration(cfg).train()


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, VOCAB, size=(BATCH, SRC_LEN), dtype=np.int64)
  targets = rng.integers(2, VOCAB, size=(BATCH, TGT_LEN), dtype=np.int64)
  inputs[:, -1] = targets[:, -1] = 1  # EOS
  return {"inputs": inputs, "targets": targets}


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
  return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


def loss_fn(model, batch):
  dec_in = shift_right(batch["targets"], model.cfg.decoder_start_id)
  logits, _ = model(batch["inputs"], jnp.ones_like(batch["inputs"], dtype=bool), dec_in)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def functional_step(model, batch, tx):
  """nnx.split -> jitted pure function of (params, opt_state, batch), params/opt_state donated."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Commit the optimizer state to the parameters' device: `tx.init` leaves Adam's step count uncommitted,
  # the jitted step returns it committed, and that mismatch would recompile the step on its second call.
  opt_state = jax.device_put(tx.init(params), jax.devices()[0])

  def train_step(params, opt_state, batch):
    def loss_of(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch)

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step_jit = jax.jit(train_step, donate_argnums=(0, 1))
  box = {"params": params, "opt_state": opt_state}

  def step():
    box["params"], box["opt_state"], loss = step_jit(box["params"], box["opt_state"], batch)
    return float(jax.block_until_ready(loss))

  return step


def nnx_optimizer_step(model, batch, tx):
  """nnx.Optimizer + nnx.jit: stateful update of the model and optimizer in place."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(optimizer, jax.device_put(nnx.state(optimizer), jax.devices()[0]))  # see functional_step

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  return lambda: float(jax.block_until_ready(train_step(model, optimizer, batch)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=7, help="timed steps per implementation")
  parser.add_argument("--torch-denormals", action="store_true",
                      help="keep torch's default denormal handling (no flush-to-zero)")
  args = parser.parse_args()
  torch.set_flush_denormal(not args.torch_denormals)

  log(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
      f"({torch.get_num_threads()} threads, flush denormals: {not args.torch_denormals}), "
      f"transformers {transformers.__version__}, {os.cpu_count()} CPUs")
  hf = hf_t5_small()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    ours = {"functional": load_t5(tmp), "nnx.Optimizer": load_t5(tmp)}
  cfg = ours["functional"].cfg
  n_torch = sum(p.numel() for p in hf.parameters())
  n_ours = sum(int(np.prod(x.shape))
               for x in jax.tree.leaves(nnx.state(ours["functional"], nnx.Param)))
  log(f"parameters: ours {n_ours:,} | torch {n_torch:,}  (ours: tied={cfg.tie_embeddings}, "
      f"scale_decoder_outputs={cfg.scale_decoder_outputs}; torch: "
      f"tie_word_embeddings={hf.config.tie_word_embeddings}, "
      f"scale_decoder_outputs={hf.config.scale_decoder_outputs})")

  np_batch = make_batch()
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in np_batch.items()}
  t_inputs = torch.from_numpy(np_batch["inputs"])
  t_labels = torch.from_numpy(np_batch["targets"])
  tokens_per_step = BATCH * (SRC_LEN + TGT_LEN)

  # ---- forward-only breakdown (on the initial weights, before any update) ---------------------------
  graphdef, params, rest = nnx.split(ours["functional"], nnx.Param, ...)
  fwd = jax.jit(lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b)).lower(params, batch).compile()
  initial_loss = {"ours": float(fwd(params, batch))}
  with torch.no_grad():
    initial_loss["torch"] = float(hf(input_ids=t_inputs, labels=t_labels).loss)
  fwd_times = {"ours": [], "torch": []}
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(fwd(params, batch))
    fwd_times["ours"].append(time.perf_counter() - t)
    t = time.perf_counter()
    with torch.no_grad():
      hf(input_ids=t_inputs, labels=t_labels)
    fwd_times["torch"].append(time.perf_counter() - t)
  del params, rest
  log(f"initial loss ours {initial_loss['ours']:.5f} torch {initial_loss['torch']:.5f}; forward only: "
      f"ours {min(fwd_times['ours']):.3f}s torch {min(fwd_times['torch']):.3f}s")

  # ---- train steps ----------------------------------------------------------------------------------
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

  def torch_step():
    loss = hf(input_ids=t_inputs, labels=t_labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  steps = {"ours (functional)": functional_step(ours["functional"], batch, tx),
           "ours (nnx.Optimizer)": nnx_optimizer_step(ours["nnx.Optimizer"], batch, tx),
           "torch": torch_step}
  losses = {name: [] for name in steps}
  for name, step in steps.items():  # warm-up: compilation (ours), allocator / lazy init (torch)
    t = time.perf_counter()
    losses[name].append(step())
    first = time.perf_counter() - t
    t = time.perf_counter()
    losses[name].append(step())
    log(f"{name}: warm-up steps {first:.1f}s (incl. compile), {time.perf_counter() - t:.1f}s; "
        f"loss {losses[name][0]:.4f}")

  # Timed in blocks (all steps of one implementation, then the next), not interleaved step by step:
  # after a torch step its OpenMP workers keep spinning for a while and would slow down the next
  # implementation's step on the 2 cores.
  times = {name: [] for name in steps}
  for name, step in steps.items():
    time.sleep(0.5)  # let the previous implementation's worker threads go idle
    for _ in range(args.steps):
      t = time.perf_counter()
      losses[name].append(step())
      times[name].append(time.perf_counter() - t)
    log(f"{name}: steps {[round(x, 3) for x in times[name]]}")

  # ---- report ---------------------------------------------------------------------------------------
  print()
  print(f"T5 train step (fwd + bwd + AdamW), {n_ours / 1e6:.1f}M params, batch {BATCH} x ({SRC_LEN} in + "
        f"{TGT_LEN} out) tokens, float32, CPU ({os.cpu_count()} cores); median of {args.steps} steps")
  print(f"{'implementation':<24}{'s/step':>9}{'min':>9}{'tokens/s':>10}{'loss@1':>10}{'loss@last':>11}"
        "   (loss@k: loss seen at step k, i.e. after k updates)")
  for name in steps:
    med = statistics.median(times[name])
    print(f"{name:<24}{med:>9.3f}{min(times[name]):>9.3f}{tokens_per_step / med:>10.0f}"
          f"{losses[name][1]:>10.4f}{losses[name][-1]:>11.4f}")
  print(f"forward only (no grad): ours {min(fwd_times['ours']):.3f}s, "
        f"torch {min(fwd_times['torch']):.3f}s")
  best = min(("ours (functional)", "ours (nnx.Optimizer)"), key=lambda k: statistics.median(times[k]))
  ours_s, torch_s = statistics.median(times[best]), statistics.median(times["torch"])
  print(f"fastest ours: {best}; speedup vs torch {torch_s / ours_s:.2f} (target >= 1.5); "
        f"total {time.perf_counter() - T0:.0f}s")
  print(json.dumps({"ours_s_per_step": round(ours_s, 4), "torch_s_per_step": round(torch_s, 4),
                    "speedup_vs_torch": round(torch_s / ours_s, 3)}))


if __name__ == "__main__":
  main()
