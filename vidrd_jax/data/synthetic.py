"""Built-in synthetic captioned videos: coloured shapes moving across a plain background.

This is the default data of ``configs/tiny_cpu.py``: it needs no download, is deterministic per
``(seed, index)``, and is designed so that a tiny text-to-video model can learn it in minutes on CPU
and an analytic detector (``vidrd_jax.eval.detector``) can check generated videos against captions.

Every record is one shape (circle, square, triangle, ...) of one colour, moving in a straight line
at constant speed (``left``, ``right``, ``up`` or ``down``) over a uniform grey-level background.
The frame is a torus: a shape leaving one edge re-enters from the opposite edge. That keeps the
motion direction constant forever (unlike bouncing), so any window of a long video is itself a
valid training clip; a model that learned the clips can continue one seamlessly across a clip
boundary, which is exactly what VidRD's long-video sampling asks of it.

Captions read like ``"a red circle moving left"``; the size and background words are included only
when the source is built with more than one size / background (e.g. ``"a small red circle moving
left on a gray background"``).

Held-out combinations: some (colour, shape, direction) triples never appear in the ``"train"``
split, only in the ``"heldout"`` split, so caption following can be measured on combinations the
model has never seen (every single attribute value is still seen in training).
"""

from __future__ import annotations

import colorsys
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

# RGB in [0, 1]. Saturated and far apart in hue so the detector separates them by hue alone.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.92, 0.85, 0.10),
    "green": (0.10, 0.80, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.15, 0.25, 0.95),
    "magenta": (0.85, 0.15, 0.85),
}
# Hue of each colour in degrees, used by the detector.
COLOR_HUES: dict[str, float] = {
    name: 360.0 * colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLORS.items()
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Unit vectors in (x, y) image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# Shape "radius" (half the bounding-box side) as a fraction of the frame side.
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.18, "large": 0.22, "xlarge": 0.3}
# Grey level in [0, 1]; unsaturated, so hue is carried by the shape only.
BACKGROUNDS: dict[str, float] = {"black": 0.05, "gray": 0.35, "white": 0.85}

DEFAULT_COLORS = ("red", "yellow", "green", "blue")
DEFAULT_SHAPES = ("circle", "square", "triangle")
DEFAULT_DIRECTIONS = ("left", "right", "up", "down")
DEFAULT_SIZES = ("medium",)
DEFAULT_BACKGROUNDS = ("black",)
# Speed in frame sides per frame: 1/16 of the frame per frame (2 px at 32x32) is large enough to
# read the direction from a single 8-frame clip and small enough to stay smooth.
DEFAULT_SPEED = (0.05, 0.075)
_SPLITS = ("train", "heldout", "all")
# Supersampling factor for anti-aliased edges.
_SUPERSAMPLE = 4


def default_holdout(colors: Sequence[str], shapes: Sequence[str],
                    directions: Sequence[str]) -> list[tuple[str, str, str]]:
  """The default held-out (colour, shape, direction) triples.

  A triple (c, s, d) (by index) is held out when ``(c + s + d) % m == 0`` with
  ``m = max(len(colors), len(shapes), len(directions))``. When there are ``m`` directions this
  holds out exactly one direction for every (colour, shape) pair, a quarter of all triples for
  four directions, and every colour, shape and direction keeps appearing in training.
  """
  m = max(len(colors), len(shapes), len(directions))
  return [(c, s, d)
          for (ci, c), (si, s), (di, d) in itertools.product(
              enumerate(colors), enumerate(shapes), enumerate(directions))
          if (ci + si + di) % m == 0]


def make_caption(attributes: Mapping[str, Any], with_size: bool = False,
                 with_background: bool = False) -> str:
  """Caption for a record's attributes, e.g. ``"a small red circle moving left on a black background"``."""
  words = ["a"]
  if with_size:
    words.append(attributes["size"])
  words += [attributes["color"], attributes["shape"], "moving", attributes["direction"]]
  if with_background:
    words += ["on", "a", attributes["background"], "background"]
  return " ".join(words)


def shape_inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Inside-test of a shape centred at the origin, axis aligned, bounding box 2r x 2r.

  ``dx``, ``dy`` are offsets (any broadcastable shape, y downwards); returns a boolean array.
  """
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    # Slightly smaller than the bounding box so its area is closer to the circle's.
    h = 0.9 * r
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if shape == "triangle":
    # Isosceles, apex up, base at the bottom: half-width grows linearly from 0 to r.
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= 0.5 * (dy + r))
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  if shape == "cross":
    t = 0.4 * r
    inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return inside & ((np.abs(dx) <= t) | (np.abs(dy) <= t))
  raise ValueError(f"unknown shape {shape!r}; known: circle, square, triangle, diamond, cross")


def render_video(color: str, shape: str, direction: str, *, frames: int, resolution: int,
                 size: str = "medium", background: str = "black", speed: float = 0.0625,
                 x0: float = 0.5, y0: float = 0.5) -> np.ndarray:
  """Renders one moving shape on a torus.

  Args:
    color, shape, direction, size, background: names from ``COLORS``, ``SHAPES``,
      ``DIRECTIONS``, ``SIZES``, ``BACKGROUNDS``.
    frames: number of frames F.
    resolution: frame side H = W in pixels.
    speed: displacement per frame, as a fraction of the frame side.
    x0, y0: centre at frame 0, as fractions of the frame side.

  Returns:
    float32 array [F, H, W, 3] in [-1, 1].
  """
  for name, value, table in (("color", color, COLORS), ("direction", direction, DIRECTIONS),
                             ("size", size, SIZES), ("background", background, BACKGROUNDS)):
    if value not in table:
      raise ValueError(f"unknown {name} {value!r}; known: {', '.join(table)}")
  if frames < 1 or resolution < 8:
    raise ValueError(f"need frames >= 1 and resolution >= 8, got {frames}, {resolution}")
  n = resolution
  s = _SUPERSAMPLE
  # Sub-pixel sample positions, in pixels, at the centres of an s x s grid inside each pixel.
  coords = (np.arange(n * s, dtype=np.float32) + 0.5) / s
  vx, vy = DIRECTIONS[direction]
  r = SIZES[size] * n
  t = np.arange(frames, dtype=np.float32)[:, None, None]
  cx = (x0 + vx * speed * t) * n
  cy = (y0 + vy * speed * t) * n
  # Wrapped (torus) offsets from the centre in [-n/2, n/2): the shape re-enters at the far edge.
  dx = np.mod(coords[None, None, :] - cx + n / 2, n) - n / 2
  dy = np.mod(coords[None, :, None] - cy + n / 2, n) - n / 2
  inside = shape_inside(shape, dx, dy, r).astype(np.float32)  # [F, n*s, n*s]
  # Box-filter the supersampled mask down to pixel coverage (anti-aliasing).
  alpha = inside.reshape(frames, n, s, n, s).mean(axis=(2, 4))[..., None]
  fg = np.asarray(COLORS[color], np.float32)
  bg = np.full(3, BACKGROUNDS[background], np.float32)
  video = alpha * fg + (1.0 - alpha) * bg
  return (video * 2.0 - 1.0).astype(np.float32)


class SyntheticVideoSource:
  """Procedural captioned videos; a grain ``RandomAccessDataSource``.

  Record ``i`` is a pure function of ``(seed, i)``: attributes are drawn uniformly from the
  (colour, shape, direction) triples of the split, size and background uniformly, speed uniformly
  in ``speed_range``, and the start position uniformly on the torus.

  Each record is ``{"video": float32 [F, H, W, 3] in [-1, 1], "caption": str, "attributes":
  {"color", "shape", "direction", "size", "background": str, "speed", "x0", "y0": float}}``.
  """

  def __init__(self, num_records: int, frames: int, resolution: int, seed: int = 0,
               colors: Sequence[str] = DEFAULT_COLORS, shapes: Sequence[str] = DEFAULT_SHAPES,
               directions: Sequence[str] = DEFAULT_DIRECTIONS,
               holdout: Sequence[tuple[str, str, str]] | None = None, split: str = "train",
               sizes: Sequence[str] = DEFAULT_SIZES,
               backgrounds: Sequence[str] = DEFAULT_BACKGROUNDS,
               speed_range: tuple[float, float] = DEFAULT_SPEED, start_band: float = 1.0,
               cross_band: float = 1.0):
    """Creates the source.

    Args:
      num_records: length of the source (records are procedural, so any number is fine).
      frames: frames per video F.
      resolution: frame side H = W in pixels (>= 8).
      seed: base seed; record i uses ``numpy.random.default_rng([seed, i])``.
      colors, shapes, directions, sizes, backgrounds: vocabularies (names from the module tables).
      holdout: (colour, shape, direction) triples excluded from ``"train"`` and forming the
        ``"heldout"`` split. ``None`` means ``default_holdout(colors, shapes, directions)``;
        an empty sequence holds out nothing.
      split: ``"train"`` (all triples except held-out ones), ``"heldout"`` (only held-out ones) or
        ``"all"``.
      speed_range: (min, max) speed in frame sides per frame.
      start_band: width, as a fraction of the frame side, of the band that the start position
        along the direction of motion is drawn from. 1.0 (default): uniform on the torus, so
        every frame on its own is the same for all directions and the direction is only a
        relation between frames. Below 1: the band is placed so that the shape crosses the
        middle of the frame half-way through the clip (give or take ``start_band / 2``), so a
        shape moving right starts on the left; every frame then shows where it is heading.
      cross_band: the same for the position across the motion (centred mid-frame); 1.0
        (default) keeps it uniform. Both below 1 make every caption's trajectory nearly fixed.
    """
    if num_records < 1:
      raise ValueError(f"num_records must be >= 1, got {num_records}")
    if frames < 1:
      raise ValueError(f"frames must be >= 1, got {frames}")
    if resolution < 8:
      raise ValueError(f"resolution must be >= 8, got {resolution}")
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    for name, values, table in (("colors", colors, COLORS), ("directions", directions, DIRECTIONS),
                                ("sizes", sizes, SIZES), ("backgrounds", backgrounds, BACKGROUNDS),
                                ("shapes", shapes, dict.fromkeys(SHAPES))):
      values = tuple(values)
      if not values:
        raise ValueError(f"{name} must not be empty")
      unknown = [v for v in values if v not in table]
      if unknown:
        raise ValueError(f"unknown {name} {unknown}; known: {', '.join(table)}")
      if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")
    lo, hi = speed_range
    if not 0 <= lo <= hi:
      raise ValueError(f"speed_range must satisfy 0 <= min <= max, got {speed_range}")
    for name, band in (("start_band", start_band), ("cross_band", cross_band)):
      if not 0 < band <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {band}")
    self.num_records = int(num_records)
    self.frames = int(frames)
    self.resolution = int(resolution)
    self.seed = int(seed)
    self.colors = tuple(colors)
    self.shapes = tuple(shapes)
    self.directions = tuple(directions)
    self.sizes = tuple(sizes)
    self.backgrounds = tuple(backgrounds)
    self.speed_range = (float(lo), float(hi))
    self.start_band = float(start_band)
    self.cross_band = float(cross_band)
    self.split = split
    all_triples = list(itertools.product(self.colors, self.shapes, self.directions))
    if holdout is None:
      holdout = default_holdout(self.colors, self.shapes, self.directions)
    holdout = [tuple(h) for h in holdout]
    bad = [h for h in holdout if h not in all_triples]
    if bad:
      raise ValueError(f"holdout triples {bad} are not (colour, shape, direction) combinations "
                       f"of this source's vocabularies")
    self.holdout = tuple(dict.fromkeys(holdout))
    held = set(self.holdout)
    if split == "train":
      self.triples = tuple(t for t in all_triples if t not in held)
    elif split == "heldout":
      self.triples = tuple(t for t in all_triples if t in held)
    else:
      self.triples = tuple(all_triples)
    if not self.triples:
      raise ValueError(f"split {split!r} has no (colour, shape, direction) combinations left "
                       f"(holdout has {len(self.holdout)} of {len(all_triples)})")

  def __len__(self) -> int:
    return self.num_records

  def attributes(self, index: int) -> dict[str, Any]:
    """The attributes of record ``index`` (cheap: nothing is rendered)."""
    if not -self.num_records <= index < self.num_records:
      raise IndexError(f"record {index} out of range for {self.num_records} records")
    index %= self.num_records
    rng = np.random.default_rng([self.seed, index])
    color, shape, direction = self.triples[rng.integers(len(self.triples))]
    size = self.sizes[rng.integers(len(self.sizes))]
    background = self.backgrounds[rng.integers(len(self.backgrounds))]
    speed = float(rng.uniform(*self.speed_range))
    start = rng.uniform(size=2)  # (x0, y0), uniform on the torus
    vx, vy = DIRECTIONS[direction]
    along = 0 if vx else 1  # index of the coordinate the shape moves along; 1 - along: across
    if self.start_band < 1:
      # Centred so that the shape is mid-frame at frame (F - 1) / 2.
      centre = 0.5 - (vx or vy) * speed * (self.frames - 1) / 2
      start[along] = np.mod(centre + (start[along] - 0.5) * self.start_band, 1.0)
    if self.cross_band < 1:
      start[1 - along] = 0.5 + (start[1 - along] - 0.5) * self.cross_band
    return {
        "color": color,
        "shape": shape,
        "direction": direction,
        "size": size,
        "background": background,
        "speed": speed,
        "x0": float(start[0]),
        "y0": float(start[1]),
    }

  def caption(self, attributes: Mapping[str, Any]) -> str:
    return make_caption(attributes, with_size=len(self.sizes) > 1,
                        with_background=len(self.backgrounds) > 1)

  def render(self, attributes: Mapping[str, Any], frames: int | None = None) -> np.ndarray:
    """Renders ``attributes`` at this source's resolution; ``frames`` defaults to the source's."""
    return render_video(
        attributes["color"], attributes["shape"], attributes["direction"],
        frames=self.frames if frames is None else frames, resolution=self.resolution,
        size=attributes["size"], background=attributes["background"],
        speed=attributes["speed"], x0=attributes["x0"], y0=attributes["y0"])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    attributes = self.attributes(index)
    return {"video": self.render(attributes), "caption": self.caption(attributes),
            "attributes": attributes}

  def __repr__(self) -> str:
    return (f"SyntheticVideoSource(num_records={self.num_records}, frames={self.frames}, "
            f"resolution={self.resolution}, seed={self.seed}, split={self.split!r}, "
            f"triples={len(self.triples)}, holdout={len(self.holdout)})")
