"""The batched Predictor (`pixelground.inference.batching`, `streaming`) on a saved tiny checkpoint
(configs/demo.py, random weights: plumbing, not quality): a batch gives each example what it gets
alone, padding rows and prompt padding change nothing, a streamed LISA answer equals the one-shot one
and shows each `[SEG]`'s mask in the chunk that generated it, and once every bucket is compiled new
requests (other image sizes, other prompts) compile nothing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelground.data import transforms as T
from pixelground.inference import batching
from pixelground.inference.predictor import Predictor
from forced import force_tokens  # tests/forced.py
from workdirs import random_workdir  # tests/workdirs.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
  """The demo model, its decoder forced to write `[SEG]` at positions 1 and 6 and EOS at 10 (random
  weights seldom write `[SEG]`), one batch bucket (4) so that each program compiles once."""
  wd = random_workdir(os.path.join(ROOT, "configs", "demo.py"), tmp_path_factory.mktemp("run"), 3)
  pred = Predictor.from_checkpoint(str(wd))
  mp = pytest.MonkeyPatch()
  force_tokens(mp, {1: pred.model.cfg.seg_token_id, 6: pred.model.cfg.seg_token_id, 10: pred.tok.eos_id})
  pred.buckets = batching.Buckets((4,), (pred.max_prompt_len,))
  yield pred
  mp.undo()


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 255, hw + (3,), dtype=np.uint8) for hw in [(300, 400), (48, 64), (90, 50)]]


def test_buckets_and_padding():
  b = batching.Buckets((1, 2, 4, 8), (8, 16, 32))
  assert [b.batch(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  assert [b.prompt(n, 12) for n in (3, 8, 9, 12, 40)] == [8, 8, 12, 12, 12]
  assert b.prompt(20, 32) == 32 and batching.prompt_lens(b, 12) == [8, 12]
  assert [(s.start, s.stop) for s in batching.chunks(19, b)] == [(0, 8), (8, 16), (16, 19)]
  with pytest.raises(ValueError, match="ascending"):
    batching.Buckets((4, 2))
  x = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(batching.pad_rows(x, 4), [[0, 1, 2], [3, 4, 5], [0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("hw", [(300, 400), (48, 64), (1000, 37), (64, 64)])
def test_host_mask_resize_matches_jax(hw):
  """Masks are resized on the host (no program per image size) exactly as jax.image.resize does."""
  g = T.resize_pad(hw[0], hw[1], 64)
  logits = np.random.default_rng(1).normal(size=(2, 64, 64)).astype(np.float32)
  vh, vw = g.valid
  ref = np.asarray(jax.image.resize(jnp.asarray(logits[:, :vh, :vw]), (2,) + hw, "bilinear"))
  got = batching.mask_to_image(logits, g, hw, rows_per_block=100)
  assert got.shape == (2,) + hw
  assert np.all((got == (ref > 0)) | (np.abs(ref) < 1e-5))


def test_batch_equals_single_examples(predictor):
  """Each row of a batch = that example alone (padded to the same bucket with copies of itself), with
  other image sizes and prompt lengths beside it; 10 examples run as chunks of the largest bucket."""
  images = _images()
  p = predictor
  caps = p.caption_batch(images, max_len=12)
  for im, c in zip(images, caps):
    alone = p.caption(im, max_len=12)
    assert c.pieces == alone.pieces
    np.testing.assert_allclose(c.boxes, alone.boxes, atol=1e-3)
    assert c.boxes.shape == (len(c.pieces), 4) and c.points.shape == (len(c.pieces), 2, 2)
  exprs = ["the red circle", "a big blue square on the left of everything else", "x"]
  refs = p.referring_batch(images, exprs, max_len=12)
  for im, e, r in zip(images, exprs, refs):
    alone = p.referring(im, e, max_len=12)
    np.testing.assert_allclose(r.box, alone.box, atol=1e-3)
    assert r.mask.shape == im.shape[:2] and (r.mask != alone.mask).mean() < 1e-3
  assert refs[1].truncated and not refs[0].truncated  # "where is …" > the 12-token prompt
  dense = p.dense_captions_batch(images, k=3, max_len=6)
  assert [len(d) for d in dense] == [3, 3, 3]
  assert [d.text for d in dense[2]] == [d.text for d in p.dense_captions(images[2], k=3, max_len=6)]
  many = p.region_caption_batch(images * 3 + images[:1], [[0, 0, 20, 20]] * 10, max_len=6)
  assert len(many) == 10 and many[:3] == many[3:6] == many[6:9]
  with pytest.raises(ValueError, match="3 images"):
    p.referring_batch(images, ["a", "b"])
  with pytest.raises(ValueError, match="inside the"):
    p.caption_batch(images, boxes=[None, None, [0, 0, 100, 100]])


def test_stream_masks_before_the_answer_ends(predictor):
  """With `[SEG]` forced at positions 1 and 6 and EOS at 10: the stream's masks arrive in the chunks
  that generated them, while the answer is still being written; its text, masks and scores equal
  `segment_batch`'s (the one-shot decode)."""
  p = predictor
  images, questions = _images()[:2], ["which shape has the most corners?", "where is it"]
  updates = list(p.segment_stream(images, questions, max_len=16, chunk=3))
  assert [u.step for u in updates] == [3, 6, 9, 11]
  assert [len(u.rows[0].masks) for u in updates] == [1, 1, 2, 2]  # [SEG] at 1 → chunk 1, at 6 → 3
  assert [u.rows[0].done for u in updates] == [False, False, False, True]
  assert updates[0].new_masks and not updates[1].new_masks
  final = updates[-1].rows
  batch = p.segment_batch(images, questions, max_len=16)
  for row, s, im in zip(final, batch, images):
    assert row.text == s.text and row.text.count("[SEG]") == 2 and row.seg_steps == [1, 6]
    assert row.masks.shape == (2,) + im.shape[:2]
    np.testing.assert_array_equal(row.masks, s.masks)
    np.testing.assert_allclose(row.mask_scores, s.mask_scores, atol=1e-5)
  with pytest.raises(ValueError, match="at most 4"):
    p.segment_stream(_images() * 2, ["q"] * 6)


def test_no_compilation_after_warm_up(predictor):
  """After one call per program (the tests above made them), requests with new image sizes, prompts and
  batch sizes (≤ the bucket) reuse the compiled programs: no XLA compilation at all."""
  from pixelground.inference import streaming
  from pixelground.serving import engine as engine_lib
  p = predictor
  image = np.zeros((64, 64, 3), np.uint8)
  p.caption_batch([image], max_len=12)
  p.referring_batch([image], ["a"], max_len=12)
  streaming.warm_up(p, max_len=16, chunk=3, max_prompt_len=p.max_prompt_len)
  sizes, before = p.programs.cache_sizes(), engine_lib.compiles()
  rng = np.random.default_rng(5)
  for n, hw in [(1, (123, 457)), (3, (640, 480)), (2, (33, 35)), (4, (1000, 200))]:
    images = [rng.integers(0, 255, hw + (3,), dtype=np.uint8) for _ in range(n)]
    p.caption_batch(images, boxes=[[1, 1, 20, 30]] * n, max_len=12)
    p.referring_batch(images, ["the red one"] * n, max_len=12)
    list(p.segment_stream(images, ["is there a shape " * (n * 2)] * n, max_len=16, chunk=3))
  assert p.programs.cache_sizes() == sizes
  assert engine_lib.compiled_since(before) == []
