"""The demo's stages on a random tiny pipeline of its architecture: caption sensitivity
(vidrd_jax.eval.caption_sensitivity) and the packed training latents."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import fixtures
from vidrd_jax.data import synthetic


def _random_demo_vae(settings, res):
  """The demo's tiny VAE with random weights: (config, params)."""
  from vidrd_jax import demo
  from vidrd_jax.models import vae as vae_lib
  vae_cfg = vae_lib.AutoencoderKLConfig.tiny(
      temporal=settings.vae_temporal, norm_num_groups=settings.norm_groups,
      block_out_channels=tuple(settings.vae_channels))
  vae_params = demo.nn_unbox(vae_lib.AutoencoderKL(vae_cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1, res, res, 3)))["params"])
  return dataclasses.replace(vae_cfg, scaling_factor=1.0), vae_params


@pytest.fixture(scope="module")
def pipe_and_clips(tmp_path_factory):
  from vidrd_jax import demo
  from vidrd_jax import pipeline as pipeline_lib
  config = demo.load_config(demo.DEFAULT_CONFIG, quick=True)
  settings = demo.quick_settings()
  res = config.data.resolution
  vae_cfg, vae_params = _random_demo_vae(settings, res)
  out = demo.build_init_pipeline(config, settings, vae_cfg, vae_params,
                                 str(tmp_path_factory.mktemp("sens") / "init"))
  pipe = pipeline_lib.load_pipeline(out)
  source = synthetic.SyntheticVideoSource(6, config.data.frames, res, sizes=["large", "small"])
  records = [source[i] for i in range(len(source))]
  latents = np.asarray(pipe.encode_frames(np.stack([r["video"] for r in records])))
  return pipe, source, records, latents, out, config


def test_a_word_missing_from_the_caption_costs_exactly_nothing(pipe_and_clips):
  from vidrd_jax.eval import caption_sensitivity
  pipe, source, records, latents, _, _ = pipe_and_clips
  # Captions without the size word: swapping the size cannot change anything, to the last bit;
  # the random UNet reads its text, so swapping the colour does change the loss.
  caption = lambda a: synthetic.make_caption(a)
  result = caption_sensitivity.attribute_sensitivity(
      pipe, latents, [r["attributes"] for r in records],
      {"color": source.colors, "size": source.sizes}, caption, timesteps=(200, 900))
  assert result["timesteps"] == [200, 900]
  assert result["swapped_loss"]["size"] == result["loss"]
  assert result["relative_increase"]["size"] == 0.0
  assert abs(result["relative_increase"]["color"]) > 1e-6
  assert all(np.isfinite(result["loss"])) and min(result["loss"]) > 0


def test_denoising_loss_is_deterministic_and_uses_the_pipelines_target(pipe_and_clips):
  from vidrd_jax.eval import caption_sensitivity
  pipe, _, records, latents, _, _ = pipe_and_clips
  captions = [r["caption"] for r in records]
  a = caption_sensitivity.denoising_loss(pipe, latents, captions, (500,), seed=3, batch_size=4)
  b = caption_sensitivity.denoising_loss(pipe, latents, captions, (500,), seed=3, batch_size=6)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # The same number by hand, with the pipeline's v target (the demo trains v-prediction).
  assert pipe.prediction_type == "v_prediction"
  sched = pipe.scheduler
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), 500), latents.shape)
  t = jnp.full((len(latents),), 500)
  pred = pipe.apply_unet(sched.add_noise(latents, noise, t), t, pipe.encode_prompt(captions))
  want = float(jnp.mean(jnp.square(pred - sched.get_velocity(latents, noise, t))))
  np.testing.assert_allclose(a[0], want, rtol=1e-5)


def test_bad_input_names_the_problem(pipe_and_clips):
  from vidrd_jax.eval import caption_sensitivity
  pipe, source, records, latents, _, _ = pipe_and_clips
  attrs = [r["attributes"] for r in records]
  with pytest.raises(ValueError, match="6 clips but 5 captions"):
    caption_sensitivity.denoising_loss(pipe, latents, ["a"] * 5)
  with pytest.raises(ValueError, match="at least two values"):
    caption_sensitivity.attribute_sensitivity(pipe, latents, attrs, {"color": ["red"]},
                                              source.caption)
  with pytest.raises(ValueError, match="'cyan' is not in its vocabulary"):
    caption_sensitivity.attribute_sensitivity(
        pipe, latents, [{**a, "color": "cyan"} for a in attrs], {"color": source.colors},
        source.caption)


def test_demo_packs_training_latents_once(pipe_and_clips, tmp_path):
  from vidrd_jax import demo
  from vidrd_jax.data import packed
  pipe, _, _, _, init_dir, config = pipe_and_clips
  settings = dataclasses.replace(demo.quick_settings(), latent_clips=3)
  out = str(tmp_path / "latents")
  assert demo.pack_latents(config, settings, init_dir, out) == out
  src = packed.PackedSource(out, config.data.frames, config.data.resolution)
  assert len(src) == 3
  record = packed.decode_record(src._records[0])  # pylint: disable=protected-access
  # The first training clip of the config's synthetic source, encoded by the pipeline's VAE.
  spec = dict(config.data.sources[0])
  synth = synthetic.SyntheticVideoSource(
      spec["num_records"], config.data.frames, config.data.resolution, seed=spec.get("seed", 0),
      **demo.synthetic_options(config))
  clip = synth[0]
  assert str(record["caption"]) == clip["caption"]
  want = np.asarray(pipe.encode_frames(clip["video"][None]))[0]
  np.testing.assert_allclose(record["latents"], want, atol=1e-5 * np.abs(want).max())
  # A second call reuses the shards; the training config reads them instead of rendering.
  stamp = (tmp_path / "latents" / packed.METADATA).stat().st_mtime_ns
  demo.pack_latents(config, settings, init_dir, out)
  assert (tmp_path / "latents" / packed.METADATA).stat().st_mtime_ns == stamp
  train_config = demo.on_latents(config, out)
  assert train_config.data.latents and train_config.data.sources == [
      {"kind": "packed", "path": out, "weight": 1.0}]
  assert config.data.sources[0]["kind"] == "synthetic" and not config.data.latents
  # Other data options make other latents: the cached set is not reused for them.
  changed = config.copy_and_resolve_references()
  with changed.unlocked():
    changed.data.sources = [{**dict(config.data.sources[0]), "start_band": 0.5}]
  demo.pack_latents(changed, settings, init_dir, out)
  assert (tmp_path / "latents" / packed.METADATA).stat().st_mtime_ns != stamp
  src = packed.PackedSource(out, config.data.frames, config.data.resolution)
  again = packed.decode_record(src._records[0])  # pylint: disable=protected-access
  assert str(again["caption"]) == clip["caption"]  # same attributes, other start position
  assert np.abs(again["latents"] - record["latents"]).max() > 0.1 * np.abs(want).max()


def test_demo_forgets_training_on_other_latents(tmp_path):
  from vidrd_jax import demo
  latents, train = tmp_path / "latents", tmp_path / "train"
  latents.mkdir()
  (latents / "demo_spec.json").write_text(json.dumps({"sources": [{"start_band": 1.0}]}))
  demo.forget_training_on_other_latents(str(latents), str(train))
  (train / "checkpoints").mkdir()
  # Same latents (a resumed run): the checkpoints stay.
  demo.forget_training_on_other_latents(str(latents), str(train))
  assert (train / "checkpoints").is_dir()
  # Latents encoded again from other data: training starts over.
  (latents / "demo_spec.json").write_text(json.dumps({"sources": [{"start_band": 0.25}]}))
  demo.forget_training_on_other_latents(str(latents), str(train))
  assert not (train / "checkpoints").exists()
  assert json.loads((train / "latents_spec.json").read_text()) == {"sources": [{"start_band": 0.25}]}
  # Same latents but another start point (the image stage's settings changed): over again.
  (train / "checkpoints").mkdir()
  demo.forget_training_on_other_latents(str(latents), str(train), start={"steps": 600})
  assert not (train / "checkpoints").exists()
  (train / "checkpoints").mkdir()
  demo.forget_training_on_other_latents(str(latents), str(train), start={"steps": 600})
  assert (train / "checkpoints").is_dir()
  demo.forget_training_on_other_latents(str(latents), str(train), start={"steps": 800})
  assert not (train / "checkpoints").exists()
  # A training folder from before the marker existed is not trusted either.
  (train / "latents_spec.json").unlink()
  (train / "checkpoints").mkdir()
  demo.forget_training_on_other_latents(str(latents), str(train))
  assert not (train / "checkpoints").exists()


def test_demo_unet_attention_levels():
  from vidrd_jax import demo
  from vidrd_jax.models import text_encoder as text_lib
  from vidrd_jax.models import vae as vae_lib
  config = demo.load_config(demo.DEFAULT_CONFIG, quick=True)
  vae_cfg = vae_lib.AutoencoderKLConfig.tiny(block_out_channels=(32, 32, 64), norm_num_groups=8)
  text_cfg = text_lib.CLIPTextConfig.tiny()
  default = demo.unet_config(config, demo.DemoSettings(), vae_cfg, text_cfg)
  assert default.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
  assert default.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D")
  both = demo.unet_config(config, demo.DemoSettings(unet_attention_levels=2), vae_cfg, text_cfg)
  assert both.down_block_types == ("CrossAttnDownBlock2D",) * 2
  assert both.up_block_types == ("CrossAttnUpBlock2D",) * 2
  with pytest.raises(ValueError, match="unet_attention_levels must be in"):
    demo.unet_config(config, demo.DemoSettings(unet_attention_levels=3), vae_cfg, text_cfg)


def test_demo_init_pipeline_is_reused_only_for_the_same_unet_and_vae(pipe_and_clips, tmp_path):
  from vidrd_jax import demo
  from vidrd_jax.models import text_encoder as text_lib
  pipe, _, _, _, init_dir, config = pipe_and_clips
  settings = demo.quick_settings()
  vae_cfg, vae_params = _random_demo_vae(settings, config.data.resolution)
  text_cfg = text_lib.CLIPTextConfig.tiny()
  same = demo.unet_config(config, settings, vae_cfg, text_cfg)
  wider = demo.unet_config(config, dataclasses.replace(settings, unet_attention_levels=2),
                           vae_cfg, text_cfg)
  assert demo.holds_start_point(init_dir, same, vae_cfg, vae_params)
  # build_init_pipeline would initialise again for any of these:
  assert not demo.holds_start_point(init_dir, wider, vae_cfg, vae_params)
  assert not demo.holds_start_point(str(tmp_path / "nothing"), same, vae_cfg, vae_params)
  # A VAE trained again (other weights, or the same weights with another latent scale).
  retrained = jax.tree.map(lambda x: x + 1e-3, vae_params)
  assert not demo.holds_start_point(init_dir, same, vae_cfg, retrained)
  rescaled = dataclasses.replace(vae_cfg, scaling_factor=2.0)
  assert not demo.holds_start_point(init_dir, same, rescaled, vae_params)
  # Same settings: build_init_pipeline returns the folder as it is.
  stamp = os.path.getmtime(os.path.join(init_dir, "vidrd.json"))
  assert demo.build_init_pipeline(config, settings, vae_cfg, vae_params, init_dir) == init_dir
  assert os.path.getmtime(os.path.join(init_dir, "vidrd.json")) == stamp


def test_demo_image_stage_trains_the_image_model_only(pipe_and_clips, tmp_path):
  """Stage 2a: single frames bypass the temporal layers, so only the spatial UNet learns."""
  from vidrd_jax import demo
  from vidrd_jax import pipeline as pipeline_lib
  _, _, _, _, init_dir, config = pipe_and_clips
  settings = dataclasses.replace(demo.quick_settings(), latent_clips=4, image_steps=3,
                                 image_batch=8)  # 8: the tests' 8 host devices
  latents = demo.pack_latents(config, settings, init_dir, str(tmp_path / "latents"))
  image_cfg = demo.image_config(demo.on_latents(config, latents), settings)
  assert (image_cfg.data.frames, image_cfg.global_batch_size, image_cfg.num_steps) == (1, 8, 3)
  assert config.data.frames == 8  # the video stage's config is untouched
  with image_cfg.unlocked():
    image_cfg.progress_bar = False
  demo.train_unet(image_cfg, init_dir, str(tmp_path / "image"))
  before = pipeline_lib.load_pipeline(init_dir).params["unet"]
  after = pipeline_lib.load_pipeline(str(tmp_path / "image" / "export")).params["unet"]
  flat_before, flat_after = fixtures.flat_params(before), fixtures.flat_params(after)
  assert flat_before.keys() == flat_after.keys()
  temporal = [k for k in flat_before if "temp_" in k]
  spatial = [k for k in flat_before if "temp_" not in k]
  assert temporal and spatial
  for k in temporal:  # zero gradients, no weight decay: only EMA rounding may touch them
    np.testing.assert_allclose(flat_after[k], flat_before[k], rtol=1e-6, atol=1e-7, err_msg=k)
  moved = [k for k in spatial if np.abs(flat_after[k] - flat_before[k]).max() > 1e-5]
  assert len(moved) > 0.9 * len(spatial), sorted(set(spatial) - set(moved))[:10]


def test_demo_vae_is_trained_again_when_its_settings_change(tmp_path):
  from vidrd_jax import demo
  config = demo.load_config(demo.DEFAULT_CONFIG, quick=True)
  settings = dataclasses.replace(demo.quick_settings(), vae_steps=2, vae_batch=2)
  out = str(tmp_path / "vae")
  written = lambda: os.path.getmtime(os.path.join(out, "config.json"))
  _, params, check = demo.train_vae(config, settings, out)
  assert check["spec"] == demo.vae_spec(config, settings, 0)
  stamp = written()
  # Same settings: the trained VAE is read back, not trained again.
  _, again, check_again = demo.train_vae(config, settings, out)
  assert written() == stamp and check_again == check
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
  # Another learning rate: trained again, and the folder says with what.
  changed = dataclasses.replace(settings, vae_learning_rate=2e-3)
  _, retrained, check_changed = demo.train_vae(config, changed, out)
  assert written() != stamp and check_changed["spec"]["learning_rate"] == 2e-3
  assert not all(np.array_equal(a, b)
                 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(retrained)))
  # A folder written before the settings were recorded is not trusted either.
  assert demo.holds_vae(out, check_changed["spec"])
  with open(os.path.join(out, "check.json")) as f:
    old = json.load(f)
  del old["spec"]
  with open(os.path.join(out, "check.json"), "w") as f:
    json.dump(old, f)
  assert not demo.holds_vae(out, check_changed["spec"])
  assert not demo.holds_vae(str(tmp_path / "nothing"), check_changed["spec"])
