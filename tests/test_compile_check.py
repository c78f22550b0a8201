"""pixelground.compile_check: the mesh flag, the OOM message parser, the analytic count it compares
with, and — when libtpu is installed (`pip install -e .[tpu]`) — a deviceless TPU compile of the tiny
config through the command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from pixelground import compile_check as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_mesh():
  assert cc.parse_mesh("data:2,fsdp:8,tensor:1") == {"data": 2, "fsdp": 8, "tensor": 1}
  assert list(cc.parse_mesh("fsdp:-1, data:1")) == ["fsdp", "data"]
  with pytest.raises(ValueError, match="name:size"):
    cc.parse_mesh("data=2")


def test_oom_message():
  g = 2 ** 30
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
         "Used 20.25G of 15.75G hbm. Exceeded hbm capacity by 4.50G.")
  assert cc._oom_bytes(msg) == {"total_bytes": int(20.25 * g), "compiler_hbm_limit_bytes": int(15.75 * g)}
  # libtpu 0.0.42's wording (ln_t5xl on v5e:4x4 with --config.model.eva.remat=none)
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
         "(387.63G) exceeds available HBM (15.75G).")
  assert cc._oom_bytes(msg) == {"temp_bytes": int(387.63 * g), "compiler_hbm_limit_bytes": int(15.75 * g)}
  assert cc._oom_bytes("something else") == {}


def _tiny_config():
  from pixelground.config import schema
  return schema.parse(os.path.join(ROOT, "configs", "ln_t5xl.py:runlocal"))


def test_analytic_flops_is_the_trainers_count():
  from pixelground.parallel import sharding
  from pixelground.training import steps, train_state
  config = _tiny_config()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  a = cc.analytic_flops(config, setup, 8, None)
  assert a["total"] == pytest.approx(steps.StepFlops(config, setup, 8)(None))
  assert sum(a["parts"].values()) == pytest.approx(a["total"])
  assert a["with_remat"] >= a["total"]


def test_abstract_batch_is_batch_sharded():
  from pixelground.parallel import sharding
  from pixelground.training import train_state
  config = _tiny_config()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  setup = train_state.build_setup(config, mesh)
  from pixelground.training import datasets
  batch = datasets.abstract_batch(config, setup, 16, None)
  assert batch["image"].shape == (16, 64, 64, 3) and batch["task_id"].shape == (16,)
  assert batch["image"].sharding.spec[0] == "data"


def _libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _libtpu_available(), reason="libtpu not installed (pip install -e .[tpu])")
def test_compile_tiny_for_v5e():
  cmd = [sys.executable, "-m", "pixelground.compile_check", "--config=configs/ln_t5xl.py:runlocal",
         "--topology=v5e:2x2", "--batch=8", "--task=ln"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  if proc.returncode == 3:  # libtpu present but cannot describe topologies here
    pytest.skip(proc.stderr.strip().splitlines()[-1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.strip().splitlines()
  report = json.loads(out[-1])
  assert "FITS" in proc.stdout and "Memory per chip" in proc.stdout
  assert report["chips"] == 4 and report["chip"] == "v5e" and report["device_kind"] == "TPU v5 lite"
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report["task"] == "ln" and report["heads"] == []
  mem = report["memory"]
  assert mem["argument_bytes"] > 0 and mem["total_bytes"] > 0 and report["fits"] is True
  assert report["compiled_flops"] > 0 and report["analytic_flops"] > 0
  # Full remat on EVA02 and T5, as at full size: compiled ≈ analytic + their forward recompute.
  assert 0.85 < report["flops_ratio"] / report["expected_ratio_with_remat"] < 1.15
  assert report["peak_tflops"] == 197.0
  assert report["step_seconds_at_50_mfu"] == pytest.approx(2 * report["step_seconds_at_100_mfu"])
  # Data parallel over 4 chips: the gradients are summed across them every step.
  coll = report["collectives"]
  assert coll["all-reduce"]["count"] + coll["reduce-scatter"]["count"] > 0
  assert "Collectives per chip per step" in proc.stdout
