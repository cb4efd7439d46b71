"""Demo metrics: the analytic detector and the clip-boundary metric (vidrd_jax.eval). Budget: < 15 s."""

import numpy as np
import pytest

from vidrd_jax.data import synthetic
from vidrd_jax.data.synthetic import SyntheticVideoSource
from vidrd_jax.eval import detector, metrics


@pytest.mark.parametrize("frames, resolution, kwargs", [
    (8, 32, {}),
    (32, 32, {}),   # long videos: several wrap-arounds
    (8, 16, {}),
    (8, 32, dict(sizes=("small", "medium", "large", "xlarge"), backgrounds=("black", "gray", "white"))),
    (8, 32, dict(colors=tuple(synthetic.COLORS), shapes=synthetic.SHAPES)),
])
def test_detector_is_exact_on_real_clips(frames, resolution, kwargs):
  src = SyntheticVideoSource(60, frames, resolution, seed=5, split="all", **kwargs)
  result = metrics.detector_accuracy_on_real(src, num=60)
  assert result["num"] == 60
  for attribute in metrics.ATTRIBUTES:
    assert result["accuracy"][attribute] == 1.0, (attribute, result)
  assert result["chance"]["color"] == 1 / len(src.colors)


def test_detector_reads_uint8_and_degraded_videos():
  src = SyntheticVideoSource(60, 8, 32, seed=9, split="all")
  rng = np.random.default_rng(0)
  videos, uint8_videos = [], []
  for i in range(len(src)):
    v = src[i]["video"]
    uint8_videos.append(np.round((v + 1) * 127.5).astype(np.uint8))
    # Blur (three 3x3 box passes) and noise, roughly what a small generator's samples look like.
    for _ in range(3):
      v = (np.roll(v, 1, 1) + v + np.roll(v, -1, 1)) / 3
      v = (np.roll(v, 1, 2) + v + np.roll(v, -1, 2)) / 3
    videos.append(np.clip(v + rng.normal(0, 0.15, v.shape), -1, 1))
  targets = [src.attributes(i) for i in range(len(src))]
  exact = metrics.caption_following(uint8_videos, targets)
  assert all(a == 1.0 for a in exact["accuracy"].values()), exact["accuracy"]
  assert exact["all_correct"] == 1.0
  degraded = metrics.caption_following(videos, targets)
  assert all(a >= 0.9 for a in degraded["accuracy"].values()), degraded["accuracy"]
  # 60 of 60 hits: chance alone (1/4 for colour) essentially never does that.
  assert exact["num"] == 60 and exact["hits"]["color"] == 60
  assert exact["p_at_chance"]["color"] == pytest.approx(0.25**60)
  assert exact["interval95"]["color"][1] == 1.0 and exact["interval95"]["color"][0] > 0.93


def test_accuracy_uncertainty_against_chance():
  # The README's reading of a 6-of-12 direction score: 5 % likely at chance 1/4.
  assert metrics.binomial_tail(6, 12, 0.25) == pytest.approx(0.0544, abs=1e-4)
  assert metrics.binomial_tail(0, 12, 0.25) == pytest.approx(1.0)
  assert metrics.binomial_tail(12, 12, 0.5) == pytest.approx(0.5**12)
  # Against a direct sum of the binomial pmf.
  n, p = 12, 1 / 3
  pmf = [np.prod(range(n - i + 1, n + 1)) / np.prod(range(1, i + 1)) * p**i * (1 - p)**(n - i)
         for i in range(n + 1)]
  for k in range(n + 1):
    assert metrics.binomial_tail(k, n, p) == pytest.approx(sum(pmf[k:]))
  # Wilson 95 % interval: a published value (Newcombe 1998, 81 of 263: 0.2553-0.3662), its
  # symmetry, and that it holds the estimate.
  low, high = metrics.wilson_interval(81, 263)
  assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
  low, high = metrics.wilson_interval(3, 12)
  assert low < 0.25 < high
  assert metrics.wilson_interval(9, 12) == pytest.approx(tuple(1 - x for x in reversed((low, high))))
  with pytest.raises(ValueError, match="0 <= k <= n"):
    metrics.binomial_tail(13, 12, 0.25)
  with pytest.raises(ValueError, match="n > 0"):
    metrics.wilson_interval(0, 0)


def test_detector_on_blank_and_static_videos():
  blank = np.full((8, 32, 32, 3), -0.9, np.float32)
  d = detector.detect(blank)
  assert d.valid_frames == 0 and d.color is None and d.shape is None and d.direction is None
  static = synthetic.render_video("red", "square", "left", frames=8, resolution=32, speed=0.0)
  d = detector.detect(static)
  assert (d.color, d.shape, d.direction) == ("red", "square", None)
  # Wrong targets score zero.
  result = metrics.caption_following([static], [{"color": "blue", "shape": "circle",
                                                 "direction": "up"}])
  assert result["accuracy"] == {"color": 0.0, "shape": 0.0, "direction": 0.0}


def test_detector_measures_velocity_through_wraparound():
  video = synthetic.render_video("blue", "triangle", "up", frames=12, resolution=32, speed=0.1,
                                 x0=0.5, y0=0.1)  # leaves the top edge at once
  d = detector.detect(video)
  assert d.direction == "up" and d.shape == "triangle"
  np.testing.assert_allclose(d.velocity, (0.0, -3.2), atol=0.15)


def _long(attrs, frames, x0, y0):
  return synthetic.render_video(attrs[0], attrs[1], attrs[2], frames=frames, resolution=32,
                                speed=0.06, x0=x0, y0=y0)


def test_boundary_ratio_is_one_for_continuous_motion():
  # One long render cut into four 8-frame clips: the seams are ordinary frames.
  video = _long(("green", "circle", "right"), 32, 0.1, 0.5)
  stats = metrics.boundary_stats(video, clip_frames=8)
  assert stats["inside_change"] > 0
  assert abs(stats["ratio"] - 1.0) < 0.05, stats
  # Clips that continue each other exactly also give 1.0 (here rendered separately).
  clips = [_long(("green", "circle", "right"), 8, 0.1 + 8 * 0.06 * k, 0.5) for k in range(4)]
  assert abs(metrics.boundary_ratio(np.concatenate(clips), 8) - 1.0) < 0.05


def test_boundary_ratio_detects_jumps():
  rng = np.random.default_rng(0)
  # Independent clips: the same caption but a new start position per clip.
  batch = np.stack([
      np.concatenate([_long(("red", "square", "left"), 8, rng.uniform(), rng.uniform())
                      for _ in range(4)])
      for _ in range(3)])
  assert batch.shape == (3, 32, 32, 32, 3)
  ratio = metrics.boundary_ratio(batch, clip_frames=8)
  assert ratio > 2.5, ratio
  # A hard cut to a different scene at the one boundary of a two-clip video.
  cut = np.concatenate([_long(("red", "square", "left"), 8, 0.5, 0.5),
                        np.ones((8, 32, 32, 3), np.float32)])
  assert metrics.boundary_ratio(cut, 8) > 100


@pytest.mark.parametrize("shape, clip_frames", [((30, 8, 8, 3), 8), ((8, 8, 8, 3), 8),
                                                ((16, 8, 8), 8), ((16, 8, 8, 3), 1)])
def test_boundary_bad_input(shape, clip_frames):
  with pytest.raises(ValueError):
    metrics.boundary_ratio(np.zeros(shape, np.float32), clip_frames)


def test_detector_bad_input():
  with pytest.raises(ValueError, match="F, H, W, 3"):
    detector.detect(np.zeros((8, 32, 32), np.float32))
  with pytest.raises(ValueError, match="purple"):
    detector.detect(np.zeros((2, 16, 16, 3), np.float32), colors=("purple",))
  with pytest.raises(ValueError, match="targets"):
    metrics.caption_following([np.zeros((2, 16, 16, 3))], [])


# ------------------------------------------------------------------ the demo's own helpers
# (The full demo trains for minutes; its --quick smoke run needs ~3 CPU-minutes of compiling,
# over this file's budget, so it is exercised by bench/bench_demo.py --quick instead.)


def test_demo_prompts_are_held_out(tmp_path):
  from vidrd_jax import demo
  config = demo.load_config(demo.DEFAULT_CONFIG, quick=False)
  options = demo.synthetic_options(config)
  targets, source = demo.heldout_targets(config, demo.DemoSettings())
  train = SyntheticVideoSource(10, 8, 32, **options)
  held = {t for t in train.holdout}
  assert len(targets) == len(held) > 0
  for t in targets:
    assert (t["color"], t["shape"], t["direction"]) in held
    assert t["caption"] == source.caption(t)
  # Real renders of the demo's targets are read back exactly by the detector.
  videos = [source.render({**t, "speed": 0.08, "x0": 0.3, "y0": 0.6}, frames=16) for t in targets]
  result = metrics.caption_following(videos, targets, source.colors, source.shapes,
                                     source.directions)
  assert result["all_correct"] == 1.0


def test_demo_loss_curve_and_strip(tmp_path):
  from PIL import Image
  from vidrd_jax import demo
  work = tmp_path / "work"
  work.mkdir()
  # A resumed run logs steps 20..30 twice; an interrupted write leaves a broken last line.
  lines = [f'{{"step": {s}, "loss": {1.0 / s}}}' for s in (10, 20, 30)]
  lines += [f'{{"step": {s}, "loss": {2.0 / s}}}' for s in (20, 30, 40)] + ['{"step": 5']
  (work / "metrics.jsonl").write_text("\n".join(lines))
  steps, losses = demo.read_loss_curve(str(work))
  np.testing.assert_array_equal(steps, [10, 20, 30, 40])
  np.testing.assert_allclose(losses, [0.1, 0.1, 2 / 30, 0.05])
  demo.save_loss_curve(str(tmp_path / "loss.png"), steps, losses)
  assert Image.open(tmp_path / "loss.png").size[0] > 100
  video = np.zeros((16, 32, 32, 3), np.uint8)
  demo.save_strip(str(tmp_path / "strip.png"), "a title", [("a", video), ("b", video)], 8, zoom=2)
  w, h = Image.open(tmp_path / "strip.png").size
  assert w == 150 + 16 * 64 + 2 and h == 18 + 2 * (64 + 4)


def test_demo_unet_starts_with_small_temporal_layers_and_predicts_v():
  from vidrd_jax import demo
  from vidrd_jax.models import text_encoder as text_lib
  from vidrd_jax.models import vae as vae_lib
  config = demo.load_config(demo.DEFAULT_CONFIG, quick=False)
  settings = demo.DemoSettings()
  cfg = demo.unet_config(config, settings, vae_lib.AutoencoderKLConfig.tiny(),
                         text_lib.CLIPTextConfig.tiny())
  # Trained from scratch: the temporal layers' output projections start small, not at zero
  # (tests/test_unet3d_temporal_init.py checks what the option does).
  assert settings.temporal_init_scale > 0
  assert cfg.temporal_init_scale == settings.temporal_init_scale
  assert config.model.prediction_type == "v_prediction"


def test_per_clip_accuracy_tells_reversed_clips():
  # Two-clip videos: clip 0 moves as captioned; clip 1 either continues or plays clip 0
  # backwards (a motion turned back at the seam, as VidRD's reversed overlap can make it).
  targets, forward, turned = [], [], []
  for i, direction in enumerate(synthetic.DEFAULT_DIRECTIONS):
    v = synthetic.render_video("green", "square", direction, frames=16, resolution=32, speed=0.0625,
                               x0=0.3 + 0.1 * i, y0=0.4)
    forward.append(v)
    turned.append(np.concatenate([v[:8], v[:8][::-1]]))
    targets.append({"color": "green", "shape": "square", "direction": direction})
  ok = metrics.per_clip_accuracy(forward, targets, 8)
  assert ok == {"color": [1.0, 1.0], "shape": [1.0, 1.0], "direction": [1.0, 1.0]}
  back = metrics.per_clip_accuracy(turned, targets, 8)
  assert back["direction"] == [1.0, 0.0] and back["color"] == [1.0, 1.0]
  with pytest.raises(ValueError, match="do not split into clips of 6"):
    metrics.per_clip_accuracy(forward, targets, 6)
  with pytest.raises(ValueError, match="clip_frames must be >= 2"):
    metrics.per_clip_accuracy(forward, targets, 1)


def test_demo_summary_prints_what_the_run_measured(capsys):
  """print_summary on a result assembled by the demo's own metric functions from real clips."""
  from vidrd_jax import demo
  source = SyntheticVideoSource(4, 16, 32, seed=3, split="all")
  records = [source[i] for i in range(4)]
  videos = [r["video"] for r in records]
  targets = [r["attributes"] for r in records]
  kw = dict(colors=source.colors, shapes=source.shapes, directions=source.directions)
  following = {}
  for m in ("vidrd", "independent"):
    following[m] = metrics.caption_following(videos, targets, **kw)
    following[m]["per_clip_accuracy"] = metrics.per_clip_accuracy(videos, targets, 8, **kw)
  boundary = {m: metrics.boundary_stats(np.stack(videos), 8)
              for m in ("vidrd", "independent", "real")}
  result = {"num_videos": 4, "caption_following": following, "boundary": boundary,
            "detector_on_real": metrics.detector_accuracy_on_real(source, 4),
            "training": {"image_steps": 800, "image_batch_size": 64, "steps": 500,
                         "global_batch_size": 8, "first_loss": 0.35, "final_loss": 0.12},
            "timing": {"total_s": 700.0}, "cpu_s": 1200.0, "memory": {"peak_rss_bytes": 2**31}}
  result["goals"] = metrics.demo_goals(result)
  demo.print_summary(result)
  out = capsys.readouterr().out
  assert "800 steps of 64 single frames, then 500 steps of 8 clips, clip loss 0.3500 -> 0.1200" in out
  assert "  color        1.000   1.000   0.250   0.700     1.000   4/4" in out
  assert "[pass] end-to-end time (s)" in out
  # A video stage that logged no loss (run() records None) is said so, not a crash.
  result["training"].update(first_loss=None, final_loss=None)
  demo.print_summary(result)
  assert "500 steps of 8 clips, no clip loss logged" in capsys.readouterr().out
