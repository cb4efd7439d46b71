"""Long-video sampler: FNR / PNS / DSG invariants, scan vs loop, determinism, devices, compiles."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidrd_jax.diffusion import long_video as lv
from vidrd_jax.diffusion.schedule import DDIMScheduler

SD21 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1}
SCHED = DDIMScheduler.from_config(SD21)
B, N, H, W, C, L, D = 3, 6, 4, 4, 4, 5, 8
S = 8


def toy_eps(params, x, t, ctx):
  """A small analytic denoiser that couples frames (so DSG matters) and reads text and time."""
  mix = jnp.mean(x, axis=1, keepdims=True)
  prev = jnp.roll(x, 1, axis=1)
  c = jnp.mean(ctx, axis=(1, 2))[:, None, None, None, None]
  tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None, None]
  return jnp.tanh(params["w"] * x + params["u"] * mix + params["v"] * prev + c + tt)


PARAMS = {"w": jnp.float32(0.8), "u": jnp.float32(0.3), "v": jnp.float32(-0.2)}


def assert_close(got, want, tol=1e-5):
  """Max abs error relative to the reference's std (float32 programs sharded differently)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  err = np.max(np.abs(got - want)) / np.std(want)
  assert err <= tol, f"max abs error {err:.2e} x std > {tol:.0e}"


def _text(seed=0, b=B):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((b, L, D)).astype(np.float32), rng.standard_normal((1, L, D)).astype(np.float32)


def _sample(**kw):
  ctx, neg = _text()
  args = dict(latent_shape=(H, W, C), num_clips=3, frames_per_clip=N, overlap=3, noise_recycle=2.0,
              staged_guidance_strength=0.5, num_steps=S, guidance_scale=5.0, seed=0)
  args.update(kw)
  return lv.sample_long_video(toy_eps, PARAMS, SCHED, ctx, neg, **args)


def test_dsg_schedule_matches_formula():
  mask = lv.staged_guidance_schedule(50, 4, 0.4)
  # Frame j is guided for ceil((M - j) * S / M * beta) steps: 20, 15, 10, 5.
  np.testing.assert_array_equal(mask.sum(0), [20, 15, 10, 5])
  assert mask[:20, 0].all() and not mask[20:, 0].any()
  assert not lv.staged_guidance_schedule(50, 4, 0.0).any()
  assert lv.staged_guidance_schedule(50, 4, 1.0)[:, 0].all()


def test_noise_fnr_pns():
  out = _sample(noise_recycle=2.0)
  z = np.asarray(out.initial_noise)
  m = 3
  for i in range(1, 3):
    # FNR: frames j < M reuse the previous clip's noise reversed.
    np.testing.assert_array_equal(z[:, i, :m], z[:, i - 1, ::-1][:, :m])
    # PNS: the rest is correlated with the reversed past by alpha/sqrt(1+alpha^2) = 0.894.
    rest = z[:, i, m:] - 2 / np.sqrt(5) * z[:, i - 1, ::-1][:, m:]
    assert 0.25 < np.std(rest) < 0.65  # 1/sqrt(5) = 0.447, on few samples


def test_alpha_zero_is_fresh_noise():
  rng = np.random.default_rng(3)
  clip_noise = rng.standard_normal((B, 2, N, H, W, C)).astype(np.float32)
  out = _sample(noise_recycle=0.0, clip_noise=clip_noise)
  z = np.asarray(out.initial_noise)
  np.testing.assert_array_equal(z[:, 1:, 3:], clip_noise[:, :, 3:])
  np.testing.assert_array_equal(z[:, 1, :3], z[:, 0, ::-1][:, :3])


def test_no_overlap_makes_independent_clips():
  rng = np.random.default_rng(6)
  clip_noise = rng.standard_normal((B, 2, N, H, W, C)).astype(np.float32)
  out = _sample(overlap=0, noise_recycle=0.0, staged_guidance_strength=1.0, clip_noise=clip_noise)
  np.testing.assert_array_equal(out.initial_noise[:, 1:], clip_noise)
  ctx, neg = _text()
  assert_close(out.latents[:, 2], _plain_ddim(jnp.asarray(clip_noise[:, 1]), jnp.asarray(ctx), jnp.asarray(neg)))


def test_supplied_noise_is_used_and_scaled():
  rng = np.random.default_rng(4)
  init = rng.standard_normal((B, N, H, W, C)).astype(np.float32)
  clip_noise = rng.standard_normal((B, 2, N, H, W, C)).astype(np.float32)
  out = _sample(noise_recycle=4.0, init_latents=init, clip_noise=clip_noise)
  z = np.asarray(out.initial_noise)
  np.testing.assert_array_equal(z[:, 0], init)
  expect = 4 / np.sqrt(17) * init[:, ::-1][:, 3:] + clip_noise[:, 0, 3:] * np.float32(1 / np.sqrt(17))
  assert_close(z[:, 1, 3:], expect)


def _plain_ddim(z_t, ctx, neg, guidance=5.0):
  sampler = lv.ClipSampler(toy_eps, SCHED, S, use_cfg=True)
  pair = jnp.stack([jnp.broadcast_to(neg, ctx.shape), ctx], 1)
  keys = jax.random.split(jax.random.key(0), z_t.shape[0])
  return lv.denoise_clip(sampler, PARAMS, z_t, pair, 5.0, 0.0, jnp.zeros((S, z_t.shape[0], 0, H, W, C)),
                         jnp.zeros((S, 0), bool), keys, 0).latents


def test_beta_zero_is_plain_ddim_for_every_clip():
  out = _sample(staged_guidance_strength=0.0)
  ctx, neg = _text()
  for i in range(3):
    ref = _plain_ddim(out.initial_noise[:, i], jnp.asarray(ctx), jnp.asarray(neg))
    assert_close(out.latents[:, i], ref)
  # With DSG on, later clips differ from plain DDIM, the first does not.
  guided = _sample(staged_guidance_strength=0.5)
  np.testing.assert_array_equal(guided.latents[:, 0], out.latents[:, 0])
  assert not np.allclose(guided.latents[:, 1], out.latents[:, 1], atol=1e-3)


def test_beta_one_frame_zero_follows_previous_last_frame():
  m = 2
  out = _sample(overlap=m, staged_guidance_strength=1.0, record_frames=N)
  traj = np.asarray(out.trajectories)  # [B, K, S, N reversed, ...]
  # traj[:, i, s, N-1-j] is frame j of clip i at step s (after DSG).
  for i in range(1, 3):
    for s in range(S):
      np.testing.assert_array_equal(traj[:, i, s, N - 1], traj[:, i - 1, s, 0])  # frame 0 <- frame N-1
      same1 = np.array_equal(traj[:, i, s, N - 2], traj[:, i - 1, s, 1])       # frame 1 <- frame N-2
      assert same1 == (s < S // 2), (i, s)
    # Frames j >= M are never overwritten.
    assert not np.allclose(traj[:, i, S - 1, N - 1 - m], traj[:, i - 1, S - 1, m], atol=1e-4)


def test_scan_equals_python_loop():
  a = _sample(eta=0.5, record_frames=N)
  b = _sample(eta=0.5, record_frames=N, use_scan=False)
  assert_close(a.latents, b.latents)
  assert_close(a.trajectories, b.trajectories)


def test_same_seed_bit_identical_and_seeds_differ():
  a, b, c = _sample(seed=7, eta=0.3), _sample(seed=7, eta=0.3), _sample(seed=8, eta=0.3)
  np.testing.assert_array_equal(a.latents, b.latents)
  assert not np.allclose(a.latents, c.latents)
  # Prompt b's video does not depend on the batch it is sampled in, given its id.
  ctx, neg = _text()
  one = lv.sample_long_video(toy_eps, PARAMS, SCHED, ctx[1:2], neg, latent_shape=(H, W, C), prompt_ids=[1],
                             num_clips=3, frames_per_clip=N, overlap=3, noise_recycle=2.0,
                             staged_guidance_strength=0.5, num_steps=S, guidance_scale=5.0, seed=7, eta=0.3)
  assert_close(one.latents[0], a.latents[1])


def test_devices_agree():
  devs = jax.devices()
  assert len(devs) >= 2
  one = _sample(mesh=lv.make_data_mesh(devs[:1]))
  two = _sample(mesh=lv.make_data_mesh(devs[:2]))  # B = 3 is padded to 4
  assert_close(one.latents, two.latents)
  assert two.latents.shape == (B, 3, N, H, W, C)


def test_one_compile_for_all_clips_and_settings():
  lv.denoise_clip.clear_cache() if hasattr(lv.denoise_clip, "clear_cache") else None
  before = lv.denoise_clip._cache_size()
  _sample(num_clips=4, noise_recycle=1.0, staged_guidance_strength=0.3, guidance_scale=3.0)
  mid = lv.denoise_clip._cache_size()
  _sample(num_clips=2, noise_recycle=3.0, staged_guidance_strength=0.9, guidance_scale=8.0, seed=5)
  assert lv.denoise_clip._cache_size() == mid <= before + 1


def test_progress_reports():
  seen = []
  _sample(progress=lambda clip, done: seen.append((clip, done)), progress_every=1)
  assert sorted(seen) == [(c, s + 1) for c in range(3) for s in range(S)]
  seen.clear()
  _sample(progress=lambda clip, done: seen.append((clip, done)), progress_every=3)
  assert sorted(seen) == [(c, d) for c in range(3) for d in (3, 6, S)]


def test_progressive_noise_forms():
  n = jax.random.normal(jax.random.key(0), (4000, 5, 1, 1, 1))
  ref = np.asarray(lv.progressive_noise(n, 1.0, reference_exact=True))
  pyoco = np.asarray(lv.progressive_noise(n, 1.0, reference_exact=False))
  # PYoCo keeps unit variance; the reference's 1/(1+a^2) std shrinks later frames (var -> 1/3 at a = 1... ).
  assert np.allclose(pyoco.std(0).ravel(), 1.0, atol=0.05)
  np.testing.assert_allclose(ref[:, 1].std(), np.sqrt(0.5 + 0.25), atol=0.05)
  np.testing.assert_array_equal(lv.progressive_noise(n, 0.0), n)
  # Through the sampler: the first clip's frames are correlated, later clips' new frames too (PNS).
  z = np.asarray(_sample(noise_alpha=3.0).initial_noise)
  corr = np.corrcoef(z[:, 0, 0].ravel(), z[:, 0, 1].ravel())[0, 1]
  assert corr > 0.8, corr  # a / sqrt(1 + a^2) / std ratio ~ 0.95


@pytest.mark.parametrize("bad, match", [
    (dict(overlap=6), "overlap"), (dict(overlap=-1), "overlap"), (dict(staged_guidance_strength=1.5), "beta"),
    (dict(noise_recycle=-1.0), "alpha"), (dict(num_clips=0), "num_clips"), (dict(noise_alpha=-0.1), "noise_alpha"),
    (dict(init_latents=np.zeros((B, N, H, W, 3), np.float32)), "init_latents"),
    (dict(clip_noise=np.zeros((B, 3, N, H, W, C), np.float32)), "clip_noise"),
])
def test_bad_arguments(bad, match):
  with pytest.raises(ValueError, match=match):
    _sample(**bad)


def test_training_mesh_shards_over_data_and_fsdp():
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  devs = np.asarray(jax.devices()[:4]).reshape(1, 2, 2)
  mesh = Mesh(devs, ("data", "fsdp", "tensor"))
  assert lv.batch_axes(mesh) == (("data", "fsdp"), 2)
  out = _sample(mesh=mesh, num_clips=2)
  ref = _sample(mesh=lv.make_data_mesh(jax.devices()[:1]), num_clips=2)
  assert_close(out.latents, ref.latents)
