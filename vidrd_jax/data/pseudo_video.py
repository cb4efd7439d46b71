"""Image -> pseudo-video by a random smooth zoom and pan (paper section 3.1).

A square crop box moves from a random start box to a random end box over the F
frames (each box side in [min_scale, 1] x the image's short side, placed
uniformly inside the image); the box at frame k is the linear interpolation of
the two at an eased time (cosine ease-in-out), so every box coordinate moves
monotonically and, the set of boxes inside the image being convex, every box
stays inside the image. Each box is resampled to the output resolution. The
motion depends only on the image size and the rng: deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def zoom_pan_boxes(width: int, height: int, num_frames: int, rng: np.random.Generator,
                   min_scale: float = 0.5) -> np.ndarray:
  """Crop boxes of a random smooth zoom + pan.

  Args:
    width, height: image size in pixels.
    num_frames: F.
    rng: source of the random start and end boxes.
    min_scale: smallest box side as a fraction of the image's short side.

  Returns:
    float64 [F, 4] boxes (x0, y0, x1, y1) in pixels, square, inside the image.
  """
  if not 0.0 < min_scale <= 1.0:
    raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
  short = min(width, height)

  def random_box():
    side = short * rng.uniform(min_scale, 1.0)
    x0 = rng.uniform(0.0, width - side)
    y0 = rng.uniform(0.0, height - side)
    return np.array([x0, y0, x0 + side, y0 + side])

  start, end = random_box(), random_box()
  # Cosine ease-in-out: zero velocity at both ends reads as a smooth camera move.
  s = np.linspace(0.0, 1.0, num_frames)
  eased = 0.5 - 0.5 * np.cos(np.pi * s)
  return start[None] + (end - start)[None] * eased[:, None]


def image_to_video(image: Image.Image, num_frames: int, resolution: int,
                   rng: np.random.Generator, min_scale: float = 0.5) -> np.ndarray:
  """RGB PIL image -> uint8 [F, resolution, resolution, 3] zoom/pan pseudo-video."""
  image = image.convert("RGB")
  # Shrink big images first (integer box filter): resampling each frame from a
  # 4k image would dominate the cost, and the smallest crop still keeps >= 2x
  # the output resolution.
  factor = int(min(image.size) * min_scale / (2 * resolution))
  if factor >= 2:
    image = image.reduce(factor)
  boxes = zoom_pan_boxes(image.width, image.height, num_frames, rng, min_scale)
  frames = [
      np.asarray(image.resize((resolution, resolution), Image.BICUBIC, box=tuple(b)))
      for b in boxes
  ]
  return np.stack(frames)
