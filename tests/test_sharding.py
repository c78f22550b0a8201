"""Mesh construction, logical-axis rules, sharded init and sharded training math on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixelground.parallel import sharding
from pixelground.models import t5 as t5_lib

CFG = t5_lib.T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                      num_decoder_layers=2, relpos_buckets=8, relpos_max_distance=16,
                      lora_rank=4, lora_alpha=8.0, lora_targets=t5_lib.PIXELLLM_LORA_TARGETS)
MESH_AXES = {"data": 2, "fsdp": 2, "tensor": 2}


def test_make_mesh_sizes_and_errors():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match=r"needs 12 devices but 8"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match=r"fixed axes \(3 devices\) do not divide the 8"):
    sharding.make_mesh({"data": -1, "tensor": 3})
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh({"data": -1, "tensor": -1})


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh(MESH_AXES)
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length"), rules, mesh) == P(("data", "fsdp"), None)
  # A mesh axis is used once per array; unknown names replicate; indivisible dims replicate.
  assert sharding.logical_to_spec(("mlp", "heads"), rules, mesh) == P("tensor", None)
  assert sharding.logical_to_spec(("unknown", "embed"), rules, mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(("heads", "kv"), rules, mesh, shape=(3, 8)) == P(None, None)


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_init_places_every_param(scan):
  cfg = CFG.replace(scan_layers=scan)
  mesh = sharding.make_mesh(MESH_AXES)
  model = sharding.create_sharded(lambda: t5_lib.T5(cfg, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
  lead = (None,) if scan else ()
  layer = "encoder.layers.layers" + ("" if scan else ".0")
  expect = {
      "token_embed": P("tensor", "fsdp"),
      "lm_head": P("fsdp", "tensor"),
      f"{layer}.attn.q.kernel": P(*lead, "fsdp", "tensor", None),
      f"{layer}.attn.o.kernel": P(*lead, "tensor", None, "fsdp"),
      f"{layer}.mlp.wi_0.kernel": P(*lead, "fsdp", "tensor"),
      f"{layer}.attn.q.lora_a": P(*lead, "fsdp", None),
      f"{layer}.attn.q.lora_b": P(*lead, None, "tensor", None),
      "encoder.relpos.embedding": P(None, "tensor"),
  }
  flat = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(nnx.state(model))}
  for name, spec in expect.items():
    value = flat[name].get_value()
    assert value.sharding.spec == spec, (name, value.sharding.spec)
  # Sharded, not replicated: every device holds only its slice of each sharded parameter.
  q = flat[f"{layer}.attn.q.kernel"].get_value()
  shard_shape = q.addressable_shards[0].data.shape
  assert shard_shape[-3:] == (CFG.d_model // 2, CFG.num_heads // 2, CFG.head_dim)
  # Same values as an unsharded init with the same seed.
  plain = t5_lib.T5(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.encoder.layers.layers[0].attn.q.kernel[...])
                                if not scan else np.asarray(plain.encoder.layers.layers.attn.q.kernel[...]))


def _loss_and_grads(model, batch):
  graphdef, trainable, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss_fn(trainable):
    m = nnx.merge(graphdef, trainable, rest)
    logits, _ = m(batch["ids"], batch["ids"] != 0, batch["dec"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  return jax.jit(jax.value_and_grad(loss_fn))(trainable)


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_backward_matches_single_device(scan):
  cfg = CFG.replace(scan_layers=scan)
  rng = np.random.default_rng(0)
  batch = {"ids": rng.integers(1, 64, (8, 10)), "dec": rng.integers(1, 64, (8, 6)),
           "labels": rng.integers(1, 64, (8, 6))}
  batch["ids"][:, 7:] = 0
  make = lambda: t5_lib.T5(cfg, rngs=nnx.Rngs(1))
  # Non-zero LoRA B so gradients flow through every path.
  def perturb(model):
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
      v.set_value(v.get_value() + 0.05)
    return model

  single = perturb(make())
  loss_1, grads_1 = _loss_and_grads(single, {k: jnp.asarray(v) for k, v in batch.items()})

  mesh = sharding.make_mesh(MESH_AXES)
  model = perturb(sharding.create_sharded(make, mesh, sharding.DEFAULT_RULES))
  gbatch = sharding.global_batch(batch, mesh, sharding.DEFAULT_RULES)
  assert gbatch["ids"].sharding.spec == P(("data", "fsdp"), None)
  with jax.set_mesh(mesh):
    loss_8, grads_8 = _loss_and_grads(model, gbatch)
  np.testing.assert_allclose(float(loss_8), float(loss_1), atol=1e-5)
  for (path, g1), (_, g8) in zip(nnx.to_flat_state(grads_1), nnx.to_flat_state(grads_8)):
    np.testing.assert_allclose(np.asarray(g8.get_value()), np.asarray(g1.get_value()), atol=1e-5,
                               err_msg=str(path))


def test_next_key_is_rngs_params_bit_for_bit():
  """`layers.next_key` (what every parameter init draws) = NNX's own `rngs.params()`: the same keys in
  the same order and the same final count, eagerly and under a trace — so models init as they did."""
  from pixelground.models import layers

  def draws(use_next_key: bool):
    rngs = nnx.Rngs(params=3)
    keys = [layers.next_key(rngs) if use_next_key else rngs.params() for _ in range(5)]
    return jnp.stack([jax.random.key_data(k) for k in keys]), rngs.params.count[...]

  for fn in (draws, jax.jit(draws, static_argnums=0)):
    ours, theirs = fn(True), fn(False)
    np.testing.assert_array_equal(ours[0], theirs[0])
    assert int(ours[1]) == int(theirs[1]) == 5
  assert len({tuple(np.asarray(k).ravel()) for k in draws(True)[0]}) == 5  # 5 distinct keys


def test_ahead_of_time_compiles_once_per_static_value_and_signature():
  from pixelground.parallel import runtime
  f = runtime.AheadOfTime(jax.jit(lambda x, y, n: x * n + y.sum(), static_argnums=2), "t")
  a, b = jnp.ones(3), jnp.ones(4)
  assert float(f(a, b, 2)[0]) == 6.0 and f.last_compile_seconds is not None
  assert float(f(a, b + 1, 2)[0]) == 10.0 and f.last_compile_seconds is None   # same program
  assert float(f(a, jnp.ones(5), 2)[0]) == 7.0 and f.last_compile_seconds is not None  # new shape
  assert float(f(a, b, 3)[0]) == 7.0 and len(f.programs) == 3                     # new static value


def test_ahead_of_time_precompiles_in_the_background():
  # Programs compiled on a thread pool from ShapeDtypeStructs (under a context) are the ones the first
  # matching calls run; a signature nobody calls stays listed as unused.
  import concurrent.futures
  import contextlib
  from pixelground.parallel import runtime
  entered = []

  @contextlib.contextmanager
  def context():
    entered.append(1)
    yield

  f = runtime.AheadOfTime(jax.jit(lambda x, n: x * n, static_argnums=1), "t")
  spec = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32, sharding=jnp.ones(1).sharding)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    f.precompile(pool, context, spec(3), 2)
    f.precompile(pool, context, spec(5), 2)
    f.precompile(pool, context, spec(3), 2)   # already pending: not compiled twice
  assert len(entered) == 2 and sorted(f.unused()) == [2, 2]
  assert float(f(jnp.ones(3), 2)[0]) == 2.0 and f.last_precompiled and f.last_compile_seconds > 0
  assert f.unused() == [2] and len(f.programs) == 1
  assert float(f(jnp.ones(4), 2)[0]) == 2.0 and not f.last_precompiled   # compiled at the call
  assert float(f(jnp.ones(3), 2)[0]) == 2.0 and f.last_compile_seconds is None
