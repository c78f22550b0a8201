"""Test session set-up: 8 fake CPU devices for mesh tests, float32 matmuls, `--runslow`."""

import os

# Must be set before jax is imported anywhere: 8 host devices stand in for a TPU slice. LLVM at -O1
# instead of -O2: most of a test's time is compiling, and -O1 compiles ~20% faster (same numbers: no
# fast-math either way).
FAST_COMPILE = "--xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = (f"{FAST_COMPILE} " + os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
import trainer_cli  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="also run @pytest.mark.slow tests")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slow test, run with --runslow (make test-all)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow or `make test-all`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
  """Environment for the CLI subprocess tests: one CPU device as on a user's machine (no forced device
  count), the repository importable, one grounded-shapes + XLA compilation cache for the whole session
  (the runlocal configs share their synthetic data and many compiled programs)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  e = dict(os.environ, PIXELGROUND_CACHE=str(tmp_path_factory.mktemp("cli_cache")), JAX_PLATFORMS="cpu",
           PYTHONPATH=root)
  e["XLA_FLAGS"] = trainer_cli.xla_flags(None)
  return e
