"""Every full-size config's `:runlocal` variant through the trainer's command line, exactly as the
config's header writes it: ≥ 20 steps, an evaluation and checkpoints; SIGTERM mid-run saves and exits 0,
and the same command resumes and finishes. ln_t5xl and refseg_t5xl run by default, the others with
--runslow. Each run sees one CPU device, as a user's laptop does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """One grounded-shapes + XLA cache for the module's runs; no forced device count."""
  e = dict(os.environ, PIXELGROUND_CACHE=str(tmp_path_factory.mktemp("cache")), JAX_PLATFORMS="cpu",
           PYTHONPATH=ROOT)
  e.pop("XLA_FLAGS", None)
  return e


def command(name: str, workdir) -> list[str]:
  """The header's command: `python -m pixelground.train --config=configs/NAME.py:runlocal --workdir=W`."""
  return [sys.executable, "-m", "pixelground.train", f"--config=configs/{name}.py:runlocal",
          f"--workdir={workdir}"]


def _header(name: str) -> str:
  return open(os.path.join(ROOT, "configs", f"{name}.py")).read().split('"""')[1]


def run_and_resume(name: str, workdir, env, *, stop_at: int = 10, timeout: float = 900) -> dict:
  """Runs the command, SIGTERMs it once step `stop_at` is logged, checks it saved and exited 0, runs the
  same command again to the end → the final JSON line."""
  assert f"--config=configs/{name}.py:runlocal --workdir=" in _header(name)
  p = subprocess.Popen(command(name, workdir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  lines, t0 = [], time.time()
  for line in p.stdout:
    lines.append(line)
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= stop_at:
      p.send_signal(signal.SIGTERM)
      break
    assert time.time() - t0 < timeout, "".join(lines[-30:])
  out, _ = p.communicate(timeout=timeout)
  first = "".join(lines) + out
  assert p.returncode == 0, first[-4000:]
  assert "(SIGTERM); checkpoint saved." in first, first[-3000:]
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved and stop_at <= saved[-1] < 30, saved

  second = subprocess.run(command(name, workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
  assert f"Resumed from the checkpoint at step {saved[-1]}" in second.stdout
  result = json.loads(second.stdout.strip().splitlines()[-1])
  assert result["step"] == 30 and os.path.isfile(os.path.join(workdir, "eval_30.json"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "30"))
  logged = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
            if "train/total" in l]
  assert sorted(set(logged)) == list(range(5, 31, 5)), logged  # every log step once, across both runs
  assert any(f for f in os.listdir(workdir) if f.startswith("train.")), "library logs in the workdir"
  return result


def test_ln_t5xl(env, tmp_path):
  r = run_and_resume("ln_t5xl", tmp_path / "run", env)
  for key in ("ln/point_l1", "ln/ndtw", "ln/token_acc", "caption/CIDEr", "caption/token_acc"):
    assert key in r, sorted(r)


def test_refseg_t5xl(env, tmp_path):
  r = run_and_resume("refseg_t5xl", tmp_path / "run", env)
  for key in ("referring_seg/acc50", "referring_seg/mask_giou", "referring_seg/mask_ciou"):
    assert key in r, sorted(r)


@pytest.mark.slow
@pytest.mark.parametrize("name, keys", [
    ("refcoco_t5xl", ("referring/acc50", "referring_plus/acc50", "referring_g/acc50")),
    ("densecap_t5xl", ("dense_caption/map", "dense_caption/det_map")),
    ("joint_t5xl", ("ln/point_l1", "caption/CIDEr", "referring/mask_giou", "region_caption/CIDEr",
                    "dense_caption/map")),
    ("lisa_t5xl", ("reason_seg/giou", "referring_seg/giou")),
])
def test_other_configs(env, tmp_path, name, keys):
  r = run_and_resume(name, tmp_path / "run", env)
  for key in keys:
    assert key in r, sorted(r)
