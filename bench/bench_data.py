"""Data loader throughput: clips/s per host, decoded from MP4 and read from packed shards.

  python bench/bench_data.py                       # 16 x 256 x 256 clips, workers 0 and 2
  python bench/bench_data.py --workers=0,4,8 --clips=256 --videos=32

Writes --videos synthetic MP4s (moving noise texture, --width x --height, 30 fps,
libx264) to a temp folder, then times the training loader (make_train_iterator,
per-host batch --batch) for:
  decoded   : the `captioned` source, PyAV decoding at --stride, resize + centre crop;
  packed    : the same clips packed with vidrd_jax.data.pack (uint8 ArrayRecord);
  latents   : packed float16 latents [F, R/8, R/8, 4] (an 8x8 average-pool stand-in encoder).
Each row: the first batch (worker start-up) is excluded; clips/s is over the next
--clips clips; "CPU ms per clip" (in-process rows) is the loader's CPU cost,
which divided into 1000 x cores gives the rate a host with free cores reaches. Appends a "## Data loader" section to BENCHMARKS.md (see bench/common.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top


def make_videos(folder, count, width, height, seconds, fps=30):
  from vidrd_jax.data.video import write_video  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = []
  for i in range(count):
    texture = rng.integers(0, 255, (height, width + 4 * seconds * fps, 3), dtype=np.uint8)
    # Smooth the noise so the encoder sees video-like content, not incompressible noise.
    texture = ((texture.astype(np.uint16) + np.roll(texture, 1, 0) + np.roll(texture, 1, 1)
                + np.roll(texture, 1, (0, 1))) // 4).astype(np.uint8)
    frames = np.stack([texture[:, 4 * t:4 * t + width] for t in range(seconds * fps)])
    path = os.path.join(folder, f"v{i:03d}.mp4")
    write_video(path, frames, fps=fps)
    rows.append(f"v{i:03d}.mp4,moving texture number {i}\n")
  with open(os.path.join(folder, "manifest.csv"), "w") as f:
    f.write("video,caption\n" + "".join(rows))
  return os.path.join(folder, "manifest.csv")


def pool_encoder(video):
  b, f, r, _, c = video.shape
  pooled = video.reshape(b, f, r // 8, 8, r // 8, 8, c).mean((3, 5))
  return np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1)


def time_loader(spec, args, workers):
  from vidrd_jax.data import make_train_iterator  # pylint: disable=g-import-not-at-top
  it = make_train_iterator({"sources": [spec]}, global_batch_size=args.batch, frames=args.frames,
                           resolution=args.resolution, seed=0, worker_count=workers)
  t0 = time.perf_counter()
  next(it)  # start-up: worker processes, first decode
  startup = time.perf_counter() - t0
  batches = max(1, args.clips // args.batch)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  del it
  clips = batches * args.batch
  # CPU time is only meaningful in-process (workers burn theirs elsewhere); unlike wall
  # time it barely moves when the machine is shared, so it also says how many cores a
  # given clip rate needs.
  return clips / dt, startup, (1000 * cpu / clips if workers == 0 else None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--videos", type=int, default=8)
  p.add_argument("--width", type=int, default=596)  # WebVid's 596 x 336
  p.add_argument("--height", type=int, default=336)
  p.add_argument("--seconds", type=int, default=4)
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--stride", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--clips", type=int, default=32, help="timed clips per row")
  p.add_argument("--workers", default="0,2", help="comma-separated worker counts")
  p.add_argument("--tmp", default=None, help="scratch folder (default: a new temp dir)")
  p.add_argument("--no-append", action="store_true")
  p.add_argument("--note", default="")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from vidrd_jax.data import pack  # pylint: disable=g-import-not-at-top

  tmp = args.tmp or tempfile.mkdtemp(prefix="bench_data_")
  try:
    t0 = time.perf_counter()
    manifest = make_videos(tmp, args.videos, args.width, args.height, args.seconds)
    print(f"wrote {args.videos} videos in {time.perf_counter() - t0:.1f}s")
    decoded = {"kind": "captioned", "path": manifest, "stride": args.stride}
    n_packed = max(args.clips + 2 * args.batch, args.videos)
    pack.pack([decoded], os.path.join(tmp, "packed"), frames=args.frames,
              resolution=args.resolution, num_records=n_packed, shard_size=64)
    pack.pack([decoded], os.path.join(tmp, "latents"), frames=args.frames,
              resolution=args.resolution, num_records=n_packed, shard_size=256,
              encode_fn=pool_encoder)
    specs = [("decoded MP4 (PyAV)", decoded),
             ("packed uint8 clips", {"kind": "packed", "path": os.path.join(tmp, "packed")}),
             ("packed f16 latents", {"kind": "packed", "path": os.path.join(tmp, "latents")})]
    rows = []
    for name, spec in specs:
      for workers in [int(w) for w in args.workers.split(",")]:
        rate, startup, cpu_ms = time_loader(spec, args, workers)
        rows.append([name, workers, f"{rate:.1f}", "-" if cpu_ms is None else f"{cpu_ms:.1f}",
                     f"{startup:.1f}"])
        print(rows[-1], flush=True)
  finally:
    if args.tmp is None:
      shutil.rmtree(tmp, ignore_errors=True)

  from bench import common  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  versions = ", ".join(f"{m} {metadata.version(m)}" for m in ("grain", "av", "array-record", "numpy"))
  body = (f"Clips of {args.frames} x {args.resolution} x {args.resolution} x 3 (float32 [-1, 1] in "
          f"the batch), per-host batch {args.batch}, from {args.videos} MP4s of {args.width}x"
          f"{args.height} @ 30 fps (libx264), frame stride {args.stride}. Data stack: {versions}.\n\n"
          + common.markdown_table(["source", "grain workers", "clips/s per host", "CPU ms per clip",
                                   "first batch s"],
                                  rows))
  common.append_section("Data loader", body, args)


if __name__ == "__main__":
  main()
