"""Trainer pieces in-process: checkpoint round trip of arrays + input-pipeline state (per input shard, so
a checkpoint restores onto another process count), gradient accumulation = one big batch."""

import types

import numpy as np
import pytest
from etils import epath

import jax
import jax.numpy as jnp

from pixelground.training import checkpointing
from pixelground.data import pipeline


def _group(index=0, count=1, num_shards=2):
  src = [{"x": np.float32(i)} for i in range(50)]
  task = pipeline.Task("t", src, lambda ex, rng: {"x": np.asarray(ex["x"])[None] + rng.uniform(0, 1e-3)})
  make = lambda s, n: pipeline.Loader([task], {"x": ((1,), np.float32)}, batch_size=2, seed=0,
                                      shard_index=s, shard_count=n)
  return pipeline.ShardGroup(make, num_shards=num_shards, process_index=index, process_count=count)


def test_checkpoint_round_trip_and_other_process_count(tmp_path):
  g = _group()
  for _ in range(3):
    next(g)
  ck = checkpointing.Checkpointer(str(tmp_path), keep=2)
  state = {"a": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  ck.save(3, state, g, force=True)
  ck.wait()
  want = [next(g)["x"] for _ in range(2)]  # (4, 1): shard 0's 2 rows then shard 1's 2 rows
  setup = types.SimpleNamespace(abstract_state=jax.eval_shape(lambda: state),
                                state_shardings=jax.tree.map(
                                    lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state))
  restored, g2 = ck.restore(3, setup, _group())
  assert np.array_equal(np.asarray(restored["a"]), np.asarray(state["a"])) and int(restored["step"]) == 3
  got = [next(g2)["x"] for _ in range(2)]
  assert all(np.array_equal(a, b) for a, b in zip(want, got))
  ck.close()
  # Two processes now: process 1 owns input shard 1 and resumes it from the same files.
  handler = checkpointing.ShardStateHandler()
  p1 = handler.restore(epath.Path(tmp_path) / "3" / "data", _group(index=1, count=2))
  assert all(np.array_equal(next(p1)["x"], w[2:]) for w in want)
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    _group(count=3)
  with pytest.raises(FileNotFoundError, match="num_shards"):
    handler.restore(epath.Path(tmp_path) / "3" / "data", _group(num_shards=4))


def test_second_checkpointer_in_one_process_saves(tmp_path):
  # Orbax keeps the first args class registered for a handler: a second Checkpointer in the same
  # process (evaluate, then train, in a notebook) must reuse it, not register new classes.
  for i in range(2):
    ck = checkpointing.Checkpointer(str(tmp_path / str(i)), keep=1)
    assert ck.save(1, {"a": jnp.ones(3)}, _group(), force=True)
    ck.wait()
    ck.close()
    assert ck.latest_step() == 1
