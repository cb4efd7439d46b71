"""Text encoder parity: vidrd_jax CLIPTextModel vs transformers' CLIPTextModel (random weights)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from vidrd_jax.models import text_encoder as te
from weight_conversion import text_encoder as te_conv
from weight_conversion.common import ConversionError


def _torch_model(config: te.CLIPTextConfig, seed: int = 0) -> transformers.CLIPTextModel:
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_hf())).eval()
  # Randomise every parameter: default init leaves norms at 1 and biases at 0, which would
  # hide a swapped scale/bias or a dropped bias.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "embedding" in name:
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.05)
  return model


def _state_dict_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _compare(config, model, sd, batch=2, seed=0):
  ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, 77)).astype(np.int32)
  ids[:, 0] = 49406
  ids[:, 10:] = 0  # SD2.1-style "!" padding after a short prompt
  ids[:, 9] = 49407
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  params = te_conv.text_encoder_from_torch(sd, config)
  got = np.asarray(jax.jit(te.CLIPTextModel(config).apply)({"params": params}, jnp.asarray(ids)))
  err = float(np.abs(got - want).max())
  std = float(want.std())
  print(f"text encoder {config.num_hidden_layers} layers: max abs err {err:.3g}, "
        f"std {std:.3g}, ratio {err / std:.3g}")
  assert got.shape == want.shape == (batch, 77, config.hidden_size)
  assert err <= 1e-4 * std
  return params


@pytest.fixture(scope="module")
def tiny():
  config = te.CLIPTextConfig.tiny()
  model = _torch_model(config)
  return config, model, _state_dict_np(model)


def test_tiny_matches_transformers_new_names(tiny):
  config, model, sd = tiny
  assert not any(k.startswith("text_model.") for k in sd)  # transformers 5 spelling
  _compare(config, model, sd)


def test_tiny_matches_transformers_old_names(tiny):
  config, model, sd = tiny
  # transformers 4.x spelling, as in the SD2.1 and VidRD releases.
  old = {"text_model." + k: v for k, v in sd.items()}
  old["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  _compare(config, model, old)


def test_quick_gelu():
  config = te.CLIPTextConfig.tiny(hidden_act="quick_gelu", layer_norm_eps=1e-6)
  model = _torch_model(config, seed=1)
  _compare(config, model, _state_dict_np(model))


def test_round_trip_and_transformers_loads_export(tiny, tmp_path):
  config, model, sd = tiny
  params = te_conv.text_encoder_from_torch(sd, config)
  exported = te_conv.text_encoder_to_torch(params, config)
  assert set(exported) == {"text_model." + k for k in sd}
  for k, v in sd.items():
    np.testing.assert_array_equal(exported["text_model." + k], v)
    assert exported["text_model." + k].dtype == v.dtype
  # Params straight from init (boxed with logical axes) export too.
  init = te.CLIPTextModel(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
  assert set(te_conv.text_encoder_to_torch(init["params"], config)) == set(exported)

  safetensors.numpy.save_file(exported, os.path.join(tmp_path, "model.safetensors"))
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(config.to_hf(), f)
  loaded, info = transformers.CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids = torch.randint(0, config.vocab_size, (1, 77))
  with torch.no_grad():
    np.testing.assert_array_equal(loaded(ids).last_hidden_state.numpy(),
                                  model(ids).last_hidden_state.numpy())
  assert te.CLIPTextConfig.from_hf(loaded.config.to_dict()) == config


def test_config_presets():
  h = te.CLIPTextConfig.openclip_h()
  assert (h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.intermediate_size,
          h.max_position_embeddings, h.vocab_size, h.hidden_act) == (
              1024, 23, 16, 4096, 77, 49408, "gelu")
  assert te.CLIPTextConfig.from_hf(h.to_hf()) == h
  with pytest.raises(ValueError, match="hidden_act"):
    te.CLIPTextConfig.tiny(hidden_act="relu")


def test_conversion_errors_name_every_key(tiny):
  config, _, sd = tiny
  bad = dict(sd)
  del bad["encoder.layers.1.mlp.fc2.bias"]
  bad["encoder.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  bad["final_layer_norm.weight"] = np.zeros(7, np.float32)
  with pytest.raises(ConversionError) as exc:
    te_conv.text_encoder_from_torch(bad, config)
  msg = str(exc.value)
  assert "missing" in msg and "encoder.layers.1.mlp.fc2.bias" in msg
  assert "unexpected" in msg and "encoder.layers.0.self_attn.extra.weight" in msg
  assert "final_layer_norm.weight: checkpoint (7,) vs model (32,)" in msg


def test_bad_input_ids(tiny):
  config, _, _ = tiny
  model = te.CLIPTextModel(config)
  with pytest.raises(ValueError, match="more than the 77 position embeddings"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 78), jnp.int32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((77,), jnp.int32))


@pytest.mark.full_size
def test_full_openclip_h_matches_transformers():
  """The real SD2.1 parameter set (340M parameters), random weights, batch 1."""
  config = te.CLIPTextConfig.openclip_h()
  model = _torch_model(config)
  sd = _state_dict_np(model)
  # Old (4.x) names, as the release files have them.
  old = {"text_model." + k: v for k, v in sd.items()}
  _compare(config, model, old, batch=1)
