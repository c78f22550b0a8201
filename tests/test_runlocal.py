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

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(cli_env):
  return cli_env


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


@pytest.fixture(scope="module")
def ln_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ln_t5xl") / "run"
  return workdir, run_and_resume("ln_t5xl", workdir, env)


def test_ln_t5xl(ln_run):
  _, r = ln_run
  for key in ("ln/point_l1", "ln/ndtw", "ln/token_acc", "caption/CIDEr", "caption/token_acc"):
    assert key in r, sorted(r)


def _flat_state(state) -> dict[str, np.ndarray]:
  from flax import nnx
  return {".".join(map(str, p)): np.asarray(v.get_value()) for g in ("params", "frozen")
          for p, v in nnx.to_flat_state(state[g])}


def _staged(name: str, ln_workdir):
  """(state after init + init_from the LN run, a fresh state of the same config, the report)."""
  import jax

  from pixelground.config import schema
  from pixelground.config.parse import load_config
  from pixelground.parallel import sharding
  from pixelground.training import train_state, weights

  c = load_config(os.path.join(ROOT, "configs", f"{name}.py:runlocal"))
  c.init_from.path = str(ln_workdir)
  config = schema.parse(c)
  setup = train_state.build_setup(config, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                             devices=jax.devices()[:1]))
  fresh = _flat_state(train_state.init_state(setup))
  state, report = weights.init_from(setup, train_state.init_state(setup), config.init_from)
  return _flat_state(state), fresh, report


def _ln_checkpoint(workdir) -> dict[str, np.ndarray]:
  import jax
  import orbax.checkpoint as ocp

  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "30", "state"))
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path({"params": tree["params"], "frozen": tree["frozen"]}):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    out[".".join(map(str, keys[1:-1]))] = np.asarray(leaf)
  return out


def test_staged_init_from_the_ln_run(ln_run, env, tmp_path):
  """refcoco_t5xl:runlocal from the LN run: every parameter is shared and starts bit-identical to the
  LN checkpoint; refseg_t5xl:runlocal from it: the shared ones too, its new heads (mask adapter and
  SAM mask decoder) as a fresh initialisation makes them. The CLI prints the table."""
  workdir, _ = ln_run
  ln = _ln_checkpoint(workdir)
  state, fresh, report = _staged("refcoco_t5xl", workdir)
  assert set(state) == set(ln) and not report.new and not report.ignored
  assert sorted(report.loaded) == sorted(ln)
  for k, v in state.items():
    assert v.dtype == ln[k].dtype and np.array_equal(v, ln[k]), k
  state, fresh, report = _staged("refseg_t5xl", workdir)
  new = {k for k in state if k not in ln}
  assert new and {k.split(".")[0] for k in new} == {"mask_adapter", "mask_decoder"}
  assert sorted(report.new) == sorted(new) and sorted(report.loaded) == sorted(set(state) & set(ln))
  for k, v in state.items():
    assert np.array_equal(v, ln[k] if k in ln else fresh[k]), k
  # Through the trainer: the header's chained command prints the table (one step is enough here).
  cmd = command("refcoco_t5xl", tmp_path / "refcoco") + [f"--config.init_from.path={workdir}",
                                                         "--stop_after=1"]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert f"config.init_from = {workdir}/checkpoints/30: {len(ln)} loaded, 0 new, 0 ignored" in p.stdout
  # The same command again resumes its own checkpoint and leaves init_from alone.
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "Resumed from the checkpoint at step 1" in p.stdout and "is not used" in p.stdout
  assert "loaded," not in p.stdout
  assert "--config.init_from.path=" in _header("refcoco_t5xl")


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
    ("png_gella_t5xl", ("png/ar", "png/ar_things", "png/ar_stuff", "png/ar_singular", "png/ar_plural",
                        "png/acc50")),
    ("panoptic_gella_t5xl", ("panoptic/pq", "panoptic/pq_things", "panoptic/pq_stuff", "panoptic/sq",
                             "panoptic/rq")),
])
def test_other_configs(env, tmp_path, name, keys):
  r = run_and_resume(name, tmp_path / "run", env)
  for key in keys:
    assert key in r, sorted(r)


@pytest.mark.slow
def test_webli_pretrain_t5xl(env, tmp_path):
  """Filtered web captioning through the trainer: the planted share of each filter's failures is
  dropped, counted and logged; the run stops, resumes and finishes like every config."""
  run_and_resume("webli_pretrain_t5xl", tmp_path / "run", env)
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  window = [r for r in rows if "data/dropped_fraction" in r]
  assert window
  total = {k: sum(r[k] for r in window) for k in window[0] if k.startswith("data/dropped/")}
  total_kept = 30 * 8  # every step's batch holds kept records only
  dropped = sum(total.values())
  assert total["data/dropped/web/small_image"] == 0 and total["data/dropped/web/caption_too_long"] == 0
  for reason in ("language", "low_score", "caption_too_short"):  # a tenth of the records each
    share = total[f"data/dropped/web/{reason}"] / (dropped + total_kept)
    assert 0.05 < share < 0.16, (reason, total)
