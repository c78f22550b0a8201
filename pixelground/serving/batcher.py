"""Batches concurrent requests of the same task into one model call, on one worker thread.

Requests arrive from many threads (one per browser request); a single worker owns the model, so calls
never overlap on the device. The worker takes the task of the oldest waiting request, waits until that
task has `max_batch` requests or the oldest has waited `max_wait_s`, and hands up to `max_batch` of them
to the task's handler as one list. A handler reports per request: `emit` partial results (streaming),
then `finish` or `fail`; an exception out of a handler fails the requests it left unfinished, and the
worker goes on with the next batch.

    batcher = Batcher({"caption": handle_captions}, max_batch={"caption": 8}, max_wait_s=0.02)
    result = batcher.submit("caption", payload).result()          # blocks; raises the handler's error
    for kind, value in batcher.submit("chat", payload).events():   # ("partial", v)… then ("done", v)
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import typing as tp

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Batch:
  task: str
  size: int
  waited_s: float   # the oldest request's wait before the batch started
  run_s: float      # the handler's time


class Request:
  """One request: its payload, timings (perf_counter seconds) and the events the handler sends."""

  def __init__(self, task: str, payload: tp.Any):
    self.task, self.payload = task, payload
    self.arrived = time.perf_counter()
    self.started: float | None = None
    self.finished: float | None = None
    self.batch_size = 0
    self._events: queue.Queue = queue.Queue()
    self._closed = False

  # -- the handler's side ------------------------------------------------------------------------------
  def emit(self, value: tp.Any) -> None:
    """A partial result (streaming)."""
    if not self._closed:
      self._events.put(("partial", value))

  def finish(self, value: tp.Any) -> None:
    if not self._closed:
      self._closed, self.finished = True, time.perf_counter()
      self._events.put(("done", value))

  def fail(self, error: BaseException) -> None:
    if not self._closed:
      self._closed, self.finished = True, time.perf_counter()
      self._events.put(("error", error))

  @property
  def closed(self) -> bool:
    return self._closed

  # -- the caller's side -------------------------------------------------------------------------------
  def events(self, timeout_s: float | None = None) -> tp.Iterator[tuple[str, tp.Any]]:
    """("partial", value)… then ("done", value); a failure raises the handler's exception."""
    while True:
      try:
        kind, value = self._events.get(timeout=timeout_s)
      except queue.Empty:
        raise TimeoutError(f"{self.task}: no answer within {timeout_s} s") from None
      if kind == "error":
        raise value
      yield kind, value
      if kind == "done":
        return

  def result(self, timeout_s: float | None = None) -> tp.Any:
    for kind, value in self.events(timeout_s):
      if kind == "done":
        return value
    raise RuntimeError(f"{self.task}: the handler closed the request without a result")

  @property
  def queued_s(self) -> float:
    return (self.started or time.perf_counter()) - self.arrived


Handler = tp.Callable[[list[Request]], None]


class Batcher:
  """See the module docstring. `max_batch`: the most requests per handler call, one number for every
  task or per task (tasks not named: 1); `max_wait_s`: how long the oldest request may wait for others
  to join its batch."""

  def __init__(self, handlers: dict[str, Handler], *, max_batch: int | dict[str, int] = 8,
               max_wait_s: float = 0.02, history: int = 10_000):
    self.handlers = dict(handlers)
    self.max_batch = ({t: int(max_batch) for t in handlers} if isinstance(max_batch, int)
                      else {t: int(max_batch.get(t, 1)) for t in handlers})
    if any(b < 1 for b in self.max_batch.values()):
      raise ValueError(f"max_batch must be ≥ 1 per task; got {self.max_batch}")
    self.max_wait_s = float(max_wait_s)
    self.batches: list[Batch] = []   # what ran, newest last (bounded by `history`)
    self._history = history
    self._waiting: dict[str, list[Request]] = {t: [] for t in handlers}
    self._cv = threading.Condition()
    self._stop = False
    self._worker = threading.Thread(target=self._loop, name="pixelground-batcher", daemon=True)
    self._worker.start()

  def submit(self, task: str, payload: tp.Any) -> Request:
    if task not in self.handlers:
      raise ValueError(f"unknown task {task!r}; this server runs {sorted(self.handlers)}")
    req = Request(task, payload)
    with self._cv:
      if self._stop:
        raise RuntimeError("the batcher is closed")
      self._waiting[task].append(req)
      self._cv.notify_all()
    return req

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._worker.join(timeout=10)

  # -- worker ------------------------------------------------------------------------------------------
  def _next_batch(self) -> list[Request] | None:
    with self._cv:
      while True:
        if self._stop:
          return None
        heads = [(q[0].arrived, t) for t, q in self._waiting.items() if q]
        if not heads:
          self._cv.wait()
          continue
        _, task = min(heads)
        q, limit = self._waiting[task], self.max_batch[task]
        deadline = q[0].arrived + self.max_wait_s
        while len(q) < limit and not self._stop and (left := deadline - time.perf_counter()) > 0:
          self._cv.wait(timeout=left)
        taken, self._waiting[task] = q[:limit], q[limit:]
        return taken

  def _loop(self) -> None:
    while (batch := self._next_batch()) is not None:
      start = time.perf_counter()
      for r in batch:
        r.started, r.batch_size = start, len(batch)
      task = batch[0].task
      try:
        self.handlers[task](batch)
      except Exception as e:  # noqa: BLE001 — reported to each caller; the worker keeps serving
        log.warning("%s batch of %d failed: %s: %s", task, len(batch), type(e).__name__, e)
        for r in batch:
          r.fail(e)
      for r in batch:
        if not r.closed:
          r.fail(RuntimeError(f"{task}: the handler returned without an answer"))
      self.batches.append(Batch(task, len(batch), start - batch[0].arrived, time.perf_counter() - start))
      del self.batches[: -self._history]
