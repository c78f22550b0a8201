"""GELLA inference (`Predictor.ground` / `Predictor.panoptic`, `predict --task=ground|panoptic`) on a saved
tiny GELLA checkpoint (configs/png_gella_t5xl.py:runlocal, random weights: the tests check plumbing,
geometry and input handling, not quality). CLI runs are subprocesses, as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flax import nnx

from pixelground.data import tasks as task_lib
from pixelground.data import tokenizer as tok_lib
from pixelground.inference import grounded
from pixelground.inference.predictor import Predictor
from pixelground.metrics.panoptic import id_to_rgb, read_panoptic_png
from pixelground.models import pixelllm as P
from workdirs import random_workdir  # tests/workdirs.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "coco_panoptic_sample")
PHOTO, PANOPTIC = "input_images/000000142238.jpg", "panoptic_examples/000000142238.png"
CAPTION = "A red circle and a blue square lie on the grass, next to a Red Circle."
PHRASES = ["a red circle", "a blue square", "the grass", "a red circle", "a tree"]
CATEGORIES = [{"id": 1, "name": "circle", "isthing": 1}, {"id": 2, "name": "square", "isthing": 1},
              {"id": 7, "name": "grass-merged", "isthing": 0}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """config.json + checkpoints/<step>/state of the tiny GELLA config, random leaves (as test_predict)."""
  return random_workdir(os.path.join(ROOT, "configs", "png_gella_t5xl.py:runlocal"), tmp_path_factory.mktemp("gella_run"), 3)


@pytest.fixture(scope="module")
def predictor(workdir):
  return Predictor.from_checkpoint(str(workdir))


def _scene(h=48, w=80):
  """A random image and an id map of 3 disjoint entities (ids 2, 5, 9) + void."""
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  ids = np.zeros((h, w), np.int64)
  ids[:, :20] = 5
  ids[10:30, 30:60] = 9
  ids[35:, 40:] = 2
  return image, ids


def test_ground_given_phrases_matches_the_converter(workdir, predictor, monkeypatch):
  """Teacher-forced grounding: one result per phrase, spans in the caption, masks = unions of the given
  entities on the original image; the model batch is what `Converters.narrative_grounding` writes for
  the same caption, phrases and segments (prompt, target, `[SEG]` positions, entity masks)."""
  assert predictor.max_entities == 32
  image, ids = _scene()
  seen = {}
  real = grounded._teacher_forced

  def spy(model, batch):
    seen.update(batch)
    return real(model, batch)

  monkeypatch.setattr(grounded, "_teacher_forced", spy)
  res = predictor.ground(image, CAPTION, ids, phrases=PHRASES)
  assert [r.text for r in res] == PHRASES
  assert [r.span for r in res] == [(0, 12), (17, 30), (38, 47), (57, 69), (-1, -1)]
  assert CAPTION[57:69] == "a Red Circle"
  for r in res:
    assert r.entities and set(r.entities) <= {2, 5, 9} and 0 < r.score <= 1
    np.testing.assert_array_equal(r.mask, np.isin(ids, r.entities))
  # The same entities as an (E, H, W) stack: indices into the stack, the same association.
  stack = np.stack([ids == 2, ids == 5, ids == 9])
  res2 = predictor.ground(image, CAPTION, stack, phrases=PHRASES)
  for a, b in zip(res, res2):
    assert [[2, 5, 9][i] for i in b.entities] == a.entities
    np.testing.assert_array_equal(a.mask, b.mask)
  # The converter's row for the same example (evaluation geometry).
  from pixelground.config import schema
  cfg = schema.parse(str(workdir / "config.json"))
  conv = task_lib.Converters(cfg.task_config(train=False), predictor.tok)
  ex = {"caption": CAPTION, "image": image, "panoptic": id_to_rgb(ids),
        "segments": {"id": np.asarray([2, 5, 9])}, "phrase_offsets": np.asarray([0, 1, 2, 3, 4, 5]),
        "phrase_segment_ids": np.asarray([2, 5, 9, 2, 5]),
        "phrases": {"utterance": PHRASES, "noun": [True] * len(PHRASES)}}
  row = conv.narrative_grounding(ex, np.random.default_rng(0))
  n = int(row["target_mask"].sum())
  np.testing.assert_array_equal(np.asarray(seen["target_ids"])[0, :n], row["target_ids"][:n])
  k = int(row["seg_valid"].sum())
  np.testing.assert_array_equal(np.asarray(seen["seg_positions"])[0, :k], row["seg_positions"][:k])
  np.testing.assert_array_equal(np.asarray(seen["prompt_ids"])[0], row["prompt_ids"])
  np.testing.assert_array_equal(np.asarray(seen["entity_masks"])[0, :3], row["entity_masks"][:3])
  assert np.asarray(seen["entity_masks"]).shape[1] == 32 == row["entity_masks"].shape[0]


def test_generated_grounding_and_panoptic(predictor, monkeypatch):
  """Greedy decoding paths on the device (random weights: any phrases, checked for shape and unions),
  then the host logic on a scripted generation: phrases before each `[SEG]`, categories parsed from
  the names, segments = unions of the given entities."""
  image, ids = _scene()
  for r in predictor.ground(image, CAPTION, ids, max_len=24):
    assert set(r.entities) <= {2, 5, 9}
    np.testing.assert_array_equal(r.mask, np.isin(ids, r.entities))
  assert isinstance(predictor.generated, str)
  id_map, segs = predictor.panoptic(image, ids, categories=CATEGORIES, max_len=24)
  assert id_map.shape == ids.shape and id_map.dtype == np.int32
  for e in (2, 5, 9):  # every entity lies in one segment (or void) whole
    assert len(np.unique(id_map[ids == e])) == 1
  assert sorted(s["id"] for s in segs) == sorted(set(np.unique(id_map)) - {0})

  # Scripted: "circle [SEG] square [SEG] grass [SEG]"; entity slots are ids ascending (2, 5, 9).
  tok, seg = predictor.tok, predictor.model.cfg.seg_token_id
  toks, pos = [], []
  for name in ("circle", "square", "grass"):
    toks += tok.encode(name)
    pos.append(len(toks))
    toks.append(seg)
  toks.append(tok.eos_id)
  logits = np.full((1, len(toks), 32), -5.0, np.float32)
  for k, slot in enumerate((2, 0, 1)):  # circle ↔ id 9, square ↔ id 2, grass ↔ id 5
    logits[0, pos[k], slot] = 4.0
  fake = lambda model, batch, **kw: (np.asarray([toks]), np.asarray([len(toks)]), logits)
  monkeypatch.setattr(grounded, "_generated", fake)
  res = predictor.ground(image, "a circle, a square and grass", ids)
  assert [(r.text, r.span, r.entities) for r in res] == [
      ("circle", (2, 8), [9]), ("square", (12, 18), [2]), ("grass", (23, 28), [5])]
  id_map, segs = predictor.panoptic(image, ids, categories=CATEGORIES)
  cat = {s["id"]: s["category_id"] for s in segs}
  for e, c in ((9, 1), (2, 2), (5, 7)):
    assert len(np.unique(id_map[ids == e])) == 1 and cat[int(id_map[ids == e][0])] == c
  assert (id_map[ids == 0] == 0).all() and len(segs) == 3


def test_bad_calls_raise_clear_errors(predictor):
  image, ids = _scene()
  cases = [
      (lambda: predictor.ground(image, CAPTION, None, phrases=PHRASES),
       "automatic masks need SAM's encoder and mask decoder; this checkpoint has no SAM mask decoder"),
      (lambda: predictor.ground(image, CAPTION, np.zeros_like(ids), phrases=PHRASES), "no entities"),
      (lambda: predictor.ground(image, CAPTION, np.zeros((0, 48, 80), bool)), "no entities"),
      (lambda: predictor.ground(image, CAPTION, np.arange(48 * 80).reshape(48, 80) % 500 + 1),
       r"500 entities exceed .* 32 entity slots .* 215 distinct colormap colours"),
      (lambda: predictor.ground(image, CAPTION, ids[:40]), r"40 \(W×H\)|80×40"),
      (lambda: predictor.ground(image, "...", ids), "no noun phrase to ground"),
      (lambda: predictor.ground(image, CAPTION, ids, phrases=[]), "no noun phrase to ground"),
      (lambda: predictor.ground(image, CAPTION, ids.astype(float)), "integer ids"),
      (lambda: predictor.panoptic(image, ids), "needs the category list"),
  ]
  for call, msg in cases:
    with pytest.raises(ValueError, match=msg):
      call()
  plain = nnx.eval_shape(lambda: P.PixelLLM(P.tiny_config(vocab_size=896), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="needs a GELLA model"):
    Predictor(plain, tok_lib.load_tokenizer("tiny")).ground(image, CAPTION, ids)


# -- the CLI, as a user runs it -----------------------------------------------------------------------

def _cli(env, workdir, *args, timeout=600):
  p = subprocess.run([sys.executable, "-m", "pixelground.predict", f"--checkpoint={workdir}", *args],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def test_cli_bad_inputs_one_line_exit_2(workdir, tmp_path, cli_env):
  image, ids = _scene()
  Image.fromarray(image).save(tmp_path / "img.png")
  Image.fromarray(np.zeros((48, 80), np.uint8)).save(tmp_path / "void.png")
  Image.fromarray(id_to_rgb(np.arange(48 * 80).reshape(48, 80) % 500 + 1)).save(tmp_path / "many.png")
  Image.fromarray(ids[:40, :60].astype(np.uint8)).save(tmp_path / "small.png")
  Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "ok.png")
  img = f"--image={tmp_path / 'img.png'}"
  cases = {
      "no nouns": (["--task=ground", "--text=...", f"--entities={tmp_path / 'ok.png'}"],
                   "no noun phrase to ground"),
      "zero entities": (["--task=ground", f"--text={CAPTION}", f"--entities={tmp_path / 'void.png'}"],
                        "no entities"),
      "500 entities": (["--task=ground", f"--text={CAPTION}", f"--entities={tmp_path / 'many.png'}"],
                       "500 entities exceed"),
      "wrong size": (["--task=panoptic", f"--entities={tmp_path / 'small.png'}"], "60×40"),
      "no entities, no SAM": (["--task=ground", f"--text={CAPTION}"], "give a SAM checkpoint"),
      "no categories": (["--task=panoptic", f"--entities={tmp_path / 'ok.png'}"], "pass --categories"),
  }
  procs = {what: subprocess.Popen([sys.executable, "-m", "pixelground.predict", f"--checkpoint={workdir}",
                                   img, *args], cwd=ROOT, env=cli_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for what, (args, _) in cases.items()}
  for what, p in procs.items():
    _, err = p.communicate(timeout=600)
    msg = cases[what][1]
    assert p.returncode == 2 and msg in err and "Traceback" not in err, (what, err)
    assert len(err.strip().splitlines()) == 1, (what, err)


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason=f"{SAMPLE} not present")
def test_cli_ground_real_photo(workdir, tmp_path, cli_env):
  """A COCO photo with its panoptic PNG as the entities (~20 s: a fresh process compiles the forward)."""
  photo, png = os.path.join(SAMPLE, PHOTO), os.path.join(SAMPLE, PANOPTIC)
  out_png = tmp_path / "ground.png"
  code, out, err = _cli(cli_env, workdir, f"--image={photo}", "--task=ground",
                        "--text=A man sits at a table with a pizza.", "--phrases=A man;a table;a pizza",
                        f"--entities={png}", f"--out={out_png}")
  assert code == 0, err
  res = json.loads(out.strip().splitlines()[-1])
  ids = read_panoptic_png(png)
  assert res["size"] == list(ids.shape) and res["entities"] == len(np.unique(ids[ids != 0]))
  assert [p["text"] for p in res["phrases"]] == ["A man", "a table", "a pizza"]
  assert [tuple(p["span"]) for p in res["phrases"]] == [(0, 5), (14, 21), (27, 34)]
  for p in res["phrases"]:
    assert p["entities"] and set(p["entities"]) <= set(np.unique(ids).tolist()) - {0}
    assert p["mask_pixels"] == int(np.isin(ids, p["entities"]).sum())
  pic = Image.open(out_png)
  assert os.path.getsize(out_png) > 20_000 and pic.size[0] == 640 and pic.size[1] > 427  # + caption strip


@pytest.mark.slow  # one more fresh process compiling the GELLA greedy decoder (~20 s on 2 cores)
@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason=f"{SAMPLE} not present")
def test_cli_panoptic_real_photo(workdir, tmp_path, cli_env):
  photo, png = os.path.join(SAMPLE, PHOTO), os.path.join(SAMPLE, PANOPTIC)
  cats = os.path.join(SAMPLE, "panoptic_coco_categories.json")
  out_png = tmp_path / "panoptic.png"
  code, out, err = _cli(cli_env, workdir, f"--image={photo}", "--task=panoptic", f"--entities={png}",
                        f"--categories={cats}", f"--out={out_png}")
  assert code == 0, err
  res = json.loads(out.strip().splitlines()[-1])
  names = {c["id"]: c["name"] for c in json.load(open(cats))}
  for s in res["segments"]:
    assert s["category"] == names[s["category_id"]] and s["area"] > 0
  assert os.path.getsize(out_png) > 20_000


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
  """A small SAM giving point-local masks (tests/sam_reference.disk_sam), in segment-anything's layout."""
  torch = pytest.importorskip("torch")
  import sam_reference as ref  # tests/sam_reference.py
  with ref.torchvision_standin():
    pytest.importorskip("segment_anything")
  path = tmp_path_factory.mktemp("sam") / "sam_disk.pth"
  torch.save(ref.disk_sam().state_dict(), path)
  return str(path)


def test_ground_with_automatic_entities(workdir, sam_file):
  """Without entities, SAM's automatic masks are the entities."""
  from pixelground.inference.auto_masks import entity_id_map
  pred = Predictor.from_checkpoint(str(workdir), sam_checkpoint=sam_file)
  rng = np.random.default_rng(3)
  image = np.zeros((96, 128, 3), np.uint8)
  image[:] = (30, 120, 40)
  image[10:50, 10:60] = (220, 30, 30)
  image[40:90, 70:120] = (30, 30, 220)
  image = np.clip(image + rng.integers(0, 8, image.shape), 0, 255).astype(np.uint8)
  ids = entity_id_map(pred.auto_masks(image), image.shape[:2], 32)
  assert ids.max() >= 2
  res = pred.ground(image, CAPTION, phrases=PHRASES)
  for r in res:
    assert r.entities and set(r.entities) <= set(range(1, ids.max() + 1))
    np.testing.assert_array_equal(r.mask, np.isin(ids, r.entities))


@pytest.mark.slow  # a fresh process compiling SAM and the GELLA forward (~20 s on 2 cores)
def test_cli_ground_automatic_entities(workdir, sam_file, tmp_path, cli_env):
  photo = os.path.join(SAMPLE, PHOTO)
  code, out, err = _cli(cli_env, workdir, f"--image={photo}", "--task=ground", f"--sam={sam_file}",
                        "--text=A man sits at a table.", "--phrases=A man;a table",
                        f"--out={tmp_path / 'g.png'}")
  assert code == 0, err
  res = json.loads(out.strip().splitlines()[-1])
  assert res["entities"] >= 1 and len(res["phrases"]) == 2


@pytest.mark.slow  # a fresh evaluate process (~30 s on 2 cores)
def test_evaluate_with_automatic_entities(workdir, sam_file, tmp_path, cli_env):
  """`config.eval.entities=sam`: the PNG evaluation runs on SAM's automatic masks end to end."""
  p = subprocess.run([sys.executable, "-m", "pixelground.evaluate",
                      f"--config={os.path.join(ROOT, 'configs', 'png_gella_t5xl.py')}:runlocal",
                      f"--checkpoint={workdir}", "--config.eval.entities=sam",
                      f"--config.eval.sam_checkpoint={sam_file}", "--max_examples=4",
                      f"--workdir={tmp_path}"], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr
  res = json.loads(p.stdout.strip().splitlines()[-1])
  assert res["png/count"] == 4 and 0.0 <= res["png/ar"] <= 1.0 and res["png/phrases"] > 0
