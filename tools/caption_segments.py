"""Cut long videos into segments and caption each with an image-to-text model.

  python -m tools.caption_segments --videos=/data/long_videos \
      --model=/models/blip-image-captioning-large --out=/data/long_segments.jsonl \
      --segment_seconds=4

Writes the `segments` source format (vidrd_jax.data.sources): one JSON line
{"video", "start", "end", "caption"} per segment. Each segment [s, s + L) (L =
--segment_seconds, consecutive segments --stride_seconds apart, default L) is
captioned from its middle frame by any transformers model loadable with
AutoModelForImageTextToText (BLIP, GIT, ViT-GPT2 VisionEncoderDecoder, ...)
from a local folder or hub name, with its AutoProcessor (or its image processor
and tokenizer). `--prompt` is passed as text for models that take one (e.g.
BLIP's "a video of"). The paper captioned segments with MiniGPT-4; any
captioner works here.

This offline tool runs the model with PyTorch through transformers (the
training code itself never imports torch). Unreadable videos are skipped and
counted; the summary {"videos", "segments", "skipped"} is printed.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np
from etils import epath
from PIL import Image

from vidrd_jax.data import skips
from vidrd_jax.data.sources import VIDEO_EXTENSIONS
from vidrd_jax.data.video import frames_at, probe


def list_videos(spec: str) -> list[str]:
  """A folder (searched recursively), a text file of paths, or one video path."""
  p = epath.Path(spec)
  if p.is_dir():
    if "://" in spec:  # remote folders: two levels (recursive listing costs an RPC per folder)
      found = [f for f in p.glob("*") if not f.is_dir()] + list(p.glob("*/*"))
      return sorted(os.fspath(f) for f in found if f.name.lower().endswith(VIDEO_EXTENSIONS))
    return sorted(os.path.join(root, f) for root, _, files in os.walk(spec)
                  for f in files if f.lower().endswith(VIDEO_EXTENSIONS))
  if not p.exists():
    raise FileNotFoundError(f"--videos {spec} does not exist")
  if spec.lower().endswith(VIDEO_EXTENSIONS):
    return [spec]
  base = p.parent
  return [os.fspath(base / line.strip()) if "://" not in line and not os.path.isabs(line.strip())
          else line.strip() for line in p.read_text().splitlines() if line.strip()]


def segment_bounds(duration: float, length: float, stride: float,
                   min_length: float) -> list[tuple[float, float]]:
  """[start, end) windows of `length` every `stride` seconds; a last shorter one if >= min_length."""
  if length <= 0 or stride <= 0:
    raise ValueError(f"segment length and stride must be > 0, got {length}, {stride}")
  out, s = [], 0.0
  while s < duration:
    e = min(s + length, duration)
    if e - s >= min_length:
      out.append((round(s, 3), round(e, 3)))
    s += stride
  return out


class Captioner:
  """Any transformers image-to-text model: images -> captions."""

  def __init__(self, model: str, *, prompt: Optional[str] = None, max_new_tokens: int = 30,
               device: str = "cpu"):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch, self.prompt, self.max_new_tokens, self.device = torch, prompt, max_new_tokens, device
    self.model = transformers.AutoModelForImageTextToText.from_pretrained(model).to(device).eval()
    try:
      self.processor = transformers.AutoProcessor.from_pretrained(model)
      self.image_processor = getattr(self.processor, "image_processor", None)
      self.tokenizer = getattr(self.processor, "tokenizer", None)
    except Exception:  # pylint: disable=broad-except
      self.processor = None
    if self.processor is None or self.image_processor is None or self.tokenizer is None:
      # Models saved without a processor (e.g. ViT-GPT2): image processor + tokenizer.
      self.processor = None
      self.image_processor = transformers.AutoImageProcessor.from_pretrained(model)
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)

  def __call__(self, images: Sequence[Image.Image]) -> list[str]:
    if self.processor is not None and self.prompt:
      inputs = self.processor(images=list(images), text=[self.prompt] * len(images),
                              return_tensors="pt")
    else:
      inputs = {"pixel_values": self.image_processor(images=list(images),
                                                     return_tensors="pt")["pixel_values"]}
    inputs = {k: v.to(self.device) for k, v in inputs.items()}
    with self.torch.no_grad():
      ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
    return [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def caption_videos(videos: Sequence[str], captioner, out_path: str, *, segment_seconds: float = 4.0,
                   stride_seconds: Optional[float] = None, min_seconds: float = 1.0,
                   batch_size: int = 8) -> dict:
  """Segments and captions `videos`, writing the segments JSONL; returns a summary."""
  stride = stride_seconds or segment_seconds
  skipped = dict.fromkeys(skips.SKIP_REASONS, 0)
  written = 0
  with epath.Path(out_path).open("w") as f:
    for video in videos:
      try:
        duration, _ = probe(video)
        bounds = segment_bounds(duration, segment_seconds, stride, min_seconds)
        if not bounds:
          raise skips.SkipRecord("too_short", video, f"{duration:.2f}s")
        images = [Image.fromarray(x) for x in frames_at(video, [(s + e) / 2 for s, e in bounds])]
      except skips.SkipRecord as e:
        skips.STATS.record(e)
        skipped[e.reason] += 1
        continue
      path = video if "://" in video else os.path.abspath(video)
      for i in range(0, len(images), batch_size):
        captions = captioner(images[i:i + batch_size])
        for (s, e), caption in zip(bounds[i:i + batch_size], captions):
          if not caption.strip():
            skipped["bad_caption"] += 1
            continue
          f.write(json.dumps({"video": path, "start": s, "end": e, "caption": caption}) + "\n")
          written += 1
  return {"videos": len(videos), "segments": written, "skipped": skipped}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m tools.caption_segments",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--videos", action="append", required=True,
                      help="folder, text file of paths, or video (repeatable)")
  parser.add_argument("--model", required=True, help="transformers image-to-text model (path or name)")
  parser.add_argument("--out", required=True, help="segments JSONL to write")
  parser.add_argument("--segment_seconds", type=float, default=4.0)
  parser.add_argument("--stride_seconds", type=float, default=None)
  parser.add_argument("--min_seconds", type=float, default=1.0, help="shortest last segment kept")
  parser.add_argument("--prompt", default=None)
  parser.add_argument("--max_new_tokens", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--device", default="cpu")
  args = parser.parse_args(argv)
  videos = [v for spec in args.videos for v in list_videos(spec)]
  captioner = Captioner(args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                        device=args.device)
  summary = caption_videos(videos, captioner, args.out, segment_seconds=args.segment_seconds,
                           stride_seconds=args.stride_seconds, min_seconds=args.min_seconds,
                           batch_size=args.batch_size)
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
