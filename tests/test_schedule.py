"""DDIM schedule and step against diffusers' DDIMScheduler (float32)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vidrd_jax.diffusion.schedule import DDIMScheduler

# SD2.1-base's scheduler/scheduler_config.json.
SD21_BASE = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}

CONFIGS = {
    "sd21_base": SD21_BASE,
    "sd21_v": {**SD21_BASE, "prediction_type": "v_prediction"},
    "linear_clip_alpha_one": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                              "clip_sample": True, "set_alpha_to_one": True, "prediction_type": "epsilon"},
    "cosine_sample_trailing": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                               "timestep_spacing": "trailing", "clip_sample": False},
    "zero_snr_v_linspace": {**SD21_BASE, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                            "timestep_spacing": "linspace", "set_alpha_to_one": True},
}


def _pair(name):
  ours = DDIMScheduler.from_config(CONFIGS[name])
  cfg = {k: v for k, v in CONFIGS[name].items() if not k.startswith("_") and k != "skip_prk_steps"}
  theirs = diffusers.DDIMScheduler(**cfg)
  return ours, theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_and_timesteps(name):
  ours, theirs = _pair(name)
  np.testing.assert_allclose(ours.alphas_cumprod(), theirs.alphas_cumprod.numpy(), rtol=2e-6, atol=2e-8)
  for steps in (1, 7, 25, 50, 333, 1000):
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps(steps), theirs.timesteps.numpy())


def test_sd21_timesteps_spelled_out():
  ts = DDIMScheduler.from_config(SD21_BASE).timesteps(50)
  assert ts[0] == 981 and ts[-1] == 1 and np.all(np.diff(ts) == -20)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_matches_diffusers(name, eta):
  ours, theirs = _pair(name)
  steps = 10
  theirs.set_timesteps(steps)
  rng = np.random.default_rng(0)
  shape = (2, 3, 4, 4, 4)
  step = jax.jit(ours.step, static_argnums=(3,))
  for t in theirs.timesteps.numpy():
    sample = rng.standard_normal(shape).astype(np.float32)
    model_output = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    ref = theirs.step(torch.from_numpy(model_output), int(t), torch.from_numpy(sample), eta=eta,
                      variance_noise=torch.from_numpy(noise) if eta > 0 else None)
    # Timestep and eta traced: one program for every step and every eta.
    got = step(jnp.asarray(model_output), jnp.asarray(t, jnp.int32), jnp.asarray(sample), steps,
               jnp.float32(eta), jnp.asarray(noise))
    for a, b in ((got.prev_sample, ref.prev_sample), (got.pred_original_sample, ref.pred_original_sample)):
      b = b.numpy()
      err = np.max(np.abs(np.asarray(a) - b)) / max(np.std(b), 1e-6)
      assert err < 1e-5, (name, eta, int(t), err)


def test_step_key_draws_noise_and_eta_zero_ignores_it():
  sched = DDIMScheduler.from_config(SD21_BASE)
  x = jnp.ones((1, 2, 2, 4))
  out0 = sched.step(x * 0.1, 501, x, 50)
  out0k = sched.step(x * 0.1, 501, x, 50, eta=0.0, key=jax.random.key(0))
  np.testing.assert_array_equal(out0.prev_sample, out0k.prev_sample)
  out1 = sched.step(x * 0.1, 501, x, 50, eta=1.0, key=jax.random.key(0))
  out2 = sched.step(x * 0.1, 501, x, 50, eta=1.0, noise=jax.random.normal(jax.random.key(0), x.shape))
  np.testing.assert_array_equal(out1.prev_sample, out2.prev_sample)
  assert not np.allclose(out1.prev_sample, out0.prev_sample)


def test_forward_process_matches_diffusers():
  ours, theirs = _pair("sd21_v")
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
  eps = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
  t = np.array([0, 500, 999])
  np.testing.assert_allclose(
      ours.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)),
      theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy(), atol=2e-6)
  np.testing.assert_allclose(
      ours.get_velocity(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)),
      theirs.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy(), atol=2e-6)


def test_bad_config_and_arguments():
  with pytest.raises(ValueError, match="prediction_type"):
    DDIMScheduler.from_config({**SD21_BASE, "prediction_type": "flow"})
  with pytest.raises(ValueError, match="beta_schedule"):
    DDIMScheduler.from_config({**SD21_BASE, "beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="does not understand"):
    DDIMScheduler.from_config({**SD21_BASE, "mystery_knob": 3})
  with pytest.raises(ValueError, match="thresholding"):
    DDIMScheduler.from_config({**SD21_BASE, "thresholding": True})
  sched = DDIMScheduler.from_config(SD21_BASE)
  with pytest.raises(ValueError, match="num_steps"):
    sched.timesteps(0)
  with pytest.raises(ValueError, match="eta > 0 needs noise"):
    sched.step(jnp.zeros(3), 1, jnp.zeros(3), 50, eta=0.5)
  # Round trip through the config dict; hashable so it can be a static jit argument.
  assert DDIMScheduler.from_config(sched.to_config()) == sched
  hash(sched)
