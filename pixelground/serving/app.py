"""The Gradio app of `python -m pixelground.serve`: one page, one tab per task, results on the right.

Per-session state lives in `gr.State` (the chat history, the region picker's clicks), so two browsers
never share a conversation; the image travels with each request. Every handler turns an `InputError`
(and any other failure) into a message in the page and returns: the server keeps serving. The chat
handler is a generator: the answer and its masks appear chunk by chunk while they are decoded.

Element ids (the browser test uses them): #image, #picture, #words, #timing, #message, and per task
#<task>-run (+ #refer-text, #chat-text, #chat, #chat-clear, #picker, #region-box, #ground-text,
#ground-phrases, #entities).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import typing as tp

import gradio as gr
import numpy as np

from pixelground.inference import pictures
from pixelground.inference.predictor import Segmentation
from pixelground.serving import engine as engine_lib
from pixelground.serving import render
from pixelground.serving.engine import InputError

log = logging.getLogger(__name__)

CSS = """
.pg-error { color: #b00020; font-weight: 600; }
.pg-note { color: #555; }
#words { font-size: 1.1em; line-height: 1.6; }
#timing { color: #555; font-size: 0.9em; }
"""
LABELS = {"caption": "Caption", "refer": "Refer", "chat": "Chat", "region": "Region",
          "dense": "Dense", "ground": "Ground", "panoptic": "Panoptic", "masks": "Masks"}
HINTS = {"caption": "A caption with a location for every word: its trace, word by word in colour.",
         "refer": "The box (and mask) of what an expression refers to.",
         "chat": "LISA: ask about the image; every `[SEG]` in the answer is a mask, shown as soon as "
                 "it is generated. The conversation is part of the prompt; a new image starts a new "
                 "one.",
         "region": "A caption of one region: click a point or two corners, or type a box.",
         "dense": "The proposal head's best regions, each captioned.",
         "ground": "GELLA: each noun phrase of a caption grounded to entities (from the id map, else "
                   "SAM's automatic masks).",
         "panoptic": "GELLA: every entity (id map of the Ground tab, else SAM's automatic masks) gets "
                     "a category.",
         "masks": "SAM's automatic mask generator: a grid of point prompts, filtered and "
                  "de-duplicated."}


def _path(payload) -> str | None:
  """A file component's raw value (preprocess=False) → its path on the server."""
  if isinstance(payload, dict):
    return payload.get("path")
  return payload if isinstance(payload, str) else None


class App:
  """The page's handlers over an `engine.Engine`."""

  def __init__(self, engine: engine_lib.Engine):
    self.engine = engine
    o = engine.options
    self._read = functools.lru_cache(maxsize=16)(
        lambda path, mtime: engine_lib.read_image(path, max_side=o.max_side, max_pixels=o.max_pixels))

  # -- helpers -------------------------------------------------------------------------------------------
  def image(self, payload) -> tuple[np.ndarray, float, str | None]:
    """The session's upload → (image as the model gets it, its pixels per uploaded pixel, note)."""
    path = _path(payload)
    if not path or not os.path.isfile(path):
      raise InputError("no image: upload one or pick an example")
    return self._read(path, os.path.getmtime(path))

  def new_compiles(self) -> int | None:
    base = self.engine.compiles_after_warm_up
    return None if base is None else engine_lib.compiles() - base

  def _failed(self, e: Exception, n_outputs: int, notes=()) -> tuple:
    """(None picture, empty text and timing, the message) for an error; unknown errors are logged."""
    if not isinstance(e, (InputError, ValueError)):
      log.exception("request failed")
      msg = f"internal error ({type(e).__name__}: {e}); the server keeps serving"
    else:
      msg = str(e)
    return (None, "", "", render.message_html(list(notes), msg)) + (None,) * (n_outputs - 4)

  def _done(self, pic, words: str, timing, t_draw: float, notes, extra: str = "") -> tuple:
    timing = render.timing_html(timing, time.perf_counter() - t_draw, self.new_compiles(), extra)
    return pic, f'<div class="pg-words">{words}</div>', timing, render.message_html(notes)

  # -- tasks ---------------------------------------------------------------------------------------------
  def caption(self, payload):
    try:
      image, _, note = self.image(payload)
      cap, timing = self.engine.caption(image)
      t = time.perf_counter()
      _, pic = pictures.draw(image, "caption", cap)
      return self._done(pic, render.caption_html(cap), timing, t, [note])
    except Exception as e:  # noqa: BLE001 — shown in the page
      return self._failed(e, 4)

  def refer(self, payload, expression):
    try:
      image, _, note = self.image(payload)
      if not expression or not expression.strip():
        raise InputError("refer: type an expression first (e.g. “the red circle”)")
      res, timing = self.engine.refer(image, expression.strip())
      t = time.perf_counter()
      _, pic = pictures.draw(image, "refer", res, expression.strip())
      notes = [note] + (["the expression was longer than the model's prompt; it was cut"]
                        if res.truncated else [])
      return self._done(pic, render.refer_html(expression.strip(), res), timing, t, notes)
    except Exception as e:  # noqa: BLE001
      return self._failed(e, 4)

  def region(self, payload, box_text):
    try:
      image, scale, note = self.image(payload)
      box = engine_lib.parse_box(box_text, image.shape[:2], scale, self.engine.options.point_box)
      if box is None:
        raise InputError("region: click a point or two corners on the picture, or type a box")
      cap, timing = self.engine.caption(image, box)
      t = time.perf_counter()
      _, pic = pictures.draw(image, "caption", cap, box=box)
      return self._done(pic, render.caption_html(cap), timing, t, [note])
    except Exception as e:  # noqa: BLE001
      return self._failed(e, 4)

  def dense(self, payload):
    try:
      image, _, note = self.image(payload)
      regions, timing = self.engine.dense(image)
      t = time.perf_counter()
      _, pic = pictures.draw(image, "densecap", regions)
      return self._done(pic, render.dense_html(regions), timing, t, [note])
    except Exception as e:  # noqa: BLE001
      return self._failed(e, 4)

  def chat(self, payload, question, history):
    """Generator: (chatbot messages, picture, words, timing, message, history, question box)."""
    history = list(history or [])
    msgs = self.messages(history)
    try:
      image, _, note = self.image(payload)
      if not question or not question.strip():
        raise InputError("chat: type a question first")
      question = question.strip()
      prompt, kept = self.engine.chat_prompt(history, question)
      notes = [note]
      if kept < len(history):
        notes.append(f"the {len(history) - kept} oldest turn(s) did not fit the "
                     f"{self.engine.options.chat_prompt_len}-token prompt and were left out")
      first_mask, shown, row, timing = None, -1, None, None
      for row, timing in self.engine.chat(image, prompt):
        t = time.perf_counter()
        if first_mask is None and len(row.masks):
          first_mask = (timing.total_s, row.seg_steps[0] + 1)
        pic = gr.skip()  # unchanged pictures are not sent again
        if len(row.masks) != shown or row.done:  # a mask arrived, or the final picture
          shown = len(row.masks)
          _, pic = pictures.draw(image, "segment", Segmentation(row.text, row.masks, row.mask_scores),
                                 question)
        extra = (f"first mask after {first_mask[0]:.2f} s (token {first_mask[1]})" if first_mask
                 else "no mask yet") + f" · {len(row.tokens)} tokens" + ("" if row.done else
                                                                         " · generating…")
        answer = render.answer_html(row.text)
        out = self._done(pic, answer, timing, t, notes + (["the question was cut to the prompt length"]
                                                          if row.truncated else []), extra)
        if row.done:
          break
        turn = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield (msgs + turn,) + out + (history, gr.skip())
      history = history + [(question, row.text)]
      yield (self.messages(history),) + out + (history, "")
    except Exception as e:  # noqa: BLE001
      yield (msgs,) + self._failed(e, 4) + (history, gr.skip())

  @staticmethod
  def messages(history: list[tuple[str, str]]) -> list[dict]:
    out = []
    for q, a in history:
      out += [{"role": "user", "content": q}, {"role": "assistant", "content": render.answer_html(a)}]
    return out

  def entities(self, payload, image: np.ndarray, scale: float):
    """The optional entity id-map upload → (H, W) ids of the image as the model gets it, or None."""
    path = _path(payload)
    if not path:
      return None
    ids = pictures.read_id_map(path, "entity map")
    want = (round(image.shape[0] / scale), round(image.shape[1] / scale))
    if ids.shape != want:
      raise InputError(f"the entity map is {ids.shape[1]}×{ids.shape[0]} but the image is "
                       f"{want[1]}×{want[0]}; it must be an id map of the same image")
    return ids if scale == 1 else pictures.scale_ids(ids, image.shape)

  def ground(self, payload, caption, phrases, ents):
    try:
      image, scale, note = self.image(payload)
      if not caption or not caption.strip():
        raise InputError("ground: type the caption to ground first")
      from pixelground.inference import grounded
      grounded.check_caption(caption)
      given = [p.strip() for p in (phrases or "").split(";") if p.strip()] or None
      ids = self.entities(ents, image, scale)
      self._need_entities(ids)
      (found, generated), timing = self.engine.ground(image, caption, ids, given)
      t = time.perf_counter()
      base, _ = pictures.draw_scale(image)
      pic = pictures.draw_grounding(base, caption, found)
      notes = [note] + ([f"the model wrote: {generated}"] if generated is not None else [])
      return self._done(pic, render.ground_html(caption, found), timing, t, notes)
    except Exception as e:  # noqa: BLE001
      return self._failed(e, 4)

  def panoptic(self, payload, ents):
    try:
      image, scale, note = self.image(payload)
      ids = self.entities(ents, image, scale)
      self._need_entities(ids)
      (id_map, segments, generated), timing = self.engine.panoptic(image, ids)
      t = time.perf_counter()
      from pixelground.inference.grounding import category_display_name
      cats = {int(c["id"]): str(c["name"]) for c in self.engine.pred.panoptic_categories() or []}
      names = [category_display_name(cats.get(int(s["category_id"]), str(s["category_id"])))
               for s in segments]
      base, _ = pictures.draw_scale(image)
      pic = pictures.draw_panoptic(base, id_map, segments, names)
      return self._done(pic, render.names_html(names), timing, t, [note, f"the model wrote: {generated}"])
    except Exception as e:  # noqa: BLE001
      return self._failed(e, 4)

  def _need_entities(self, ids) -> None:
    if ids is None and self.engine.available["masks"] is not None:
      raise InputError("upload an entity id map (PNG): without one the entities are SAM's automatic "
                       f"masks, which this checkpoint cannot make — {self.engine.available['masks']}")

  def masks(self, payload):
    try:
      image, _, note = self.image(payload)
      records, timing = self.engine.masks(image)
      t = time.perf_counter()
      pic = pictures.draw_masks(image, records)
      return self._done(pic, render.names_html([f"mask {i + 1}" for i in range(len(records))]),
                        timing, t, [note, f"{len(records)} masks"])
    except Exception as e:  # noqa: BLE001
      return self._failed(e, 4)

  # -- region picker -----------------------------------------------------------------------------------
  def picker_image(self, payload):
    """New upload → (picker picture, clicks state, box text, chat reset: messages, history)."""
    try:
      image, scale, _ = self.image(payload)
      base, f = pictures.draw_scale(image)
      return base, {"clicks": [], "per_upload_px": f * scale}, "", [], []
    except Exception:  # noqa: BLE001 — the task buttons report the problem
      return None, {"clicks": [], "per_upload_px": 1.0}, "", [], []

  def pick(self, payload, state, evt: gr.SelectData):
    """A click on the picker (pixels of the shown picture) → (picture with the point / box, state,
    box text in uploaded-image pixels): one click a point, two a box, a third starts again."""
    from PIL import Image, ImageDraw
    state = dict(state or {"clicks": [], "per_upload_px": 1.0})
    f = state.get("per_upload_px", 1.0)
    x, y = (float(v) / f for v in evt.index)
    clicks = (state.get("clicks") or [])[-1:] if len(state.get("clicks") or []) < 2 else []
    clicks = clicks + [(x, y)]
    state["clicks"] = clicks
    try:
      image, scale, _ = self.image(payload)
    except Exception:  # noqa: BLE001
      return None, state, ""
    base, _ = pictures.draw_scale(image)
    pic = Image.fromarray(base)
    draw = ImageDraw.Draw(pic)
    if len(clicks) == 1:
      text = f"{x:.0f},{y:.0f}"
      draw.ellipse([x * f - 5, y * f - 5, x * f + 5, y * f + 5], outline=(255, 255, 255), width=2)
    else:
      (xa, ya), (xb, yb) = clicks
      box = [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]
      text = ",".join(f"{v:.0f}" for v in box)
      draw.rectangle([v * f for v in box], outline=(255, 255, 255), width=2)
    return pic, state, text


def build(engine: engine_lib.Engine, *, title: str = "pixelground", examples: tp.Sequence[str] = (),
          header: str = ""):
  """The Gradio Blocks of the demo (call `.queue(...).launch(...)` on it)."""
  app = App(engine)
  avail = engine.available
  with gr.Blocks(title=title) as demo:
    demo.pixelground_app = app
    gr.Markdown(f"## {title}\n{header}")
    chat_state, pick_state = gr.State([]), gr.State({"clicks": [], "per_upload_px": 1.0})
    with gr.Row():
      with gr.Column(scale=1):
        image = gr.Image(type="filepath", label="Image (upload, paste or pick an example)",
                         sources=["upload", "clipboard"], elem_id="image", height=300)
        if examples:
          gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Examples")
        buttons, fields = {}, {}
        with gr.Tabs():
          for task in engine_lib.TASKS:
            with gr.Tab(LABELS[task], id=task, elem_id=f"tab-{task}"):
              gr.Markdown(HINTS[task])
              if avail[task] is not None:
                gr.Markdown(f"*Not available for this checkpoint:* {avail[task]}",
                            elem_id=f"{task}-unavailable")
              fields[task] = _task_fields(task)
              buttons[task] = gr.Button(f"Run {LABELS[task].lower()}", variant="primary",
                                        elem_id=f"{task}-run", interactive=avail[task] is None)
      with gr.Column(scale=1):
        picture = gr.Image(label="Result", interactive=False, elem_id="picture", format="jpeg",
                           height=420)
        words = gr.HTML(elem_id="words")
        timing = gr.HTML(elem_id="timing")
        message = gr.HTML(elem_id="message")
    outs = [picture, words, timing, message]
    run = dict(preprocess=False, concurrency_limit=None)
    buttons["caption"].click(app.caption, [image], outs, api_name="caption", **run)
    buttons["refer"].click(app.refer, [image, fields["refer"]["text"]], outs, api_name="refer", **run)
    buttons["region"].click(app.region, [image, fields["region"]["box"]], outs, api_name="region", **run)
    buttons["dense"].click(app.dense, [image], outs, api_name="dense", **run)
    buttons["masks"].click(app.masks, [image], outs, api_name="masks", **run)
    ents = fields["ground"]["entities"]
    buttons["ground"].click(app.ground, [image, fields["ground"]["text"], fields["ground"]["phrases"],
                                         ents], outs, api_name="ground", **run)
    buttons["panoptic"].click(app.panoptic, [image, ents], outs, api_name="panoptic", **run)
    chat = fields["chat"]
    chat_outs = [chat["bot"]] + outs + [chat_state, chat["text"]]
    for trigger, name in ((buttons["chat"].click, "chat"), (chat["text"].submit, False)):
      trigger(app.chat, [image, chat["text"], chat_state], chat_outs, api_name=name, **run)
    chat["clear"].click(lambda: ([], [], None), None, [chat["bot"], chat_state, picture], api_name=False)
    picker = fields["region"]["picker"]
    image.change(app.picker_image, [image], [picker, pick_state, fields["region"]["box"], chat["bot"],
                                             chat_state], preprocess=False, api_name=False)
    picker.select(app.pick, [image, pick_state],
                  [picker, pick_state, fields["region"]["box"]], preprocess=False, api_name=False)
  return demo


def _task_fields(task: str) -> dict:
  if task == "refer":
    return {"text": gr.Textbox(label="Expression", placeholder="the red circle", elem_id="refer-text")}
  elif task == "chat":
    bot = gr.Chatbot(elem_id="chat", height=220, label="Conversation", sanitize_html=False)
    text = gr.Textbox(label="Question", placeholder="Which shape has the most corners?",
                      elem_id="chat-text")
    clear = gr.Button("New conversation", elem_id="chat-clear", size="sm")
    return {"bot": bot, "text": text, "clear": clear}
  elif task == "region":
    picker = gr.Image(label="Click a point, or two corners of a box", interactive=False,
                      elem_id="picker", height=260)
    box = gr.Textbox(label="Region: x0,y0,x1,y1 (or a point x,y), pixels of the image",
                     elem_id="region-box")
    return {"picker": picker, "box": box}
  elif task == "ground":
    text = gr.Textbox(label="Caption to ground", placeholder="A man walks a dog on the grass.",
                      elem_id="ground-text")
    phrases = gr.Textbox(label="Noun phrases, ';'-separated (optional: else the model writes them)",
                         elem_id="ground-phrases")
    ents = gr.File(label="Entity id map PNG (optional; used by Panoptic too: COCO panoptic RGB ids or "
                   "single-channel ids, 0 = void)", file_types=[".png"], elem_id="entities")
    return {"text": text, "phrases": phrases, "entities": ents}
  return {}
