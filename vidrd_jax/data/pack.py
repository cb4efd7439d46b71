"""Packs a data mix into ArrayRecord shards of decoded clips or VAE latents.

  python -m vidrd_jax.data.pack --source=captioned:/data/webvid/train.csv \
      --out=/data/packed/webvid_16x256 --frames=16 --resolution=256 --workers=8
  python -m vidrd_jax.data.pack --config=configs/gpu.py --encoder=/ckpt/vidrd \
      --out=/data/packed/latents_8x256 --frames=8 --resolution=256

Clips are made exactly as the training loader makes them (same sources, fps,
zoom/pan, bad-record replacement), once each: `--num` records (default one
epoch of the mixture, i.e. every record of every source at least once). With
`--encoder=PIPELINE_DIR` the clips are encoded by that pipeline's VAE
(`Pipeline.encode_frames`: posterior mean x scaling factor) and latents are
stored instead. Output format: vidrd_jax.data.packed. Train on it with
{"kind": "packed", "path": OUT}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
from etils import epath

from vidrd_jax.data import packed, pipeline, skips
from vidrd_jax.data.cli import parse_source_flag, sources_from_config_file


def pack(
    specs: Sequence[dict],
    out_dir: str,
    *,
    frames: int,
    resolution: int,
    num_records: Optional[int] = None,
    shard_size: int = 256,
    seed: int = 0,
    encode_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    latent_dtype: str = "float16",
    batch_size: int = 8,
    worker_count: int = 0,
    prefix: str = "clips",
) -> dict:
  """Writes `num_records` clips (or their latents) to ArrayRecord shards.

  Args:
    specs: source specs as in data_config.sources.
    out_dir: output folder (created; local or epath URL).
    frames, resolution: clip size F x R x R.
    num_records: how many records; default one epoch of the mixture.
    shard_size: records per shard (at most).
    seed: clip sampling seed.
    encode_fn: optional float32 [B, F, R, R, 3] in [-1, 1] -> latents [B, F, h, w, C].
    latent_dtype: storage dtype of latents.
    batch_size: clips per encode_fn call.
    worker_count: grain decoding processes.
    prefix: shard file name prefix.

  Returns:
    The metadata written to out_dir/metadata.json.
  """
  srcs, weights, key, shape = pipeline.build_sources(specs, frames, resolution)
  if key != "video":
    raise ValueError("pack reads decoded-video sources, not packed latent shards")
  mixture_len = len(pipeline.Mixture([len(s) for s in srcs], weights))
  n = int(num_records or mixture_len)
  loader = pipeline.make_data_loader(
      srcs, weights, key, shape, batch_size=batch_size, seed=seed, shuffle=False,
      num_epochs=math.ceil(n / mixture_len), worker_count=worker_count, drop_remainder=False)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  counts = packed.records_per_shard(n, shard_size)
  names = [packed.shard_name(prefix, i, len(counts)) for i in range(len(counts))]

  skipped = np.zeros(len(skips.SKIP_REASONS), np.int64)
  record_shape, dtype = None, None
  shard, in_shard, written = 0, 0, 0
  writer = packed.open_writer(os.fspath(out / names[0]))
  for batch in loader:
    video = batch["video"][: n - written]
    skipped += batch["skipped"][: len(video)].sum(0)
    if encode_fn is not None:
      data = np.asarray(encode_fn(video)).astype(latent_dtype)
      store_key = "latents"
    else:
      # Back to the uint8 the frames were decoded as (exact: x = u / 127.5 - 1).
      data = np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)
      store_key = "video"
    record_shape, dtype = data.shape[1:], data.dtype
    for clip, caption in zip(data, batch["caption"][: len(video)]):
      if in_shard == counts[shard]:
        writer.close()
        shard, in_shard = shard + 1, 0
        writer = packed.open_writer(os.fspath(out / names[shard]))
      writer.write(packed.encode_record(store_key, clip, str(caption)))
      in_shard += 1
      written += 1
    if written >= n:
      break
  writer.close()
  del loader

  meta = {
      "format": packed.FORMAT, "kind": "latents" if encode_fn is not None else "video",
      "frames": frames, "resolution": resolution, "shape": list(record_shape),
      "dtype": str(dtype), "num_records": written, "shards": names,
      "skipped": {r: int(c) for r, c in zip(skips.SKIP_REASONS, skipped) if c},
      "sources": [dict(s) for s in specs], "seed": seed,
  }
  packed.write_metadata(out_dir, meta)
  return meta


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m vidrd_jax.data.pack", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", action="append", default=[],
                      help="KIND:PATH[?key=value&...] (repeatable); see vidrd_jax.data.sources")
  parser.add_argument("--config", help="Python config file whose get_config().data.sources to pack")
  parser.add_argument("--out", required=True)
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--num", type=int, default=None, help="records (default: one mixture epoch)")
  parser.add_argument("--shard_size", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=0, help="grain decoding processes")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--encoder", help="pipeline folder: store its VAE latents instead of clips")
  parser.add_argument("--latent_dtype", default="float16", choices=["float16", "float32"])
  args = parser.parse_args(argv)

  specs = [parse_source_flag(s) for s in args.source]
  if args.config:
    specs += sources_from_config_file(args.config)
  if not specs:
    parser.error("give at least one --source or a --config")
  encode_fn = None
  if args.encoder:
    import vidrd_jax  # pylint: disable=g-import-not-at-top
    pipe = vidrd_jax.load_pipeline(args.encoder)
    encode_fn = lambda video: np.asarray(pipe.encode_frames(video))
  meta = pack(specs, args.out, frames=args.frames, resolution=args.resolution,
              num_records=args.num, shard_size=args.shard_size, seed=args.seed,
              encode_fn=encode_fn, latent_dtype=args.latent_dtype, batch_size=args.batch_size,
              worker_count=args.workers)
  print(json.dumps({k: meta[k] for k in ("kind", "num_records", "shape", "dtype", "skipped")}))
  return meta


if __name__ == "__main__":
  main()
