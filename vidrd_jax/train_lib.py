"""The pieces of a VidRD training step: trainable selection, optimizer, state, loss, step.

Kept free of I/O so tests can build a step around tiny models. ``vidrd_jax.train`` wires
them to data, sharding, checkpoints and metrics.

The paper (section 3.1) trains only the new temporal layers and the transformer blocks of
the spatial layers; the VAE and text encoder are frozen. Trainable parameters are picked by
regular expressions over "/"-joined parameter paths (``config.trainable``), the optimizer is
an ``optax.multi_transform`` whose frozen branch (``optax.set_to_zero``) keeps no state, and
gradients are only ever computed for the trainable leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vidrd_jax import train_config
from vidrd_jax.parallel import sharding as sharding_lib

PyTree = Any

TRAINABLE = "trainable"
FROZEN = "frozen"
# Paper default: temporal layers (temp_convs, temp_attn, temp_norm, ...) plus the spatial
# transformer blocks (self/cross attention and feed-forward) of the UNet.
PAPER_TRAINABLE = (r"(^|/)temp_", r"(^|/)transformer_blocks")


# ----------------------------------------------------------------------------------------------
# Trainable selection.

def path_str(path: Sequence[Any]) -> str:
  """'down_blocks_0/attentions_0/.../kernel' from a jax key path."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def parse_patterns(patterns: Any) -> tuple[str, ...]:
  """Config value -> regex tuple. Accepts a comma-separated string, a sequence, or "all"."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(",") if p.strip()]
  patterns = tuple(patterns)
  if patterns in (("all",), ("*",)):
    return (r".*",)
  if patterns in (("paper",), ("default",)):
    return PAPER_TRAINABLE
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"trainable pattern {p!r} is not a valid regular expression: {e}") from e
  return patterns


def trainable_mask(params: PyTree, patterns: Sequence[str], frozen_patterns: Sequence[str] = ()) -> PyTree:
  """Bool tree: True where a parameter path matches a trainable pattern and no frozen one."""
  train_re = [re.compile(p) for p in patterns]
  frozen_re = [re.compile(p) for p in frozen_patterns]

  def label(path, _):
    s = path_str(path)
    return any(r.search(s) for r in train_re) and not any(r.search(s) for r in frozen_re)
  return jax.tree_util.tree_map_with_path(label, params)


def check_mask(mask: PyTree, patterns: Sequence[str]) -> None:
  n = sum(jax.tree.leaves(mask))
  if n == 0:
    raise ValueError(f"trainable patterns {list(patterns)} match no parameter; check the names "
                     f"(e.g. {path_str(jax.tree_util.tree_flatten_with_path(mask)[0][0][0])!r})")


def select(tree: PyTree, mask: PyTree) -> dict:
  """The sub-dict of a nested-dict tree with only the leaves where mask is True."""
  def go(t, m):
    if isinstance(t, Mapping):
      out = {}
      for k, v in t.items():
        sub = go(v, m[k])
        if sub is not _DROP:
          out[k] = sub
      return out if out else _DROP
    return t if m else _DROP
  out = go(tree, mask)
  return {} if out is _DROP else out


_DROP = object()


def merge(full: PyTree, partial: Mapping[str, Any]) -> PyTree:
  """``full`` with the leaves present in ``partial`` replaced (both nested dicts)."""
  if not isinstance(partial, Mapping):
    return partial
  full = dict(full)
  for k, v in partial.items():
    full[k] = merge(full[k], v)
  return full


def count_params(tree: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Optimizer.

def learning_rate_schedule(opt_config) -> optax.Schedule:
  """Linear warmup then cosine (or constant) decay, as in the config's ``optimizer`` block."""
  peak = float(opt_config.learning_rate)
  warmup = int(opt_config.warmup_steps)
  kind = opt_config.schedule
  if kind == "cosine":
    decay_steps = max(int(opt_config.decay_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=decay_steps,
        end_value=peak * float(opt_config.end_lr_factor))
  if kind == "constant":
    if warmup == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {kind!r}")


def make_optimizer(opt_config, mask: PyTree) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ clipping) on trainable leaves, ``set_to_zero`` (no state) on frozen ones."""
  schedule = learning_rate_schedule(opt_config)
  chain = []
  if opt_config.grad_clip and opt_config.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(float(opt_config.grad_clip)))
  chain.append(optax.adamw(
      schedule, b1=float(opt_config.b1), b2=float(opt_config.b2), eps=float(opt_config.eps),
      weight_decay=float(opt_config.weight_decay),
      # No decay on biases and norm scales (1-D leaves).
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  labels = jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)
  tx = optax.multi_transform({TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule


# ----------------------------------------------------------------------------------------------
# State.

class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs (besides the data iterator state).

  Attributes:
    step: number of batches consumed (skipped non-finite steps count).
    params: the UNet's full parameter tree, float32 master weights.
    ema_params: EMA of the trainable leaves only (a nested dict subset of ``params``).
    opt_state: multi_transform state; frozen leaves are ``MaskedNode`` (no arrays).
    rng: uint32[2] PRNG key; step randomness is ``fold_in(rng, step)``.
    nan_streak: consecutive non-finite steps (reset by a finite one).
    nan_total: non-finite steps skipped so far.
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree
  rng: jax.Array
  nan_streak: jax.Array
  nan_total: jax.Array


def init_train_state(params: PyTree, tx: optax.GradientTransformation, mask: PyTree,
                     rng: jax.Array) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, select(params, mask)),
      opt_state=tx.init(params),
      rng=rng,
      nan_streak=jnp.zeros((), jnp.int32),
      nan_total=jnp.zeros((), jnp.int32),
  )


def _leaf_paths(tree: PyTree, is_leaf=None) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), x) for p, x in leaves]


def shardings_like_params(tree: PyTree, params_shardings: PyTree, params_shapes: PyTree,
                          mesh: Mesh) -> PyTree:
  """Shardings for a tree whose leaves mirror parameters (EMA, Adam moments, ...).

  A leaf takes the sharding of the parameter whose path is the longest suffix of its own
  path and whose shape matches; everything else (counters, scalars) is replicated.
  """
  by_path = {}
  for (p, s), (_, shape) in zip(_leaf_paths(params_shardings), _leaf_paths(params_shapes)):
    by_path[p] = (s, tuple(shape.shape))

  def pick(path, leaf):
    parts = path_str(path).split("/")
    shape = tuple(np.shape(leaf))
    for i in range(len(parts)):
      hit = by_path.get("/".join(parts[i:]))
      if hit is not None and hit[1] == shape:
        return hit[0]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(pick, tree)


# ----------------------------------------------------------------------------------------------
# Loss and step.

@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static (compile-time) settings of the train step."""
  prediction_type: str = "epsilon"        # "epsilon" or "v_prediction"
  caption_dropout: float = 0.1            # probability of replacing the caption by ""
  grad_accum_steps: int = 1
  ema_decay: float = 0.9999
  ema_warmup: bool = True                 # decay min(ema_decay, (1 + n) / (10 + n))
  latent_scale: float = 0.18215
  sample_posterior: bool = True           # VAE posterior sample (True) or its mean
  compute_dtype: Any = jnp.float32
  # Timestep density: "uniform" over [0, T), as the reference, or "logit_normal": t / T =
  # sigmoid(mean + std * n) (Esser et al. 2024, "Scaling Rectified Flow Transformers"), which
  # with mean > 0 trains more often at the noisy steps, where the layout is decided.
  timestep_sampling: str = "uniform"
  timestep_logit_mean: float = 0.0
  timestep_logit_std: float = 1.0
  # Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  # Weighting Strategy"; diffusers' ``--snr_gamma``): each example's MSE is weighted so that its
  # x_0 error counts min(SNR_t, gamma) times. 0 is the reference's unweighted MSE.
  snr_gamma: float = 0.0


@dataclasses.dataclass(frozen=True)
class Models:
  """The three networks and the noise schedule the step needs (flax modules are static)."""
  unet: nn.Module
  text_encoder: nn.Module
  vae: Optional[nn.Module]
  scheduler: Any   # vidrd_jax.diffusion.schedule.DDIMScheduler


def encode_latents(models: Models, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array],
                   rng: jax.Array, cfg: StepConfig) -> jax.Array:
  """Latents [B, F, h, w, C]: pre-encoded ``batch["latents"]`` or the frozen VAE's encoding."""
  if "latents" in batch:
    return batch["latents"].astype(jnp.float32)
  if models.vae is None:
    raise ValueError("batch has no 'latents' and no VAE is configured to encode 'video'")
  mean, logvar = models.vae.apply({"params": frozen["vae"]}, batch["video"], method="encode")
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  if cfg.sample_posterior:
    # Diagonal Gaussian posterior sample, as diffusers' DiagonalGaussianDistribution.sample.
    logvar = jnp.clip(logvar, -30.0, 20.0)
    mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
  return jax.lax.stop_gradient(mean * cfg.latent_scale)


def sample_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int,
                     cfg: StepConfig) -> jax.Array:
  """Training timesteps [B] int32 in [0, num_train_timesteps), drawn as ``cfg`` says."""
  n = num_train_timesteps
  if cfg.timestep_sampling == "uniform":
    return jax.random.randint(rng, (batch,), 0, n)
  if cfg.timestep_sampling == "logit_normal":
    u = jax.nn.sigmoid(cfg.timestep_logit_mean
                       + cfg.timestep_logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    return jnp.clip(jnp.floor(u * n), 0, n - 1).astype(jnp.int32)
  raise ValueError(f"timestep_sampling must be {train_config.one_of(train_config.TIMESTEP_SAMPLINGS)}, "
                   f"got {cfg.timestep_sampling!r}")


def min_snr_weights(scheduler: Any, timesteps: jax.Array, gamma: float,
                    prediction_type: str) -> jax.Array:
  """Min-SNR-gamma weights [B] for the MSE of an epsilon / v target at ``timesteps`` [B].

  An epsilon error e is an x_0 error e / sqrt(SNR), a v error one of e / sqrt(SNR + 1), so these
  weights make every example's loss min(SNR, gamma) x its x_0 MSE (diffusers' train_text_to_image
  divides the same way). High-SNR (nearly clean) steps no longer dominate the gradient.
  """
  alpha_bar = jnp.asarray(scheduler.alphas_cumprod(), jnp.float32)[timesteps]
  snr = alpha_bar / (1.0 - alpha_bar)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    # A zero-terminal-SNR schedule has SNR = 0 at its last step, where min(SNR, gamma) / SNR -> 1.
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  raise ValueError(f"prediction_type must be {train_config.one_of(train_config.PREDICTION_TYPES)}, "
                   f"got {prediction_type!r}")


def diffusion_loss(params: PyTree, models: Models, frozen: Mapping[str, Any],
                   batch: Mapping[str, jax.Array], rng: jax.Array, cfg: StepConfig) -> jax.Array:
  """Mean squared error of the UNet's epsilon / v prediction on one (micro)batch (per-example
  min-SNR-gamma weighted when ``cfg.snr_gamma`` > 0)."""
  r_lat, r_drop, r_t, r_noise, r_dropout = jax.random.split(rng, 5)
  latents = encode_latents(models, frozen, batch, r_lat, cfg)
  b = latents.shape[0]
  ids = batch["input_ids"]
  if cfg.caption_dropout > 0:
    # Classifier-free guidance training: some captions become the empty prompt.
    drop = jax.random.bernoulli(r_drop, cfg.caption_dropout, (b,))
    ids = jnp.where(drop[:, None], frozen["uncond_ids"].astype(ids.dtype), ids)
  ctx = jax.lax.stop_gradient(models.text_encoder.apply({"params": frozen["text_encoder"]}, ids))
  sched = models.scheduler
  t = sample_timesteps(r_t, b, sched.num_train_timesteps, cfg)
  noise = jax.random.normal(r_noise, latents.shape, jnp.float32)
  noisy = sched.add_noise(latents, noise, t)
  if cfg.prediction_type == "epsilon":
    target = noise
  elif cfg.prediction_type == "v_prediction":
    target = sched.get_velocity(latents, noise, t)
  else:
    raise ValueError(f"prediction_type must be {train_config.one_of(train_config.PREDICTION_TYPES)}, "
                     f"got {cfg.prediction_type!r}")
  pred = models.unet.apply({"params": params}, noisy.astype(cfg.compute_dtype), t,
                           ctx.astype(cfg.compute_dtype), train=True, rngs={"dropout": r_dropout})
  squared = jnp.square(pred.astype(jnp.float32) - target)
  if cfg.snr_gamma <= 0:
    return jnp.mean(squared)
  per_example = jnp.mean(squared.reshape(b, -1), axis=1)
  return jnp.mean(per_example * min_snr_weights(sched, t, cfg.snr_gamma, cfg.prediction_type))


def _split_microbatches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] taking every k-th example, so each device keeps its rows."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch {x.shape[0]} is not divisible by grad_accum_steps {k}")
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return {key: split(v) for key, v in batch.items()}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], frozen: Mapping[str, Any], *,
               models: Models, tx: optax.GradientTransformation, mask: PyTree,
               schedule: optax.Schedule, cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step (with ``grad_accum_steps`` micro-batches).

  Args:
    state: current TrainState.
    batch: ``{"video" [B, F, H, W, 3] | "latents" [B, F, h, w, C], "input_ids" [B, L]}``.
    frozen: ``{"vae": params, "text_encoder": params, "uncond_ids": [1, L]}``.

  Returns:
    (new state, metrics dict of scalars: loss, grad_norm, lr, finite, nan_streak, nan_total).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  trainable = select(state.params, mask)
  frozen_params = state.params

  def loss_of(trainable_params, mb, r):
    # Gradients flow only into the trainable subset; frozen leaves are constants here.
    params = merge(jax.lax.stop_gradient(frozen_params), trainable_params)
    return diffusion_loss(params, models, frozen, mb, r, cfg)

  grad_fn = jax.value_and_grad(loss_of)
  k = cfg.grad_accum_steps
  if k == 1:
    loss, grads = grad_fn(trainable, batch, rng)
  else:
    micro = _split_microbatches(batch, k)

    def body(carry, xs):
      loss_sum, grad_sum = carry
      mb, i = xs
      l, g = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
      return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (micro, jnp.arange(k)))
    loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # The optimizer sees the full tree; frozen leaves get constant zeros that set_to_zero ignores.
  full_grads = merge(jax.tree.map(jnp.zeros_like, state.params), grads)
  updates, new_opt_state = tx.update(full_grads, state.opt_state, state.params)
  new_trainable = optax.apply_updates(trainable, select(updates, mask))

  n = state.step.astype(jnp.float32)
  decay = cfg.ema_decay
  if cfg.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_trainable)

  # NaN/inf guard: a non-finite step changes nothing but the counters.
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_trainable = keep(new_trainable, trainable)
  new_opt_state = keep(new_opt_state, state.opt_state)
  new_ema = keep(new_ema, state.ema_params)
  nan_streak = jnp.where(finite, 0, state.nan_streak + 1)
  new_state = state.replace(
      step=state.step + 1,
      params=merge(state.params, new_trainable),
      ema_params=new_ema,
      opt_state=new_opt_state,
      nan_streak=nan_streak,
      nan_total=state.nan_total + (1 - finite.astype(jnp.int32)),
  )
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": schedule(state.step),
      "finite": finite.astype(jnp.float32),
      "nan_streak": nan_streak,
      "nan_total": new_state.nan_total,
  }
  return new_state, metrics


# ----------------------------------------------------------------------------------------------
# Sharded construction.

def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_shardings(abstract_state: TrainState, params_shardings: PyTree, mesh: Mesh) -> TrainState:
  """Shardings for every TrainState leaf, mirroring the parameter shardings."""
  shapes = abstract_state.params
  rep = NamedSharding(mesh, P())
  return TrainState(
      step=rep,
      params=params_shardings,
      ema_params=shardings_like_params(abstract_state.ema_params, params_shardings, shapes, mesh),
      opt_state=shardings_like_params(abstract_state.opt_state, params_shardings, shapes, mesh),
      rng=rep,
      nan_streak=rep,
      nan_total=rep,
  )


def frozen_shardings(frozen: PyTree, boxed_frozen: Optional[PyTree], mesh: Mesh, rules) -> PyTree:
  """Frozen encoders: logical rules where the params are annotated, else fsdp on the widest dim."""
  if boxed_frozen is not None:
    return sharding_lib.param_shardings(boxed_frozen, mesh, rules)
  return sharding_lib.fsdp_shardings_for(frozen, mesh)


def jit_train_step(step_fn: Callable, state_sh: TrainState, batch_sh: PyTree, frozen_sh: PyTree,
                   mesh: Mesh) -> Callable:
  """``jax.jit`` with explicit in/out shardings, donating the old state.

  The step is traced with ``mesh`` in context, so kernels XLA cannot partition (Pallas TPU
  attention) run per batch shard (``models.attention.per_batch_shard``).
  """
  rep = NamedSharding(mesh, P())

  @functools.wraps(step_fn)
  def step_in_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step_fn(*args)

  return jax.jit(step_in_mesh, in_shardings=(state_sh, batch_sh, frozen_sh),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))
