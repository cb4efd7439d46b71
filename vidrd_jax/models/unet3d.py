"""VidRD's 3D UNet: Stable Diffusion 2.1's UNet2DConditionModel with temporal layers, in Flax.

The network is diffusers' ``UNet2DConditionModel`` (SD2.1 configs: linear projections,
optional upcast attention, heads from the legacy ``attention_head_dim``) run on video
latents ``[B, F, h, w, 4]``, plus VidRD's temporal layers where the reference
(``model/modules/{unet,unet_blocks,attention,resnet}.py``) puts them:

* a :class:`~vidrd_jax.models.layers.TemporalConvLayer` after every resnet of every down,
  mid and up block (``add_temp_conv``; in the mid block also right after its first resnet);
* temporal self-attention over frames inside every transformer block, after
  cross-attention and before the feed-forward (``temp_norm`` + ``temp_attn``, ``to_out``
  zero-initialised), with the sinusoidal frame embedding added to the residual stream
  first (``add_temp_embed``);
* optionally sparse-causal first-frame self-attention (``prepend_first_frame``) and a
  temporal transformer after ``conv_in`` (``add_temp_transformer``), both off in the release.

Spatial layers act per frame, with one exception inherited from the reference (whose
``ResnetBlock3D`` applies ``torch.nn.GroupNorm`` to 5D tensors): the GroupNorms of the
resnets and of ``conv_norm_out`` pool their statistics over all frames of a video. Hence a
freshly inflated UNet3D equals SD2.1 exactly for one frame; for several frames it equals
SD2.1 up to those frame-pooled statistics (and the frame embedding, if enabled). With one
frame every temporal layer is bypassed, so images go through plain SD2.1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidrd_jax.models import layers
from vidrd_jax.parallel import axes

Dtype = Any
_log = logging.getLogger(__name__)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"
# The reference's 3D block names, accepted as aliases of diffusers' 2D ones.
_BLOCK_ALIASES = {
    "CrossAttnDownBlock3D": "CrossAttnDownBlock2D",
    "DownBlock3D": "DownBlock2D",
    "CrossAttnUpBlock3D": "CrossAttnUpBlock2D",
    "UpBlock3D": "UpBlock2D",
    "UNetMidBlock3DCrossAttn": "UNetMidBlock2DCrossAttn",
}

# diffusers UNet2DConditionModel arguments this port does not implement, with the only value
# accepted for each (their diffusers defaults, which SD2.1 uses).
_UNSUPPORTED_DIFFUSERS_KEYS = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "attention_mask": None,
}
# The reference's own UNet3D config keys (VidRD), read by from_diffusers when present.
_VIDRD_KEYS = (
    "add_temp_conv", "add_temp_embed", "add_temp_attn", "add_temp_attn_only_on_upblocks",
    "add_temp_transformer", "prepend_first_frame", "frame_pooled_norm",
)
_RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat", "dropout", "temp_conv_dropout",
                   "temporal_init_scale")


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
  """diffusers UNet2DConditionModel config (the subset SD2.1 uses) + VidRD switches + runtime.

  Defaults are Stable Diffusion 2.1-base with the released VidRD temporal layers.

  Attributes:
    sample_size: nominal latent size (informational; any multiple of 2**(levels-1) works).
    in_channels, out_channels: latent channels.
    center_input_sample: map the input x to 2x - 1 first (diffusers option).
    flip_sin_to_cos, freq_shift: timestep embedding layout (diffusers ``Timesteps``).
    down_block_types, up_block_types: diffusers block names (the reference's 3D names are
      accepted and normalised to 2D).
    mid_block_type: only ``UNetMidBlock2DCrossAttn``.
    only_cross_attention: per down block (or one bool): attn1 attends to the text too.
    block_out_channels: channels per resolution level.
    layers_per_block: resnets per down block (up blocks have one more).
    downsample_padding: padding of the stride-2 convs.
    mid_block_scale_factor: output_scale_factor of the mid block's resnets.
    act_fn: only "silu" (SD2.1's).
    norm_num_groups, norm_eps: GroupNorm groups and the resnets' / conv_norm_out's epsilon
      (the transformers' GroupNorm always uses 1e-6, their LayerNorms 1e-5).
    cross_attention_dim: text context width.
    attention_head_dim: SD2.1's legacy meaning: the NUMBER of heads per level; each head has
      channels // heads channels.
    use_linear_projection: proj_in/proj_out are Linear (SD2.x) rather than 1x1 convs.
    upcast_attention: attention scores in float32 (SD2.1 768-v).
    dual_cross_attention: only False (SD2.1's).
    add_temp_conv: TemporalConvLayer after each resnet (reference switch).
    add_temp_embed: sinusoidal frame embedding before temporal attention (reference switch).
    add_temp_attn: temporal attention in the transformer blocks. The reference always has
      it (this switch exists here to build a purely spatial UNet).
    add_temp_attn_only_on_upblocks: the reference's switch: no temporal attention in the
      down and mid blocks.
    add_temp_transformer: the reference's TransformerTemporalModel after conv_in.
    prepend_first_frame: sparse-causal self-attention (keys/values of frame 0 and of the
      previous frame), the reference's ``prepend_first_frame``.
    frame_pooled_norm: the resnets' and ``conv_norm_out``'s GroupNorm statistics pool over
      all frames of a video, as the reference's 5D ``torch.nn.GroupNorm`` does (what the
      released weights were trained with). False normalises every frame alone, so that a
      freshly inflated UNet3D (with ``add_temp_embed`` off) is SD2.1 frame by frame for any F.
    dtype: compute dtype. param_dtype: parameter dtype.
    attention_impl: None (auto), "xla", "cudnn" or "splash".
    remat: rematerialise each down/mid/up block in the backward pass.
    dropout: dropout of resnets, attention outputs and feed-forwards (diffusers ``dropout``).
    temp_conv_dropout: dropout inside TemporalConvLayer (the reference hard-codes 0.1).
    temporal_init_scale: initialisation only. 0 (the paper's, default): the output projections
      of the temporal layers (TemporalConvLayer's last conv, temporal attention's ``to_out_0``,
      the temporal transformer's ``proj_out``) start at zero, so a UNet3D inflated from a
      pretrained SD starts as SD frame by frame. > 0: they start as LeCun normal x this factor,
      for a model trained from scratch (the CPU demo), where a zero output projection leaves the
      temporal layers' other weights without gradient until it has grown. Not saved with the
      weights (it does not change the architecture).
  """
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str = MID_BLOCK_TYPE
  up_block_types: Tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  only_cross_attention: Union[bool, Tuple[bool, ...]] = False
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1024
  attention_head_dim: Union[int, Tuple[int, ...]] = (5, 10, 20, 20)
  use_linear_projection: bool = True
  upcast_attention: bool = False
  dual_cross_attention: bool = False
  # VidRD temporal layers, named as the reference names them.
  add_temp_conv: bool = True
  add_temp_embed: bool = True
  add_temp_attn: bool = True
  add_temp_attn_only_on_upblocks: bool = False
  add_temp_transformer: bool = False
  prepend_first_frame: bool = False
  frame_pooled_norm: bool = True
  # Runtime.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  dropout: float = 0.0
  temp_conv_dropout: float = 0.1
  temporal_init_scale: float = 0.0

  def __post_init__(self):
    # Lists (from JSON) -> tuples, so the config stays hashable; 3D names -> 2D names.
    norm = lambda names: tuple(_BLOCK_ALIASES.get(n, n) for n in names)
    object.__setattr__(self, "down_block_types", norm(self.down_block_types))
    object.__setattr__(self, "up_block_types", norm(self.up_block_types))
    object.__setattr__(self, "mid_block_type", _BLOCK_ALIASES.get(self.mid_block_type, self.mid_block_type))
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    for name in ("attention_head_dim", "only_cross_attention"):
      value = getattr(self, name)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, name, tuple(value))
    self._validate()

  def _validate(self):
    n = len(self.block_out_channels)
    problems = []
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      problems.append(
          f"{len(self.down_block_types)} down and {len(self.up_block_types)} up block types for "
          f"{n} block_out_channels")
    bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
    bad += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
    if self.mid_block_type != MID_BLOCK_TYPE:
      bad.append(self.mid_block_type)
    if bad:
      problems.append(f"unsupported block types {bad}")
    for name in ("attention_head_dim", "only_cross_attention"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != n:
        problems.append(f"{name} has {len(value)} entries for {n} levels")
    if not problems:
      for i, c in enumerate(self.block_out_channels):
        if c % self.norm_num_groups:
          problems.append(f"block_out_channels[{i}]={c} not divisible by norm_num_groups")
        if self.add_temp_conv and c % 32:
          problems.append(
              f"block_out_channels[{i}]={c} not divisible by 32 (TemporalConvLayer's groups)")
        if self.heads(i) < 1:
          problems.append(f"attention_head_dim at level {i} is {self.heads(i)} (need >= 1 head)")
        elif c % self.heads(i):
          problems.append(f"block_out_channels[{i}]={c} not divisible by {self.heads(i)} heads")
    if self.add_temp_transformer and self.block_out_channels[0] % 32:
      problems.append("add_temp_transformer needs block_out_channels[0] divisible by 32")
    if self.act_fn not in ("silu", "swish"):
      problems.append(f"act_fn={self.act_fn!r} (only silu)")
    if self.dual_cross_attention:
      problems.append("dual_cross_attention=True is not supported")
    if self.temporal_init_scale < 0:
      problems.append(f"temporal_init_scale={self.temporal_init_scale} (must be >= 0)")
    if problems:
      raise ValueError("invalid UNet3DConfig: " + "; ".join(problems))

  # Derived quantities.
  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  def heads(self, level: int) -> int:
    """Attention heads at a down level (SD2.1's legacy ``attention_head_dim``)."""
    h = self.attention_head_dim
    return int(h[level] if isinstance(h, tuple) else h)

  def only_cross(self, level: int) -> bool:
    o = self.only_cross_attention
    return bool(o[level] if isinstance(o, tuple) else o)

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  # Conversions.
  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "UNet3DConfig":
    """From a diffusers ``unet/config.json`` dict (or the reference's UNet3D config).

    Keys starting with "_" and keys unknown to this port are ignored (with a log line);
    a diffusers feature SD2.1 does not use, set to anything but its default, raises.
    ``overrides`` replace fields afterwards (e.g. ``dtype=jnp.bfloat16``, ``add_temp_conv=False``).
    """
    config = dict(config)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    unsupported = []
    for key, value in config.items():
      if key.startswith("_"):
        continue
      if key in _UNSUPPORTED_DIFFUSERS_KEYS:
        if _normalise(value) != _normalise(_UNSUPPORTED_DIFFUSERS_KEYS[key]):
          unsupported.append(f"{key}={value!r}")
      elif key == "num_attention_heads":
        # Newer configs may give the head count here; then attention_head_dim is the real
        # per-head width, which SD2.1-style blocks derive from channels anyway.
        if value is not None:
          kwargs["attention_head_dim"] = value
      elif key == "dropout":
        kwargs["dropout"] = float(value)
      elif key == "norm_num_groups" and value is None:
        unsupported.append("norm_num_groups=None")
      elif key in fields and key not in _RUNTIME_FIELDS:
        if key == "attention_head_dim" and config.get("num_attention_heads") is not None:
          continue
        kwargs[key] = value
      else:
        _log.info("UNet3DConfig.from_diffusers: ignoring key %r", key)
    for key in ("layers_per_block", "cross_attention_dim"):
      if isinstance(kwargs.get(key), (list, tuple)):
        unsupported.append(f"{key}={kwargs[key]!r} (per-block values)")
    if unsupported:
      raise ValueError("UNet config uses features this port does not implement: "
                       + ", ".join(unsupported))
    if isinstance(kwargs.get("sample_size"), (list, tuple)):
      kwargs["sample_size"] = int(kwargs["sample_size"][0])
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers(self, include_temporal: bool = True) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config dict (JSON-serialisable).

    With ``include_temporal`` the VidRD switches are added under the reference's names
    (diffusers ignores them; :meth:`from_diffusers` reads them back).
    """
    out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
    for f in dataclasses.fields(self):
      if f.name in _RUNTIME_FIELDS:
        continue
      if f.name in _VIDRD_KEYS and not include_temporal:
        continue
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    out.update(resnet_time_scale_shift="default", class_embed_type=None, num_class_embeds=None)
    return out

  # Presets.
  @classmethod
  def sd21_base(cls, **overrides: Any) -> "UNet3DConfig":
    """stabilityai/stable-diffusion-2-1-base (512 px, epsilon) + VidRD's released layers."""
    return cls(**overrides)

  @classmethod
  def sd21_768(cls, **overrides: Any) -> "UNet3DConfig":
    """stabilityai/stable-diffusion-2-1 (768 px, v-prediction): upcast attention."""
    return cls(**{"sample_size": 96, "upcast_attention": True, **overrides})

  @classmethod
  def tiny(cls, **overrides: Any) -> "UNet3DConfig":
    """A small config with every block kind, for tests (channels multiples of 32)."""
    kwargs = dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def _normalise(value):
  return list(value) if isinstance(value, tuple) else value


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
  """diffusers ``get_timestep_embedding``: [B] -> [B, dim] float32.

  The frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)) are a trace-time table
  built in the same float32 operation order as diffusers, with a correctly rounded exp.
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = (exponent / np.float32(half - freq_shift)).astype(np.float32)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(self.dim, axes.EMBED, axes.MLP, name="linear_1", **kw)(x)
    x = nn.silu(x)
    return layers.dense(self.dim, axes.MLP, axes.EMBED, name="linear_2", **kw)(x)


class GEGLU(nn.Module):
  """diffusers ``GEGLU``: one projection to 2 x inner; value * gelu(gate) (exact, erf GELU)."""
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(2 * self.inner, axes.EMBED, axes.MLP, name="proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers ``FeedForward`` with GEGLU: net.0.proj -> x * gelu(gate) -> dropout -> net.2."""
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    inner = dim * self.mult
    h = GEGLU(inner, name="net_0", **kw)(x)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return layers.dense(dim, axes.MLP, axes.EMBED, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """The reference's BasicTransformerBlock: self-attn, cross-attn, temporal attn, GEGLU FF.

  Attributes:
    heads, head_dim: attention heads and their width (dim = heads * head_dim).
    cross_attention: has attn2 (text cross-attention); False in the temporal transformer.
    only_cross_attention: attn1 attends to the text as well.
    upcast: diffusers ``upcast_attention``.
    add_temp_attn: temporal attention over frames after attn2 (``temp_norm``, ``temp_attn``).
    add_temp_embed: add the sinusoidal frame embedding to the residual stream first.
    sparse_causal: attn1 is sparse-causal over frames (``prepend_first_frame``).
  """
  heads: int
  head_dim: int
  cross_attention: bool = True
  only_cross_attention: bool = False
  upcast: bool = False
  add_temp_attn: bool = False
  add_temp_embed: bool = False
  sparse_causal: bool = False
  dropout: float = 0.0
  temporal_init_scale: float = 0.0
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, context: Optional[jax.Array], *, num_frames: int, train: bool = False
  ) -> jax.Array:
    """x: [B*F, L, C] (frames folded into the batch); context: [B, T, D] -> [B*F, L, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast,
                   implementation=self.attention_impl, **kw)
    drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)

    h = layers.LayerNorm(name="norm1", **kw)(x)
    h = layers.Attention(**attn_kw, name="attn1")(
        h, jnp.repeat(context, num_frames, axis=0) if self.only_cross_attention else None,
        sparse_causal_frames=num_frames if self.sparse_causal else None)
    x = drop(h) + x

    if self.cross_attention:
      # Every frame sees its video's text: keys and values are projected once per video.
      h = layers.LayerNorm(name="norm2", **kw)(x)
      x = drop(layers.Attention(**attn_kw, name="attn2")(h, context, context_frames=num_frames)) + x

    # Temporal attention: every spatial position attends over the F frames of its video.
    # With one frame it is skipped (parameters are still created at init).
    if self.add_temp_attn and (num_frames > 1 or self.is_initializing()):
      bf, length, c = x.shape
      t = x.reshape(bf // num_frames, num_frames, length, c)
      if self.add_temp_embed:
        # The frame embedding enters the residual stream itself, not only temp_attn's input.
        pe = layers.sinusoidal_frame_embedding(num_frames, c)
        t = t + jnp.asarray(pe, t.dtype)[None, :, None, :]
      t = jnp.swapaxes(t, 1, 2).reshape(-1, num_frames, c)  # [(B L), F, C]
      h = layers.LayerNorm(name="temp_norm", **kw)(t)
      h = layers.Attention(**attn_kw, zero_init_out=True, out_init_scale=self.temporal_init_scale,
                           name="temp_attn")(h)
      t = drop(h) + t
      t = jnp.swapaxes(t.reshape(bf // num_frames, length, num_frames, c), 1, 2)
      if num_frames > 1:
        x = t.reshape(bf, length, c)

    h = layers.LayerNorm(name="norm3", **kw)(x)
    h = FeedForward(dropout=self.dropout, name="ff", **kw)(h, train=train)
    return h + x


class Transformer3D(nn.Module):
  """diffusers ``Transformer2DModel`` (one block) applied per frame: the reference's
  ``Transformer3DModel``. GroupNorm (eps 1e-6, per frame) -> proj_in -> block -> proj_out,
  residual."""
  heads: int
  config: UNet3DConfig
  only_cross_attention: bool = False
  add_temp_attn: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, *, train: bool = False) -> jax.Array:
    """x: [B, F, H, W, C]; context: [B, T, D] -> [B, F, H, W, C]."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    b, f, hh, ww, c = x.shape
    inner = c  # heads * (c // heads)
    residual = x
    h = x.reshape(b * f, hh, ww, c)
    h = layers.GroupNorm(cfg.norm_num_groups, 1e-6, name="norm", **kw)(h)
    if cfg.use_linear_projection:
      h = layers.dense(inner, axes.CONV_IN, axes.EMBED, name="proj_in", **kw)(
          h.reshape(b * f, hh * ww, c))
    else:
      h = layers.conv(inner, (1, 1), padding="VALID", name="proj_in", **kw)(h)
      h = h.reshape(b * f, hh * ww, inner)
    h = BasicTransformerBlock(
        heads=self.heads,
        head_dim=inner // self.heads,
        only_cross_attention=self.only_cross_attention,
        upcast=cfg.upcast_attention,
        add_temp_attn=self.add_temp_attn,
        add_temp_embed=cfg.add_temp_embed,
        sparse_causal=cfg.prepend_first_frame,
        dropout=cfg.dropout,
        temporal_init_scale=cfg.temporal_init_scale,
        attention_impl=cfg.attention_impl,
        name="transformer_blocks_0",
        **kw,
    )(h, context, num_frames=f, train=train)
    if cfg.use_linear_projection:
      h = layers.dense(c, axes.EMBED, axes.CONV_OUT, name="proj_out", **kw)(h)
      h = h.reshape(b, f, hh, ww, c)
    else:
      h = layers.conv(c, (1, 1), padding="VALID", name="proj_out", **kw)(
          h.reshape(b * f, hh, ww, inner))
      h = h.reshape(b, f, hh, ww, c)
    return h + residual


class TransformerTemporal(nn.Module):
  """The reference's ``TransformerTemporalModel`` after conv_in (``add_temp_transformer``).

  GroupNorm over frames and space -> per-position sequences over frames -> proj_in (to 8 x 64)
  -> self-attention block (no text) -> proj_out (zero-initialised) -> residual.
  """
  config: UNet3DConfig
  heads: int = 8
  head_dim: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: [B, F, H, W, C] -> same."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    b, f, hh, ww, c = x.shape
    h = layers.GroupNorm(32, 1e-6, name="norm", **kw)(x)
    h = jnp.transpose(h, (0, 2, 3, 1, 4)).reshape(b * hh * ww, f, c)
    h = layers.dense(self.heads * self.head_dim, axes.CONV_IN, axes.EMBED, name="proj_in", **kw)(h)
    h = BasicTransformerBlock(
        heads=self.heads, head_dim=self.head_dim, cross_attention=False, dropout=cfg.dropout,
        attention_impl=cfg.attention_impl, name="transformer_blocks_0", **kw,
    )(h, None, num_frames=f, train=train)
    h = layers.dense(c, axes.EMBED, axes.CONV_OUT, zero_init=True,
                     zero_init_scale=cfg.temporal_init_scale, name="proj_out", **kw)(h)
    # The reference reads its [(B H W), F, C] result back as [B, H, W, C, F] (a reshape, not
    # a transpose); the released weights never used this layer, but keep its exact semantics.
    h = jnp.transpose(h.reshape(b, hh, ww, c, f), (0, 4, 1, 2, 3))
    return x + h if f > 1 else x


def _resnet(cfg: UNet3DConfig, out_channels: int, name: str, scale: float = 1.0):
  return layers.ResnetBlock2D(
      out_channels=out_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
      dropout=cfg.dropout, output_scale_factor=scale, per_frame_norm=not cfg.frame_pooled_norm,
      dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _temp_conv(cfg: UNet3DConfig, name: str):
  return layers.TemporalConvLayer(
      dropout=cfg.temp_conv_dropout, last_init_scale=cfg.temporal_init_scale, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, name=name)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D / DownBlock2D with temporal convs (the reference's *3D blocks)."""
  config: UNet3DConfig
  level: int
  train: bool = False

  @nn.compact
  def __call__(self, x, temb, context):
    """x: [B, F, H, W, C_in] -> (x [B, F, H', W', C], skip outputs tuple)."""
    cfg, i = self.config, self.level
    out_channels = cfg.block_out_channels[i]
    cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    outputs = ()
    for j in range(cfg.layers_per_block):
      x = _resnet(cfg, out_channels, f"resnets_{j}")(x, temb, train=self.train)
      if cfg.add_temp_conv:
        x = _temp_conv(cfg, f"temp_convs_{j}")(x, train=self.train)
      if cross:
        x = Transformer3D(
            heads=cfg.heads(i), config=cfg, only_cross_attention=cfg.only_cross(i),
            add_temp_attn=cfg.add_temp_attn and not cfg.add_temp_attn_only_on_upblocks,
            name=f"attentions_{j}")(x, context, train=self.train)
      outputs += (x,)
    if i < cfg.num_levels - 1:
      x = layers.Downsample2D(
          padding=cfg.downsample_padding, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          name="downsamplers_0")(x)
      outputs += (x,)
    return x, outputs


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn with temporal convs after both resnets (the reference's)."""
  config: UNet3DConfig
  train: bool = False

  @nn.compact
  def __call__(self, x, temb, context):
    cfg = self.config
    c = cfg.block_out_channels[-1]
    scale = cfg.mid_block_scale_factor
    x = _resnet(cfg, c, "resnets_0", scale)(x, temb, train=self.train)
    # The reference's mid block has a temporal conv right after its first resnet, too.
    if cfg.add_temp_conv:
      x = _temp_conv(cfg, "temp_convs_0")(x, train=self.train)
    x = Transformer3D(
        heads=cfg.heads(cfg.num_levels - 1), config=cfg,
        add_temp_attn=cfg.add_temp_attn and not cfg.add_temp_attn_only_on_upblocks,
        name="attentions_0")(x, context, train=self.train)
    x = _resnet(cfg, c, "resnets_1", scale)(x, temb, train=self.train)
    if cfg.add_temp_conv:
      x = _temp_conv(cfg, "temp_convs_1")(x, train=self.train)
    return x


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D / UpBlock2D with temporal convs (the reference's *3D blocks)."""
  config: UNet3DConfig
  level: int  # index into up_block_types
  train: bool = False

  @nn.compact
  def __call__(self, x, skips, temb, context):
    """x: [B, F, H, W, C]; skips: the down path's outputs for this block, oldest first."""
    cfg, i = self.config, self.level
    n = cfg.num_levels
    out_channels = cfg.block_out_channels[n - 1 - i]
    cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    down_level = n - 1 - i
    skips = list(skips)
    for j in range(cfg.layers_per_block + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _resnet(cfg, out_channels, f"resnets_{j}")(x, temb, train=self.train)
      if cfg.add_temp_conv:
        x = _temp_conv(cfg, f"temp_convs_{j}")(x, train=self.train)
      if cross:
        x = Transformer3D(
            heads=cfg.heads(down_level), config=cfg, only_cross_attention=cfg.only_cross(down_level),
            add_temp_attn=cfg.add_temp_attn, name=f"attentions_{j}")(x, context, train=self.train)
    if i < n - 1:
      x = layers.Upsample2D(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="upsamplers_0")(x)
    return x


class UNet3DConditionModel(nn.Module):
  """VidRD's 3D UNet (SD2.1 UNet2DConditionModel + temporal layers), channels-last.

  ``apply({"params": p}, sample, timesteps, encoder_hidden_states)``: sample [B, F, h, w, C_in],
  timesteps [B] or scalar, encoder_hidden_states [B, T, cross_attention_dim] ->
  [B, F, h, w, C_out] in the sample's dtype. ``train=True`` enables dropout (rng "dropout").
  """
  config: UNet3DConfig

  @nn.compact
  def __call__(
      self,
      sample: jax.Array,
      timesteps: Union[jax.Array, int, float],
      encoder_hidden_states: jax.Array,
      *,
      train: bool = False,
  ) -> jax.Array:
    cfg = self.config
    self._check_inputs(sample, encoder_hidden_states)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    b = sample.shape[0]
    out_dtype = sample.dtype

    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, b)):
      raise ValueError(f"timesteps must be a scalar or [B={b}], got shape {timesteps.shape}")
    timesteps = jnp.broadcast_to(timesteps.reshape(-1), (b,))
    t_emb = timestep_embedding(
        timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb.astype(cfg.dtype))

    x = sample.astype(cfg.dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    context = encoder_hidden_states.astype(cfg.dtype)
    if context.shape[0] == 1 and b > 1:
      context = jnp.broadcast_to(context, (b,) + context.shape[1:])

    x = layers.conv(cfg.block_out_channels[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in",
                    **kw)(x)
    if cfg.add_temp_transformer:
      x = TransformerTemporal(cfg, name="temp_transformer")(x, train=train)

    down_cls, mid_cls, up_cls = DownBlock, MidBlock, UpBlock
    if cfg.remat:
      down_cls, mid_cls, up_cls = nn.remat(DownBlock), nn.remat(MidBlock), nn.remat(UpBlock)

    skips = (x,)
    for i in range(cfg.num_levels):
      x, outs = down_cls(cfg, i, train=train, name=f"down_blocks_{i}")(x, temb, context)
      skips += outs
    x = mid_cls(cfg, train=train, name="mid_block")(x, temb, context)
    per_block = cfg.layers_per_block + 1
    for i in range(cfg.num_levels):
      block_skips, skips = skips[-per_block:], skips[:-per_block]
      x = up_cls(cfg, i, train=train, name=f"up_blocks_{i}")(x, block_skips, temb, context)

    # Like the reference's 5D GroupNorm: statistics pooled over the frames of each video
    # (unless frame_pooled_norm is off: then [B*F, h, w, C], one frame per sample).
    norm_out = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)
    x = norm_out(x) if cfg.frame_pooled_norm else norm_out(
        x.reshape((-1,) + x.shape[2:])).reshape(x.shape)
    x = nn.silu(x)
    x = layers.conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(x)
    return x.astype(out_dtype)

  def _check_inputs(self, sample, context):
    cfg = self.config
    if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(
          f"sample must be [B, F, h, w, {cfg.in_channels}], got shape {tuple(sample.shape)}")
    factor = 2 ** (cfg.num_levels - 1)
    if sample.shape[2] % factor or sample.shape[3] % factor:
      raise ValueError(
          f"latent height and width must be multiples of {factor}, got {sample.shape[2:4]}")
    if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
      raise ValueError(
          f"encoder_hidden_states must be [B, T, {cfg.cross_attention_dim}], got shape "
          f"{tuple(context.shape)}")
    if context.shape[0] not in (1, sample.shape[0]):
      raise ValueError(
          f"encoder_hidden_states batch {context.shape[0]} does not match sample batch "
          f"{sample.shape[0]}")


def init_params(config: UNet3DConfig, rng: jax.Array, num_frames: int = 2) -> Any:
  """Initialises (boxed, logically partitioned) parameters with a minimal input.

  Returns the ``params`` collection; use ``nn.unbox`` for plain arrays.
  """
  factor = 2 ** (config.num_levels - 1)
  sample = jnp.zeros((1, num_frames, factor, factor, config.in_channels), jnp.float32)
  context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
  return UNet3DConditionModel(config).init(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]
