"""Temporal VAE decoder fine-tuning: only the decoder's temporal convs move."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import fixtures
from vidrd_jax import train_lib
from vidrd_jax import train_vae
from vidrd_jax.models import vae as vae_lib
from vidrd_jax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vae_config(**overrides):
  spec = importlib.util.spec_from_file_location("vae_tiny_cpu", os.path.join(ROOT, "configs", "vae_tiny_cpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.frames = 2
  c.data.resolution = 16
  c.global_batch_size = 8
  c.mesh.data = 2
  c.mesh.fsdp = 4
  c.loss.disc_start = 0
  c.loss.disc_channels = 8
  c.loss.disc_layers = 1
  c.progress_bar = False
  c.tensorboard = False
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def test_step_moves_only_decoder_temporal_convs(tmp_path):
  config = vae_config()
  st = train_vae.setup(config, str(tmp_path))
  state = st.init_state()
  before = fixtures.flat_params(jax.device_get(state.params))
  disc_before = fixtures.flat_params(jax.device_get(state.disc_params))
  video = np.random.default_rng(0).uniform(-1, 1, (8, 2, 16, 16, 3)).astype(np.float32)
  batch = sharding.shard_batch({"video": video}, st.mesh)
  # Three steps: the warmup starts at lr 0, and the zero-initialised last conv of each temporal
  # layer blocks the gradient of the layers before it until it has moved once.
  for _ in range(3):
    state, metrics = st.train_step(state, batch, st.init_frozen())
  metrics = jax.device_get(metrics)
  assert metrics["finite"] == 1.0 and metrics["disc_active"] == 1.0
  assert np.isfinite(metrics["kl"]) and metrics["rec_l1"] > 0
  after = fixtures.flat_params(jax.device_get(state.params))
  temporal = [k for k in before if k.startswith("decoder/") and "temp_convs" in k]
  others = [k for k in before if k not in temporal]
  assert temporal and any(k.startswith("encoder/") for k in others)
  for k in others:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  moved = [k for k in temporal if not np.array_equal(after[k], before[k])]
  assert len(moved) == len(temporal), sorted(set(temporal) - set(moved))
  # The discriminator trains too (its own optimizer).
  disc_after = fixtures.flat_params(jax.device_get(state.disc_params))
  assert any(not np.array_equal(disc_after[k], disc_before[k]) for k in disc_before)
  # Optimizer state only for the trainable temporal convs.
  opt_arrays = [p for p, x in fixtures.flat_params(state.opt_state).items() if x.ndim > 0]
  assert len(opt_arrays) == 2 * len(temporal)


def test_zero_initialised_temporal_vae_decodes_like_the_image_vae():
  cfg_t = vae_lib.AutoencoderKLConfig.tiny(temporal=True)
  cfg_i = vae_lib.AutoencoderKLConfig.tiny(temporal=False)
  video = jax.random.uniform(jax.random.PRNGKey(1), (1, 3, 16, 16, 3), minval=-1, maxval=1)
  vae_t, vae_i = vae_lib.AutoencoderKL(cfg_t), vae_lib.AutoencoderKL(cfg_i)
  params_t = sharding.unbox(vae_t.init(jax.random.PRNGKey(0), video)["params"])
  spatial_mask = jax.tree_util.tree_map_with_path(lambda p, _: "temp_" not in train_lib.path_str(p), params_t)
  params_i = train_lib.select(params_t, spatial_mask)
  z = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 8, 8, 4))
  out_t = vae_t.apply({"params": params_t}, z, temporal=True, method="decode")
  out_i = vae_i.apply({"params": params_i}, z, method="decode")
  np.testing.assert_allclose(np.asarray(out_t), np.asarray(out_i), atol=1e-6 * float(jnp.std(out_i)))


def test_bad_vae_configs(tmp_path):
  with pytest.raises(ValueError, match="LPIPS"):
    train_vae.setup(vae_config(**{"loss.lpips_weight": 1.0}), str(tmp_path))
  with pytest.raises(sharding.ShardingError, match="not divisible"):
    train_vae.setup(vae_config(global_batch_size=4), str(tmp_path))
  c = vae_config()
  with c.unlocked():
    c.loss.disc_weigth = 1.0
  with pytest.raises(ValueError, match="unknown config fields: loss.disc_weigth"):
    train_vae.setup(c, str(tmp_path))
