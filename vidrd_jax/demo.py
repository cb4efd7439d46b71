r"""The built-in demo: train a tiny VidRD from scratch on CPU, then generate long videos.

    python -m vidrd_jax.demo --out=demo_out [--quick] [--fresh]

Everything runs on a laptop CPU with no downloads, in about 15 minutes on 2 cores:

1. A tiny temporal VAE (32x32 frames <-> 8x8x4 latents) is trained for reconstruction on
   the built-in synthetic moving-shape videos (``vidrd_jax.data.synthetic``); its scaling
   factor is set so the latents have unit variance, as SD's 0.18215 does for SD's VAE.
2. It is written, with a randomly initialised tiny UNet3D and a random (frozen) tiny CLIP text
   encoder, as a pipeline directory. ``settings.latent_clips`` training clips are encoded once
   by the VAE into packed latent shards (``vidrd_jax.data.pack``, the path pod training takes),
   and ``vidrd_jax.train.train_and_evaluate`` trains the UNet3D on them in two stages, as VidRD
   inflates an image model (SD2.1) to video: first on single frames of the clips (one frame
   bypasses every temporal layer, so this is the image model), then the whole UNet3D on the
   clips (``configs/tiny_cpu.py``), checkpointing as it goes, and exports the trained pipeline.
   The text encoder stays random: its token embeddings are distinct, and the UNet's
   cross-attention learns to read them.
3. Long videos (4 clips of 8 frames) are sampled with ``vidrd_jax.generate`` for caption
   combinations held out of training, once with VidRD's strategies (FNR + PNS + DSG) and once
   as independent clips (no reused noise, fresh noise per clip, no staged guidance).
4. Outputs in ``--out``: ``videos/*.mp4|gif`` per prompt and method, ``strips/*.png`` (frames of
   both methods side by side, clip seams marked), ``loss_curve.png``, and ``metrics.json`` with
   caption following (an analytic detector, ``vidrd_jax.eval.detector``, reads colour, shape and
   direction from the frames), the detector's own accuracy on real clips, the clip-boundary
   ratio (change across seams / change inside clips) for both methods, and how much the
   denoising loss on real clips rises when one caption word is swapped
   (``vidrd_jax.eval.caption_sensitivity``: whether the model reads each word at all).

Re-running reuses the finished stages in ``--out/work`` (trained VAE, packed latents, training
checkpoints) and rewrites every output; an interrupted run resumes training from its last
checkpoint. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import resource
import shutil
import sys
import time
from typing import Any, Sequence

# The demo is CPU-only by design; keep JAX off accelerators unless the user says otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vidrd_jax import host_allocator  # noqa: E402
from vidrd_jax.data import synthetic  # noqa: E402
from vidrd_jax.eval import metrics as metrics_lib  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_cpu.py")


@dataclasses.dataclass
class DemoSettings:
  """What the demo does around training (the training itself is in the config file)."""
  # Stage 1: the tiny VAE.
  vae_channels: tuple[int, ...] = (32, 32, 64)   # 3 levels: 32x32 frames -> 8x8 latents
  norm_groups: int = 8                # GroupNorm groups of the VAE and UNet (spatial layers)
  # The autoencoder's reconstructions bound what the UNet can draw: after 300 steps of 16 frames
  # it rounded the corners of a single frame's square or triangle (detector 0.64 on shape),
  # after 800 steps of 8 it keeps them (0.98; docs/demo_findings.md) for 30-40 s more.
  vae_steps: int = 800
  vae_batch: int = 8                  # single frames
  vae_learning_rate: float = 1e-3
  vae_kl_weight: float = 1e-6
  vae_foreground_weight: float = 9.0
  vae_temporal: bool = True           # VidRD's temporal decoder (needs channels in 32s)
  # Stage 2: the UNet3D (overrides of UNet3DConfig.tiny).
  unet_channels: tuple[int, ...] = (32, 64)
  unet_heads: int = 2
  # Levels (from the finest) whose blocks carry transformers (cross- and temporal attention);
  # the mid block always does. 1: only the 8x8 level, as UNet3DConfig.tiny.
  unet_attention_levels: int = 1
  # Small non-zero start of the temporal layers' output projections (UNet3DConfig's
  # temporal_init_scale; 0 is the paper's zero init, meant for inflating a pretrained SD, while
  # this UNet is trained from scratch).
  temporal_init_scale: float = 0.1
  # Training clips encoded once by the trained VAE before the UNet trains on their latents
  # (vidrd_jax.data.pack, the pod path): encoding every clip of every step on the fly cost
  # about a quarter of each step; at 500 steps x 8 each packed clip is seen about twice (and
  # ~25 times as a single frame in the image stage).
  latent_clips: int = 2048
  # Stage 2a: single frames of the packed clips before the clips themselves (0 skips it). A
  # frame's appearance (colour, shape) is what an image model learns; 64 independent frames
  # cost about what 8 clips of 8 correlated frames do, so the shape word binds from ~8x more
  # examples (docs/demo_findings.md: shape word +7 % -> +36-46 %, shape following 0.33 -> 0.58-0.67).
  image_steps: int = 800
  image_batch: int = 64
  # Stage 3: sampling.
  num_clips: int = 4
  overlap: int = 4                    # M
  noise_recycle: float = 4.0          # alpha
  staged_guidance: float = 0.4        # beta
  num_steps: int = 25
  guidance_scale: float = 5.0
  seeds: tuple[int, ...] = (0,)       # one long video per held-out prompt per seed
  max_prompts: int = 0                # 0: every held-out (colour, shape, direction) triple
  fps: float = 8.0
  detector_clips: int = 96            # real clips used to check the detector
  sensitivity_clips: int = 64         # real training clips for the caption-word sensitivity


def quick_settings() -> DemoSettings:
  """A smoke run (a few CPU-minutes, mostly compiling): everything exercised, nothing learned."""
  return DemoSettings(vae_steps=20, num_steps=4, latent_clips=64, image_steps=4, image_batch=8,
                      max_prompts=2, detector_clips=8, sensitivity_clips=4)


def load_config(path: str, quick: bool):
  """The training config (``get_config()`` of a configs/*.py file); ``quick`` shrinks it."""
  spec = importlib.util.spec_from_file_location("demo_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if quick:
    config.num_steps = 6
    config.log_every = 2
    config.checkpoint_every = 3
    config.optimizer.warmup_steps = 1
  return config


def synthetic_options(config) -> dict[str, Any]:
  """The synthetic source's vocabulary options from the config's data sources."""
  for spec in config.data.get("sources", []) or []:
    spec = dict(spec)
    if spec.get("kind") == "synthetic":
      return {k: v for k, v in spec.items() if k not in ("kind", "num_records", "weight", "path")}
  return {}


def _log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Stage 1: the tiny VAE.

def vae_spec(config, settings: DemoSettings, seed: int) -> dict[str, Any]:
  """What the demo's VAE is trained from; a change trains it again (and so everything after it)."""
  spec = {"channels": settings.vae_channels, "norm_groups": settings.norm_groups,
          "temporal": settings.vae_temporal, "steps": settings.vae_steps,
          "batch": settings.vae_batch, "learning_rate": settings.vae_learning_rate,
          "kl_weight": settings.vae_kl_weight, "foreground_weight": settings.vae_foreground_weight,
          "resolution": int(config.data.resolution), "data": synthetic_options(config),
          "seed": int(seed)}
  return json.loads(json.dumps(spec, default=_json_default))


def holds_vae(out_dir: str, spec: dict[str, Any]) -> bool:
  """Whether ``out_dir`` holds a complete VAE trained from ``spec`` (see ``vae_spec``)."""
  check_file = os.path.join(out_dir, "check.json")
  return (os.path.isfile(os.path.join(out_dir, "config.json"))
          and os.path.isdir(os.path.join(out_dir, "params"))
          and _json_file_equals(check_file, spec, key="spec"))


def train_vae(config, settings: DemoSettings, out_dir: str, seed: int = 0):
  """Trains the tiny temporal VAE for reconstruction; caches the result in ``out_dir``.

  Returns:
    (AutoencoderKLConfig with the fitted scaling factor, params, quality check dict).
  """
  from vidrd_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top

  params_dir = os.path.join(out_dir, "params")
  config_file = os.path.join(out_dir, "config.json")
  spec = vae_spec(config, settings, seed)
  if holds_vae(out_dir, spec):
    with open(config_file) as f:
      cfg = vae_lib.AutoencoderKLConfig.from_diffusers(json.load(f))
    with open(os.path.join(out_dir, "check.json")) as f:
      check = json.load(f)
    _log(f"VAE: reusing {out_dir}")
    return cfg, pipeline_lib.load_params(params_dir), check
  if os.path.isdir(out_dir):
    _log(f"VAE: {out_dir} is incomplete or was trained with other settings; training again")

  # 8 groups (4 channels each, as SD's 128 / 32): with one channel per group, GroupNorm
  # normalises every channel on its own and the relative channel amplitudes that carry colour
  # are lost.
  cfg = vae_lib.AutoencoderKLConfig.tiny(temporal=settings.vae_temporal,
                                         norm_num_groups=settings.norm_groups,
                                         block_out_channels=tuple(settings.vae_channels))
  model = vae_lib.AutoencoderKL(cfg)
  frames, res = config.data.frames, config.data.resolution
  # Single frames: the spatial autoencoder is what needs training. The temporal decoder's convs
  # are bypassed for one frame and stay zero-initialised (identity), exactly the state of a
  # freshly inflated temporal VAE.
  source = synthetic.SyntheticVideoSource(10**6, 1, res, seed=seed + 1, **synthetic_options(config))
  rng = jax.random.PRNGKey(seed)
  params = jax.jit(lambda k: nn_unbox(model.init(k, jnp.zeros((1, 1, res, res, 3)))["params"]))(rng)
  peak = settings.vae_learning_rate
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, peak, 20, max(settings.vae_steps, 21),
                                                     0.05 * peak))
  opt_state = tx.init(params)

  def loss_fn(p, video, key):
    del key
    mean, logvar = model.apply({"params": p}, video, method="encode")
    # Decoding the posterior mean (a plain autoencoder) learns several times faster than decoding
    # posterior samples, whose initial unit variance drowns the signal; the UNet's training then
    # uses the mean too (config.sample_posterior = False). The KL term keeps the latents centred.
    recon = model.apply({"params": p}, mean, method="decode")
    err = recon - video
    # The shapes cover ~10% of the frame: weighting their pixels up keeps the autoencoder from
    # settling on "background plus a grey blob" before it has learned colour and outline.
    background = jnp.median(video.reshape(video.shape[0], -1, 3), axis=1)[:, None, None, None]
    weight = 1.0 + settings.vae_foreground_weight * (
        jnp.abs(video - background).sum(-1, keepdims=True) > 0.1)
    # L1 for sharp edges plus L2 for colour fidelity.
    rec = jnp.mean(weight * (jnp.abs(err) + jnp.square(err))) / jnp.mean(weight)
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + settings.vae_kl_weight * kl, rec

  @jax.jit
  def step(p, o, video, key):
    (_, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, video, key)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, rec

  t0 = time.perf_counter()
  rec = float("nan")
  for i in range(settings.vae_steps):
    idx = range(i * settings.vae_batch, (i + 1) * settings.vae_batch)
    video = np.stack([source[j]["video"] for j in idx])[:, None, 0]
    params, opt_state, rec = step(params, opt_state, video, jax.random.fold_in(rng, i))
    if (i + 1) % 50 == 0 or i + 1 == settings.vae_steps:
      _log(f"VAE step {i + 1}/{settings.vae_steps}: reconstruction loss {float(rec):.4f} "
           f"({time.perf_counter() - t0:.0f} s)")

  # The detector on reconstructions of real clips says whether colour, shape and motion survive.
  check = synthetic.SyntheticVideoSource(10**6, frames, res, seed=seed + 7, split="all",
                                         **synthetic_options(config))
  records = [check[j] for j in range(16)]
  video = np.stack([r["video"] for r in records])
  recon = np.asarray(jax.jit(lambda p, v: model.apply({"params": p}, v))(params, video))
  vae_check = metrics_lib.caption_following(
      list(recon), [r["attributes"] for r in records], check.colors, check.shapes, check.directions)
  _log(f"VAE: detector on reconstructions of 16 real clips: {vae_check['accuracy']}")

  # Unit-variance latents for the diffusion model (what 0.18215 does for SD's VAE).
  video = np.stack([source[j]["video"] for j in range(10**5, 10**5 + 64)])[:, None, 0]
  mean, _ = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode"))(params, video)
  scale = float(1.0 / np.std(np.asarray(mean)))
  cfg = dataclasses.replace(cfg, scaling_factor=scale)
  _log(f"VAE: final reconstruction loss {float(rec):.4f}, latent scaling factor {scale:.4f}")
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  pipeline_lib.save_params(os.path.join(tmp, "params"), params)
  check = {"reconstruction_loss": float(rec), "steps": settings.vae_steps,
           "detector_on_reconstructions": vae_check["accuracy"], "scaling_factor": scale,
           "spec": spec}
  with open(os.path.join(tmp, "check.json"), "w") as f:
    json.dump(check, f, indent=2)
  # config.json last: its presence marks a complete stage.
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg.to_diffusers(), f, indent=2)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)
  return cfg, params, check


def nn_unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(tree)


# ----------------------------------------------------------------------------------------------
# Stage 2: the UNet3D.

def unet_config(config, settings: DemoSettings, vae_cfg, text_cfg):
  """The demo's tiny UNet3DConfig (what ``build_init_pipeline`` initialises)."""
  from vidrd_jax.models import unet3d  # pylint: disable=g-import-not-at-top
  levels = len(settings.unet_channels)
  if not 0 <= settings.unet_attention_levels <= levels:
    raise ValueError(f"unet_attention_levels must be in [0, {levels}], got "
                     f"{settings.unet_attention_levels}")
  down = tuple("CrossAttnDownBlock2D" if i < settings.unet_attention_levels else "DownBlock2D"
               for i in range(levels))
  up = tuple(t.replace("Down", "Up") for t in reversed(down))
  return unet3d.UNet3DConfig.tiny(
      down_block_types=down, up_block_types=up,
      block_out_channels=tuple(settings.unet_channels), attention_head_dim=settings.unet_heads,
      norm_num_groups=settings.norm_groups, temporal_init_scale=settings.temporal_init_scale,
      cross_attention_dim=text_cfg.hidden_size,
      sample_size=config.data.resolution // vae_cfg.downsample_factor)


def holds_start_point(pipeline_dir: str, unet_cfg, vae_cfg, vae_params) -> bool:
  """Whether ``pipeline_dir`` is a complete pipeline with a UNet of config ``unet_cfg`` and
  exactly this VAE (config and weights: a VAE trained again makes a new start point)."""
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(pipeline_dir) or pipeline_lib.missing_pieces(pipeline_dir):
    return False
  saved_unet, saved_vae, *_ = pipeline_lib.read_configs(pipeline_dir)
  if (saved_unet.to_diffusers() != unet_cfg.to_diffusers()
      or saved_vae.to_diffusers() != vae_cfg.to_diffusers()):
    return False
  saved = pipeline_lib.load_params(os.path.join(pipeline_dir, pipeline_lib.PARAMS_DIR))["vae"]
  if jax.tree.structure(saved) != jax.tree.structure(vae_params):
    return False
  return all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(vae_params)))


def build_init_pipeline(config, settings: DemoSettings, vae_cfg, vae_params, out_dir: str,
                        seed: int = 0) -> str:
  """Writes the start point of training: random tiny UNet3D, trained VAE, random text encoder."""
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import text_encoder as text_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import unet3d  # pylint: disable=g-import-not-at-top

  text_cfg = text_lib.CLIPTextConfig.tiny()
  unet_cfg = unet_config(config, settings, vae_cfg, text_cfg)
  if holds_start_point(out_dir, unet_cfg, vae_cfg, vae_params):
    _log(f"init pipeline: reusing {out_dir}")
    return out_dir
  if os.path.isdir(out_dir):
    # Other UNet settings or another VAE: a new start point (and, through its new stamp, new
    # latents and training).
    _log(f"init pipeline: {out_dir} is incomplete or holds another UNet config or VAE; "
         "initialising again")
  k_unet, k_text = jax.random.split(jax.random.PRNGKey(seed + 2))
  # Jitted: op-by-op initialisation of the UNet3D on CPU takes tens of seconds.
  unet_params = jax.jit(lambda k: nn_unbox(unet3d.init_params(unet_cfg, k)))(k_unet)
  ids = jnp.zeros((1, text_cfg.max_position_embeddings), jnp.int32)
  text_params = nn_unbox(text_lib.CLIPTextModel(text_cfg).init(k_text, ids)["params"])
  scheduler = pipeline_lib.ddim_scheduler_config(prediction_type=config.model.prediction_type)
  pipeline_lib.save_pipeline(
      out_dir,
      {"unet_config": unet_cfg, "vae_config": vae_cfg, "text_encoder_config": text_cfg,
       "tokenizer": None, "scheduler_config": scheduler,
       "params": {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}},
      info={"source": "vidrd_jax.demo: random tiny UNet3D and text encoder, trained tiny VAE"},
      overwrite=True)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(unet_params))
  _log(f"init pipeline: UNet3D {n / 1e6:.2f}M parameters (channels {unet_cfg.block_out_channels}) "
       f"-> {out_dir}")
  return out_dir


def pack_latents(config, settings: DemoSettings, init_dir: str, out_dir: str) -> str:
  """Encodes ``settings.latent_clips`` training clips with the trained VAE into packed shards.

  Reused when ``out_dir`` already holds them; written to a temporary folder and renamed, so an
  interrupted run never leaves half a set behind.
  """
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.data import pack as pack_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.data import packed  # pylint: disable=g-import-not-at-top

  # What the latents were made from: a change of data options (or of the VAE) re-encodes them.
  spec = {"sources": [dict(s) for s in config.data.sources], "frames": int(config.data.frames),
          "resolution": int(config.data.resolution), "num_records": int(settings.latent_clips),
          "seed": int(config.seed),
          # The init pipeline is rewritten for another UNet config or VAE (or by a fresh start).
          "init_written": os.path.getmtime(os.path.join(init_dir, "vidrd.json"))}
  spec = json.loads(json.dumps(spec, default=_json_default))
  spec_file = os.path.join(out_dir, "demo_spec.json")
  if os.path.isfile(os.path.join(out_dir, packed.METADATA)) and os.path.isfile(spec_file):
    if _json_file_equals(spec_file, spec):
      _log(f"latents: reusing {out_dir}")
      return out_dir
    _log(f"latents: data options or VAE changed since {out_dir} was written; encoding again")
  t0 = time.perf_counter()
  pipe = pipeline_lib.load_pipeline(init_dir)
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  pack_lib.pack([dict(s) for s in config.data.sources], tmp, frames=config.data.frames,
                resolution=config.data.resolution, num_records=settings.latent_clips,
                seed=config.seed, encode_fn=pipe.encode_frames, latent_dtype="float32",
                batch_size=64, prefix="latents")
  with open(os.path.join(tmp, "demo_spec.json"), "w") as f:
    json.dump(spec, f, indent=1)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)
  _log(f"latents: {settings.latent_clips} training clips encoded in "
       f"{time.perf_counter() - t0:.0f} s -> {out_dir}")
  return out_dir


def _json_file_equals(path: str, obj: Any, key: str | None = None) -> bool:
  """Whether the JSON file ``path`` exists and holds ``obj`` (under ``key``, if given)."""
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  if key is not None:
    saved = saved.get(key) if isinstance(saved, dict) else None
  return saved == obj


def forget_training_on_other_latents(latents_dir: str, train_dir: str,
                                     start: Any = None) -> None:
  """Removes ``train_dir`` unless its run trained on ``latents_dir`` as it is now.

  A resumed run must continue on the data and from the start point it began with: when the
  latents were encoded again (other data options, another VAE) or ``start`` (a JSON-able
  description of what training starts from, e.g. the image stage's settings) changed, the old
  checkpoints are discarded.
  """
  with open(os.path.join(latents_dir, "demo_spec.json")) as f:
    spec = json.load(f)
  if start is not None:
    spec = {**spec, "start": json.loads(json.dumps(start, default=_json_default))}
  marker = os.path.join(train_dir, "latents_spec.json")
  if os.path.isdir(train_dir):
    if _json_file_equals(marker, spec):
      return
    _log(f"training: {train_dir} was trained on other latents or from another start; "
         "starting over")
    shutil.rmtree(train_dir)
  os.makedirs(train_dir)
  with open(marker + ".tmp", "w") as f:
    json.dump(spec, f, indent=1)
  os.replace(marker + ".tmp", marker)


def on_latents(config, latents_dir: str):
  """The training config reading ``latents_dir`` (packed latents) instead of rendering clips."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.sources = [{"kind": "packed", "path": latents_dir, "weight": 1.0}]
    config.data.latents = True
  return config


def image_config(config, settings: DemoSettings):
  """Stage 2a's training config: single frames (``data.frames = 1``) of the same clips.

  With one frame the UNet3D skips its temporal convolutions and temporal attention, so this
  trains the image model VidRD inflates; the packed source draws a random frame of each clip.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.frames = 1
    config.global_batch_size = settings.image_batch
    config.num_steps = settings.image_steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, settings.image_steps // 4)
  return config


def train_unet(config, init_dir: str, workdir: str):
  """Runs (or resumes) ``vidrd_jax.train.train_and_evaluate``; returns the trained pipeline."""
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax import train as train_mod  # pylint: disable=g-import-not-at-top
  from vidrd_jax import train_lib  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
  with config.unlocked() if hasattr(config, "unlocked") else _nullcontext():
    config.init_from = init_dir
    config.trainable = "all"
  _log(f"training UNet3D for {config.num_steps} steps (batch {config.global_batch_size}, "
       f"{config.data.frames}x{config.data.resolution}x{config.data.resolution}) in {workdir}")
  result = train_mod.train_and_evaluate(config, workdir)
  if result.get("preempted"):
    raise SystemExit("training was interrupted; run the demo again to resume from the checkpoint")
  export = os.path.join(workdir, "export")
  if os.path.isdir(export) and not pipeline_lib.missing_pieces(export):
    pipe = pipeline_lib.load_pipeline(export)
  else:
    # No export written: assemble the trained pipeline from the final state (EMA weights).
    init = pipeline_lib.load_pipeline(init_dir)
    state = result["state"]
    unet = train_lib.merge(state.params, state.ema_params)
    pipe = init.replace(params={**init.params, "unet": jax.device_get(unet)})
  return pipe, result


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


# ----------------------------------------------------------------------------------------------
# Stage 3: long videos and their scores.

def word_sensitivity(pipe, config, settings: DemoSettings) -> dict[str, Any]:
  """Denoising-loss increase on real training clips when one caption word is swapped.

  Tells a word the model never learned to read (no increase) from one it reads but that
  sampling does not carry through (an increase, yet low caption-following accuracy).
  """
  from vidrd_jax.eval import caption_sensitivity  # pylint: disable=g-import-not-at-top
  source = synthetic.SyntheticVideoSource(
      settings.sensitivity_clips, config.data.frames, config.data.resolution, seed=4242,
      split="train", **synthetic_options(config))
  records = [source[i] for i in range(len(source))]
  latents = np.asarray(pipe.encode_frames(np.stack([r["video"] for r in records])))
  return caption_sensitivity.attribute_sensitivity(
      pipe, latents, [r["attributes"] for r in records],
      {"color": source.colors, "shape": source.shapes, "direction": source.directions},
      source.caption)


def heldout_targets(config, settings: DemoSettings) -> list[dict[str, str]]:
  """One target per held-out (colour, shape, direction) triple of the training data."""
  source = synthetic.SyntheticVideoSource(1, 1, 8, split="heldout", **synthetic_options(config))
  triples = list(source.triples)
  if settings.max_prompts:
    # Spread the subset over the list so that several colours / shapes / directions appear.
    step = max(1, len(triples) // settings.max_prompts)
    triples = triples[::step][:settings.max_prompts]
  targets = []
  for color, shape, direction in triples:
    attrs = {"color": color, "shape": shape, "direction": direction,
             "size": source.sizes[0], "background": source.backgrounds[0]}
    targets.append({**attrs, "caption": source.caption(attrs)})
  return targets, source


def sample_videos(pipe, prompts: Sequence[str], config, settings: DemoSettings,
                  independent: bool) -> np.ndarray:
  """uint8 [len(prompts) x len(seeds), K*N, H, W, 3]: VidRD long videos or independent clips."""
  import vidrd_jax  # pylint: disable=g-import-not-at-top
  if independent:
    # No reused noise (M = 0), fresh noise for every frame (alpha = 0), no staged guidance.
    strategy = dict(overlap=0, noise_recycle=0.0, staged_guidance=0.0)
  else:
    strategy = dict(overlap=settings.overlap, noise_recycle=settings.noise_recycle,
                    staged_guidance=settings.staged_guidance)
  out = []
  for seed in settings.seeds:
    result = vidrd_jax.generate(
        pipe, list(prompts), num_clips=settings.num_clips, frames_per_clip=config.data.frames,
        num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
        # The model was trained with captions dropped to "": that is its unconditional text.
        negative_prompt="", height=config.data.resolution, width=config.data.resolution,
        seed=seed, **strategy)
    out.append(np.asarray(result.frames))
  # Prompt-major order: video p * len(seeds) + s.
  return np.stack(out, axis=1).reshape((-1,) + out[0].shape[1:])


def save_strip(path: str, title: str, rows: Sequence[tuple[str, np.ndarray]], clip_frames: int,
               zoom: int = 2) -> None:
  """One PNG: a labelled row of frames per method, with a red bar at every clip seam."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  label_w, title_h, gap = 150, 18, 4
  f, h, w, _ = rows[0][1].shape
  seam = 2
  n_seams = (f - 1) // clip_frames
  width = label_w + f * w * zoom + n_seams * seam
  height = title_h + len(rows) * (h * zoom + gap)
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 3), title, fill=(0, 0, 0))
  for r, (label, video) in enumerate(rows):
    y = title_h + r * (h * zoom + gap)
    draw.text((4, y + h * zoom // 2 - 6), label, fill=(0, 0, 0))
    x = label_w
    for t in range(f):
      if t and t % clip_frames == 0:
        draw.rectangle([x, y, x + seam - 1, y + h * zoom - 1], fill=(220, 0, 0))
        x += seam
      frame = Image.fromarray(video[t]).resize((w * zoom, h * zoom), Image.NEAREST)
      canvas.paste(frame, (x, y))
      x += w * zoom
  canvas.save(path)


def read_loss_curve(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, losses) from ``WORKDIR/metrics.jsonl``; a resumed run's repeated steps keep the last."""
  by_step = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by an interruption
        if "step" in record and "loss" in record:
          by_step[int(record["step"])] = float(record["loss"])
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def save_loss_curve(path: str, steps: np.ndarray, losses: np.ndarray,
                    image_curve: tuple[np.ndarray, np.ndarray] | None = None) -> None:
  """Plots the video stage's loss; ``image_curve`` (steps, losses) of the image stage before it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  curves = []
  if image_curve is not None and len(image_curve[0]):
    # The image stage runs first: the video stage's steps follow on after it.
    curves.append(("single frames", "tab:orange", image_curve[0], image_curve[1]))
    steps = steps + int(image_curve[0][-1])
  curves.append(("clips", "tab:blue", steps, losses))
  for label, color, x, y in curves:
    if not len(x):
      continue
    ax.plot(x, y, lw=1, color=color, alpha=0.5, label=f"loss, {label}")
    if len(y) >= 5:
      k = max(2, len(y) // 20)
      smooth = np.convolve(y, np.ones(k) / k, mode="valid")
      ax.plot(x[k - 1:], smooth, lw=2, color=color, label=f"moving mean ({k})")
  if any(len(c[2]) for c in curves):
    ax.legend()
  ax.set_xlabel("step")
  ax.set_ylabel("diffusion loss (MSE of the epsilon or v target)")
  ax.set_yscale("log")
  ax.set_title("tiny VidRD UNet3D on synthetic moving shapes")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return float(usage.ru_utime + usage.ru_stime)


def peak_rss_bytes() -> int:
  # ru_maxrss is in KiB on Linux.
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------
# Main.

def run(out: str, *, quick: bool = False, fresh: bool = False, config_path: str = DEFAULT_CONFIG,
        settings: DemoSettings | None = None) -> dict[str, Any]:
  """Runs the whole demo into ``out``; returns (and writes) the metrics."""
  from vidrd_jax import video_io  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  timing: dict[str, float] = {}
  settings = settings or (quick_settings() if quick else DemoSettings())
  config = load_config(config_path, quick)
  out = os.path.abspath(out)
  # Separate work folders: a --quick run never resumes from (or spoils) a full run.
  work = os.path.join(out, "work_quick" if quick else "work")
  if fresh:
    shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work, exist_ok=True)
  # Outputs are rewritten on every run; the work folder is what makes re-runs cheap.
  for sub in ("videos", "strips"):
    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(os.path.join(out, sub))
  allocator = host_allocator.describe()
  if host_allocator.allocator_env():  # nothing chosen yet, and something better is installed
    allocator += (" (the demo runs 20-37% faster as `make demo` runs it: "
                  "env $(python -m vidrd_jax.host_allocator) python -m vidrd_jax.demo ...)")
  _log(f"host allocator: {allocator}")

  t = time.perf_counter()
  vae_cfg, vae_params, vae_check = train_vae(config, settings, os.path.join(work, "vae"), seed=config.seed)
  timing["vae_s"] = time.perf_counter() - t

  t = time.perf_counter()
  init_dir = build_init_pipeline(config, settings, vae_cfg, vae_params, os.path.join(work, "init"),
                                 seed=config.seed)
  latents_dir = pack_latents(config, settings, init_dir, os.path.join(work, "latents"))
  video_init, image_stage = init_dir, None
  if settings.image_steps:
    t_image = time.perf_counter()
    image_stage = {"steps": settings.image_steps, "batch": settings.image_batch}
    image_dir = os.path.join(work, "image")
    forget_training_on_other_latents(latents_dir, image_dir, start=image_stage)
    _log(f"stage 2a: the image model on single frames ({settings.image_steps} steps of "
         f"{settings.image_batch})")
    train_unet(image_config(on_latents(config, latents_dir), settings), init_dir, image_dir)
    video_init = os.path.join(image_dir, "export")
    timing["image_stage_s"] = time.perf_counter() - t_image
  train_dir = os.path.join(work, "train")
  forget_training_on_other_latents(latents_dir, train_dir, start=image_stage)
  pipe, train_result = train_unet(on_latents(config, latents_dir), video_init, train_dir)
  # Start point, latents and the video stage (the image stage is timed on its own).
  timing["train_s"] = time.perf_counter() - t - timing.get("image_stage_s", 0.0)

  t = time.perf_counter()
  targets, source = heldout_targets(config, settings)
  prompts = [x["caption"] for x in targets]
  _log(f"sampling {len(prompts)} held-out prompts x {len(settings.seeds)} seeds x "
       f"{settings.num_clips} clips, {settings.num_steps} DDIM steps, guidance {settings.guidance_scale}")
  videos = {
      "vidrd": sample_videos(pipe, prompts, config, settings, independent=False),
      "independent": sample_videos(pipe, prompts, config, settings, independent=True),
  }
  timing["sample_s"] = time.perf_counter() - t

  t = time.perf_counter()
  n_frames = settings.num_clips * config.data.frames
  video_targets = [x for x in targets for _ in settings.seeds]
  # Real videos of the same captions (fixed speed and start) as a reference row and baseline.
  real = np.stack([
      video_io.to_uint8(source.render(
          {**x, "speed": float(np.mean(source.speed_range)), "x0": 0.25, "y0": 0.5},
          frames=n_frames))
      for x in video_targets])
  kw = dict(colors=source.colors, shapes=source.shapes, directions=source.directions)
  following = {m: metrics_lib.caption_following(list(v), video_targets, **kw)
               for m, v in videos.items()}
  for m, v in videos.items():
    following[m]["per_clip_accuracy"] = metrics_lib.per_clip_accuracy(
        list(v), video_targets, config.data.frames, **kw)
  boundary = {m: metrics_lib.boundary_stats(v, config.data.frames) for m, v in videos.items()}
  boundary["real"] = metrics_lib.boundary_stats(real, config.data.frames)
  real_source = synthetic.SyntheticVideoSource(
      10**6, config.data.frames, config.data.resolution, seed=12345, split="all",
      **synthetic_options(config))
  detector_real = metrics_lib.detector_accuracy_on_real(real_source, settings.detector_clips)
  sensitivity = word_sensitivity(pipe, config, settings)

  for i, target in enumerate(video_targets):
    seed = settings.seeds[i % len(settings.seeds)]
    name = f"{i:02d}_{_slug(target['caption'])}_seed{seed}"
    for method, v in videos.items():
      base = os.path.join(out, "videos", f"{name}_{method}")
      video_io.write_mp4(base + ".mp4", v[i], fps=settings.fps)
      video_io.write_gif(base + ".gif", v[i], fps=settings.fps)
    save_strip(
        os.path.join(out, "strips", f"{name}.png"), f'"{target["caption"]}" (held out of training)',
        [("real (reference)", real[i]), ("VidRD: FNR+PNS+DSG", videos["vidrd"][i]),
         ("independent clips", videos["independent"][i])], config.data.frames)
  steps, losses = read_loss_curve(os.path.join(work, "train"))
  image_curve = read_loss_curve(os.path.join(work, "image")) if settings.image_steps else None
  save_loss_curve(os.path.join(out, "loss_curve.png"), steps, losses, image_curve)
  timing["outputs_s"] = time.perf_counter() - t
  timing["total_s"] = time.perf_counter() - t_start

  result = {
      "command": "python -m vidrd_jax.demo " + " ".join(sys.argv[1:]),
      "quick": quick,
      "prompts": prompts,
      "num_videos": len(video_targets),
      "settings": dataclasses.asdict(settings),
      "training": {"image_steps": int(settings.image_steps),
                   "image_batch_size": int(settings.image_batch),
                   "steps": int(train_result.get("step", 0)),
                   "final_loss": float(losses[-1]) if len(losses) else None,
                   "first_loss": float(losses[0]) if len(losses) else None,
                   "global_batch_size": int(config.global_batch_size),
                   "learning_rate": float(config.optimizer.learning_rate),
                   "prediction_type": str(config.model.prediction_type),
                   "resolution": int(config.data.resolution), "frames": int(config.data.frames),
                   "unet_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(pipe.params["unet"]))),
                   "vae_scaling_factor": float(vae_cfg.scaling_factor)},
      "vae": vae_check,
      "caption_following": following,
      "detector_on_real": detector_real,
      "caption_sensitivity": sensitivity,
      "boundary": boundary,
      "timing": timing,
      "memory": {"peak_rss_bytes": peak_rss_bytes()},
      # CPU seconds (all threads): with a busy machine, wall time overstates the cost;
      # cpu_s / 2 is about the wall time on 2 free cores.
      "cpu_s": cpu_seconds(),
  }
  goals = metrics_lib.demo_goals(result)
  result["goals"] = goals
  tmp = os.path.join(out, "metrics.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, default=_json_default)
  os.replace(tmp, os.path.join(out, "metrics.json"))
  print_summary(result)
  return result


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.bool_):
    return bool(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def print_summary(result: dict[str, Any]) -> None:
  following = result["caption_following"]
  lines = ["", "=" * 72, f"Caption following on {result['num_videos']} held-out long videos "
           f"(analytic detector; the detector on {result['detector_on_real']['num']} real clips):"]
  lines.append(f"  {'attribute':<10} {'VidRD':>7} {'indep.':>7} {'chance':>7} {'goal':>7} {'detector':>9}"
               "   VidRD: hits, P(as many by chance), 95% interval")
  for a in metrics_lib.ATTRIBUTES:
    v = following["vidrd"]
    chance = v["chance"][a]
    low, high = v["interval95"][a]
    lines.append(f"  {a:<10} {v['accuracy'][a]:7.3f} "
                 f"{following['independent']['accuracy'][a]:7.3f} {chance:7.3f} "
                 f"{metrics_lib.goal(chance):7.3f} {result['detector_on_real']['accuracy'][a]:9.3f}"
                 f"   {v['hits'][a]}/{v['num']}, p={v['p_at_chance'][a]:.3f}, [{low:.2f}, {high:.2f}]")
  per_clip = lambda m: " ".join(f"{x:.2f}" for x in following[m]["per_clip_accuracy"]["direction"])
  lines.append(f"Direction clip by clip: VidRD {per_clip('vidrd')}   independent clips "
               f"{per_clip('independent')}")
  b = result["boundary"]
  lines.append("Boundary ratio (mean change across clip seams / inside clips; 1.0 = seamless):")
  lines.append(f"  VidRD {b['vidrd']['ratio']:.3f}   independent clips {b['independent']['ratio']:.3f}"
               f"   real videos {b['real']['ratio']:.3f}")
  sens = result.get("caption_sensitivity")
  if sens:
    lines.append("Denoising loss on real training clips with one caption word swapped "
                 "(relative increase; 0 = the word is ignored):")
    lines.append("  " + "   ".join(f"{a} {v:+.2%}" for a, v in sens["relative_increase"].items()))
  tr = result["training"]
  image = (f"{tr['image_steps']} steps of {tr['image_batch_size']} single frames, then "
           if tr.get("image_steps") else "")
  # run() records None for the losses when the video stage logged none.
  loss = (f"clip loss {tr['first_loss']:.4f} -> {tr['final_loss']:.4f}"
          if tr.get("first_loss") is not None else "no clip loss logged")
  lines.append(f"Training: {image}{tr['steps']} steps of {tr['global_batch_size']} clips, {loss}")
  lines.append("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timing"].items())
               + f" (CPU time {result['cpu_s']:.0f} s); peak memory {result['memory']['peak_rss_bytes'] / 2**30:.2f} GiB")
  lines.append("Goals:")
  lines.append(metrics_lib.format_goals(result["goals"]))
  lines.append("=" * 72)
  print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description="Train a tiny VidRD on CPU and generate long videos.")
  p.add_argument("--out", default="demo_out", help="output folder (reused and overwritten)")
  p.add_argument("--quick", action="store_true", help="smoke run: a few steps of everything")
  p.add_argument("--fresh", action="store_true", help="discard earlier training and start over")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="training config file")
  # Sampling settings; changing them and re-running reuses the trained model.
  p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance")
  p.add_argument("--num_steps", type=int, default=None, help="DDIM steps")
  p.add_argument("--seeds", default=None, help="comma-separated seeds: one video per prompt each")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  settings = quick_settings() if args.quick else DemoSettings()
  if args.guidance_scale is not None:
    settings.guidance_scale = args.guidance_scale
  if args.num_steps is not None:
    settings.num_steps = args.num_steps
  if args.seeds:
    settings.seeds = tuple(int(x) for x in args.seeds.split(","))
  run(args.out, quick=args.quick, fresh=args.fresh, config_path=args.config, settings=settings)
  return 0


if __name__ == "__main__":
  sys.exit(main())
