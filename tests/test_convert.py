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


SD21_768_UNET = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, upcast_attention=True,
    use_linear_projection=True)
SD21_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=768,
                up_block_types=["UpDecoderBlock2D"] * 4)
SD21_TEXT = dict(hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                 num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
                 vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)


def test_ldm_mapping_on_the_full_sd21_parameter_set():
  """Names and shapes at SD2.1-768 size (meta tensors: no memory), with the configs convert_sd
  uses for a single file, against diffusers' models and its single-file conversion."""
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from diffusers.loaders import single_file_utils as sfu
  from transformers import CLIPTextConfig, CLIPTextModel
  from vidrd_jax.models.text_encoder import CLIPTextConfig as OurTextConfig
  from vidrd_jax.models.unet3d import UNet3DConfig
  from vidrd_jax.models.vae import AutoencoderKLConfig
  with torch.device("meta"):
    models = {"unet": UNet2DConditionModel(**SD21_768_UNET), "vae": AutoencoderKL(**SD21_VAE),
              "text": CLIPTextModel(CLIPTextConfig(**SD21_TEXT))}
  truth = {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in models.items()}
  unet_cfg = UNet3DConfig.sd21_768().to_diffusers(include_temporal=False)
  vae_cfg = AutoencoderKLConfig.sd21(sample_size=768).to_diffusers()
  n_text = OurTextConfig.openclip_h().num_hidden_layers
  assert n_text == 23

  def shaped(shapes):   # zero-stride stand-ins: the mapping only looks at names and shapes
    return {k: np.broadcast_to(np.zeros((), np.bool_), s) for k, s in shapes.items()}

  single = ldm.join_ldm_checkpoint(shaped(truth["unet"]), shaped(truth["vae"]),
                                   shaped(truth["text"]), unet_cfg, vae_cfg)
  # The released file also has OpenCLIP's 24th block, its projection and the schedule.
  block0 = ldm.TEXT_PREFIX + "transformer.resblocks.0."
  single.update(shaped({ldm.TEXT_PREFIX + "transformer.resblocks.23." + k[len(block0):]: v.shape
                        for k, v in single.items() if k.startswith(block0)}))
  single.update(shaped({ldm.TEXT_PREFIX + "text_projection": (1024, 1024),
                        ldm.TEXT_PREFIX + "logit_scale": (), "betas": (1000,)}))
  unet, vae, text, dropped = ldm.split_ldm_checkpoint(single, unet_cfg, vae_cfg, n_text)
  assert len(dropped) == 12 + 3
  for name, mine in (("unet", unet), ("vae", vae), ("text", text)):
    assert {k: tuple(v.shape) for k, v in mine.items()} == truth[name], name
  meta = {k: torch.empty(v.shape, device="meta") for k, v in single.items()}
  theirs = {
      "unet": sfu.convert_ldm_unet_checkpoint(meta, SD21_768_UNET),
      "vae": sfu.convert_ldm_vae_checkpoint(meta, SD21_VAE),
      "text": {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in
               sfu.convert_open_clip_checkpoint(models["text"], meta).items()},
  }
  for name in theirs:
    assert {k: tuple(v.shape) for k, v in theirs[name].items()} == truth[name], name
  assert sum(int(np.prod(s)) for s in truth["unet"].values()) == 865_910_724


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


# ------------------------------------------------------------------------------ converter CLIs


def _exported(pipe_dir):
  """Converted params mapped back to PyTorch names (numpy), per component."""
  import jax
  import vidrd_jax
  from weight_conversion.text_encoder import text_encoder_to_torch
  from weight_conversion.unet import unet_to_torch
  from weight_conversion.vae import vae_to_torch
  pipe = vidrd_jax.load_pipeline(pipe_dir)
  params = jax.tree.map(np.asarray, pipe.params)
  return pipe, {
      "unet": unet_to_torch(params["unet"], pipe.unet.config),
      "vae": vae_to_torch(params["vae"], pipe.vae.config),
      "text_encoder": text_encoder_to_torch(params["text_encoder"], pipe.text_encoder.config,
                                            prefix=""),
  }


def _assert_weights_equal(got: dict, want: dict, what: str, cast=None):
  missing = sorted(set(want) - set(got))
  assert not missing, (what, missing[:5])
  for k, v in want.items():
    v = np.asarray(v if cast is None else np.asarray(v).astype(cast))
    assert got[k].dtype == v.dtype, (what, k, got[k].dtype, v.dtype)
    np.testing.assert_array_equal(got[k], v, err_msg=f"{what}: {k}")


def _no_leftovers(parent, expected):
  assert sorted(os.listdir(parent)) == sorted(expected), os.listdir(parent)


@pytest.fixture(scope="module")
def old_sd_folder(tmp_path_factory):
  return fx.make_tiny_sd_folder(str(tmp_path_factory.mktemp("old") / "sd"), seed=0,
                                old_names=True, prediction_type="v_prediction")


def test_convert_sd_cli_2023_spellings(old_sd_folder, tiny_models, tmp_path, capsys):
  from weight_conversion import convert_sd
  out = str(tmp_path / "out")
  assert convert_sd.main(["--src", old_sd_folder, "--dst", out]) == 0
  log = capsys.readouterr().err
  assert "summary:" in log and "total" in log and "parameters" in log
  assert "diffusion_pytorch_model.safetensors" in log    # preferred over the decoy .bin
  pipe, got = _exported(out)
  assert pipe.prediction_type == "v_prediction"           # from the source's scheduler config
  # Bit-exact weights; the UNet's extra tensors are the (new) temporal layers only.
  _assert_weights_equal(got["unet"], fx.numpy_state_dict(tiny_models.unet), "unet")
  assert all("temp_" in k for k in set(got["unet"]) - set(tiny_models.unet.state_dict()))
  _assert_weights_equal(got["vae"], fx.numpy_state_dict(tiny_models.vae), "vae")
  _assert_weights_equal(got["text_encoder"], fx.numpy_state_dict(tiny_models.text_encoder), "text")


def test_convert_sd_cli_ldm_single_file(old_sd_folder, tiny_models, tmp_path, capsys):
  from weight_conversion import convert_sd
  ckpt = fx.make_tiny_ldm_file(str(tmp_path / "v2-1_tiny.ckpt"), seed=0)
  out = str(tmp_path / "out")
  assert convert_sd.main(["--src", ckpt, "--dst", out, "--model-config", old_sd_folder,
                          "--dtype", "bfloat16"]) == 0
  log = capsys.readouterr().err
  assert "left out on purpose: 19 tensors" in log and "epsilon assumed" in log
  pipe, got = _exported(out)
  assert pipe.prediction_type == "epsilon"     # latent size 8, not SD2.1-768's 96
  assert pipe.info["source_kind"] == "ldm-single-file" and pipe.info["dtype"] == "bfloat16"
  import ml_dtypes
  for name, model in (("unet", tiny_models.unet), ("vae", tiny_models.vae),
                      ("text_encoder", tiny_models.text_encoder)):
    _assert_weights_equal(got[name], fx.numpy_state_dict(model), name, cast=ml_dtypes.bfloat16)


def test_prediction_type_defaults_and_override(tmp_path):
  from weight_conversion import convert_sd
  assert convert_sd.default_prediction_type(96) == "v_prediction"
  assert convert_sd.default_prediction_type(64) == "epsilon"
  assert convert_sd.default_prediction_type(32) == "epsilon"
  with pytest.raises(ValueError, match="prediction-type"):
    convert_sd.convert_sd(str(tmp_path), str(tmp_path / "o"), prediction_type="sample")


def test_convert_vidrd_and_export_round_trip(tmp_path, capsys):
  from weight_conversion import convert_sd, convert_vidrd
  paths = fx.make_tiny_vidrd_release(str(tmp_path / "release"), seed=0)
  out = str(tmp_path / "out")
  assert convert_vidrd.main(["--sd", paths["sd"], "--unet-ckpt", paths["unet_ckpt"],
                             "--vae", paths["vae"], "--dst", out]) == 0
  log = capsys.readouterr().err
  assert "clip.* (2)" in log and "vae.* (1)" in log       # what the reference ignores too
  refs = fx.tiny_vidrd_torch_models(0)
  pipe, got = _exported(out)
  assert pipe.has_temporal_decoder and pipe.unet.config.add_temp_conv
  _assert_weights_equal(got["unet"], fx.numpy_state_dict(refs.unet), "unet")
  assert set(got["unet"]) == set(refs.unet.state_dict())
  _assert_weights_equal(got["vae"], fx.numpy_state_dict(refs.vae), "vae")
  _assert_weights_equal(got["text_encoder"], fx.numpy_state_dict(refs.text_encoder), "text")

  # Export to diffusers layout, convert again: bit-identical parameters.
  exported = str(tmp_path / "torch")
  assert convert_vidrd.main(["--to-torch", out, "--dst", exported]) == 0
  for rel in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json",
              "vae/diffusion_pytorch_model.safetensors", "vae/config.json",
              "text_encoder/model.safetensors", "text_encoder/config.json",
              "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
    assert os.path.isfile(os.path.join(exported, rel)), rel
  unet_file = torch_io.load_state_dict(os.path.join(exported, "unet",
                                                    "diffusion_pytorch_model.safetensors"))
  _assert_weights_equal(unet_file, fx.numpy_state_dict(refs.unet), "exported unet")
  from transformers import CLIPTextModel
  hf = CLIPTextModel.from_pretrained(os.path.join(exported, "text_encoder"))
  _assert_weights_equal(fx.numpy_state_dict(hf), fx.numpy_state_dict(refs.text_encoder),
                        "exported text encoder, loaded by transformers")
  again = str(tmp_path / "again")
  assert convert_sd.main(["--src", exported, "--dst", again]) == 0
  import jax
  import vidrd_jax
  a = jax.tree_util.tree_leaves_with_path(vidrd_jax.load_pipeline(out).params)
  b = jax.tree_util.tree_leaves_with_path(vidrd_jax.load_pipeline(again).params)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_bad_checkpoints_list_every_problem_and_write_nothing(tmp_path, capsys):
  import shutil
  from weight_conversion import convert_sd
  src = fx.make_tiny_sd_folder(str(tmp_path / "sd"), seed=0)
  unet_file = os.path.join(src, "unet", "diffusion_pytorch_model.safetensors")
  unet = torch_io.load_state_dict(unet_file)
  del unet["down_blocks.0.resnets.0.conv1.weight"]                  # missing
  unet["down_blocks.0.resnets.0.conv9.weight"] = np.zeros(3, np.float32)   # unexpected
  unet["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)      # wrong shape
  torch_io.save_safetensors(unet_file, unet)
  vae_file = os.path.join(src, "vae", "diffusion_pytorch_model.safetensors")
  vae = torch_io.load_state_dict(vae_file)
  vae["decoder.extra.weight"] = np.zeros(1, np.float32)
  torch_io.save_safetensors(vae_file, vae)
  out = tmp_path / "out"
  with pytest.raises(ConversionError) as info:
    convert_sd.convert_sd(src, str(out), log=lambda _: None)
  message = str(info.value)
  for expected in ("missing key(s): down_blocks.0.resnets.0.conv1.weight",
                   "unexpected key(s): down_blocks.0.resnets.0.conv9.weight",
                   "conv_in.weight: checkpoint (32, 4, 5, 5) vs model (32, 4, 3, 3)",
                   "vae checkpoint", "decoder.extra.weight"):
    assert expected in message, (expected, message)
  _no_leftovers(tmp_path, ["sd"])
  # The command line says the same and exits 1.
  assert convert_sd.main(["--src", src, "--dst", str(out)]) == 1
  assert "error: unet checkpoint does not match" in capsys.readouterr().err
  _no_leftovers(tmp_path, ["sd"])
  # Missing pieces of a diffusers folder are named.
  shutil.rmtree(os.path.join(src, "text_encoder"))
  with pytest.raises(ConversionError, match="missing subfolder.*text_encoder"):
    convert_sd.convert_sd(src, str(out), log=lambda _: None)


def test_wrong_paths_and_formats_on_the_command_line(tmp_path, capsys):
  from weight_conversion import convert_sd, convert_vidrd
  out = str(tmp_path / "out")
  assert convert_sd.main(["--src", str(tmp_path / "missing.safetensors"), "--dst", out]) == 1
  assert "not found" in capsys.readouterr().err
  (tmp_path / "model.onnx").write_bytes(b"\x08\x01")
  assert convert_sd.main(["--src", str(tmp_path / "model.onnx"), "--dst", out]) == 1
  assert "unknown checkpoint format" in capsys.readouterr().err
  from safetensors.numpy import save_file
  save_file({"conv_in.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "unet.safetensors"))
  assert convert_sd.main(["--src", str(tmp_path / "unet.safetensors"), "--dst", out]) == 1
  assert "not a single-file (CompVis/LDM)" in capsys.readouterr().err
  assert convert_sd.main(["--to-torch", str(tmp_path), "--dst", out]) == 1
  assert "not a complete vidrd-jax pipeline directory" in capsys.readouterr().err
  assert convert_vidrd.main(["--sd", str(tmp_path), "--unet-ckpt", str(tmp_path / "x.pth"),
                             "--vae", str(tmp_path), "--dst", out]) == 1
  assert "--unet-ckpt not found" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_convert_vidrd_refuses_code_in_the_checkpoint(tmp_path):
  from weight_conversion import convert_vidrd
  paths = {"sd": str(tmp_path / "sd"), "vae": str(tmp_path / "vae")}
  for p in paths.values():
    os.makedirs(os.path.join(p, "unet"))
    os.makedirs(os.path.join(p, "text_encoder"))
    for sub in ("unet", "text_encoder"):
      with open(os.path.join(p, sub, "config.json"), "w") as f:
        f.write("{}")
  marker = tmp_path / "code_ran"
  ckpt = str(tmp_path / "ModelT2V.pth")
  torch.save({"state_dict": {"unet.conv_in.weight": torch.ones(2)},
              "hyper_parameters": _RunsCode(marker)}, ckpt)
  with pytest.raises(torch_io.UnsafeCheckpointError, match="arbitrary code"):
    convert_vidrd.convert_vidrd(paths["sd"], ckpt, paths["vae"], str(tmp_path / "out"),
                                log=lambda _: None)
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_lightning_bookkeeping_classes_become_inert_placeholders(tmp_path, monkeypatch):
  """A ModelT2V.pth whose hyper-parameters are Lightning / omegaconf objects still loads, and
  their classes are never imported or run; weights must still be plain tensors."""
  import sys
  import types
  calls = []

  class AttributeDict(dict):
    def __setstate__(self, state):
      calls.append("AttributeDict.__setstate__")

  class DictConfig:
    def __init__(self, content):
      self.content = content

    def __setstate__(self, state):
      calls.append("DictConfig.__setstate__")
      self.__dict__.update(state)

  fake = {"pytorch_lightning.utilities.parsing": AttributeDict, "omegaconf.dictconfig": DictConfig}
  for module_name, cls in fake.items():
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):   # parents too: pickle imports the module by name
      monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module_name], cls.__name__, cls)
    cls.__module__, cls.__qualname__ = module_name, cls.__name__
  path = str(tmp_path / "ModelT2V.pth")
  weights = {"unet.w": torch.randn(3), "text_encoder.b": torch.randn(2)}
  hp = AttributeDict(lr=1e-4, resolution=256)
  torch.save({"state_dict": weights, "hyper_parameters": hp,
              "cfg": DictConfig({"model": {"add_temp_conv": True}})}, path)
  bad = str(tmp_path / "bad.pth")
  torch.save({"state_dict": {"unet.w": DictConfig({})}}, bad)
  monkeypatch.undo()   # the classes are gone, as on a machine without Lightning
  got = torch_io.load_state_dict(path)
  assert set(got) == set(weights)
  for k, v in weights.items():
    np.testing.assert_array_equal(got[k], v.numpy())
  with pytest.raises(torch_io.UnsafeCheckpointError, match="not tensors"):
    torch_io.load_state_dict(bad)
  assert calls == []
