"""Packed shards: decoded clips or VAE latents in ArrayRecord files.

Written by `python -m vidrd_jax.data.pack` (see `vidrd_jax.data.pack`), read by
the `packed` source kind, so pod training reads ready tensors instead of
decoding video.

Layout of a packed folder:
  metadata.json  {"format": "vidrd_jax.packed/1", "kind": "video" | "latents",
                  "frames": F, "resolution": R (pixels of the clips, also for
                  latents), "shape": [F, ...] (one record's array), "dtype":
                  "uint8" | "float16" | "float32", "num_records": N,
                  "shards": [file names], "skipped": {reason: count},
                  "sources": [source specs it was packed from]}
  <prefix>-SSSSS-of-NNNNN.array_record
      one record per clip: the bytes of an uncompressed .npz (numpy.savez)
      holding `video` (uint8 [F, R, R, 3]) or `latents` ([F, R/8, R/8, 4], the
      pipeline's encode_frames output, i.e. already multiplied by the VAE
      scaling factor) and `caption` (0-d unicode array). Readable without
      vidrd_jax: np.load(io.BytesIO(record)).

Reading: the `packed` source needs `resolution` equal to the packed one and
`frames` <= the packed F (a random window of F frames is taken per sample).
"""

from __future__ import annotations

import io
import json
import os
from typing import Mapping

import grain.python as grain
import numpy as np
from etils import epath

from vidrd_jax.data.skips import SkipRecord
from vidrd_jax.data.sources import check_caption

FORMAT = "vidrd_jax.packed/1"
METADATA = "metadata.json"
# One record per chunk keeps random access to a single clip cheap; clips are
# already large, so grouping would not buy compression.
WRITER_OPTIONS = "group_size:1,uncompressed"


def encode_record(key: str, array: np.ndarray, caption: str) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{key: array, "caption": np.array(caption)})
  return buf.getvalue()


def decode_record(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def read_metadata(path: str) -> dict:
  meta_path = epath.Path(path) / METADATA
  if not meta_path.exists():
    raise FileNotFoundError(
        f"packed source: {meta_path} does not exist; is {path} a folder written by "
        f"python -m vidrd_jax.data.pack?")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"packed source: {meta_path} has format {meta.get('format')!r}, expected {FORMAT}")
  return meta


class PackedSource:
  """`packed` kind: ArrayRecord shards written by vidrd_jax.data.pack."""

  def __init__(self, path: str, frames: int, resolution: int):
    meta = read_metadata(path)
    self.path, self.meta, self.frames = path, meta, frames
    self.produces = meta["kind"]
    if meta["resolution"] != resolution:
      raise ValueError(f"packed source {path} holds {meta['resolution']}px clips, "
                       f"the pipeline asks for {resolution}px; re-pack at that resolution")
    if frames > meta["frames"]:
      raise ValueError(f"packed source {path} holds {meta['frames']}-frame clips, "
                       f"the pipeline asks for {frames} frames")
    self.record_shape = (frames,) + tuple(meta["shape"][1:])
    shards = [os.fspath(epath.Path(path) / s) for s in meta["shards"]]
    missing = [s for s in shards if not epath.Path(s).exists()]
    if missing:
      raise FileNotFoundError(f"packed source {path}: shards missing: {missing[:4]}")
    self._records = grain.ArrayRecordDataSource(shards)
    if len(self._records) != meta["num_records"]:
      raise ValueError(f"packed source {path}: metadata says {meta['num_records']} records, "
                       f"shards hold {len(self._records)}")

  def __len__(self) -> int:
    return len(self._records)

  def load(self, index: int, rng: np.random.Generator) -> dict:
    where = f"{self.path}[{index}]"
    try:
      record = decode_record(self._records[index])
      data = record[self.produces]
      caption = record["caption"].item()
    except Exception as e:  # pylint: disable=broad-except
      raise SkipRecord("unreadable", where, f"{type(e).__name__}: {e}") from None
    caption = check_caption(caption, where)
    if data.shape[0] < self.frames or data.shape[1:] != self.record_shape[1:]:
      raise SkipRecord("unreadable", where, f"record shape {data.shape}")
    start = int(rng.integers(data.shape[0] - self.frames + 1))
    return {self.produces: data[start:start + self.frames], "caption": caption}


def write_metadata(path: str, meta: Mapping) -> None:
  (epath.Path(path) / METADATA).write_text(json.dumps(dict(meta), indent=1))


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def open_writer(path: str):
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  return ArrayRecordWriter(path, WRITER_OPTIONS)


def records_per_shard(num_records: int, shard_size: int) -> list[int]:
  count = max(1, -(-num_records // shard_size))
  base, extra = divmod(num_records, count)
  return [base + (i < extra) for i in range(count)]


__all__ = ["PackedSource", "encode_record", "decode_record", "read_metadata", "write_metadata",
           "shard_name", "open_writer", "records_per_shard", "FORMAT"]
