"""The jitted train step, and the analytic FLOPs of a train step (for MFU)."""

from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from pixelground.config import schema
from pixelground.models import pixelllm as P
from pixelground.parallel import sharding
from pixelground.training import objective
from pixelground.training.train_state import Setup


def init_guard() -> dict[str, jax.Array]:
  """The non-finite guard's carry (`make_train_step`): all zeros, int32 scalars.

  streak      consecutive steps not applied (reset by the next applied step)
  skipped     steps not applied in this run
  (which terms were non-finite is each step's `metrics["nonfinite"]`)"""
  return {k: jnp.zeros((), jnp.int32) for k in ("streak", "skipped")}


def guard_terms(metrics: tp.Mapping[str, tp.Any]) -> list[str]:
  """The names behind the bits of `metrics["nonfinite"]`: the step's loss terms (sorted),
  then the gradient and update norms."""
  return sorted(k for k in metrics if k not in _NOT_TERMS) + ["grad_norm", "update_norm"]


_NOT_TERMS = ("grad_norm", "update_norm", "lr", "nonfinite")


def guarded(new, old, guard: dict, terms: dict):
  """The non-finite guard (traced inside the step): `new` (the updated pytree) if the total loss, the
  gradient norm and the update norm in `terms` are finite, else `old`; the updated guard carry
  (`init_guard`); the bitmask of the non-finite entries of `guard_terms(terms)`."""
  checked = [terms[k] for k in guard_terms(terms)]
  bad = jnp.stack([~jnp.isfinite(jnp.asarray(v, jnp.float32)) for v in checked])
  mask = jnp.sum(bad.astype(jnp.int32) << jnp.arange(len(checked), dtype=jnp.int32))
  ok = jnp.isfinite(terms["total"]) & jnp.isfinite(terms["grad_norm"]) & jnp.isfinite(terms["update_norm"])
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  guard = {"streak": jnp.where(ok, 0, guard["streak"] + 1),
           "skipped": guard["skipped"] + (~ok).astype(jnp.int32)}
  return kept, guard, mask


def make_train_step(setup: Setup, loss_cfg: objective.LossConfig, *, accum_steps: int = 1, seed: int = 0,
                    drop_path: bool = True):
  """train_step(state, guard, batch, heads) → (state, guard, metrics). `heads` (static: a tuple from
  `heads_of(config, task)`) picks the heads to run (None: all — mixed-task batches); tasks with the
  same heads and batch fields share one compiled program. Gradients are averaged over `accum_steps`
  micro-batches (a scan).

  Non-finite guard, decided on device: a step whose total loss, gradient norm or update norm is not
  finite leaves the parameters and optimizer state as they were (the step counter still advances, so
  the data and schedule move on); `guard` (`init_guard`) counts it, and `metrics["nonfinite"]` is the
  bitmask of the non-finite entries of `guard_terms(metrics)` (0 on a good step)."""
  cfg, graphdef, tx = setup.cfg, setup.graphdef, setup.tx
  batch_spec = lambda x: NamedSharding(setup.mesh, sharding.batch_spec(x.ndim, setup.rules, setup.mesh))

  def loss_fn(params, frozen, batch, rng, heads):
    model = nnx.merge(graphdef, params, frozen)
    out = model(batch, rng=rng if drop_path else None, heads=heads, train=True)
    return objective.compute_losses(cfg, loss_cfg, out, batch)

  def step(state, guard, batch, heads):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      (_, terms), grads = grad_fn(state["params"], state["frozen"], batch, rng, heads)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]),
                           batch)

      def body(carry, xs):
        i, mb = xs
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_spec(x)), mb)
        (_, t), g = grad_fn(state["params"], state["frozen"], mb, jax.random.fold_in(rng, i), heads)
        return jax.tree.map(jnp.add, carry, (g, t)), None

      zeros = jax.eval_shape(lambda: grad_fn(state["params"], state["frozen"],
                                             jax.tree.map(lambda x: x[0], micro), rng, heads))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
      (grads, terms), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
      grads, terms = jax.tree.map(lambda x: x / accum_steps, (grads, terms))
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm, update_norm = optax.global_norm(grads), optax.global_norm(updates)
    terms = dict(terms, grad_norm=grad_norm, update_norm=update_norm)
    (params, opt), guard, mask = guarded((params, opt), (state["params"], state["opt"]), guard, terms)
    metrics = dict(terms, lr=setup.schedule(state["step"]), nonfinite=mask)
    new_state = {"step": state["step"] + 1, "params": params, "frozen": state["frozen"], "opt": opt}
    return new_state, guard, metrics

  replicated = NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, static_argnums=3, donate_argnums=0,
                 out_shardings=(setup.state_shardings, replicated, None))


def flops_inputs(config, setup: Setup, batch_size: int, task: str | None
                 ) -> tuple[P.PixelLLMConfig, dict[str, tp.Any]]:
  """(model config with only `task`'s heads, keyword arguments of `flops.step_flops`) for one train
  step of `task` (None: a mixed-task batch, every head) at global batch `batch_size`."""
  config = schema.parse(config)
  cfg, d = setup.cfg, config.task_config(train=True, task=task)
  conv = config.converter(task) if task else None
  heads = set(P.TASK_HEADS.get(conv, ())) if conv else {"lisa", "refseg", "proposals", "refbox",
                                                         "gella"}
  cfg = dataclasses.replace(cfg, lisa=cfg.lisa and "lisa" in heads,
                            gella=cfg.gella if "gella" in heads else None,
                            refseg=cfg.refseg and "refseg" in heads,
                            proposals=cfg.proposals and "proposals" in heads,
                            box_refine=cfg.box_refine if "refbox" in heads else 0)
  kw = dict(batch_size=batch_size, prompt_len=d.max_prompt_len,
            target_len=0 if conv == "dense_caption" else d.max_target_len,
            num_seg=d.max_seg if (cfg.lisa or cfg.gella) else 0,
            num_entities=d.max_entities if cfg.gella else 0,
            num_regions=d.max_regions if cfg.proposals else 0,
            region_len=d.max_region_len if cfg.proposals else 0,
            trainable=setup.keep)
  return cfg, kw


class StepFlops:
  """Analytic model FLOPs of one train step of each task (`pixelground.perf.flops`), cached per task."""

  def __init__(self, config, setup: Setup, batch_size: int):
    self.config, self.setup, self.batch_size = schema.parse(config), setup, batch_size
    self.cache: dict[tp.Any, float] = {}

  def __call__(self, task: str | None) -> float:
    if task not in self.cache:
      from pixelground.perf import flops as flops_lib

      cfg, kw = flops_inputs(self.config, self.setup, self.batch_size, task)
      self.cache[task] = float(flops_lib.step_flops(cfg, **kw)["total"])
    return self.cache[task]
