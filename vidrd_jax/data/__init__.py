"""Video-text input pipelines (grain) for VidRD's composed training data.

Training entry point::

    it = vidrd_jax.data.make_train_iterator(config.data, global_batch_size=64, frames=8,
                                            resolution=256, seed=0,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count(),
                                            tokenize_fn=tokenize, worker_count=8)
    batch = next(it)      # {"video": [B, F, R, R, 3] float32 in [-1, 1], "caption": str [B],
                          #  "input_ids": int32 [B, 77], "source_id", "skipped"}
    state = it.get_state()  # bytes; it.set_state(state) resumes at the same sample

Where things are documented:
  vidrd_jax/data/sources.py    source kinds and their on-disk formats (captioned,
                               classes, segments, images, tfds, synthetic, packed)
  vidrd_jax/data/pipeline.py   mixing, shuffling, sharding, batching, batch keys
  vidrd_jax/data/video.py      clip decoding: fps / stride frame selection, crop
  vidrd_jax/data/pseudo_video.py  image -> zoom/pan pseudo-video
  vidrd_jax/data/skips.py      bad records: skip reasons and counters
  vidrd_jax/data/packed.py     packed ArrayRecord shard format

Tools:
  python -m vidrd_jax.data.preview --source=KIND:PATH ... --out=DIR    check data, PNG grid
  python -m vidrd_jax.data.pack --source=KIND:PATH ... --out=DIR       pack clips / latents
  python -m tools.caption_segments --videos=... --model=...   caption long videos
"""

from vidrd_jax.data.pipeline import make_train_iterator
from vidrd_jax.data.skips import SKIP_REASONS, STATS, SkipRecord, skipped_counts

__all__ = ["make_train_iterator", "SKIP_REASONS", "STATS", "SkipRecord", "skipped_counts"]
