"""VidRD's 3D UNet re-created in PyTorch on top of diffusers' UNet2DConditionModel.

The spatial modules are diffusers' own (resnets, Transformer2DModel pieces, attention
processors, time embedding); this file adds the reference's temporal modules to them and
runs them in the reference's order on 5D video tensors ``[B, C, F, H, W]``:

* ``<block>.temp_convs.{j}``: TemporalConvLayer (4 x GroupNorm(32) / SiLU / Dropout(0.1) /
  Conv3d (3, 1, 1)), after resnet j of every down / up block; in the mid block after both
  resnets (index 0 right after the first resnet). Last conv zero-initialised, residual,
  bypassed for one frame.
* ``...transformer_blocks.0.temp_norm`` (LayerNorm) and ``.temp_attn`` (a diffusers
  Attention with the block's heads, to_out zero-initialised): after cross-attention and
  before the feed-forward, over frames at each spatial position; with ``add_temp_embed`` the
  sinusoidal frame embedding (sin at even, cos at odd channels) is added to the residual
  stream first. Bypassed for one frame.
* Resnets and conv_norm_out run their GroupNorm on the 5D tensor, so statistics pool over
  frames (the reference's ResnetBlock3D applies torch.nn.GroupNorm to [B, C, F, H, W]);
  convs, the transformers' GroupNorm and attention act per frame.
* Optional: ``prepend_first_frame`` (sparse-causal attn1: keys/values of frame 0 and the
  previous frame), ``add_temp_transformer`` (TransformerTemporalModel after conv_in),
  ``add_temp_attn_only_on_upblocks``.

One deliberate difference: with one frame and ``add_temp_embed`` the reference's in-place
``+=`` on an einops view also shifts its saved identity by the frame-0 embedding
([0, 1, 0, 1, ...]); here (as the reference's comment "ignore effects of temporal layers on
image inputs" intends) one frame is an exact bypass.

State-dict keys are diffusers' plus the temporal ones above, i.e. the release's
``ModelT2V.pth`` ``unet.*`` keys with the prefix stripped.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn import functional as F


def sin_frame_embedding(dim: int, num_frames: int) -> torch.Tensor:
  """[F, dim]: pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(same)."""
  pe = torch.zeros(num_frames, dim)
  position = torch.arange(num_frames, dtype=torch.float32)[:, None]
  div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
  pe[:, 0::2] = torch.sin(position * div)
  pe[:, 1::2] = torch.cos(position * div)
  return pe


class TemporalConvLayer(nn.Module):
  """Residual temporal conv stack over [B, C, F, H, W]; channels in -> out -> in ... -> out."""

  def __init__(self, in_dim: int, out_dim: int | None = None, num_layers: int = 4,
               dropout: float = 0.1):
    super().__init__()
    out_dim = out_dim or in_dim
    layers = []
    dims = (in_dim, out_dim)
    for i in range(num_layers):
      d_in = dims[i % 2]
      d_out = out_dim if i == num_layers - 1 else dims[(i + 1) % 2]
      layers += [nn.GroupNorm(32, d_in), nn.SiLU(), nn.Dropout(dropout),
                 nn.Conv3d(d_in, d_out, (3, 1, 1), padding=(1, 0, 0))]
    self.convs = nn.ModuleList(layers)
    nn.init.zeros_(self.convs[-1].weight)
    nn.init.zeros_(self.convs[-1].bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.shape[2] == 1:
      return x
    h = x
    for layer in self.convs:
      h = layer(h)
    return x + h


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
  """Applies a 2D module to every frame of [B, C, F, H, W]."""
  b, _, f = x.shape[:3]
  y = fn(x.transpose(1, 2).reshape(b * f, *x.shape[1:2], *x.shape[3:]))
  return y.reshape(b, f, *y.shape[1:]).transpose(1, 2)


def _attention(attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None,
               sparse_causal_frames: int | None = None) -> torch.Tensor:
  """diffusers Attention, optionally with sparse-causal keys/values over frames."""
  if not sparse_causal_frames or sparse_causal_frames == 1:
    return attn(x, encoder_hidden_states=context)
  f = sparse_causal_frames
  ctx = x if context is None else context
  q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)

  def gather(t):
    t = t.reshape(-1, f, *t.shape[1:])
    previous = torch.cat([t[:, :1], t[:, :-1]], dim=1)
    return torch.cat([t[:, [0] * f], previous], dim=2).reshape(-1, 2 * t.shape[2], t.shape[3])

  k, v = gather(k), gather(v)
  heads = attn.heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
  scores = (split(q).float() @ split(k).float().transpose(-1, -2)) * attn.scale
  out = scores.softmax(-1).to(v.dtype) @ split(v)
  out = out.transpose(1, 2).reshape(q.shape)
  return attn.to_out[1](attn.to_out[0](out))


class ReferenceUNet3D(nn.Module):
  """diffusers UNet2DConditionModel's modules + VidRD's temporal modules, run as the reference."""

  def __init__(self, unet: UNet2DConditionModel, *, add_temp_conv: bool, add_temp_embed: bool,
               add_temp_attn_only_on_upblocks: bool = False, add_temp_transformer: bool = False,
               prepend_first_frame: bool = False):
    super().__init__()
    self.config = unet.config
    for name, child in unet.named_children():
      self.add_module(name, child)
    self.add_temp_conv = add_temp_conv
    self.add_temp_embed = add_temp_embed
    self.prepend_first_frame = prepend_first_frame
    if add_temp_transformer:
      self.temp_transformer = _TemporalTransformer(unet.config.block_out_channels[0])
    else:
      self.temp_transformer = None

    blocks = [(b, not add_temp_attn_only_on_upblocks) for b in self.down_blocks]
    blocks += [(self.mid_block, not add_temp_attn_only_on_upblocks)]
    blocks += [(b, True) for b in self.up_blocks]
    for block, temp_attn in blocks:
      if add_temp_conv:
        n = len(block.resnets)
        block.temp_convs = nn.ModuleList(
            [TemporalConvLayer(r.out_channels) for r in block.resnets[:n]])
      for transformer in getattr(block, "attentions", None) or []:
        for tb in transformer.transformer_blocks:
          tb.has_temp_attn = temp_attn
          if temp_attn:
            dim = tb.norm1.normalized_shape[0]
            tb.temp_norm = nn.LayerNorm(dim)
            tb.temp_attn = Attention(
                query_dim=dim, heads=tb.attn1.heads, dim_head=dim // tb.attn1.heads,
                bias=False, upcast_attention=self.config.upcast_attention)
            nn.init.zeros_(tb.temp_attn.to_out[0].weight)
            nn.init.zeros_(tb.temp_attn.to_out[0].bias)

  # Pieces.
  def _resnet(self, r, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    h = r.nonlinearity(r.norm1(x))  # GroupNorm on [B, C, F, H, W]: stats over frames too
    h = _per_frame(r.conv1, h)
    h = h + r.time_emb_proj(r.nonlinearity(temb))[:, :, None, None, None]
    h = r.dropout(r.nonlinearity(r.norm2(h)))
    h = _per_frame(r.conv2, h)
    if r.conv_shortcut is not None:
      x = _per_frame(r.conv_shortcut, x)
    return (x + h) / r.output_scale_factor

  def _block(self, tb: BasicTransformerBlock, x: torch.Tensor, context: torch.Tensor,
             f: int) -> torch.Tensor:
    only_cross = tb.only_cross_attention
    x = _attention(tb.attn1, tb.norm1(x), context if only_cross else None,
                   f if self.prepend_first_frame else None) + x
    x = tb.attn2(tb.norm2(x), encoder_hidden_states=context) + x
    if getattr(tb, "has_temp_attn", False) and f > 1:
      bf, d, c = x.shape
      t = x.reshape(bf // f, f, d, c)
      if self.add_temp_embed:
        t = t + sin_frame_embedding(c, f).to(t)[None, :, None, :]
      t = t.transpose(1, 2).reshape(-1, f, c)
      t = tb.temp_attn(tb.temp_norm(t)) + t
      x = t.reshape(bf // f, d, f, c).transpose(1, 2).reshape(bf, d, c)
    return tb.ff(tb.norm3(x)) + x

  def _transformer(self, tr, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    b, c, f, hh, ww = x.shape
    h = x.transpose(1, 2).reshape(b * f, c, hh, ww)
    residual = h
    h = tr.norm(h)
    linear = tr.config.use_linear_projection
    if not linear:
      h = tr.proj_in(h)
    inner = h.shape[1]
    h = h.permute(0, 2, 3, 1).reshape(b * f, hh * ww, inner)
    if linear:
      h = tr.proj_in(h)
    ctx = context.repeat_interleave(f, dim=0)
    for tb in tr.transformer_blocks:
      h = self._block(tb, h, ctx, f)
    if linear:
      h = tr.proj_out(h)
    h = h.reshape(b * f, hh, ww, -1).permute(0, 3, 1, 2)
    if not linear:
      h = tr.proj_out(h)
    out = h + residual
    return out.reshape(b, f, c, hh, ww).transpose(1, 2)

  def _temp_conv(self, block, j: int, x: torch.Tensor) -> torch.Tensor:
    return block.temp_convs[j](x) if self.add_temp_conv else x

  def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor
              ) -> torch.Tensor:
    """sample [B, C, F, h, w], timestep scalar or [B], context [B, T, D] -> [B, C_out, F, h, w]."""
    b = sample.shape[0]
    t = torch.as_tensor(timestep).reshape(-1).expand(b)
    emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
    ctx = encoder_hidden_states
    x = _per_frame(self.conv_in, sample)
    if self.temp_transformer is not None:
      x = self.temp_transformer(x)

    skips = (x,)
    for block in self.down_blocks:
      for j, resnet in enumerate(block.resnets):
        x = self._temp_conv(block, j, self._resnet(resnet, x, emb))
        if getattr(block, "attentions", None):
          x = self._transformer(block.attentions[j], x, ctx)
        skips += (x,)
      if block.downsamplers is not None:
        x = _per_frame(block.downsamplers[0], x)
        skips += (x,)

    mid = self.mid_block
    x = self._temp_conv(mid, 0, self._resnet(mid.resnets[0], x, emb))
    for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
      x = self._transformer(attn, x, ctx)
      x = self._temp_conv(mid, j + 1, self._resnet(resnet, x, emb))

    for block in self.up_blocks:
      for j, resnet in enumerate(block.resnets):
        x = torch.cat([x, skips[-1]], dim=1)
        skips = skips[:-1]
        x = self._temp_conv(block, j, self._resnet(resnet, x, emb))
        if getattr(block, "attentions", None):
          x = self._transformer(block.attentions[j], x, ctx)
      if block.upsamplers is not None:
        x = _per_frame(lambda y: block.upsamplers[0](y), x)

    x = F.silu(self.conv_norm_out(x))  # 5D GroupNorm, as the reference
    return _per_frame(self.conv_out, x)


class _TemporalTransformer(nn.Module):
  """The reference's TransformerTemporalModel (8 heads x 64, self-attention over frames)."""

  def __init__(self, channels: int, heads: int = 8, head_dim: int = 64):
    super().__init__()
    inner = heads * head_dim
    self.norm = nn.GroupNorm(32, channels, eps=1e-6)
    self.proj_in = nn.Linear(channels, inner)
    self.transformer_blocks = nn.ModuleList(
        [BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim=None,
                               activation_fn="geglu")])
    self.proj_out = nn.Linear(inner, channels)
    nn.init.zeros_(self.proj_out.weight)
    nn.init.zeros_(self.proj_out.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, f, hh, ww = x.shape
    h = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * hh * ww, f, c)
    h = self.proj_in(h)
    for tb in self.transformer_blocks:
      h = tb.attn1(tb.norm1(h)) + h
      h = tb.ff(tb.norm3(h)) + h
    h = self.proj_out(h)
    # As the reference: the [(B H W), F, C] buffer is read as [B, H, W, C, F].
    h = h.reshape(b, hh, ww, c, f).permute(0, 3, 4, 1, 2)
    return x + h if f > 1 else x


def randomize_(module: nn.Module, seed: int, scale: float = 1.0) -> None:
  """Overwrites every parameter with seeded random values of a sane magnitude.

  Weights: N(0, 1/fan_in) x scale; norm scales 1 + N(0, 0.1^2); biases N(0, 0.05^2).
  Zero-initialised layers get random values too, so every converted weight is tested.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1:
        is_norm_scale = name.endswith("weight")
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) * (scale / math.sqrt(fan_in)))


def build_reference_unet3d(
    diffusers_config: Mapping[str, Any],
    seed: int,
    add_temp_conv: bool = True,
    add_temp_embed: bool = True,
    randomize_all: bool = True,
    **temporal_options: bool,
) -> ReferenceUNet3D:
  """The reference's 3D UNet for a diffusers UNet2DConditionModel config, in eval mode.

  Args:
    diffusers_config: a diffusers ``unet/config.json`` dict.
    seed: seeds the construction (torch defaults) and, with ``randomize_all``, every weight.
    add_temp_conv, add_temp_embed: the reference's switches.
    randomize_all: replace every parameter (zero-initialised ones included) by seeded noise.
    **temporal_options: ``add_temp_attn_only_on_upblocks``, ``add_temp_transformer``,
      ``prepend_first_frame``.

  Returns:
    A module with ``forward(sample [B, C, F, h, w], t, context [B, T, D]) -> [B, C, F, h, w]``
    whose ``state_dict()`` keys are the VidRD release's UNet keys.
  """
  torch.manual_seed(seed)
  config = {k: v for k, v in diffusers_config.items() if not k.startswith("_")}
  for key in ("add_temp_conv", "add_temp_embed", "add_temp_attn_only_on_upblocks",
              "add_temp_transformer", "prepend_first_frame", "add_temp_attn", "frame_pooled_norm"):
    config.pop(key, None)
  unet = UNet2DConditionModel(**config)
  model = ReferenceUNet3D(unet, add_temp_conv=add_temp_conv, add_temp_embed=add_temp_embed,
                          **temporal_options)
  if randomize_all:
    randomize_(model, seed)
  return model.eval()
