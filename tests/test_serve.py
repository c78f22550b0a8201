"""`python -m pixelground.serve` in a real headless browser (Debian's chromium through Playwright) and
over loopback HTTP, on a tiny GELLA + LISA checkpoint with random weights (configs/demo.py:gella: every
task's plumbing, not quality). One server for the module, warmed up once; its buckets are small (batch
4 only) to keep the compile time down.

The random model would rarely write `[SEG]`, so the decoder is patched (`force_tokens`) to write it at
positions 2 and 6 and EOS at 16: every answer has two masks, the first one long before the end — what
the streaming checks need."""

import concurrent.futures
import json
import os
import socket
import statistics
import time

import numpy as np
import pytest
from PIL import Image

from forced import force_tokens  # tests/forced.py
from workdirs import random_workdir  # tests/workdirs.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "coco_panoptic_sample")
PHOTOS = os.path.join(SAMPLE, "input_images")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.path.join(ROOT, "docs", "serve.png")

pytestmark = [
    pytest.mark.skipif(not os.path.isdir(PHOTOS), reason=f"{PHOTOS} not present"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed (.ci/run installs it)"),
]


def _photos():
  return sorted(os.path.join(PHOTOS, p) for p in os.listdir(PHOTOS))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  pytest.importorskip("gradio")
  from pixelground.serving import launch
  from pixelground.serving import engine as engine_lib

  mp = pytest.MonkeyPatch()
  wd = random_workdir(os.path.join(ROOT, "configs", "demo.py:gella"), tmp_path_factory.mktemp("gella"), 5)
  seg = 3  # configs/demo.py: seg_token_id
  from pixelground.data import tokenizer as tok_lib
  force_tokens(mp, {2: seg, 6: seg, 16: tok_lib.load_tokenizer("tiny").eos_id})
  options = engine_lib.ServeOptions(batch_sizes=(4,), max_wait_s=0.05, chunk=2, chat_prompt_len=32,
                                    max_len=24)
  t = time.perf_counter()
  demo, engine, url = launch.start(str(wd), options=options, examples=_photos(), port=_free_port(),
                                  categories=os.path.join(SAMPLE, "panoptic_coco_categories.json"),
                                  block=False, say=print)
  print(f"server up in {time.perf_counter() - t:.1f} s")
  yield engine, url
  demo.close()
  engine.close()
  mp.undo()


@pytest.fixture(scope="module")
def browser(server):
  sync_api = pytest.importorskip("playwright.sync_api")
  with sync_api.sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield b
    b.close()


def _page(browser, url, external):
  page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
  page.set_default_timeout(90_000)  # a busy 2-core machine
  page.on("request", lambda r: None if r.url.startswith(url.rstrip("/")) or r.url.startswith("data:")
          or r.url.startswith("blob:") else external.append(r.url))
  page.goto(url)
  page.wait_for_selector("#caption-run", timeout=60_000)
  return page


def _upload(page, selector, path):
  page.locator(f"{selector} input[type=file]").set_input_files(path)
  page.wait_for_selector(f"{selector} img, {selector} .file-preview, {selector} table", timeout=30_000)
  time.sleep(0.5)  # the upload's change event (picker, chat reset) lands before the next click


def _run(page, task, fill=None, timeout=60_000):
  """Opens the task's tab, fills its fields, clicks its button, waits for the answer → (words, timing,
  message) texts."""
  page.click(f"#tab-{task}-button")
  for sel, value in (fill or {}).items():
    page.locator(f"{sel} textarea, {sel} input").first.fill(value)
  page.evaluate(f"() => document.querySelectorAll('{ANSWER}').forEach(e => e.remove())")
  page.click(f"#{task}-run")
  page.wait_for_selector(ANSWER, timeout=timeout)
  if task == "chat":  # streamed: wait for the end of the answer
    page.wait_for_function("() => { const t = document.querySelector('#timing .timing'); "
                           "return !t || !t.innerText.includes('generating'); }", timeout=timeout)
  return tuple(_text(page, s) for s in ("#words .pg-words", "#timing .timing",
                                        "#message .pg-error, #message .pg-note"))


ANSWER = "#timing .timing, #message .pg-error"  # what every answer writes (the status overlay aside)


def _text(page, selector) -> str:
  return "\n".join(e.inner_text() for e in page.query_selector_all(selector))


def _picture_shown(page, timeout=30_000) -> bool:
  """Whether the answer's picture loads: the timing text can land before the image has decoded."""
  from playwright.sync_api import TimeoutError as PlaywrightTimeout
  try:
    page.wait_for_function("() => { const i = document.querySelector('#picture img'); "
                           "return !!i && i.complete && i.naturalWidth > 0; }", timeout=timeout)
    return True
  except PlaywrightTimeout:  # the picture never appeared
    return False


def _entity_map(tmp_path, limit):
  """The sample's panoptic PNG with only its `limit` largest segments (the demo model has 6 slots)."""
  from pixelground.metrics.panoptic import id_to_rgb, rgb_to_id
  ids = rgb_to_id(np.asarray(Image.open(os.path.join(SAMPLE, "panoptic_examples", "000000142238.png"))
                             .convert("RGB")))
  found, counts = np.unique(ids[ids != 0], return_counts=True)
  keep = found[np.argsort(-counts)[:limit]]
  path = str(tmp_path / "entities.png")
  Image.fromarray(id_to_rgb(np.where(np.isin(ids, keep), ids, 0))).save(path)
  return path


def test_every_task_in_the_browser(server, browser, tmp_path):
  """A real photo uploaded, every task run: a picture and text appear for each; the chat's answer has
  its masks; the page loads nothing from outside the server; the screenshot is written."""
  engine, url = server
  external = []
  page = _page(browser, url, external)
  photo = _photos()[0]  # 000000142238.jpg: the photo of the sample's panoptic PNG
  _upload(page, "#image", photo)
  w, h = Image.open(photo).size
  t0 = time.perf_counter()
  words, timing, msg = _run(page, "caption")
  assert words.strip() and "total" in timing and not msg.strip() and _picture_shown(page)
  words, timing, _ = _run(page, "refer", {"#refer-text": "the man on the left"})
  assert "the man on the left" in words and "box [" in words and _picture_shown(page)
  page.click("#tab-region-button")
  page.wait_for_function("() => { const i = document.querySelector('#picker img'); "
                         "return !!i && i.complete && i.naturalWidth > 0; }")
  picker, field = page.locator("#picker img"), "#region-box textarea, #region-box input"
  box = picker.bounding_box()
  for fx, fy, parts in ((0.2, 0.3, 2), (0.6, 0.8, 4)):  # a point, then the box's other corner
    picker.click(position={"x": box["width"] * fx, "y": box["height"] * fy})
    page.wait_for_function(f"() => document.querySelector('{field}').value.split(',').length === "
                           f"{parts}")
  x0, y0, x1, y1 = (float(v) for v in page.locator(field).first.input_value().split(","))
  assert abs(x0 - 0.2 * w) < 0.03 * w and abs(y1 - 0.8 * h) < 0.03 * h  # clicks → image pixels
  words, timing, _ = _run(page, "region")
  assert "total" in timing and _picture_shown(page)
  words, timing, _ = _run(page, "dense")
  assert len(words.strip().splitlines()) == engine.options.dense_k
  words, timing, msg = _run(page, "chat", {"#chat-text": "Which object is closest to the camera?"})
  assert words.count("[SEG]") == 2 and "first mask after" in timing and _picture_shown(page)
  assert "Which object is closest to the camera?" in page.inner_text("#chat")
  page.click("#tab-ground-button")
  _upload(page, "#entities", _entity_map(tmp_path, 5))
  words, timing, msg = _run(page, "ground", {"#ground-text": "A man sits at a table with a cake.",
                                             "#ground-phrases": "A man;a table;a cake"})
  assert "A man sits at a table with a cake." in words.replace("\n", " ") and _picture_shown(page)
  words, timing, msg = _run(page, "panoptic")
  assert "total" in timing and "the model wrote" in msg and _picture_shown(page)
  page.click("#tab-masks-button")
  assert "Not available" in page.inner_text("#masks-unavailable")
  assert page.locator("#masks-run").is_disabled()
  print(f"every task in the browser: {time.perf_counter() - t0:.1f} s")
  # The README's screenshot: the chat with its masks.
  _run(page, "chat", {"#chat-text": "Segment the person."})
  shot = str(tmp_path / "serve.png")
  page.screenshot(path=shot, full_page=True)
  assert Image.open(shot).size[0] >= 1000
  if os.environ.get("PIXELGROUND_UPDATE_SCREENSHOT"):  # the README's copy: 256 colours (~270 kB)
    Image.open(shot).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
        SCREENSHOT, optimize=True)
  assert external == [], external  # fonts, scripts and styles all come from the server


def test_two_sessions_keep_their_own_history(server, browser):
  """Two browser contexts at once, interleaved: each chat shows only its own questions."""
  _, url = server
  a, b = _page(browser, url, []), _page(browser, url, [])
  photos = _photos()
  _upload(a, "#image", photos[0])
  _upload(b, "#image", photos[1])
  _run(a, "chat", {"#chat-text": "first question of A"})
  _run(b, "chat", {"#chat-text": "only question of B"})
  _run(a, "chat", {"#chat-text": "second question of A"})
  chat_a, chat_b = a.inner_text("#chat"), b.inner_text("#chat")
  assert "first question of A" in chat_a and "second question of A" in chat_a
  assert "only question of B" not in chat_a
  assert "only question of B" in chat_b and "of A" not in chat_b
  src = [p.get_attribute("#image img", "src") for p in (a, b)]
  assert src[0] != src[1]  # each session keeps its own image


def test_bad_input_gives_a_message_and_the_server_keeps_serving(server, browser, tmp_path):
  _, url = server
  page = _page(browser, url, [])
  notes = tmp_path / "notes.png"
  notes.write_text("this is not an image")
  _upload(page, "#image", str(notes))
  _, timing, msg = _run(page, "caption")
  assert "not an image" in msg and not timing.strip()
  _upload(page, "#image", _photos()[1])
  _, _, msg = _run(page, "chat", {"#chat-text": "   "})
  assert "type a question" in msg
  _, _, msg = _run(page, "region", {"#region-box": "10,10,5000,30"})
  assert "inside the" in msg
  huge = tmp_path / "huge.jpg"
  Image.new("RGB", (8000, 8000), (20, 120, 200)).save(huge, quality=50)
  _upload(page, "#image", str(huge))
  words, timing, msg = _run(page, "caption", timeout=120_000)
  assert "8000×8000" in msg and "reduced" in msg and "total" in timing
  _upload(page, "#image", _photos()[0])
  words, timing, msg = _run(page, "refer", {"#refer-text": "the cake"})
  assert "total" in timing and not msg.strip() and _picture_shown(page)


def _client(url):
  from gradio_client import Client
  return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def test_chat_streams_masks_before_the_answer_ends(server):
  """Over the Gradio protocol: the chat yields partial answers; one already carries a mask (and a
  picture) while the answer is still being generated."""
  from gradio_client import handle_file
  _, url = server
  job = _client(url).submit(handle_file(_photos()[0]), "where is the cake?", api_name="/chat")
  job.result(timeout=120)
  outputs = job.outputs()
  timings = [o[3] for o in outputs]
  streamed = [t for t in timings if "first mask after" in t and "generating" in t]
  assert len(outputs) >= 4 and streamed, timings
  assert "generating" not in timings[-1] and "[SEG]" in outputs[-1][2]


def test_twenty_concurrent_requests_all_answered_no_compilation(server):
  """20 requests at once over loopback (captions, referring, chat): every one answered, in batches;
  then nothing in the whole module compiled after the warm-up."""
  from gradio_client import handle_file
  from pixelground.serving import engine as engine_lib
  engine, url = server
  photos = _photos()
  clients = [_client(url) for _ in range(4)]

  def one(i):
    c, photo, t = clients[i % 4], handle_file(photos[i % 2]), time.perf_counter()
    if i % 3 == 0:
      out = c.predict(photo, api_name="/caption")
    elif i % 3 == 1:
      out = c.predict(photo, f"the object number {i}", api_name="/refer")
    else:
      out = c.predict(photo, f"question {i}?", api_name="/chat")[1:]
    return time.perf_counter() - t, out

  start = len(engine.batcher.batches)
  t = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(20) as pool:
    results = list(pool.map(one, range(20)))
  wall = time.perf_counter() - t
  latencies = sorted(r[0] for r in results)
  assert all("total" in out[2] and out[0] is not None for _, out in results), results
  batches = engine.batcher.batches[start:]
  print(json.dumps({"requests": 20, "wall_s": round(wall, 2),
                    "p50_s": round(statistics.median(latencies), 3),
                    "p95_s": round(latencies[int(0.95 * 20) - 1], 3),
                    "batches": [(b.task, b.size) for b in batches]}))
  assert sum(b.size for b in batches) == 20 and max(b.size for b in batches) > 1
  assert engine_lib.compiled_since(engine.compiles_after_warm_up) == []


def test_cli_starts_and_serves(cli_env, tmp_path):
  """`python -m pixelground.serve` as a user runs it (without the warm-up, to keep it short): it prints
  the URL, serves the page and writes its library log to --log_dir; a missing --checkpoint exits 2."""
  import subprocess
  import sys
  import urllib.request
  wd = random_workdir(os.path.join(ROOT, "configs", "demo.py"), tmp_path, 1)
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "pixelground.serve", f"--checkpoint={wd}",
                           f"--port={port}", "--nowarm_up", f"--log_dir={tmp_path / 'logs'}"],
                          cwd=ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if "serving on" in line or len(lines) > 200:
        break
    assert f"serving on http://127.0.0.1:{port}/" in lines[-1], "".join(lines)
    assert "ground: not available" in "".join(lines)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
      assert r.status == 200 and b"pixelground" in r.read()
    assert os.path.exists(tmp_path / "logs" / "serve.INFO")
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  out = subprocess.run([sys.executable, "-m", "pixelground.serve"], cwd=ROOT, env=cli_env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "--checkpoint is required" in out.stderr
