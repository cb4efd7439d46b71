"""Data tools: pack (clips and latents), the packed source, preview, segment captioning.

Budget: ~20 s on 2 CPU cores (the captioning test builds a tiny random
VisionEncoderDecoder model with transformers/torch and saves it locally; no hub).
"""

import gc
import json
import os

import numpy as np
from PIL import Image
import pytest

from vidrd_jax.data import make_train_iterator, pack, packed, preview, sources
from vidrd_jax.data.cli import parse_source_flag
from vidrd_jax.data.video import write_video

RES, FPS = 32, 25


def moving_video(num_frames, seed):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
  return np.stack([np.roll(base, 3 * t, axis=1) for t in range(num_frames)])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tools")
  for n in range(5):
    write_video(str(d / f"v{n}.mp4"), moving_video(40 + 10 * n, n), fps=FPS)
  (d / "empty.mp4").write_bytes(b"")
  write_video(str(d / "short.mp4"), moving_video(3, 9), fps=FPS)
  with open(d / "clips.csv", "w") as f:
    f.write("video,caption\n")
    for n in range(5):
      f.write(f"v{n}.mp4,clip {n}\n")
  with open(d / "mixed.csv", "w") as f:
    f.write("video,caption\nv0.mp4,good zero\nempty.mp4,e\nshort.mp4,s\nmissing.mp4,m\nv1.mp4,\n"
            "v2.mp4,good two\n")
  Image.fromarray(moving_video(1, 7)[0]).save(d / "img.png")
  (d / "images.jsonl").write_text(json.dumps({"image": "img.png", "caption": "an image"}) + "\n")
  return d


def average_pool_encoder(video):
  """A stand-in VAE encoder: [B, F, R, R, 3] -> [B, F, R/8, R/8, 4] by 8x8 means + their norm."""
  b, f, r, _, c = video.shape
  pooled = video.reshape(b, f, r // 8, 8, r // 8, 8, c).mean((3, 5))
  return np.concatenate([pooled, np.linalg.norm(pooled, axis=-1, keepdims=True)], -1)


def test_parse_source_flag():
  assert parse_source_flag("captioned:gs://b/x.csv?fps=8&stride=2") == {
      "kind": "captioned", "path": "gs://b/x.csv", "fps": 8, "stride": 2}
  assert parse_source_flag("classes:/d/ucf?templates=a person {label}|{label}") == {
      "kind": "classes", "path": "/d/ucf", "templates": ["a person {label}", "{label}"]}
  assert parse_source_flag("synthetic:?num_records=4") == {"kind": "synthetic", "num_records": 4}
  with pytest.raises(ValueError, match="KIND:PATH"):
    parse_source_flag("webvid:/x")


def test_pack_clips_roundtrip(data_dir, tmp_path):
  out = str(tmp_path / "packed")
  meta = pack.main([f"--source=captioned:{data_dir / 'clips.csv'}", f"--out={out}", "--frames=6",
                    f"--resolution={RES}", "--num=7", "--shard_size=3", "--batch_size=2"])
  assert meta["num_records"] == 7 and meta["kind"] == "video" and meta["shape"] == [6, RES, RES, 3]
  assert sorted(os.listdir(out)) == ["clips-00000-of-00003.array_record",
                                     "clips-00001-of-00003.array_record",
                                     "clips-00002-of-00003.array_record", "metadata.json"]
  # The packed clips are the loader's clips, bit for bit (uint8 -> [-1, 1] -> uint8 is exact).
  specs = [{"kind": "captioned", "path": str(data_dir / "clips.csv")}]
  srcs, weights, key, shape = pack.pipeline.build_sources(specs, 6, RES)
  loader = pack.pipeline.make_data_loader(srcs, weights, key, shape, batch_size=7, seed=0,
                                          shuffle=False, num_epochs=2, drop_remainder=False)
  expected = next(iter(loader))
  src = packed.PackedSource(out, 6, RES)
  got = [packed.decode_record(src._records[i]) for i in range(7)]  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.stack([g["video"] for g in got]),
                                np.round((expected["video"] + 1) * 127.5).astype(np.uint8))
  assert [g["caption"].item() for g in got] == expected["caption"].tolist()
  # The training loader reads shorter windows of the packed clips.
  it = make_train_iterator({"sources": [{"kind": "packed", "path": out}]}, global_batch_size=4,
                           frames=4, resolution=RES, seed=0)
  batch = next(it)
  del it
  gc.collect()
  assert batch["video"].shape == (4, 4, RES, RES, 3) and batch["video"].dtype == np.float32
  with pytest.raises(ValueError, match="re-pack"):
    packed.PackedSource(out, 4, 64)
  with pytest.raises(ValueError, match="6-frame"):
    packed.PackedSource(out, 8, RES)
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    packed.PackedSource(str(tmp_path), 4, RES)


def test_pack_latents(data_dir, tmp_path):
  out = str(tmp_path / "latents")
  specs = [{"kind": "captioned", "path": str(data_dir / "mixed.csv"), "weight": 2.0},
           {"kind": "images", "path": str(data_dir / "images.jsonl"), "weight": 1.0}]
  meta = pack.pack(specs, out, frames=4, resolution=RES, num_records=6, shard_size=4,
                   encode_fn=average_pool_encoder, latent_dtype="float32", batch_size=3)
  assert meta["kind"] == "latents" and meta["shape"] == [4, RES // 8, RES // 8, 4]
  assert sum(meta["skipped"].values()) > 0  # mixed.csv has bad rows: replaced, counted
  srcs, weights, key, shape = pack.pipeline.build_sources(specs, 4, RES)
  loader = pack.pipeline.make_data_loader(srcs, weights, key, shape, batch_size=6, seed=0,
                                          shuffle=False, num_epochs=1, drop_remainder=False)
  expected = average_pool_encoder(next(iter(loader))["video"])
  src = packed.PackedSource(out, 4, RES)
  got = np.stack([packed.decode_record(src._records[i])["latents"] for i in range(6)])  # pylint: disable=protected-access
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  it = make_train_iterator({"sources": [{"kind": "packed", "path": out}]}, global_batch_size=2,
                           frames=3, resolution=RES, seed=0)
  batch = next(it)
  del it
  gc.collect()
  assert batch["latents"].shape == (2, 3, RES // 8, RES // 8, 4) and "video" not in batch
  with pytest.raises(ValueError, match="Cannot mix"):
    make_train_iterator({"sources": [{"kind": "packed", "path": out},
                                     {"kind": "captioned", "path": str(data_dir / "clips.csv")}]},
                        global_batch_size=2, frames=3, resolution=RES, seed=0)


def test_preview_counts_every_bad_record(data_dir, tmp_path, capsys):
  out = tmp_path / "preview"
  summary = preview.main([f"--source=captioned:{data_dir / 'mixed.csv'}",
                          f"--source=images:{data_dir / 'images.jsonl'}", "--num=16", "--frames=4",
                          "--resolution=16", f"--out={out}"])
  # mixed.csv: 2 good rows and one of each bad kind; images: one good row.
  assert summary == {"samples": 3, "skipped": {"missing_file": 1, "unreadable": 1,
                                               "too_short": 1, "bad_caption": 1}}
  assert json.loads((out / "summary.json").read_text()) == summary
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
  grid = Image.open(out / "preview.png")
  assert grid.width == 4 * 16 and grid.height > 3 * 16
  # --num bounds the samples; the round-robin reads both sources.
  samples, _ = preview.collect([{"kind": "captioned", "path": str(data_dir / "clips.csv")},
                                {"kind": "images", "path": str(data_dir / "images.jsonl")}],
                               num=3, frames=2, resolution=16)
  assert [s["caption"] for s in samples] == ["clip 0", "an image", "clip 1"]


def _tiny_captioner(path):
  """A random ViT + GPT-2 VisionEncoderDecoder with a word-level tokenizer, saved to `path`."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = ["<pad>", "<s>", "</s>", "<unk>", "a", "man", "dog", "runs", "on", "the", "beach"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
  torch.manual_seed(0)
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64),
      transformers.GPT2Config(vocab_size=len(words), n_positions=64, n_embd=32, n_layer=1,
                              n_head=2, bos_token_id=1, eos_token_id=2))
  config.decoder_start_token_id, config.pad_token_id = 1, 0
  model = transformers.VisionEncoderDecoderModel(config=config)
  gen = model.generation_config
  gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = 1, 0, None
  gen.suppress_tokens = [0, 1, 2, 3]  # a random model would otherwise often emit only specials
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
  return set(words[4:])


def test_caption_segments(data_dir, tmp_path, capsys):
  from tools import caption_segments  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "captioner"
  vocabulary = _tiny_captioner(str(model_dir))
  videos = tmp_path / "videos.txt"
  videos.write_text("\n".join(str(data_dir / n) for n in ("v0.mp4", "v4.mp4", "empty.mp4")))
  out = tmp_path / "segments.jsonl"
  summary = caption_segments.main([f"--videos={videos}", f"--model={model_dir}", f"--out={out}",
                                   "--segment_seconds=0.8", "--min_seconds=0.5",
                                   "--max_new_tokens=4", "--batch_size=2"])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  # v0: 40 frames = 1.6 s -> [0, .8), [.8, 1.6); v4: 80 frames = 3.2 s -> 4 segments.
  assert summary == {"videos": 3, "segments": 6, "skipped": {"missing_file": 0, "unreadable": 1,
                                                             "too_short": 0, "bad_caption": 0}}
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
  assert [(os.path.basename(r["video"]), r["start"], r["end"]) for r in rows] == [
      ("v0.mp4", 0.0, 0.8), ("v0.mp4", 0.8, 1.6), ("v4.mp4", 0.0, 0.8), ("v4.mp4", 0.8, 1.6),
      ("v4.mp4", 1.6, 2.4), ("v4.mp4", 2.4, 3.2)]
  for r in rows:
    assert r["caption"] and set(r["caption"].split()) <= vocabulary
  # The file is a `segments` source.
  src = sources.segments_source(str(out), 8, RES)
  clip = src.load(5, np.random.default_rng(0))
  assert clip["video"].shape == (8, RES, RES, 3) and clip["caption"] == rows[5]["caption"]
