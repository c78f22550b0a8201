"""Counting the records a task's filters drop (`Converters.web_caption`), for the trainer's log.

The loader adds `batch[pipeline.DROPPED]` — (num tasks, num reasons) counts of the records dropped
while that batch was assembled, in whichever process converted them. `DropCounter` sums them and, at
each log step, over every process (one small all-gather): the printed line gives the counts since this
process started (a resumed run starts again from 0), the `data/dropped/<task>/<reason>` and
`data/dropped_fraction` scalars those of the log window, so their sum over a run's metrics is the total
across restarts.
"""

from __future__ import annotations

import typing as tp

import numpy as np


class DropCounter:
  """Cumulative dropped-record counts per (task, reason) and rows kept, over all processes."""

  def __init__(self, tasks: tp.Sequence[str], reasons: tp.Sequence[str]):
    self.tasks, self.reasons = list(tasks), list(reasons)
    self.local = np.zeros((len(self.tasks), len(self.reasons)), np.int64)
    self.kept = 0
    self.reported = (np.zeros_like(self.local), 0)  # the totals at the previous `scalars`

  def add(self, counts: np.ndarray, kept: int) -> None:
    """One batch: its (tasks, reasons) drop counts and the number of rows it holds."""
    self.local += np.asarray(counts, np.int64).reshape(self.local.shape)
    self.kept += int(kept)

  def totals(self) -> tuple[np.ndarray, int]:
    """(counts summed over every process, rows kept over every process)."""
    import jax
    if jax.process_count() == 1:
      return self.local, self.kept
    from pixelground.parallel import runtime
    flat = np.concatenate([self.local.ravel(), [self.kept]])
    total = runtime.allgather(flat).reshape(-1, flat.size).sum(0)
    return total[:-1].reshape(self.local.shape), int(total[-1])

  def scalars(self, counts: np.ndarray | None = None, kept: int | None = None) -> dict[str, float]:
    """The log window's counts (since the previous call) from the current totals."""
    if counts is None:
      counts, kept = self.totals()
    prev_counts, prev_kept = self.reported
    window, window_kept = counts - prev_counts, kept - prev_kept
    self.reported = (counts.copy(), kept)
    out = {f"data/dropped/{t}/{r}": float(window[i, j]) for i, t in enumerate(self.tasks)
           for j, r in enumerate(self.reasons)}
    read = window.sum() + window_kept
    out["data/dropped_fraction"] = float(window.sum() / read) if read else 0.0
    return out

  def line(self, counts: np.ndarray | None = None, kept: int | None = None) -> str:
    """'filtered: 12 of 140 records read (8.6%) — web: language 7, low_score 5'."""
    if counts is None:
      counts, kept = self.totals()
    read = int(counts.sum()) + kept
    parts = []
    for i, t in enumerate(self.tasks):
      by = [f"{r} {int(counts[i, j])}" for j, r in enumerate(self.reasons) if counts[i, j]]
      if by:
        parts.append(f"{t}: " + ", ".join(by))
    frac = f" ({100 * counts.sum() / read:.1f}%)" if read else ""
    return f"filtered: {int(counts.sum())} of {read} records read{frac}" + (
        " — " + "; ".join(parts) if parts else "")
