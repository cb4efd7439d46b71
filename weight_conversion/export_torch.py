"""Exports a vidrd-jax pipeline directory back to PyTorch safetensors in diffusers layout.

  python -m weight_conversion.export_torch --src OUT --dst DIR [--legacy-vae-names] [--overwrite]
  (also reachable as ``--to-torch OUT --dst DIR`` on convert_sd and convert_vidrd)

DIR gets::

  unet/config.json + diffusion_pytorch_model.safetensors   UNet2D names + VidRD temporal keys
  vae/config.json + diffusion_pytorch_model.safetensors    (TemporalAutoencoderKL when temporal)
  text_encoder/config.json + model.safetensors             transformers CLIPTextModel
  tokenizer/, scheduler/scheduler_config.json, model_index.json

Tensors keep their stored dtype, so converting DIR again with convert_sd gives bit-identical
parameters. The VidRD parts load into the reference's own classes (UNet3DConditionModel,
TemporalAutoencoderKL; pass --legacy-vae-names for their diffusers <= 0.14 attention names);
a plain diffusers UNet2DConditionModel will report the temporal keys as unexpected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from weight_conversion import torch_io
from weight_conversion.common import ConversionError

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def export_to_torch(src: str, dst: str, *, legacy_vae_names: bool = False, overwrite: bool = False,
                    log: Log = _stderr) -> str:
  """Writes the diffusers-layout export of pipeline directory ``src`` into ``dst`` (atomically)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from weight_conversion.text_encoder import text_encoder_to_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.unet import unet_to_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.vae import vae_to_torch  # pylint: disable=g-import-not-at-top

  started = time.time()
  src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
  if not os.path.isdir(src):
    raise FileNotFoundError(f"pipeline directory not found: {src}")
  missing = pipeline_lib.missing_pieces(src)
  if missing:
    raise FileNotFoundError(f"{src} is not a complete vidrd-jax pipeline directory; missing: "
                            + ", ".join(missing))
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"--dst {dst} already exists (use --overwrite to replace it)")
  unet_cfg, vae_cfg, text_cfg, scheduler_config, info = pipeline_lib.read_configs(src)
  log(f"reading {src}/{pipeline_lib.PARAMS_DIR}")
  params = pipeline_lib.load_params(os.path.join(src, pipeline_lib.PARAMS_DIR))
  params = jax.tree.map(np.asarray, params)
  log("mapping to PyTorch names")
  tensors = {
      "unet": unet_to_torch(params["unet"], unet_cfg),
      "vae": vae_to_torch(params["vae"], vae_cfg, legacy_attention_names=legacy_vae_names),
      "text_encoder": text_encoder_to_torch(params["text_encoder"], text_cfg),
  }
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    files = {"unet": "diffusion_pytorch_model.safetensors",
             "vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
    configs = {"unet": unet_cfg.to_diffusers(), "vae": vae_cfg.to_diffusers(),
               "text_encoder": text_cfg.to_hf()}
    for name in ("unet", "vae", "text_encoder"):
      log(f"writing {name}/{files[name]} ({len(tensors[name])} tensors)")
      _write_json(os.path.join(tmp, name, "config.json"), configs[name])
      torch_io.save_safetensors(os.path.join(tmp, name, files[name]), tensors[name])
    shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(tmp, "tokenizer"))
    _write_json(os.path.join(tmp, pipeline_lib.SCHEDULER_FILE), scheduler_config)
    _write_json(os.path.join(tmp, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", configs["vae"].get("_class_name", "AutoencoderKL")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "_vidrd_jax": {"exported_from": os.path.abspath(src), "source": info.get("source")},
    })
    if os.path.exists(dst):
      old = dst + ".old-" + os.path.basename(tmp).rsplit("-", 1)[-1]
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  total = sum(sum(int(np.prod(v.shape)) for v in t.values()) for t in tensors.values())
  log(f"exported {total:,d} parameters to {dst} in {time.time() - started:.1f}s")
  return dst


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m weight_conversion.export_torch",
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="vidrd-jax pipeline directory")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument("--legacy-vae-names", action="store_true",
                      help="VAE attention as query/key/value/proj_attn (diffusers <= 0.14)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  args = parser.parse_args(argv)
  try:
    export_to_torch(args.src, args.dst, legacy_vae_names=args.legacy_vae_names,
                    overwrite=args.overwrite)
  except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    _stderr(f"error: {e}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
