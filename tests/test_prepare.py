"""`python -m tfds_builders.prepare`: the CLI builds image_text in-process and on Beam's DirectRunner into
identical datasets (record by record: same files, order, keys, image bytes, pixels, captions), reports
the planted skips by reason in its JSON summary, and rejects bad arguments with exit code 2 and one
line naming the flag. Also: the sdist Beam builds from `--setup_file=./setup.py` for distributed
workers carries `tfds_builders`, and installs into an importable package."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from test_image_text import _check, _parquet_fixture, _read_all, _webdataset_fixture
from tfds_builders import prepare
from tfds_builders.image_text import ImageText

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = {"webdataset": _webdataset_fixture, "parquet": _parquet_fixture}


def _cli(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tfds_builders.prepare", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _summary(proc) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _records(builder) -> list[list[dict]]:
  """Per array_record file, its records in order, parsed but not decoded (images stay encoded bytes)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  from tensorflow_datasets.core import example_parser

  parser = example_parser.ExampleParserNp(builder.info.features.get_serialized_info())
  out = []
  for path in builder.info.splits["train"].filepaths:
    source = ArrayRecordDataSource([str(path)])
    out.append([parser.parse_example(source[i]) for i in range(len(source))])
  return out


@pytest.mark.parametrize("config", ["webdataset", "parquet"])
def test_direct_runner_build_equals_in_process_build(tmp_path, config):
  manual = tmp_path / "raw"
  manual.mkdir()
  expected, skips = FIXTURES[config](manual)
  common = ["--builder=image_text", f"--config={config}", f"--manual_dir={manual}", "--num_shards=2"]
  local = _summary(_cli(*common, f"--data_dir={tmp_path / 'local'}"))
  beam = _summary(_cli(*common, f"--data_dir={tmp_path / 'beam'}", "--beam_runner=DirectRunner"))
  print(f"{config}: in-process {local['wall_s']} s, DirectRunner {beam['wall_s']} s (build only)")

  assert (local["runner"], beam["runner"]) == ("in-process", "DirectRunner")
  for s in (local, beam):
    assert s["examples"] == {"train": len(expected)}
    assert s["skipped"] == {"train": skips}  # in-process: builder counts; Beam: metrics counters
    assert s["files"] == 2 and s["reused"] is False
    assert sum(skips.values()) > 0 and len(skips) >= 4

  built = {name: ImageText(data_dir=str(tmp_path / name), config=config) for name in ("local", "beam")}
  _check(_read_all(built["local"]), expected)  # pixels, captions, language, score as planted
  # Example by example, field by field (images as the stored bytes; the serialized records themselves
  # differ only in the protobuf map's field order).
  files = {name: _records(b) for name, b in built.items()}
  assert len(files["local"]) == len(files["beam"]) == 2
  # The same global order (both sort by hashed key); the split points between files may differ (the
  # in-process writer cuts equal counts, Beam's by hash range).
  records = {name: [r for f in fs for r in f] for name, fs in files.items()}
  assert [r["key"] for r in records["local"]] == [r["key"] for r in records["beam"]]
  for a, b in zip(records["local"], records["beam"]):
    assert a.keys() == b.keys() == {"image", "text", "key", "language", "score"}
    assert isinstance(a["image"], bytes) and a["image"] == b["image"], a["key"]
    for name in ("text", "key", "language", "score"):
      assert np.array_equal(a[name], b[name]), (a["key"], name)
  keys = sorted(r["key"].decode() for r in records["local"])
  assert keys == sorted(expected)
  # And decoded the way training reads them (as_data_source: uint8 pixels).
  decoded = {name: _read_all(b) for name, b in built.items()}
  for key in keys:
    for name in ("image", "text", "language", "score"):
      np.testing.assert_array_equal(decoded["local"][key][name], decoded["beam"][key][name])

  # A second run finds the dataset prepared: reused as it is, its stored counts reported.
  again = _summary(_cli(*common, f"--data_dir={tmp_path / 'beam'}"))
  assert again["reused"] is True and again["skipped"] == {"train": skips}
  assert again["examples"] == beam["examples"] and again["files"] == 2
  # --overwrite rebuilds it (here into 3 files instead of 2).
  redo = _summary(_cli(*common[:-1], "--num_shards=3", f"--data_dir={tmp_path / 'beam'}", "--overwrite"))
  assert (redo["reused"], redo["files"], redo["skipped"]) == (False, 3, {"train": skips})
  assert len(list((tmp_path / "beam").glob("image_text/*/*/*.array_record-*"))) == 3


@pytest.mark.parametrize("args, flag", [
    (["--builder=webli"], "--builder"),
    (["--builder=image_text", "--config=laion"], "--config"),
    (["--builder=image_text", "--manual_dir=/nonexistent/raw"], "--manual_dir"),
    (["--builder=image_text", "--config=webdataset"], "--manual_dir"),  # no *.tar there
    (["--builder=refcoco", "--beam_runner=DirectRunner"], "--beam_runner"),  # in-process only
    (["--builder=image_text", "--config=parquet", "--beam_runner=NoSuchRunner"], "--beam_runner"),
    (["--builder=image_text", "--config=parquet", "--beam_options=--no_such_option=1"],
     "--beam_options"),
    (["--builder=image_text", "--config=parquet", "--beam_runner=DataflowRunner"], "--beam_options"),
    (["--builder=image_text", "--num_shards=0"], "--num_shards"),
])
def test_bad_arguments_exit_2_naming_the_flag(tmp_path, args, flag):
  manual = tmp_path / "raw"
  manual.mkdir()
  _parquet_fixture(manual)
  given = {a.split("=")[0] for a in args}
  defaults = [f"--manual_dir={manual}"] * ("--manual_dir" not in given)
  proc = _cli(*args, *defaults, f"--data_dir={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith(f"prepare: error: {flag}: "), proc.stderr
  assert "Traceback" not in proc.stderr
  assert not any(line.startswith("{") for line in proc.stdout.splitlines())  # no summary
  assert not list((tmp_path / "out").glob("**/dataset_info.json"))  # nothing prepared


def test_missing_required_flag_is_named(tmp_path, capsys):
  assert prepare.main(["--builder=image_text", f"--data_dir={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.endswith("required: --manual_dir"), err


def test_registry_matches_the_training_datasets():
  from pixelground.training import datasets

  assert datasets.DATASETS is prepare.BUILDERS
  for name in ("localized_narratives", "refcoco", "image_text"):
    module, cls = prepare.BUILDERS[name]
    assert hasattr(__import__(module, fromlist=[cls]), cls)


def test_setup_file_sdist_carries_the_builders(tmp_path):
  """What Beam does with `--setup_file=./setup.py`: build an sdist (its own Stager code), which every
  worker pip-installs; the installed copy must import `tfds_builders.image_text`."""
  from apache_beam.runners.portability.stager import Stager

  sdist = Stager._build_setup_package(os.path.join(REPO, "setup.py"), str(tmp_path))
  with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  for module in ("__init__", "common", "image_text", "prepare"):
    assert f"tfds_builders/{module}.py" in names, sorted(names)[:20]
  assert "pixelground/data/vocab/tiny.model" in names
  target = tmp_path / "site"
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--no-build-isolation", "-q", "--target", str(target), sdist],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert pip.returncode == 0, pip.stderr[-2000:]
  probe = subprocess.run(
      [sys.executable, "-c", "import tfds_builders.image_text as m, tfds_builders.prepare as p; "
       "print(m.__file__); print(m.ImageText.SUPPORTS_BEAM, len(p.BUILDERS))"],
      capture_output=True, text=True, timeout=120, cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu"))
  assert probe.returncode == 0, probe.stderr[-2000:]
  path, flags = probe.stdout.strip().splitlines()[-2:]
  assert path.startswith(str(target)) and flags == "True 8", probe.stdout


@pytest.mark.slow
def test_direct_runner_worker_processes(tmp_path):
  """DirectRunner in multi_processing mode: the shards are read in separate SDK worker processes (which
  import tfds_builders on their own, as remote workers do); their skip counters reach the summary."""
  manual = tmp_path / "raw"
  manual.mkdir()
  expected, skips = _parquet_fixture(manual)
  _webdataset_fixture(manual)  # tar shards beside the tables: the parquet config ignores them
  out = _summary(_cli("--builder=image_text", "--config=parquet", f"--manual_dir={manual}",
                      f"--data_dir={tmp_path / 'mp'}", "--beam_runner=DirectRunner",
                      "--beam_options=--direct_num_workers=2 --direct_running_mode=multi_processing"))
  assert out["examples"] == {"train": len(expected)} and out["skipped"] == {"train": skips}
  _check(_read_all(ImageText(data_dir=str(tmp_path / "mp"), config="parquet")), expected)


def _documented_commands() -> list[str]:
  """Every `python -m tfds_builders.prepare` command in the README's shell blocks and the webli
  config's header, with line continuations joined."""
  readme = open(os.path.join(REPO, "tfds_builders", "README.md"), encoding="utf-8").read()
  blocks = [b.split("```", 1)[0] for b in readme.split("```sh\n")[1:]]
  blocks.append(open(os.path.join(REPO, "configs", "webli_pretrain_t5xl.py"), encoding="utf-8").read())
  commands = []
  for block in blocks:
    text = block.replace("\\\n", " ")
    commands += [line.split("python -m tfds_builders.prepare", 1)[1] for line in text.splitlines()
                 if "python -m tfds_builders.prepare " in line and not line.lstrip().startswith("#")]
  return commands


def test_documented_commands_are_valid():
  """The documented commands parse, and their Beam options are options Beam knows and its validator
  accepts for that runner (Dataflow's project / region / temp_location included); nothing runs."""
  import shlex
  commands = _documented_commands()
  assert len(commands) >= 6, commands
  runners = set()
  for command in commands:
    args = prepare.parse_args(shlex.split(command))
    builder_cls, config = prepare.builder_class(args)
    assert (args.builder, config) == ("image_text", "webdataset")
    _, options, runner = prepare._beam_setup(args, builder_cls)
    runners.add(runner)
    if runner in ("DataflowRunner", "FlinkRunner", "SparkRunner"):
      assert options.get_all_options()["setup_file"] == "./setup.py", command
  assert runners == {"in-process", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner"}
