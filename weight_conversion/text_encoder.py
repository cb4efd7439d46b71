"""transformers CLIPTextModel state dict <-> vidrd_jax CLIPTextModel params.

Reads both spellings of the HF checkpoint:
  * transformers 4.x (SD2.1 and VidRD releases): ``text_model.`` prefix on every key, plus the
    ``text_model.embeddings.position_ids`` buffer (ignored: positions are always 0..L-1);
  * transformers 5: the same names without the prefix and without the buffer.
Exports the 4.x spelling (``text_model.`` prefix, no buffer), which transformers 4.31+ and 5
both load without warnings.

Linear weights are ``[out, in]`` in torch and ``[in, out]`` kernels in Flax; everything else
is copied as is, so the round trip is bit-exact.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import numpy as np

from vidrd_jax.models.text_encoder import CLIPTextConfig
from weight_conversion.common import ConversionError, check_state_dict, flatten, unflatten

PREFIX = "text_model."
_IGNORED = ("embeddings.position_ids",)


def _mapping(config: CLIPTextConfig) -> list[tuple[str, str, bool, tuple[int, ...]]]:
  """(torch name without prefix, flax path, is_linear_weight, torch shape) for every tensor."""
  d, m, v, p = (config.hidden_size, config.intermediate_size, config.vocab_size,
                config.max_position_embeddings)
  rows = [
      ("embeddings.token_embedding.weight", "embeddings/token_embedding/embedding", False, (v, d)),
      ("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", False,
       (p, d)),
  ]
  for i in range(config.num_hidden_layers):
    t, f = f"encoder.layers.{i}.", f"encoder/layers_{i}/"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      rows.append((f"{t}self_attn.{proj}.weight", f"{f}self_attn/{proj}/kernel", True, (d, d)))
      rows.append((f"{t}self_attn.{proj}.bias", f"{f}self_attn/{proj}/bias", False, (d,)))
    rows += [
        (f"{t}mlp.fc1.weight", f"{f}mlp/fc1/kernel", True, (m, d)),
        (f"{t}mlp.fc1.bias", f"{f}mlp/fc1/bias", False, (m,)),
        (f"{t}mlp.fc2.weight", f"{f}mlp/fc2/kernel", True, (d, m)),
        (f"{t}mlp.fc2.bias", f"{f}mlp/fc2/bias", False, (d,)),
    ]
    for ln in ("layer_norm1", "layer_norm2"):
      rows.append((f"{t}{ln}.weight", f"{f}{ln}/scale", False, (d,)))
      rows.append((f"{t}{ln}.bias", f"{f}{ln}/bias", False, (d,)))
  rows.append(("final_layer_norm.weight", "final_layer_norm/scale", False, (d,)))
  rows.append(("final_layer_norm.bias", "final_layer_norm/bias", False, (d,)))
  return rows


def _strip_prefix(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, clashes = {}, []
  for name, value in sd.items():
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if short in out:
      clashes.append(short)
    out[short] = value
  if clashes:
    raise ConversionError("text_encoder checkpoint has keys both with and without the "
                          f"'{PREFIX}' prefix: " + ", ".join(sorted(clashes)))
  return out


def text_encoder_from_torch(sd: Mapping[str, np.ndarray], config: CLIPTextConfig) -> dict:
  """HF CLIPTextModel state dict (numpy arrays, either spelling) -> nested Flax params."""
  sd = _strip_prefix(sd)
  rows = _mapping(config)
  check_state_dict("text_encoder", sd, {t: shape for t, _, _, shape in rows}, ignore=_IGNORED)
  flat = {}
  for torch_name, flax_path, linear, _ in rows:
    value = np.asarray(sd[torch_name])
    flat[flax_path] = value.T if linear else value
  return unflatten(flat)


def text_encoder_to_torch(params: Mapping, config: CLIPTextConfig, *,
                          prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """Nested Flax params -> HF CLIPTextModel state dict (``text_model.`` prefix by default)."""
  # Params straight from model.init carry LogicallyPartitioned boxes; drop them.
  flat = {k: np.asarray(v) for k, v in flatten(nn.meta.unbox(params)).items()}
  rows = _mapping(config)
  expected = {f: (shape[::-1] if linear else shape) for _, f, linear, shape in rows}
  check_state_dict("text_encoder params", flat, expected)
  return {prefix + t: np.ascontiguousarray(flat[f].T if linear else flat[f])
          for t, f, linear, _ in rows}
