"""Video-text input pipelines (grain): sources, mixing, packing, preview.

Formats of every source kind: vidrd_jax/data/sources.py; packed shards:
vidrd_jax/data/packed.py; the pipeline and its batches: vidrd_jax/data/pipeline.py.
"""

from vidrd_jax.data.pipeline import make_train_iterator
from vidrd_jax.data.skips import SKIP_REASONS, STATS, SkipRecord, skipped_counts

__all__ = ["make_train_iterator", "SKIP_REASONS", "STATS", "SkipRecord", "skipped_counts"]
