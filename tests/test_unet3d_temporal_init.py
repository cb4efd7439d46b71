"""UNet3DConfig.temporal_init_scale: zero (the paper's) vs small non-zero temporal output layers.

Budget: < 30 s on 2 CPU cores.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidrd_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig, init_params
from weight_conversion.common import flatten


def _temporal_out_kernels(params) -> dict[str, np.ndarray]:
  flat = flatten(nn.unbox(params))
  out = {}
  for name, value in flat.items():
    if name.endswith("temp_attn/to_out_0/kernel") or name.endswith("temp_transformer/proj_out/kernel"):
      out[name] = np.asarray(value)
    elif "temp_convs_" in name and name.endswith("convs_15/kernel"):   # the 4th (last) conv
      out[name] = np.asarray(value)
  return out


def _cfg(**kw) -> UNet3DConfig:
  return UNet3DConfig.tiny(add_temp_transformer=True, temp_conv_dropout=0.0, **kw)


def test_default_is_zero_init():
  assert UNet3DConfig().temporal_init_scale == 0.0
  kernels = _temporal_out_kernels(init_params(_cfg(), jax.random.PRNGKey(0)))
  # Every kind is present: temporal attention, temporal convs, the temporal transformer.
  assert any("temp_attn" in k for k in kernels)
  assert any("temp_convs_" in k for k in kernels)
  assert any("temp_transformer" in k for k in kernels)
  assert all(not v.any() for v in kernels.values())


def test_nonzero_scale_starts_small_and_changes_the_output():
  scale = 0.1
  p0 = init_params(_cfg(), jax.random.PRNGKey(0))
  p1 = init_params(_cfg(temporal_init_scale=scale), jax.random.PRNGKey(0))
  k1 = _temporal_out_kernels(p1)
  for name, v in k1.items():
    fan_in = int(np.prod(v.shape[:-1]))
    std = float(v.std())
    # LeCun normal (std 1/sqrt(fan_in), truncated) x scale.
    assert 0.5 * scale / np.sqrt(fan_in) < std < 1.5 * scale / np.sqrt(fan_in), (name, std, fan_in)
  # Every other parameter is initialised exactly as with the default.
  f0, f1 = flatten(nn.unbox(p0)), flatten(nn.unbox(p1))
  assert f0.keys() == f1.keys()
  for name in f0:
    if name not in k1:
      np.testing.assert_array_equal(np.asarray(f0[name]), np.asarray(f1[name]), err_msg=name)

  # With zero temporal outputs, identical frames stay identical (no frame sees its neighbours);
  # with the small start, the temporal layers act from step 0.
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 8, 8, 4))
  ctx = jnp.zeros((1, 3, _cfg().cross_attention_dim))
  y0 = UNet3DConditionModel(_cfg()).apply({"params": p0}, x, jnp.array([10]), ctx)
  y1 = UNet3DConditionModel(_cfg(temporal_init_scale=scale)).apply({"params": p1}, x, jnp.array([10]), ctx)
  diff = float(jnp.abs(y1 - y0).max())
  assert 1e-4 < diff < 0.5 * float(jnp.abs(y0).max()), diff


def test_init_only_and_validated():
  cfg = _cfg(temporal_init_scale=0.1)
  # An initialisation setting: not part of the saved architecture.
  assert "temporal_init_scale" not in cfg.to_diffusers()
  assert UNet3DConfig.from_diffusers(cfg.to_diffusers()).temporal_init_scale == 0.0
  with pytest.raises(ValueError, match="temporal_init_scale"):
    _cfg(temporal_init_scale=-1.0)
