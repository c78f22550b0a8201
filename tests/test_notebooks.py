"""The notebooks in notebooks/: their structure (fast), and a headless run of each (slow) against a small
checkpoint trained here by the real trainer (tests/configs/notebook_small.py), executed with nbclient
in a kernel on this interpreter, with the "parameters" cell replaced to point at that checkpoint."""

import glob
import json
import os
import subprocess
import sys

import pytest

import trainer_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "configs", "notebook_small.py")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
KERNEL = "pixelground-test"


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, "expected exactly one cell tagged 'parameters'"
  return cells[0]


def test_notebooks_found():
  assert set(NAMES) >= {"evaluate_refcoco.ipynb", "localized_narratives_traces.ipynb",
                        "panoptic_narrative_grounding.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_structure(path):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
  assert nb.nbformat == 4
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
  code = [c for c in nb.cells if c.cell_type == "code"]
  for c in code:  # committed without outputs
    assert c.outputs == [] and c.execution_count is None, c.source[:80]
  # First code cell: the Colab install, guarded so it does nothing outside Colab.
  assert '"google.colab" in sys.modules' in code[0].source
  assert "!pip install" in code[0].source
  params = _parameters_cell(nb)
  assert code.index(params) == 1
  for name in ("CHECKPOINT", "CONFIG", "DATA_DIR", "MAX_EXAMPLES"):
    assert f"\n{name} = " in "\n" + params.source, name


# ------------------------------------------------------------------------------------------------------
# Headless execution
# ------------------------------------------------------------------------------------------------------

def _env(cache):
  """Environment of the trainer and the kernels: CPU, the test's dataset cache, the repository on the
  path, and one host device (conftest forces 8 for the in-process tests; batch 8 runs on one)."""
  # Compiled programs go to the user's pixelground cache (where the trainer puts them by default), not
  # the throwaway one: compilation is most of this test's time, and a second run skips it.
  xla = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser(os.environ.get("PIXELGROUND_CACHE", "~/.cache/pixelground")), "xla")
  e = dict(os.environ, PIXELGROUND_CACHE=str(cache), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
           XLA_FLAGS=trainer_cli.xla_flags(None),
           JAX_COMPILATION_CACHE_DIR=xla)
  e.pop("CUDA_VISIBLE_DEVICES", None)
  e.pop("MPLBACKEND", None)  # ipykernel then picks the inline backend
  return e


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 20-step checkpoint of the notebook config (the real trainer in a subprocess)."""
  cache = tmp_path_factory.mktemp("cache")
  workdir = tmp_path_factory.mktemp("workdir")
  p = subprocess.run([sys.executable, "-m", "pixelground.train", f"--config={CONFIG}",
                      f"--workdir={workdir}"], env=_env(cache), cwd=ROOT, capture_output=True, text=True,
                     timeout=1200)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "20"))
  return {"cache": cache, "workdir": str(workdir)}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernelspec running this interpreter (not whatever `python3` kernel the user has installed)."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "pixelground test", "language": "python"}))
  return str(root)


def _execute(path, params: str, trained, kernel_dir, out_dir, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  _parameters_cell(nb).source = params
  monkeypatch.setenv("JUPYTER_PATH", kernel_dir)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                                   resources={"metadata": {"path": ROOT}})
  try:
    client.execute(env=_env(trained["cache"]))
  finally:  # kept for a look when something fails
    nbformat.write(nb, os.path.join(out_dir, "executed_" + os.path.basename(path)))
  text, images = [], 0
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      assert o.output_type != "error", "".join(o.get("traceback", []))
      if o.output_type == "stream":
        text.append(o.text)
      elif "image/png" in o.get("data", {}):
        images += 1
  return "".join(text), images


def _params(trained, out_dir, **extra):
  lines = {"CHECKPOINT": trained["workdir"], "CONFIG": CONFIG, "DATA_DIR": "", "MAX_EXAMPLES": 8,
           "NUM_PICTURES": 2, "OUTPUT_DIR": str(out_dir), **extra}
  return "\n".join(f"{k} = {v!r}" for k, v in lines.items())


def _metrics_line(text):
  """The metrics dict the notebook prints as JSON."""
  lines = [l for l in text.splitlines() if l.startswith('{"step"')]
  assert lines, text[-2000:]
  return json.loads(lines[-1])


@pytest.mark.slow
def test_evaluate_refcoco_notebook(trained, kernel_dir, tmp_path, monkeypatch):
  path = os.path.join(ROOT, "notebooks", "evaluate_refcoco.ipynb")
  text, images = _execute(path, _params(trained, tmp_path, SPLIT=None, BATCH_SIZE=None), trained,
                          kernel_dir, tmp_path, monkeypatch)
  m = _metrics_line(text)
  assert m["step"] == 20 and m["referring/count"] == 8 and m["reason_seg/count"] == 8
  assert 0 <= m["referring/acc50"] <= 1 and "referring/mask_giou" in m
  assert images >= 3  # IoU histograms, best/worst grid, ReasonSeg grid
  assert {"referring_best_worst.png", "reason_seg.png", "eval_notebook_20.json",
          "predictions_notebook_20.jsonl"} <= set(os.listdir(tmp_path))
  # The Predictor's box is the evaluation's box (same teacher-forced read-out).
  gap = float(text.split("max difference ")[1].split()[0])
  assert gap < 0.5, gap


@pytest.mark.slow
def test_localized_narratives_notebook(trained, kernel_dir, tmp_path, monkeypatch):
  path = os.path.join(ROOT, "notebooks", "localized_narratives_traces.ipynb")
  text, images = _execute(path, _params(trained, tmp_path, SPLIT=None, BATCH_SIZE=None), trained,
                          kernel_dir, tmp_path, monkeypatch)
  m = _metrics_line(text)
  assert m["step"] == 20 and m["ln/count"] == 8
  for k in ("ln/point_l1", "ln/ndtw", "ln/word_ndtw", "ln/lbm"):
    assert k in m, k
  assert 0 <= m["ln/ndtw"] <= 1
  assert "generated:" in text and images >= 2
  assert "ln_traces.png" in os.listdir(tmp_path)


@pytest.mark.slow
def test_panoptic_narrative_grounding_notebook(trained, kernel_dir, tmp_path, monkeypatch):
  path = os.path.join(ROOT, "notebooks", "panoptic_narrative_grounding.ipynb")
  params = _params(trained, tmp_path, DATASET="panoptic_narrative_grounding/grounded_shapes",
                   SPLIT="validation")
  text, images = _execute(path, params, trained, kernel_dir, tmp_path, monkeypatch)
  assert "ground truth as prediction: AR = 1.0000" in text
  with open(tmp_path / "png_metrics.json") as f:
    results = json.load(f)
  assert results["ground truth"]["ar"] == pytest.approx(0.99999, abs=1e-12)  # the benchmark's maximum
  assert results["whole image"]["ar"] < 0.9
  for name, r in results.items():  # every split counted: things + stuff = singular + plural = all
    assert r["count_things"] + r["count_stuff"] == r["count"] == r["count_singular"] + r["count_plural"]
  assert images >= 5  # examples, recall curves, baselines; the model's curve and examples
  with open(tmp_path / "png_model_metrics.json") as f:  # the GELLA checkpoint's part
    model = json.load(f)
  assert model["step"] == 20 and model["count"] > 0 and 0 <= model["ar"] <= 1
  assert "png_model_examples.png" in os.listdir(tmp_path)
