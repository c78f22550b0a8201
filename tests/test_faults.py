"""Faults the trainer survives, one test per row of the README's fault table (docs/faults.md).

Fast, in-process: damaged checkpoints (truncated array file, missing file, corrupt metadata, damage
without a seal) fall back to the previous step; failing saves (no space, directory gone) are clear
errors that keep the earlier checkpoints; retention; non-finite predictions score as misses; a
damaged or missing prepared-data file is an error naming it (also from a Grain worker process) or is
skipped and counted. Slow, end to end (`python -m pixelground.train` subprocesses,
tests/configs/train_small.py): a learning rate that blows the run up, a truncated newest checkpoint,
kill -9 of a 2-process × 4-device run at random steps (5 trials).
"""

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pixelground.data import pipeline
from pixelground.inference import grounding, nonfinite
from pixelground import metrics as M
from pixelground.training import checkpointing

import trainer_cli
from trainer_cli import ROOT


# ----------------------------------------------------------------------------------------------------
# Checkpoints (in-process)
# ----------------------------------------------------------------------------------------------------

def _group():
  src = [{"x": np.float32(i)} for i in range(50)]
  task = pipeline.Task("t", src, lambda ex, rng: {"x": np.asarray(ex["x"])[None]})
  make = lambda s, n: pipeline.Loader([task], {"x": ((1,), np.float32)}, batch_size=2, seed=0,  # noqa: E731
                                      shard_index=s, shard_count=n)
  return pipeline.ShardGroup(make, num_shards=1, process_index=0, process_count=1)


def _state(step):
  return {"w": jnp.asarray(np.random.default_rng(step).normal(size=(4096,)), jnp.float32),
          "step": jnp.int32(step)}


def _setup():
  st = _state(0)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return types.SimpleNamespace(abstract_state=jax.eval_shape(lambda: st),
                               state_shardings=jax.tree.map(lambda _: dev, st))


def _saved(root, steps, keep=5):
  ck = checkpointing.Checkpointer(str(root), keep=keep)
  for s in steps:
    ck.save(s, _state(s), _group(), force=True)
  ck.close()


def _array_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize)


def _truncate(step_dir, seal=True):
  f = _array_files(step_dir)[-1]
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)
  return f


def _remove(step_dir):
  f = _array_files(step_dir)[-1]
  os.remove(f)
  return f


def _corrupt_metadata(step_dir):
  f = os.path.join(step_dir, "state", "_METADATA")
  with open(f, "w") as fh:
    fh.write("{not json")
  return f


@pytest.mark.parametrize("fault,sealed", [(_truncate, True), (_remove, True), (_corrupt_metadata, True),
                                          (_truncate, False)])
def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys, fault, sealed):
  root = tmp_path / "ck"
  _saved(root, (10, 20, 30))
  if not sealed:  # killed right after saving: no seal, the damage shows only when reading
    os.remove(os.path.join(root, "30", checkpointing.SEAL))
  fault(os.path.join(root, "30"))
  ck = checkpointing.Checkpointer(str(root), keep=5)
  (state, _), step = ck.restore_latest(lambda s: ck.restore(s, _setup(), _group()))
  assert step == 20
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(20)["w"]))
  err = capsys.readouterr().err
  assert f"checkpoint {root}/30 is damaged" in err and "falling back" in err
  # The damaged step is kept aside, and the resumed run can save step 30 again.
  assert sorted(ck.manager.all_steps()) == [10, 20]
  assert len(os.listdir(str(root) + ".damaged")) == 1
  ck.save(30, _state(31), _group(), force=True)
  ck.close()
  assert checkpointing.damage(os.path.join(root, "30")) is None


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  root = tmp_path / "ck"
  _saved(root, (10, 20))
  for s in (10, 20):
    _truncate(os.path.join(root, str(s)))
  ck = checkpointing.Checkpointer(str(root), keep=5)
  with pytest.raises(checkpointing.CheckpointRestoreError, match="step 20: file .* has .* bytes"):
    ck.restore_latest(lambda s: ck.restore(s, _setup(), _group()))
  ck.close()


def test_evaluation_of_a_run_directory_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
  root = tmp_path / "run" / "checkpoints"
  _saved(root, (10, 20))
  _truncate(os.path.join(root, "20"))
  state, step = checkpointing.load_state(_setup(), str(tmp_path / "run"))
  assert step == 10 and int(state["step"]) == 10
  assert "checkpoints/20 is damaged" in capsys.readouterr().err
  assert sorted(os.listdir(root)) == ["10", "20"]  # read-only: nothing moved
  with pytest.raises(checkpointing.CheckpointRestoreError, match="20 is damaged — .*truncated"):
    checkpointing.load_state(_setup(), str(root / "20"))


_SAVE_FAULT = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from test_faults import _group, _state
    from pixelground.training import checkpointing
    root, fault = sys.argv[1], sys.argv[2]
    ck = checkpointing.Checkpointer(root, keep=2)
    for s in (10, 20):
      ck.save(s, _state(s), _group(), force=True)
    ck.finish()
    big = {{"w": jnp.asarray(np.random.default_rng(0).normal(size=(1 << 20,)), jnp.float32)}}
    if fault == "space":  # a full disk: writes beyond 64 KiB fail (EFBIG, as ENOSPC would)
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    else:  # the directory is gone (root ignores permissions, so a file takes its place)
      os.rename(root, root + ".moved")
      open(root, "w").close()
    try:
      ck.save(30, big, _group(), force=True)
      ck.finish()
    except checkpointing.CheckpointSaveError as e:
      print("SAVE_ERROR", e)
    if fault == "space":
      resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    else:
      os.remove(root)
      os.rename(root + ".moved", root)
""")


@pytest.mark.parametrize("fault", ["space", "directory"])
def test_failing_save_is_a_clear_error_and_keeps_the_previous_checkpoints(tmp_path, fault):
  root = str(tmp_path / "ck")
  script = tmp_path / "save_fault.py"
  script.write_text(_SAVE_FAULT.format(tests=os.path.join(ROOT, "tests")))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, str(script), root, fault], capture_output=True, text=True,
                     timeout=300, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  line = next(ln for ln in p.stdout.splitlines() if ln.startswith("SAVE_ERROR"))
  assert f"saving the checkpoint of step 30 to {root}/30 failed" in line
  assert "the checkpoint of step 20 is intact" in line
  assert sorted(int(d) for d in os.listdir(root) if d.isdigit()) == [10, 20]  # none deleted
  ck = checkpointing.Checkpointer(root, keep=2)
  (state, _), step = ck.restore_latest(lambda s: ck.restore(s, _setup(), _group()))
  assert step == 20 and int(state["step"]) == 20
  assert not any(".orbax-checkpoint-tmp" in d for d in os.listdir(root))  # the partial save is cleaned
  ck.close()


def test_retention_deletes_only_behind_keep_sealed_checkpoints(tmp_path):
  root = tmp_path / "ck"
  ck = checkpointing.Checkpointer(str(root), keep=2)
  for s in (10, 20, 30):
    ck.save(s, _state(s), _group(), force=True)
  ck.finish()
  assert sorted(ck.manager.all_steps()) == [20, 30]
  # A newer checkpoint without a seal (its run died right after writing it) does not count: the two
  # sealed ones behind it stay.
  ck.save(40, _state(40), _group(), force=True)
  ck.manager.wait_until_finished()
  ck.pending = None
  ck.close()
  ck = checkpointing.Checkpointer(str(root), keep=2)
  ck.save(50, _state(50), _group(), force=True)
  ck.close()
  assert sorted(int(d) for d in os.listdir(root) if d.isdigit()) == [30, 40, 50]


# ----------------------------------------------------------------------------------------------------
# The non-finite guard's decision (in-process; the trainer end to end is the slow test below)
# ----------------------------------------------------------------------------------------------------

def test_guard_keeps_the_state_counts_and_names_the_terms():
  from pixelground.training import guard as guard_lib
  from pixelground.training import steps

  step = jax.jit(steps.guarded)
  old = {"w": jnp.ones(3), "m": jnp.zeros(3)}
  new = {"w": jnp.full(3, 2.0), "m": jnp.full(3, 0.5)}
  good = {"text_ce": 1.0, "point_l1": 0.5, "total": 1.5, "grad_norm": 3.0, "update_norm": 0.1}
  bad = dict(good, point_l1=jnp.nan, total=jnp.nan, grad_norm=jnp.inf)
  g = steps.init_guard()
  kept, g, mask = step(new, old, g, good)
  assert int(mask) == 0 and int(g["streak"]) == 0 and kept["w"][0] == 2.0
  kept, g, mask = step(new, old, g, bad)
  names = steps.guard_terms(bad)
  assert names == ["point_l1", "text_ce", "total", "grad_norm", "update_norm"]
  assert guard_lib._names(int(mask), names) == ["point_l1", "total", "grad_norm"]
  assert all(np.array_equal(kept[k], old[k]) for k in old)  # not applied
  kept, g, _ = step(new, old, g, dict(good, update_norm=jnp.nan))  # an overflowing update too
  assert kept["w"][0] == 1.0
  assert (int(g["streak"]), int(g["skipped"])) == (2, 2)
  _, g, _ = step(new, old, g, good)
  assert int(g["streak"]) == 0 and int(g["skipped"]) == 2


def test_watch_stops_after_max_streak_naming_the_first_step():
  from pixelground.training import guard as guard_lib
  from pixelground.training import steps

  watch = guard_lib.NonFiniteWatch(2, echo=False)
  g = steps.init_guard()
  bad = {"text_ce": jnp.nan, "total": jnp.nan, "grad_norm": jnp.nan, "update_norm": jnp.nan}
  metrics = {}
  with pytest.raises(guard_lib.NonFiniteStop, match=r"the first at step 5 \[task caption\], first "
                                                    r"non-finite term: text_ce"):
    for s, task in ((4, "ln"), (5, "caption"), (6, "ln"), (7, "ln")):
      terms = bad if s >= 5 else {k: 1.0 for k in bad}
      _, g, mask = steps.guarded({"w": jnp.ones(1)}, {"w": jnp.ones(1)}, g, terms)
      metrics = dict(terms, lr=0.0, nonfinite=mask)
      watch.push(s, task, g, metrics)
  assert watch.skipped == 2


# ----------------------------------------------------------------------------------------------------
# Non-finite predictions (in-process)
# ----------------------------------------------------------------------------------------------------

def test_nonfinite_predictions_are_misses_and_counted():
  s = 64
  out = {"index": np.arange(3),
         "box": np.array([[1, 1, 20, 20], [np.nan, 1, 20, 20], [1, 1, 20, 20]], np.float32),
         "mask_logits": np.ones((3, 8, 8), np.float32),
         "points": np.zeros((3, 5, 4), np.float32)}
  out["mask_logits"][2, 3, 3] = np.inf
  out["points"][0, 1, 2] = np.nan
  fixed, bad = nonfinite.sanitize(out, s)
  assert bad.tolist() == [True, True, True]
  assert all(np.isfinite(fixed[k]).all() for k in ("box", "mask_logits", "points"))
  gt = np.array([[1, 1, 20, 20]], np.float32)
  assert M.box_iou(fixed["box"][1:2], gt)[0] == 0.0                 # a miss, not a crash
  assert M.box_iou(fixed["box"][0:1], gt)[0] == 1.0                 # finite ones untouched
  assert (fixed["mask_logits"][2] < 0).all() and (fixed["mask_logits"][1] == 1.0).all()  # whole mask
  assert (fixed["points"][0, 1] == -s).all() and (fixed["points"][0, 0] == 0.0).all()  # whole point
  fine, none = nonfinite.sanitize({"index": np.arange(2), "box": np.ones((2, 4), np.float32)}, s)
  assert not none.any()


def test_metrics_never_crash_on_nonfinite_input():
  pred = np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.5]])
  ref = np.array([[0.1, 0.2], [0.2, 0.3], [0.5, 0.6]])
  assert np.isnan(M.lbm_distance(pred, ref))  # was: linear_sum_assignment ValueError
  # Association: a NaN noun owns nothing (IoU 0), a NaN entity is void.
  logits = np.array([[np.nan, np.nan, np.nan], [2.0, -1.0, np.nan], [-3.0, -2.0, np.nan]])
  own = grounding.phrase_entities(logits)
  assert own.tolist() == [[False, False, False], [True, False, False], [False, True, False]]
  cats, scores = grounding.entity_categories(logits, None, np.array([1, 2, 1]), {1: 1, 2: 0})
  assert cats.tolist() == [2, 2, 0] and scores[2] == 0.0
  # Detection / dense captioning: a NaN box or score is a false positive ranked last.
  det = M.DetectionEvaluator()
  gtb = np.array([[0, 0, 10, 10]], np.float64)
  det.add(np.array([[np.nan, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.9, np.nan]), np.array([1, 1]),
          gtb, np.array([1]))
  assert det.nonfinite == 2 and det.result()["AP"] == 0.0
  det2 = M.DetectionEvaluator()
  det2.add(np.array([[np.nan, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.9, 0.5]), np.array([1, 1]),
           gtb, np.array([1]))
  assert det2.nonfinite == 1 and det2.result()["AP"] == pytest.approx(1.0)
  dc = M.DenseCapEvaluator(meteor_fn=lambda pairs: [1.0] * len(pairs))
  dc.add(np.array([[np.nan, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.9, 0.5]), ["a", "b"], gtb, ["b"])
  assert dc.nonfinite == 1 and np.isfinite(dc.result()["map"])


# ----------------------------------------------------------------------------------------------------
# Damaged prepared data (in-process, a real array_record file)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def record_files(tmp_path_factory):
  """Two array_record files of 20 records each (the TFDS data-source path: ArrayRecordDataSource)."""
  from array_record.python import array_record_data_source, array_record_module

  d = tmp_path_factory.mktemp("records")
  files = []
  for f in range(2):
    path = str(d / f"data.array_record-{f:05d}-of-00002")
    w = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i in range(20):
      w.write(np.full(3000, 20 * f + i, np.int32).tobytes())  # 12 KB each: several chunks per file
    w.close()
    files.append(path)
  return files, array_record_data_source


def _records(record_files, tmp_path, damage=None, which=1):
  files, ards = record_files
  local = []
  for f in files:
    shutil.copy(f, tmp_path / os.path.basename(f))
    local.append(str(tmp_path / os.path.basename(f)))
  if damage == "truncate":
    with open(local[which], "r+b") as fh:
      fh.truncate(os.path.getsize(local[which]) // 2)
  # Ranges, as TFDS gives them (its file instructions): files open on first read, not here.
  source = ards.ArrayRecordDataSource([f"{f}[0:20]" for f in local])
  if damage == "missing":
    os.remove(local[1])
  return source, local


def _record_loader(source, files, *, skip, workers=0):
  checked = pipeline.CheckedSource(source, "t", files, [20, 20], skip=skip)
  task = pipeline.Task("t", checked, lambda ex, rng: {"x": np.frombuffer(ex, np.int32)[:1].copy()})
  return pipeline.Loader([task], {"x": ((1,), np.int32)}, batch_size=4, seed=0, num_epochs=1,
                         shuffle=False, num_workers=workers, drop_remainder=False,
                         drop_reasons=("unreadable",) if skip else ())


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_damaged_data_file_is_an_error_naming_it(record_files, tmp_path, damage):
  source, files = _records(record_files, tmp_path, damage)
  with pytest.raises(pipeline.DataReadError, match=f"task 't': record 0 of {files[1]} cannot be read"):
    list(_record_loader(source, files, skip=False))


def test_damaged_data_file_in_a_worker_process_is_an_error_not_a_hang(record_files, tmp_path):
  source, files = _records(record_files, tmp_path, "truncate")
  t0 = time.perf_counter()
  with pytest.raises(Exception, match=f"record 0 of {files[1]} cannot be read"):
    list(_record_loader(source, files, skip=False, workers=1))
  assert time.perf_counter() - t0 < 120


def test_damaged_data_file_skipped_and_counted(record_files, tmp_path):
  source, files = _records(record_files, tmp_path, "truncate", which=0)
  batches = list(_record_loader(source, files, skip=True))
  kept = sorted(int(x) for b in batches for x in b["x"][:, 0])
  assert kept == list(range(20, 40))  # the whole damaged file is skipped, the good one read
  assert sum(int(b[pipeline.DROPPED].sum()) for b in batches) == 20


# ----------------------------------------------------------------------------------------------------
# End to end: the trainer CLI (slow)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
  return trainer_cli.environment(tmp_path_factory.mktemp("cache"))


def _train(env, workdir, *extra, ok=True, timeout=900):
  p = subprocess.run(trainer_cli.cmd(workdir, *extra), env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout)
  if ok:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p


_params, _steps, _equal = trainer_cli.params, trainer_cli.saved_steps, trainer_cli.assert_equal_states


@pytest.fixture(scope="module")
def reference(train_env, tmp_path_factory):
  """An uninterrupted 40-step run (checkpoints at 10, 20, 30, 40)."""
  ref = tmp_path_factory.mktemp("reference")
  _train(train_env, ref)
  return ref


@pytest.mark.slow
def test_learning_rate_blowup_stops_and_keeps_the_last_good_checkpoint(train_env, reference, tmp_path):
  """lr 1e9 from step 20 on: the run stops within max_nonfinite_steps + 1 steps of the first
  non-finite one, naming it; nothing newer than step 20 is saved and step 20 restores as saved."""
  run = tmp_path / "blowup"
  shutil.copytree(os.path.join(reference, "checkpoints", "20"), run / "checkpoints" / "20")
  saved = _params(run, 20)
  n = 3
  p = _train(train_env, run, "--config.optimizer.learning_rate=1e9", f"--config.max_nonfinite_steps={n}",
             ok=False)
  assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
  msg = p.stderr.strip().splitlines()[-1]
  import re
  m = re.search(r"Stopped at step (\d+): 3 consecutive steps with a non-finite loss or gradient .*the "
                r"first at step (\d+) \[task (\w+)\], first non-finite term: (\w+)", msg)
  assert m, msg
  stopped, first, task, term = int(m[1]), int(m[2]), m[3], m[4]
  print(f"first non-finite step {first} [{task}], term {term}; stopped at step {stopped}")
  assert 20 < first and stopped - first + 1 <= n + 1 and task in ("ln", "caption")
  assert "Newest checkpoint: step 20" in msg
  assert _steps(run) == [20]
  _equal(saved, _params(run, 20))
  # The same command with a sane learning rate resumes from step 20 and matches the reference.
  out = _train(train_env, run).stdout
  assert "Resumed from the checkpoint at step 20" in out
  _equal(_params(reference, 40), _params(run, 40))


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_previous_step(train_env, reference, tmp_path):
  run = tmp_path / "truncated"
  _train(train_env, run, "--stop_after=30")
  assert _steps(run) == [10, 20, 30]
  f = _truncate(os.path.join(run, "checkpoints", "30"))
  p = _train(train_env, run)
  assert f"checkpoint {run}/checkpoints/30 is damaged — file " in p.stderr
  assert "Resumed from the checkpoint at step 20" in p.stdout
  assert os.path.exists(str(run / "checkpoints") + ".damaged")
  print("truncated", f, "→ resumed from 20")
  _equal(_params(reference, 40), _params(run, 40))


def _logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
  return max(steps, default=0)


@pytest.mark.slow
def test_kill9_of_two_processes_resumes_exactly(train_env, tmp_path):
  """5 trials, 2 processes × 4 CPU devices (gloo), 60 steps: kill -9 both at a random step after a
  random checkpoint, restart → the final parameters equal an uninterrupted 2-process run's exactly."""
  steps = "--config.optimizer.total_steps=60"
  ref = tmp_path / "ref2"
  trainer_cli.finish(trainer_cli.two_processes(train_env, ref, steps))
  want = _params(ref, 60)
  rng = random.Random(24)
  for trial in range(5):
    run = tmp_path / f"trial{trial}"
    after = rng.choice([10, 20, 30])
    extra = rng.randint(1, 8)  # steps past the checkpoint (possibly while it is still being written)
    procs = trainer_cli.two_processes(train_env, run, steps)
    trainer_cli.kill_when(procs, lambda: _logged_step(run) >= after + extra)
    killed_at = _logged_step(run)
    assert killed_at < 60, "the run finished before the kill"
    before = _steps(run)
    outs = trainer_cli.finish(trainer_cli.two_processes(train_env, run, steps))
    resumed = [ln for ln in outs[0].splitlines() if ln.startswith("Resumed from the checkpoint")]
    print(f"trial {trial}: killed at step {killed_at} (checkpoints {before}), {resumed[0]}")
    assert resumed and int(resumed[0].split()[-1]) == max(before)
    _equal(want, _params(run, 60))
