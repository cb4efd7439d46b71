r"""VidRD training: UNet3D on video latents, sharded, checkpointed, resumable.

Usage::

  python -m vidrd_jax.train --config=configs/tiny_cpu.py --workdir=/tmp/vidrd_tiny
  python -m vidrd_jax.train --config=configs/tpu_v4.py --workdir=gs://bucket/run1 \
      --config.init_from=gs://bucket/sd21_vidrd_converted --config.num_steps=100000

Every field of the config is overridable with ``--config.<field>=value``; unknown fields are
errors. Re-running with the same ``--workdir`` resumes from its newest good checkpoint
(parameters, EMA, optimizer, data-iterator position and RNG), so the resumed run continues
exactly where the interrupted one stopped.

Outline (big_vision style): mesh from config -> abstract init with ``jax.eval_shape`` ->
shardings from the logical-axis rules -> ``jax.jit(init, out_shardings=...)`` (or load the
start checkpoint straight into those shardings) -> restore -> loop of a jitted step with
in/out shardings and donated state.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vidrd_jax import checkpointing
from vidrd_jax import metrics as metrics_lib
from vidrd_jax import train_config
from vidrd_jax import train_lib
from vidrd_jax.parallel import sharding as sharding_lib

PyTree = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. too many non-finite steps in a row)."""


def _dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


# ----------------------------------------------------------------------------------------------
# Models.

@dataclasses.dataclass
class Components:
  """Everything built from the config before sharding."""
  models: train_lib.Models
  tokenizer: Any
  unet_config: Any
  vae_config: Any
  text_config: Any
  scheduler_config: dict
  # Host-side parameters loaded from init_from (None: random init).
  unet_params: Optional[PyTree]
  vae_params: Optional[PyTree]
  text_params: Optional[PyTree]


def _unet_config(config):
  from vidrd_jax.models import unet3d  # pylint: disable=g-import-not-at-top
  m = config.model
  overrides = dict(dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype),
                   attention_impl=m.attention_impl or None, remat=m.remat,
                   add_temp_conv=m.add_temp_conv, add_temp_embed=m.add_temp_embed,
                   add_temp_attn=m.add_temp_attn, temp_conv_dropout=float(m.temp_conv_dropout))
  return unet3d.UNet3DConfig, overrides


def build_components(config: ml_collections.ConfigDict, workdir: str) -> Components:
  """Models, tokenizer and (when ``init_from`` is set) their converted weights."""
  from vidrd_jax.diffusion.schedule import DDIMScheduler  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import text_encoder as text_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import unet3d  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  cfg_cls, unet_overrides = _unet_config(config)
  m = config.model
  if config.init_from:
    from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    # Parameters stay on the host here; setup() places them with the training shardings.
    pipe = pipeline_lib.load_pipeline(config.init_from, shardings=jax.devices("cpu")[0]
                                      if _has_cpu() else None)
    unet_cfg = dataclasses.replace(pipe.unet.config, **unet_overrides)
    vae_cfg, text_cfg = pipe.vae.config, pipe.text_encoder.config
    tokenizer = pipe.tokenizer
    scheduler_config = dict(pipe.scheduler_config)
    unet_params = pipe.params["unet"]
    vae_params, text_params = pipe.params["vae"], pipe.params["text_encoder"]
  else:
    preset = getattr(cfg_cls, m.unet, None)
    if preset is None:
      raise ValueError(f"model.unet preset {m.unet!r} does not exist on UNet3DConfig")
    unet_cfg = preset(**unet_overrides)
    vae_preset = getattr(vae_lib.AutoencoderKLConfig, m.vae, None)
    text_preset = getattr(text_lib.CLIPTextConfig, m.text_encoder, None)
    if vae_preset is None or text_preset is None:
      raise ValueError(f"unknown model.vae {m.vae!r} or model.text_encoder {m.text_encoder!r} preset")
    vae_cfg = vae_preset(temporal=True)
    text_cfg = text_preset()
    tokenizer = Tokenizer.from_open_clip_vocab(os.path.join(_local_cache(workdir), "tokenizer"))
    from vidrd_jax.pipeline import SD2_SCHEDULER_CONFIG  # pylint: disable=g-import-not-at-top
    scheduler_config = dict(SD2_SCHEDULER_CONFIG)
    unet_params = vae_params = text_params = None
  scheduler_config = dict(scheduler_config, prediction_type=m.prediction_type)
  models = train_lib.Models(
      unet=unet3d.UNet3DConditionModel(unet_cfg),
      text_encoder=text_lib.CLIPTextModel(text_cfg),
      vae=vae_lib.AutoencoderKL(vae_cfg),
      scheduler=DDIMScheduler.from_config(scheduler_config))
  return Components(models, tokenizer, unet_cfg, vae_cfg, text_cfg, scheduler_config,
                    unet_params, vae_params, text_params)


def _has_cpu() -> bool:
  try:
    return bool(jax.devices("cpu"))
  except RuntimeError:
    return False


def _local_cache(workdir: str) -> str:
  """A local directory for small files (tokenizer cache) even when workdir is on GCS."""
  if "://" in workdir:
    return os.path.join("/tmp", "vidrd_cache")
  return os.path.join(workdir, "cache")


def check_shapes(what: str, loaded: PyTree, abstract: PyTree) -> None:
  """Raises ValueError listing every missing / unexpected / mis-shaped parameter."""
  def flat(t):
    return {train_lib.path_str(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  got, want = flat(loaded), flat(abstract)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  shapes = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or unexpected or shapes:
    lines = [f"{what} checkpoint does not match the model:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]))
    if shapes:
      lines.append(f"  wrong shape ({len(shapes)}): " + ", ".join(
          f"{k} {got[k]} vs model {want[k]}" for k in shapes[:20]))
    raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Data.

def make_data_iterator(config: ml_collections.ConfigDict, tokenize_fn: Callable) -> Iterator:
  from vidrd_jax.data import make_train_iterator  # pylint: disable=g-import-not-at-top
  return make_train_iterator(
      config.data, global_batch_size=config.global_batch_size, frames=config.data.frames,
      resolution=config.data.resolution, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), tokenize_fn=tokenize_fn,
      worker_count=config.data.worker_count)


# ----------------------------------------------------------------------------------------------
# Setup shared by train_and_evaluate and the benchmarks.

@dataclasses.dataclass
class Setup:
  mesh: Any
  components: Components
  mask: PyTree
  tx: Any
  schedule: Any
  step_config: train_lib.StepConfig
  abstract_state: train_lib.TrainState   # ShapeDtypeStructs with shardings
  state_shardings: train_lib.TrainState
  frozen_shardings: PyTree
  abstract_frozen: PyTree                # ShapeDtypeStructs of init_frozen()'s output
  batch_shapes: dict                     # global batch ShapeDtypeStructs with shardings
  init_state: Callable[[], train_lib.TrainState]
  init_frozen: Callable[[], PyTree]
  train_step: Callable                   # jitted
  _compiled: Any = None
  _lowered: Any = None

  def compiled_step(self) -> Any:
    """The train step compiled for ``abstract_state`` / ``batch_shapes`` (once per Setup)."""
    if self._compiled is None:
      frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.abstract_frozen, self.frozen_shardings)
      self._lowered = self.train_step.lower(self.abstract_state, self.batch_shapes, frozen)
      self._compiled = self._lowered.compile()
    return self._compiled

  def step_flops_per_device(self) -> Optional[float]:
    """Model FLOPs of one train step per device, for MFU.

    Counted on the lowered (global, unoptimised) program and split over the mesh: on GPU the
    compiled program hides convolutions in cuDNN custom calls that XLA's cost analysis counts
    as zero, so the compiled count would understate MFU several times over.
    """
    self.compiled_step()
    flops = metrics_lib.compiled_flops(self._lowered)
    return flops / self.mesh.size if flops else None


# Fields that only steer the loop (logging, checkpoint cadence, simulated preemption...), not
# the models, shardings or the compiled step.
_LOOP_ONLY_FIELDS = ("preempt_at_step", "log_every", "checkpoint_every", "keep_checkpoints",
                     "keep_best", "async_checkpointing", "progress_bar", "tensorboard", "export",
                     "sample_every", "sample_prompts", "sample_steps", "sample_guidance",
                     "sample_clips", "max_nan_steps", "distributed")
_SETUP_CACHE: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_SETUP_CACHE_SIZE = 2


def _setup_key(config: ml_collections.ConfigDict, mesh) -> Optional[tuple]:
  if config.init_from:
    return None  # loaded weights may change on disk between runs
  fields = {k: v for k, v in config.to_dict().items() if k not in _LOOP_ONLY_FIELDS}
  if config.optimizer.decay_steps >= 0:
    fields.pop("num_steps")  # only the LR schedule's default length depends on it
  devices = tuple(d.id for d in (mesh.devices.flat if mesh is not None else jax.devices()))
  mesh_shape = tuple(mesh.shape.items()) if mesh is not None else None
  return json.dumps(fields, sort_keys=True, default=str), devices, mesh_shape


def cached_setup(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
                 builder: Optional[Callable] = None) -> Any:
  """``setup`` memoised per process on everything that shapes the compiled program.

  Repeated runs in one process (tests, notebooks, a resumed run after a simulated
  preemption) then reuse the jitted init and the compiled step instead of recompiling.
  """
  builder = builder or setup
  key = _setup_key(config, mesh)
  if key is None:
    return builder(config, workdir, mesh=mesh)
  key = (builder.__module__,) + key
  if key not in _SETUP_CACHE:
    # Few entries: each Setup keeps its compiled programs (and loaded weights) alive.
    while len(_SETUP_CACHE) >= _SETUP_CACHE_SIZE:
      _SETUP_CACHE.popitem(last=False)
    _SETUP_CACHE[key] = builder(config, workdir, mesh=mesh)
  _SETUP_CACHE.move_to_end(key)
  return _SETUP_CACHE[key]


def setup(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> Setup:
  """Builds the mesh, models, shardings and the jitted step; validates before compiling."""
  train_config.check_config(config, train_config.base_config())
  mesh = mesh or sharding_lib.make_mesh(config.mesh.to_dict())
  micro = config.global_batch_size // config.grad_accum_steps
  sharding_lib.check_batch_size(config.global_batch_size, mesh)
  sharding_lib.check_batch_size(micro, mesh, what="micro-batch size (global / grad_accum_steps)")
  rules = sharding_lib.rules_from_config(train_config.parse_rules(config.sharding_rules))

  comp = build_components(config, workdir)
  models = comp.models
  f, r = config.data.frames, config.data.resolution
  rng = jax.random.PRNGKey(config.seed)
  k_unet, k_vae, k_text, k_state = jax.random.split(rng, 4)

  # Shapes of one example, found without computing anything.
  video = jax.ShapeDtypeStruct((1, f, r, r, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, comp.tokenizer.max_length), jnp.int32)
  vae_init = lambda k: models.vae.init(k, jnp.zeros(video.shape, video.dtype))
  boxed_vae = jax.eval_shape(vae_init, k_vae)["params"]
  mean_shape = jax.eval_shape(
      lambda p, v: models.vae.apply({"params": p}, v, method="encode")[0],
      sharding_lib.unbox(boxed_vae), video)
  latent = jax.ShapeDtypeStruct(mean_shape.shape, jnp.float32)
  boxed_text = jax.eval_shape(lambda k: models.text_encoder.init(k, jnp.zeros(ids.shape, ids.dtype)),
                              k_text)["params"]
  ctx = jax.eval_shape(lambda p, i: models.text_encoder.apply({"params": p}, i),
                       sharding_lib.unbox(boxed_text), ids)

  def unet_init(k):
    return models.unet.init(k, jnp.zeros(latent.shape, jnp.float32), jnp.zeros((1,), jnp.int32),
                            jnp.zeros(ctx.shape, jnp.float32))["params"]
  boxed_unet = jax.eval_shape(unet_init, k_unet)
  params_sh = sharding_lib.param_shardings(boxed_unet, mesh, rules)
  abstract_params = sharding_lib.unbox(boxed_unet)
  if comp.unet_params is not None:
    check_shapes("UNet (init_from)", comp.unet_params, abstract_params)
    check_shapes("VAE (init_from)", comp.vae_params, sharding_lib.unbox(boxed_vae))
    check_shapes("text encoder (init_from)", comp.text_params, sharding_lib.unbox(boxed_text))

  mask = train_lib.trainable_mask(abstract_params, train_lib.parse_patterns(config.trainable),
                                  train_lib.parse_patterns(config.frozen) if config.frozen else ())
  train_lib.check_mask(mask, train_lib.parse_patterns(config.trainable))
  opt = config.optimizer.copy_and_resolve_references()
  with opt.unlocked():
    if opt.decay_steps < 0:
      opt.decay_steps = config.num_steps
  tx, schedule = train_lib.make_optimizer(opt, mask)

  make_state = lambda params, k: train_lib.init_train_state(params, tx, mask, k)
  abstract_state = jax.eval_shape(make_state, abstract_params, k_state)
  state_sh = train_lib.state_shardings(abstract_state, params_sh, mesh)
  abstract_state = train_lib.abstract_with_shardings(abstract_state, state_sh)

  frozen_sh = {
      "vae": sharding_lib.param_shardings(boxed_vae, mesh, rules),
      "text_encoder": sharding_lib.param_shardings(boxed_text, mesh, rules),
      "uncond_ids": sharding_lib.replicated(mesh),
  }
  uncond_ids = np.asarray(comp.tokenizer([""]), np.int32)

  # jit objects built once per Setup, so repeated init calls reuse the compiled program.
  random_init = jax.jit(lambda k, ks: make_state(sharding_lib.unbox(unet_init(k)), ks),
                        out_shardings=state_sh)
  state_from_params = jax.jit(make_state, out_shardings=state_sh, donate_argnums=(0,))
  random_vae = jax.jit(lambda k: sharding_lib.unbox(vae_init(k)["params"]),
                       out_shardings=frozen_sh["vae"])
  random_text = jax.jit(
      lambda k: sharding_lib.unbox(models.text_encoder.init(k, jnp.zeros(ids.shape, ids.dtype))["params"]),
      out_shardings=frozen_sh["text_encoder"])

  def init_state():
    if comp.unet_params is None:
      return random_init(k_unet, k_state)
    return state_from_params(jax.device_put(comp.unet_params, params_sh), k_state)

  def init_frozen():
    if comp.vae_params is None:
      vae_params, text_params = random_vae(k_vae), random_text(k_text)
    else:
      vae_params = jax.device_put(comp.vae_params, frozen_sh["vae"])
      text_params = jax.device_put(comp.text_params, frozen_sh["text_encoder"])
    return {"vae": vae_params, "text_encoder": text_params,
            "uncond_ids": jax.device_put(uncond_ids, frozen_sh["uncond_ids"])}

  b = config.global_batch_size
  if _produces_latents(config):
    batch_shapes = {"latents": jax.ShapeDtypeStruct((b,) + latent.shape[1:], jnp.float32)}
  else:
    batch_shapes = {"video": jax.ShapeDtypeStruct((b,) + video.shape[1:], jnp.float32)}
  batch_shapes["input_ids"] = jax.ShapeDtypeStruct((b, ids.shape[1]), jnp.int32)
  batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                          sharding=sharding_lib.batch_sharding(mesh, len(v.shape)))
                  for k, v in batch_shapes.items()}

  step_config = train_lib.StepConfig(
      prediction_type=config.model.prediction_type, caption_dropout=config.caption_dropout,
      grad_accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay,
      ema_warmup=config.ema_warmup, latent_scale=float(comp.vae_config.scaling_factor),
      sample_posterior=config.sample_posterior, compute_dtype=_dtype(config.model.dtype),
      timestep_sampling=config.timestep_sampling,
      timestep_logit_mean=float(config.timestep_logit_mean),
      timestep_logit_std=float(config.timestep_logit_std),
      snr_gamma=float(config.snr_gamma))
  step_fn = functools.partial(train_lib.train_step, models=models, tx=tx, mask=mask,
                              schedule=schedule, cfg=step_config)
  jitted = train_lib.jit_train_step(
      step_fn, state_sh, {k: v.sharding for k, v in batch_shapes.items()}, frozen_sh, mesh)
  abstract_frozen = {"vae": sharding_lib.unbox(boxed_vae), "text_encoder": sharding_lib.unbox(boxed_text),
                     "uncond_ids": jax.ShapeDtypeStruct(uncond_ids.shape, jnp.int32)}
  return Setup(mesh, comp, mask, tx, schedule, step_config, abstract_state, state_sh, frozen_sh,
               abstract_frozen,
               batch_shapes, init_state, init_frozen, jitted)


def _produces_latents(config) -> bool:
  return bool(config.data.latents)


# ----------------------------------------------------------------------------------------------
# Export and samples.

def _pipeline(setup_: Setup, unet_params: PyTree, frozen: PyTree):
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  comp = setup_.components
  return pipeline_lib.Pipeline(
      unet=comp.models.unet, vae=comp.models.vae, text_encoder=comp.models.text_encoder,
      tokenizer=comp.tokenizer, scheduler_config=dict(comp.scheduler_config),
      params={"unet": unet_params, "vae": frozen["vae"], "text_encoder": frozen["text_encoder"]})


def ema_unet_params(setup_: Setup, state: train_lib.TrainState) -> PyTree:
  """Full UNet parameters with the EMA of the trainable leaves (raw weights without EMA)."""
  if setup_.step_config.ema_decay > 0:
    return train_lib.merge(state.params, state.ema_params)
  return state.params


def export_pipeline(setup_: Setup, state: train_lib.TrainState, frozen: PyTree, out_dir: str,
                    data_config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Writes the EMA UNet + frozen VAE / text encoder in the converted pipeline format.

  ``python -m vidrd_jax.sample --config.checkpoint=<out_dir>`` samples from it; with
  ``data_config`` (``config.data``) the clip size it trained on is recorded as ``trained_on``,
  the size sampling then defaults to.
  """
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  gather = lambda t: jax.tree.map(np.asarray, jax.device_get(t))
  pipe = _pipeline(setup_, gather(ema_unet_params(setup_, state)), gather(frozen))
  if jax.process_index() == 0:
    info = {"source": "vidrd_jax.train", "step": int(jax.device_get(state.step))}
    if data_config is not None:
      r = int(data_config.resolution)
      info["trained_on"] = {"height": r, "width": r, "frames": int(data_config.frames)}
    pipeline_lib.save_pipeline(out_dir, pipe, info=info, overwrite=True)


def write_samples(config, setup_: Setup, state, frozen, workdir: str, step: int,
                  writer: metrics_lib.MetricWriter) -> None:
  """Long videos from the fixed prompts with the EMA weights -> workdir/samples + TensorBoard."""
  from vidrd_jax.data.video import write_video  # pylint: disable=g-import-not-at-top
  from vidrd_jax.diffusion import long_video  # pylint: disable=g-import-not-at-top
  pipe = _pipeline(setup_, ema_unet_params(setup_, state), frozen)
  frames = config.data.frames
  out = long_video.generate(
      pipe, list(config.sample_prompts), num_clips=config.sample_clips, frames_per_clip=frames,
      overlap=min(4, frames // 2), num_steps=config.sample_steps,
      guidance_scale=config.sample_guidance, height=config.data.resolution,
      width=config.data.resolution, seed=config.seed, mesh=setup_.mesh)
  if jax.process_index() == 0:
    sample_dir = os.path.join(workdir, "samples", f"step_{step:08d}")
    os.makedirs(sample_dir, exist_ok=True)
    for i, video in enumerate(out.frames):
      write_video(os.path.join(sample_dir, f"{i:02d}.mp4"), video, fps=8)
    writer.write_video(step, "samples", out.frames)


# ----------------------------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``; returns the final metrics.

  Returns:
    The last logged scalars plus ``step``, ``preempted`` (True when the run stopped on
    SIGTERM) and ``state`` (the final TrainState).
  """
  if config.distributed and jax.process_count() == 1:
    jax.distributed.initialize()
  train_config.check_config(config, train_config.base_config())
  st = cached_setup(config, workdir)
  n_total = train_lib.count_params(st.abstract_state.params)
  n_train = train_lib.count_params(st.abstract_state.ema_params)
  logging.info("UNet parameters: %d total, %d trainable (%.1f%%)", n_total, n_train,
               100.0 * n_train / max(n_total, 1))
  export = lambda state, frozen, out: export_pipeline(st, state, frozen, out, config.data)
  sample = lambda state, frozen, step, writer: write_samples(config, st, state, frozen, workdir,
                                                             step, writer)
  return run_loop(config, workdir, st, export_fn=export,
                  sample_fn=sample if config.get("sample_every", 0) > 0 else None)


def run_loop(config: ml_collections.ConfigDict, workdir: str, st: Any, *,
             export_fn: Optional[Callable] = None,
             sample_fn: Optional[Callable] = None) -> dict[str, Any]:
  """The training loop shared by UNet and VAE training.

  ``st`` provides ``mesh``, ``abstract_state`` (with shardings), ``init_state()``,
  ``init_frozen()``, ``batch_shapes``, ``train_step`` (jitted ``(state, batch, frozen) ->
  (state, metrics)``) and ``components.tokenizer`` (None: no tokenization).
  """
  mesh = st.mesh
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every,
      keep_last=config.keep_checkpoints, keep_best=config.keep_best,
      async_save=config.async_checkpointing)
  restored = ckpt.restore_latest(st.abstract_state)
  if restored is not None:
    start_step, state, data_state, _ = restored
    logging.info("resumed from checkpoint step %d", start_step)
  else:
    start_step, state, data_state = 0, st.init_state(), None
  frozen = st.init_frozen()

  data_it = make_data_iterator(config, st.components.tokenizer)
  if data_state is not None:
    data_it.set_state(data_state)

  # Compile once up front: errors surface before the first batch, and XLA's cost analysis
  # gives the step's FLOPs for MFU. A run restored at its last step has nothing to compile for.
  if start_step < config.num_steps:
    compiled = st.compiled_step()
    flops = st.step_flops_per_device()
    peak = metrics_lib.peak_flops_per_device()
  else:
    logging.info("checkpoint step %d: no step left of num_steps=%d", start_step, config.num_steps)

  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
  watcher = checkpointing.PreemptionWatcher().install()
  bar = None
  if config.progress_bar and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.num_steps, initial=start_step, desc="train", unit="step",
                    dynamic_ncols=True)
  batch_keys = set(st.batch_shapes)
  last: dict[str, Any] = {"step": start_step}
  preempted = False
  t_last, steps_since = time.perf_counter(), 0
  step = last_saved = start_step
  try:
    while step < config.num_steps:
      batch = next(data_it)
      missing = batch_keys - set(batch)
      if missing:
        raise ValueError(f"data batches lack {sorted(missing)} (they have {sorted(batch)}); "
                         f"set config.data.latents to match the sources")
      batch = sharding_lib.shard_batch({k: v for k, v in batch.items() if k in batch_keys}, mesh)
      state, step_metrics = compiled(state, batch, frozen)
      step += 1
      steps_since += 1
      if bar is not None:
        bar.update(1)

      if step % config.log_every == 0 or step == config.num_steps:
        m = jax.device_get(step_metrics)
        dt = (time.perf_counter() - t_last) / steps_since
        t_last, steps_since = time.perf_counter(), 0
        record = {k: float(v) for k, v in m.items()}
        record.update(step_time=dt, examples_per_s=config.global_batch_size / dt)
        u = metrics_lib.mfu(flops, dt, peak)
        if u is not None:
          record["mfu"] = u
        last = writer.write_scalars(step, record, console=bar is None)
        if bar is not None:
          bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if record["nan_streak"] >= config.max_nan_steps:
          raise TrainingError(f"{int(record['nan_streak'])} non-finite steps in a row at step "
                              f"{step} (limit max_nan_steps={config.max_nan_steps})")

      if config.preempt_at_step >= 0 and step == config.preempt_at_step:
        # Simulated preemption: the same signal a TPU VM / Kubernetes sends.
        os.kill(os.getpid(), signal.SIGTERM)
      preempted = watcher.preempted or ckpt.reached_preemption(step)
      if preempted or ckpt.should_save(step):
        loss = float(jax.device_get(step_metrics["loss"]))
        ckpt.save(step, state, data_state=data_it.get_state(),
                  metrics={"loss": loss} if np.isfinite(loss) else None, force=preempted)
        last_saved = step
      if preempted:
        logging.warning("preempted at step %d: checkpoint written, stopping", step)
        break

      if sample_fn is not None and step % config.sample_every == 0:
        sample_fn(state, frozen, step, writer)

    if not preempted and last_saved != step:
      loss = float(jax.device_get(step_metrics["loss"])) if step > start_step else float("nan")
      ckpt.save(step, state, data_state=data_it.get_state(),
                metrics={"loss": loss} if np.isfinite(loss) else None, force=True)
    ckpt.wait()
    if not preempted and config.export and export_fn is not None:
      export_fn(state, frozen, os.path.join(workdir, "export"))
  finally:
    watcher.uninstall()
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
  last = dict(last)
  last.update(step=step, preempted=preempted)
  last["state"] = state
  return last


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
