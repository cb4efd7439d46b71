"""Tiny, seeded stand-ins for the real releases, written exactly in their on-disk layouts.

  make_tiny_sd_folder(path)        a diffusers SD2.1-style folder (unet/ vae/ text_encoder/
                                   tokenizer/ scheduler/), current or 2023-era key spellings
  make_tiny_ldm_file(path)         the same weights as one CompVis/LDM single file
  make_tiny_vidrd_release(dir)     ModelT2V.pth-style Lightning checkpoint + temporal VAE folder
  converted_tiny_pipeline(factory) convert_sd output of make_tiny_sd_folder, cached per session

The PyTorch models come from tiny_torch_models(seed): the same seed always gives the same
weights, so a test can rebuild the reference after converting. Every parameter is randomised
(including those diffusers / the reference initialise to zero) so that no converted weight goes
untested. Channel counts are multiples of 32 because the temporal layers use 32-group norms.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

# SD2.1-base's layout shrunk: cross-attention in all but the last down block (and the first up
# block), linear projections in the transformers, OpenCLIP-style GELU text tower.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    # diffusers' SD2.1 configs put the number of heads under this name (head dim 64 there).
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    upcast_attention=False,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)
TINY_VAE_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
TINY_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    # SD2.1's text_encoder/config.json values.
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
SD21_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def flat_params(tree) -> dict[str, np.ndarray]:
  """A parameter tree as {"down_blocks_0/.../kernel": array}, for comparing trees leaf by leaf."""
  import jax  # pylint: disable=g-import-not-at-top
  from vidrd_jax import train_lib  # pylint: disable=g-import-not-at-top
  return {train_lib.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def randomize_(module, seed: int, scale: float = 1.0) -> None:
  """Overwrites every parameter with seeded random values (in place).

  Matrices and kernels get N(0, scale^2 / fan_in) so activations stay O(1) through the tiny
  nets; 1-D weights (norm scales) 1 + N(0, 0.1^2); biases N(0, 0.1^2). Nothing stays zero.
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(module.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 2 else p.shape[1]
        p.copy_(noise * scale / np.sqrt(fan_in))
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(1.0 + 0.1 * noise)


@dataclasses.dataclass
class TorchModels:
  unet: Any
  vae: Any
  text_encoder: Any


def tiny_torch_models(seed: int = 0) -> TorchModels:
  """The tiny diffusers / transformers models behind every fixture (float32, eval mode)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
  vae = AutoencoderKL(**TINY_VAE_CONFIG)
  text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
  for i, m in enumerate((unet, vae, text)):
    randomize_(m, seed * 7919 + i)
    m.eval()
  return TorchModels(unet, vae, text)


def numpy_state_dict(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


# Current diffusers (>= 0.15) -> the names SD2.1's and VidRD's folders were written with.
_OLD_VAE_ATTN = (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."),
                 ("to_out.0.", "proj_attn."))


def old_vae_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """diffusers <= 0.14 spelling of the VAE's mid-block attention."""
  out = {}
  for k, v in sd.items():
    if ".attentions." in k:
      for new, old in _OLD_VAE_ATTN:
        k = k.replace("." + new, "." + old)
    out[k] = v
  return out


def old_text_names(sd: dict[str, np.ndarray], max_positions: int = 77) -> dict[str, np.ndarray]:
  """transformers 4.x spelling: ``text_model.`` prefix and the position_ids buffer."""
  out = {"text_model." + k: v for k, v in sd.items()}
  out["text_model.embeddings.position_ids"] = np.arange(max_positions, dtype=np.int64)[None]
  return out


def _save_safetensors(path: str, sd: dict[str, np.ndarray]) -> None:
  from weight_conversion.torch_io import save_safetensors  # pylint: disable=g-import-not-at-top
  save_safetensors(path, sd)


def _save_pickle(path: str, sd: dict[str, np.ndarray]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)


def _write_json(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def write_tokenizer(path: str) -> str:
  from vidrd_jax.tokenizer import write_tokenizer_files  # pylint: disable=g-import-not-at-top
  return write_tokenizer_files(path)


def make_tiny_sd_folder(path: str, seed: int = 0, old_names: bool = False,
                        prediction_type: str = "epsilon") -> str:
  """Writes a diffusers-format SD2.1-style folder with tiny_torch_models(seed).

  Args:
    path: destination (created).
    seed: weights seed.
    old_names: write the 2023 spellings the real releases use: VAE attention as
      query/key/value/proj_attn, text encoder keys with ``text_model.`` and position_ids, and
      ``.bin`` pickles for the text encoder; the UNet folder then also holds a ``.bin`` with
      *different* weights next to the safetensors file, which the converter must ignore.
    prediction_type: recorded in scheduler/scheduler_config.json.

  Returns:
    ``path``.
  """
  models = tiny_torch_models(seed)
  os.makedirs(path, exist_ok=True)
  for name, model in (("unet", models.unet), ("vae", models.vae)):
    sub = os.path.join(path, name)
    os.makedirs(sub, exist_ok=True)
    model.save_config(sub)
    sd = numpy_state_dict(model)
    if name == "vae" and old_names:
      sd = old_vae_names(sd)
    _save_safetensors(os.path.join(sub, "diffusion_pytorch_model.safetensors"), sd)
    if name == "unet" and old_names:
      decoy = numpy_state_dict(tiny_torch_models(seed + 1000).unet)
      _save_pickle(os.path.join(sub, "diffusion_pytorch_model.bin"), decoy)
  sub = os.path.join(path, "text_encoder")
  os.makedirs(sub, exist_ok=True)
  models.text_encoder.config.save_pretrained(sub)
  sd = numpy_state_dict(models.text_encoder)
  if old_names:
    _save_pickle(os.path.join(sub, "pytorch_model.bin"), old_text_names(sd))
  else:
    _save_safetensors(os.path.join(sub, "model.safetensors"), sd)
  write_tokenizer(os.path.join(path, "tokenizer"))
  _write_json(os.path.join(path, "scheduler", "scheduler_config.json"),
              dict(SD21_SCHEDULER_CONFIG, prediction_type=prediction_type))
  _write_json(os.path.join(path, "model_index.json"), {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
  })
  return path


def tiny_ldm_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """tiny_torch_models(seed) in CompVis/LDM names, with everything SD2.1 leaves unused."""
  from weight_conversion import ldm  # pylint: disable=g-import-not-at-top
  models = tiny_torch_models(seed)
  sd = ldm.join_ldm_checkpoint(
      numpy_state_dict(models.unet), numpy_state_dict(models.vae),
      numpy_state_dict(models.text_encoder), TINY_UNET_CONFIG, TINY_VAE_CONFIG)
  rng = np.random.default_rng(seed + 12345)
  d, n = TINY_TEXT_CONFIG["hidden_size"], TINY_TEXT_CONFIG["num_hidden_layers"]
  m = TINY_TEXT_CONFIG["intermediate_size"]
  # The OpenCLIP tower's last block (SD2.1 stops one block earlier), projection and logit scale.
  last = f"{ldm.TEXT_PREFIX}transformer.resblocks.{n}."
  extra = {
      last + "attn.in_proj_weight": (3 * d, d), last + "attn.in_proj_bias": (3 * d,),
      last + "attn.out_proj.weight": (d, d), last + "attn.out_proj.bias": (d,),
      last + "ln_1.weight": (d,), last + "ln_1.bias": (d,),
      last + "ln_2.weight": (d,), last + "ln_2.bias": (d,),
      last + "mlp.c_fc.weight": (m, d), last + "mlp.c_fc.bias": (m,),
      last + "mlp.c_proj.weight": (d, m), last + "mlp.c_proj.bias": (d,),
      ldm.TEXT_PREFIX + "text_projection": (d, d), ldm.TEXT_PREFIX + "logit_scale": (),
  }
  for k, shape in extra.items():
    sd[k] = rng.standard_normal(shape).astype(np.float32)
  # The DDPM schedule buffers LatentDiffusion registers, and an EMA bookkeeping pair.
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  sd["betas"] = betas.astype(np.float32)
  sd["alphas_cumprod"] = np.cumprod(1 - betas).astype(np.float32)
  sd["alphas_cumprod_prev"] = np.concatenate([[1.0], sd["alphas_cumprod"][:-1]]).astype(np.float32)
  sd["model_ema.decay"] = np.array(0.9999, np.float32)
  sd["model_ema.num_updates"] = np.array(0, np.int32)
  return sd


def make_tiny_ldm_file(path: str, seed: int = 0) -> str:
  """Writes tiny_ldm_state_dict(seed) as ``.safetensors``, or as a Lightning ``.ckpt``."""
  sd = tiny_ldm_state_dict(seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    _save_safetensors(path, sd)
  elif path.endswith(".ckpt"):
    import torch  # pylint: disable=g-import-not-at-top
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                "global_step": 110000, "epoch": 0}, path)
  else:
    raise ValueError(f"make_tiny_ldm_file writes .safetensors or .ckpt, not {path}")
  return path


# ------------------------------------------------------------------------------- VidRD release


@dataclasses.dataclass
class TorchVidRD:
  unet: Any          # tests.torch_reference.unet3d.ReferenceUNet3D
  vae: Any           # diffusers AutoencoderKL with the reference's temporal convs
  text_encoder: Any  # transformers CLIPTextModel (fine-tuned in the release)


def tiny_vidrd_torch_models(seed: int = 0) -> TorchVidRD:
  """The tiny PyTorch references behind make_tiny_vidrd_release(seed), every weight random."""
  from tests.torch_reference.temporal_vae import make_temporal_vae  # pylint: disable=g-import-not-at-top
  from tests.torch_reference.unet3d import build_reference_unet3d  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  unet = build_reference_unet3d(TINY_UNET_CONFIG, seed=seed + 101, add_temp_conv=True,
                                add_temp_embed=True)
  torch.manual_seed(seed + 202)
  vae = make_temporal_vae(**TINY_VAE_CONFIG)
  randomize_(vae, seed + 202)
  # The release fine-tunes the text encoder too: different weights from the SD folder's.
  text = tiny_torch_models(seed + 303).text_encoder
  return TorchVidRD(unet.eval(), vae.eval(), text)


def make_tiny_vidrd_release(path: str, seed: int = 0) -> dict[str, str]:
  """Writes a tiny VidRD release as the authors ship it, next to a tiny SD2.1-base folder.

  Layout: ``path/sd`` (make_tiny_sd_folder), ``path/ModelT2V.pth`` (a Lightning checkpoint:
  ``state_dict`` with ``unet.*`` incl. temporal keys, ``text_encoder.*`` in transformers-4
  names, plus ``clip.*`` and ``vae.*`` entries the reference ignores, and Lightning's
  bookkeeping), ``path/vae_finetuned`` (TemporalAutoencoderKL config, 2023 attention names,
  ``.bin`` weights).

  Returns:
    {"sd": ..., "unet_ckpt": ..., "vae": ...} paths, as convert_vidrd takes them.
  """
  import torch  # pylint: disable=g-import-not-at-top
  models = tiny_vidrd_torch_models(seed)
  os.makedirs(path, exist_ok=True)
  sd_dir = make_tiny_sd_folder(os.path.join(path, "sd"), seed)
  state = {"unet." + k: v for k, v in numpy_state_dict(models.unet).items()}
  text = old_text_names(numpy_state_dict(models.text_encoder))
  state.update({"text_encoder." + k: v for k, v in text.items()})
  rng = np.random.default_rng(seed)
  state["clip.logit_scale"] = np.array(2.6592, np.float32)
  state["clip.text_projection.weight"] = rng.standard_normal((8, 32)).astype(np.float32)
  state["vae.decoder.conv_out.bias"] = rng.standard_normal(3).astype(np.float32)
  ckpt = {
      "epoch": 3,
      "global_step": 12000,
      "pytorch-lightning_version": "1.9.4",
      "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
      "hyper_parameters": {"resolution": 256, "add_temp_embed": True, "add_temp_conv": True,
                           "ckpt_path": None, "lr": 3e-5},
      "callbacks": {"ModelCheckpoint": {"best_model_score": None, "dirpath": "/ckpt"}},
      "optimizer_states": [],
      "lr_schedulers": [],
  }
  unet_ckpt = os.path.join(path, "ModelT2V.pth")
  torch.save(ckpt, unet_ckpt)
  vae_dir = os.path.join(path, "vae_finetuned")
  os.makedirs(vae_dir, exist_ok=True)
  _write_json(os.path.join(vae_dir, "config.json"), {
      "_class_name": "TemporalAutoencoderKL", "_diffusers_version": "0.11.1",
      "act_fn": "silu", "add_temp_conv": True, **{k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in TINY_VAE_CONFIG.items()}})
  _save_pickle(os.path.join(vae_dir, "diffusion_pytorch_model.bin"),
               old_vae_names(numpy_state_dict(models.vae)))
  return {"sd": sd_dir, "unet_ckpt": unet_ckpt, "vae": vae_dir}


# ------------------------------------------------------------------------- converted pipelines

_CONVERTED: dict[tuple, str] = {}


def converted_tiny_pipeline(tmp_path_factory, seed: int = 0) -> str:
  """A convert_sd output of make_tiny_sd_folder(seed), built once per test session.

  Wrap it in a session-scoped fixture of your own::

    @pytest.fixture(scope="session")
    def tiny_pipeline_dir(tmp_path_factory):
      return fixtures.converted_tiny_pipeline(tmp_path_factory)

  Returns:
    The directory; ``vidrd_jax.load_pipeline`` reads it. The PyTorch models it came from are
    ``tiny_torch_models(seed)``. Treat it as read-only (it is shared).
  """
  key = (id(tmp_path_factory), seed)
  if key not in _CONVERTED or not os.path.isdir(_CONVERTED[key]):
    from weight_conversion.convert_sd import convert_sd  # pylint: disable=g-import-not-at-top
    base = tmp_path_factory.mktemp(f"tiny_sd_{seed}")
    src = make_tiny_sd_folder(str(base / "sd"), seed)
    _CONVERTED[key] = convert_sd(src, str(base / "converted"), log=lambda _: None)
  return _CONVERTED[key]
