"""Every training config field, with defaults, in one place.

The files in ``configs/`` start from :func:`base_config` (UNet training) or
:func:`vae_base_config` (VAE decoder fine-tuning) and change values; they never add keys.
:func:`check_config` rejects any key that is not defined here, so a typo such as
``--config.optimizer.learnig_rate`` (caught by ``config_flags`` on the command line) or a
misspelt field in a config file fails before anything is built.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# The values the train step knows (vidrd_jax.train_lib); checked here before anything compiles.
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def one_of(names: tuple[str, ...]) -> str:
  """"'a' or 'b'": the allowed values, for error messages."""
  return " or ".join(repr(n) for n in names)


def _optimizer() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-4,
      schedule="cosine",          # "cosine" (warmup then cosine) or "constant" (warmup then flat)
      warmup_steps=500,
      decay_steps=-1,             # -1: num_steps
      end_lr_factor=0.1,          # final lr = learning_rate * end_lr_factor (cosine)
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=1e-2,
      grad_clip=1.0,              # global-norm clip; 0 disables
  ))


def _data() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      frames=8,
      resolution=32,
      # vidrd_jax.data source specs ({"kind", "path", "weight", options}); see
      # vidrd_jax/data/sources.py. Default: the built-in synthetic moving shapes.
      sources=[{"kind": "synthetic", "num_records": 4096, "weight": 1.0}],
      latents=False,              # sources yield pre-encoded VAE latents (packed latent shards)
      worker_count=0,             # grain worker processes (0 = in-process)
      worker_buffer_size=2,
  ))


def _common(config: ml_collections.ConfigDict) -> None:
  config.seed = 0
  config.num_steps = 1000
  config.global_batch_size = 8
  config.grad_accum_steps = 1     # micro-batches per optimizer step (global batch is split)
  config.optimizer = _optimizer()
  # Mesh axis sizes; one may be -1 ("all remaining devices"). Batch is split over data x fsdp.
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # Overrides of vidrd_jax.parallel.sharding.DEFAULT_RULES: "logical=mesh_axis[+mesh_axis],..."
  # e.g. "mlp=tensor,heads=tensor"; "embed=" replicates. Empty = defaults.
  config.sharding_rules = ""
  config.distributed = False      # call jax.distributed.initialize() (multi-host pods)
  config.log_every = 10
  config.checkpoint_every = 500
  config.keep_checkpoints = 3     # most recent K
  config.keep_best = 1            # plus the best N by training loss
  config.async_checkpointing = True
  config.preempt_at_step = -1     # >= 0: send SIGTERM to ourselves after this step (testing)
  config.max_nan_steps = 20       # stop after this many non-finite steps in a row
  config.progress_bar = True
  config.tensorboard = True


def base_config() -> ml_collections.ConfigDict:
  """UNet3D training (``python -m vidrd_jax.train``)."""
  config = ml_collections.ConfigDict()
  _common(config)
  # Converted pipeline directory (weight_conversion output, or a previous export) to start
  # from; "" = random init from the presets below (tiny configs).
  config.init_from = ""
  config.model = ml_collections.ConfigDict(dict(
      unet="tiny",                # UNet3DConfig preset: "tiny" or "sd21_base"
      vae="tiny",                 # AutoencoderKLConfig preset (random init only)
      text_encoder="tiny",        # CLIPTextConfig preset (random init only)
      dtype="float32",            # compute dtype: "bfloat16" on accelerators
      param_dtype="float32",      # master weights
      attention_impl="",          # "", "xla", "cudnn", "splash" ("" = backend default)
      remat=False,                # rematerialise UNet blocks in the backward pass
      add_temp_conv=True,
      add_temp_embed=True,
      add_temp_attn=True,
      # Dropout inside the UNet's TemporalConvLayers: the reference hard-codes 0.1 (for
      # fine-tuning a pretrained SD); its masks cost ~10 % of a tiny model's CPU step.
      temp_conv_dropout=0.1,
      prediction_type="epsilon",  # "epsilon" (SD2.1-base) or "v_prediction" (SD2.1-768)
  ))
  # Trainable parameters: regexes over "/"-joined UNet parameter paths, comma-separated;
  # "paper" = temporal layers + spatial transformer blocks, "all" = everything.
  config.trainable = "paper"
  config.frozen = ""              # regexes removed from the trainable set
  config.caption_dropout = 0.1    # classifier-free guidance: P(caption -> "")
  # Training timestep density (vidrd_jax.train_lib.sample_timesteps): "uniform" (the
  # reference) or "logit_normal" (t / T = sigmoid(mean + std * N(0, 1))).
  config.timestep_sampling = "uniform"
  config.timestep_logit_mean = 0.0
  config.timestep_logit_std = 1.0
  # Min-SNR-gamma loss weighting (train_lib.min_snr_weights; diffusers' --snr_gamma, 5.0 in its
  # paper): 0 trains with the reference's plain MSE.
  config.snr_gamma = 0.0
  config.ema_decay = 0.9999
  config.ema_warmup = True
  config.sample_posterior = True  # VAE posterior sample (True) or mean as the latent
  config.data = _data()
  # Periodic sample videos from fixed prompts (EMA weights); 0 disables.
  config.sample_every = 0
  config.sample_prompts = ("a red circle moving left", "a blue square moving down")
  config.sample_steps = 25
  config.sample_guidance = 7.5
  config.sample_clips = 2
  config.export = True            # write WORKDIR/export (pipeline format, EMA weights) at the end
  return config


def vae_base_config() -> ml_collections.ConfigDict:
  """Temporal VAE decoder fine-tuning (``python -m vidrd_jax.train_vae``)."""
  config = ml_collections.ConfigDict()
  _common(config)
  config.init_from = ""           # converted pipeline dir (its vae/ is the start point)
  config.model = ml_collections.ConfigDict(dict(
      vae="tiny",                 # AutoencoderKLConfig preset (random init only)
      dtype="float32",            # compute dtype; parameters stay float32
  ))
  config.trainable = r"(^|/)decoder/.*temp_"   # only the decoder's temporal convs
  config.frozen = ""
  config.loss = ml_collections.ConfigDict(dict(
      rec_weight=1.0,             # a_rec (L1)
      lpips_weight=0.0,           # > 0 needs LPIPS weights at lpips_path
      lpips_path="",
      kl_weight=1e-6,             # a_reg
      disc_weight=0.5,            # a_disc
      disc_start=1000,            # generator adversarial term and D updates start here
      disc_channels=64,
      disc_layers=3,
      disc_learning_rate=1e-4,
  ))
  config.ema_decay = 0.0          # 0: no EMA (the VAE is small; export trained weights)
  config.ema_warmup = True
  config.data = _data()
  config.export = True
  return config


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _flat_keys(value, name + ".")
    else:
      keys.add(name)
  return keys


def check_config(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming unknown or missing fields and obviously bad values."""
  got, want = _flat_keys(config), _flat_keys(base)
  unknown, missing = sorted(got - want), sorted(want - got)
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f"unknown config fields: {', '.join(unknown)}")
    if missing:
      parts.append(f"missing config fields: {', '.join(missing)}")
    raise ValueError("; ".join(parts))
  positive = ("num_steps", "global_batch_size", "grad_accum_steps", "log_every",
              "checkpoint_every", "keep_checkpoints")
  for key in positive:
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
  if config.global_batch_size % config.grad_accum_steps:
    raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by "
                     f"grad_accum_steps {config.grad_accum_steps}")
  if "timestep_sampling" in config:
    if config.timestep_sampling not in TIMESTEP_SAMPLINGS:
      raise ValueError(f"timestep_sampling must be {one_of(TIMESTEP_SAMPLINGS)}, "
                       f"got {config.timestep_sampling!r}")
    if not config.timestep_logit_std > 0:
      raise ValueError(f"timestep_logit_std must be > 0, got {config.timestep_logit_std}")
  if "snr_gamma" in config and not config.snr_gamma >= 0:
    raise ValueError(f"snr_gamma must be >= 0 (0: unweighted MSE), got {config.snr_gamma}")
  if "model" in config and "temp_conv_dropout" in config.model:
    if not 0.0 <= config.model.temp_conv_dropout < 1.0:
      raise ValueError(f"model.temp_conv_dropout must be in [0, 1), got {config.model.temp_conv_dropout}")
  if "caption_dropout" in config and not 0.0 <= config.caption_dropout < 1.0:
    raise ValueError(f"caption_dropout must be in [0, 1), got {config.caption_dropout}")
  if "ema_decay" in config and not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
  pt = config.model.get("prediction_type")
  if pt is not None and pt not in PREDICTION_TYPES:
    raise ValueError(f"model.prediction_type must be {one_of(PREDICTION_TYPES)}, got {pt!r}")


def parse_rules(spec: str) -> list[tuple[str, Any]]:
  """"mlp=tensor,heads=tensor+fsdp,embed=" -> [("mlp", ("tensor",)), ...]."""
  rules = []
  for item in [s.strip() for s in spec.split(",") if s.strip()]:
    if "=" not in item:
      raise ValueError(f"sharding rule {item!r} must look like logical=mesh_axis")
    logical, mesh_axes = item.split("=", 1)
    mesh_axes = tuple(a for a in mesh_axes.split("+") if a)
    rules.append((logical.strip(), mesh_axes or None))
  return rules
