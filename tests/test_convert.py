"""Checkpoint reading, LDM single-file mapping and the converter command lines.

References: diffusers' own single-file conversion functions (for the LDM names), the tiny
diffusers / transformers models of tests/fixtures.py (for outputs), and VidRD's temporal layers
re-created in tests/torch_reference (for the release). Budget: ~60 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from tests import fixtures as fx
from weight_conversion import ldm, torch_io
from weight_conversion.common import ConversionError


@pytest.fixture(scope="module")
def tiny_models():
  return fx.tiny_torch_models(0)


@pytest.fixture(scope="module")
def tiny_ldm():
  return fx.tiny_ldm_state_dict(0)


# ------------------------------------------------------------------------------ LDM key mapping


def _split(sd):
  return ldm.split_ldm_checkpoint(sd, fx.TINY_UNET_CONFIG, fx.TINY_VAE_CONFIG,
                                  fx.TINY_TEXT_CONFIG["num_hidden_layers"])


def test_ldm_split_equals_diffusers_single_file_conversion(tiny_models, tiny_ldm):
  from diffusers.loaders import single_file_utils as sfu
  unet, vae, text, _ = _split(tiny_ldm)
  checkpoint = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tiny_ldm.items()}
  theirs = {
      "unet": sfu.convert_ldm_unet_checkpoint(checkpoint, dict(fx.TINY_UNET_CONFIG)),
      "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, dict(fx.TINY_VAE_CONFIG)),
      "text": sfu.convert_open_clip_checkpoint(tiny_models.text_encoder, checkpoint),
  }
  theirs = {c: {k: v.numpy() for k, v in d.items()} for c, d in theirs.items()}
  # diffusers writes transformers-4 names and keeps what SD2.1 drops at full size only
  # (its ignore list names block 23 and the projection); compare on the model's own keys.
  theirs["text"] = {k[len("text_model."):] if k.startswith("text_model.") else k: v
                    for k, v in theirs["text"].items()}
  for name, mine, model in (("unet", unet, tiny_models.unet), ("vae", vae, tiny_models.vae),
                            ("text", text, tiny_models.text_encoder)):
    own = fx.numpy_state_dict(model)
    assert set(mine) == set(own), name
    assert set(own) <= set(theirs[name]), (name, sorted(set(own) - set(theirs[name]))[:5])
    for k in own:
      assert mine[k].shape == theirs[name][k].shape, k
      np.testing.assert_array_equal(mine[k], theirs[name][k], err_msg=k)
      np.testing.assert_array_equal(mine[k], own[k], err_msg=k)
  extra_text = sorted(set(theirs["text"]) - set(text))
  n = fx.TINY_TEXT_CONFIG["num_hidden_layers"]
  assert all(k.startswith(f"encoder.layers.{n}.") or k == "text_projection.weight"
             for k in extra_text), extra_text


def test_ldm_drops_exactly_what_sd21_does_not_use(tiny_ldm):
  _, _, _, dropped = _split(tiny_ldm)
  n = fx.TINY_TEXT_CONFIG["num_hidden_layers"]
  expected = {k for k in tiny_ldm
              if k.startswith(f"{ldm.TEXT_PREFIX}transformer.resblocks.{n}.")
              or k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "model_ema.decay",
                       "model_ema.num_updates", ldm.TEXT_PREFIX + "text_projection",
                       ldm.TEXT_PREFIX + "logit_scale")}
  assert set(dropped) == expected


def test_ldm_join_inverts_split(tiny_ldm):
  unet, vae, text, dropped = _split(tiny_ldm)
  back = ldm.join_ldm_checkpoint(unet, vae, text, fx.TINY_UNET_CONFIG, fx.TINY_VAE_CONFIG)
  kept = {k: v for k, v in tiny_ldm.items() if k not in set(dropped)}
  assert set(back) == set(kept)
  for k, v in kept.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # The VAE's mid attention is stored as 1x1 convs in LDM files, linear in diffusers.
  q = ldm.VAE_PREFIX + "decoder.mid.attn_1.q.weight"
  assert tiny_ldm[q].ndim == 4 and vae["decoder.mid_block.attentions.0.to_q.weight"].ndim == 2


def test_ldm_extract_ema(tiny_ldm):
  sd = dict(tiny_ldm)
  for k in list(sd):
    if k.startswith(ldm.UNET_PREFIX):
      ema_name = "model_ema.diffusion_model" + k[len(ldm.UNET_PREFIX):].replace(".", "")
      sd[ema_name] = sd[k] + 1.0
  unet, _, _, _ = ldm.split_ldm_checkpoint(sd, fx.TINY_UNET_CONFIG, fx.TINY_VAE_CONFIG, 2,
                                           extract_ema=True)
  plain, _, _, _ = _split(tiny_ldm)
  for k in plain:
    np.testing.assert_array_equal(unet[k], plain[k] + 1.0)
  with pytest.raises(ConversionError, match="no model_ema"):
    ldm.split_ldm_checkpoint(tiny_ldm, fx.TINY_UNET_CONFIG, fx.TINY_VAE_CONFIG, 2,
                             extract_ema=True)


def test_ldm_unknown_keys_surface_under_their_own_names(tiny_ldm):
  sd = dict(tiny_ldm, **{"model.diffusion_model.input_blocks.1.7.weight": np.zeros(3, np.float32),
                         "something_else": np.zeros(1, np.float32)})
  unet, _, _, _ = _split(sd)
  assert "model.diffusion_model.input_blocks.1.7.weight" in unet and "something_else" in unet
  with pytest.raises(ConversionError, match="no 'model.diffusion_model"):
    ldm.split_ldm_checkpoint({"a": np.zeros(1)}, fx.TINY_UNET_CONFIG, fx.TINY_VAE_CONFIG, 2)


# ------------------------------------------------------------------------------ reading files


def test_safetensors_and_pickles_read_bit_exact(tmp_path):
  sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64), "d": torch.randn(2).half()}
  from safetensors.torch import save_file
  save_file(sd, str(tmp_path / "w.safetensors"))
  torch.save(sd, str(tmp_path / "w.bin"))
  torch.save({"state_dict": sd, "global_step": 7, "epoch": 1,
              "hyper_parameters": {"lr": 1e-4, "name": "x"}}, str(tmp_path / "w.ckpt"))
  for name in ("w.safetensors", "w.bin", "w.ckpt"):
    got = torch_io.load_state_dict(str(tmp_path / name))
    assert set(got) == set(sd), name
    for k, v in sd.items():
      back = torch_io.numpy_to_tensor(got[k])
      assert back.dtype == v.dtype, (name, k)
      assert torch.equal(back, v), (name, k)


class _RunsCode:
  """Pickles to a call of os.system, as a booby-trapped checkpoint would."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip_lightning", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, layout):
  marker = tmp_path / "code_ran"
  path = str(tmp_path / "ModelT2V.pth")
  if layout == "zip_lightning":
    torch.save({"state_dict": {"unet.w": torch.ones(2)}, "callbacks": _RunsCode(marker)}, path)
  else:
    with open(path, "wb") as f:
      pickle.dump({"state_dict": {"unet.w": np.ones(2)}, "x": _RunsCode(marker)}, f)
  with pytest.raises(torch_io.UnsafeCheckpointError) as info:
    torch_io.load_state_dict(path)
  message = str(info.value)
  assert "arbitrary code" in message and "system" in message and "weights_only=True" in message
  assert not marker.exists()


def test_wrong_path_unknown_format_and_garbage(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    torch_io.load_state_dict(str(tmp_path / "nope.safetensors"))
  (tmp_path / "weights.npz").write_bytes(b"PK")
  with pytest.raises(ConversionError, match="unknown checkpoint format"):
    torch_io.load_state_dict(str(tmp_path / "weights.npz"))
  (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
  with pytest.raises(ConversionError, match="not a readable safetensors"):
    torch_io.load_state_dict(str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConversionError, match="directory"):
    torch_io.load_state_dict(str(tmp_path))


def test_component_folder_prefers_safetensors(tmp_path):
  folder = tmp_path / "unet"
  folder.mkdir()
  torch.save({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.bin"))
  assert torch_io.find_component_weights(str(folder)).endswith(".bin")
  from safetensors.torch import save_file
  save_file({"w": torch.ones(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
  assert torch_io.find_component_weights(str(folder)).endswith(".safetensors")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConversionError, match="no weights in"):
    torch_io.find_component_weights(str(empty))
