"""Video-text input pipeline: sources, decoding, mixing, sharding, checkpointing, bad input.

Budget: ~40 s on 2 CPU cores. Every video is a real MP4 written with PyAV whose
frames encode their own index in 7 horizontal black/white bands, so the test can
read back which source frames a clip holds.
"""

import gc
import json
import os

import numpy as np
from PIL import Image
import pytest

from vidrd_jax.data import SKIP_REASONS, STATS, make_train_iterator, skipped_counts
from vidrd_jax.data import pipeline, pseudo_video, sources
from vidrd_jax.data.skips import SkipRecord
from vidrd_jax.data.video import decode_clip, write_video

H, W, FPS, BITS = 56, 72, 25, 7
RES = 32


def coded_video(num_frames, seed=0):
  """uint8 [T, H, W, 3]: frame t shows t's bits as bands, plus moving noise at the bottom."""
  rng = np.random.default_rng(seed)
  frames = np.zeros((num_frames, H, W, 3), np.uint8)
  band = H // (BITS + 1)
  for t in range(num_frames):
    for b in range(BITS):
      if (t >> b) & 1:
        frames[t, b * band:(b + 1) * band] = 255
    # A moving textured strip so the clip is a real moving pattern.
    frames[t, BITS * band:, :, 1] = np.roll(rng.integers(0, 255, (H - BITS * band, W)), t, axis=1)
  return frames


def frame_indices(clip):
  """Reads the indices back from a decoded clip (uint8 [F, R, R, 3] or float [-1, 1])."""
  clip = np.asarray(clip, np.float32)
  if clip.max() <= 1.0:
    clip = (clip + 1.0) * 127.5
  res = clip.shape[1]
  band = H // (BITS + 1)
  out = []
  for frame in clip:
    value = 0
    for b in range(BITS):
      row = int((b * band + band / 2) * res / H)
      if frame[row, :, 0].mean() > 127:
        value |= 1 << b
    out.append(value)
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  for n in range(8):
    write_video(str(d / f"v{n}.mp4"), coded_video(60, seed=n), fps=FPS)
  write_video(str(d / "short.mp4"), coded_video(5), fps=FPS)
  (d / "empty.mp4").write_bytes(b"")
  (d / "garbage.mp4").write_bytes(os.urandom(5000))
  full = (d / "v0.mp4").read_bytes()
  (d / "truncated.mp4").write_bytes(full[: len(full) // 3])
  with open(d / "good.csv", "w") as f:
    f.write("video,caption\n")
    for n in range(8):
      f.write(f"v{n}.mp4,video number {n}\n")
  return d


def _close(it):
  del it
  gc.collect()


# ------------------------------------------------------------------ decoding --

@pytest.mark.parametrize("fps,stride,step", [(None, 1, 1), (None, 3, 3), (12.5, 1, 2), (50.0, 1, 0.5)])
def test_decode_frame_selection(data_dir, fps, stride, step):
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(4):
    clip = decode_clip(str(data_dir / "v1.mp4"), 8, RES, rng, fps=fps, stride=stride)
    assert clip.shape == (8, RES, RES, 3) and clip.dtype == np.uint8
    idx = np.array(frame_indices(clip))
    expected = idx[0] + np.floor(np.arange(8) * step + 1e-6)
    if step < 1:  # above the native rate frames repeat; nearest-frame rounding may shift by one
      assert np.all(np.abs(idx - expected) <= 1) and np.all(np.diff(idx) >= 0)
    else:
      np.testing.assert_array_equal(idx, expected)
    assert 0 <= idx[0] and idx[-1] < 60
    starts.add(idx[0])
  assert len(starts) > 1  # random start


def test_decode_window(data_dir):
  rng = np.random.default_rng(1)
  for _ in range(5):
    clip = decode_clip(str(data_dir / "v2.mp4"), 8, RES, rng, stride=2, start=1.0, end=1.8)
    idx = frame_indices(clip)
    assert idx[0] >= 25 and idx[-1] < 45, idx
    assert np.all(np.diff(idx) == 2)


@pytest.mark.parametrize("name,reason", [
    ("short.mp4", "too_short"), ("empty.mp4", "unreadable"), ("garbage.mp4", "unreadable"),
    ("truncated.mp4", "unreadable"), ("missing.mp4", "missing_file")])
def test_decode_bad_files(data_dir, name, reason):
  with pytest.raises(SkipRecord) as e:
    decode_clip(str(data_dir / name), 8, RES, np.random.default_rng(0))
  assert e.value.reason == reason and name in e.value.path


# ------------------------------------------------------------ pipeline core --

def _cfg(*entries):
  return {"sources": [dict(e) for e in entries]}


def test_captioned_batches(data_dir):
  it = make_train_iterator(_cfg({"kind": "captioned", "path": str(data_dir / "good.csv")}),
                           global_batch_size=4, frames=8, resolution=RES, seed=0)
  for _ in range(3):
    batch = next(it)
    assert batch["video"].shape == (4, 8, RES, RES, 3) and batch["video"].dtype == np.float32
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
    assert batch["video"].min() < -0.9 and batch["video"].max() > 0.9
    assert batch["caption"].shape == (4,) and all(c.startswith("video number") for c in batch["caption"])
    assert batch["skipped"].shape == (4, len(SKIP_REASONS)) and batch["skipped"].sum() == 0
    for clip in batch["video"]:  # consecutive native frames
      assert np.all(np.diff(frame_indices(clip)) == 1)
  _close(it)


def test_checkpoint_restore_same_next_batch(data_dir):
  cfg = _cfg({"kind": "captioned", "path": str(data_dir / "good.csv")})
  kw = dict(global_batch_size=2, frames=4, resolution=RES, seed=3)
  it = make_train_iterator(cfg, **kw)
  for _ in range(5):  # past one epoch (8 records) of the sampler
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  restored = make_train_iterator(cfg, **kw)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["video"], want["video"])
    np.testing.assert_array_equal(got["caption"], want["caption"])
  _close(it)
  _close(restored)


def test_two_hosts_disjoint(data_dir):
  cfg = _cfg({"kind": "captioned", "path": str(data_dir / "good.csv")})
  seen = []
  for host in range(2):
    it = make_train_iterator(cfg, global_batch_size=4, frames=2, resolution=16, seed=0,
                             process_index=host, process_count=2)
    captions = set()
    for _ in range(4):  # 2 per batch per host, 4 records per host per epoch: two epochs
      batch = next(it)
      assert batch["video"].shape[0] == 2
      captions.update(batch["caption"].tolist())
    seen.append(captions)
    _close(it)
  assert len(seen[0]) == 4 and len(seen[1]) == 4
  assert not seen[0] & seen[1]


def test_mixing_ratios(tmp_path):
  for name in ("a", "b"):
    Image.fromarray(np.full((20, 24, 3), 100, np.uint8)).save(tmp_path / f"{name}.png")
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      for n in range(7 if name == "a" else 3):
        f.write(json.dumps({"image": f"{name}.png", "caption": f"{name}{n}"}) + "\n")
  cfg = _cfg({"kind": "images", "path": str(tmp_path / "a.jsonl"), "weight": 1.0},
             {"kind": "images", "path": str(tmp_path / "b.jsonl"), "weight": 3.0})
  it = make_train_iterator(cfg, global_batch_size=50, frames=2, resolution=8, seed=0)
  ids = np.concatenate([next(it)["source_id"] for _ in range(8)])
  _close(it)
  # Shuffled but a fixed interleaving: far tighter than the binomial std (0.015).
  assert abs(np.mean(ids == 1) - 0.75) < 0.05, np.mean(ids == 1)
  m = pipeline.Mixture([7, 3], [1.0, 3.0])
  picks = np.array([m[g] for g in range(4000)])
  assert abs(np.mean(picks[:, 0] == 1) - 0.75) < 1e-3
  assert set(picks[picks[:, 0] == 0, 1]) == set(range(7))


def test_bad_records_skipped_and_counted(data_dir, tmp_path):
  with open(tmp_path / "mixed.jsonl", "w") as f:
    rows = [("v0.mp4", "ok zero"), ("empty.mp4", "e"), ("garbage.mp4", "g"), ("truncated.mp4", "t"),
            ("short.mp4", "s"), ("nothere.mp4", "m"), ("v1.mp4", ""), ("v2.mp4", 42),
            ("v3.mp4", "ok three")]
    for path, caption in rows:
      f.write(json.dumps({"video": str(data_dir / path), "caption": caption}) + "\n")
  STATS.reset()
  it = make_train_iterator(_cfg({"kind": "captioned", "path": str(tmp_path / "mixed.jsonl")}),
                           global_batch_size=3, frames=8, resolution=RES, seed=0)
  total = dict.fromkeys(SKIP_REASONS, 0)
  for _ in range(6):
    batch = next(it)
    assert batch["video"].shape == (3, 8, RES, RES, 3)
    assert set(batch["caption"].tolist()) <= {"ok zero", "ok three"}
    for k, v in skipped_counts(batch).items():
      total[k] += v
  _close(it)
  assert all(total[r] > 0 for r in SKIP_REASONS), total
  assert STATS.counts() == {r: c for r, c in total.items() if c}


# ----------------------------------------------------------- start errors --

def test_manifest_errors(data_dir, tmp_path):
  (tmp_path / "nocap.csv").write_text("video,text_x\nv0.mp4,hello\n")
  with pytest.raises(ValueError, match="no 'caption' column"):
    sources.VideoManifestSource(str(tmp_path / "nocap.csv"), 8, RES)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.VideoManifestSource(str(tmp_path / "nothere.csv"), 8, RES)
  (tmp_path / "wrongroot.csv").write_text("video,caption\nv0.mp4,a\nv1.mp4,b\n")
  with pytest.raises(FileNotFoundError, match="root"):
    sources.VideoManifestSource(str(tmp_path / "wrongroot.csv"), 8, RES)
  # The same manifest with the right root works.
  src = sources.VideoManifestSource(str(tmp_path / "wrongroot.csv"), 8, RES, root=str(data_dir))
  assert len(src) == 2
  with pytest.raises(ValueError, match="Unknown data source kind"):
    make_train_iterator(_cfg({"kind": "webvid", "path": "x"}), global_batch_size=1, frames=8,
                        resolution=RES, seed=0)
  with pytest.raises(ValueError, match="weights must be positive"):
    pipeline.Mixture([3, 3], [1.0, 0.0])


# ------------------------------------------------------------- other kinds --

def test_readable_label():
  assert sources.readable_label("ApplyEyeMakeup") == "apply eye makeup"
  assert sources.readable_label("playing_guitar") == "playing guitar"
  assert sources.readable_label("YoYo") == "yo yo"
  assert sources.readable_label("riding a bike") == "riding a bike"
  assert sources.readable_label("BMXTricks") == "BMX tricks"
  assert sources.readable_label("push-up__fast") == "push up fast"


def test_class_folders_and_templates(data_dir, tmp_path):
  for cls, n in (("ApplyEyeMakeup", 1), ("playing_guitar", 2), ("TaiChi", 3)):
    (tmp_path / cls).mkdir()
    os.symlink(data_dir / f"v{n}.mp4", tmp_path / cls / f"{cls}_{n}.mp4")
  (tmp_path / "TaiChi" / "notes.txt").write_text("not a video")
  src = sources.ClassFolderSource(str(tmp_path), 4, RES, templates=["a person {label}", "{label}!"],
                                  label_map={"TaiChi": "practising tai chi"})
  assert len(src) == 3
  rng = np.random.default_rng(0)
  captions = {src.load(i, rng)["caption"] for i in range(3) for _ in range(8)}
  labels = ["apply eye makeup", "playing guitar", "practising tai chi"]
  assert captions == {t.format(label=l) for l in labels for t in ("a person {label}", "{label}!")}
  (tmp_path / "trainlist.txt").write_text("TaiChi/TaiChi_3.mp4 3\nplaying_guitar/playing_guitar_2.mp4 2\n")
  split = sources.ClassFolderSource(str(tmp_path), 4, RES, split_file="trainlist.txt")
  assert len(split) == 2 and [split.class_names[t] for t in split.targets] == ["TaiChi", "playing_guitar"]
  with pytest.raises(ValueError, match="placeholder"):
    sources.ClassFolderSource(str(tmp_path), 4, RES, templates=["a person"])
  with pytest.raises(FileNotFoundError, match="not a folder"):
    sources.ClassFolderSource(str(tmp_path / "nope"), 4, RES)


def test_segments_window(data_dir, tmp_path):
  with open(tmp_path / "seg.jsonl", "w") as f:
    f.write(json.dumps({"video": "v3.mp4", "start": 0.4, "end": 1.0, "caption": "first"}) + "\n")
    f.write(json.dumps({"video": "v3.mp4", "start": 1.6, "end": 2.4, "caption": "second"}) + "\n")
  src = sources.segments_source(str(tmp_path / "seg.jsonl"), 6, RES, root=str(data_dir))
  rng = np.random.default_rng(0)
  for _ in range(4):
    first, second = frame_indices(src.load(0, rng)["video"]), frame_indices(src.load(1, rng)["video"])
    assert 10 <= first[0] and first[-1] < 25, first
    assert 40 <= second[0] and second[-1] < 60, second
  (tmp_path / "noend.jsonl").write_text(json.dumps({"video": "v3.mp4", "start": 0, "caption": "x"}))
  with pytest.raises(ValueError, match="'end' is required"):
    sources.segments_source(str(tmp_path / "noend.jsonl"), 6, RES, root=str(data_dir))


@pytest.mark.parametrize("seed", range(20))
def test_zoom_pan_geometry(seed):
  w, h = 120, 80
  boxes = pseudo_video.zoom_pan_boxes(w, h, 16, np.random.default_rng(seed), min_scale=0.4)
  np.testing.assert_array_equal(
      boxes, pseudo_video.zoom_pan_boxes(w, h, 16, np.random.default_rng(seed), min_scale=0.4))
  assert boxes.shape == (16, 4)
  np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # square
  assert np.all(boxes[:, :2] >= -1e-9) and np.all(boxes[:, 2] <= w + 1e-9)
  assert np.all(boxes[:, 3] <= h + 1e-9)
  assert np.all(boxes[:, 2] - boxes[:, 0] >= 0.4 * h - 1e-9)
  for c in range(4):  # every coordinate moves one way only
    d = np.diff(boxes[:, c])
    assert np.all(d >= -1e-9) or np.all(d <= 1e-9)
  # Smooth: eased, so the first and last steps are the smallest.
  step = np.abs(np.diff(boxes, axis=0)).sum(1)
  assert step[0] <= step[len(step) // 2] + 1e-9 and step[-1] <= step[len(step) // 2] + 1e-9


def test_pseudo_video_follows_boxes():
  # Red encodes x and green encodes y, so a frame's centre pixel says where its box is.
  w, h = 1000, 700
  xs, ys = np.meshgrid(np.arange(w), np.arange(h))
  img = np.stack([xs * 255 / (w - 1), ys * 255 / (h - 1), np.zeros_like(xs)], -1).astype(np.uint8)
  video = pseudo_video.image_to_video(Image.fromarray(img), 12, 16, np.random.default_rng(5))
  assert video.shape == (12, 16, 16, 3) and video.dtype == np.uint8
  centre = video[:, 7:9, 7:9, :2].astype(float).mean((1, 2))
  extent = video[:, 8, -1, 0].astype(float) - video[:, 8, 0, 0]
  for series in (centre[:, 0], centre[:, 1], extent):
    d = np.diff(series)
    assert np.all(d >= -2) or np.all(d <= 2), series  # monotone up to rounding
  assert extent.min() >= 0.5 * 700 / 1000 * 255 * 14 / 16 - 3  # boxes at least min_scale


def test_image_source_bad_inputs(tmp_path):
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  with open(tmp_path / "im.jsonl", "w") as f:
    for image, caption in (("ok.png", "fine"), ("gone.png", "x"), ("broken.png", "y"),
                           ("ok.png", None), ("ok.png", "   ")):
      f.write(json.dumps({"image": image, "caption": caption}) + "\n")
  Image.fromarray(np.full((900, 1200, 3), 77, np.uint8)).save(tmp_path / "big.jpg")
  (tmp_path / "big.jsonl").write_text(json.dumps({"image": "big.jpg", "caption": "big"}) + "\n")
  big = sources.ImageTextSource(str(tmp_path / "big.jsonl"), 4, 16).load(0, np.random.default_rng(0))
  assert big["video"].shape == (4, 16, 16, 3) and abs(big["video"].astype(float).mean() - 77) < 3
  src = sources.ImageTextSource(str(tmp_path / "im.jsonl"), 4, 16)
  rng = np.random.default_rng(0)
  assert src.load(0, rng)["video"].shape == (4, 16, 16, 3)
  reasons = []
  for i in range(1, 5):
    with pytest.raises(SkipRecord) as e:
      src.load(i, rng)
    reasons.append(e.value.reason)
  assert reasons == ["missing_file", "unreadable", "bad_caption", "bad_caption"]


# ------------------------------------------------- workers, tokenizer, kinds --

def hash_tokenize(captions):
  """A deterministic stand-in tokenizer (module level: picklable for workers)."""
  ids = np.zeros((len(captions), 77), np.int32)
  for i, c in enumerate(captions):
    words = [sum(map(ord, w)) % 49000 + 1 for w in c.split()][:77]
    ids[i, :len(words)] = words
  return ids


def test_worker_processes_and_tokenizer(data_dir):
  cfg = _cfg({"kind": "captioned", "path": str(data_dir / "good.csv")})
  kw = dict(global_batch_size=2, frames=4, resolution=RES, seed=1, worker_count=1,
            tokenize_fn=hash_tokenize)
  it = make_train_iterator(cfg, **kw)
  batch = next(it)
  assert batch["video"].shape == (2, 4, RES, RES, 3)
  assert batch["input_ids"].shape == (2, 77) and batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["input_ids"], hash_tokenize(list(batch["caption"])))
  next(it)
  state = it.get_state()
  want = next(it)
  _close(it)
  restored = make_train_iterator(cfg, **kw)
  restored.set_state(state)
  got = next(restored)
  _close(restored)
  np.testing.assert_array_equal(got["video"], want["video"])


def test_synthetic_kind():
  pytest.importorskip("vidrd_jax.data.synthetic", reason="helper G's synthetic source not landed")
  it = make_train_iterator(_cfg({"kind": "synthetic", "num_records": 16, "weight": 1.0}),
                           global_batch_size=4, frames=4, resolution=16, seed=0)
  batch = next(it)
  _close(it)
  assert batch["video"].shape == (4, 4, 16, 16, 3)
  assert batch["video"].min() >= -1 and batch["video"].max() <= 1
  assert all(isinstance(c, str) and c for c in batch["caption"].tolist())


def test_tfds_kind_clear_error_when_not_prepared(tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="tensorflow_datasets is not installed")
  with pytest.raises(ValueError, match="array_record"):
    sources.TfdsVideoSource("ucf101", 8, RES, data_dir=str(tmp_path))


def test_all_kinds_in_one_mix(data_dir, tmp_path):
  (tmp_path / "Skiing").mkdir()
  os.symlink(data_dir / "v4.mp4", tmp_path / "Skiing" / "a.mp4")
  (tmp_path / "seg.jsonl").write_text(json.dumps(
      {"video": str(data_dir / "v5.mp4"), "start": 0.2, "end": 1.8, "caption": "a segment"}) + "\n")
  Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "im.png")
  (tmp_path / "im.jsonl").write_text(json.dumps({"image": "im.png", "caption": "a picture"}) + "\n")
  specs = [{"kind": "captioned", "path": str(data_dir / "good.csv"), "weight": 1.0, "fps": 10},
           {"kind": "classes", "path": str(tmp_path), "weight": 1.0, "templates": ["{label} clip"]},
           {"kind": "segments", "path": str(tmp_path / "seg.jsonl"), "weight": 1.0, "stride": 2},
           {"kind": "images", "path": str(tmp_path / "im.jsonl"), "weight": 1.0}]
  it = make_train_iterator(_cfg(*specs), global_batch_size=8, frames=4, resolution=16, seed=2)
  captions, ids = [], []
  for _ in range(3):
    batch = next(it)
    assert batch["video"].shape == (8, 4, 16, 16, 3) and batch["skipped"].sum() == 0
    captions += batch["caption"].tolist()
    ids += batch["source_id"].tolist()
  _close(it)
  assert set(ids) == {0, 1, 2, 3}
  for c, k in zip(captions, ids):
    assert {0: c.startswith("video number"), 1: c == "skiing clip", 2: c == "a segment",
            3: c == "a picture"}[k], (c, k)
