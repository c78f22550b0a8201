"""The web demo's parts that need no model: the request batcher (grouping, bounds, failures, streaming),
upload reading and box parsing, the coloured text."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pixelground.serving import render
from pixelground.serving.batcher import Batcher
from pixelground.serving.engine import InputError, parse_box, read_image


def test_concurrent_requests_of_a_task_share_a_call_up_to_the_bound():
  calls = []

  def double(reqs):
    calls.append(("double", len(reqs)))
    for r in reqs:
      r.finish(2 * r.payload)

  def negate(reqs):
    calls.append(("negate", len(reqs)))
    for r in reqs:
      r.finish(-r.payload)

  b = Batcher({"double": double, "negate": negate}, max_batch={"double": 4}, max_wait_s=0.2)
  with ThreadPoolExecutor(10) as pool:
    outs = list(pool.map(lambda i: b.submit("double" if i < 8 else "negate", i).result(timeout_s=10),
                         range(10)))
  b.close()
  assert outs == [0, 2, 4, 6, 8, 10, 12, 14, -8, -9]
  assert sorted(calls) == [("double", 4), ("double", 4), ("negate", 1), ("negate", 1)]
  assert all(x.size <= 4 for x in b.batches) and sum(x.size for x in b.batches) == 10


def test_a_lone_request_waits_at_most_max_wait():
  b = Batcher({"t": lambda reqs: [r.finish(r.payload) for r in reqs]}, max_batch=8, max_wait_s=0.05)
  t = time.perf_counter()
  assert b.submit("t", 1).result(timeout_s=5) == 1
  assert time.perf_counter() - t < 1.0 and b.batches[-1].waited_s >= 0.04
  b.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
  def flaky(reqs):
    if any(r.payload == "bad" for r in reqs):
      raise ValueError("bad input")
    for r in reqs:
      r.finish("ok")

  def silent(reqs):
    pass  # returns without answering

  b = Batcher({"t": flaky, "s": silent}, max_batch=1, max_wait_s=0.0)
  with pytest.raises(ValueError, match="bad input"):
    b.submit("t", "bad").result(timeout_s=5)
  with pytest.raises(RuntimeError, match="without an answer"):
    b.submit("s", 0).result(timeout_s=5)
  assert b.submit("t", "good").result(timeout_s=5) == "ok"
  with pytest.raises(ValueError, match="unknown task"):
    b.submit("nope", 0)
  b.close()


def test_streamed_events_arrive_before_the_result():
  gate = threading.Event()

  def stream(reqs):
    for r in reqs:
      r.emit("first")
    gate.wait(5)  # the caller sees "first" while the handler still runs
    for r in reqs:
      r.finish("last")

  b = Batcher({"t": stream}, max_wait_s=0.0)
  events = b.submit("t", None).events(timeout_s=5)
  assert next(events) == ("partial", "first")
  gate.set()
  assert list(events) == [("done", "last")]
  b.close()


def test_uploads_and_boxes(tmp_path):
  ok = tmp_path / "photo.png"
  Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(ok)
  image, scale, note = read_image(str(ok), max_side=2048, max_pixels=10**8)
  assert image.shape == (30, 40, 3) and scale == 1.0 and note is None
  big = tmp_path / "big.jpg"
  Image.new("RGB", (4000, 1000), (1, 2, 3)).save(big)
  image, scale, note = read_image(str(big), max_side=1000, max_pixels=10**8)
  assert image.shape == (250, 1000, 3) and scale == 0.25 and "reduced" in note
  with pytest.raises(InputError, match="at most 1 Mpx"):
    read_image(str(big), max_side=1000, max_pixels=10**6)
  text = tmp_path / "notes.png"
  text.write_text("hello")
  with pytest.raises(InputError, match="not an image"):
    read_image(str(text), max_side=2048, max_pixels=10**8)
  with pytest.raises(InputError, match="no image"):
    read_image(None, max_side=2048, max_pixels=10**8)
  # Boxes are given in pixels of the upload, returned in pixels of the (reduced) image.
  np.testing.assert_allclose(parse_box("100, 20, 400, 60", (250, 1000), 0.25), [25, 5, 100, 15])
  np.testing.assert_allclose(parse_box("200,100", (250, 1000), 0.25, point_box=0.2),
                             [25, 0, 75, 50])  # a point: a box 0.2 × the short side wide, clipped
  assert parse_box("  ", (10, 10)) is None
  for bad, msg in (("1,2,3", "4 numbers"), ("a,b,c,d", "expected"), ("0,0,5000,10", "inside the"),
                   ("5,5,2,2", "inside the"), ("50,50", "outside")):
    with pytest.raises(InputError, match=msg):
      parse_box(bad, (30, 40))


def test_coloured_text():
  html = render.answer_html("it is the circle [SEG] and the square [SEG].")
  assert html.count('class="seg"') == 2 and "circle" in html and html.count("rgb") == 4
  assert render.answer_html("<script>") == "&lt;script&gt;"
