"""Video-text sources: on-disk formats and random access to decoded records.

Every source has `len(source)` and `source.load(index, rng)`, which returns
{"video": uint8 or float32 [F, R, R, 3], "caption": str} (packed latent shards:
{"latents": float32 [F, h, w, 4], "caption": str}) or raises
`SkipRecord` for bad input. `rng` (from the grain sampler: one per sample,
derived from the seed and the sample's position) drives every random choice, so
a pipeline is deterministic given its seed. Sources are built from config
entries by `build_source` and combined by `vidrd_jax.data.pipeline`.

Kinds and on-disk formats (paths may be local or any etils.epath URL, e.g.
gs://bucket/...; relative paths in a manifest are relative to `root`, default
the manifest's folder):

captioned -- well-captioned videos (WebVid style). `path` is a manifest:
  CSV with a header row, or JSONL (one JSON object per line; by extension
  .jsonl/.json; .tsv is tab-separated; anything else is read as CSV).
  Columns: `video` (or `path`), `caption` (or `text`), optional `start` and
  `end` in seconds delimiting the part of the video to draw clips from.
  Column names can be changed with `video_key=`, `caption_key=` (WebVid's CSV
  after download: caption_key="name"). gs:// paths need gcsfs (or tensorflow)
  installed for etils.epath. Options: `fps` (target frame rate; default None
  = native rate) or `stride` (native-frame step, default 1), `root`.
    video,caption,start,end
    clips/0001.mp4,"a dog runs on the beach",,
    gs://bucket/long.mp4,"a man cooks pasta",12.0,30.5

classes -- action-recognition videos, one folder per class (UCF-101, Kinetics):
  `path`/<ClassName>/<video files>. The class name becomes a caption through a
  template drawn at random from `templates` (default "a person {label}", "a
  video of {label}", "{label}") after being made readable: CamelCase and
  underscores are split and lower-cased ("ApplyEyeMakeup" -> "apply eye
  makeup", "playing_guitar" -> "playing guitar"; all-caps words are kept).
  `label_map` ({folder name: text}) overrides the readable form. `split_file`
  restricts to a list of "<ClassName>/<file> [anything]" lines (UCF-101's
  trainlist01.txt format), relative to `path`. Options `fps`, `stride`.

segments -- long videos cut into captioned segments: a JSONL (or CSV) with
  `video`, `start`, `end` (seconds, required) and `caption` per segment; each
  clip is drawn inside its segment. `python -m tools.caption_segments`
  writes such a file by captioning frames with an image-to-text model.
    {"video": "long/0001.mp4", "start": 0.0, "end": 4.0, "caption": "a man ..."}

images -- image-text pairs turned into pseudo-videos by a random smooth zoom
  and pan (see `vidrd_jax.data.pseudo_video`): a CSV/JSONL manifest with
  `image` (or `path`) and `caption` (or `text`). Options `min_scale` (smallest
  crop side / image short side, default 0.5), `image_key`, `caption_key`, `root`.

tfds -- a prepared tensorflow-datasets video classification builder (`path` is
  the builder name, e.g. "ucf101"), read with `tfds.data_source`, so it must be
  prepared in array_record format (`tfds build ucf101
  --file_format=array_record`). Options `split` (default "train"),
  `data_dir`, `native_fps` (default 25), `fps`/`stride`, `templates`,
  `label_map`. tensorflow_datasets is imported only when this kind is used.

synthetic -- procedural captioned clips, no files (`vidrd_jax.data.synthetic`):
  options `num_records` (default 10000) and the synthetic source's own options.

packed -- ArrayRecord shards written by `python -m vidrd_jax.data.pack` (see
  `vidrd_jax.data.packed` for the format): decoded uint8 clips or VAE latents.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from etils import epath
from PIL import Image

from vidrd_jax.data import pseudo_video
from vidrd_jax.data.skips import SkipRecord
from vidrd_jax.data.video import center_crop, decode_clip, resized_size

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
DEFAULT_TEMPLATES = ("a person {label}", "a video of {label}", "{label}")
# How many leading manifest entries are checked at start: if none exists, the
# manifest's `root` is almost certainly wrong, and failing now beats skipping
# every record later.
_PROBE = 8


# ------------------------------------------------------------------ helpers --

def join_path(root: str, path: str) -> str:
  """`path` if absolute or a URL, else root/path (root may be a URL)."""
  if "://" in path or os.path.isabs(path):
    return path
  return os.fspath(epath.Path(root) / path)


def _exists(path: str) -> bool:
  return epath.Path(path).exists() if "://" in path else os.path.exists(path)


def check_caption(caption: Any, path: str) -> str:
  """Returns the stripped caption or raises SkipRecord("bad_caption")."""
  if not isinstance(caption, str) or not caption.strip():
    raise SkipRecord("bad_caption", path, f"caption {caption!r}")
  return " ".join(caption.split())


def readable_label(label: str) -> str:
  """Class-folder name -> words: "ApplyEyeMakeup" -> "apply eye makeup".

  Underscores and dashes become spaces, CamelCase is split, words are
  lower-cased except all-caps ones (acronyms such as "BMX").
  """
  text = re.sub(r"[_\-]+", " ", label)
  text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", text)
  words = [w if (len(w) > 1 and w.isupper()) else w.lower() for w in text.split()]
  return " ".join(words)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
  if isinstance(templates, str):
    templates = (templates,)
  templates = tuple(templates)
  if not templates:
    raise ValueError("templates must not be empty")
  for t in templates:
    if "{label}" not in t:
      raise ValueError(f"caption template {t!r} has no '{{label}}' placeholder")
  return templates


def read_manifest(path: str, columns: Mapping[str, Sequence[str]],
                  optional: Mapping[str, Sequence[str]] = ()) -> dict[str, list]:
  """Reads a CSV or JSONL manifest into {column: values}.

  Args:
    path: manifest path; JSONL if it ends in .jsonl/.json, else CSV with header.
    columns: {name: accepted spellings}: required columns, first spelling found wins.
    optional: same for optional columns (missing -> list of None).

  Raises:
    FileNotFoundError: no manifest at `path`.
    ValueError: a required column is missing, or the manifest is empty.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"Manifest {path} does not exist")
  text = p.read_text().lstrip("\ufeff")  # a spreadsheet's byte-order mark is not a column name
  if path.endswith((".jsonl", ".json")):
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
          raise ValueError(f"{path}:{n}: expected a JSON object per line, got {row!r}")
        rows.append(row)
    header = list(rows[0]) if rows else []
  else:
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.endswith(".tsv") else ",")
    rows = list(reader)
    header = list(reader.fieldnames or [])
  if not rows:
    raise ValueError(f"Manifest {path} has no records")

  out = {}
  for name, spellings in list(dict(columns).items()) + list(dict(optional).items()):
    key = next((s for s in spellings if s in header), None)
    if key is None:
      if name in columns:
        raise ValueError(
            f"Manifest {path} has no {name!r} column (accepted names: {list(spellings)}; "
            f"columns found: {header}). Name it with {name}_key=...")
      out[name] = [None] * len(rows)
    else:
      out[name] = [r.get(key) for r in rows]
  return out


def _seconds(values: list, path: str, name: str, required: bool) -> list[Optional[float]]:
  out = []
  for n, v in enumerate(values):
    if v is None or (isinstance(v, str) and not v.strip()):
      if required:
        raise ValueError(f"Manifest {path}, record {n}: {name!r} is required")
      out.append(None)
      continue
    try:
      out.append(float(v))
    except (TypeError, ValueError):
      raise ValueError(f"Manifest {path}, record {n}: {name}={v!r} is not a number") from None
  return out


def _probe_paths(paths: Sequence[Optional[str]], what: str, manifest: str) -> None:
  probe = [p for p in paths[:_PROBE] if p]
  if probe and not any(_exists(p) for p in probe):
    raise FileNotFoundError(
        f"None of the first {len(probe)} {what} files listed in {manifest} exist "
        f"(e.g. {probe[0]}); is the manifest's root (root=...) right?")


# ------------------------------------------------------------------ sources --

class VideoManifestSource:
  """`captioned` and `segments` kinds: a manifest of (video, caption[, start, end])."""

  produces = "video"

  def __init__(self, path: str, frames: int, resolution: int, *, fps: Optional[float] = None,
               stride: int = 1, root: Optional[str] = None, video_key: Optional[str] = None,
               caption_key: Optional[str] = None, require_window: bool = False):
    self.frames, self.resolution, self.fps, self.stride = frames, resolution, fps, int(stride)
    if self.stride < 1:
      raise ValueError(f"stride must be >= 1, got {stride}")
    if fps is not None and fps <= 0:
      raise ValueError(f"fps must be > 0, got {fps}")
    cols = read_manifest(
        path,
        {"video": [video_key] if video_key else ["video", "path"],
         "caption": [caption_key] if caption_key else ["caption", "text"]},
        {"start": ["start"], "end": ["end"]})
    root = root if root is not None else os.fspath(epath.Path(path).parent)
    self.paths = [join_path(root, str(v)) if v else "" for v in cols["video"]]
    self.captions = cols["caption"]
    self.starts = _seconds(cols["start"], path, "start", require_window)
    self.ends = _seconds(cols["end"], path, "end", require_window)
    _probe_paths(self.paths, "video", path)

  def __len__(self) -> int:
    return len(self.paths)

  def load(self, index: int, rng: np.random.Generator) -> dict:
    path = self.paths[index]
    caption = check_caption(self.captions[index], path)
    if not path:
      raise SkipRecord("missing_file", f"record {index}", "no video path")
    video = decode_clip(path, self.frames, self.resolution, rng, fps=self.fps, stride=self.stride,
                        start=self.starts[index], end=self.ends[index])
    return {"video": video, "caption": caption}


def segments_source(path: str, frames: int, resolution: int, **kwargs) -> VideoManifestSource:
  """`segments` kind: like `captioned` with start and end required."""
  return VideoManifestSource(path, frames, resolution, require_window=True, **kwargs)


class ClassFolderSource:
  """`classes` kind: folder-per-class videos, captions from label templates."""

  produces = "video"

  def __init__(self, path: str, frames: int, resolution: int, *,
               templates: Sequence[str] = DEFAULT_TEMPLATES,
               label_map: Optional[Mapping[str, str]] = None, fps: Optional[float] = None,
               stride: int = 1, split_file: Optional[str] = None,
               extensions: Sequence[str] = VIDEO_EXTENSIONS):
    self.frames, self.resolution, self.fps, self.stride = frames, resolution, fps, int(stride)
    self.templates = check_templates(templates)
    root = epath.Path(path)
    if not root.is_dir():
      raise FileNotFoundError(f"classes source: {path} is not a folder")
    extensions = tuple(e.lower() for e in extensions)
    self.class_names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not self.class_names:
      raise ValueError(f"classes source: {path} has no class sub-folders")
    label_map = dict(label_map or {})
    self.labels = [label_map.get(c, readable_label(c)) for c in self.class_names]
    class_index = {c: i for i, c in enumerate(self.class_names)}

    self.paths, self.targets = [], []
    if split_file:
      split = epath.Path(join_path(os.fspath(root), split_file))
      if not split.exists():
        raise FileNotFoundError(f"classes source: split file {split} does not exist")
      for line in split.read_text().splitlines():
        if not line.strip():
          continue
        rel = line.split()[0]
        cls = rel.replace("\\", "/").split("/")[0]
        if cls not in class_index:
          raise ValueError(f"split file {split}: class {cls!r} of {rel!r} is not a folder in {path}")
        self.paths.append(os.fspath(root / rel))
        self.targets.append(class_index[cls])
    else:
      for c in self.class_names:
        for f in sorted((root / c).iterdir()):
          if f.name.lower().endswith(extensions):
            self.paths.append(os.fspath(f))
            self.targets.append(class_index[c])
    if not self.paths:
      raise ValueError(f"classes source: no videos ({', '.join(extensions)}) under {path}")

  def __len__(self) -> int:
    return len(self.paths)

  def caption(self, label: str, rng: np.random.Generator) -> str:
    return self.templates[rng.integers(len(self.templates))].format(label=label)

  def load(self, index: int, rng: np.random.Generator) -> dict:
    path = self.paths[index]
    caption = self.caption(self.labels[self.targets[index]], rng)
    video = decode_clip(path, self.frames, self.resolution, rng, fps=self.fps, stride=self.stride)
    return {"video": video, "caption": caption}


class ImageTextSource:
  """`images` kind: image-text manifest -> zoom/pan pseudo-videos."""

  produces = "video"

  def __init__(self, path: str, frames: int, resolution: int, *, min_scale: float = 0.5,
               root: Optional[str] = None, image_key: Optional[str] = None,
               caption_key: Optional[str] = None):
    self.frames, self.resolution, self.min_scale = frames, resolution, float(min_scale)
    if not 0.0 < self.min_scale <= 1.0:
      raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    cols = read_manifest(
        path,
        {"image": [image_key] if image_key else ["image", "path"],
         "caption": [caption_key] if caption_key else ["caption", "text"]})
    root = root if root is not None else os.fspath(epath.Path(path).parent)
    self.paths = [join_path(root, str(v)) if v else "" for v in cols["image"]]
    self.captions = cols["caption"]
    _probe_paths(self.paths, "image", path)

  def __len__(self) -> int:
    return len(self.paths)

  def load(self, index: int, rng: np.random.Generator) -> dict:
    path = self.paths[index]
    caption = check_caption(self.captions[index], path)
    if not path or not _exists(path):
      raise SkipRecord("missing_file", path or f"record {index}")
    try:
      with epath.Path(path).open("rb") as f:
        image = Image.open(f)
        # JPEGs decode straight to a reduced scale when the image is much larger
        # than needed (the smallest crop still keeps >= 2x the output resolution).
        needed = math.ceil(2 * self.resolution / self.min_scale)
        image.draft("RGB", (needed, needed))
        image.load()
    except Exception as e:  # pylint: disable=broad-except
      raise SkipRecord("unreadable", path, f"{type(e).__name__}: {e}") from None
    if min(image.size) < 2:
      raise SkipRecord("unreadable", path, f"image size {image.size}")
    video = pseudo_video.image_to_video(image, self.frames, self.resolution, rng, self.min_scale)
    return {"video": video, "caption": caption}


class TfdsVideoSource:
  """`tfds` kind: a prepared tensorflow-datasets video classification builder."""

  produces = "video"

  def __init__(self, path: str, frames: int, resolution: int, *, split: str = "train",
               data_dir: Optional[str] = None, native_fps: float = 25.0,
               fps: Optional[float] = None, stride: int = 1,
               templates: Sequence[str] = DEFAULT_TEMPLATES,
               label_map: Optional[Mapping[str, str]] = None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("The 'tfds' source needs tensorflow_datasets (pip install "
                        "tensorflow-datasets); it is not a vidrd-jax requirement.") from None
    self.name, self.split, self.data_dir = path, split, data_dir
    self.frames, self.resolution = frames, resolution
    self.native_fps, self.fps, self.stride = float(native_fps), fps, int(stride)
    self.templates = check_templates(templates)
    try:
      self._source = tfds.data_source(path, split=split, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"tfds source {path!r} (split {split!r}, data_dir {data_dir!r}) could not be opened: {e}. "
          f"It must be prepared in array_record format (tfds build {path} "
          f"--file_format=array_record).") from e
    names = self._source.dataset_info.features["label"].names
    label_map = dict(label_map or {})
    self.labels = [label_map.get(n, readable_label(n)) for n in names]

  def __len__(self) -> int:
    return len(self._source)

  def load(self, index: int, rng: np.random.Generator) -> dict:
    where = f"tfds:{self.name}/{self.split}[{index}]"
    try:
      record = self._source[index]
      video = np.asarray(record["video"])
      label = int(record["label"])
    except Exception as e:  # pylint: disable=broad-except
      raise SkipRecord("unreadable", where, f"{type(e).__name__}: {e}") from None
    step = self.native_fps / self.fps if self.fps else float(self.stride)
    span = (self.frames - 1) * step
    if video.ndim != 4 or video.shape[0] < span + 1:
      raise SkipRecord("too_short", where, f"video shape {video.shape}")
    start = rng.uniform(0.0, video.shape[0] - 1 - span)
    idx = np.round(start + step * np.arange(self.frames)).astype(int)
    frames = [_resize_crop(video[i], self.resolution) for i in idx]
    caption = self.templates[rng.integers(len(self.templates))].format(label=self.labels[label])
    return {"video": np.stack(frames), "caption": caption}


def _resize_crop(frame: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [resolution, resolution, 3]: short side resized, centre crop."""
  image = Image.fromarray(frame)
  image = image.resize(resized_size(image.width, image.height, resolution), Image.BILINEAR)
  return center_crop(np.asarray(image), resolution)


class SyntheticSource:
  """`synthetic` kind: wraps vidrd_jax.data.synthetic.SyntheticVideoSource."""

  produces = "video"

  def __init__(self, path: Optional[str], frames: int, resolution: int, *,
               num_records: int = 10000, seed: int = 0, **kwargs):
    del path  # synthetic data has no files
    from vidrd_jax.data.synthetic import SyntheticVideoSource  # pylint: disable=g-import-not-at-top
    self._source = SyntheticVideoSource(num_records=num_records, frames=frames,
                                        resolution=resolution, seed=seed, **kwargs)

  def __len__(self) -> int:
    return len(self._source)

  def load(self, index: int, rng: np.random.Generator) -> dict:
    del rng  # the synthetic source is a function of the index
    record = self._source[index]
    return {"video": record["video"], "caption": check_caption(record["caption"], f"synthetic[{index}]")}


def _packed(path, frames, resolution, **kwargs):
  from vidrd_jax.data.packed import PackedSource  # pylint: disable=g-import-not-at-top
  return PackedSource(path, frames, resolution, **kwargs)


SOURCE_KINDS: dict[str, Callable[..., Any]] = {
    "captioned": VideoManifestSource,
    "segments": segments_source,
    "classes": ClassFolderSource,
    "images": ImageTextSource,
    "tfds": TfdsVideoSource,
    "synthetic": SyntheticSource,
    "packed": _packed,
}


def build_source(spec: Mapping[str, Any], frames: int, resolution: int):
  """Builds one source from a config entry {"kind", "path", [weight], options...}."""
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  kind = spec.pop("kind", None)
  if kind not in SOURCE_KINDS:
    raise ValueError(f"Unknown data source kind {kind!r}; expected one of {sorted(SOURCE_KINDS)}")
  path = spec.pop("path", None)
  spec.pop("weight", None)
  if path is None and kind != "synthetic":
    raise ValueError(f"Data source of kind {kind!r} needs a 'path'")
  try:
    return SOURCE_KINDS[kind](path, frames, resolution, **spec)
  except TypeError as e:
    raise ValueError(f"Bad options for data source {kind}:{path}: {e}") from e
