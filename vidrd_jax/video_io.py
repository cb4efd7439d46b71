"""Writing sampled videos: float frames -> uint8, MP4 (PyAV) and GIF (Pillow)."""

from __future__ import annotations

import fractions
import os
from typing import Sequence

import numpy as np


def to_uint8(frames, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Float frames in ``value_range`` -> uint8 [..., H, W, 3], rounded to nearest.

  (The VidRD reference truncates ``x * 255`` when saving GIFs; rounding, as diffusers'
  ``numpy_to_pil`` does, is the unbiased choice and differs from it by at most 1.)
  """
  lo, hi = value_range
  x = (np.asarray(frames, np.float32) - lo) / (hi - lo)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_frames(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
  if frames.shape[0] == 0:
    raise ValueError("frames is empty")
  return frames


def _pick_codec(preferred: Sequence[str]) -> str:
  import av  # pylint: disable=g-import-not-at-top
  for name in preferred:
    try:
      av.codec.Codec(name, "w")
      return name
    except Exception:  # pylint: disable=broad-except
      continue
  raise RuntimeError(f"none of the video encoders {list(preferred)} is available in this PyAV build")


def write_mp4(path: str, frames: np.ndarray, fps: float = 8.0, codec: str | None = None,
              crf: int = 18) -> str:
  """Writes uint8 [F, H, W, 3] frames as H.264 (libx264) MP4, or MPEG-4 part 2 if x264 is absent.

  Odd frame sizes are padded by one edge row/column (yuv420p needs even sizes).
  Returns the codec used.
  """
  import av  # pylint: disable=g-import-not-at-top
  frames = _check_frames(frames)
  # yuv420p subsamples chroma 2x2: pad odd sizes by repeating the last row / column.
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  codec = codec or _pick_codec(("libx264", "h264", "mpeg4"))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  rate = fractions.Fraction(fps).limit_denominator(1001)
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": str(crf), "preset": "medium"}
    elif codec == "mpeg4":
      stream.options = {"qscale": "2"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return codec


def write_gif(path: str, frames: np.ndarray, fps: float = 8.0, loop: int = 0) -> None:
  """Writes uint8 [F, H, W, 3] frames as an animated GIF (``loop=0``: forever)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  frames = _check_frames(frames)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  # GIF stores delays in centiseconds.
  duration_ms = max(10, int(round(1000.0 / fps / 10.0)) * 10)
  images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=loop,
                 optimize=False, disposal=2)


def read_video(path: str) -> np.ndarray:
  """Decodes every frame of a video or GIF file to uint8 [F, H, W, 3] (for tests and tools)."""
  if path.lower().endswith(".gif"):
    from PIL import Image, ImageSequence  # pylint: disable=g-import-not-at-top
    with Image.open(path) as im:
      return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
