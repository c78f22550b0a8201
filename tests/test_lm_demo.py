"""The interim main job trains a tiny T5 that really learns; config overrides are checked by name."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(tmp_path, *overrides):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "pixelground.lm_demo", "--config=configs/t5_lm_demo.py",
         f"--workdir={tmp_path}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_demo_learns_to_reverse_on_a_2_device_mesh(tmp_path):
  proc = run_demo(tmp_path, "--config.steps=450", "--config.mesh.data=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == json.load(open(tmp_path / "metrics.json"))
  assert result["greedy_exact_match"] >= 0.8, result
  assert result["beam_exact_match"] >= 0.8, result
  assert "mesh {'data': 2" in proc.stdout


def test_misspelt_config_key_is_named(tmp_path):
  proc = run_demo(tmp_path, "--config.t5.d_modle=8")
  assert proc.returncode != 0
  assert "d_modle" in proc.stderr
