"""SD2.1's AutoencoderKL, with VidRD's temporal-aware decoder, channels-last.

Encoder and decoder are diffusers' ``AutoencoderKL`` (``Encoder`` / ``Decoder`` with
``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` and a ``UNetMidBlock2D`` holding one single-head
spatial self-attention). Everything spatial acts on each frame alone.

VidRD's temporal decoder (``vae/vae.py``, ``vae/modules.py`` of the reference) adds one
``TemporalConvLayer`` after every resnet of every decoder up block (not in the mid block, not
in the encoder): 3 x [GroupNorm(32), SiLU, Dropout(0.1), Conv3d (3, 1, 1)], the last conv
zero-initialised, added residually, and skipped for a single frame. So a freshly inflated
temporal VAE decodes exactly like the image VAE, frame by frame.

The reference pipeline decodes with ``num_frames=1`` (the temporal convs never act in the
released inference code); ``decode(..., temporal=False)`` reproduces that, while
``temporal=True`` (default) runs the convs over the frames of each clip as trained.

Parameter names mirror diffusers' modules (``decoder/up_blocks_0/resnets_1/conv1``,
``decoder/up_blocks_0/temp_convs_1/convs_3``, ...) so conversion is a rename plus transposes.
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

Dtype = Any

# diffusers hard-codes these for the VAE.
_RESNET_EPS = 1e-6
# DiagonalGaussianDistribution clamps log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)
# VidRD's VAE TemporalConvLayer: 3 norm/act/dropout/conv groups (the UNet's has 4).
_TEMP_CONV_LAYERS = 3


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """diffusers ``AutoencoderKL`` config fields that change the computation, plus VidRD's switch."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  sample_size: int = 512
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # VidRD: TemporalConvLayers after each decoder resnet (the reference's ``add_temp_conv``).
  temporal_decoder: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups "
                       f"{self.norm_num_groups}")
    if self.temporal_decoder and any(c % 32 for c in self.block_out_channels):
      raise ValueError("the temporal decoder's GroupNorms always use 32 groups; "
                       f"block_out_channels {self.block_out_channels} are not all multiples of 32")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict, **overrides) -> "AutoencoderKLConfig":
    """From a diffusers ``vae/config.json`` (AutoencoderKL or VidRD's TemporalAutoencoderKL)."""
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
      types = config.get(key, [allowed])
      if any(t != allowed for t in types):
        raise ValueError(f"unsupported VAE {key} {types}: only {allowed} is implemented")
    if config.get("act_fn", "silu") not in ("silu", "swish"):
      raise ValueError(f"unsupported VAE act_fn {config['act_fn']!r}: only silu")
    for key in ("shift_factor", "latents_mean", "latents_std"):
      if config.get(key) is not None:
        raise ValueError(f"VAE config sets {key}={config[key]!r}, which SD2.1's VAE does not "
                         "use and this port does not implement")
    names = {f.name for f in dataclasses.fields(cls)} - {"temporal_decoder", "dtype",
                                                         "attention_impl"}
    kwargs = {k: config[k] for k in names if k in config}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    kwargs["temporal_decoder"] = bool(config.get("add_temp_conv", False))
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers(self) -> dict:
    """A diffusers config dict; VidRD's class name and ``add_temp_conv`` when temporal."""
    n = len(self.block_out_channels)
    out = {
        "_class_name": "TemporalAutoencoderKL" if self.temporal_decoder else "AutoencoderKL",
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(self.block_out_channels),
        "layers_per_block": self.layers_per_block,
        "act_fn": "silu",
        "latent_channels": self.latent_channels,
        "norm_num_groups": self.norm_num_groups,
        "sample_size": self.sample_size,
        "scaling_factor": self.scaling_factor,
        "use_quant_conv": self.use_quant_conv,
        "use_post_quant_conv": self.use_post_quant_conv,
        "mid_block_add_attention": self.mid_block_add_attention,
    }
    if self.temporal_decoder:
      out["add_temp_conv"] = True
    return out

  @classmethod
  def sd21(cls, temporal: bool = False, **overrides) -> "AutoencoderKLConfig":
    """SD2.1's VAE (VidRD's ``vae_finetuned`` when temporal)."""
    return cls(temporal_decoder=temporal, **overrides)

  @classmethod
  def tiny(cls, temporal: bool = False, **overrides) -> "AutoencoderKLConfig":
    kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                  temporal_decoder=temporal)
    kwargs.update(overrides)
    return cls(**kwargs)


class SpatialAttention(nn.Module):
  """The VAE mid block's attention: GroupNorm, one head over the H*W positions, residual."""

  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    cfg = self.config
    n, h, w, c = x.shape
    y = layers.GroupNorm(cfg.norm_num_groups, _RESNET_EPS, dtype=cfg.dtype, name="group_norm")(x)
    y = y.reshape(n, h * w, c)
    proj = lambda name, in_axis, out_axis: layers.dense(c, in_axis, out_axis, dtype=cfg.dtype,
                                                        name=name)
    # diffusers: heads = C // attention_head_dim with attention_head_dim = C, i.e. one head of
    # width C over all positions; scores and softmax in float32 (upcast_softmax).
    q, k, v = (proj(name, axes.EMBED, axes.HEADS)(y)[:, :, None, :]
               for name in ("to_q", "to_k", "to_v"))
    y = dot_product_attention(q, k, v, scale=c ** -0.5, upcast=True,
                              implementation=cfg.attention_impl)
    y = proj("to_out_0", axes.HEADS, axes.EMBED)(y.reshape(n, h * w, c))
    return x + y.reshape(n, h, w, c)


class MidBlock(nn.Module):
  """diffusers ``UNetMidBlock2D`` without time embedding: resnet, attention, resnet."""

  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(groups=cfg.norm_num_groups, eps=_RESNET_EPS, dtype=cfg.dtype)
    x = layers.ResnetBlock2D(name="resnets_0", **kw)(x)
    if cfg.mid_block_add_attention:
      x = SpatialAttention(cfg, name="attentions_0")(x)
    return layers.ResnetBlock2D(name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
  """``layers_per_block`` resnets, then a stride-2 conv unless it is the last block."""

  config: AutoencoderKLConfig
  out_channels: int
  add_downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    for j in range(cfg.layers_per_block):
      x = layers.ResnetBlock2D(self.out_channels, groups=cfg.norm_num_groups, eps=_RESNET_EPS,
                               dtype=cfg.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      # Asymmetric padding: torch pads only bottom/right before a padding-0 stride-2 conv.
      x = layers.Downsample2D(self.out_channels, padding=((0, 1), (0, 1)), dtype=cfg.dtype,
                              name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """``layers_per_block + 1`` resnets (each followed by a TemporalConvLayer in VidRD's
  temporal decoder), then a x2 upsampler unless it is the last block."""

  config: AutoencoderKLConfig
  out_channels: int
  add_upsample: bool

  @nn.compact
  def __call__(self, x: jax.Array, num_frames: int, train: bool = False) -> jax.Array:
    """x: [B * num_frames, h, w, C], frames of a clip consecutive (batch-major)."""
    cfg = self.config
    for j in range(cfg.layers_per_block + 1):
      x = layers.ResnetBlock2D(self.out_channels, groups=cfg.norm_num_groups, eps=_RESNET_EPS,
                               dtype=cfg.dtype, name=f"resnets_{j}")(x)
      if cfg.temporal_decoder:
        # Unfold the frames for the conv over time ([B, F, h, w, C]); with one frame the
        # layer is the identity, as in the reference.
        x5 = x.reshape((-1, num_frames) + x.shape[1:])
        x5 = layers.TemporalConvLayer(num_layers=_TEMP_CONV_LAYERS, dropout=0.1,
                                      dtype=cfg.dtype, name=f"temp_convs_{j}")(x5, train=train)
        x = x5.reshape(x.shape)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, dtype=cfg.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """diffusers ``Encoder`` (double_z): [N, H, W, 3] -> [N, H/f, W/f, 2 * latent_channels]."""

  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=cfg.dtype)
    x = layers.conv(cfg.block_out_channels[0], (3, 3), padding=((1, 1), (1, 1)),
                    name="conv_in", **kw)(x)
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock2D(cfg, channels, i < last, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = layers.GroupNorm(cfg.norm_num_groups, _RESNET_EPS, name="conv_norm_out", **kw)(x)
    x = nn.silu(x)
    return layers.conv(2 * cfg.latent_channels, (3, 3), padding=((1, 1), (1, 1)),
                       name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """diffusers ``Decoder``, or VidRD's ``TemporalDecoder`` when ``config.temporal_decoder``.

  Works on [B, F, h, w, C] latents; every spatial op folds frames into the batch.
  """

  config: AutoencoderKLConfig

  @nn.compact
  def __call__(self, z: jax.Array, *, temporal: bool = True, train: bool = False) -> jax.Array:
    """z: [B, F, h, w, latent] (after post_quant_conv) -> [B, F, H, W, out_channels]."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype)
    # temporal=False is the reference's num_frames=1: every frame is its own one-frame clip,
    # so the temporal convs are bypassed.
    num_frames = z.shape[1] if temporal else 1
    x = z.reshape((-1,) + z.shape[2:])
    reversed_channels = list(reversed(cfg.block_out_channels))
    x = layers.conv(reversed_channels[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in",
                    **kw)(x)
    x = MidBlock(cfg, name="mid_block")(x)
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      x = UpDecoderBlock2D(cfg, channels, i < last, name=f"up_blocks_{i}")(x, num_frames, train)
    x = layers.GroupNorm(cfg.norm_num_groups, _RESNET_EPS, name="conv_norm_out", **kw)(x)
    x = nn.silu(x)
    x = layers.conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(x)
    return x.reshape(z.shape[:2] + x.shape[1:])


class AutoencoderKL(nn.Module):
  """SD2.1's KL autoencoder on videos [B, F, H, W, C] (images: F = 1).

  ``__call__`` (used by ``init``) encodes, takes the posterior mean and decodes, so one
  ``init`` creates every parameter.
  """

  config: AutoencoderKLConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    two_z = 2 * cfg.latent_channels
    if cfg.use_quant_conv:
      self.quant_conv = layers.conv(two_z, (1, 1), padding="VALID", dtype=cfg.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.conv(cfg.latent_channels, (1, 1), padding="VALID",
                                         dtype=cfg.dtype)

  def encode(self, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior of each frame.

    Args:
      frames: [B, F, H, W, in_channels] in [-1, 1]; H, W multiples of the downsample factor.

    Returns:
      (mean, logvar), each [B, F, H/f, W/f, latent_channels]; logvar clamped to [-30, 20] as
      diffusers' DiagonalGaussianDistribution does. Latents are NOT multiplied by
      scaling_factor.
    """
    cfg = self.config
    _check_video(frames, cfg.in_channels, "frames")
    factor = cfg.downsample_factor
    if frames.shape[2] % factor or frames.shape[3] % factor:
      raise ValueError(f"frame size {frames.shape[2:4]} is not a multiple of the VAE's "
                       f"downsample factor {factor}")
    b, f = frames.shape[:2]
    h = self.encoder(frames.reshape((b * f,) + frames.shape[2:]))
    if cfg.use_quant_conv:
      h = self.quant_conv(h)
    h = h.reshape((b, f) + h.shape[1:])
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, latents: jax.Array, *, temporal: bool = True,
             train: bool = False) -> jax.Array:
    """Decodes unscaled latents (the pipeline divides by scaling_factor first).

    Args:
      latents: [B, F, h, w, latent_channels]; the F frames form one clip.
      temporal: run the temporal decoder's convs over the F frames (the paper's decoder);
        False decodes each frame alone (the reference pipeline's released behaviour). Has no
        effect without ``config.temporal_decoder``.
      train: enables the temporal convs' dropout (needs a "dropout" rng).

    Returns:
      [B, F, h * f, w * f, out_channels], roughly in [-1, 1].
    """
    cfg = self.config
    _check_video(latents, cfg.latent_channels, "latents")
    z = latents
    if cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z, temporal=temporal, train=train)

  def __call__(self, frames: jax.Array, *, temporal: bool = True) -> jax.Array:
    mean, _ = self.encode(frames)
    return self.decode(mean, temporal=temporal)


def _check_video(x: jax.Array, channels: int, what: str) -> None:
  if x.ndim != 5 or x.shape[-1] != channels:
    raise ValueError(f"{what} must be [batch, frames, height, width, {channels}], "
                     f"got shape {x.shape}")


def decode_chunked(
    vae: AutoencoderKL,
    params: Any,
    latents: jax.Array,
    *,
    chunk_frames: int,
    temporal: bool = True,
) -> jax.Array:
  """Decodes a long latent video clip by clip, so memory stays that of one clip.

  The temporal decoder sees each chunk of ``chunk_frames`` frames as one clip (VidRD decodes
  each generated clip on its own, overlap frames included), so the result equals decoding
  each chunk separately and concatenating. A trailing partial chunk is decoded on its own.

  Args:
    vae: the module.
    params: its parameters (the "params" collection).
    latents: [B, T, h, w, latent_channels], unscaled.
    chunk_frames: frames per clip (N), > 0.
    temporal: see :meth:`AutoencoderKL.decode`.

  Returns:
    [B, T, H, W, out_channels].
  """
  if chunk_frames <= 0:
    raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
  _check_video(latents, vae.config.latent_channels, "latents")
  decode = lambda z: vae.apply({"params": params}, z, temporal=temporal, method=vae.decode)
  b, t = latents.shape[:2]
  full = (t // chunk_frames) * chunk_frames
  outputs = []
  if full:
    clips = latents[:, :full].reshape((b, full // chunk_frames, chunk_frames) + latents.shape[2:])
    # [clips, B, N, ...]: lax.map runs one clip at a time, so peak memory is one clip's.
    decoded = jax.lax.map(decode, jnp.swapaxes(clips, 0, 1))
    decoded = jnp.swapaxes(decoded, 0, 1)
    outputs.append(decoded.reshape((b, full) + decoded.shape[3:]))
  if full < t:
    outputs.append(decode(latents[:, full:]))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)

