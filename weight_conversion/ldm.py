"""Single-file Stable Diffusion 2.x checkpoints (CompVis / LDM key names) <-> diffusers names.

A file such as ``v2-1_768-ema-pruned.safetensors`` holds the whole model under three prefixes:

  model.diffusion_model.*          the UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*              the VAE (encoder.down.N.block.M, mid.attn_1 as 1x1 convs, ...)
  cond_stage_model.model.*         the OpenCLIP ViT-H/14 text tower (transformer.resblocks.N, fused
                                   attn.in_proj_weight)

plus things SD2.1 does not use: the last OpenCLIP block (SD2.1 conditions on the penultimate
layer, so the transformers text model has one layer fewer), ``text_projection``, ``logit_scale``,
``model_ema.*`` and the DDPM schedule buffers. Those are dropped here.

The functions below turn names (and the few tensors whose layout differs) into the names
diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers' ``CLIPTextModel``
(transformers 5 spelling, no ``text_model.`` prefix) use, and back. They need the diffusers
configs (dicts) because the LDM block numbering depends on ``layers_per_block`` and on which
blocks have attention. Each direction is the exact inverse of the other on the kept keys.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from weight_conversion.common import ConversionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

# Top-level entries of an LDM checkpoint that are not weights of any SD2.1 component: the DDPM
# schedule the LatentDiffusion module registers as buffers (we keep the schedule as a config).
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
})
# Parts of the OpenCLIP model SD2.1 never evaluates.
TEXT_UNUSED = frozenset({"text_projection", "logit_scale", "attn_mask"})

_RESNET_DIFFUSERS_TO_LDM = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)


def _swap_prefix(rest: str, table, reverse: bool = False) -> str | None:
  for new, old in table:
    src, dst = (old, new) if reverse else (new, old)
    if rest.startswith(src):
      return dst + rest[len(src):]
  return None


def _layers_per_block(config: Mapping) -> int:
  lpb = config.get("layers_per_block", 2)
  if not isinstance(lpb, int):
    raise ConversionError(f"LDM mapping needs one layers_per_block for all blocks, got {lpb}")
  return lpb


def _has_attention(block_type: str) -> bool:
  return block_type.startswith("CrossAttn")


# ----------------------------------------------------------------------------------------- UNet


def unet_diffusers_to_ldm_name(name: str, config: Mapping) -> str:
  """diffusers UNet2DConditionModel parameter name -> LDM name (without model.diffusion_model.)."""
  lpb = _layers_per_block(config)
  fixed = {
      "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
      "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
  }
  for d, l in fixed.items():
    if name.startswith(d):
      return l + name[len(d):]
  m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
  if m:
    kind, b, part, l, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if kind == "down_blocks":
      idx, where = 1 + b * (lpb + 1) + l, "input_blocks"
    else:
      idx, where = b * (lpb + 1) + l, "output_blocks"
    if part == "resnets":
      sub = _swap_prefix(rest, _RESNET_DIFFUSERS_TO_LDM)
      if sub is None:
        raise ConversionError(f"unknown UNet resnet parameter: {name}")
      return f"{where}.{idx}.0.{sub}"
    return f"{where}.{idx}.1.{rest}"
  m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name)
  if m:
    return f"input_blocks.{1 + int(m.group(1)) * (lpb + 1) + lpb}.0.op.{m.group(2)}"
  m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name)
  if m:
    u = int(m.group(1))
    j = 2 if _has_attention(config["up_block_types"][u]) else 1
    return f"output_blocks.{u * (lpb + 1) + lpb}.{j}.conv.{m.group(2)}"
  m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", name)
  if m:
    sub = _swap_prefix(m.group(2), _RESNET_DIFFUSERS_TO_LDM)
    if sub is None:
      raise ConversionError(f"unknown UNet resnet parameter: {name}")
    return f"middle_block.{2 * int(m.group(1))}.{sub}"
  m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name)
  if m:
    return f"middle_block.1.{m.group(1)}"
  raise ConversionError(f"UNet parameter has no LDM name: {name}")


def unet_ldm_to_diffusers_name(name: str, config: Mapping) -> str | None:
  """LDM UNet name (without model.diffusion_model.) -> diffusers name; None if not recognised."""
  lpb = _layers_per_block(config)
  fixed = {
      "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
      "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
  }
  for l, d in fixed.items():
    if name.startswith(l):
      return d + name[len(l):]
  m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", name)
  if m:
    i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    b, l = divmod(i - 1, lpb + 1)
    if l == lpb:
      if j == 0 and rest.startswith("op."):
        return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
      return None
    if j == 0:
      sub = _swap_prefix(rest, _RESNET_DIFFUSERS_TO_LDM, reverse=True)
      return None if sub is None else f"down_blocks.{b}.resnets.{l}.{sub}"
    if j == 1:
      return f"down_blocks.{b}.attentions.{l}.{rest}"
    return None
  m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", name)
  if m:
    o, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    u, l = divmod(o, lpb + 1)
    if u >= len(config["up_block_types"]):
      return None
    attn = _has_attention(config["up_block_types"][u])
    if j == 0:
      sub = _swap_prefix(rest, _RESNET_DIFFUSERS_TO_LDM, reverse=True)
      return None if sub is None else f"up_blocks.{u}.resnets.{l}.{sub}"
    if j == 1 and attn:
      return f"up_blocks.{u}.attentions.{l}.{rest}"
    if j == (2 if attn else 1) and l == lpb and rest.startswith("conv."):
      return f"up_blocks.{u}.upsamplers.0.{rest}"
    return None
  m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", name)
  if m:
    j, rest = int(m.group(1)), m.group(2)
    if j == 1:
      return f"mid_block.attentions.0.{rest}"
    if j in (0, 2):
      sub = _swap_prefix(rest, _RESNET_DIFFUSERS_TO_LDM, reverse=True)
      return None if sub is None else f"mid_block.resnets.{j // 2}.{sub}"
  return None


# ------------------------------------------------------------------------------------------ VAE

_VAE_FIXED = (
    ("encoder.conv_norm_out.", "encoder.norm_out."),
    ("decoder.conv_norm_out.", "decoder.norm_out."),
    ("encoder.conv_in.", "encoder.conv_in."),
    ("encoder.conv_out.", "encoder.conv_out."),
    ("decoder.conv_in.", "decoder.conv_in."),
    ("decoder.conv_out.", "decoder.conv_out."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
)
_VAE_ATTN = (
    ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_VAE_ATTN_PROJ = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _vae_resnet_sub(rest: str, reverse: bool) -> str:
  a, b = ("conv_shortcut.", "nin_shortcut.")
  src, dst = (b, a) if reverse else (a, b)
  return dst + rest[len(src):] if rest.startswith(src) else rest


def vae_diffusers_to_ldm_name(name: str, config: Mapping) -> str:
  """diffusers AutoencoderKL name -> LDM name (without first_stage_model.)."""
  nb = len(config["block_out_channels"])
  out = _swap_prefix(name, _VAE_FIXED)
  if out is not None:
    return out
  m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
  if m:
    coder, part, k, rest = m.groups()
    if part == "resnets":
      return f"{coder}.mid.block_{int(k) + 1}.{_vae_resnet_sub(rest, False)}"
    sub = _swap_prefix(rest, _VAE_ATTN)
    if sub is None:
      raise ConversionError(f"unknown VAE attention parameter: {name}")
    return f"{coder}.mid.attn_1.{sub}"
  m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", name)
  if m:
    i, rest = int(m.group(1)), m.group(4)
    if m.group(3) is not None:
      return f"encoder.down.{i}.block.{m.group(3)}.{_vae_resnet_sub(rest, False)}"
    return f"encoder.down.{i}.downsample.{rest}"
  m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", name)
  if m:
    # LDM numbers decoder levels from the highest resolution; diffusers from the lowest.
    k, rest = nb - 1 - int(m.group(1)), m.group(4)
    if m.group(3) is not None:
      return f"decoder.up.{k}.block.{m.group(3)}.{_vae_resnet_sub(rest, False)}"
    return f"decoder.up.{k}.upsample.{rest}"
  raise ConversionError(f"VAE parameter has no LDM name: {name}")


def vae_ldm_to_diffusers_name(name: str, config: Mapping) -> str | None:
  """LDM VAE name (without first_stage_model.) -> diffusers name; None if not recognised."""
  nb = len(config["block_out_channels"])
  out = _swap_prefix(name, _VAE_FIXED, reverse=True)
  if out is not None:
    return out
  m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_(\d+)|attn_1)\.(.+)", name)
  if m:
    coder, k, rest = m.group(1), m.group(3), m.group(4)
    if k is not None:
      return f"{coder}.mid_block.resnets.{int(k) - 1}.{_vae_resnet_sub(rest, True)}"
    sub = _swap_prefix(rest, _VAE_ATTN, reverse=True)
    return None if sub is None else f"{coder}.mid_block.attentions.0.{sub}"
  m = re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)", name)
  if m:
    i, rest = int(m.group(1)), m.group(4)
    if m.group(3) is not None:
      return f"encoder.down_blocks.{i}.resnets.{m.group(3)}.{_vae_resnet_sub(rest, True)}"
    return f"encoder.down_blocks.{i}.downsamplers.0.{rest}"
  m = re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)", name)
  if m:
    u, rest = nb - 1 - int(m.group(1)), m.group(4)
    if u < 0:
      return None
    if m.group(3) is not None:
      return f"decoder.up_blocks.{u}.resnets.{m.group(3)}.{_vae_resnet_sub(rest, True)}"
    return f"decoder.up_blocks.{u}.upsamplers.0.{rest}"
  return None


# ----------------------------------------------------------------------------------------- text

_TEXT_FIXED = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
)
_TEXT_LAYER = (
    ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."),
)


def text_ldm_to_diffusers(sd: Mapping[str, np.ndarray], num_layers: int) -> tuple[dict, list]:
  """OpenCLIP text tower (names without cond_stage_model.model.) -> transformers CLIPTextModel.

  Args:
    sd: the OpenCLIP tensors.
    num_layers: the transformers model's ``num_hidden_layers``; OpenCLIP blocks from this index
      on are dropped (SD2.1 uses the penultimate layer's output).

  Returns:
    (state dict in transformers 5 names, names that were dropped on purpose). Names that are
    neither mapped nor known-unused are returned under their own name so that the caller's
    check_state_dict reports them as unexpected.
  """
  out, dropped = {}, []
  for name, value in sd.items():
    mapped = _swap_prefix(name, _TEXT_FIXED, reverse=True)
    if mapped is not None:
      out[mapped] = value
      continue
    if name in TEXT_UNUSED:
      dropped.append(name)
      continue
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
    if not m:
      out[name] = value
      continue
    n, rest = int(m.group(1)), m.group(2)
    if n >= num_layers:
      dropped.append(name)
      continue
    prefix = f"encoder.layers.{n}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
      # PyTorch's MultiheadAttention stores q, k and v stacked along the output dimension.
      q, k, v = np.split(value, 3, axis=0)
      kind = "weight" if rest.endswith("weight") else "bias"
      for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
        out[f"{prefix}self_attn.{proj}.{kind}"] = np.ascontiguousarray(part)
      continue
    sub = _swap_prefix(rest, _TEXT_LAYER, reverse=True)
    out[prefix + sub if sub is not None else name] = value
  return out, dropped


def text_diffusers_to_ldm(sd: Mapping[str, np.ndarray]) -> dict:
  """transformers CLIPTextModel (either spelling) -> OpenCLIP names (without the prefix)."""
  sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
  out = {}
  for name, value in sd.items():
    if name.endswith("position_ids"):
      continue
    mapped = _swap_prefix(name, _TEXT_FIXED)
    if mapped is not None:
      out[mapped] = value
      continue
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
    if not m:
      raise ConversionError(f"text encoder parameter has no OpenCLIP name: {name}")
    n, rest = int(m.group(1)), m.group(2)
    base = f"transformer.resblocks.{n}."
    pm = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
    if pm:
      if pm.group(1) == "q":
        kind = pm.group(2)
        parts = [sd[f"encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
        out[f"{base}attn.in_proj_{kind}"] = np.concatenate(parts, axis=0)
      continue
    sub = _swap_prefix(rest, _TEXT_LAYER)
    if sub is None:
      raise ConversionError(f"text encoder parameter has no OpenCLIP name: {name}")
    out[base + sub] = value
  return out


# ------------------------------------------------------------------------------- whole checkpoint


def is_ldm_checkpoint(sd: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(UNET_PREFIX) for k in sd)


def split_ldm_checkpoint(
    sd: Mapping[str, np.ndarray],
    unet_config: Mapping,
    vae_config: Mapping,
    text_num_layers: int,
    *,
    extract_ema: bool = False,
) -> tuple[dict, dict, dict, list[str]]:
  """An LDM single-file state dict -> (unet, vae, text encoder) state dicts in diffusers names.

  Args:
    sd: the whole checkpoint (``state_dict`` of a Lightning .ckpt, or a .safetensors file).
    unet_config: the diffusers UNet2DConditionModel config (dict) of the model in the file.
    vae_config: the diffusers AutoencoderKL config (dict).
    text_num_layers: number of transformer layers of the text model SD2.1 evaluates.
    extract_ema: take the UNet weights from ``model_ema.*`` (non-pruned training checkpoints
      carry both; the released ``-ema-pruned`` files already hold the EMA weights in place).

  Returns:
    (unet, vae, text, dropped): three state dicts, plus the names deliberately left out. A name
    that matches nothing is passed through unchanged into the component it belongs to (or into
    the UNet's when it has no known prefix) so that the model's key check reports it.

  Raises:
    ConversionError: the checkpoint has no LDM UNet, or extract_ema without EMA weights.
  """
  if not is_ldm_checkpoint(sd):
    raise ConversionError(
        f"not a single-file (LDM) Stable Diffusion checkpoint: no '{UNET_PREFIX}*' keys")
  unet, vae, text_raw, dropped = {}, {}, {}, []
  ema = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
  if extract_ema and not any(k.startswith("diffusion_model") for k in ema):
    raise ConversionError("extract_ema: the checkpoint has no model_ema.* UNet weights")
  for name, value in sd.items():
    if name.startswith(UNET_PREFIX):
      ldm = name[len(UNET_PREFIX):]
      if extract_ema:
        # LitEma stores each name with its dots removed: model_ema.diffusion_modelinput_blocks00weight.
        value = ema.get("diffusion_model" + ldm.replace(".", ""))
        if value is None:
          raise ConversionError(f"extract_ema: no EMA weight for {name}")
      mapped = unet_ldm_to_diffusers_name(ldm, unet_config)
      unet[mapped if mapped is not None else name] = value
    elif name.startswith(VAE_PREFIX):
      ldm = name[len(VAE_PREFIX):]
      mapped = vae_ldm_to_diffusers_name(ldm, vae_config)
      if mapped is not None and mapped.endswith(_VAE_ATTN_PROJ) and value.ndim > 2:
        # LDM computes the VAE's mid-block attention projections as 1x1 convolutions.
        value = value.reshape(value.shape[:2])
      vae[mapped if mapped is not None else name] = value
    elif name.startswith(TEXT_PREFIX):
      text_raw[name[len(TEXT_PREFIX):]] = value
    elif name.startswith(EMA_PREFIX) or name in SCHEDULE_BUFFERS:
      dropped.append(name)
    elif name.startswith("cond_stage_model."):
      # e.g. FrozenOpenCLIPEmbedder buffers outside .model; nothing SD2.1 uses.
      dropped.append(name)
    else:
      unet[name] = value
  text, text_dropped = text_ldm_to_diffusers(text_raw, text_num_layers)
  dropped += [TEXT_PREFIX + k for k in text_dropped]
  return unet, vae, text, sorted(dropped)


def join_ldm_checkpoint(
    unet: Mapping[str, np.ndarray],
    vae: Mapping[str, np.ndarray],
    text: Mapping[str, np.ndarray],
    unet_config: Mapping,
    vae_config: Mapping,
) -> dict[str, np.ndarray]:
  """The inverse of split_ldm_checkpoint on the kept keys (diffusers names -> one LDM dict).

  The VAE attention projections become 1x1 convs again. What SD2.1 does not use (the last
  OpenCLIP block, text_projection, ...) cannot be recreated and is not written.
  """
  out = {}
  for name, value in unet.items():
    out[UNET_PREFIX + unet_diffusers_to_ldm_name(name, unet_config)] = value
  for name, value in vae.items():
    if name.endswith(_VAE_ATTN_PROJ) and value.ndim == 2:
      value = value[:, :, None, None]
    out[VAE_PREFIX + vae_diffusers_to_ldm_name(name, vae_config)] = value
  for name, value in text_diffusers_to_ldm(text).items():
    out[TEXT_PREFIX + name] = value
  return out
