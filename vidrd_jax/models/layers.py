"""Building blocks shared by the UNet3D and the (temporal) VAE, channels-last.

Every block mirrors a diffusers / VidRD PyTorch module so that weights convert one to one:

* :class:`GroupNorm`: ``torch.nn.GroupNorm``; statistics over every axis but the first
  (batch) one, so a ``[B, F, H, W, C]`` input is normalised over frames jointly, as the
  reference's 5D GroupNorms (ResnetBlock3D, TemporalConvLayer) do.
* :class:`ResnetBlock2D`: diffusers ``ResnetBlock2D`` / VidRD ``ResnetBlock3D``.
* :class:`Downsample2D`, :class:`Upsample2D`: diffusers' down/upsamplers (the upsampler's conv
  computed in sub-pixel form by :class:`UpsampleConv`).
* :class:`TemporalConvLayer`: VidRD's temporal convolution stack (after each resnet).
* :class:`Attention`: diffusers ``Attention`` (``CrossAttention``) projections around
  :func:`vidrd_jax.models.attention.dot_product_attention`.

Parameter names follow flax (``kernel``, ``bias``, ``scale``); weight_conversion maps them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidrd_jax.models import attention as attention_lib
from vidrd_jax.parallel import axes

Dtype = Any
Padding = Union[int, Sequence[Tuple[int, int]]]

# torch.nn.GroupNorm / LayerNorm default epsilon.
TORCH_NORM_EPS = 1e-5


def _kernel_init(zero_init: bool, zero_init_scale: float = 0.0):
  """LeCun normal; with ``zero_init`` zeros, or LeCun normal x ``zero_init_scale`` when that is > 0.

  The small non-zero start is for layers that are zero-initialised so that inflating a pretrained
  model starts at the identity, when a model is trained from scratch instead: a zero output
  projection gives the layers before it no gradient until it has grown.
  """
  if not zero_init:
    return nn.initializers.lecun_normal()
  if zero_init_scale < 0:
    raise ValueError(f"zero_init_scale must be >= 0, got {zero_init_scale}")
  if zero_init_scale == 0:
    return nn.initializers.zeros_init()
  return nn.initializers.variance_scaling(zero_init_scale ** 2, "fan_in", "truncated_normal")


def conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    strides: Optional[Sequence[int]] = None,
    padding: Any = "SAME",
    zero_init: bool = False,
    zero_init_scale: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: Optional[str] = None,
) -> nn.Conv:
  """A channels-last conv whose kernel is [*taps, C_in, C_out] with logical axis names.

  ``zero_init`` starts the kernel at zero, or, with ``zero_init_scale > 0``, small: LeCun
  normal times that factor (see :func:`_kernel_init`).
  """
  taps = (axes.KERNEL_SPATIAL,) * len(kernel_size)
  kernel_init = _kernel_init(zero_init, zero_init_scale)
  return nn.Conv(
      features,
      kernel_size=tuple(kernel_size),
      strides=strides,
      padding=padding,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, taps + (axes.CONV_IN, axes.CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.CONV_OUT,)),
      name=name,
  )


def dense(
    features: int,
    in_axis: Optional[str],
    out_axis: Optional[str],
    *,
    use_bias: bool = True,
    zero_init: bool = False,
    zero_init_scale: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: Optional[str] = None,
) -> nn.Dense:
  """A dense layer ([in, out] kernel) with logical axis names on kernel and bias.

  ``zero_init`` / ``zero_init_scale``: as for :func:`conv`.
  """
  kernel_init = _kernel_init(zero_init, zero_init_scale)
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name,
  )


class GroupNorm(nn.Module):
  """``torch.nn.GroupNorm`` on channels-last input.

  Statistics are taken per sample (axis 0) and per group over every other axis; the
  variance is the two-pass ``mean((x - mean)^2)`` in float32 (flax's default "fast
  variance" ``E[x^2] - E[x]^2`` loses digits and is a known source of mismatch with torch).

  Attributes:
    num_groups: number of channel groups; must divide C.
    epsilon: added to the variance.
  """
  num_groups: int = 32
  epsilon: float = TORCH_NORM_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, ..., C] -> same shape."""
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)), (c,),
        self.param_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)), (c,),
        self.param_dtype)
    xf = x.astype(jnp.float32)
    grouped = xf.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    # Reduce over everything except the sample axis and the group axis.
    reduce_axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
    centred = grouped - mean
    var = jnp.mean(jnp.square(centred), axis=reduce_axes, keepdims=True)
    normed = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(self.dtype)


class LayerNorm(nn.Module):
  """``torch.nn.LayerNorm`` over the last axis (two-pass variance, float32 statistics)."""
  epsilon: float = TORCH_NORM_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)), (c,),
        self.param_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)), (c,),
        self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + self.epsilon)
    out = out * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(self.dtype)


class ResnetBlock2D(nn.Module):
  """diffusers ``ResnetBlock2D`` (VidRD ``ResnetBlock3D`` for 5D input).

  norm1 -> SiLU -> conv1 (+ time-embedding projection) -> norm2 -> SiLU -> dropout ->
  conv2, plus an optional 1x1 ``conv_shortcut`` on the skip path, divided by
  ``output_scale_factor``.

  Input is [N, H, W, C], or [B, F, H, W, C] for video: convs then act per frame while the
  GroupNorms pool statistics over all frames of a sample, exactly as the reference's
  5D ``torch.nn.GroupNorm`` does.

  Attributes:
    out_channels: output channels (default: input channels).
    groups: GroupNorm groups for norm1 and norm2 (diffusers ``groups`` / ``groups_out``).
    groups_out: groups of norm2 when different from ``groups``.
    eps: GroupNorm epsilon (``resnet_eps``: norm_eps of the UNet, 1e-6 in the VAE).
    dropout: dropout rate before conv2.
    output_scale_factor: the residual sum is divided by this.
    use_conv_shortcut: force a 1x1 shortcut conv (default: only when channels change).
    per_frame_norm: for [B, F, H, W, C] input, normalise every frame alone instead of
      pooling GroupNorm statistics over the frames.
  """
  out_channels: Optional[int] = None
  groups: int = 32
  groups_out: Optional[int] = None
  eps: float = 1e-6
  dropout: float = 0.0
  output_scale_factor: float = 1.0
  use_conv_shortcut: Optional[bool] = None
  per_frame_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, temb: Optional[jax.Array] = None, *, train: bool = False
  ) -> jax.Array:
    """x: [N, H, W, C] or [B, F, H, W, C]; temb: [N, T] (or [B, T]) or None."""
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    video_shape = None
    if self.per_frame_norm and x.ndim == 5:
      # [B, F, H, W, C] -> [B*F, H, W, C]: every frame its own GroupNorm sample.
      video_shape = x.shape[:2]
      if temb is not None:
        temb = jnp.repeat(temb, x.shape[1], axis=0)
      x = x.reshape((-1,) + x.shape[2:])

    h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
    h = nn.silu(h)
    h = conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv1", **kw)(h)
    if temb is not None:
      t = dense(out_channels, axes.EMBED, axes.CONV_OUT, name="time_emb_proj", **kw)(nn.silu(temb))
      # [N, C] -> broadcast over every spatial (and frame) axis.
      h = h + t.reshape(t.shape[:1] + (1,) * (h.ndim - 2) + t.shape[-1:])
    h = GroupNorm(self.groups_out or self.groups, self.eps, name="norm2", **kw)(h)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv2", **kw)(h)

    use_shortcut = (
        in_channels != out_channels if self.use_conv_shortcut is None else self.use_conv_shortcut)
    if use_shortcut:
      x = conv(out_channels, (1, 1), padding="VALID", name="conv_shortcut", **kw)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    if video_shape is not None:
      out = out.reshape(video_shape + out.shape[1:])
    return out


def _as_padding(padding: Padding) -> Sequence[Tuple[int, int]]:
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must be an int or ((top, bottom), (left, right)), got {padding!r}")
  return pads


class Downsample2D(nn.Module):
  """3x3 stride-2 conv (diffusers ``Downsample2D`` with ``use_conv=True``).

  Attributes:
    out_channels: output channels (default: input channels).
    padding: an int p pads p on every side (the UNet: 1); ((top, bottom), (left, right))
      pads asymmetrically (the VAE encoder: ((0, 1), (0, 1)), i.e. torch's
      ``F.pad(x, (0, 1, 0, 1))`` followed by a padding-0 conv).
  """
  out_channels: Optional[int] = None
  padding: Padding = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., H, W, C] -> [..., ceil-ish(H/2), W/2, C_out]."""
    return conv(
        self.out_channels or x.shape[-1], (3, 3), strides=(2, 2), padding=_as_padding(self.padding),
        dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


def _conv_params(
    module: nn.Module, shape: Sequence[int], kernel_init: Any,
) -> tuple[jax.Array, jax.Array]:
  """``kernel`` [*taps, C_in, C_out] and zero ``bias`` [C_out] of a hand-written conv module.

  The names, initialisers and logical axes of ``nn.Conv`` as :func:`conv` builds it, so such a
  module converts and shards like the conv it stands for.
  """
  taps = (axes.KERNEL_SPATIAL,) * (len(shape) - 2)
  kernel = module.param(
      "kernel", nn.with_logical_partitioning(kernel_init, taps + (axes.CONV_IN, axes.CONV_OUT)),
      tuple(shape), module.param_dtype)
  bias = module.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.CONV_OUT,)),
      (shape[-1],), module.param_dtype)
  return kernel, bias


def _subpixel_phase_kernels(w: jax.Array) -> jax.Array:
  """The 2x2 kernels that a 3x3 conv after nearest-neighbour x2 upsampling applies per phase.

  Output row 2i+a of ``conv3x3(upsample(x))`` reads upsampled rows 2i+a-1 .. 2i+a+1, which are
  input rows (i-1, i, i) for a = 0 and (i, i, i+1) for a = 1: two distinct rows, so the three
  row taps fold to two, [w0, w1 + w2] and [w0 + w1, w2]; columns likewise.

  w: [3, 3, C_in, C_out] -> [2 (row phase a), 2 (row tap), 2 (column phase b), 2 (column tap),
  C_in, C_out]; phase a's taps sit at input offsets (a-1, a).
  """
  # [a, row tap, 3 column taps, C_in, C_out]
  rows = jnp.stack([jnp.stack([w[0], w[1] + w[2]]), jnp.stack([w[0] + w[1], w[2]])])
  # [a, row tap, b, column tap, C_in, C_out]
  return jnp.stack([
      jnp.stack([rows[:, :, 0], rows[:, :, 1] + rows[:, :, 2]], axis=2),
      jnp.stack([rows[:, :, 0] + rows[:, :, 1], rows[:, :, 2]], axis=2),
  ], axis=2)


class UpsampleConv(nn.Module):
  """``conv3x3(nearest_upsample_x2(x))`` computed on the low-resolution input (sub-pixel form).

  Each of the four output phases (even/odd row, even/odd column) is a 2x2 conv of the input
  with taps folded from the 3x3 kernel (:func:`_subpixel_phase_kernels`): 16 taps at H x W
  instead of 9 at 2H x 2W, i.e. 2.25x fewer FLOPs in the forward and the backward pass, and
  no upsampled copy of the input in memory. The result equals the upsample-then-conv of the
  reference up to float rounding (the folded taps are summed before the multiply).

  Parameters are those of the 3x3 conv it stands for (``kernel`` [3, 3, C_in, C_out],
  ``bias`` [C_out]), so checkpoints convert unchanged.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., H, W, C_in] -> [..., 2H, 2W, C_out]."""
    *lead, h, w, c_in = x.shape
    kernel, bias = _conv_params(self, (3, 3, c_in, self.features), _kernel_init(False))
    # Fold the taps in the parameters' precision, then compute in self.dtype.
    phases = _subpixel_phase_kernels(kernel).astype(self.dtype)
    x = x.astype(self.dtype).reshape(-1, h, w, c_in)
    rows = []
    for a in range(2):
      cols = []
      for b in range(2):
        # Phase (a, b) reads input offsets (a-1, a) x (b-1, b): pad 1-a above, a below.
        cols.append(jax.lax.conv_general_dilated(
            x, phases[a, :, b], window_strides=(1, 1), padding=((1 - a, a), (1 - b, b)),
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
      rows.append(jnp.stack(cols, axis=3))   # [N, H, W, 2 (b), C_out]
    # [N, H, 2 (a), W, 2 (b), C_out]: row 2i+a, column 2j+b after the reshape.
    y = jnp.stack(rows, axis=2).reshape(*lead, 2 * h, 2 * w, self.features)
    return y + bias.astype(self.dtype)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv (diffusers ``Upsample2D`` with ``use_conv=True``).

  Computed in sub-pixel form by :class:`UpsampleConv` (named ``conv``, the reference's 3x3
  conv parameters).
  """
  out_channels: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., H, W, C] -> [..., 2H, 2W, C_out]."""
    return UpsampleConv(self.out_channels or x.shape[-1], dtype=self.dtype,
                        param_dtype=self.param_dtype, name="conv")(x)


class TemporalConv(nn.Module):
  """``nn.Conv3d(kernel (3, 1, 1), padding (1, 0, 0))``: a conv over frames only, as one matmul.

  Parameters are those of the channels-last conv it stands for (``kernel`` [3, 1, 1, C_in,
  C_out], ``bias`` [C_out]), so checkpoints convert unchanged. The three frame taps are
  concatenated along channels and contracted in one [B F H W, 3 C_in] x [3 C_in, C_out]
  matmul: with a 1x1 spatial footprint the conv is a GEMM, and XLA's GPU backend runs the 3D
  conv through cuDNN with NCDHW layout conversions around every call (on an H200 they cost
  more than the conv itself: 265 conversion kernels, 17% of a UNet3D forward).

  Attributes:
    features: C_out.
    zero_init / zero_init_scale: as for :func:`conv`.
  """
  features: int
  zero_init: bool = False
  zero_init_scale: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, F, H, W, C_in] -> [B, F, H, W, C_out]."""
    c_in, frames = x.shape[-1], x.shape[1]
    kernel, bias = _conv_params(self, (3, 1, 1, c_in, self.features),
                                _kernel_init(self.zero_init, self.zero_init_scale))
    x = x.astype(self.dtype)
    # Zero frames at both ends (the conv's padding), then [x_{f-1}, x_f, x_{f+1}] per frame.
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    taps = jnp.concatenate([padded[:, d:d + frames] for d in range(3)], axis=-1)
    # [3, 1, 1, C_in, C_out] -> [3 C_in, C_out], tap-major like the concatenation.
    w = kernel.astype(self.dtype).reshape(3 * c_in, self.features)
    return jnp.dot(taps, w) + bias.astype(self.dtype)


class TemporalConvLayer(nn.Module):
  """VidRD's temporal conv stack (modelscope's), a residual over frames.

  ``num_layers`` x [GroupNorm(32 groups, over frames and space jointly), SiLU, Dropout,
  Conv3d kernel (3, 1, 1) padding (1, 0, 0)]; channels go in -> out -> in -> ... -> out as
  the reference builds them; the last conv starts at zero so a new layer is the identity.
  With one frame the layer is bypassed (identity), as in the reference.

  Param names are ``convs_{i}`` for the i-th entry of the reference's ``convs`` ModuleList
  (norms at 0, 4, 8, 12; convs at 3, 7, 11, 15), so converted keys read the same.

  Attributes:
    out_channels: the stack's middle width (default: in); the result has in channels when
      num_layers is even, as the residual requires.
    num_layers: number of norm/act/dropout/conv groups.
    dropout: dropout rate (the reference hard-codes 0.1).
    num_groups: GroupNorm groups (the reference always uses 32).
    eps: GroupNorm epsilon (torch default 1e-5).
    zero_init_last: start the last conv at zero (the identity), as the reference does.
    last_init_scale: with ``zero_init_last``, > 0 starts the last conv small instead (LeCun
      normal x this factor), for training from scratch.
  """
  out_channels: Optional[int] = None
  num_layers: int = 4
  dropout: float = 0.1
  num_groups: int = 32
  eps: float = TORCH_NORM_EPS
  zero_init_last: bool = True
  last_init_scale: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: [B, F, H, W, C] -> [B, F, H, W, C]."""
    if x.ndim != 5:
      raise ValueError(f"TemporalConvLayer expects [B, F, H, W, C], got shape {x.shape}")
    num_frames = x.shape[1]
    # One frame: nothing temporal to do. Still build parameters during init.
    if num_frames == 1 and not self.is_initializing():
      return x
    in_dim = x.shape[-1]
    out_dim = self.out_channels or in_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = x
    prev_dim, next_dim = in_dim, out_dim
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      if last:
        next_dim = out_dim
      h = GroupNorm(self.num_groups, self.eps, name=f"convs_{4 * i}", **kw)(h)
      h = nn.silu(h)
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      h = TemporalConv(
          next_dim, zero_init=last and self.zero_init_last, zero_init_scale=self.last_init_scale,
          name=f"convs_{4 * i + 3}", **kw)(h)
      prev_dim, next_dim = next_dim, prev_dim
    del prev_dim
    return x + h


class Attention(nn.Module):
  """diffusers ``Attention`` (old ``CrossAttention``): q/k/v without bias, ``to_out.0`` with bias.

  Self-attention when ``context`` is None. Heads are split as diffusers does
  (``[.., heads * head_dim]`` -> ``[.., heads, head_dim]``), scale ``head_dim ** -0.5``.

  Attributes:
    heads: number of heads.
    head_dim: channels per head.
    out_features: output width (default: query width).
    upcast: scores and softmax in float32 (diffusers ``upcast_attention``).
    implementation: see :func:`vidrd_jax.models.attention.dot_product_attention`.
    zero_init_out: start ``to_out_0`` at zero (VidRD's temporal attention).
    out_init_scale: with ``zero_init_out``, > 0 starts ``to_out_0`` small instead (LeCun
      normal x this factor), for training from scratch.
  """
  heads: int
  head_dim: int
  out_features: Optional[int] = None
  upcast: bool = False
  implementation: Optional[str] = None
  zero_init_out: bool = False
  out_init_scale: float = 0.0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      context: Optional[jax.Array] = None,
      mask: Optional[jax.Array] = None,
      *,
      sparse_causal_frames: Optional[int] = None,
      context_frames: Optional[int] = None,
  ) -> jax.Array:
    """Attention of x over itself or a context.

    Args:
      x: [N, Lq, C] queries' source.
      context: [N, Lk, D], or None for self-attention; with ``context_frames`` F, [N / F, Lk, D]:
        one context per video, shared by its F frames.
      mask: optional boolean mask broadcastable to [N, heads, Lq, Lk].
      sparse_causal_frames: VidRD's sparse-causal attention (``prepend_first_frame``): N is
        (B * F) with this F, and each frame's keys/values are those of frame 0 followed by
        those of the previous frame (frame 0 uses itself). None or 1: ordinary attention.
      context_frames: N is (B * F) with this F and ``context`` is per video. The result is
        that of repeating the context for every frame, but keys and values are projected
        once per video rather than F times, and the video's F x Lq queries attend as one
        sequence (softmax is per query, so this is the same attention).

    Returns:
      [N, Lq, out_features or C].
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    n, lq = x.shape[:2]
    shared = context_frames is not None and context is not None
    if shared and (mask is not None or sparse_causal_frames not in (None, 1)
                   or context.shape[0] * context_frames != n):
      raise ValueError(
          f"context_frames={context_frames}: needs one context per video ({n} frames -> "
          f"{n // context_frames} contexts, got {context.shape[0]}) and no mask or "
          "sparse-causal attention")
    context = x if context is None else context
    q = dense(inner, axes.EMBED, axes.HEADS, use_bias=self.use_bias, name="to_q", **kw)(x)
    k = dense(inner, axes.EMBED, axes.HEADS, use_bias=self.use_bias, name="to_k", **kw)(context)
    v = dense(inner, axes.EMBED, axes.HEADS, use_bias=self.use_bias, name="to_v", **kw)(context)
    if sparse_causal_frames is not None and sparse_causal_frames > 1:
      k, v = (_first_and_previous_frame(t, sparse_causal_frames) for t in (k, v))
    if shared:
      # [B F, Lq, inner] -> [B, F Lq, inner]: a video's frames query its one context together.
      q = q.reshape(n // context_frames, context_frames * lq, inner)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    # In float32 compute the XLA path always takes float32 scores, so `upcast` only matters
    # for half-precision compute, where it mirrors diffusers' upcast_attention.
    upcast = self.upcast or jnp.dtype(self.dtype) == jnp.float32
    out = attention_lib.dot_product_attention(
        split(q), split(k), split(v), mask=mask, scale=self.head_dim ** -0.5, upcast=upcast,
        implementation=self.implementation)
    out = out.reshape(n, lq, inner)
    return dense(
        self.out_features or x.shape[-1], axes.HEADS, axes.EMBED, zero_init=self.zero_init_out,
        zero_init_scale=self.out_init_scale, name="to_out_0", **kw)(out)


def _first_and_previous_frame(t: jax.Array, num_frames: int) -> jax.Array:
  """[(B F), L, C] -> [(B F), 2L, C]: frame 0's tokens then the previous frame's tokens."""
  t = t.reshape((-1, num_frames) + t.shape[1:])
  first = jnp.broadcast_to(t[:, :1], t.shape)
  # Frame 0 has no predecessor and attends to itself twice, as the reference does.
  previous = jnp.concatenate([t[:, :1], t[:, :-1]], axis=1)
  out = jnp.concatenate([first, previous], axis=2)
  return out.reshape((-1,) + out.shape[2:])


def sinusoidal_frame_embedding(num_frames: int, dim: int) -> np.ndarray:
  """VidRD's ``get_sin_pos_embedding``: [F, dim] with sin at even, cos at odd channels.

  pe[p, 2i] = sin(p * 10000^(-2i/dim)), pe[p, 2i+1] = cos(same); computed in float32 in
  the same operation order as the reference (a trace-time constant).
  """
  if dim % 2:
    raise ValueError(f"sinusoidal frame embedding needs an even width, got {dim}")
  position = np.arange(num_frames, dtype=np.float32)[:, None]
  div_term = np.exp(
      np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(np.log(10000.0) / dim))
  ).astype(np.float32)
  pe = np.zeros((num_frames, dim), np.float32)
  pe[:, 0::2] = np.sin(position * div_term)
  pe[:, 1::2] = np.cos(position * div_term)
  return pe
