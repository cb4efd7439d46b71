"""Clip decoding with PyAV: F frames at a target fps (or frame stride) from a random start.

Frame selection. With `fps` set, output frame k is the source frame nearest to
time t0 + k / fps (frames repeat when fps is above the native rate); with
`fps=None`, it is every `stride`-th native frame (t0 + k * stride / native_fps).
t0 is drawn uniformly so that the whole clip fits inside [start, end) (the
record's window, default the whole video). A video too short for the clip
raises SkipRecord("too_short"); an unreadable, zero-length or truncated one
SkipRecord("unreadable").

Frames are resized (short side -> resolution) during decoding by libswscale and
center-cropped to resolution x resolution.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import av
import numpy as np
from etils import epath

from vidrd_jax.data.skips import SkipRecord

# Seeking is only worth it past this point; before it we decode from the start.
_SEEK_MIN_SECONDS = 1.0


def to_float(frames: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  # One float32 temporary, updated in place: 3x faster than astype-then-scale.
  out = np.multiply(frames, np.float32(2.0 / 255.0), dtype=np.float32)
  out -= 1.0
  return out


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
  """(width, height) with the short side scaled to `resolution`."""
  scale = resolution / min(width, height)
  return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
  """[H, W, C] with H, W >= resolution -> [resolution, resolution, C]."""
  h, w = image.shape[:2]
  top, left = (h - resolution) // 2, (w - resolution) // 2
  return image[top:top + resolution, left:left + resolution]


class _Container:
  """An av container that also closes the remote file object it reads from."""

  def __init__(self, path: str):
    self._file = None
    if "://" in path:
      p = epath.Path(path)
      if not p.exists():
        raise SkipRecord("missing_file", path)
      self._file = p.open("rb")
      source = self._file
    else:
      if not os.path.exists(path):
        raise SkipRecord("missing_file", path)
      if os.path.getsize(path) == 0:
        raise SkipRecord("unreadable", path, "zero-length file")
      source = path
    try:
      self.container = av.open(source)
    except BaseException:
      self.close()
      raise

  def close(self):
    if getattr(self, "container", None) is not None:
      self.container.close()
    if self._file is not None:
      self._file.close()

  def __enter__(self):
    return self.container

  def __exit__(self, *exc):
    self.close()


def _open(path: str) -> _Container:
  """Opens a local path or any etils.epath URL (gs:// needs gcsfs or tensorflow installed).

  Raises:
    SkipRecord: the file is missing or cannot be opened (any opener error becomes "unreadable").
  """
  try:
    return _Container(path)
  except SkipRecord:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SkipRecord("unreadable", path, f"{type(e).__name__}: {e}") from None


def decode_clip(
    path: str,
    num_frames: int,
    resolution: int,
    rng: np.random.Generator,
    *,
    fps: Optional[float] = None,
    stride: int = 1,
    start: Optional[float] = None,
    end: Optional[float] = None,
) -> np.ndarray:
  """Decodes one clip.

  Args:
    path: local path or epath URL of the video.
    num_frames: F, frames in the clip.
    resolution: output height and width.
    rng: draws the clip's start time.
    fps: target frame rate; None keeps the native rate subsampled by `stride`.
    stride: native-frame step when `fps` is None.
    start, end: window (seconds) the clip must lie in; None = whole video.

  Returns:
    uint8 [F, resolution, resolution, 3].

  Raises:
    SkipRecord: missing, unreadable or too short video.
  """
  handle = _open(path)
  try:
    with handle as container:
      return _decode(container, path, num_frames, resolution, rng, fps, stride, start, end)
  except SkipRecord:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Corrupt packets surface as FFmpeg errors mid-stream: the file is bad, not the code.
    raise SkipRecord("unreadable", path, f"{type(e).__name__}: {e}") from None


def _decode(container, path, num_frames, resolution, rng, fps, stride, start, end):
  if not container.streams.video:
    raise SkipRecord("unreadable", path, "no video stream")
  stream = container.streams.video[0]
  stream.thread_type = "AUTO"
  rate = stream.average_rate or stream.guessed_rate
  native_fps = float(rate) if rate else 0.0
  if native_fps <= 0:
    raise SkipRecord("unreadable", path, "unknown frame rate")
  period = 1.0 / native_fps
  time_base = float(stream.time_base)
  stream_start = (stream.start_time or 0) * time_base

  if stream.duration:
    duration = stream.duration * time_base
  elif container.duration:
    duration = container.duration / av.time_base
  elif stream.frames:
    duration = stream.frames * period
  else:
    duration = math.inf  # unknown: clips start at `start`, shortness shows when decoding
  win_start = max(0.0, start or 0.0)
  win_end = min(duration, end) if end is not None else duration

  step = 1.0 / fps if fps else stride * period
  span = (num_frames - 1) * step
  # The last frame of the window starts one frame period before its end.
  latest_t0 = win_end - period - span
  if latest_t0 < win_start - 0.5 * period:
    raise SkipRecord(
        "too_short", path,
        f"window {win_end - win_start:.2f}s < clip {span + period:.2f}s")
  if math.isfinite(latest_t0) and latest_t0 > win_start:
    t0 = win_start + rng.uniform(0.0, latest_t0 - win_start)
  else:
    t0 = win_start
  targets = t0 + step * np.arange(num_frames)

  frames = _collect(container, stream, targets, period, stream_start, resolution,
                    seek=t0 > _SEEK_MIN_SECONDS)
  if frames is None:  # the seek landed past the clip: decode from the beginning
    container.seek(0)
    frames = _collect(container, stream, targets, period, stream_start, resolution, seek=False)
  if frames is None or len(frames) < num_frames:
    got = 0 if frames is None else len(frames)
    raise SkipRecord("too_short", path, f"decoded {got} of {num_frames} frames")
  return np.stack(frames)


def _collect(container, stream, targets, period, stream_start, resolution, seek):
  """Decodes frames nearest to `targets`; None if the first frame is already past them."""
  if seek:
    container.seek(int((targets[0] + stream_start) / float(stream.time_base)),
                   stream=stream, backward=True, any_frame=False)
  out = []
  k, index, first = 0, -1, True
  for frame in container.decode(stream):
    index += 1
    t = frame.time - stream_start if frame.time is not None else index * period
    if first and seek and t > targets[0] + 0.5 * period:
      return None
    first = False
    converted = None
    # A frame covers [t - period/2, t + period/2): it serves every target in it
    # (several when fps is above the native rate).
    while k < len(targets) and targets[k] < t + 0.5 * period:
      if converted is None:
        converted = _convert(frame, resolution)
      out.append(converted)
      k += 1
    if k == len(targets):
      break
  return out


def _convert(frame: av.VideoFrame, resolution: int) -> np.ndarray:
  w, h = resized_size(frame.width, frame.height, resolution)
  rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
  return center_crop(rgb, resolution)


def write_video(path: str, frames: np.ndarray, fps: float = 25.0, codec: str = "libx264") -> None:
  """Writes uint8 [T, H, W, 3] frames to an MP4 (used by tests and examples)."""
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=round(fps) if float(fps).is_integer() else fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "10", "preset": "ultrafast"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def probe(path: str) -> tuple[float, float]:
  """(duration in seconds, native fps) of a video; raises SkipRecord if unreadable."""
  handle = _open(path)
  with handle as container:
    if not container.streams.video:
      raise SkipRecord("unreadable", path, "no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if stream.duration:
      duration = stream.duration * float(stream.time_base)
    elif container.duration:
      duration = container.duration / av.time_base
    elif stream.frames and fps:
      duration = stream.frames / fps
    else:
      raise SkipRecord("unreadable", path, "unknown duration")
    if fps <= 0 or duration <= 0:
      raise SkipRecord("unreadable", path, f"duration {duration}, fps {fps}")
    return duration, fps


def frames_at(path: str, times: list[float]) -> list[np.ndarray]:
  """Full-size uint8 [H, W, 3] frames nearest to each of the sorted `times` (seconds)."""
  handle = _open(path)
  out = []
  try:
    with handle as container:
      if not container.streams.video:
        raise SkipRecord("unreadable", path, "no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      time_base = float(stream.time_base)
      stream_start = (stream.start_time or 0) * time_base
      rate = stream.average_rate or stream.guessed_rate
      half = 0.5 / float(rate) if rate else 0.02
      for t in times:
        # Seek to the keyframe before each target: segments are far apart in long videos.
        container.seek(int((t + stream_start) / time_base), stream=stream, backward=True)
        last = None
        for frame in container.decode(stream):
          last = frame
          if frame.time is not None and frame.time - stream_start >= t - half:
            break
        if last is None:
          raise SkipRecord("too_short", path, f"no frame at {t:.2f}s")
        out.append(last.to_ndarray(format="rgb24"))
  except SkipRecord:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SkipRecord("unreadable", path, f"{type(e).__name__}: {e}") from None
  return out
