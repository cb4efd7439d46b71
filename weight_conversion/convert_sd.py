"""Converts a Stable Diffusion 2.x checkpoint (PyTorch) into a vidrd-jax pipeline directory.

  python -m weight_conversion.convert_sd --src PATH --dst OUT [--prediction-type ...]
      [--dtype float32|bfloat16] [--no-temp-conv] [--no-temp-embed] [--overwrite]
  python -m weight_conversion.convert_sd --to-torch OUT --dst DIR      (export back to diffusers)

PATH is either
  * a diffusers folder (unet/ vae/ text_encoder/ [tokenizer/] [scheduler/], weights as
    safetensors or .bin; safetensors preferred), in today's or the 2023 key spellings, or
  * a single-file original checkpoint (``v2-1_768-ema-pruned.safetensors`` / ``.ckpt``, CompVis
    LDM names). Such a file records neither its resolution nor its prediction type: 768 is
    assumed when the file name contains "768" (override with --image-size), and the prediction
    type follows the resolution (768: v_prediction, 512: epsilon) unless --prediction-type says.
    Architectures other than SD2.1's take their configs from --model-config DIR (a diffusers
    folder's config.json files; weights there are not read).

The UNet becomes VidRD's UNet3D: SD2.1's weights plus temporal layers initialised as the
reference does (their output projections zero), so the converted model equals SD2.1 frame by
frame. Nothing is written unless every weight matches the model; OUT appears atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from weight_conversion import ldm, torch_io
from weight_conversion.common import ConversionError, convert_components

PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = ("float32", "bfloat16")
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def cast_params(tree, dtype: str):
  """Casts floating-point leaves to ``dtype`` ("float32" keeps them; bit-exact otherwise)."""
  if dtype == "float32":
    return tree
  import jax  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  target = {"bfloat16": ml_dtypes.bfloat16}[dtype]

  def cast(x):
    x = np.asarray(x)
    return x.astype(target) if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16" else x

  return jax.tree.map(cast, tree)


def count_params(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def default_prediction_type(unet_sample_size: int) -> str:
  """SD2.x's convention: the 768 px model (latent 96) predicts v, the 512 px ones epsilon."""
  return "v_prediction" if int(unet_sample_size) * 8 == 768 else "epsilon"


def unet_params_from_sd2(sd: dict, unet_cfg, log: Log, *, seed: int = 0):
  """SD2.x UNet2D weights -> UNet3D params; temporal layers start as the reference inits them."""
  from weight_conversion.unet import is_temporal, unet_from_torch  # pylint: disable=g-import-not-at-top
  # A UNet exported from vidrd-jax carries its temporal layers: then every one must be there.
  has_temporal = any(is_temporal(k) for k in sd)
  if not has_temporal:
    log("  plain SD2.x UNet: temporal layers start as identity (zero output projections)")
  return unet_from_torch(sd, unet_cfg, allow_missing_temporal=not has_temporal, seed=seed)


def summarise(log: Log, params: dict, dropped: list[str], started: float, dst: str,
              notes: list[str]) -> None:
  total = 0
  log("summary:")
  for name in ("unet", "vae", "text_encoder"):
    n = count_params(params[name])
    total += n
    log(f"  {name:<13} {n:>14,d} parameters")
  log(f"  {'total':<13} {total:>14,d} parameters")
  if dropped:
    log(f"  left out on purpose: {len(dropped)} tensors ({_summarise_names(dropped)})")
  for note in notes:
    log(f"  note: {note}")
  log(f"wrote {dst} in {time.time() - started:.1f}s")


def _summarise_names(names: list[str], limit: int = 6) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def _load_folder_component(src: str, name: str, log: Log):
  folder = os.path.join(src, name)
  path = torch_io.find_component_weights(folder)
  log(f"reading {name}: {os.path.relpath(path, src)}")
  return torch_io.load_state_dict(path), torch_io.read_json(os.path.join(folder, "config.json"))


def convert_sd(
    src: str,
    dst: str,
    *,
    prediction_type: Optional[str] = None,
    dtype: str = "float32",
    add_temp_conv: bool = True,
    add_temp_embed: bool = True,
    image_size: Optional[int] = None,
    model_config: Optional[str] = None,
    extract_ema: bool = False,
    overwrite: bool = False,
    log: Log = _stderr,
) -> str:
  """Converts ``src`` (diffusers folder or LDM single file) into a pipeline directory ``dst``.

  Returns:
    ``dst``. Raises ConversionError / FileNotFoundError on bad input, before writing anything.
  """
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.text_encoder import CLIPTextConfig  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConfig  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.vae import AutoencoderKLConfig  # pylint: disable=g-import-not-at-top
  from weight_conversion.text_encoder import text_encoder_from_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.vae import vae_from_torch  # pylint: disable=g-import-not-at-top

  started = time.time()
  src = os.fspath(src)
  if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"--prediction-type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
  if not os.path.exists(src):
    raise FileNotFoundError(f"--src not found: {src}")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"--dst {dst} already exists (use --overwrite to replace it)")
  temporal = dict(add_temp_conv=add_temp_conv, add_temp_embed=add_temp_embed)
  notes, dropped = [], []
  tokenizer: Any = None

  if os.path.isdir(src):
    missing = [s for s in REQUIRED_SUBFOLDERS if not os.path.isdir(os.path.join(src, s))]
    if missing:
      raise ConversionError(
          f"{src} is not a diffusers Stable Diffusion folder: missing subfolder(s) "
          f"{', '.join(missing)} (expected {', '.join(REQUIRED_SUBFOLDERS)}, tokenizer, scheduler)")
    unet_sd, unet_json = _load_folder_component(src, "unet", log)
    vae_sd, vae_json = _load_folder_component(src, "vae", log)
    text_sd, text_json = _load_folder_component(src, "text_encoder", log)
    # A UNet folder exported from vidrd-jax carries the temporal switches itself.
    has_temporal = any(k in unet_json for k in ("add_temp_conv", "add_temp_embed"))
    unet_cfg = UNet3DConfig.from_diffusers(unet_json, **({} if has_temporal else temporal))
    vae_cfg = AutoencoderKLConfig.from_diffusers(vae_json)
    text_cfg = CLIPTextConfig.from_hf(text_json)
    scheduler_path = os.path.join(src, pipeline_lib.SCHEDULER_FILE)
    if os.path.isfile(scheduler_path):
      scheduler_src = torch_io.read_json(scheduler_path)
    else:
      scheduler_src = None
      notes.append("no scheduler/scheduler_config.json: SD2.x's training schedule assumed")
    if prediction_type is None and (scheduler_src or {}).get("prediction_type") is None:
      prediction_type = default_prediction_type(unet_cfg.sample_size)
      notes.append(f"prediction type not recorded: {prediction_type} assumed from the resolution")
    tok_dir = os.path.join(src, "tokenizer")
    if os.path.isfile(os.path.join(tok_dir, "vocab.json")):
      tokenizer = tok_dir
    else:
      notes.append("no tokenizer/ in the source: SD2.1's tokenizer written from open_clip's BPE")
    source_kind = "diffusers"
  else:
    log(f"reading single-file checkpoint {src}")
    sd = torch_io.load_state_dict(src)
    if not ldm.is_ldm_checkpoint(sd):
      raise ConversionError(
          f"{src} is not a single-file (CompVis/LDM) Stable Diffusion checkpoint: it has no "
          f"'{ldm.UNET_PREFIX}*' keys (first keys: {_summarise_names(sorted(sd), 4)})")
    if model_config:
      unet_cfg = UNet3DConfig.from_diffusers(
          torch_io.read_json(os.path.join(model_config, "unet", "config.json")), **temporal)
      vae_cfg = AutoencoderKLConfig.from_diffusers(
          torch_io.read_json(os.path.join(model_config, "vae", "config.json")))
      text_cfg = CLIPTextConfig.from_hf(
          torch_io.read_json(os.path.join(model_config, "text_encoder", "config.json")))
    else:
      if image_size is None:
        image_size = 768 if "768" in os.path.basename(src) else 512
        notes.append(f"image size {image_size} assumed from the file name (--image-size to set)")
      if image_size not in (512, 768):
        raise ValueError(f"--image-size must be 512 or 768 for SD2.1, got {image_size}")
      make = UNet3DConfig.sd21_768 if image_size == 768 else UNet3DConfig.sd21_base
      unet_cfg = make(**temporal)
      vae_cfg = AutoencoderKLConfig.sd21(sample_size=image_size)
      text_cfg = CLIPTextConfig.openclip_h()
    unet_sd, vae_sd, text_sd, dropped = ldm.split_ldm_checkpoint(
        sd, unet_cfg.to_diffusers(include_temporal=False), vae_cfg.to_diffusers(),
        text_cfg.num_hidden_layers, extract_ema=extract_ema)
    del sd
    scheduler_src = None
    if prediction_type is None:
      prediction_type = default_prediction_type(unet_cfg.sample_size)
      notes.append(f"prediction type {prediction_type} assumed from the resolution "
                   "(--prediction-type to set)")
    source_kind = "ldm-single-file"

  # Every component is checked before anything is written; all problems are reported together.
  params = convert_components({
      "unet": lambda: unet_params_from_sd2(unet_sd, unet_cfg, log),
      "vae": lambda: vae_from_torch(vae_sd, vae_cfg),
      "text_encoder": lambda: text_encoder_from_torch(text_sd, text_cfg),
  }, log)
  params = cast_params(params, dtype)
  scheduler_config = pipeline_lib.ddim_scheduler_config(scheduler_src,
                                                        prediction_type=prediction_type)
  log(f"writing {dst}")
  pipeline_lib.save_pipeline(dst, {
      "unet_config": unet_cfg, "vae_config": vae_cfg, "text_encoder_config": text_cfg,
      "tokenizer": tokenizer, "scheduler_config": scheduler_config, "params": params,
  }, overwrite=overwrite, info={
      "source": os.path.abspath(src),
      "source_kind": source_kind,
      "converter": "weight_conversion.convert_sd",
      "converted": ["unet (SD2.x -> UNet3D, temporal layers initialised)", "vae", "text_encoder"],
      "dtype": dtype,
      "prediction_type": scheduler_config["prediction_type"],
      "dropped_keys": len(dropped),
  })
  summarise(log, params, dropped, started, dst, notes)
  return dst


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--to-torch", metavar="SRC_OUT", default=None,
                      help="export a vidrd-jax directory back to diffusers-layout safetensors "
                      "in --dst instead of converting")


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m weight_conversion.convert_sd",
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", help="diffusers SD folder or single-file .safetensors/.ckpt")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                      help="default: the source's scheduler config, else by resolution "
                      "(768 px: v_prediction, otherwise epsilon)")
  parser.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="storage dtype of the converted parameters")
  parser.add_argument("--image-size", type=int, choices=(512, 768), default=None,
                      help="single-file SD2.1 only: 512 (base) or 768 (v); default from the name")
  parser.add_argument("--model-config", default=None, metavar="DIR",
                      help="single-file only: a diffusers folder whose unet/vae/text_encoder "
                      "config.json describe the architecture (default: SD2.1)")
  parser.add_argument("--extract-ema", action="store_true",
                      help="single-file only: take the UNet from model_ema.* weights")
  parser.add_argument("--no-temp-conv", action="store_true",
                      help="build the UNet3D without temporal conv layers")
  parser.add_argument("--no-temp-embed", action="store_true",
                      help="build the UNet3D without the frame position embedding")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  add_export_arguments(parser)
  args = parser.parse_args(argv)
  try:
    if args.to_torch:
      from weight_conversion.export_torch import export_to_torch  # pylint: disable=g-import-not-at-top
      export_to_torch(args.to_torch, args.dst, overwrite=args.overwrite)
      return 0
    if not args.src:
      parser.error("--src is required (or --to-torch SRC_OUT)")
    convert_sd(args.src, args.dst, prediction_type=args.prediction_type, dtype=args.dtype,
               add_temp_conv=not args.no_temp_conv, add_temp_embed=not args.no_temp_embed,
               image_size=args.image_size, model_config=args.model_config,
               extract_ema=args.extract_ema, overwrite=args.overwrite)
  except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    _stderr(f"error: {e}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
