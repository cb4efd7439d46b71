"""Bad-record bookkeeping shared by every source.

A source that cannot produce a record raises `SkipRecord(reason, path)`. The
loader catches it, logs the path once per process, counts it, and draws a
replacement record from the same source, so a bad file never crashes training
and never shortens a batch. Counts travel with the data: every record carries
`skipped`, an int32 vector over `SKIP_REASONS` of the bad records met while
producing it (batched: [B, len(SKIP_REASONS)]), so training can log them even
when decoding runs in grain worker processes. `STATS` additionally counts what
this process itself saw (used by the preview tool).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Mapping

import numpy as np

# Fixed order: it is the layout of the per-record `skipped` vector.
SKIP_REASONS = (
    "missing_file",  # the video/image path does not exist
    "unreadable",  # zero-length, truncated or undecodable file
    "too_short",  # fewer frames than the clip needs at the requested fps/stride
    "bad_caption",  # caption empty or not text
)


class SkipRecord(Exception):
  """Raised by a source for a record that must be skipped (bad input)."""

  def __init__(self, reason: str, path: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"Unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
    super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
    self.reason = reason
    self.path = path
    self.detail = detail


class SkipStats:
  """Thread-safe per-process counter of skipped records, by reason."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._logged = set()

  def record(self, skip: SkipRecord) -> None:
    """Counts `skip` and logs its path the first time this process sees it."""
    with self._lock:
      self._counts[skip.reason] += 1
      first = skip.path not in self._logged
      self._logged.add(skip.path)
    if first:
      logging.warning("Skipping bad record %s", skip)

  def counts(self) -> dict[str, int]:
    with self._lock:
      return {r: self._counts[r] for r in SKIP_REASONS if self._counts[r]}

  def reset(self) -> None:
    with self._lock:
      self._counts.clear()
      self._logged.clear()


STATS = SkipStats()


def skip_vector(counts: Mapping[str, int]) -> np.ndarray:
  """Counts by reason -> int32 [len(SKIP_REASONS)] in `SKIP_REASONS` order."""
  return np.array([counts.get(r, 0) for r in SKIP_REASONS], np.int32)


def skipped_counts(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Sums a batch's `skipped` [B, R] vectors into {reason: count}."""
  total = np.asarray(batch["skipped"]).reshape(-1, len(SKIP_REASONS)).sum(0)
  return {r: int(c) for r, c in zip(SKIP_REASONS, total)}
