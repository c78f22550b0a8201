"""The automatic mask generator (`pixelground.inference.auto_masks`) against segment-anything 1.0.

Both run the same small SAM, `sam_reference.disk_sam` (weights set by hand so that a point gives masks
around it at three sizes, predicted IoUs and stability scores on both sides of the default thresholds:
random weights give image-sized blobs that box NMS reduces to one mask), saved in segment-anything's
layout and loaded into ours through `load_sam`. segment-anything needs torchvision, replaced by the
documented stand-in of `sam_reference.py`.
"""

import os
import sys

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

torch = pytest.importorskip("torch")

import sam_reference as ref  # noqa: E402  (tests/sam_reference.py)

with ref.torchvision_standin():
  pytest.importorskip("segment_anything")

from pixelground.checkpoints.sam import load_sam  # noqa: E402
from pixelground.inference import mask_ops as ops  # noqa: E402
from pixelground.inference.auto_masks import AutomaticMaskGenerator, AutoMaskOptions  # noqa: E402
from pixelground.parallel import sharding  # noqa: E402

OPTIONS = dict(points_per_side=16)  # segment-anything's default thresholds


def noise(seed: int, h: int, w: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch_sam():
  return ref.disk_sam()


@pytest.fixture(scope="module")
def sam_file(torch_sam, tmp_path_factory):
  path = tmp_path_factory.mktemp("sam") / "sam_disk.pth"
  torch.save(torch_sam.state_dict(), path)
  return str(path)


@pytest.fixture(scope="module")
def ours(sam_file):
  return load_sam(sam_file)


def _generator(parts, mesh=None, **options):
  encoder, decoder = parts
  return AutomaticMaskGenerator(encoder, decoder.prompt_encoder, decoder.mask_decoder, mesh=mesh,
                                **{**OPTIONS, **options})


def _match(a: list[dict], b: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Optimal one-to-one matching of two record lists by mask IoU → (rows, cols, IoUs)."""
  ma = np.stack([r["segmentation"] for r in a]).reshape(len(a), -1).astype(np.float32)
  mb = np.stack([r["segmentation"] for r in b]).reshape(len(b), -1).astype(np.float32)
  inter = ma @ mb.T
  union = ma.sum(1)[:, None] + mb.sum(1)[None] - inter
  iou = inter / np.maximum(union, 1)
  rows, cols = linear_sum_assignment(-iou)
  return rows, cols, iou[rows, cols]


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_parity_with_segment_anything(torch_sam, ours, crop_n_layers):
  image = noise(123, 150, 200)
  theirs = ref.generator(torch_sam, **OPTIONS, crop_n_layers=crop_n_layers).generate(image)
  mine = _generator(ours, crop_n_layers=crop_n_layers).generate(image)
  print(f"crop_n_layers={crop_n_layers}: {len(mine)} masks (segment-anything {len(theirs)})")
  assert len(theirs) >= 15, "the fixture should give a real workout"
  assert len(mine) == len(theirs)
  rows, cols, ious = _match(mine, theirs)
  d_iou = max(abs(mine[i]["predicted_iou"] - theirs[j]["predicted_iou"]) for i, j in zip(rows, cols))
  d_stab = max(abs(mine[i]["stability_score"] - theirs[j]["stability_score"]) for i, j in zip(rows, cols))
  print(f"  worst matched mask IoU {ious.min():.5f}; max |Δ predicted IoU| {d_iou:.2e}, "
        f"max |Δ stability| {d_stab:.2e}; same order {np.mean(rows == cols):.0%}")
  assert ious.min() >= 0.99, ious
  for i, j in zip(rows, cols):
    a, b = mine[i], theirs[j]
    assert abs(a["predicted_iou"] - b["predicted_iou"]) <= 1e-4
    assert abs(a["stability_score"] - b["stability_score"]) <= 1e-4
    np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-6)
    assert a["crop_box"] == b["crop_box"]
    assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
    assert a["segmentation"].shape == (150, 200)
  # Same order too (both sort by the same scores), unless a near-tie flipped.
  assert np.mean(rows == cols) >= 0.9


def test_sharded_equals_single_device(ours):
  image = noise(7, 150, 200)
  one = _generator(ours, crop_n_layers=1).generate(image)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
  eight = _generator(ours, mesh=mesh, crop_n_layers=1, points_per_batch=24).generate(image)
  assert len(one) == len(eight) > 0
  for a, b in zip(one, eight):
    np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    assert abs(a["predicted_iou"] - b["predicted_iou"]) <= 1e-6
    assert a["bbox"] == b["bbox"] and a["crop_box"] == b["crop_box"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_batch_and_output_modes(ours):
  images = [noise(1, 150, 200), noise(2, 120, 90)]
  gen = _generator(ours)
  batch = gen.generate_batch(images)
  assert set(gen.timings) >= {"encoder", "decoder", "postprocess", "filter", "nms"}
  for image, recs in zip(images, batch):
    single = gen.generate(image)
    assert len(single) == len(recs) > 0
    for a, b in zip(single, recs):
      np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
  coco = _generator(ours, output_mode="coco_rle").generate(images[0])
  raw = _generator(ours, output_mode="uncompressed_rle").generate(images[0])
  from pycocotools import mask as mask_utils
  for a, c, r in zip(batch[0], coco, raw):
    np.testing.assert_array_equal(ops.decode_rle(c["segmentation"]), a["segmentation"])
    rle = mask_utils.frPyObjects(r["segmentation"], *r["segmentation"]["size"])
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), a["segmentation"])
    assert a["area"] == c["area"] == r["area"] == int(a["segmentation"].sum())
    x, y, w, h = a["bbox"]
    ys, xs = np.nonzero(a["segmentation"])
    assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_small_region_removal(ours):
  image = noise(5, 150, 200)
  plain = _generator(ours).generate(image)
  cleaned = _generator(ours, min_mask_region_area=200).generate(image)
  assert 0 < len(cleaned) <= len(plain)
  from scipy import ndimage
  for r in cleaned:
    m = r["segmentation"]
    labels, n = ndimage.label(m, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    assert n == 1 or sizes.min() >= 200  # no small island left (unless it is the only one)
    x, y, w, h = r["bbox"]
    ys, xs = np.nonzero(m)
    assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_bad_inputs(ours):
  gen = _generator(ours)
  with pytest.raises(ValueError, match="1×1 px"):
    gen.generate(np.zeros((1, 1, 3), np.uint8))
  with pytest.raises(ValueError, match="points_per_side must be ≥ 1"):
    _generator(ours, points_per_side=0)
  with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
    gen.generate(np.zeros((64, 64), np.uint8))
  with pytest.raises(ValueError, match="output_mode"):
    AutoMaskOptions(output_mode="png")
  black = gen.generate(np.zeros((96, 128, 3), np.uint8))
  assert isinstance(black, list)  # handled: possibly no mask at all


@pytest.mark.slow
def test_huge_image(ours):
  image = np.zeros((8000, 8000, 3), np.uint8)
  image[2000:5000, 3000:7000] = (200, 40, 40)
  recs = _generator(ours, points_per_side=4, output_mode="coco_rle").generate(image)
  for r in recs:
    assert r["segmentation"]["size"] == [8000, 8000]


# -- building blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((32, 32), (128, 128)), ((128, 128), (96, 128)),
                                     ((96, 128), (150, 200)), ((37, 53), (11, 7))])
def test_resize_matches_torch(src, dst):
  x = np.random.default_rng(0).standard_normal((3,) + src).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.as_tensor(x)[None], dst, mode="bilinear",
                                         align_corners=False)[0].numpy()
  got = np.asarray(ops.resize_bilinear(jax.numpy.asarray(x), dst))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_nms_matches_standin():
  rng = np.random.default_rng(0)
  xy = rng.integers(0, 80, (300, 2))
  boxes = np.concatenate([xy, xy + rng.integers(0, 40, (300, 2))], 1).astype(np.float32)
  scores = rng.integers(0, 20, 300).astype(np.float32)  # many ties
  want = ref._batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), torch.zeros(300), 0.5)
  np.testing.assert_array_equal(ops.box_nms(boxes, scores, 0.5), want.numpy())


def test_mask_helpers():
  m = np.zeros((2, 6, 5), bool)
  m[0, 1:3, 2] = True
  assert np.asarray(ops.mask_boxes(jax.numpy.asarray(m))).tolist() == [[2, 1, 2, 2], [0, 0, 0, 0]]
  rle = ops.uncompressed_rle(m[0])
  assert rle == {"size": [6, 5], "counts": [13, 2, 15]}
  holes = np.ones((7, 7), bool)
  holes[3, 3] = False
  filled, changed = ops.remove_small_regions(holes, 2, "holes")
  assert changed and filled.all()
  islands = np.zeros((7, 7), bool)
  islands[0, 0] = True
  islands[3:6, 3:6] = True
  kept, changed = ops.remove_small_regions(islands, 2, "islands")
  assert changed and not kept[0, 0] and kept[3:6, 3:6].all()
  assert ops.crop_boxes(100, 200, 1, 512 / 1500)[0] == [[0, 0, 200, 100], [0, 0, 117, 67],
                                                         [0, 33, 117, 100], [83, 0, 200, 67],
                                                         [83, 33, 200, 100]]


# -- the CLI -------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(ROOT, "..", "shared", "data", "coco_panoptic_sample", "input_images",
                     "000000142238.jpg")


def _predict(env, *args):
  import subprocess
  p = subprocess.run([sys.executable, "-m", "pixelground.predict", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  return p.returncode, p.stdout, p.stderr


@pytest.mark.skipif(not os.path.isfile(PHOTO), reason=f"{PHOTO} not present")
def test_cli_masks_real_photo(sam_file, tmp_path, cli_env):
  import json
  from PIL import Image
  out, rles = tmp_path / "masks.png", tmp_path / "masks.json"
  code, stdout, err = _predict(cli_env, f"--sam={sam_file}", f"--image={PHOTO}", "--task=masks",
                               "--points_per_side=16", f"--out={out}", f"--rle_out={rles}")
  assert code == 0, err
  res = json.loads(stdout.strip().splitlines()[-1])
  photo = np.asarray(Image.open(PHOTO))
  assert res["masks"] == len(res["records"]) > 0 and res["size"] == list(photo.shape[:2])
  saved = json.load(open(rles))
  assert len(saved) == res["masks"]
  for rec, row in zip(saved, res["records"]):
    m = ops.decode_rle(rec["segmentation"])
    assert m.shape == photo.shape[:2] and int(m.sum()) == rec["area"] == row["area"]
  assert Image.open(out).size == (photo.shape[1], photo.shape[0])


def test_cli_masks_bad_inputs(sam_file, tmp_path, cli_env):
  from PIL import Image
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
  Image.fromarray(noise(0, 60, 80)).save(tmp_path / "ok.png")
  cases = {
      "1×1 image": ([f"--image={tmp_path / 'dot.png'}", f"--sam={sam_file}"], "1×1 px"),
      "no points": ([f"--image={tmp_path / 'ok.png'}", f"--sam={sam_file}", "--points_per_side=0"],
                    "points_per_side must be ≥ 1"),
      "no SAM": ([f"--image={tmp_path / 'ok.png'}"], "--checkpoint: required"),
      "missing SAM": ([f"--image={tmp_path / 'ok.png'}", f"--sam={tmp_path / 'nope.pth'}"],
                      "does not exist"),
  }
  import subprocess
  procs = {what: subprocess.Popen([sys.executable, "-m", "pixelground.predict", "--task=masks", *args],
                                  cwd=ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for what, (args, _) in cases.items()}
  for what, p in procs.items():
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2 and cases[what][1] in err and "Traceback" not in err, (what, err)
    assert len(err.strip().splitlines()) == 1, (what, err)
