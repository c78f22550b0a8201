"""The trainer's view of the non-finite guard (`steps.make_train_step` decides on device).

The step itself leaves the state unchanged when its loss, gradient norm or update norm is not finite
and counts it in a small replicated carry. `NonFiniteWatch` reads that carry one step late — after the
next step has been dispatched, from a copy started when it was produced — so the host never waits for
the step it has just queued. Each skipped step is printed with its task and the non-finite terms;
`max_streak` skipped steps in a row raise `NonFiniteStop`, whose message names the first skipped step,
its task and its first non-finite term. The run then stops within max_streak + 1 steps of the first
non-finite one, without saving: the newest checkpoint is the last good state.
"""

from __future__ import annotations

import collections
import typing as tp

import jax
from absl import logging

from pixelground.training import steps


class NonFiniteStop(RuntimeError):
  """`max_streak` consecutive steps had a non-finite loss, gradient or update norm."""


def _names(mask: int, names: tp.Sequence[str]) -> list[str]:
  return [n for i, n in enumerate(names) if (int(mask) >> i) & 1]


class NonFiniteWatch:
  """Follows the guard carry of every step (see the module docstring)."""

  def __init__(self, max_streak: int, *, echo: bool = True):
    if max_streak < 1:
      raise ValueError(f"config.max_nonfinite_steps={max_streak}: must be ≥ 1.")
    self.max_streak, self.echo = max_streak, echo
    self.pending: collections.deque = collections.deque()
    self.skipped = 0      # steps skipped so far in this run (as read)
    self.streak = 0       # consecutive skipped steps up to the newest step read
    self.first: tuple[int, str, list[str]] | None = None   # (step, task, non-finite terms) of the streak

  def push(self, step: int, task: str | None, guard: dict, metrics: dict) -> None:
    """Step `step` (1-based: the state's step after it) of `task` was dispatched; reads the previous
    step's carry (raising `NonFiniteStop` when the streak is long enough)."""
    for v in guard.values():
      v.copy_to_host_async()
    self.pending.append((step, task or "mixed", guard, metrics))
    while len(self.pending) > 1:
      self._read(*self.pending.popleft())

  def flush(self) -> None:
    """Reads every pending step (before a checkpoint and at the end of the run)."""
    while self.pending:
      self._read(*self.pending.popleft())

  def _read(self, step: int, task: str, guard: dict, metrics: dict) -> None:
    g = {k: int(v) for k, v in jax.device_get(guard).items()}
    if g["skipped"] > self.skipped:
      m = jax.device_get(metrics)
      names = steps.guard_terms(m)
      bad = _names(m["nonfinite"], names)
      if g["streak"] == 1:
        self.first = (step, task, bad)
      values = "  ".join(f"{k} {float(m[k]):.4g}" for k in names if k in m)
      msg = (f"step {step} [{task}]: non-finite {', '.join(bad) or '?'} — update not applied "
             f"({g['streak']} in a row, {g['skipped']} in this run); {values}")
      logging.info(msg)  # the terminal gets the print below
      if self.echo:
        print(msg, flush=True)
    self.skipped, self.streak = g["skipped"], g["streak"]
    if self.streak >= self.max_streak:
      first_step, first_task, bad = self.first or (step, task, [])
      raise NonFiniteStop(
          f"{self.streak} consecutive steps with a non-finite loss or gradient (config."
          f"max_nonfinite_steps={self.max_streak}), the first at step {first_step} [task {first_task}], "
          f"first non-finite term: {bad[0] if bad else '?'} (all: {', '.join(bad) or '?'}). None of "
          f"them was applied; lower the learning rate or check that task's data.")

  def line(self) -> str:
    """A short status for the log line ("" when nothing was skipped)."""
    return f"  skipped {self.skipped} non-finite" if self.skipped else ""
