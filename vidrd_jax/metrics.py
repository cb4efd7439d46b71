"""Training metrics: ``metrics.jsonl``, TensorBoard, console, and MFU estimates.

Only process 0 writes. Every logged step becomes one JSON line in ``WORKDIR/metrics.jsonl``
(``{"step": ..., "loss": ..., ...}``), so runs can be compared with a few lines of Python.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (chip for TPU), from vendor data sheets.
PEAK_FLOPS_BF16 = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,   # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,   # v6e (Trillium)
    "nvidia h100": 989e12,   # SXM dense
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
    "nvidia l4": 121e12,
}


def peak_flops_per_device(device: Optional[jax.Device] = None) -> Optional[float]:
  """bf16 peak FLOP/s of the device kind, or None when unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  # Longest key first so "tpu v5 lite" wins over "tpu v5".
  for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):
    if kind.startswith(key) or key in kind:
      return PEAK_FLOPS_BF16[key]
  return None


def compiled_flops(compiled: Any) -> Optional[float]:
  """Total FLOPs of one call of a lowered or compiled jit function, from XLA's cost analysis.

  For a compiled SPMD executable XLA reports the per-device program; for a lowered one, the
  global program (divide by the device count for per-device work).
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def mfu(flops_per_device_per_step: Optional[float], step_time_s: float,
        peak: Optional[float] = None) -> Optional[float]:
  """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak."""
  peak = peak if peak is not None else peak_flops_per_device()
  if not flops_per_device_per_step or not peak or step_time_s <= 0:
    return None
  return flops_per_device_per_step / step_time_s / peak


def _scalar(value: Any) -> Optional[float]:
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    return None
  return v


class MetricWriter:
  """Writes scalars to ``metrics.jsonl``, TensorBoard (tensorboardX) and the log.

  Args:
    workdir: run directory (local; for ``gs://`` only TensorBoard via tensorboardX's gfile
      support would work, so the JSONL file goes to a local mirror if needed).
    tensorboard: also write event files under ``workdir/tensorboard``.
    enabled: False on processes other than 0.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, console: bool = True) -> dict:
    """Writes one record; non-finite or non-scalar values are written as null / skipped."""
    record: dict[str, Any] = {"step": int(step)}
    for key, value in scalars.items():
      v = _scalar(value)
      if v is None:
        continue
      record[key] = v if math.isfinite(v) else None
    if not self.enabled:
      return record
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, v in record.items():
        if key != "step" and v is not None:
          self._tb.add_scalar(key, v, int(step))
    if console:
      logging.info("step %d: %s", step, ", ".join(
          f"{k}={v:.4g}" for k, v in record.items() if k != "step" and v is not None))
    return record

  def write_video(self, step: int, name: str, video: np.ndarray, fps: int = 8) -> None:
    """Adds ``video`` [B, F, H, W, 3] in [0, 1] (or uint8) to TensorBoard."""
    if not self.enabled or self._tb is None:
      return
    video = np.asarray(video)
    if video.dtype != np.uint8:
      video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    # tensorboardX wants [N, T, C, H, W].
    self._tb.add_video(name, np.transpose(video, (0, 1, 4, 2, 3)), int(step), fps=fps)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads back ``WORKDIR/metrics.jsonl`` (one dict per logged step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
