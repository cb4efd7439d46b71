"""A converted VidRD / SD2.1 model on disk, and the object that holds it in memory.

On-disk format (a directory, written by the converters and by training)::

  OUT/vidrd.json                        format version, source, what was converted
  OUT/unet/config.json                  UNet3DConfig.to_diffusers() (diffusers names + VidRD switches)
  OUT/vae/config.json                   AutoencoderKLConfig.to_diffusers()
  OUT/text_encoder/config.json          CLIPTextConfig.to_hf()
  OUT/tokenizer/                        vocab.json, merges.txt, tokenizer configs (CLIPTokenizer)
  OUT/scheduler/scheduler_config.json   diffusers DDIMScheduler fields, incl. prediction_type
  OUT/params/                           orbax checkpoint of {"unet", "vae", "text_encoder"}

Loading needs no torch. ``save_pipeline`` writes into ``OUT.tmp-XXXX`` and renames it into
place at the end, so an interrupted or failed save never leaves a partial ``OUT``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidrd_jax.models.text_encoder import CLIPTextConfig, CLIPTextModel
from vidrd_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig
from vidrd_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, decode_chunked
from vidrd_jax.tokenizer import Tokenizer

FORMAT_NAME = "vidrd-jax"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "vae", "text_encoder")
INFO_FILE = "vidrd.json"
SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
PARAMS_DIR = "params"
# The reference's inference size (SD2.1-base, VidRD release), for pipelines that do not record
# the size they were trained at (converted checkpoints).
REFERENCE_SIZE = (256, 256)

# SD2.x's training schedule (the LDM configs' linear_start/linear_end, "scaled_linear" in
# diffusers) as a DDIM sampler config; the prediction type depends on the checkpoint.
SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

Params = Mapping[str, Any]


def ddim_scheduler_config(source: Optional[Mapping[str, Any]] = None, **overrides) -> dict:
  """A DDIMScheduler-style config from any diffusers scheduler config (SD2.x defaults if None).

  Keys the source omits take SD2.x's values (not diffusers' DDIM defaults, which differ in
  ``set_alpha_to_one`` / ``steps_offset`` / ``clip_sample`` from what SD was trained with).
  """
  from vidrd_jax.diffusion.schedule import DDIMScheduler  # pylint: disable=g-import-not-at-top
  merged = {k: v for k, v in SD2_SCHEDULER_CONFIG.items() if k != "_class_name"}
  merged.update({k: v for k, v in (source or {}).items() if not k.startswith("_")})
  merged.update({k: v for k, v in overrides.items() if v is not None})
  # Validates (unknown keys that would change sampling raise) and normalises.
  return {"_class_name": "DDIMScheduler", **DDIMScheduler.from_config(merged).to_config()}


@dataclasses.dataclass(eq=False)
class Pipeline:
  """Everything needed to sample or fine-tune: modules, parameters, tokenizer, schedule.

  Attributes:
    unet: the UNet3D module; ``unet.apply({"params": params["unet"]}, latents [B, F, h, w, 4],
      timesteps [B], ctx [B, 77, D]) -> [B, F, h, w, 4]``.
    vae: the (temporal) autoencoder module.
    text_encoder: the CLIP text tower module.
    tokenizer: prompts -> ids, padded as SD2.1's tokenizer pads.
    params: {"unet": ..., "vae": ..., "text_encoder": ...} parameter trees.
    scheduler_config: the DDIMScheduler-style config (``prediction_type`` included).
    info: the contents of ``vidrd.json`` (source, format version, ...).
  """

  unet: UNet3DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  tokenizer: Tokenizer
  params: dict
  scheduler_config: dict
  info: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    missing = [c for c in COMPONENTS if c not in self.params]
    if missing:
      raise ValueError(f"params lacks {missing}; expected keys {list(COMPONENTS)}")
    # Compiled once per Pipeline (and per input shape by jit's own cache), never per call.
    self._unet = jax.jit(
        lambda p, x, t, ctx: self.unet.apply({"params": p}, x, t, ctx))
    self._encode_ids = jax.jit(
        lambda p, ids: self.text_encoder.apply({"params": p}, ids))
    self._decode = jax.jit(self._decode_impl, static_argnames=("temporal", "chunk_frames"))
    self._encode = jax.jit(self._encode_impl, static_argnames=("sample",))

  # ------------------------------------------------------------------------------- properties

  @property
  def scaling_factor(self) -> float:
    return float(self.vae.config.scaling_factor)

  @property
  def prediction_type(self) -> str:
    return self.scheduler_config.get("prediction_type", "epsilon")

  @property
  def has_temporal_decoder(self) -> bool:
    return bool(self.vae.config.temporal_decoder)

  @property
  def scheduler(self):
    """The DDIM sampler (vidrd_jax.diffusion.schedule.DDIMScheduler) for this checkpoint."""
    from vidrd_jax.diffusion.schedule import DDIMScheduler  # pylint: disable=g-import-not-at-top
    return DDIMScheduler.from_config(self.scheduler_config)

  @property
  def vae_downsample_factor(self) -> int:
    return int(self.vae.config.downsample_factor)

  @property
  def native_size(self) -> tuple[int, int]:
    """(height, width) in pixels to sample at when the caller names none.

    What ``vidrd.json``'s ``trained_on`` records (``vidrd_jax.train`` exports write it: a model
    trained on 32x32 clips samples 32x32 by default, not 64x the pixels), else the reference's
    256x256.
    """
    trained = self.info.get("trained_on") or {}
    try:
      return int(trained["height"]), int(trained["width"])
    except (KeyError, TypeError, ValueError):
      return REFERENCE_SIZE

  # ----------------------------------------------------------------------------------- text

  def tokenize(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
    """Prompts -> np.int32 [B, 77] ids (start, BPE tokens, end, then "!" padding)."""
    return self.tokenizer(prompts)

  def encode_prompt(self, prompts_or_ids: Union[str, Sequence[str], np.ndarray, jax.Array],
                    params: Optional[Params] = None) -> jax.Array:
    """Prompts (or ids from ``tokenize``) -> the text encoder's last hidden state.

    Args:
      prompts_or_ids: a string, B strings, or int ids [B, 77].
      params: text-encoder params to use instead of ``self.params["text_encoder"]``.

    Returns:
      [B, 77, D] in the text encoder's compute dtype.
    """
    if isinstance(prompts_or_ids, str) or (
        isinstance(prompts_or_ids, (list, tuple)) and all(isinstance(p, str) for p in prompts_or_ids)):
      ids = self.tokenize(prompts_or_ids)
    else:
      ids = prompts_or_ids
    ids = jnp.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    return self._encode_ids(self.params["text_encoder"] if params is None else params, ids)

  # ----------------------------------------------------------------------------------- UNet

  def apply_unet(self, latents: jax.Array, timesteps: jax.Array, ctx: jax.Array,
                 params: Optional[Params] = None) -> jax.Array:
    """Jitted ``unet.apply``: latents [B, F, h, w, 4], timesteps [B], ctx [B, 77, D] -> the
    model output (epsilon or v, per ``prediction_type``) [B, F, h, w, 4]."""
    return self._unet(self.params["unet"] if params is None else params, jnp.asarray(latents),
                      jnp.asarray(timesteps), jnp.asarray(ctx))

  # ------------------------------------------------------------------------------------ VAE

  def _decode_impl(self, params, latents, *, temporal: bool, chunk_frames: Optional[int]):
    # The diffusion model works in scaled latent space (unit variance); the VAE does not.
    z = latents / self.scaling_factor
    if chunk_frames is None or chunk_frames >= z.shape[1]:
      frames = self.vae.apply({"params": params}, z, temporal=temporal, method=self.vae.decode)
    else:
      frames = decode_chunked(self.vae, params, z, chunk_frames=chunk_frames, temporal=temporal)
    return jnp.clip(frames, -1.0, 1.0)

  def decode_latents(self, latents: jax.Array, *, temporal: Optional[bool] = None,
                     chunk_frames: Optional[int] = None, reference_exact: bool = False,
                     params: Optional[Params] = None) -> jax.Array:
    """Latents in diffusion space -> frames.

    Args:
      latents: [B, F, h, w, 4], already multiplied by scaling_factor (as the sampler makes).
      temporal: run the temporal decoder's convs over the frames of each clip. None: when the
        VAE has a temporal decoder (the paper's decoder). No effect on an image VAE.
      chunk_frames: decode ``chunk_frames`` frames at a time, each chunk as its own clip (VidRD
        decodes each N-frame clip on its own); bounds memory for long videos. None: all F at
        once.
      reference_exact: decode every frame alone, as the reference's released pipeline does
        (it calls the temporal VAE with num_frames=1); overrides ``temporal``.
      params: VAE params instead of ``self.params["vae"]``.

    Returns:
      [B, F, H, W, 3] float in [-1, 1] (clipped), H = h * vae_downsample_factor.
    """
    if latents.ndim != 5:
      raise ValueError(f"latents must be [batch, frames, h, w, 4], got shape {latents.shape}")
    if reference_exact:
      temporal = False
    elif temporal is None:
      temporal = self.has_temporal_decoder
    if chunk_frames is not None and chunk_frames <= 0:
      raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
    return self._decode(self.params["vae"] if params is None else params, jnp.asarray(latents),
                        temporal=bool(temporal), chunk_frames=chunk_frames)

  def _encode_impl(self, params, frames, rng, *, sample: bool):
    mean, logvar = self.vae.apply({"params": params}, frames, method=self.vae.encode)
    if sample:
      # The posterior sample training uses: mean + std * eps.
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return mean * self.scaling_factor

  def encode_frames(self, frames: jax.Array, *, rng: Optional[jax.Array] = None,
                    params: Optional[Params] = None) -> jax.Array:
    """Frames in [-1, 1] -> latents in diffusion space.

    Args:
      frames: [B, F, H, W, 3].
      rng: None -> the posterior mean; a PRNG key -> a posterior sample.
      params: VAE params instead of ``self.params["vae"]``.

    Returns:
      [B, F, H / f, W / f, 4], multiplied by scaling_factor.
    """
    if frames.ndim != 5:
      raise ValueError(f"frames must be [batch, frames, H, W, 3], got shape {frames.shape}")
    key = jax.random.PRNGKey(0) if rng is None else rng
    return self._encode(self.params["vae"] if params is None else params, jnp.asarray(frames),
                        key, sample=rng is not None)

  # ------------------------------------------------------------------------------ utilities

  def replace(self, **changes) -> "Pipeline":
    """A copy with some fields changed (e.g. new params after training); jits are rebuilt."""
    return dataclasses.replace(self, **changes)

  def num_params(self) -> dict[str, int]:
    return {c: int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(self.params[c])))
            for c in COMPONENTS}


# --------------------------------------------------------------------------------------- saving


def _unbox(tree):
  # Params straight from Module.init carry LogicallyPartitioned boxes; the checkpoint holds
  # plain arrays (shardings are decided when loading).
  return nn.meta.unbox(tree)


def _write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def save_params(path: str, params: Params) -> None:
  """Writes a parameter tree as an orbax checkpoint at ``path`` (which must not exist).

  The write is local to the calling process (no cross-host barriers), so on a multi-host
  machine one process can export: pass host arrays (e.g. ``jax.device_get``), not arrays
  sharded over several hosts.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = _unbox(dict(params))
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
         if not isinstance(x, (np.ndarray, np.generic, jax.Array))]
  if bad:
    raise ValueError(f"parameters that are not arrays: {', '.join(bad)}")
  me = jax.process_index()
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))
  try:
    checkpointer.save(os.path.abspath(path), params)
  finally:
    # Never return (or let the caller clean up) while a background write is still running.
    checkpointer.wait_until_finished()
    checkpointer.close()


def load_params(path: str, *, dtype: Any = None, shardings: Any = None) -> dict:
  """Reads an orbax parameter checkpoint.

  Args:
    path: the ``params/`` directory.
    dtype: cast floating-point parameters to this dtype while reading (None: as stored).
    shardings: None -> arrays on the default device; a jax.Device or one Sharding for every
      array; or a pytree of jax.sharding.Sharding matching the checkpoint.

  Returns:
    The tree of jax.Arrays.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  if shardings is None:
    shardings = jax.devices()[0]
  if isinstance(shardings, jax.Device):
    shardings = jax.sharding.SingleDeviceSharding(shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, metadata)

  def abstract(meta, sharding):
    dt = meta.dtype
    if dtype is not None and jnp.issubdtype(dt, jnp.floating):
      dt = jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(meta.shape, dt, sharding=sharding)

  target = jax.tree.map(abstract, metadata, shardings)
  return checkpointer.restore(path, target)


def _save_tokenizer(tokenizer: Tokenizer, out_dir: str) -> None:
  # transformers 5 saves only tokenizer.json; keep the vocab.json / merges.txt folder it came
  # from, which is what Tokenizer.from_dir (and SD2.1's layout) reads.
  source = getattr(tokenizer.hf, "name_or_path", None)
  if source and all(os.path.isfile(os.path.join(source, n)) for n in ("vocab.json", "merges.txt")):
    shutil.copytree(source, out_dir)
    return
  tokenizer.save(out_dir)
  if not os.path.isfile(os.path.join(out_dir, "vocab.json")):
    raise ValueError("cannot save this tokenizer as vocab.json / merges.txt; pass the tokenizer "
                     "folder (a path) to save_pipeline instead")


def _configs_of(pipeline: Pipeline) -> tuple[Any, Any, Any]:
  return pipeline.unet.config, pipeline.vae.config, pipeline.text_encoder.config


def save_pipeline(
    out_dir: str,
    pipeline_or_parts: Union[Pipeline, Mapping[str, Any]],
    *,
    info: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> str:
  """Writes a pipeline directory atomically (see the module docstring for the layout).

  Args:
    out_dir: the destination.
    pipeline_or_parts: a Pipeline, or a mapping with ``unet_config`` (UNet3DConfig),
      ``vae_config`` (AutoencoderKLConfig), ``text_encoder_config`` (CLIPTextConfig),
      ``tokenizer`` (a Tokenizer, or a folder with vocab.json / merges.txt; None writes the
      SD2.1 tokenizer from open_clip's BPE file), ``scheduler_config`` (dict) and ``params``
      ({"unet", "vae", "text_encoder"}).
    info: extra facts for vidrd.json (source, what was converted, ...).
    overwrite: replace an existing ``out_dir`` (only once the new one is complete).

  Returns:
    ``out_dir``.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
  if isinstance(pipeline_or_parts, Pipeline):
    unet_cfg, vae_cfg, text_cfg = _configs_of(pipeline_or_parts)
    tokenizer = pipeline_or_parts.tokenizer
    scheduler_config = pipeline_or_parts.scheduler_config
    params = pipeline_or_parts.params
    info = {**{k: v for k, v in pipeline_or_parts.info.items()
               if k not in ("format", "format_version", "created")}, **(info or {})}
  else:
    parts = dict(pipeline_or_parts)
    required = ("unet_config", "vae_config", "text_encoder_config", "scheduler_config", "params")
    missing = [k for k in required if parts.get(k) is None]
    if missing:
      raise ValueError(f"save_pipeline parts lack {missing}")
    unet_cfg, vae_cfg, text_cfg = parts["unet_config"], parts["vae_config"], parts["text_encoder_config"]
    tokenizer, scheduler_config, params = parts.get("tokenizer"), parts["scheduler_config"], parts["params"]
  missing = [c for c in COMPONENTS if c not in params]
  if missing:
    raise ValueError(f"params lacks {missing}; expected keys {list(COMPONENTS)}")

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    _write_json(os.path.join(tmp, "unet", "config.json"), unet_cfg.to_diffusers())
    _write_json(os.path.join(tmp, "vae", "config.json"), vae_cfg.to_diffusers())
    _write_json(os.path.join(tmp, "text_encoder", "config.json"), text_cfg.to_hf())
    _write_json(os.path.join(tmp, SCHEDULER_FILE), ddim_scheduler_config(scheduler_config))
    tok_dir = os.path.join(tmp, "tokenizer")
    if tokenizer is None:
      from vidrd_jax.tokenizer import write_tokenizer_files  # pylint: disable=g-import-not-at-top
      write_tokenizer_files(tok_dir)
    elif isinstance(tokenizer, Tokenizer):
      _save_tokenizer(tokenizer, tok_dir)
    else:
      shutil.copytree(os.fspath(tokenizer), tok_dir)
    save_params(os.path.join(tmp, PARAMS_DIR), {c: params[c] for c in COMPONENTS})
    counts = {c: int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(_unbox(params[c]))))
              for c in COMPONENTS}
    record = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_params": counts,
        "param_dtypes": {c: sorted({str(np.dtype(x.dtype)) for x in
                                    jax.tree_util.tree_leaves(_unbox(params[c]))})
                         for c in COMPONENTS},
        **dict(info or {}),
    }
    # Written last: a directory with vidrd.json is complete.
    _write_json(os.path.join(tmp, INFO_FILE), record)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
      os.rmdir(old)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


# -------------------------------------------------------------------------------------- loading


def missing_pieces(path: str) -> list[str]:
  """What a pipeline directory lacks (empty when complete)."""
  wanted = [
      INFO_FILE,
      os.path.join("unet", "config.json"),
      os.path.join("vae", "config.json"),
      os.path.join("text_encoder", "config.json"),
      os.path.join("tokenizer", "vocab.json"),
      os.path.join("tokenizer", "merges.txt"),
      SCHEDULER_FILE,
  ]
  missing = [w for w in wanted if not os.path.isfile(os.path.join(path, w))]
  if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
    missing.append(PARAMS_DIR + "/")
  return missing


def read_configs(path: str, *, dtype: Any = None, attention_impl: Optional[str] = None):
  """(UNet3DConfig, AutoencoderKLConfig, CLIPTextConfig, scheduler config, info) of a directory."""

  def read(rel):
    with open(os.path.join(path, rel)) as f:
      return json.load(f)

  overrides = {}
  if dtype is not None:
    overrides["dtype"] = jnp.dtype(dtype)
  if attention_impl is not None:
    overrides["attention_impl"] = attention_impl
  unet_cfg = UNet3DConfig.from_diffusers(read("unet/config.json"), **overrides)
  vae_cfg = AutoencoderKLConfig.from_diffusers(read("vae/config.json"), **overrides)
  text_cfg = CLIPTextConfig.from_hf(read("text_encoder/config.json"), **overrides)
  return unet_cfg, vae_cfg, text_cfg, read(SCHEDULER_FILE), read(INFO_FILE)


def load_pipeline(path: str, *, dtype: Any = None, attention_impl: Optional[str] = None,
                  param_dtype: Any = None, shardings: Any = None) -> Pipeline:
  """Loads a converted (or trained) model directory; needs no torch.

  Args:
    path: a directory written by the converters or by ``save_pipeline``.
    dtype: compute dtype of all three modules (None: each config's default, float32).
    attention_impl: force the attention implementation ("xla", "cudnn", "splash"); None: auto.
    param_dtype: cast floating-point parameters to this dtype while loading (None: as stored).
    shardings: where the parameters go (see ``load_params``); None: the default device.

  Returns:
    The Pipeline.

  Raises:
    FileNotFoundError: ``path`` is missing, or lacks pieces (all of them are listed).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pipeline directory not found: {path}")
  missing = missing_pieces(path)
  if missing:
    hint = ""
    if os.path.isfile(os.path.join(path, "model_index.json")) or any(
        os.path.isfile(os.path.join(path, "unet", n))
        for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
      hint = ("\nIt looks like a PyTorch (diffusers) folder; convert it first: "
              f"python -m weight_conversion.convert_sd --src {path} --dst OUT")
    raise FileNotFoundError(
        f"{path} is not a complete vidrd-jax pipeline directory; missing: "
        + ", ".join(missing) + hint)
  unet_cfg, vae_cfg, text_cfg, scheduler_config, info = read_configs(
      path, dtype=dtype, attention_impl=attention_impl)
  version = info.get("format_version")
  if info.get("format") != FORMAT_NAME or not isinstance(version, int) or version > FORMAT_VERSION:
    raise ValueError(f"{path}/{INFO_FILE} says format {info.get('format')!r} version {version!r}; "
                     f"this vidrd_jax reads {FORMAT_NAME!r} up to version {FORMAT_VERSION}")
  params = load_params(os.path.join(path, PARAMS_DIR), dtype=param_dtype, shardings=shardings)
  missing = [c for c in COMPONENTS if c not in params]
  if missing:
    raise ValueError(f"{path}/{PARAMS_DIR} lacks parameters for {missing}")
  return Pipeline(
      unet=UNet3DConditionModel(unet_cfg),
      vae=AutoencoderKL(vae_cfg),
      text_encoder=CLIPTextModel(text_cfg),
      tokenizer=Tokenizer.from_dir(os.path.join(path, "tokenizer")),
      params=dict(params),
      scheduler_config=scheduler_config,
      info=info,
  )
