"""VAE parity: vidrd_jax AutoencoderKL vs diffusers, and VidRD's temporal decoder vs a torch
re-creation of the reference's (tests/torch_reference/temporal_vae.py). Random weights, every
parameter randomised (including the temporal convs' zero-initialised last conv)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from fixtures import numpy_state_dict, randomize_
from torch_reference import temporal_vae as ref
from vidrd_jax.models import layers
from vidrd_jax.models import vae as vae_lib
from weight_conversion import vae as vae_conv
from weight_conversion.common import ConversionError

TINY = vae_lib.AutoencoderKLConfig.tiny()
TINY_T = vae_lib.AutoencoderKLConfig.tiny(temporal=True)


def _torch_config(config):
  out = config.to_diffusers()
  for k in ("_class_name", "add_temp_conv"):
    out.pop(k, None)
  return out


def _legacy_names(sd):
  rename = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
  out = {}
  for k, v in sd.items():
    for new, old in rename.items():
      if ".attentions." in k and new in k:
        k = k.replace(new, old)
    out[k] = v
  return out


def _check(name, got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  err, std = float(np.abs(got - want).max()), float(want.std())
  print(f"{name}: max abs err {err:.3g}, std {std:.3g}, ratio {err / std:.3g}")
  assert err <= 1e-4 * std


def _to_video(x, b, f):
  """torch [(B F), C, H, W] -> numpy [B, F, H, W, C]."""
  x = x.detach().numpy()
  return np.transpose(x, (0, 2, 3, 1)).reshape((b, f) + x.shape[2:] + x.shape[1:2])


def _to_torch(x):
  """numpy [B, F, H, W, C] -> torch [(B F), C, H, W]."""
  x = np.asarray(x)
  return torch.from_numpy(np.ascontiguousarray(
      np.transpose(x.reshape((-1,) + x.shape[2:]), (0, 3, 1, 2))))


@functools.lru_cache(maxsize=None)
def _apply(config, method, **kwargs):
  model = vae_lib.AutoencoderKL(config)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method, **kwargs))


@pytest.fixture(scope="module")
def image_vae():
  torch.manual_seed(0)
  model = TorchAutoencoderKL(**_torch_config(TINY)).eval()
  randomize_(model, seed=1)
  return model, numpy_state_dict(model)


@pytest.fixture(scope="module")
def temporal_vae():
  torch.manual_seed(0)
  model = ref.make_temporal_vae(**_torch_config(TINY_T)).eval()
  randomize_(model, seed=2)  # the zero-initialised last temporal convs included
  sd = numpy_state_dict(model)
  assert np.abs(sd["decoder.up_blocks.0.temp_convs.0.convs.11.weight"]).min() > 0
  return model, sd


@pytest.mark.parametrize("legacy", [False, True], ids=["new_names", "old_names"])
def test_image_vae_matches_diffusers(image_vae, legacy):
  model, sd = image_vae
  params = vae_conv.vae_from_torch(_legacy_names(sd) if legacy else sd, TINY)
  b, f = 2, 2
  frames = np.random.default_rng(0).uniform(-1, 1, (b, f, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(_to_torch(frames)).latent_dist
  mean, logvar = _apply(TINY, "encode")(params, frames)
  _check("encode mean", mean, _to_video(posterior.mean, b, f))
  _check("encode logvar", logvar, _to_video(posterior.logvar, b, f))
  latents = np.random.default_rng(1).standard_normal((b, f, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = _to_video(model.decode(_to_torch(latents)).sample, b, f)
  _check("decode", _apply(TINY, "decode")(params, latents), want)


def test_temporal_decoder_matches_reference(temporal_vae):
  model, sd = temporal_vae
  params = vae_conv.vae_from_torch(_legacy_names(sd), TINY_T)
  b, f = 2, 4
  latents = np.random.default_rng(2).standard_normal((b, f, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = _to_video(ref.temporal_decode(model, _to_torch(latents), num_frames=f), b, f)
    per_frame = _to_video(ref.temporal_decode(model, _to_torch(latents), num_frames=1), b, f)
  assert np.abs(want - per_frame).max() > 1e-2 * want.std()  # the temporal convs do act
  _check("temporal decode", _apply(TINY_T, "decode")(params, latents), want)
  # temporal=False: the reference pipeline's num_frames=1, every frame alone.
  _check("per-frame decode", _apply(TINY_T, "decode", temporal=False)(params, latents), per_frame)


def test_zero_initialised_temporal_vae_equals_image_vae_per_frame(temporal_vae):
  # The reference zero-initialises the last conv of each temporal layer; ours does too.
  fresh = layers.TemporalConvLayer(num_layers=3).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 2, 1, 1, 32)))["params"]
  assert not np.any(nn.meta.unbox(fresh)["convs_11"]["kernel"])
  assert not np.any(nn.meta.unbox(fresh)["convs_11"]["bias"])
  # With those zeros (all else random) the temporal decoder is the image decoder per frame.
  params = vae_conv.vae_from_torch(temporal_vae[1], TINY_T)
  image_params = jax.tree.map(lambda x: x, params)
  for name, block in params["decoder"].items():
    for temp in [k for k in block if k.startswith("temp_convs")]:
      block[temp]["convs_11"] = jax.tree.map(np.zeros_like, block[temp]["convs_11"])
      del image_params["decoder"][name][temp]
  latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8, 4)).astype(np.float32)
  video = _apply(TINY_T, "decode")(params, latents)
  images = _apply(TINY, "decode")(image_params, latents)
  np.testing.assert_allclose(np.asarray(video), np.asarray(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temporal", [True, False])
def test_chunked_decode_equals_per_clip(temporal_vae, temporal):
  _, sd = temporal_vae
  params = vae_conv.vae_from_torch(sd, TINY_T)
  vae = vae_lib.AutoencoderKL(TINY_T)
  n = 4
  latents = np.random.default_rng(4).standard_normal((1, 3 * n + 2, 8, 8, 4)).astype(np.float32)
  got = jax.jit(functools.partial(vae_lib.decode_chunked, vae, chunk_frames=n,
                                  temporal=temporal))(params, latents)
  decode = _apply(TINY_T, "decode", temporal=temporal)
  want = np.concatenate(
      [np.asarray(decode(params, latents[:, s:s + n])) for s in range(0, latents.shape[1], n)],
      axis=1)
  _check(f"chunked decode (temporal={temporal})", got, want)


def test_round_trip_and_diffusers_loads_export(image_vae, temporal_vae):
  for config, (model, sd) in ((TINY, image_vae), (TINY_T, temporal_vae)):
    params = vae_conv.vae_from_torch(_legacy_names(sd), config)
    for legacy in (False, True):
      exported = vae_conv.vae_to_torch(params, config, legacy_attention_names=legacy)
      want = _legacy_names(sd) if legacy else sd
      assert set(exported) == set(want)
      for k, v in want.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
        assert exported[k].dtype == v.dtype
    exported = vae_conv.vae_to_torch(params, config)
    fresh = (ref.make_temporal_vae if config.temporal_decoder else TorchAutoencoderKL)(
        **_torch_config(config))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    assert vae_lib.AutoencoderKLConfig.from_diffusers(config.to_diffusers()) == config


def test_ldm_style_1x1_conv_attention(image_vae):
  model, sd = image_vae
  conv_sd = {k: (v[:, :, None, None] if ".attentions." in k and v.ndim == 2 else v)
             for k, v in _legacy_names(sd).items()}
  a = vae_conv.vae_from_torch(conv_sd, TINY)
  b = vae_conv.vae_from_torch(sd, TINY)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_conversion_errors_name_every_key(image_vae, temporal_vae):
  _, sd = image_vae
  bad = dict(sd)
  del bad["decoder.up_blocks.1.resnets.0.conv1.bias"]
  bad["decoder.up_blocks.1.extra.weight"] = np.zeros(3, np.float32)
  bad["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(ConversionError) as exc:
    vae_conv.vae_from_torch(bad, TINY)
  msg = str(exc.value)
  assert "1 missing key(s): decoder.up_blocks.1.resnets.0.conv1.bias" in msg
  assert "1 unexpected key(s): decoder.up_blocks.1.extra.weight" in msg
  assert "encoder.conv_in.weight: checkpoint (32, 3, 5, 5) vs model (32, 3, 3, 3)" in msg
  # A temporal checkpoint read as an image VAE: every temporal key is named, with a hint.
  with pytest.raises(ConversionError) as exc:
    vae_conv.vae_from_torch(temporal_vae[1], TINY)
  msg = str(exc.value)
  assert "decoder.up_blocks.0.temp_convs.1.convs.11.weight" in msg
  assert "temporal_decoder=True" in msg
  # And an image checkpoint read as a temporal VAE: the temporal keys are missing.
  with pytest.raises(ConversionError, match=r"missing key\(s\):.*temp_convs\.0\.convs\.3\.weight"):
    vae_conv.vae_from_torch(sd, TINY_T)
  # Both attention spellings at once.
  both = dict(sd, **{"encoder.mid_block.attentions.0.query.weight":
                     sd["encoder.mid_block.attentions.0.to_q.weight"]})
  with pytest.raises(ConversionError, match="spells these attention weights twice"):
    vae_conv.vae_from_torch(both, TINY)


def test_bad_inputs():
  vae = vae_lib.AutoencoderKL(TINY)
  with pytest.raises(ValueError, match="downsample factor 2"):
    vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 15, 16, 3)))
  with pytest.raises(ValueError, match=r"frames must be \[batch, frames, height, width, 3\]"):
    vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="only UpDecoderBlock2D"):
    vae_lib.AutoencoderKLConfig.from_diffusers({"up_block_types": ["AttnUpDecoderBlock2D"]})
  with pytest.raises(ValueError, match="32 groups"):
    vae_lib.AutoencoderKLConfig.tiny(temporal=True, block_out_channels=(16, 32),
                                     norm_num_groups=16)


@pytest.mark.full_size
def test_full_sd21_temporal_decoder_matches_reference():
  """SD2.1's VAE with VidRD's temporal decoder, release key names, 32x32 latents, 2 frames."""
  config = vae_lib.AutoencoderKLConfig.sd21(temporal=True)
  torch.manual_seed(0)
  model = ref.make_temporal_vae(**_torch_config(config)).eval()
  randomize_(model, seed=3)
  params = vae_conv.vae_from_torch(_legacy_names(numpy_state_dict(model)), config)
  b, f = 1, 2
  latents = np.random.default_rng(5).standard_normal((b, f, 32, 32, 4)).astype(np.float32)
  with torch.no_grad():
    want = _to_video(ref.temporal_decode(model, _to_torch(latents), num_frames=f), b, f)
  del model
  _check("full SD2.1 temporal decode", _apply(config, "decode")(params, latents), want)
