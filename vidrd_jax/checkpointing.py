"""Orbax checkpoints for training: async, atomic, last-K + best, preemption-safe.

One checkpoint step directory holds three items:

* ``state``: the train state pytree (params, EMA, optimizer state, step, RNG, counters),
  saved sharded from every process and restored straight into the target shardings;
* ``data``: the data iterator's state (JSON), so a resumed run sees the same batches;
* ``meta``: small JSON facts (step, wall time, metrics) for humans and scripts.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save never leaves a half-written step that looks finished. A step that is
finished but unreadable (disk corruption, truncated files) is detected when restoring:
:meth:`Checkpointer.restore_latest` moves it aside into ``<dir>/../checkpoints_corrupt`` and
falls back to the previous good one.

Preemption: :class:`PreemptionWatcher` installs a SIGTERM handler that only sets a flag;
the training loop polls it after each step, saves, waits for the write and exits.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

PyTree = Any


def _encode_data_state(data_state: Any) -> Any:
  """Iterator states are bytes (grain DataLoader) or JSON-able dicts (grain datasets)."""
  if isinstance(data_state, bytes):
    return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
  return data_state


def _decode_data_state(data_state: Any) -> Any:
  if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
    return base64.b64decode(data_state["__bytes__"])
  return data_state


class Checkpointer:
  """Thin wrapper around ``ocp.CheckpointManager`` with the policies training needs.

  Args:
    directory: where step directories go (local path or ``gs://``).
    save_every: save every N steps (forced saves, e.g. at preemption, bypass this).
    keep_last: how many of the most recent checkpoints to keep.
    keep_best: how many of the best checkpoints (by ``best_metric``) to keep as well; 0 = none.
    best_metric: name of the metric in ``metrics`` passed to :meth:`save`.
    best_mode: ``"min"`` or ``"max"``.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str | os.PathLike[str], *, save_every: int, keep_last: int = 3,
               keep_best: int = 1, best_metric: str = "loss", best_mode: str = "min",
               async_save: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    self.directory = epath.Path(directory)
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(n=keep_last)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric],
          # BestN keeps the tail of the sorted list: sort descending to keep the smallest.
          reverse=best_mode == "min", n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_every)),
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "meta"), options=options)

  @property
  def manager(self) -> ocp.CheckpointManager:
    return self._manager

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: PyTree, *, data_state: Any = None,
           metrics: Optional[dict[str, float]] = None, force: bool = False) -> bool:
    """Starts saving ``state`` at ``step`` (asynchronously); returns whether it saves.

    ``metrics`` must contain ``best_metric`` for the checkpoint to compete for "best".
    """
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if self.best_metric not in metrics:
      # Without the metric the step is kept only while it is among the latest K.
      metrics = None
    meta = {"step": int(step), "time": time.time(), "metrics": metrics or {}}
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=force,
    )

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, Any, dict[str, Any]]:
    """Restores one step into the shardings given by ``abstract_state``.

    Args:
      step: which checkpoint.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set.

    Returns:
      (state, data_state or None, meta dict).
    """
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
    return restored["state"], _decode_data_state(restored["data"]), dict(restored["meta"] or {})

  def restore_latest(self, abstract_state: PyTree) -> Optional[tuple[int, PyTree, Any, dict[str, Any]]]:
    """Restores the newest readable checkpoint, moving unreadable ones aside.

    Returns:
      (step, state, data_state, meta), or None when there is no usable checkpoint.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data_state, meta = self.restore(step, abstract_state)
        return step, state, data_state, meta
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types (ValueError, FileNotFoundError, tensorstore errors...) for
        # damaged steps; any of them means "not usable": fall back to the one before.
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to "
                        "the previous one", step, self.directory, type(e).__name__, e)
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of the manager's directory so it is neither listed nor overwritten."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if not src.exists():
        candidates = [p for p in self.directory.iterdir() if p.name.split("_")[-1] == str(step)]
        src = candidates[0] if candidates else src
      if src.exists():
        dest_dir = self.directory.parent / (self.directory.name + "_corrupt")
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{src.name}.{int(time.time())}"
        src.rename(dest)
        logging.warning("moved unreadable checkpoint %s to %s", src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Orbax / JAX multi-host preemption notice (needs jax.distributed); False otherwise."""
    if jax.process_count() == 1:
      return False
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionWatcher:
  """Turns SIGTERM into a flag the training loop checks after each step.

  The handler does no I/O: saving inside a signal handler could interleave with a running
  async save. The previous handler is restored by :meth:`uninstall`.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous: dict[int, Any] = {}

  def install(self) -> "PreemptionWatcher":
    # signal.signal works only in the main thread; elsewhere (e.g. some test runners) we
    # still honour explicit trigger() calls.
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("received signal %d: checkpointing and stopping after this step", signum)
    self._event.set()

  def trigger(self) -> None:
    self._event.set()

  @property
  def preempted(self) -> bool:
    return self._event.is_set()

  def __enter__(self) -> "PreemptionWatcher":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
