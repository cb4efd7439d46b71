"""Preview a data mix before a long run: a PNG grid of clips with captions + a summary.

  python -m vidrd_jax.data.preview --source=captioned:/data/webvid/train.csv \
      --source=classes:/data/ucf101 --num=16 --frames=8 --resolution=64 --out=/tmp/preview

Sources are read round-robin, records in order (no shuffling, no replacement
of bad records), so every bad record met is reported once: DIR/preview.png has
one row per sample (its frames left to right, its caption under them), and
DIR/summary.json = {"samples": n, "skipped": {reason: count}} is also printed.
`--scan` reads every record of every source (a full data check) and still draws
only `--num` of them.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vidrd_jax.data import skips
from vidrd_jax.data.cli import parse_source_flag
from vidrd_jax.data.sources import build_source


def collect(specs: Sequence[dict], *, num: int, frames: int, resolution: int, seed: int = 0,
            scan: bool = False) -> tuple[list[dict], dict[str, int]]:
  """Reads samples round-robin over the sources; returns (samples, skipped counts)."""
  srcs = [build_source(s, frames, resolution) for s in specs]
  positions = [0] * len(srcs)
  samples, skipped = [], dict.fromkeys(skips.SKIP_REASONS, 0)
  active = list(range(len(srcs)))
  while active and (scan or len(samples) < num):
    for k in list(active):
      if positions[k] >= len(srcs[k]):
        active.remove(k)
        continue
      j = positions[k]
      positions[k] += 1
      try:
        record = srcs[k].load(j, np.random.default_rng([seed, k, j]))
      except skips.SkipRecord as e:
        skips.STATS.record(e)
        skipped[e.reason] += 1
        continue
      if len(samples) < num:
        samples.append(dict(record, source=f"{specs[k]['kind']}:{specs[k].get('path', '')}"))
  return samples, skipped


def _frames_uint8(sample: dict, resolution: int) -> np.ndarray:
  if "video" in sample:
    v = np.asarray(sample["video"])
    if v.dtype != np.uint8:
      v = np.clip(np.round((v + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return v
  # Latents: the first three channels, each normalised over the clip, upsampled.
  lat = np.asarray(sample["latents"], np.float32)[..., :3]
  lo, hi = lat.min(axis=(0, 1, 2)), lat.max(axis=(0, 1, 2))
  img = ((lat - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8)
  scale = max(1, resolution // img.shape[1])
  return img.repeat(scale, 1).repeat(scale, 2)


def render_grid(samples: Sequence[dict], resolution: int) -> Image.Image:
  """One row per sample: frames left to right, caption (wrapped) underneath."""
  font = ImageFont.load_default()
  rows = []
  for s in samples:
    frames = _frames_uint8(s, resolution)
    strip = np.concatenate(list(frames), axis=1)
    chars = max(20, strip.shape[1] // 7)
    lines = textwrap.wrap(s["caption"], chars)[:3] or [""]
    text_h = 4 + 12 * len(lines)
    row = Image.new("RGB", (strip.shape[1], strip.shape[0] + text_h), "white")
    row.paste(Image.fromarray(strip), (0, 0))
    draw = ImageDraw.Draw(row)
    for i, line in enumerate(lines):
      draw.text((2, strip.shape[0] + 2 + 12 * i), line, fill="black", font=font)
    rows.append(row)
  width = max([r.width for r in rows], default=resolution)
  grid = Image.new("RGB", (width, sum(r.height + 4 for r in rows) or resolution), "gray")
  y = 0
  for r in rows:
    grid.paste(r, (0, y))
    y += r.height + 4
  return grid


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m vidrd_jax.data.preview", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", action="append", required=True,
                      help="KIND:PATH[?key=value&...] (repeatable); KIND one of captioned, "
                           "classes, segments, images, synthetic, packed, tfds")
  parser.add_argument("--num", type=int, default=16)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scan", action="store_true", help="check every record of every source")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  specs = [parse_source_flag(s) for s in args.source]
  samples, skipped = collect(specs, num=args.num, frames=args.frames,
                             resolution=args.resolution, seed=args.seed, scan=args.scan)
  os.makedirs(args.out, exist_ok=True)
  if samples:
    render_grid(samples, args.resolution).save(os.path.join(args.out, "preview.png"))
  summary = {"samples": len(samples), "skipped": skipped}
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
