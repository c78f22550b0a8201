"""Helpers for the tests that run the trainer CLI as subprocesses (`test_train`, `test_faults`):
tests/configs/train_small.py on the fake 8-device CPU mesh, or 2 processes × 4 devices over gloo."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "configs", "train_small.py")


def xla_flags(devices: int | None) -> str:
  """The test session's XLA flags (conftest's compile settings) with `devices` host devices (None: no
  forced count, one CPU device as on a user's machine)."""
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if "xla_force_host_platform_device_count" not in f]
  return " ".join(keep + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))


def environment(cache) -> dict:
  """Subprocess environment: 8 CPU devices, the repository importable, `cache` for data + XLA."""
  e = dict(os.environ, PIXELGROUND_CACHE=str(cache), XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu",
           PYTHONPATH=ROOT)
  e.pop("CUDA_VISIBLE_DEVICES", None)
  return e


def cmd(workdir, *extra, config=CONFIG) -> list[str]:
  return [sys.executable, "-m", "pixelground.train", f"--config={config}", f"--workdir={workdir}", *extra]


def run(env, workdir, *extra, timeout=900, config=CONFIG) -> str:
  """Runs the trainer to the end; its stdout (asserting exit status 0)."""
  p = subprocess.run(cmd(workdir, *extra, config=config), env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p.stdout


def processes(env, workdir, count: int, *extra, config=CONFIG) -> list[subprocess.Popen]:
  """The trainer as `count` processes × 8 / count CPU devices (gloo), each in its own process group."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  e = dict(env, XLA_FLAGS=xla_flags(8 // count))
  return [subprocess.Popen(cmd(workdir, *extra, f"--coordinator_address=127.0.0.1:{port}",
                               f"--num_processes={count}", f"--process_id={pid}", config=config),
                           env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
          for pid in range(count)]


def two_processes(env, workdir, *extra) -> list[subprocess.Popen]:
  """The trainer as 2 processes × 4 CPU devices."""
  return processes(env, workdir, 2, *extra)


def finish(procs, timeout=900) -> list[str]:
  """Waits for every process; their outputs (asserting exit status 0)."""
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  assert not failed, "\n".join(f"process {i}:\n{outs[i][-3000:]}" for i in failed)
  return outs


def losses(workdir, key="train/total") -> dict[int, float]:
  """{step: value} of one logged scalar from WORKDIR/metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if key in r:
        out[r["step"]] = float(r[key])
  return out


def params(workdir, step) -> dict[str, np.ndarray]:
  """Every leaf of the train state saved at `step` (parameters, optimizer moments, step)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ck = ocp.StandardCheckpointer()
  # Onto this process's first device, whatever topology saved it (e.g. 2 processes × 4 devices).
  meta = ck.metadata(path)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                        getattr(meta, "item_metadata", meta))
  tree = ck.restore(path, target)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def saved_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def assert_equal_states(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  bad = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not bad, f"{len(bad)} leaves differ, e.g. {bad[:3]}"


def kill_when(procs, ready, timeout=900) -> None:
  """SIGKILLs every process (and its children) as soon as `ready()` is true; fails if one ended
  before (with its output) or `timeout` seconds pass."""
  import signal
  import time
  deadline = time.time() + timeout
  while not ready():
    ended = [p for p in procs if p.poll() is not None]
    assert not ended, "a process ended before the kill:\n" + ended[0].stdout.read()[-3000:]
    assert time.time() < deadline, "timed out waiting to kill"
    time.sleep(0.02)
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()
