"""Command-line helpers shared by pack, preview and tools/caption_segments."""

from __future__ import annotations

import importlib.util
import json
from typing import Any
from urllib.parse import parse_qsl

from vidrd_jax.data.sources import SOURCE_KINDS


def _value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def parse_source_flag(flag: str) -> dict:
  """"KIND:PATH[?key=value&...]" -> source spec dict.

  Values are JSON when they parse as JSON (numbers, lists, true/false), else
  strings; `templates` may list several templates separated by "|". The PATH of
  `synthetic` may be empty ("synthetic:" or "synthetic:?num_records=64").
  Example: classes:/data/ucf101?fps=8&templates=a person {label}|{label}
  """
  kind, sep, rest = flag.partition(":")
  if not sep or kind not in SOURCE_KINDS:
    raise ValueError(f"--source {flag!r}: expected KIND:PATH with KIND one of {sorted(SOURCE_KINDS)}")
  path, _, query = rest.partition("?")
  spec: dict[str, Any] = {"kind": kind}
  if path:
    spec["path"] = path
  for key, value in parse_qsl(query, keep_blank_values=True):
    if key == "templates":
      spec[key] = value.split("|")
    else:
      spec[key] = _value(value)
  return spec


def sources_from_config_file(path: str) -> list[dict]:
  """Source specs from a Python config file's get_config() (its .data.sources if present)."""
  spec = importlib.util.spec_from_file_location("_vidrd_data_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  data = config.data if hasattr(config, "data") else config
  return [dict(s.to_dict() if hasattr(s, "to_dict") else s) for s in data.sources]
