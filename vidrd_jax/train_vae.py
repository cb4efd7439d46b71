r"""Fine-tuning of the temporal VAE decoder (the paper's section 3.1, "temporal-aware VAE").

Usage::

  python -m vidrd_jax.train_vae --config=configs/vae_tiny_cpu.py --workdir=/tmp/vidrd_vae

Only the decoder's temporal conv layers train (``config.trainable``); the encoder and every
spatial decoder layer stay as in SD2.1. The loss is the paper's

  L = a_rec L_rec + a_reg L_reg + a_disc L_disc

with L_rec the L1 reconstruction error (plus an LPIPS term when ``loss.lpips_weight`` > 0, which
needs LPIPS weights; off by default because none ship with this repository), L_reg the KL
divergence of the encoder's posterior from N(0, I) (constant here, since the encoder is frozen:
it is logged and kept in the total for comparability), and L_disc the hinge GAN loss of a
PatchGAN discriminator on frames, which has its own optimizer and starts at
``loss.disc_start``. The same checkpointing, preemption handling, metrics and sharding as
``vidrd_jax.train`` apply (it reuses its loop).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from vidrd_jax import train
from vidrd_jax import train_config
from vidrd_jax import train_lib
from vidrd_jax.parallel import sharding as sharding_lib

PyTree = Any


class PatchDiscriminator(nn.Module):
  """PatchGAN (pix2pix / taming-transformers NLayerDiscriminator) on single frames.

  [N, H, W, 3] -> [N, H / 2^layers, W / 2^layers, 1] real/fake logits per patch. GroupNorm
  instead of BatchNorm so the result does not depend on how the batch is sharded.
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.channels, (4, 4), strides=2, padding=1, name="conv_in")(x)
    x = nn.leaky_relu(x, 0.2)
    ch = self.channels
    for i in range(1, self.num_layers + 1):
      ch = self.channels * min(2 ** i, 8)
      stride = 2 if i < self.num_layers else 1
      x = nn.Conv(ch, (4, 4), strides=stride, padding=1, use_bias=False, name=f"conv_{i}")(x)
      x = nn.GroupNorm(num_groups=min(32, ch // 4), name=f"norm_{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (4, 4), strides=1, padding=1, name="conv_out")(x)


class VAETrainState(struct.PyTreeNode):
  """Like train_lib.TrainState, plus the discriminator and its optimizer."""
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree
  disc_params: PyTree
  disc_opt_state: PyTree
  rng: jax.Array
  nan_streak: jax.Array
  nan_total: jax.Array


@dataclasses.dataclass(frozen=True)
class VAEStepConfig:
  rec_weight: float
  kl_weight: float
  disc_weight: float
  disc_start: int
  ema_decay: float
  ema_warmup: bool


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, averaged over frames."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(jnp.sum(kl, axis=(-3, -2, -1)))


def vae_train_step(state: VAETrainState, batch, frozen, *, vae: nn.Module, disc: nn.Module,
                   tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
                   mask: PyTree, schedule: optax.Schedule, cfg: VAEStepConfig):
  """One generator (temporal convs) step and one discriminator step.

  Args:
    batch: ``{"video": [B, F, H, W, 3] in [-1, 1]}``.
    frozen: unused (kept for the shared loop's signature).
  """
  del frozen
  video = batch["video"].astype(jnp.float32)
  rng = jax.random.fold_in(state.rng, state.step)
  r_post, r_drop = jax.random.split(rng)
  # Frozen encoder: posterior once, outside the differentiated function.
  mean, logvar = vae.apply({"params": state.params}, video, method="encode")
  mean, logvar = jax.lax.stop_gradient((mean.astype(jnp.float32), logvar.astype(jnp.float32)))
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(r_post, mean.shape, jnp.float32)
  kl = kl_divergence(mean, logvar)
  use_disc = (state.step >= cfg.disc_start).astype(jnp.float32)
  trainable = train_lib.select(state.params, mask)
  b, f, h, w, c = video.shape

  def gen_loss(trainable_params):
    params = train_lib.merge(jax.lax.stop_gradient(state.params), trainable_params)
    recon = vae.apply({"params": params}, z, temporal=True, train=True, method="decode",
                      rngs={"dropout": r_drop}).astype(jnp.float32)
    rec = jnp.mean(jnp.abs(recon - video))
    logits_fake = disc.apply({"params": state.disc_params}, recon.reshape(b * f, h, w, c))
    g_adv = -jnp.mean(logits_fake)
    loss = cfg.rec_weight * rec + cfg.kl_weight * kl + use_disc * cfg.disc_weight * g_adv
    return loss, (recon, rec, g_adv)

  (loss, (recon, rec, g_adv)), grads = jax.value_and_grad(gen_loss, has_aux=True)(trainable)
  grad_norm = optax.global_norm(grads)
  full_grads = train_lib.merge(jax.tree.map(jnp.zeros_like, state.params), grads)
  updates, new_opt_state = tx.update(full_grads, state.opt_state, state.params)
  new_trainable = optax.apply_updates(trainable, train_lib.select(updates, mask))

  # Discriminator: hinge loss on real frames vs the (detached) reconstructions.
  fake = jax.lax.stop_gradient(recon).reshape(b * f, h, w, c)
  real = video.reshape(b * f, h, w, c)

  def disc_loss(dparams):
    lr_ = disc.apply({"params": dparams}, real)
    lf_ = disc.apply({"params": dparams}, fake)
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - lr_)) + jnp.mean(jax.nn.relu(1.0 + lf_)))

  d_loss, d_grads = jax.value_and_grad(disc_loss)(state.disc_params)
  d_updates, new_d_opt = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
  new_disc = optax.apply_updates(state.disc_params, d_updates)
  # Before disc_start the discriminator does not train either.
  keep_d = lambda new, old: jax.tree.map(lambda a, o: jnp.where(use_disc > 0, a, o), new, old)
  new_disc, new_d_opt = keep_d(new_disc, state.disc_params), keep_d(new_d_opt, state.disc_opt_state)

  new_ema = state.ema_params
  if cfg.ema_decay > 0:
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n)) if cfg.ema_warmup else cfg.ema_decay
    new_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new_trainable)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(d_loss)
  keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(finite, a, o), new, old)
  nan_streak = jnp.where(finite, 0, state.nan_streak + 1)
  new_state = state.replace(
      step=state.step + 1,
      params=train_lib.merge(state.params, keep(new_trainable, trainable)),
      ema_params=keep(new_ema, state.ema_params),
      opt_state=keep(new_opt_state, state.opt_state),
      disc_params=keep(new_disc, state.disc_params),
      disc_opt_state=keep(new_d_opt, state.disc_opt_state),
      nan_streak=nan_streak,
      nan_total=state.nan_total + (1 - finite.astype(jnp.int32)),
  )
  metrics = {"loss": loss, "rec_l1": rec, "kl": kl, "g_adv": g_adv, "d_loss": d_loss,
             "disc_active": use_disc, "grad_norm": grad_norm, "lr": schedule(state.step),
             "finite": finite.astype(jnp.float32), "nan_streak": nan_streak,
             "nan_total": new_state.nan_total}
  return new_state, metrics


@dataclasses.dataclass
class VAEComponents:
  vae: nn.Module
  vae_config: Any
  vae_params: Optional[PyTree]       # host params from init_from (None: random init)
  pipeline: Any                      # the init_from Pipeline (for export), or None
  tokenizer: Any = None              # the loop tokenizes nothing


@dataclasses.dataclass
class VAESetup:
  mesh: Any
  components: VAEComponents
  mask: PyTree
  abstract_state: VAETrainState
  state_shardings: VAETrainState
  batch_shapes: dict
  init_state: Any
  init_frozen: Any
  train_step: Any
  ema: bool
  _compiled: Any = None

  def compiled_step(self) -> Any:
    if self._compiled is None:
      frozen = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(self.mesh, P()))
      self._compiled = self.train_step.lower(self.abstract_state, self.batch_shapes,
                                             frozen).compile()
    return self._compiled


def _dtype(name):
  return train._dtype(name)  # pylint: disable=protected-access


def build_vae(config: ml_collections.ConfigDict) -> VAEComponents:
  from vidrd_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  m = config.model
  overrides = dict(dtype=_dtype(m.dtype))
  if config.init_from:
    from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    pipe = pipeline_lib.load_pipeline(config.init_from)
    # An image VAE gains zero-initialised temporal convs: it starts out decoding like SD2.1.
    vae_cfg = dataclasses.replace(pipe.vae.config, temporal_decoder=True, **overrides)
    return VAEComponents(vae_lib.AutoencoderKL(vae_cfg), vae_cfg, pipe.params["vae"], pipe)
  preset = getattr(vae_lib.AutoencoderKLConfig, m.vae, None)
  if preset is None:
    raise ValueError(f"model.vae preset {m.vae!r} does not exist on AutoencoderKLConfig")
  vae_cfg = preset(temporal=True, **overrides)
  return VAEComponents(vae_lib.AutoencoderKL(vae_cfg), vae_cfg, None, None)


def setup(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> VAESetup:
  """Mesh, VAE + discriminator, shardings and the jitted step (validated before compiling)."""
  del workdir
  train_config.check_config(config, train_config.vae_base_config())
  if config.loss.lpips_weight > 0:
    raise ValueError("loss.lpips_weight > 0 needs LPIPS network weights, which this build does not "
                     "load; set --config.loss.lpips_weight=0 (L1 reconstruction only)")
  mesh = mesh or sharding_lib.make_mesh(config.mesh.to_dict())
  sharding_lib.check_batch_size(config.global_batch_size, mesh)
  if config.grad_accum_steps != 1:
    raise ValueError("train_vae does not support grad_accum_steps != 1 (the discriminator "
                     "steps once per batch)")
  rules = sharding_lib.rules_from_config(train_config.parse_rules(config.sharding_rules))
  comp = build_vae(config)
  vae = comp.vae
  disc = PatchDiscriminator(config.loss.disc_channels, config.loss.disc_layers)
  f, r = config.data.frames, config.data.resolution
  video = jnp.zeros((1, f, r, r, 3), jnp.float32)
  rng = jax.random.PRNGKey(config.seed)
  k_vae, k_disc, k_state = jax.random.split(rng, 3)

  vae_init = lambda k: vae.init(k, video)["params"]
  boxed = jax.eval_shape(vae_init, k_vae)
  params_sh = sharding_lib.param_shardings(boxed, mesh, rules)
  abstract_params = sharding_lib.unbox(boxed)
  if comp.vae_params is not None:
    loaded = dict(comp.vae_params)
    has_temporal = any("temp_" in train_lib.path_str(p)
                       for p, _ in jax.tree_util.tree_flatten_with_path(loaded)[0])
    if not has_temporal:
      # Image VAE: check the spatial part, then add fresh (zero-output) temporal convs.
      spatial_mask = jax.tree_util.tree_map_with_path(
          lambda p, _: "temp_" not in train_lib.path_str(p), abstract_params)
      train.check_shapes("VAE (init_from)", loaded, train_lib.select(abstract_params, spatial_mask))
    else:
      train.check_shapes("VAE (init_from)", loaded, abstract_params)

  patterns = train_lib.parse_patterns(config.trainable)
  mask = train_lib.trainable_mask(abstract_params, patterns,
                                  train_lib.parse_patterns(config.frozen) if config.frozen else ())
  train_lib.check_mask(mask, patterns)
  opt = config.optimizer.copy_and_resolve_references()
  with opt.unlocked():
    if opt.decay_steps < 0:
      opt.decay_steps = config.num_steps
  tx, schedule = train_lib.make_optimizer(opt, mask)
  disc_tx = optax.adam(config.loss.disc_learning_rate, b1=0.5, b2=0.9)
  ema = config.ema_decay > 0

  def make_state(params, k):
    disc_params = disc.init(k_disc, video[0])["params"]
    return VAETrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree.map(jnp.copy, train_lib.select(params, mask)) if ema else {},
        opt_state=tx.init(params), disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params),
        rng=k, nan_streak=jnp.zeros((), jnp.int32), nan_total=jnp.zeros((), jnp.int32))

  abstract_state = jax.eval_shape(make_state, abstract_params, k_state)
  rep = NamedSharding(mesh, P())
  disc_sh = sharding_lib.fsdp_shardings_for(abstract_state.disc_params, mesh)
  state_sh = VAETrainState(
      step=rep, params=params_sh,
      ema_params=train_lib.shardings_like_params(abstract_state.ema_params, params_sh,
                                                 abstract_params, mesh),
      opt_state=train_lib.shardings_like_params(abstract_state.opt_state, params_sh,
                                                abstract_params, mesh),
      disc_params=disc_sh,
      disc_opt_state=train_lib.shardings_like_params(abstract_state.disc_opt_state, disc_sh,
                                                     abstract_state.disc_params, mesh),
      rng=rep, nan_streak=rep, nan_total=rep)
  abstract_state = train_lib.abstract_with_shardings(abstract_state, state_sh)

  random_init = jax.jit(lambda k, ks: make_state(sharding_lib.unbox(vae_init(k)), ks),
                        out_shardings=state_sh)
  fresh_params = jax.jit(lambda k: sharding_lib.unbox(vae_init(k)), out_shardings=params_sh)
  state_from_params = jax.jit(make_state, out_shardings=state_sh, donate_argnums=(0,))

  def init_state():
    if comp.vae_params is None:
      return random_init(k_vae, k_state)
    params = train_lib.merge(fresh_params(k_vae), jax.device_put(
        dict(comp.vae_params), _subset_shardings(comp.vae_params, params_sh)))
    return state_from_params(params, k_state)

  b = config.global_batch_size
  batch_shapes = {"video": jax.ShapeDtypeStruct((b, f, r, r, 3), jnp.float32,
                                                sharding=sharding_lib.batch_sharding(mesh, 5))}
  cfg = VAEStepConfig(rec_weight=config.loss.rec_weight, kl_weight=config.loss.kl_weight,
                      disc_weight=config.loss.disc_weight, disc_start=config.loss.disc_start,
                      ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)
  step_fn = functools.partial(vae_train_step, vae=vae, disc=disc, tx=tx, disc_tx=disc_tx,
                              mask=mask, schedule=schedule, cfg=cfg)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, {"video": batch_shapes["video"].sharding}, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
  init_frozen = lambda: jnp.zeros((), jnp.float32)
  return VAESetup(mesh, comp, mask, abstract_state, state_sh, batch_shapes, init_state,
                  init_frozen, jitted, ema)


def _subset_shardings(subset: PyTree, full_shardings: PyTree) -> PyTree:
  if isinstance(subset, dict):
    return {k: _subset_shardings(v, full_shardings[k]) for k, v in subset.items()}
  return full_shardings


def trained_vae_params(st: VAESetup, state: VAETrainState) -> PyTree:
  return train_lib.merge(state.params, state.ema_params) if st.ema else state.params


def export_vae(config, st: VAESetup, state: VAETrainState, out_dir: str) -> None:
  """With init_from: the whole pipeline with the fine-tuned VAE swapped in. Without: the VAE
  alone (``vae/config.json`` + ``vae/params`` orbax), the format's vae piece."""
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(np.asarray, jax.device_get(trained_vae_params(st, state)))
  if jax.process_index() != 0:
    return
  comp = st.components
  if comp.pipeline is not None:
    pipe = comp.pipeline.replace(vae=comp.vae, params=dict(comp.pipeline.params, vae=params))
    pipeline_lib.save_pipeline(out_dir, pipe, info={"source": "vidrd_jax.train_vae"},
                               overwrite=True)
    return
  os.makedirs(os.path.join(out_dir, "vae"), exist_ok=True)
  with open(os.path.join(out_dir, "vae", "config.json"), "w", encoding="utf-8") as fp:
    json.dump(comp.vae_config.to_diffusers(), fp, indent=2)
  pipeline_lib.save_params(os.path.join(out_dir, "vae", "params"), params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes the temporal decoder in ``workdir`` (resuming if it has checkpoints)."""
  if config.distributed and jax.process_count() == 1:
    jax.distributed.initialize()
  train_config.check_config(config, train_config.vae_base_config())
  st = train.cached_setup(config, workdir, builder=setup)
  n_total = train_lib.count_params(st.abstract_state.params)
  n_train = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(st.abstract_state.params),
                                                      jax.tree.leaves(st.mask)) if m)
  logging.info("VAE parameters: %d total, %d trainable (temporal decoder convs)", n_total, n_train)
  export = lambda state, frozen, out: export_vae(config, st, state, out)
  return train.run_loop(config, workdir, st, export_fn=export)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "VAE fine-tuning config (configs/vae_*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
