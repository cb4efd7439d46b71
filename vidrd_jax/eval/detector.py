"""An analytic detector for the synthetic moving-shape videos (``vidrd_jax.data.synthetic``).

It reads colour, shape and direction of motion straight from the pixels, with no learned part, so
it can score whether a generated video shows what its caption says:

1. Foreground: each frame's background colour is its per-channel median (the shape covers well
   under half the frame); a pixel's soft foreground weight ``alpha`` is its colour distance from
   the background divided by the frame's foreground contrast (a high percentile of that distance),
   clipped to [0, 1]. Anti-aliased and blurred edges get partial weight, as they should.
2. Colour: mean RGB of the strongly foreground pixels over all frames, then the nearest hue among
   the candidate colours (hue is independent of brightness and of the blend with a dark background).
3. Shape: template matching. Per frame, the shape's centre is the circular (torus) mean of the
   foreground, so shapes split across the frame edge by wrap-around are handled; the frame is
   rolled to put it in the middle, and each candidate shape is rendered with the same area and
   centroid; the soft IoU with the foreground, averaged over frames, picks the shape.
4. Direction: the frame-to-frame displacement of that centre (wrapped into [-W/2, W/2)); its median
   over all consecutive pairs (robust to a jump at a clip boundary) is matched to the candidate
   direction with the largest projection.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
from typing import Sequence

import numpy as np

from vidrd_jax.data import synthetic

# A frame whose foreground contrast (RGB distance in [0, 1] units) is below this shows no shape.
_MIN_CONTRAST = 0.12
# Foreground weight threshold for the centre estimate and the strong (colour) pixels.
_CENTRE_ALPHA = 0.3
_COLOR_ALPHA = 0.7
_SUPERSAMPLE = 4


@dataclasses.dataclass
class Detection:
  """What the detector read from one video.

  Attributes:
    color, shape, direction: the predicted names (None where no shape was found / no motion).
    hue: measured hue of the shape in degrees (nan if none).
    shape_scores: mean soft IoU per candidate shape.
    velocity: median per-frame displacement (dx, dy) in pixels (y downwards).
    centers: [F, 2] per-frame centre (x, y) in pixels (nan for frames without a shape).
    valid_frames: number of frames in which a shape was found.
  """
  color: str | None
  shape: str | None
  direction: str | None
  hue: float
  shape_scores: dict[str, float]
  velocity: tuple[float, float]
  centers: np.ndarray
  valid_frames: int

  def as_dict(self) -> dict:
    return {"color": self.color, "shape": self.shape, "direction": self.direction,
            "hue": self.hue, "shape_scores": self.shape_scores,
            "velocity": list(self.velocity), "valid_frames": self.valid_frames}


def to_unit_range(video: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """uint8 [0, 255] or float in ``value_range`` -> float32 in [0, 1]."""
  video = np.asarray(video)
  if video.dtype == np.uint8:
    return video.astype(np.float32) / 255.0
  lo, hi = value_range
  return np.clip((video.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def foreground(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Soft foreground of frames [F, H, W, 3] in [0, 1].

  Returns:
    alpha [F, H, W] in [0, 1], background colour [F, 3], contrast [F].
  """
  f = frames.shape[0]
  background = np.median(frames.reshape(f, -1, 3), axis=1)
  dist = np.linalg.norm(frames - background[:, None, None, :], axis=-1)
  # The 99.5th percentile is the fully covered shape interior for any shape covering >= 0.5% of
  # the frame, and ignores a few outlier pixels.
  contrast = np.percentile(dist.reshape(f, -1), 99.5, axis=1)
  alpha = np.clip(dist / np.maximum(contrast, 1e-6)[:, None, None], 0.0, 1.0)
  return alpha, background, contrast


def torus_center(weight: np.ndarray) -> tuple[float, float]:
  """Centre (x, y) in pixels of a weight map [H, W] on the torus (circular mean per axis)."""
  h, w = weight.shape
  out = []
  for size, profile in ((w, weight.sum(0)), (h, weight.sum(1))):
    # Pixel k's centre sits at k + 0.5; map positions to angles so that wrap-around averages right.
    angles = 2 * np.pi * (np.arange(size) + 0.5) / size
    angle = np.angle(np.sum(profile * np.exp(1j * angles)))
    out.append(float((angle % (2 * np.pi)) * size / (2 * np.pi) - 0.5))
  return out[0], out[1]


@functools.lru_cache(maxsize=None)
def _unit_shape(shape: str) -> tuple[float, float, float]:
  """(area, centroid dx, centroid dy) of a shape with r = 1, measured on a fine grid."""
  g = (np.arange(2000) + 0.5) / 1000 - 1.0
  inside = synthetic.shape_inside(shape, g[None, :], g[:, None], 1.0)
  cell = (2.0 / 2000) ** 2
  ys, xs = np.nonzero(inside)
  return float(inside.sum() * cell), float(g[xs].mean()), float(g[ys].mean())


def _template(shape: str, area: float, cx: float, cy: float, h: int, w: int) -> np.ndarray:
  """Anti-aliased coverage [H, W] of ``shape`` with the given area (px^2) and centroid (px)."""
  unit_area, ox, oy = _unit_shape(shape)
  r = np.sqrt(area / unit_area)
  s = _SUPERSAMPLE
  xs = (np.arange(w * s) + 0.5) / s - 0.5
  ys = (np.arange(h * s) + 0.5) / s - 0.5
  # Shift so that the template's area centroid (not its bounding-box centre) lands on (cx, cy).
  inside = synthetic.shape_inside(shape, xs[None, :] - (cx - ox * r), ys[:, None] - (cy - oy * r), r)
  return inside.astype(np.float32).reshape(h, s, w, s).mean(axis=(1, 3))


def _hue_distance(a: float, b: float) -> float:
  d = abs(a - b) % 360.0
  return min(d, 360.0 - d)


def detect(video: np.ndarray, colors: Sequence[str] = synthetic.DEFAULT_COLORS,
           shapes: Sequence[str] = synthetic.DEFAULT_SHAPES,
           directions: Sequence[str] = synthetic.DEFAULT_DIRECTIONS,
           value_range: tuple[float, float] = (-1.0, 1.0)) -> Detection:
  """Reads colour, shape and direction of motion from one video.

  Args:
    video: [F, H, W, 3], uint8 in [0, 255] or float in ``value_range``.
    colors, shapes, directions: the candidate names (from ``vidrd_jax.data.synthetic``).
    value_range: range of float input.

  Returns:
    A ``Detection``.
  """
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"video must be [F, H, W, 3], got shape {video.shape}")
  for name, values, table in (("colors", colors, synthetic.COLOR_HUES),
                              ("shapes", shapes, dict.fromkeys(synthetic.SHAPES)),
                              ("directions", directions, synthetic.DIRECTIONS)):
    unknown = [v for v in values if v not in table]
    if unknown or not values:
      raise ValueError(f"{name} must be a non-empty list of known names; unknown: {unknown}")
  frames = to_unit_range(video, value_range)
  f, h, w, _ = frames.shape
  alpha, _, contrast = foreground(frames)
  valid = contrast >= _MIN_CONTRAST

  centers = np.full((f, 2), np.nan, np.float32)
  shape_scores = {s: 0.0 for s in shapes}
  strong_rgb = []
  for t in np.nonzero(valid)[0]:
    a = alpha[t]
    weight = np.where(a >= _CENTRE_ALPHA, a, 0.0)
    cx, cy = torus_center(weight)
    centers[t] = (cx, cy)
    strong_rgb.append(frames[t][a >= _COLOR_ALPHA])
    # Roll the shape into the middle of the frame so that wrap-around does not split it.
    sx, sy = w // 2 - int(round(cx)), h // 2 - int(round(cy))
    rolled = np.roll(weight, (sy, sx), axis=(0, 1))
    area = float(rolled.sum())
    for s in shapes:
      template = _template(s, area, cx + sx, cy + sy, h, w)
      shape_scores[s] += float(np.minimum(rolled, template).sum() /
                               max(np.maximum(rolled, template).sum(), 1e-6))
  num_valid = int(valid.sum())

  color = shape = direction = None
  hue = float("nan")
  velocity = (0.0, 0.0)
  if num_valid:
    shape_scores = {s: v / num_valid for s, v in shape_scores.items()}
    shape = max(shape_scores, key=shape_scores.get)
    rgb = np.concatenate(strong_rgb, axis=0).mean(axis=0)
    hue = 360.0 * colorsys.rgb_to_hsv(*rgb)[0]
    color = min(colors, key=lambda c: _hue_distance(hue, synthetic.COLOR_HUES[c]))
    # Displacements between consecutive frames that both show the shape, wrapped to the torus.
    steps = np.diff(centers, axis=0)
    steps = steps[~np.isnan(steps).any(axis=1)]
    if len(steps):
      steps = np.mod(steps + np.array([w / 2, h / 2]), np.array([w, h])) - np.array([w / 2, h / 2])
      velocity = (float(np.median(steps[:, 0])), float(np.median(steps[:, 1])))
      if np.hypot(*velocity) > 1e-3:
        direction = max(directions, key=lambda d: np.dot(synthetic.DIRECTIONS[d], velocity))
  return Detection(color=color, shape=shape, direction=direction, hue=hue,
                   shape_scores=shape_scores, velocity=velocity, centers=centers,
                   valid_frames=num_valid)
