"""VidRD's temporal-aware VAE decoder re-created in PyTorch on top of diffusers' AutoencoderKL.

Structure as in the reference's ``vae/vae.py`` + ``vae/modules.py`` (not copied): every decoder
``UpDecoderBlock2D`` gets a ``temp_convs`` ModuleList, one TemporalConvLayer per resnet, applied
right after that resnet on the frames of each clip; the mid block and the encoder are untouched.
TemporalConvLayer = 3 x [GroupNorm(32 groups), SiLU, Dropout(0.1), Conv3d (3, 1, 1) padding
(1, 0, 0)], last conv zero-initialised, residual, bypassed for one frame. State dict keys are
the reference's: ``decoder.up_blocks.{i}.temp_convs.{j}.convs.{k}.{weight,bias}``.

Frames are batch-major as in the reference: latents ``[(B F), C, h, w]``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn


class TemporalConvLayer(nn.Module):
  """Residual stack of temporal convs over [B, C, F, H, W]."""

  def __init__(self, dim: int, num_layers: int = 3, dropout: float = 0.1):
    super().__init__()
    layers = []
    for _ in range(num_layers):
      layers += [nn.GroupNorm(32, dim), nn.SiLU(), nn.Dropout(dropout),
                 nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0))]
    self.convs = nn.ModuleList(layers)
    nn.init.zeros_(self.convs[-1].weight)
    nn.init.zeros_(self.convs[-1].bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity, h = x, x
    for layer in self.convs:
      h = layer(h)
    return identity + h if x.shape[2] > 1 else identity


def make_temporal_vae(**config) -> AutoencoderKL:
  """diffusers AutoencoderKL(**config) with the reference's temporal convs in the decoder."""
  vae = AutoencoderKL(**config)
  for block in vae.decoder.up_blocks:
    block.temp_convs = nn.ModuleList(
        [TemporalConvLayer(resnet.out_channels) for resnet in block.resnets])
  return vae


def temporal_decode(vae: AutoencoderKL, z: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
  """The reference's TemporalAutoencoderKL.decode(z, num_frames): [(B F), C, h, w] -> images."""
  dec = vae.decoder
  h = dec.conv_in(vae.post_quant_conv(z))
  h = dec.mid_block(h)
  for block in dec.up_blocks:
    for resnet, temp_conv in zip(block.resnets, block.temp_convs):
      h = resnet(h, temb=None)
      # [(B F), C, H, W] -> [B, C, F, H, W] for the conv over frames, and back.
      video = h.reshape(h.shape[0] // num_frames, num_frames, *h.shape[1:]).transpose(1, 2)
      h = temp_conv(video).transpose(1, 2).reshape(h.shape)
    if block.upsamplers is not None:
      for up in block.upsamplers:
        h = up(h)
  h = dec.conv_act(dec.conv_norm_out(h))
  return dec.conv_out(h)
