"""UNet weights: diffusers / VidRD PyTorch state dicts <-> Flax UNet3D parameters.

Torch names are diffusers' ``UNet2DConditionModel`` names plus the VidRD reference's temporal
modules, named as its ``UNet3DConditionModel`` names them, i.e. the keys of ``ModelT2V.pth``
with the ``unet.`` prefix stripped::

  down_blocks.0.temp_convs.1.convs.3.weight                     Conv3d [O, I, 3, 1, 1]
  down_blocks.0.attentions.0.transformer_blocks.0.temp_attn.to_q.weight
  down_blocks.0.attentions.0.transformer_blocks.0.temp_norm.weight

Flax names follow mechanically: ``a.N.b`` <-> ``a_N/b`` (``time_embedding.linear_1`` keeps its
name), ``weight`` -> ``kernel`` (transposed: Linear [O, I] -> [I, O], Conv OIHW -> HWIO,
Conv3d OIDHW -> DHWIO) or ``scale`` (norms), ``bias`` -> ``bias``. Both directions use the
same table, built from the Flax model's own parameter tree, so the round trip is bit-exact.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from vidrd_jax.models.unet3d import UNet3DConfig, init_params
from weight_conversion.common import ConversionError, check_state_dict, flatten, unflatten

# Flax names whose trailing "_N" is part of the torch name, not a list index.
_KEEP_UNDERSCORE = {"linear_1", "linear_2"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")
# Parameters that the reference zero-initialises (identity at start).
_ZERO_INIT = re.compile(r"(temp_convs\.\d+\.convs\.15\.|temp_attn\.to_out\.0\.|temp_transformer\.proj_out\.)")


def is_temporal(torch_name: str) -> bool:
  """True for VidRD's temporal parameters (absent from a plain SD2.1 checkpoint)."""
  return "temp_" in torch_name


def _flax_to_torch_name(path: str) -> str:
  parts = []
  for comp in path.split("/")[:-1]:
    m = _INDEXED.match(comp)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m and comp not in _KEEP_UNDERSCORE else comp)
  leaf = path.rsplit("/", 1)[-1]
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def _flax_to_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return value
  if value.ndim == 2:
    return value.T
  # [*taps, I, O] -> [O, I, *taps]
  order = (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2))
  return np.transpose(value, order)


def _torch_to_flax_array(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return value
  if value.ndim == 2:
    return value.T
  # [O, I, *taps] -> [*taps, I, O]
  order = tuple(range(2, value.ndim)) + (1, 0)
  return np.transpose(value, order)


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(_flax_to_torch_array(leaf, np.empty(shape, np.uint8)).shape)


@functools.lru_cache(maxsize=16)
def _table(config: UNet3DConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
  """torch name -> (flax path, torch shape), from the model's abstract parameters."""
  abstract = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.PRNGKey(0))
  abstract = nn.unbox(abstract)
  table = {}
  for path, leaf in flatten(abstract).items():
    name = _flax_to_torch_name(path)
    if name in table:
      raise AssertionError(f"two Flax parameters map to {name}")
    table[name] = (path, _torch_shape(path.rsplit("/", 1)[-1], tuple(leaf.shape)))
  return table


def expected_torch_shapes(config: UNet3DConfig) -> dict[str, tuple[int, ...]]:
  """The PyTorch state dict (names -> shapes) that fits ``config``'s UNet3D."""
  return {name: shape for name, (_, shape) in _table(config).items()}


def default_temporal_init(
    name: str, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
  """Fresh value of a temporal parameter (torch layout), as the Flax model would init it.

  Norm scales are 1 and biases 0; the layers the reference zero-initialises (last conv of
  each TemporalConvLayer, temp_attn.to_out.0, temp_transformer.proj_out) are 0, so the new
  layers start as identity; other kernels are LeCun-normal.
  """
  if name.endswith(".bias"):
    return np.zeros(shape, np.float32)
  if len(shape) == 1:
    return np.ones(shape, np.float32)
  if _ZERO_INIT.search(name):
    return np.zeros(shape, np.float32)
  fan_in = int(np.prod(shape[1:]))
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def unet_from_torch(
    state_dict: Mapping[str, Any],
    config: UNet3DConfig,
    *,
    allow_missing_temporal: bool = False,
    seed: int = 0,
    ignore: tuple[str, ...] = (),
) -> dict:
  """PyTorch UNet state dict -> nested Flax ``params`` dict of NumPy arrays.

  Args:
    state_dict: {torch name: array} (NumPy arrays or anything ``np.asarray`` accepts); a
      diffusers UNet2DConditionModel, or the VidRD UNet3D (``unet.`` prefix stripped).
    config: the UNet3D config the parameters are for.
    allow_missing_temporal: a plain SD2.1 (2D) checkpoint: the temporal parameters it lacks
      are created with :func:`default_temporal_init` (identity layers). Any other missing
      key is still an error.
    seed: seed of those fresh temporal kernels.
    ignore: names in the checkpoint that are known and deliberately unused.

  Returns:
    ``{"conv_in": {"kernel": ..., "bias": ...}, ...}`` matching ``UNet3DConditionModel(config)``.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  table = _table(config)
  expected = {name: shape for name, (_, shape) in table.items()}
  state = {k: np.asarray(v) for k, v in state_dict.items()}
  fill = []
  if allow_missing_temporal:
    fill = sorted(n for n in expected if n not in state and is_temporal(n))
    # A checkpoint that has some temporal layers but not all is broken, not 2D; one that has
    # all of them needs no filling.
    if fill and len(fill) != sum(map(is_temporal, expected)):
      present = [n for n in expected if is_temporal(n) and n in state]
      if present:
        raise ConversionError(
            f"unet checkpoint has {len(present)} of {len(present) + len(fill)} temporal "
            f"parameters; missing: " + ", ".join(fill))
    check_state_dict("unet", state, {k: v for k, v in expected.items() if k not in fill},
                     ignore=ignore)
  else:
    check_state_dict("unet", state, expected, ignore=ignore)
  rng = np.random.default_rng(seed)
  for name in fill:
    state[name] = default_temporal_init(name, expected[name], rng)
  flat = {}
  for name, (path, _) in table.items():
    flat[path] = _torch_to_flax_array(path.rsplit("/", 1)[-1], state[name])
  return unflatten(flat)


def unet_to_torch(params: Mapping, config: UNet3DConfig) -> dict[str, np.ndarray]:
  """Flax UNet3D ``params`` -> {torch name: array}, the exact inverse of :func:`unet_from_torch`.

  ``params`` may be boxed (``nn.LogicallyPartitioned``) or plain, jax or NumPy arrays.
  """
  table = _table(config)
  flat = flatten(nn.unbox(params))
  by_path = {path: name for name, (path, _) in table.items()}
  extra = sorted(set(flat) - set(by_path))
  missing = sorted(set(by_path) - set(flat))
  if extra or missing:
    raise ConversionError(
        "unet params do not match the config: "
        + (f"{len(missing)} missing: {', '.join(missing)}; " if missing else "")
        + (f"{len(extra)} unexpected: {', '.join(extra)}" if extra else ""))
  out = {}
  for path, value in flat.items():
    name = by_path[path]
    arr = _flax_to_torch_array(path.rsplit("/", 1)[-1], np.asarray(value))
    if tuple(arr.shape) != table[name][1]:
      raise ConversionError(f"unet param {path}: shape {arr.shape} vs expected {table[name][1]}")
    out[name] = np.ascontiguousarray(arr)
  return out


def count_params(config: UNet3DConfig) -> int:
  """Number of parameters of ``UNet3DConditionModel(config)``."""
  return int(sum(np.prod(s) for s in expected_torch_shapes(config).values()))
