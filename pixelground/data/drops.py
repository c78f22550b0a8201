"""Counting the records a task's filters drop (`Converters.web_caption`), for the trainer's log.

The loader adds `batch[pipeline.DROPPED]` — (num tasks, num reasons) counts of the records dropped
while that batch was assembled, in whichever process converted them. `DropCounter` sums them over the
run and, at each log step, over every process (one small all-gather), so the printed line and the
`data/dropped/<task>/<reason>` scalars are the whole job's cumulative counts.
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

  def add(self, counts: np.ndarray, kept: int) -> None:
    """One batch: its (tasks, reasons) drop counts and the number of rows it holds."""
    self.local += np.asarray(counts, np.int64).reshape(self.local.shape)
    self.kept += int(kept)

  def totals(self) -> tuple[np.ndarray, int]:
    """(counts summed over every process, rows kept over every process)."""
    import jax
    if jax.process_count() == 1:
      return self.local, self.kept
    from jax.experimental import multihost_utils
    flat = np.concatenate([self.local.ravel(), [self.kept]])
    total = np.asarray(multihost_utils.process_allgather(flat)).reshape(-1, flat.size).sum(0)
    return total[:-1].reshape(self.local.shape), int(total[-1])

  def scalars(self, counts: np.ndarray | None = None, kept: int | None = None) -> dict[str, float]:
    if counts is None:
      counts, kept = self.totals()
    out = {f"data/dropped/{t}/{r}": float(counts[i, j]) for i, t in enumerate(self.tasks)
           for j, r in enumerate(self.reasons)}
    read = counts.sum() + kept
    out["data/dropped_fraction"] = float(counts.sum() / read) if read else 0.0
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
