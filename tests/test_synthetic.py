"""The built-in synthetic captioned-video source (vidrd_jax.data.synthetic). Budget: < 5 s."""

import itertools

import grain
import numpy as np
import pytest

from vidrd_jax.data import synthetic
from vidrd_jax.data.synthetic import SyntheticVideoSource


def _torus_centroid(frame: np.ndarray, background: float) -> tuple[float, float]:
  """Centroid (x, y) in pixels of the non-background pixels, by circular mean on the torus."""
  n = frame.shape[0]
  weight = np.abs(frame - (background * 2 - 1)).sum(-1)
  angles = 2 * np.pi * (np.arange(n) + 0.5) / n
  out = []
  for axis in (0, 1):  # x sums over rows, y over columns
    profile = weight.sum(axis)
    angle = np.angle((profile * np.exp(1j * angles)).sum())
    out.append((angle % (2 * np.pi)) * n / (2 * np.pi) - 0.5)
  return out[0], out[1]


def test_record_shape_range_and_caption():
  src = SyntheticVideoSource(num_records=20, frames=8, resolution=32, seed=3)
  assert len(src) == 20
  for i in range(5):
    rec = src[i]
    video, attrs = rec["video"], rec["attributes"]
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.float32
    assert -1.0 <= video.min() and video.max() <= 1.0
    assert rec["caption"] == f"a {attrs['color']} {attrs['shape']} moving {attrs['direction']}"
    # The shape is really there: its pixels carry the caption's colour.
    dist = np.abs(video - (synthetic.BACKGROUNDS[attrs["background"]] * 2 - 1)).sum(-1)
    assert (dist > 0.5).mean() > 0.02
    # Fully covered pixels (anti-aliased edges blend with the background).
    fg = dist > 0.98 * dist.max()
    mean_rgb = (video[fg] + 1) / 2
    np.testing.assert_allclose(mean_rgb.mean(0), synthetic.COLORS[attrs["color"]], atol=0.02)


def test_deterministic_per_seed_and_index():
  a = SyntheticVideoSource(50, 8, 16, seed=1)
  b = SyntheticVideoSource(50, 8, 16, seed=1)
  c = SyntheticVideoSource(50, 8, 16, seed=2)
  # Random access in any order gives the same record.
  for i in (7, 0, 49, 7):
    np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
    assert a[i]["attributes"] == b[i]["attributes"]
  assert any(a[i]["attributes"] != c[i]["attributes"] for i in range(10))
  assert len({a[i]["caption"] for i in range(50)}) > 10


def test_caption_mentions_size_and_background_when_they_vary():
  src = SyntheticVideoSource(10, 4, 16, sizes=("small", "large"), backgrounds=("black", "gray"))
  rec = src[0]
  a = rec["attributes"]
  assert rec["caption"] == (f"a {a['size']} {a['color']} {a['shape']} moving {a['direction']} "
                            f"on a {a['background']} background")


def test_holdout_splits():
  kw = dict(num_records=400, frames=1, resolution=16)
  train = SyntheticVideoSource(**kw, split="train")
  held = SyntheticVideoSource(**kw, split="heldout")
  everything = SyntheticVideoSource(**kw, split="all")
  holdout = set(synthetic.default_holdout(synthetic.DEFAULT_COLORS, synthetic.DEFAULT_SHAPES,
                                          synthetic.DEFAULT_DIRECTIONS))
  assert set(train.holdout) == holdout and 0 < len(holdout) < 48
  seen_train = {tuple(train.attributes(i)[k] for k in ("color", "shape", "direction"))
                for i in range(len(train))}
  seen_held = {tuple(held.attributes(i)[k] for k in ("color", "shape", "direction"))
               for i in range(len(held))}
  assert not seen_train & holdout
  assert seen_held == holdout
  assert len(everything.triples) == 48
  # Every single attribute value, and every (colour, shape) pair, is still seen in training.
  for k, values in ((0, synthetic.DEFAULT_COLORS), (1, synthetic.DEFAULT_SHAPES),
                    (2, synthetic.DEFAULT_DIRECTIONS)):
    assert {t[k] for t in seen_train} == set(values)
  assert {t[:2] for t in seen_train} == set(itertools.product(synthetic.DEFAULT_COLORS,
                                                              synthetic.DEFAULT_SHAPES))
  # An explicit holdout, and an empty one.
  custom = SyntheticVideoSource(**kw, holdout=[("red", "circle", "left")], split="heldout")
  assert custom.triples == (("red", "circle", "left"),)
  assert len(SyntheticVideoSource(**kw, holdout=()).triples) == 48


def test_motion_direction_and_speed():
  for direction, (vx, vy) in synthetic.DIRECTIONS.items():
    video = synthetic.render_video("green", "circle", direction, frames=6, resolution=32,
                                   speed=0.0625, x0=0.3, y0=0.6)
    cents = np.array([_torus_centroid(f, synthetic.BACKGROUNDS["black"]) for f in video])
    step = np.diff(cents, axis=0)
    # Wrap-around correction: displacements live in [-n/2, n/2).
    step = np.mod(step + 16, 32) - 16
    np.testing.assert_allclose(step, np.tile([[vx * 2.0, vy * 2.0]], (5, 1)), atol=0.1)


def test_long_video_continues_across_windows():
  # Wrap-around motion: frames 8..15 of a long render are exactly a fresh clip started where the
  # first 8 frames left off, so any window of a long video is itself a valid clip.
  kw = dict(color="blue", shape="triangle", direction="left", resolution=32, speed=0.07)
  long = synthetic.render_video(**kw, frames=16, x0=0.2, y0=0.4)
  second = synthetic.render_video(**kw, frames=8, x0=0.2 - 8 * 0.07, y0=0.4)
  np.testing.assert_allclose(long[8:], second, atol=1e-5)
  src = SyntheticVideoSource(4, 8, 32)
  attrs = src.attributes(2)
  np.testing.assert_array_equal(src.render(attrs, frames=16)[:8], src[2]["video"])


def test_start_band_puts_the_shape_mid_frame_mid_clip():
  # start_band < 1: the shape crosses the middle of the frame half-way through the clip, so
  # a single frame tells the direction (moving right: on the left early, on the right late).
  frames, n = 9, 32
  # Shapes whose centroid is the centre of their box.
  kw = dict(speed_range=(0.08, 0.08), shapes=("circle", "square"))
  src = SyntheticVideoSource(64, frames, n, start_band=0.25, **kw)
  uniform = SyntheticVideoSource(64, frames, n, **kw)
  for i in range(64):
    attrs, plain = src.attributes(i), uniform.attributes(i)
    # Only the start position along the motion changes; the same draws otherwise.
    assert {k: v for k, v in attrs.items() if k not in ("x0", "y0")} == {
        k: v for k, v in plain.items() if k not in ("x0", "y0")}
    vx, vy = synthetic.DIRECTIONS[attrs["direction"]]
    along, across = ("x0", "y0") if vx else ("y0", "x0")
    assert attrs[across] == plain[across]
    video = src.render(attrs)
    cx, cy = _torus_centroid(video[frames // 2], synthetic.BACKGROUNDS["black"])
    # Pixel i spans [i, i + 1): the centroid's pixel index + 0.5 is the position.
    mid = ((cx if vx else cy) + 0.5) / n
    # Within half the band of the middle (on the torus; 0.01 for the anti-aliased edges).
    assert abs(np.mod(mid, 1.0) - 0.5) <= 0.125 + 0.01
    first = (_torus_centroid(video[0], synthetic.BACKGROUNDS["black"])[0 if vx else 1] + 0.5) / n
    # Frame 0 is on the side the shape comes from: 0.5 - 4 x 0.08 +- 0.125 from the middle.
    assert (vx or vy) * (0.5 - first) > 0.15
  # cross_band: the position across the motion is centred too; along it nothing changes.
  both = SyntheticVideoSource(64, frames, n, start_band=0.25, cross_band=0.5, **kw)
  for i in range(64):
    attrs = both.attributes(i)
    along, across = ("x0", "y0") if synthetic.DIRECTIONS[attrs["direction"]][0] else ("y0", "x0")
    assert attrs[along] == src.attributes(i)[along]
    assert abs(attrs[across] - 0.5) <= 0.25


def test_grain_pipeline_reads_the_source():
  src = SyntheticVideoSource(16, 4, 16)
  ds = grain.MapDataset.source(src).shuffle(seed=0).map(lambda r: r["video"]).batch(4)
  batch = ds[0]
  assert batch.shape == (4, 4, 16, 16, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_records=0), "num_records"),
    (dict(resolution=4), "resolution"),
    (dict(split="test"), "split"),
    (dict(colors=("red", "purple")), "purple"),
    (dict(holdout=[("red", "hexagon", "left")]), "holdout"),
    (dict(start_band=0.0), "start_band"),
    (dict(start_band=1.5), "start_band"),
    (dict(cross_band=-0.1), "cross_band"),
    (dict(colors=("red",), shapes=("circle",), directions=("left",), split="train"),
     "no .* combinations"),
])
def test_bad_arguments(kwargs, match):
  args = dict(num_records=4, frames=2, resolution=16)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    SyntheticVideoSource(**args)
  with pytest.raises(IndexError):
    SyntheticVideoSource(4, 2, 16)[4]
