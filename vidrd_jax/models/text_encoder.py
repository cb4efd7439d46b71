"""The OpenCLIP ViT-H/14 text tower in transformers' ``CLIPTextModel`` layout.

SD2.1 conditions on the last hidden state (after ``final_layer_norm``) of a 23-layer text
transformer: OpenCLIP-H has 24 blocks, and SD2.1 takes the penultimate one, which HF
checkpoints store as a 23-layer model. Pre-norm blocks, causal self-attention, exact GELU.

Parameter names follow transformers (``embeddings/token_embedding``, ``encoder/layers_{i}/
self_attn/q_proj``, ...) so the converter is a rename plus transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidrd_jax.models import layers
from vidrd_jax.models.attention import dot_product_attention
from vidrd_jax.parallel import axes

_ACTIVATIONS = ("gelu", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of transformers' CLIPTextConfig that change the computation."""

  vocab_size: int = 49408
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 23
  num_attention_heads: int = 16
  max_position_embeddings: int = 77
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  # Compute dtype (parameters stay float32).
  dtype: Any = jnp.float32
  # dot_product_attention implementation: None (auto), "xla", "cudnn", "splash".
  attention_impl: Optional[str] = None
  # Rematerialise each encoder layer in the backward pass (training memory).
  remat: bool = False

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} not supported; use one of {_ACTIVATIONS}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")

  @classmethod
  def from_hf(cls, config_dict: dict, **overrides) -> "CLIPTextConfig":
    """From a transformers ``config.json`` (``text_config`` of a full CLIPConfig also accepted)."""
    if "text_config" in config_dict:
      config_dict = config_dict["text_config"]
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "attention_impl", "remat"}
    kwargs = {k: config_dict[k] for k in fields if k in config_dict}
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """A transformers ``CLIPTextConfig`` dict (loads with ``CLIPTextConfig.from_dict``)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": self.hidden_act,
        "layer_norm_eps": self.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "projection_dim": 512,
        # SD2.1's tokenizer: <|startoftext|>, <|endoftext|>, and "!" as padding.
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }

  @classmethod
  def openclip_h(cls, **overrides) -> "CLIPTextConfig":
    """SD2.1's text encoder (OpenCLIP ViT-H/14 minus its last block)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> "CLIPTextConfig":
    """A few-thousand-parameter stand-in for tests and the CPU demo."""
    kwargs = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77)
    kwargs.update(overrides)
    return cls(**kwargs)


def _dense(features: int, in_axis: Optional[str], out_axis: Optional[str], dtype, name: str):
  return nn.Dense(
      features,
      dtype=dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name)


def _layer_norm(eps: float, dtype, name: str):
  # Two-pass float32 variance, as torch computes it (flax's default fast variance is not).
  return layers.LayerNorm(epsilon=eps, dtype=dtype, name=name)


class CLIPAttention(nn.Module):
  """Multi-head causal self-attention with separate q/k/v projections (HF CLIPAttention)."""

  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    b, l, d = x.shape
    heads = cfg.num_attention_heads
    q, k, v = (
        _dense(d, axes.EMBED, axes.HEADS, cfg.dtype, name)(x).reshape(b, l, heads, d // heads)
        for name in ("q_proj", "k_proj", "v_proj"))
    out = dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
    return _dense(d, axes.HEADS, axes.EMBED, cfg.dtype, "out_proj")(out.reshape(b, l, d))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = _dense(cfg.intermediate_size, axes.EMBED, axes.MLP, cfg.dtype, "fc1")(x)
    if cfg.hidden_act == "gelu":
      # transformers' "gelu" is the exact erf form, not the tanh approximation.
      h = jax.nn.gelu(h, approximate=False)
    else:
      h = h * jax.nn.sigmoid(1.702 * h)
    return _dense(cfg.hidden_size, axes.MLP, axes.EMBED, cfg.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    x = x + CLIPAttention(cfg, name="self_attn")(
        _layer_norm(cfg.layer_norm_eps, cfg.dtype, "layer_norm1")(x), mask)
    x = x + CLIPMLP(cfg, name="mlp")(_layer_norm(cfg.layer_norm_eps, cfg.dtype, "layer_norm2")(x))
    return x


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    layer_cls = nn.remat(CLIPEncoderLayer) if cfg.remat else CLIPEncoderLayer
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, name=f"layers_{i}")(x, mask)
    return x


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    token = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
        name="token_embedding")
    position = nn.Embed(
        cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, axes.EMBED)),
        name="position_embedding")
    positions = jnp.arange(input_ids.shape[1])[None, :]
    return token(input_ids) + position(positions)


class CLIPTextModel(nn.Module):
  """SD2.1's text encoder: token ids -> last hidden state (after final_layer_norm)."""

  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: int [B, L], L <= max_position_embeddings (77 for SD2.1).

    Returns:
      [B, L, hidden_size] in config.dtype.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the "
                       f"{cfg.max_position_embeddings} position embeddings")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
    length = input_ids.shape[1]
    # CLIP's text tower is causal: token i sees tokens 0..i. [1, 1, L, L], True = attend.
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    x = CLIPEncoder(cfg, name="encoder")(x, mask)
    return _layer_norm(cfg.layer_norm_eps, cfg.dtype, "final_layer_norm")(x)
