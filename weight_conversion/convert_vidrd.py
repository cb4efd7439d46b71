"""Converts the VidRD release (ModelT2V.pth + vae_finetuned/ on SD2.1-base) to a pipeline directory.

  python -m weight_conversion.convert_vidrd --sd SD_DIR --unet-ckpt ModelT2V.pth --vae VAE_DIR \
      --dst OUT [--resolution 256] [--dtype float32|bfloat16] [--overwrite]
  python -m weight_conversion.convert_vidrd --to-torch OUT --dst DIR   (export back to diffusers)

* SD_DIR: the diffusers ``stable-diffusion-2-1-base`` folder: UNet / text encoder configs,
  tokenizer and scheduler (its weights are only used for a component the checkpoint lacks).
* ModelT2V.pth: a PyTorch Lightning checkpoint. Its ``state_dict`` holds ``unet.*`` (SD2.1's
  UNet plus VidRD's temporal layers) and ``text_encoder.*``; other modules Lightning saved with
  it (``clip.*`` for evaluation, ``vae.*``) are ignored as the reference ignores them. Read with
  ``torch.load(weights_only=True)`` only: a pickle that needs code to load is refused.
* VAE_DIR: the temporal VAE folder (TemporalAutoencoderKL config, 2023 attention names).

The reference builds its UNet with ``add_temp_embed`` and ``add_temp_conv`` on (configs/
example.yaml); --no-temp-conv / --no-temp-embed exist for checkpoints trained otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from weight_conversion import torch_io
from weight_conversion.common import ConversionError, convert_components
from weight_conversion.convert_sd import (DTYPES, Log, _stderr, _summarise_names, add_export_arguments,
                                          cast_params, summarise)

# The LightningModule attributes whose weights the reference restores from the checkpoint.
USED_PREFIXES = ("unet.", "text_encoder.")


def split_lightning_state_dict(sd: dict) -> tuple[dict[str, dict], dict[str, int]]:
  """{"unet.x": ...} -> ({"unet": {"x": ...}, ...}, {other prefix: count})."""
  parts: dict[str, dict] = {}
  ignored: dict[str, int] = {}
  for name, value in sd.items():
    head, _, rest = name.partition(".")
    if not rest:
      ignored[head] = ignored.get(head, 0) + 1
      continue
    parts.setdefault(head, {})[rest] = value
  for head in list(parts):
    if head + "." not in USED_PREFIXES:
      ignored[head] = len(parts.pop(head))
  return parts, ignored


def convert_vidrd(
    sd_dir: str,
    unet_ckpt: str,
    vae_dir: str,
    dst: str,
    *,
    resolution: int = 256,
    dtype: str = "float32",
    add_temp_conv: bool = True,
    add_temp_embed: bool = True,
    overwrite: bool = False,
    log: Log = _stderr,
) -> str:
  """Converts the release; see the module docstring. Returns ``dst``; writes nothing on error."""
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.text_encoder import CLIPTextConfig  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConfig  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.vae import AutoencoderKLConfig  # pylint: disable=g-import-not-at-top
  from weight_conversion.text_encoder import text_encoder_from_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.unet import unet_from_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.vae import vae_from_torch  # pylint: disable=g-import-not-at-top

  started = time.time()
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
  for what, path in (("--sd", sd_dir), ("--unet-ckpt", unet_ckpt), ("--vae", vae_dir)):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{what} not found: {path}")
  for what, path in (("--sd", sd_dir), ("--vae", vae_dir)):
    if not os.path.isdir(path):
      raise ConversionError(f"{what} must be a folder, got a file: {path}")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"--dst {dst} already exists (use --overwrite to replace it)")
  missing = [p for p in ("unet/config.json", "text_encoder/config.json")
             if not os.path.isfile(os.path.join(sd_dir, p))]
  if missing:
    raise ConversionError(f"--sd {sd_dir} is not a diffusers SD2.1 folder: missing {', '.join(missing)}")
  notes = []

  log(f"reading {unet_ckpt}")
  parts, ignored = split_lightning_state_dict(torch_io.load_state_dict(unet_ckpt))
  if "unet" not in parts:
    raise ConversionError(
        f"{unet_ckpt} has no 'unet.*' weights (prefixes found: "
        f"{_summarise_names(sorted(set(parts) | set(ignored)))}); expected VidRD's ModelT2V.pth")
  if ignored:
    notes.append("ignored in the checkpoint (unused by the reference's inference): "
                 + ", ".join(f"{k}.* ({n})" for k, n in sorted(ignored.items())))

  unet_json = torch_io.read_json(os.path.join(sd_dir, "unet", "config.json"))
  factor = 8
  unet_cfg = UNet3DConfig.from_diffusers(
      unet_json, sample_size=resolution // factor, add_temp_conv=add_temp_conv,
      add_temp_embed=add_temp_embed)
  text_cfg = CLIPTextConfig.from_hf(torch_io.read_json(os.path.join(sd_dir, "text_encoder",
                                                                    "config.json")))
  if "text_encoder" in parts:
    text_sd = parts["text_encoder"]
  else:
    # The reference then keeps SD2.1's text encoder (it restores only modules present).
    text_sd, _ = torch_io.load_component(os.path.join(sd_dir, "text_encoder"))
    notes.append("no text_encoder.* in the checkpoint: SD2.1's text encoder used")
  vae_path = torch_io.find_component_weights(vae_dir)
  log(f"reading {vae_path}")
  vae_sd = torch_io.load_state_dict(vae_path)
  vae_json = torch_io.read_json(os.path.join(vae_dir, "config.json"))
  vae_cfg = AutoencoderKLConfig.from_diffusers(vae_json)
  if not vae_cfg.temporal_decoder and any(".temp_convs." in k for k in vae_sd):
    vae_cfg = AutoencoderKLConfig.from_diffusers(vae_json, temporal_decoder=True)
    notes.append("VAE config lacks add_temp_conv but the weights have temporal convs: "
                 "temporal decoder enabled")

  params = convert_components({
      "unet": lambda: unet_from_torch(parts["unet"], unet_cfg),
      "vae": lambda: vae_from_torch(vae_sd, vae_cfg),
      "text_encoder": lambda: text_encoder_from_torch(text_sd, text_cfg),
  }, log)
  params = cast_params(params, dtype)

  scheduler_path = os.path.join(sd_dir, pipeline_lib.SCHEDULER_FILE)
  if os.path.isfile(scheduler_path):
    scheduler_src = torch_io.read_json(scheduler_path)
  else:
    scheduler_src = None
    notes.append("no scheduler config in --sd: SD2.1-base's (epsilon) assumed")
  tok_dir = os.path.join(sd_dir, "tokenizer")
  tokenizer = tok_dir if os.path.isfile(os.path.join(tok_dir, "vocab.json")) else None
  if tokenizer is None:
    notes.append("no tokenizer/ in --sd: SD2.1's tokenizer written from open_clip's BPE")
  log(f"writing {dst}")
  pipeline_lib.save_pipeline(dst, {
      "unet_config": unet_cfg, "vae_config": vae_cfg, "text_encoder_config": text_cfg,
      "tokenizer": tokenizer,
      "scheduler_config": pipeline_lib.ddim_scheduler_config(scheduler_src),
      "params": params,
  }, overwrite=overwrite, info={
      "source": {"sd": os.path.abspath(sd_dir), "unet_ckpt": os.path.abspath(unet_ckpt),
                 "vae": os.path.abspath(vae_dir)},
      "source_kind": "vidrd-release",
      "converter": "weight_conversion.convert_vidrd",
      "converted": ["unet (UNet3D with VidRD temporal layers)", "vae (temporal decoder)"
                    if vae_cfg.temporal_decoder else "vae", "text_encoder"],
      "dtype": dtype,
      "resolution": resolution,
  })
  summarise(log, params, [], started, dst, notes)
  return dst


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m weight_conversion.convert_vidrd",
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sd", help="diffusers stable-diffusion-2-1-base folder")
  parser.add_argument("--unet-ckpt", help="VidRD's ModelT2V.pth (Lightning checkpoint)")
  parser.add_argument("--vae", help="VidRD's vae_finetuned/ folder (temporal VAE)")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument("--resolution", type=int, default=256,
                      help="frame size the model was trained at (recorded as the UNet sample size)")
  parser.add_argument("--dtype", choices=DTYPES, default="float32")
  parser.add_argument("--no-temp-conv", action="store_true")
  parser.add_argument("--no-temp-embed", action="store_true")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  add_export_arguments(parser)
  args = parser.parse_args(argv)
  try:
    if args.to_torch:
      from weight_conversion.export_torch import export_to_torch  # pylint: disable=g-import-not-at-top
      export_to_torch(args.to_torch, args.dst, overwrite=args.overwrite)
      return 0
    missing = [f for f, v in (("--sd", args.sd), ("--unet-ckpt", args.unet_ckpt), ("--vae", args.vae))
               if not v]
    if missing:
      parser.error(f"missing {', '.join(missing)} (or use --to-torch SRC_OUT)")
    convert_vidrd(args.sd, args.unet_ckpt, args.vae, args.dst, resolution=args.resolution,
                  dtype=args.dtype, add_temp_conv=not args.no_temp_conv,
                  add_temp_embed=not args.no_temp_embed, overwrite=args.overwrite)
  except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    _stderr(f"error: {e}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
