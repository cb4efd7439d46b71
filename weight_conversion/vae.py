"""diffusers AutoencoderKL / VidRD TemporalAutoencoderKL state dict <-> vidrd_jax VAE params.

Names map one to one: Flax ``decoder/up_blocks_0/temp_convs_1/convs_3/kernel`` is torch
``decoder.up_blocks.0.temp_convs.1.convs.3.weight`` (VidRD's ``vae/modules.py`` names), Flax
``encoder/mid_block/attentions_0/to_out_0/kernel`` is ``encoder.mid_block.attentions.0.to_out.0
.weight``. The mid-block attention is read in either spelling:

  * current diffusers: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
  * diffusers <= 0.14 (the SD2.1 and VidRD releases): ``query``, ``key``, ``value``,
    ``proj_attn``; and 1x1-conv shaped ``[C, C, 1, 1]`` projections (LDM layout) are accepted.

Export writes the current spelling, or the legacy one with ``legacy_attention_names=True``
(what the reference's own ``TemporalAutoencoderKL.from_pretrained`` loads strictly).
Kernels are transposed (conv ``[*taps, in, out]`` <-> ``[out, in, *taps]``, dense
``[in, out]`` <-> ``[out, in]``); nothing is cast, so round trips are bit-exact.
"""

from __future__ import annotations

import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidrd_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from weight_conversion.common import ConversionError, check_state_dict, flatten, unflatten

_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0|query|key|value|"
                           r"proj_attn)\.(weight|bias)$")


def param_shapes(config: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
  """Flat Flax param path -> shape, without running the model."""
  factor = config.downsample_factor
  frames = jax.ShapeDtypeStruct((1, 2, factor, factor, config.in_channels), jnp.float32)
  variables = jax.eval_shape(AutoencoderKL(config).init, jax.random.PRNGKey(0), frames)
  return {k: tuple(v.shape) for k, v in flatten(nn.meta.unbox(variables["params"])).items()}


def _torch_name(flax_path: str) -> str:
  *modules, leaf = flax_path.split("/")
  # "down_blocks_0" -> "down_blocks.0", "to_out_0" -> "to_out.0"; "conv1", "norm2" stay.
  modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return value
  # conv [*taps, in, out] -> [out, in, *taps]; dense [in, out] -> [out, in].
  taps = value.ndim - 2
  return np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(taps)))


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return value
  taps = value.ndim - 2
  return np.transpose(value, tuple(range(2, 2 + taps)) + (1, 0))


def _normalise_attention(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Legacy attention names -> current ones; 1x1-conv projections -> linear weights."""
  out, clashes = {}, []
  for name, value in sd.items():
    m = _ATTENTION_RE.match(name)
    if m:
      prefix, proj, kind = m.groups()
      proj = {v: k for k, v in _LEGACY_ATTENTION.items()}.get(proj, proj)
      name = f"{prefix}{proj}.{kind}"
      if kind == "weight" and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    if name in out:
      clashes.append(name)
    out[name] = value
  if clashes:
    raise ConversionError("vae checkpoint spells these attention weights twice (old and new "
                          "names): " + ", ".join(sorted(clashes)))
  return out


def vae_from_torch(sd: Mapping[str, np.ndarray], config: AutoencoderKLConfig) -> dict:
  """diffusers / VidRD VAE state dict (numpy) -> nested Flax params."""
  sd = _normalise_attention(sd)
  shapes = param_shapes(config)
  expected = {}
  for path, shape in shapes.items():
    leaf = path.rsplit("/", 1)[-1]
    expected[_torch_name(path)] = _to_torch_layout(leaf, np.empty(shape, np.bool_)).shape
  if not config.temporal_decoder and any(".temp_convs." in k for k in sd):
    hint = " (a temporal VAE checkpoint: set temporal_decoder=True)"
  else:
    hint = ""
  try:
    check_state_dict("vae", sd, expected)
  except ConversionError as e:
    raise ConversionError(str(e) + hint) from None
  flat = {}
  for path in shapes:
    leaf = path.rsplit("/", 1)[-1]
    flat[path] = _to_flax_layout(leaf, np.asarray(sd[_torch_name(path)]))
  return unflatten(flat)


def vae_to_torch(params: Mapping, config: AutoencoderKLConfig, *,
                 legacy_attention_names: bool = False) -> dict[str, np.ndarray]:
  """Nested Flax params -> diffusers-layout VAE state dict (numpy)."""
  flat = {k: np.asarray(v) for k, v in flatten(nn.meta.unbox(params)).items()}
  check_state_dict("vae params", flat, param_shapes(config))
  out = {}
  for path, value in flat.items():
    name = _torch_name(path)
    if legacy_attention_names:
      m = _ATTENTION_RE.match(name)
      if m:
        name = f"{m.group(1)}{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
    out[name] = np.ascontiguousarray(_to_torch_layout(path.rsplit("/", 1)[-1], value))
  return out
