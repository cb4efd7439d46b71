"""Shared pieces of the converters: errors that name every bad key, and safe file loading.

Converters work on flat ``{name: np.ndarray}`` state dicts (PyTorch layout) and produce nested
Flax parameter dicts of NumPy arrays. Nothing here runs code from a checkpoint file.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message lists every offending name."""


def check_state_dict(
    what: str,
    got: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
) -> None:
  """Raises ConversionError listing all missing, unexpected and mis-shaped keys at once.

  Args:
    what: which model, for the message ("unet", "vae", ...).
    got: the checkpoint's tensors by name.
    expected: the shape each name must have.
    ignore: names in ``got`` that are known and deliberately unused (e.g. buffers).
  """
  ignore = set(ignore)
  missing = sorted(k for k in expected if k not in got)
  unexpected = sorted(k for k in got if k not in expected and k not in ignore)
  mismatched = sorted(
      f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
      for k in expected
      if k in got and tuple(got[k].shape) != tuple(expected[k])
  )
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
  if problems:
    raise ConversionError(f"{what} checkpoint does not match the model:\n  " + "\n  ".join(problems))


def convert_components(
    converters: Mapping[str, Callable[[], dict]], log: Callable[[str], None] = print) -> dict:
  """Runs every component's converter and reports all their problems together.

  Args:
    converters: {"unet": fn, "vae": fn, ...}, each returning that component's Flax params.
    log: progress messages.

  Raises:
    ConversionError: the messages of every component that failed, so one run shows the
      whole list of bad keys rather than the first component's.
  """
  params, errors = {}, []
  for name, fn in converters.items():
    log(f"converting {name}")
    try:
      params[name] = fn()
    except ConversionError as e:
      errors.append(str(e))
  if errors:
    raise ConversionError("\n".join(errors))
  return params


def flatten(params: Mapping, sep: str = "/") -> dict[str, np.ndarray]:
  """Nested dict -> {"a/b/c": array}."""
  out = {}

  def rec(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
    else:
      out[prefix] = node

  rec("", params)
  return out


def unflatten(flat: Mapping[str, np.ndarray], sep: str = "/") -> dict:
  """{"a/b/c": array} -> nested dict."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def require_path(path: str, what: str = "checkpoint") -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  return path
