"""Train step on the tiny models: sharded == single device, frozen selection, resume, overfit."""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vidrd_jax import pipeline
from vidrd_jax import metrics as metrics_lib
from vidrd_jax import train
from vidrd_jax import train_config
from tests import fixtures
from vidrd_jax import train_lib
from vidrd_jax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """tiny_cpu shrunk further for tests: 2 frames of 16x16 (8x8 latents), batch 8."""
  c = load_config("tiny_cpu")
  c.data.frames = 2
  c.data.resolution = 16
  c.global_batch_size = 8
  c.mesh.data = 2
  c.mesh.fsdp = 4
  c.log_every = 1
  c.progress_bar = False
  c.tensorboard = False
  c.export = False
  c.async_checkpointing = True
  c.optimizer.warmup_steps = 2
  c.optimizer.decay_steps = 300
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def one_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def fixed_batch(config, tokenizer):
  it = train.make_data_iterator(config, tokenizer)
  batch = next(it)
  return {k: np.asarray(batch[k]) for k in ("video", "input_ids")}


@pytest.fixture(scope="module")
def paper_setups(tmp_path_factory):
  """The paper's trainable selection on (data=2, fsdp=4) and on one device, and a batch."""
  workdir = str(tmp_path_factory.mktemp("setup"))
  config = tiny_config(trainable="paper")
  # cached_setup: the kill-and-resume and overfit tests below reuse these compiled programs.
  st8 = train.cached_setup(config, workdir)
  st1 = train.cached_setup(config, workdir, mesh=one_mesh())
  batch = fixed_batch(config, st8.components.tokenizer)
  return config, st8, st1, batch


def _run_step(st, batch, steps=1):
  state = st.init_state()
  frozen = st.init_frozen()
  before = jax.device_get(state)
  batch = sharding.shard_batch(batch, st.mesh)
  for _ in range(steps):
    state, metrics = st.train_step(state, batch, frozen)
  return before, state, jax.device_get(metrics)


def test_sharded_step_equals_single_device_step(paper_setups):
  _, st8, st1, batch = paper_setups
  before8, new8, m8 = _run_step(st8, batch)
  before1, new1, m1 = _run_step(st1, batch)
  np.testing.assert_array_equal(fixtures.flat_params(before8.params)["conv_in/kernel"],
                                fixtures.flat_params(before1.params)["conv_in/kernel"])
  # float32: the 8-way run sums gradients in a different order.
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  p8 = fixtures.flat_params(jax.device_get(new8.params))
  p1 = fixtures.flat_params(jax.device_get(new1.params))
  assert p8.keys() == p1.keys()
  for key in p8:
    scale = max(np.abs(p1[key]).max(), 1e-3)
    np.testing.assert_allclose(p8[key], p1[key], atol=1e-5 * scale, rtol=0, err_msg=key)
  # The parameters, their EMA and Adam moments really are split over fsdp.
  specs = {train_lib.path_str(p): x.sharding.spec
           for p, x in jax.tree_util.tree_flatten_with_path(new8.params)[0]}
  sharded = [k for k, s in specs.items() if "fsdp" in jax.tree.leaves(tuple(s))]
  assert len(sharded) > len(specs) // 2, specs
  big = [x for x in jax.tree.leaves(new8.params) if x.size >= 4096]
  assert big and all(x.addressable_shards[0].data.size < x.size for x in big)
  mu = [x for x in jax.tree.leaves(new8.opt_state) if x.ndim >= 2]
  assert mu and sum("fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) for x in mu) > len(mu) // 2


def test_frozen_params_unchanged_and_stateless(paper_setups):
  _, st8, _, batch = paper_setups
  # Three steps: the warmup starts at lr 0, and zero-initialised output layers (temporal
  # attention to_out, last temporal conv) block the gradient of the layers before them until
  # they have moved once.
  before, new, metrics = _run_step(st8, batch, steps=3)
  assert metrics["finite"] == 1.0
  mask = fixtures.flat_params(st8.mask)
  old, cur = fixtures.flat_params(before.params), fixtures.flat_params(jax.device_get(new.params))
  frozen = [k for k, m in mask.items() if not m]
  trainable = [k for k, m in mask.items() if m]
  assert frozen and trainable
  assert all(("temp_" in k) or ("transformer_blocks" in k) for k in trainable)
  assert any(k.startswith("conv_in") for k in frozen)
  for k in frozen:
    np.testing.assert_array_equal(cur[k], old[k], err_msg=k)
  changed = [k for k in trainable if not np.array_equal(cur[k], old[k])]
  assert len(changed) == len(trainable), sorted(set(trainable) - set(changed))
  # No optimizer-state array belongs to a frozen parameter: Adam's mu and nu cover exactly
  # the trainable leaves, everything else is a scalar counter.
  opt_arrays = [(p, x) for p, x in fixtures.flat_params(new.opt_state).items() if x.ndim > 0]
  assert len(opt_arrays) == 2 * len(trainable)
  for path, x in opt_arrays:
    owner = [k for k in trainable if path.endswith("/" + k)]
    assert owner and x.shape == old[owner[0]].shape, path
  # EMA holds the trainable leaves only.
  assert set(fixtures.flat_params(new.ema_params)) == set(trainable)


def test_non_finite_step_is_skipped(paper_setups):
  _, st8, _, batch = paper_setups
  bad = dict(batch, video=np.full_like(batch["video"], np.nan))
  before, new, metrics = _run_step(st8, bad)
  assert metrics["finite"] == 0.0 and metrics["nan_streak"] == 1 and metrics["nan_total"] == 1
  for k, v in fixtures.flat_params(jax.device_get(new.params)).items():
    np.testing.assert_array_equal(v, fixtures.flat_params(before.params)[k], err_msg=k)
  assert int(new.step) == 1


def test_kill_and_resume_matches_uninterrupted_run(paper_setups, tmp_path, monkeypatch):
  config, _, _, _ = paper_setups
  config = config.copy_and_resolve_references()
  config.checkpoint_every = 100
  config.num_steps = 6  # the schedule's length is fixed by optimizer.decay_steps
  config.export = True  # loop-only field: same compiled step
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["step"] == 6 and not full["preempted"]
  config.export = False
  # The export is a pipeline directory holding the EMA weights.
  pipe = pipeline.load_pipeline(str(tmp_path / "full" / "export"))
  # It records the clip size it trained on, which sampling defaults to.
  r = config.data.resolution
  assert pipe.info["trained_on"] == {"height": r, "width": r, "frames": config.data.frames}
  assert pipe.native_size == (r, r)
  ema = train_lib.merge(jax.device_get(full["state"].params), jax.device_get(full["state"].ema_params))
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(jax.device_get(pipe.params["unet"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  resumed_dir = str(tmp_path / "resumed")
  config.preempt_at_step = 3
  first = train.train_and_evaluate(config, resumed_dir)
  assert first["preempted"] and first["step"] == 3
  config.preempt_at_step = -1
  second = train.train_and_evaluate(config, resumed_dir)
  assert second["step"] == 6 and not second["preempted"]

  for a, b in zip(jax.tree.leaves(jax.device_get(full["state"])),
                  jax.tree.leaves(jax.device_get(second["state"]))):
    np.testing.assert_array_equal(a, b)
  losses = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))}
  full_losses, resumed_losses = losses(str(tmp_path / "full")), losses(resumed_dir)
  assert sorted(full_losses) == sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
  # The interrupted run saved at step 3 (preemption) although checkpoint_every is 100.
  assert os.path.isdir(os.path.join(resumed_dir, "checkpoints", "3"))
  assert full_losses == resumed_losses

  # A run restored at its last step compiles nothing, trains nothing and gives the same state.
  def no_compile(self):
    raise AssertionError("compiled a train step with no step left")
  monkeypatch.setattr(train.Setup, "compiled_step", no_compile)
  again = train.train_and_evaluate(config, resumed_dir)
  assert again["step"] == 6 and not again["preempted"]
  for a, b in zip(jax.tree.leaves(jax.device_get(second["state"])),
                  jax.tree.leaves(jax.device_get(again["state"]))):
    np.testing.assert_array_equal(a, b)
  assert losses(resumed_dir) == resumed_losses


def test_overfits_a_fixed_batch(paper_setups):
  # The paper's trainable set (temporal layers + transformer blocks) on one device; random
  # timesteps and noise every step, so the loss is noisy: compare 15-step means.
  _, _, st1, batch = paper_setups
  state, frozen = st1.init_state(), st1.init_frozen()
  step = st1.compiled_step()
  batch = sharding.shard_batch(batch, st1.mesh)
  losses = []
  for _ in range(150):
    state, m = step(state, batch, frozen)
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:15]), np.mean(losses[-15:])
  assert last < 0.6 * first, (first, last)


def test_bad_configs_fail_before_compiling(tmp_path):
  config = tiny_config()
  with config.unlocked():
    config.optimizer.learnig_rate = 1.0
  with pytest.raises(ValueError, match="unknown config fields: optimizer.learnig_rate"):
    train.setup(config, str(tmp_path))
  with pytest.raises(sharding.ShardingError, match="do not divide the 8 available devices"):
    train.setup(tiny_config(**{"mesh.data": 3, "mesh.fsdp": -1}), str(tmp_path))
  with pytest.raises(sharding.ShardingError, match="global batch size 12 is not divisible"):
    train.setup(tiny_config(global_batch_size=12), str(tmp_path))
  with pytest.raises(sharding.ShardingError, match="micro-batch size"):
    train.setup(tiny_config(global_batch_size=8, grad_accum_steps=2), str(tmp_path))
  with pytest.raises(ValueError, match="match no parameter"):
    train.setup(tiny_config(trainable="no_such_layer"), str(tmp_path))
  with pytest.raises(ValueError, match="timestep_sampling must be .* got 'cosine'"):
    train.setup(tiny_config(timestep_sampling="cosine"), str(tmp_path))
  with pytest.raises(ValueError, match="timestep_logit_std must be > 0"):
    train.setup(tiny_config(timestep_logit_std=0.0), str(tmp_path))
  with pytest.raises(ValueError, match=r"model.temp_conv_dropout must be in \[0, 1\), got 1.5"):
    train.setup(tiny_config(**{"model.temp_conv_dropout": 1.5}), str(tmp_path))
  comp = train.build_components(tiny_config(**{"model.temp_conv_dropout": 0.0}), str(tmp_path))
  assert comp.unet_config.temp_conv_dropout == 0.0
  with pytest.raises(ValueError, match=r"wrong shape \(1\): a/kernel \(3, 4\) vs model \(3, 5\)"):
    train.check_shapes("UNet", {"a": {"kernel": np.zeros((3, 4))}},
                       {"a": {"kernel": jax.ShapeDtypeStruct((3, 5), jnp.float32)}})
  with pytest.raises(ValueError, match="missing .*b/bias"):
    train.check_shapes("UNet", {"a": {"kernel": np.zeros((3, 4))}},
                       {"a": {"kernel": np.zeros((3, 4))}, "b": {"bias": np.zeros(3)}})


def test_timestep_sampling_densities():
  n, b = 1000, 20000
  rng = jax.random.PRNGKey(3)
  uniform = np.asarray(train_lib.sample_timesteps(rng, b, n, train_lib.StepConfig()))
  # The reference's draw, bit for bit.
  np.testing.assert_array_equal(uniform, np.asarray(jax.random.randint(rng, (b,), 0, n)))
  for mean, std in ((0.0, 1.0), (1.0, 1.0), (-0.5, 2.0)):
    cfg = train_lib.StepConfig(timestep_sampling="logit_normal", timestep_logit_mean=mean,
                               timestep_logit_std=std)
    t = np.asarray(train_lib.sample_timesteps(rng, b, n, cfg))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= n - 1
    # The logit of t / T is N(mean, std): its sample moments, up to the flooring to integers.
    logit = np.log((t + 0.5) / (n - t - 0.5))
    assert abs(np.median(logit) - mean) < 0.05 * std + 0.01, (mean, np.median(logit))
    assert abs(np.std(logit) - std) < 0.05 * std, (std, np.std(logit))
  with pytest.raises(ValueError, match="timestep_sampling must be"):
    train_lib.sample_timesteps(rng, 4, n, train_lib.StepConfig(timestep_sampling="cosine"))


def test_min_snr_weights_match_diffusers_and_count_x0_error_min_snr_times():
  """Min-SNR-gamma: diffusers' train_text_to_image weights, and what they mean for x_0."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.training_utils import compute_snr
  from vidrd_jax.diffusion.schedule import DDIMScheduler
  config = pipeline.ddim_scheduler_config()
  ours = DDIMScheduler.from_config(config)
  ref = diffusers.DDPMScheduler.from_config(config)
  t = np.array([0, 1, 10, 100, 161, 500, 900, 999])
  gamma = 5.0
  snr = compute_snr(ref, torch.from_numpy(t))
  clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
  for kind, expected in (("epsilon", clipped / snr), ("v_prediction", clipped / (snr + 1))):
    got = np.asarray(train_lib.min_snr_weights(ours, jnp.asarray(t), gamma, kind))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    # The weighted squared error of a prediction is min(SNR, gamma) x the squared error of the
    # x_0 that DDIM reads from it.
    rng = np.random.default_rng(0)
    x0, noise, err = (jnp.asarray(rng.standard_normal((len(t), 16)), jnp.float32) for _ in range(3))
    sched = DDIMScheduler.from_config(config, prediction_type=kind)
    xt = sched.add_noise(x0, noise, jnp.asarray(t))
    target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, jnp.asarray(t))
    x0_hat = jax.vmap(lambda p, ti, s: sched.step(p, ti, s, 50).pred_original_sample)(
        target + err, jnp.asarray(t), xt)
    weighted = got * np.mean(np.square(err), axis=1)
    x0_error = np.minimum(snr.numpy(), gamma) * np.mean(np.square(x0_hat - x0), axis=1)
    np.testing.assert_allclose(weighted, x0_error, rtol=2e-3)
  # Zero terminal SNR (its last step has alpha_bar = 0): finite weights, 1 for epsilon, 0 for v.
  zsnr = DDIMScheduler.from_config(config, rescale_betas_zero_snr=True)
  last = jnp.asarray([zsnr.num_train_timesteps - 1])
  assert float(train_lib.min_snr_weights(zsnr, last, gamma, "epsilon")[0]) == 1.0
  assert float(train_lib.min_snr_weights(zsnr, last, gamma, "v_prediction")[0]) == 0.0
  with pytest.raises(ValueError, match="prediction_type must be"):
    train_lib.min_snr_weights(ours, jnp.asarray(t), gamma, "sample")


def test_min_snr_loss_with_a_gamma_above_every_snr_is_the_plain_mse(paper_setups, tmp_path):
  _, _, st1, _ = paper_setups
  state, frozen = st1.init_state(), st1.init_frozen()
  rng = np.random.default_rng(0)
  batch = {"latents": jnp.asarray(rng.standard_normal((4, 2, 8, 8, 4)), jnp.float32),
           "input_ids": jnp.asarray(st1.components.tokenizer(["a red circle moving left"] * 4))}
  plain = dataclasses.replace(st1.step_config, prediction_type="epsilon")
  # Epsilon weights are min(SNR, gamma) / SNR: exactly 1 when gamma exceeds every SNR (~1200),
  # below 1 for every example when gamma is below every SNR (~0.005 at t = 999).
  cfgs = (plain, dataclasses.replace(plain, snr_gamma=1e6), dataclasses.replace(plain, snr_gamma=1e-3))
  losses = jax.jit(lambda p: [train_lib.diffusion_loss(p, st1.components.models, frozen, batch,
                                                       jax.random.PRNGKey(1), c) for c in cfgs])
  unweighted, above, below = (float(x) for x in losses(state.params))
  np.testing.assert_allclose(above, unweighted, rtol=1e-6)
  assert 0 < below < unweighted
  with pytest.raises(ValueError, match="snr_gamma must be >= 0"):
    train.setup(tiny_config(snr_gamma=-1.0), str(tmp_path))


def test_every_config_file_is_complete():
  for name in ("tiny_cpu", "gpu", "tpu_v4", "tpu_v5e"):
    train_config.check_config(load_config(name), train_config.base_config())
  for name in ("vae_tiny_cpu", "vae_tpu_v4"):
    train_config.check_config(load_config(name), train_config.vae_base_config())


def test_step_flops_for_mfu_are_per_device_model_flops(paper_setups):
  """MFU's FLOPs come from the lowered program, split over the mesh, and match XLA's count."""
  _, st8, st1, _ = paper_setups
  f8, f1 = st8.step_flops_per_device(), st1.step_flops_per_device()
  assert f1 and f8
  np.testing.assert_allclose(f8 * st8.mesh.size, f1, rtol=1e-6)
  # On CPU the compiled (optimised) program counts the same convolutions and matmuls.
  compiled = metrics_lib.compiled_flops(st1.compiled_step())
  np.testing.assert_allclose(compiled, f1, rtol=0.1)
