"""The trainer end to end (subprocesses of `python -m pixelground.train`, fake 8-device CPU mesh):
exact resume after SIGKILL, SIGTERM → checkpoint + exit 0, multi-host (2 × 4 devices over gloo) equal to
1 × 8 devices, restore onto another mesh shape. Config: tests/configs/train_small.py (LN + captions)."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trainer_cli import ROOT, CONFIG, cmd as _cmd, environment, losses as _losses, params as _params
from trainer_cli import run as _run, saved_steps as _saved_steps, two_processes, finish


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return environment(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_sigterm_saves(env, tmp_path):
  ref = tmp_path / "uninterrupted"
  out = _run(env, ref)
  last = json.loads(out.strip().splitlines()[-1])
  assert last["step"] == 40 and "ln/point_l1" in last and "ln/token_acc" in last
  # Each task's step was compiled from its abstract batch before its first batch came.
  compiled = [ln for ln in out.splitlines() if ln.startswith("compiled the train step")]
  assert compiled and all(ln.endswith("(in the background)") for ln in compiled), compiled
  assert (ref / "tensorboard").is_dir() and (ref / "eval_40.json").is_file()
  losses = _losses(ref)
  assert sorted(losses) == list(range(1, 41))
  # It learns: the LN task's text loss, first 3 LN batches vs last 3 (tasks alternate by weight).
  task, ce = _losses(ref, "train/task"), _losses(ref, "train/text_ce")
  ln = [ce[s] for s in sorted(ce) if task[s] == task[1]]
  assert np.mean(ln[-3:]) < 0.8 * np.mean(ln[:3]), ln
  # `pixelground.evaluate` on the final checkpoint reproduces the run's final evaluation exactly.
  ev = subprocess.run([sys.executable, "-m", "pixelground.evaluate", f"--config={CONFIG}",
                       f"--checkpoint={ref}", f"--workdir={tmp_path / 'eval'}", "--format=coco"],
                      env=env, cwd=ROOT,
                      capture_output=True, text=True, timeout=600)
  assert ev.returncode == 0, ev.stderr[-3000:]
  again = json.loads(ev.stdout.strip().splitlines()[-1])
  trained = json.load(open(ref / "eval_40.json"))
  for k, v in trained.items():
    if "/" in k:
      assert again[k] == v, (k, again[k], v)
  assert (tmp_path / "eval" / "predictions_40.jsonl").is_file()

  # SIGKILL once the step-20 checkpoint is on disk, restart with the same command.
  killed = tmp_path / "killed"
  p = subprocess.Popen(_cmd(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  while 20 not in _saved_steps(killed):
    assert p.poll() is None, "run ended before its step-20 checkpoint"
    assert time.time() - t0 < 600
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert max(_saved_steps(killed)) < 40
  out = _run(env, killed)
  assert "Resumed from the checkpoint at step" in out
  a, b = _params(ref, 40), _params(killed, 40)
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k  # bit-identical params, optimizer moments and step

  # SIGTERM: save at the next step boundary, exit 0.
  term = tmp_path / "sigterm"
  p = subprocess.Popen(_cmd(term, "--config.optimizer.total_steps=100000"), env=env, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  t0 = time.time()
  while not (term / "metrics.jsonl").exists() or len(_losses(term)) < 3:
    assert p.poll() is None and time.time() - t0 < 600
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  stdout, _ = p.communicate(timeout=300)
  assert p.returncode == 0, stdout[-2000:]
  assert "SIGTERM" in stdout
  step = max(_saved_steps(term))
  assert step >= 3 and step == max(_losses(term))


@pytest.mark.slow
def test_two_processes_equal_one(env, tmp_path):
  """2 processes × 4 CPU devices (gloo) vs 1 process × 8 devices: same per-step losses (1e-4 relative),
  50 steps; then the 2-process checkpoint resumes on a (data 2, fsdp 2, tensor 2) mesh in 1 process."""
  steps = ["--config.optimizer.total_steps=50"]
  one = tmp_path / "one"
  _run(env, one, *steps)
  two = tmp_path / "two"
  finish(two_processes(env, two, *steps))
  la, lb = _losses(one), _losses(two)
  assert sorted(la) == sorted(lb) == list(range(1, 51))
  rel = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
  print("max relative loss difference 1x8 vs 2x4:", rel)
  assert rel < 1e-4
  # Another mesh shape, one process: restores the 2-process checkpoint (step 50) and trains on.
  out = _run(env, two, "--config.optimizer.total_steps=55", "--config.mesh.data=2", "--config.mesh.fsdp=2",
             "--config.mesh.tensor=2")
  assert "Resumed from the checkpoint at step 50" in out
  assert max(_losses(two)) == 55
