"""Mixing, sharding, shuffling, decoding and batching with grain.

Pipeline (per host):
  Mixture (index -> (source, record))  --IndexSampler: global shuffle, per-host
  shard, infinite epochs-->  _Decode (RandomMapTransform, runs in grain worker
  processes: decode / zoom-pan / read the record, replace bad records)  -->
  Batch(global_batch_size // process_count, drop_remainder)  -->  [_Tokenize].

Mixing: source k with normalised weight p_k is drawn at positions given by a
fixed interleaving table (period 1000 when mixing, so weights are honoured to
1e-3); one "epoch" of the mixture has L = max_k ceil(n_k / p_k) samples, so each
source is seen at least once per epoch and smaller ones are repeated (with fresh
random clips, since the rng depends on the sample's position). The sampler then
shuffles the mixture's index space (different order every epoch), shards it
into contiguous per-host ranges (disjoint between hosts) and repeats it forever.

Batches: {"video": float32 [B, F, R, R, 3] in [-1, 1] (or "latents" float32
[B, F, h, w, 4] for packed latent shards), "caption": str [B], "source_id":
int32 [B] (index of the source in data_config.sources), "skipped": int32
[B, len(SKIP_REASONS)] (bad records replaced to make each sample), and, with
`tokenize_fn`, "input_ids": int32 [B, L]}.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from absl import flags
import grain.python as grain
import numpy as np

from vidrd_jax.data import skips
from vidrd_jax.data.sources import build_source
from vidrd_jax.data.video import to_float

# Consecutive bad records tolerated for one sample before the source is
# declared broken (then the error names the source: it needs fixing, not skipping).
MAX_CONSECUTIVE_SKIPS = 100
_MIX_PERIOD = 1000


class Mixture:
  """Random-access index space over weighted sources: grain data source.

  `mixture[g]` -> np.int64 [2] = (source id, record index in that source).
  """

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], min_length: int = 1):
    sizes, weights = list(map(int, sizes)), np.asarray(weights, np.float64)
    if len(sizes) != len(weights) or not sizes:
      raise ValueError("Mixture needs one weight per source and at least one source")
    if any(n <= 0 for n in sizes):
      raise ValueError(f"Every data source needs at least one record, got sizes {sizes}")
    if np.any(~np.isfinite(weights)) or np.any(weights <= 0):
      raise ValueError(f"Source weights must be positive numbers, got {weights.tolist()}")
    self.sizes = sizes
    # Room for every source at least once per period, however many there are.
    period = 1 if len(sizes) == 1 else max(_MIX_PERIOD, 4 * len(sizes))
    # Largest-remainder rounding of p_k * period, every source at least once.
    exact = weights / weights.sum() * period
    counts = np.maximum(np.floor(exact).astype(np.int64), 1)
    while counts.sum() < period:
      counts[np.argmax(exact - counts)] += 1
    while counts.sum() > period:
      counts[np.argmax(np.where(counts > 1, counts - exact, -np.inf))] -= 1
    self.counts = counts
    self.proportions = counts / period
    # Smooth weighted round robin: each source spread evenly over the period.
    table = np.empty(period, np.int64)
    rank = np.empty(period, np.int64)
    credit = np.zeros(len(sizes), np.int64)
    seen = np.zeros(len(sizes), np.int64)
    for i in range(period):
      credit += counts
      k = int(np.argmax(credit))
      credit[k] -= period
      table[i], rank[i] = k, seen[k]
      seen[k] += 1
    self.table, self.rank, self.period = table, rank, period
    # min_length: every host needs at least one sample per epoch.
    self.length = max(min_length, *(math.ceil(n / p) for n, p in zip(sizes, self.proportions)))

  def __len__(self) -> int:
    return self.length

  def __repr__(self) -> str:
    # grain validates a restored iterator state against repr(data_source).
    return f"Mixture(sizes={self.sizes}, counts={self.counts.tolist()}, period={self.period})"

  def __getitem__(self, g: int) -> np.ndarray:
    cycle, pos = divmod(int(g), self.period)
    k = int(self.table[pos])
    j = cycle * int(self.counts[k]) + int(self.rank[pos])
    return np.array([k, j % self.sizes[k]], np.int64)


class _Decode(grain.RandomMapTransform):
  """(source id, index) -> decoded record; bad records replaced and counted."""

  def __init__(self, sources: Sequence[Any], key: str, shape: tuple[int, ...]):
    self.sources, self.key, self.shape = list(sources), key, tuple(shape)

  def random_map(self, element: np.ndarray, rng: np.random.Generator) -> dict:
    k, j = int(element[0]), int(element[1])
    source = self.sources[k]
    counts = {}
    for _ in range(MAX_CONSECUTIVE_SKIPS):
      try:
        record = source.load(j, rng)
        break
      except skips.SkipRecord as e:
        skips.STATS.record(e)
        counts[e.reason] = counts.get(e.reason, 0) + 1
        # A random replacement from the same source keeps the mixing ratios.
        j = int(rng.integers(len(source)))
    else:
      raise RuntimeError(
          f"Data source {k} ({type(source).__name__}) gave {MAX_CONSECUTIVE_SKIPS} bad records "
          f"in a row ({skips.STATS.counts()}); check its files (see the warnings above).")
    data = np.asarray(record[self.key])
    if data.dtype == np.uint8:
      data = to_float(data)
    data = data.astype(np.float32, copy=False)
    if data.shape != self.shape:
      raise ValueError(f"Data source {k} ({type(source).__name__}) produced {self.key} of shape "
                       f"{data.shape}, expected {self.shape}")
    return {self.key: data, "caption": record["caption"], "source_id": np.int32(k),
            "skipped": skips.skip_vector(counts)}


class _Tokenize(grain.MapTransform):
  """Adds "input_ids" = tokenize_fn(captions) to a batch."""

  def __init__(self, tokenize_fn: Callable[[list[str]], np.ndarray]):
    self.tokenize_fn = tokenize_fn

  def map(self, batch: dict) -> dict:
    ids = np.asarray(self.tokenize_fn([str(c) for c in batch["caption"]]), np.int32)
    if ids.ndim != 2 or ids.shape[0] != len(batch["caption"]):
      raise ValueError(f"tokenize_fn returned shape {ids.shape}, expected "
                       f"[{len(batch['caption'])}, max_length]")
    batch["input_ids"] = ids
    return batch


def source_specs(data_config) -> list[dict]:
  """data_config.sources as a list of plain dicts (ConfigDict or dict input)."""
  specs = data_config["sources"] if isinstance(data_config, dict) else data_config.sources
  out = []
  for s in specs:
    out.append(dict(s.to_dict() if hasattr(s, "to_dict") else s))
  if not out:
    raise ValueError("data_config.sources is empty")
  return out


def build_sources(specs: Sequence[dict], frames: int, resolution: int):
  """Builds all sources; returns (sources, weights, output key, per-record shape)."""
  sources, weights = [], []
  for spec in specs:
    sources.append(build_source(spec, frames, resolution))
    weights.append(float(spec.get("weight", 1.0)))
  produces = {getattr(s, "produces", "video") for s in sources}
  if len(produces) != 1:
    raise ValueError("Cannot mix sources of decoded video with packed latent shards: "
                     f"{[(sp['kind'], sp.get('path')) for sp in specs]}")
  key = produces.pop()
  if key == "latents":
    shapes = {tuple(s.record_shape) for s in sources}
    if len(shapes) != 1:
      raise ValueError(f"Packed latent sources have different latent shapes {shapes}")
    shape = shapes.pop()
  else:
    shape = (frames, resolution, resolution, 3)
  return sources, weights, key, shape


def make_data_loader(
    sources: Sequence[Any],
    weights: Sequence[float],
    key: str,
    shape: tuple[int, ...],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    process_index: int = 0,
    process_count: int = 1,
    tokenize_fn: Optional[Callable[[list[str]], np.ndarray]] = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    drop_remainder: bool = True,
    read_threads: int = 1,
    read_prefetch: int = 64,
) -> grain.DataLoader:
  """A grain DataLoader over built sources (see make_train_iterator)."""
  mixture = Mixture([len(s) for s in sources], weights, min_length=process_count)
  sampler = grain.IndexSampler(
      num_records=len(mixture),
      shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                       drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=int(seed))
  operations = [_Decode(sources, key, shape),
                grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
  if tokenize_fn is not None:
    operations.append(_Tokenize(tokenize_fn))
  if worker_count and not flags.FLAGS.is_parsed():
    # grain's worker pool reads its absl flags; outside an absl app (notebooks,
    # tests, plain scripts) they would be unparsed: use their defaults.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(
      data_source=mixture, sampler=sampler, operations=operations,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_prefetch),
      shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                       drop_remainder=True))


def make_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    frames: int,
    resolution: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenize_fn: Optional[Callable[[list[str]], np.ndarray]] = None,
    worker_count: int = 0,
):
  """The training input pipeline: an endless, checkpointable per-host batch iterator.

  Args:
    data_config: ConfigDict (or dict) with `sources`: a list of {"kind", "path",
      "weight", options...} (kinds and formats: vidrd_jax.data.sources), and
      optionally `worker_buffer_size` (batches prefetched per worker, default 2).
    global_batch_size: batch over all hosts; each host yields
      global_batch_size // process_count samples.
    frames: F, frames per clip.
    resolution: R, clip height and width.
    seed: shuffling and augmentation seed (non-negative, 32-bit).
    process_index, process_count: this host and the number of hosts
      (jax.process_index(), jax.process_count()).
    tokenize_fn: optional list[str] -> int32 [B, 77]; must be picklable when
      worker_count > 0 (it runs in the worker processes).
    worker_count: grain worker processes decoding in parallel (0 = in-process).
      Workers are spawned: scripts must create the iterator under
      `if __name__ == "__main__":` (absl's app.run is fine). The sample order
      depends on worker_count, and a saved state restores only with the same
      worker_count and sources.

  Returns:
    grain DataLoaderIterator: `next(it)` gives a batch (see the module
    docstring), `it.get_state()` -> bytes and `it.set_state(bytes)` resume at
    the same sample (also usable with grain.PyGrainCheckpointSave for orbax).

  Raises:
    ValueError / FileNotFoundError at start for a bad config or manifest.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index/process_count {process_index}/{process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  sources, weights, key, shape = build_sources(source_specs(data_config), frames, resolution)
  get = data_config.get if hasattr(data_config, "get") else (lambda k, d: d)
  loader = make_data_loader(
      sources, weights, key, shape, batch_size=global_batch_size // process_count, seed=seed,
      process_index=process_index, process_count=process_count, tokenize_fn=tokenize_fn,
      worker_count=worker_count, worker_buffer_size=int(get("worker_buffer_size", 2)))
  return iter(loader)
