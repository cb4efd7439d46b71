"""The long-video sampler on a tiny converted UNet: against diffusers and a re-implementation
of the reference's per-step loop."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import fixtures
from vidrd_jax.diffusion import long_video as lv
from vidrd_jax.diffusion.schedule import DDIMScheduler
from vidrd_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig
from weight_conversion.unet import unet_from_torch

SCHED_CONFIG = {k: v for k, v in fixtures.SD21_SCHEDULER_CONFIG.items() if not k.startswith("_") and k != "skip_prk_steps"}
SCHED = DDIMScheduler.from_config(SCHED_CONFIG)
LAT = 8  # latent height / width


def rel_err(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.std(want))


@pytest.fixture(scope="module")
def tiny():
  models = fixtures.tiny_torch_models(0)
  cfg = UNet3DConfig.from_diffusers(fixtures.TINY_UNET_CONFIG)
  # The 2D weights as converted; temporal layers as a fresh UNet3D has them (zero-initialised
  # output layers: identity), so each frame goes through exactly the 2D UNet.
  params = jax.tree.map(jnp.asarray, unet_from_torch(fixtures.numpy_state_dict(models.unet), cfg,
                                                     allow_missing_temporal=True))
  return models, cfg, params


def _embeds(n, seed):
  g = torch.Generator().manual_seed(seed)
  return torch.randn((n, 77, fixtures.TINY_UNET_CONFIG["cross_attention_dim"]), generator=g)


def test_first_clip_equals_diffusers_stable_diffusion(tiny, tmp_path):
  # The reference's 3D UNet normalises its GroupNorms over all frames of a clip (GroupNorm on
  # [b, c, f, h, w]), so only a one-frame clip is exactly an SD image; B prompts make a batch.
  import diffusers  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  models, cfg, params = tiny
  b, steps, w = 3, 6, 7.5
  sd = diffusers.StableDiffusionPipeline(
      vae=models.vae, text_encoder=models.text_encoder,
      tokenizer=CLIPTokenizer.from_pretrained(fixtures.write_tokenizer(str(tmp_path / "tok"))),
      unet=models.unet, scheduler=diffusers.DDIMScheduler(**SCHED_CONFIG), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  sd.set_progress_bar_config(disable=True)
  cond, uncond = _embeds(b, 1), _embeds(1, 2)
  x_t = torch.randn((b, 4, LAT, LAT), generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = sd(prompt_embeds=cond, negative_prompt_embeds=uncond.repeat(b, 1, 1), latents=x_t,
             num_inference_steps=steps, guidance_scale=w, height=LAT * sd.vae_scale_factor,
             width=LAT * sd.vae_scale_factor, output_type="latent").images.numpy()
  out = lv.sample_long_video(
      lv.UNetDenoiser(UNet3DConditionModel(cfg)), params, SCHED, cond.numpy(), uncond.numpy(),
      latent_shape=(LAT, LAT, 4), num_clips=1, frames_per_clip=1, overlap=0, num_steps=steps,
      guidance_scale=w, init_latents=x_t.numpy().transpose(0, 2, 3, 1)[:, None])
  got = np.asarray(out.latents)[:, 0, 0].transpose(0, 3, 1, 2)
  err = rel_err(got, ref)
  print(f"first clip vs diffusers StableDiffusionPipeline: {err:.2e} x std")
  assert err < 1e-4


def _reference_loop(eps, scheduler_config, cond, uncond, init, clip_noise, *, k, m, alpha, beta, steps, w):
  """The reference pipeline's clip / step loop, re-written in NumPy from its documented behaviour.

  Layout [B, F, h, w, C] (the reference's frame axis is 2, ours 1). The DDIM step is diffusers'
  DDIMScheduler, which the reference calls.
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  sched = diffusers.DDIMScheduler(**scheduler_config)
  sched.set_timesteps(steps)
  timesteps = sched.timesteps.numpy()
  n = init.shape[1]
  latents = init.copy()
  past = {}  # step -> latents reversed in time, as stored before the UNet call
  clips = []
  for clip in range(k):
    if clip > 0:
      latents[:, :m] = past[0][:, :m]
      more_noise = clip_noise[:, clip - 1] * np.float32(1 / math.sqrt(1 + alpha**2))
      latents[:, m:] = np.float32(alpha / math.sqrt(1 + alpha**2)) * past[0][:, m:] + more_noise[:, m:]
    for i, t in enumerate(timesteps):
      if clip > 0:
        for frm in range(m):
          if i < (m - frm) * (len(timesteps) / m) * beta:
            latents[:, frm] = past[i][:, frm]
      past[i] = latents[:, ::-1].copy()
      model_in = np.concatenate([latents, latents])
      ctx = np.concatenate([uncond, cond])
      out = np.asarray(eps(model_in, np.full((model_in.shape[0],), t, np.int32), ctx))
      out_uncond, out_cond = np.split(out, 2)
      guided = out_uncond + w * (out_cond - out_uncond)
      b = latents.shape[0]
      # The reference steps every frame as an image: [B*F, C, h, w].
      flat = lambda x: torch.from_numpy(np.ascontiguousarray(x.reshape((b * n,) + x.shape[2:]).transpose(0, 3, 1, 2)))
      prev = sched.step(flat(guided), int(t), flat(latents)).prev_sample.numpy()
      latents = prev.transpose(0, 2, 3, 1).reshape(latents.shape)
    clips.append(latents.copy())
  return np.stack(clips, axis=1)


def test_three_clips_equal_reference_loop():
  # The smallest UNet3D with every block kind; every parameter random (the zero-initialised
  # temporal output layers included) so that frames interact.
  cfg = UNet3DConfig.tiny()
  unet = UNet3DConditionModel(cfg)
  rng = np.random.default_rng(5)
  # Shapes only (no compile); kernels N(0, 1/fan_in), 1-D scales 1 + N(0, 0.1^2), biases N(0, 0.1^2).
  shapes = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 2, LAT, LAT, 4)),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, cfg.cross_attention_dim)))
  def fill(path, x):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if x.ndim >= 2:
      return jnp.asarray(noise / np.sqrt(np.prod(x.shape[:-1])))
    return jnp.asarray(0.1 * noise + (0.0 if "bias" in name else 1.0))
  params = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes["params"]))
  b, n, m, k, steps, w, alpha, beta = 2, 5, 3, 3, 6, 6.0, 2.0, 0.7
  d = cfg.cross_attention_dim
  cond = rng.standard_normal((b, 77, d)).astype(np.float32)
  uncond = np.repeat(rng.standard_normal((1, 77, d)).astype(np.float32), b, 0)
  init = rng.standard_normal((b, n, LAT, LAT, 4)).astype(np.float32)
  clip_noise = rng.standard_normal((b, k - 1, n, LAT, LAT, 4)).astype(np.float32)
  apply = jax.jit(lambda x, t, c: unet.apply({"params": params}, x, t, c))
  ref = _reference_loop(apply, SCHED_CONFIG, cond, uncond, init, clip_noise, k=k, m=m, alpha=alpha,
                        beta=beta, steps=steps, w=w)
  out = lv.sample_long_video(
      lv.UNetDenoiser(unet), params, SCHED, cond, uncond, latent_shape=(LAT, LAT, 4), num_clips=k,
      frames_per_clip=n, overlap=m, noise_recycle=alpha, staged_guidance_strength=beta, num_steps=steps,
      guidance_scale=w, init_latents=init, clip_noise=clip_noise)
  errs = [rel_err(np.asarray(out.latents)[:, i], ref[:, i]) for i in range(k)]
  print("K=3 clips vs the reference loop re-implementation: " + ", ".join(f"{e:.2e}" for e in errs) + " x std")
  assert max(errs) < 1e-4
  # The clips really are coupled: without DSG clip 1 differs.
  plain = lv.sample_long_video(
      lv.UNetDenoiser(unet), params, SCHED, cond, uncond, latent_shape=(LAT, LAT, 4), num_clips=2,
      frames_per_clip=n, overlap=m, noise_recycle=alpha, staged_guidance_strength=0.0, num_steps=steps,
      guidance_scale=w, init_latents=init, clip_noise=clip_noise[:, :1])
  assert rel_err(np.asarray(plain.latents)[:, 1], ref[:, 1]) > 1e-2
