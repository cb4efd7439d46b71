"""Metrics for long generated videos: caption following and temporal consistency at clip seams."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from vidrd_jax.data import synthetic
from vidrd_jax.eval import detector

ATTRIBUTES = ("color", "shape", "direction")


def frame_changes(video: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Mean absolute change between consecutive frames.

  Args:
    video: [F, H, W, C], uint8 or float in ``value_range``.

  Returns:
    [F - 1] float64: entry t is mean |x[t + 1] - x[t]| in [0, 1] units.
  """
  x = detector.to_unit_range(video, value_range).astype(np.float64)
  return np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))


def boundary_stats(videos: np.ndarray, clip_frames: int,
                   value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, float]:
  """How visible the seams between concatenated clips are.

  A long video is clips of ``clip_frames`` frames laid end to end. The change across a boundary
  is |x[k N] - x[k N - 1]|; the change inside clips is over all other consecutive pairs.

  Args:
    videos: one long video [F, H, W, C] or a batch [B, F, H, W, C] with F a multiple of
      ``clip_frames`` and at least two clips.
    clip_frames: N, frames per clip.

  Returns:
    ``{"boundary_change", "inside_change", "ratio"}``, pooled over the batch: ratio =
    mean boundary change / mean inside change. 1.0 means the seams are as smooth as the motion
    inside a clip; a hard cut gives a ratio well above 1.
  """
  videos = np.asarray(videos)
  if videos.ndim == 4:
    videos = videos[None]
  if videos.ndim != 5:
    raise ValueError(f"videos must be [F, H, W, C] or [B, F, H, W, C], got shape {videos.shape}")
  f = videos.shape[1]
  if clip_frames < 2 or f % clip_frames or f // clip_frames < 2:
    raise ValueError(f"need at least two whole clips of clip_frames >= 2 frames: got {f} frames "
                     f"with clip_frames={clip_frames}")
  changes = np.stack([frame_changes(v, value_range) for v in videos])  # [B, F - 1]
  # Pair t joins frames t and t + 1; it crosses a seam when t + 1 starts a clip.
  is_boundary = (np.arange(1, f) % clip_frames) == 0
  boundary = float(changes[:, is_boundary].mean())
  inside = float(changes[:, ~is_boundary].mean())
  return {"boundary_change": boundary, "inside_change": inside,
          "ratio": boundary / max(inside, 1e-12)}


def boundary_ratio(videos: np.ndarray, clip_frames: int,
                   value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
  """``boundary_stats(...)["ratio"]``: mean change across clip seams / mean change inside clips."""
  return boundary_stats(videos, clip_frames, value_range)["ratio"]


def caption_following(videos: Sequence[np.ndarray], targets: Sequence[Mapping[str, Any]],
                      colors: Sequence[str] = synthetic.DEFAULT_COLORS,
                      shapes: Sequence[str] = synthetic.DEFAULT_SHAPES,
                      directions: Sequence[str] = synthetic.DEFAULT_DIRECTIONS,
                      value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, Any]:
  """Scores videos against the attributes their captions name.

  Args:
    videos: sequence of [F, H, W, 3] videos.
    targets: per video, a mapping with the intended ``color``, ``shape`` and ``direction``.
    colors, shapes, directions: the vocabularies (chance = 1 / vocabulary size).

  Returns:
    ``{"accuracy": {attr: float}, "chance": {attr: float}, "all_correct": float, "num": n,
    "hits": {attr: int}, "p_at_chance": {attr: float}, "interval95": {attr: [low, high]},
    "detections": [Detection.as_dict() per video]}``. With a dozen videos an accuracy is a
    coarse estimate: ``p_at_chance`` is the probability of at least this many hits for a model
    that picks the attribute at random (one-sided binomial test against chance), and
    ``interval95`` the 95 % Wilson score interval of the accuracy.
  """
  if len(videos) != len(targets):
    raise ValueError(f"{len(videos)} videos but {len(targets)} targets")
  if not len(videos):
    raise ValueError("no videos to score")
  vocab = {"color": colors, "shape": shapes, "direction": directions}
  hits = {a: [] for a in ATTRIBUTES}
  detections = []
  for video, target in zip(videos, targets):
    d = detector.detect(video, colors, shapes, directions, value_range)
    detections.append(d.as_dict())
    for a in ATTRIBUTES:
      hits[a].append(getattr(d, a) == target[a])
  hits = {a: np.asarray(h) for a, h in hits.items()}
  n = len(videos)
  chance = {a: 1.0 / len(vocab[a]) for a in ATTRIBUTES}
  counts = {a: int(h.sum()) for a, h in hits.items()}
  return {
      "accuracy": {a: float(h.mean()) for a, h in hits.items()},
      "chance": chance,
      "all_correct": float(np.logical_and.reduce([hits[a] for a in ATTRIBUTES]).mean()),
      "num": n,
      "hits": counts,
      "p_at_chance": {a: binomial_tail(counts[a], n, chance[a]) for a in ATTRIBUTES},
      "interval95": {a: list(wilson_interval(counts[a], n)) for a in ATTRIBUTES},
      "detections": detections,
  }


def per_clip_accuracy(videos: Sequence[np.ndarray], targets: Sequence[Mapping[str, Any]],
                      clip_frames: int, **vocab: Sequence[str]) -> dict[str, list[float]]:
  """Caption following of each clip of long videos on its own: ``{attr: [accuracy of clip k]}``.

  VidRD starts clip k > 0 from clip k-1's last frames in reverse order (FNR, DSG), so a motion
  the model does not tie to the caption turns back at the seams; scoring clip by clip tells a
  model that ignores the direction word (every clip at chance) from one whose motion the
  long-video strategies reverse (clip 0 right, later clips not).

  Args:
    videos: sequence of [K * clip_frames, H, W, 3] videos.
    targets: per video, the intended ``color``, ``shape`` and ``direction``.
    clip_frames: N, frames per clip.
    **vocab: ``colors``, ``shapes``, ``directions`` as for :func:`caption_following`.
  """
  if clip_frames < 2:
    raise ValueError(f"clip_frames must be >= 2 (motion needs two frames), got {clip_frames}")
  lengths = {len(v) for v in videos}
  if len(lengths) != 1 or next(iter(lengths)) % clip_frames:
    raise ValueError(f"videos of {sorted(lengths)} frames do not split into clips of {clip_frames}")
  clips = next(iter(lengths)) // clip_frames
  per_clip = [caption_following([v[k * clip_frames:(k + 1) * clip_frames] for v in videos], targets,
                                **vocab)["accuracy"] for k in range(clips)]
  return {a: [acc[a] for acc in per_clip] for a in ATTRIBUTES}


def binomial_tail(k: int, n: int, p: float) -> float:
  """P(X >= k) for X ~ Binomial(n, p): how often chance alone scores k or more of n."""
  if not 0 <= k <= n:
    raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
  return float(min(1.0, sum(math.comb(n, i) * p**i * (1.0 - p)**(n - i) for i in range(k, n + 1))))


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """The Wilson score interval of a proportion k / n (95 % for the default z)."""
  if n <= 0 or not 0 <= k <= n:
    raise ValueError(f"need n > 0 and 0 <= k <= n, got k={k}, n={n}")
  phat = k / n
  centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def goal(chance: float, fraction: float = 0.6) -> float:
  """The caption-following goal for one attribute: chance + fraction x (1 - chance)."""
  return chance + fraction * (1.0 - chance)


def detector_accuracy_on_real(source: synthetic.SyntheticVideoSource,
                              num: int = 64) -> dict[str, Any]:
  """The detector's own accuracy on ``num`` real clips of ``source`` (should be ~1.0)."""
  num = min(num, len(source))
  records = [source[i] for i in range(num)]
  result = caption_following([r["video"] for r in records], [r["attributes"] for r in records],
                             source.colors, source.shapes, source.directions)
  result.pop("detections")
  result["num"] = num
  return result


# Goals of the CPU demo (issue 6), checked by bench/bench_demo.py and printed by the demo.
MAX_BOUNDARY_RATIO = 1.5
MAX_SECONDS = 15 * 60
MAX_PEAK_BYTES = 8 * 2**30


def demo_goals(result: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Checks a demo ``metrics.json`` against the goals.

  Returns:
    One ``{"goal", "value", "target", "passed"}`` per goal: caption following per attribute
    (accuracy >= chance + 0.6 (1 - chance), VidRD videos on held-out captions), the VidRD boundary
    ratio (<= 1.5, and below the independent clips' ratio), wall time and peak memory.
  """
  goals = []
  following = result["caption_following"]["vidrd"]
  for a in ATTRIBUTES:
    target = goal(following["chance"][a])
    value = following["accuracy"][a]
    goals.append({"goal": f"caption following: {a}", "value": value,
                  "target": f">= {target:.3f}", "passed": value >= target})
  ratio = result["boundary"]["vidrd"]["ratio"]
  independent = result["boundary"]["independent"]["ratio"]
  goals.append({"goal": "boundary ratio (VidRD)", "value": ratio,
                "target": f"<= {MAX_BOUNDARY_RATIO}", "passed": ratio <= MAX_BOUNDARY_RATIO})
  # "Clearly lower": at most 80% of the independent clips' ratio.
  goals.append({"goal": "boundary ratio VidRD vs independent", "value": ratio / independent,
                "target": "<= 0.8", "passed": ratio <= 0.8 * independent})
  seconds = result["timing"]["total_s"]
  goals.append({"goal": "end-to-end time (s)", "value": seconds, "target": f"<= {MAX_SECONDS}",
                "passed": seconds <= MAX_SECONDS})
  peak = result["memory"]["peak_rss_bytes"]
  goals.append({"goal": "peak memory (GiB)", "value": peak / 2**30,
                "target": f"< {MAX_PEAK_BYTES / 2**30:.0f}", "passed": peak < MAX_PEAK_BYTES})
  return goals


def format_goals(goals: Sequence[Mapping[str, Any]]) -> str:
  lines = []
  for g in goals:
    mark = "pass" if g["passed"] else "MISS"
    lines.append(f"  [{mark}] {g['goal']}: {g['value']:.3f} (goal {g['target']})")
  return "\n".join(lines)
