"""The sampling CLI and generate() on a tiny converted pipeline."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vidrd_jax import sample, video_io
from vidrd_jax.diffusion import long_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_params(module, *example_args, seed=0):
  """Seeded random parameters from shapes alone (no init compile): every leaf non-zero."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *example_args)["params"])

  def fill(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if x.ndim >= 2:
      return noise / np.sqrt(np.prod(x.shape[:-1]))
    return 0.1 * noise + (0.0 if "bias" in jax.tree_util.keystr(path) else 1.0)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny pipeline directory (temporal VAE decoder included), written as conversion writes it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.text_encoder import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # pylint: disable=g-import-not-at-top
  unet_cfg, vae_cfg, text_cfg = UNet3DConfig.tiny(), AutoencoderKLConfig.tiny(temporal=True), CLIPTextConfig.tiny()
  params = {
      "unet": _random_params(UNet3DConditionModel(unet_cfg), jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                             jnp.zeros((1, 77, unet_cfg.cross_attention_dim))),
      "vae": _random_params(AutoencoderKL(vae_cfg), jnp.zeros((1, 2, 16, 16, 3))),
      "text_encoder": _random_params(CLIPTextModel(text_cfg), jnp.zeros((1, 77), jnp.int32)),
  }
  out = str(tmp_path_factory.mktemp("tiny") / "pipeline")
  return pipeline_lib.save_pipeline(out, {
      "unet_config": unet_cfg, "vae_config": vae_cfg, "text_encoder_config": text_cfg, "tokenizer": None,
      "scheduler_config": pipeline_lib.SD2_SCHEDULER_CONFIG, "params": params})


def test_cli_writes_mp4_gif_json(converted, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red ball rolls\n\n# a comment line\nwood on fire\n")
  out_dir = tmp_path / "out"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "vidrd_jax.sample", f"--config={REPO}/configs/sample.py",
         f"--config.checkpoint={converted}", f"--config.prompts_file={prompts}", "--config.prompt=a boat",
         f"--config.output_dir={out_dir}", "--config.num_clips=2", "--config.frames_per_clip=3",
         "--config.overlap=1", "--config.num_steps=2", "--config.height=16", "--config.width=24",
         "--config.fps=4", "--config.guidance_scale=5", "--config.progress=False"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(out_dir))
  stems = ["0000_a_boat", "0001_a_red_ball_rolls", "0002_wood_on_fire"]
  assert names == sorted(s + ext for s in stems for ext in (".gif", ".json", ".mp4"))
  for i, stem in enumerate(stems):
    record = json.loads((out_dir / (stem + ".json")).read_text())
    assert record["index"] == i and record["num_frames"] == 6 and record["frame_size"] == [16, 24]
    s = record["settings"]
    assert (s["num_clips"], s["overlap"], s["num_steps"], s["guidance_scale"], s["seed"]) == (2, 1, 2, 5.0, 0)
    assert s["checkpoint"] == converted and record["timesteps"] == [501, 1]
    gif = video_io.read_video(str(out_dir / (stem + ".gif")))
    mp4 = video_io.read_video(str(out_dir / (stem + ".mp4")))
    assert gif.shape == (6, 16, 24, 3) and mp4.shape == (6, 16, 24, 3)
    # The GIF palette and the MP4 codec are lossy, but both show the same video.
    assert np.abs(gif.astype(int) - mp4.astype(int)).mean() < 40


@pytest.fixture(scope="module")
def pipe(converted):
  from vidrd_jax.pipeline import load_pipeline  # pylint: disable=g-import-not-at-top
  return load_pipeline(converted)


def test_generate_on_pipeline_and_batch_independence(pipe):
  # Two devices: a batch of 2 and a batch of 1 (padded to 2) share one compiled program.
  mesh = long_video.make_data_mesh(jax.devices()[:2])
  kw = dict(num_clips=2, frames_per_clip=3, overlap=1, num_steps=2, height=16, width=24, guidance_scale=5.0,
            mesh=mesh)
  out = long_video.generate(pipe, ["a boat", "a red ball rolls"], **kw)
  assert out.frames.shape == (2, 6, 16, 24, 3) and out.frames.dtype == np.uint8
  assert out.latents.shape == (2, 2, 3, 8, 12, 4)
  # The frames are the decoded latents, clip by clip.
  video = pipe.decode_latents(out.latents[:1].reshape(1, 6, 8, 12, 4), temporal=True, chunk_frames=3)
  np.testing.assert_array_equal(out.frames[:1], video_io.to_uint8(np.asarray(video)))
  # Prompt 1 alone, with its id, gives the same video as in the batch; reference_exact decodes
  # every frame alone (the released pipeline's way), which the temporal VAE makes different.
  alone = long_video.generate(pipe, ["a red ball rolls"], prompt_ids=[1], reference_exact=True, **kw)
  # Not bit-identical: the text encoder and the matmuls see batch 1 vs 2 (other kernel blocking),
  # and CFG (x5) amplifies float32 rounding; seen 1.1e-5 to 1.2e-5 x std with the weights here.
  np.testing.assert_allclose(alone.latents[0], out.latents[1], atol=5e-5 * np.std(out.latents))
  per_frame = pipe.decode_latents(alone.latents.reshape(1, 6, 8, 12, 4), temporal=False, chunk_frames=3)
  np.testing.assert_array_equal(alone.frames, video_io.to_uint8(np.asarray(per_frame)))
  assert np.abs(alone.frames[0].astype(int) - out.frames[1].astype(int)).max() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[]), "prompts is empty"), (dict(height=18), "height=18"), (dict(width=0), "width=0"),
    (dict(overlap=8), "overlap"), (dict(staged_guidance=-0.1), "beta"), (dict(noise_recycle=-2.0), "alpha"),
    (dict(negative_prompt=["x", "y", "z"]), "negative_prompt"),
])
def test_generate_rejects_bad_input(pipe, bad, match):
  kw = dict(prompts=["a", "b"], num_clips=2, frames_per_clip=8, overlap=4, height=16, width=16)
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    long_video.generate(pipe, **kw)


def _config(**kw):
  from configs import sample as sample_config  # pylint: disable=g-import-not-at-top
  config = sample_config.get_config()
  config.update(kw)
  return config


def test_prompt_files(tmp_path):
  f = tmp_path / "p.json"
  f.write_text(json.dumps(["one", " two ", ""]))
  assert sample.load_prompts("zero", str(f)) == ["zero", "one", "two"]
  with pytest.raises(ValueError, match="cannot read prompts_file"):
    sample.load_prompts("", str(tmp_path / "missing.txt"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    sample.load_prompts("", str(bad))
  bad.write_text(json.dumps([1, 2]))
  with pytest.raises(ValueError, match="list of strings"):
    sample.load_prompts("", str(bad))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n# only a comment\n")
  with pytest.raises(ValueError, match="has no prompts"):
    sample.load_prompts("", str(empty))


def test_run_reports_missing_checkpoint_pieces(tmp_path, converted):
  with pytest.raises(FileNotFoundError, match="not found"):
    sample.run(_config(checkpoint=str(tmp_path / "nowhere"), prompt="x"))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "unet").mkdir()
  with pytest.raises(FileNotFoundError, match="lacks: .*vidrd.json.*scheduler"):
    sample.run(_config(checkpoint=str(broken), prompt="x"))
  with pytest.raises(ValueError, match="no prompt given"):
    sample.run(_config(checkpoint=converted))
  with pytest.raises(ValueError, match="overlap"):
    sample.run(_config(checkpoint=converted, prompt="x", overlap=9))


def test_sampling_defaults_to_the_size_a_checkpoint_was_trained_at(pipe, converted, tmp_path):
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  # A converted checkpoint records no training size: the reference's 256x256.
  assert pipe.native_size == pipeline_lib.REFERENCE_SIZE == (256, 256)
  # A vidrd_jax.train export records it (tests/test_train.py checks the export itself).
  trained = pipeline_lib.save_pipeline(str(tmp_path / "trained"), pipe,
                                       info={"trained_on": {"height": 16, "width": 24, "frames": 3}})
  small = pipeline_lib.load_pipeline(trained)
  assert small.native_size == (16, 24)
  kw = dict(num_clips=1, frames_per_clip=3, overlap=1, num_steps=1, guidance_scale=1.0)
  assert long_video.generate(small, ["a boat"], **kw).frames.shape == (1, 3, 16, 24, 3)
  # Explicit sizes still win.
  assert long_video.generate(small, ["a boat"], height=32, width=16, **kw).frames.shape == (1, 3, 32, 16, 3)

  # The CLI's height = width = 0 (its default) means the same, and the sidecar records the size used.
  config = _config(checkpoint=trained, prompt="a boat", output_dir=str(tmp_path / "out"), num_clips=1,
                   frames_per_clip=3, overlap=1, num_steps=1, guidance_scale=1.0, progress=False)
  assert (config.height, config.width) == (0, 0)
  (record,) = sample.run(config)
  assert record["frame_size"] == [16, 24]
  assert (record["settings"]["height"], record["settings"]["width"]) == (16, 24)
  config.height = -16
  with pytest.raises(ValueError, match=r"height=-16 .*\(or 0: the checkpoint.s own size, here 16\)"):
    sample.run(config)
