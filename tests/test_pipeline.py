"""Grain loaders: determinism, exact resume from a saved iterator state, disjoint per-process shards,
mixture frequencies, schema padding; with and without worker processes."""

import collections

import numpy as np
import pytest

from pixelground.data import pipeline

SCHEMA = {"value": ((), np.int64), "noise": ((3,), np.float32), "caption_len": ((), np.int32)}


def convert_a(example, rng):  # module-level: picklable for worker processes
  return {"value": np.int64(example), "noise": rng.standard_normal(3).astype(np.float32)}


def convert_b(example, rng):
  return {"value": np.int64(1000 + example), "noise": rng.uniform(size=3).astype(np.float32),
          "caption_len": np.int32(example % 7)}


def convert_c(example, rng):
  del rng
  return {"value": np.int64(2000 + example)}


def _tasks(weights=(1.0, 1.0, 1.0)):
  return [pipeline.Task("a", list(range(50)), convert_a, weights[0]),
          pipeline.Task("b", list(range(30)), convert_b, weights[1]),
          pipeline.Task("c", list(range(20)), convert_c, weights[2])]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("mixing", ["example", "batch"])
def test_same_seed_same_batches_and_exact_resume(mixing):
  make = lambda: pipeline.Loader(_tasks(), SCHEMA, batch_size=4, seed=5, mixing=mixing)
  full = _take(iter(make()), 40)
  _equal(full, _take(iter(make()), 40))
  other = _take(iter(pipeline.Loader(_tasks(), SCHEMA, batch_size=4, seed=6, mixing=mixing)), 40)
  assert any(not np.array_equal(a["value"], b["value"]) for a, b in zip(full, other))
  it = iter(make())
  _take(it, 17)  # mid-epoch for every task
  state = it.get_state()
  resumed = iter(make())
  resumed.set_state(state)
  _equal(_take(resumed, 23), full[17:])


def test_worker_processes_match_in_process_and_resume():
  make = lambda workers: pipeline.Loader(_tasks(), SCHEMA, batch_size=4, seed=1, num_workers=workers)
  want = _take(iter(make(0)), 12)
  it = iter(make(2))
  got = _take(it, 5)
  state = it.get_state()
  _equal(got, want[:5])
  resumed = iter(make(2))
  resumed.set_state(state)
  _equal(_take(resumed, 7), want[5:])


def test_two_processes_disjoint_and_covering():
  seen = []
  for index in range(2):
    loader = pipeline.Loader([pipeline.Task("a", list(range(51)), convert_a)], SCHEMA, batch_size=1,
                             seed=3, shard_index=index, shard_count=2, num_epochs=1,
                             drop_remainder=False)
    seen.append([int(b["value"][0]) for b in loader])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(51))
  assert seen[0] != sorted(seen[0])  # shuffled


@pytest.mark.parametrize("mixing", ["example", "batch"])
def test_mixture_frequencies_within_3_percent(mixing):
  weights = (0.5, 0.3, 0.2)
  loader = pipeline.Loader(_tasks(weights), SCHEMA, batch_size=2, seed=0, mixing=mixing)
  it = iter(loader)
  counts = collections.Counter()
  n = 2000
  for _ in range(n):
    batch = next(it)
    if mixing == "batch":
      assert len(set(batch["task_id"].tolist())) == 1  # single-task batches
    counts.update(batch["task_id"].tolist())
  total = sum(counts.values())
  for task_id, w in enumerate(weights):
    assert abs(counts[task_id] / total - w) <= 0.03, (counts, weights)


def test_schema_padding_and_errors():
  it = iter(pipeline.Loader(_tasks(), SCHEMA, batch_size=8, seed=0, mixing="batch"))
  batch = next(b for b in it if b["task_id"][0] == 2)  # task c produces only "value"
  assert np.all(batch["task_id"] == 2) and batch["noise"].dtype == np.float32
  assert np.all(batch["noise"] == 0) and np.all(batch["caption_len"] == 0)  # absent fields are zeros
  bad = pipeline.Task("bad", [1, 2, 3], lambda e, r: {"noise": np.zeros(4, np.float32)})
  with pytest.raises(ValueError, match="task 'bad': field 'noise' has shape"):
    next(iter(pipeline.Loader([bad], SCHEMA, batch_size=1, seed=0)))
  with pytest.raises(ValueError, match="mixing"):
    pipeline.Loader(_tasks(), SCHEMA, batch_size=1, seed=0, mixing="rows")


def test_batches_become_sharded_global_arrays():
  """A loader batch → batch-sharded jax.Arrays on the 8-device fake mesh (one process: local = global)."""
  import jax
  from pixelground.parallel import sharding

  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  batch = next(iter(pipeline.Loader(_tasks(), SCHEMA, batch_size=8, seed=0)))
  arrays = sharding.global_batch(batch, mesh, sharding.DEFAULT_RULES)
  for k, v in arrays.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape
    assert len(v.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(v), batch[k])
