"""Tokenizer parity: our SD2.1 tokenizer vs open_clip's and transformers' CLIP tokenizers."""

import importlib.util
import json
import logging
import os

import numpy as np
import pytest

from vidrd_jax import tokenizer as tokenizer_lib

PROMPTS = [
    "a red ball",
    "",
    "A Boat is sailing   in a LAKE, at sunset.",
    "wood on fire; sparks (lots of them) -- 4k, hd #cinematic @night",
    "a café in Zürich, naïve façade",
    "東京の夜景 and a 🐱 emoji",
    "don't stop: it's 3:45pm, we're 100% sure",
    " ".join(["an astronaut riding a horse on the moon"] * 12),  # > 77 tokens
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return tokenizer_lib.write_tokenizer_files(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tokenizer_lib.Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
  # open_clip's package __init__ imports torchvision (broken here): load only tokenizer.py.
  spec = importlib.util.find_spec("open_clip")
  path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
  module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def test_vocab_files(tok_dir):
  with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  assert len(vocab) == tokenizer_lib.VOCAB_SIZE
  assert vocab["!"] == 0 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  with open(os.path.join(tok_dir, "special_tokens_map.json")) as f:
    assert json.load(f)["pad_token"] == "!"
  with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
    assert json.load(f)["model_max_length"] == 77


def test_matches_open_clip(tok, open_clip_tokenizer):
  ours = tok(PROMPTS)
  assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
  theirs = open_clip_tokenizer(PROMPTS, context_length=77).numpy()
  # open_clip pads with 0 after <end_of_text>; SD2.1 pads with "!" whose id is also 0.
  np.testing.assert_array_equal(ours, theirs)
  # The empty prompt is just <|startoftext|> <|endoftext|> then padding.
  np.testing.assert_array_equal(ours[1, :3], [49406, 49407, 0])


def test_exclamation_is_split_out(tok, open_clip_tokenizer):
  # "!" is SD2.1's pad token and therefore special: transformers splits it out of words, so
  # "wow!!" ends in two pad-id tokens where open_clip merges "!!" into one BPE token.
  # We follow transformers (diffusers and the VidRD reference tokenize this way).
  ours = tok(["wow!!"])[0]
  theirs = open_clip_tokenizer(["wow!!"], context_length=77).numpy()[0]
  wow = open_clip_tokenizer.encoder["wow</w>"]
  bangbang = open_clip_tokenizer.encoder["!!</w>"]
  np.testing.assert_array_equal(ours[:5], [49406, wow, 0, 0, 49407])
  np.testing.assert_array_equal(theirs[:4], [49406, wow, bangbang, 49407])


def test_matches_transformers_from_same_files(tok, tok_dir):
  from transformers import CLIPTokenizer
  hf = CLIPTokenizer(vocab=os.path.join(tok_dir, "vocab.json"),
                     merges=os.path.join(tok_dir, "merges.txt"), pad_token="!")
  prompts = PROMPTS + ["wow!!", "hello!world"]
  theirs = hf(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(tok(prompts), np.asarray(theirs))


def test_truncation_warns_once_with_count(tok, caplog):
  long_prompt = "word " * 100  # 100 BPE tokens + bos + eos = 102
  with caplog.at_level(logging.WARNING, logger=tokenizer_lib.__name__):
    ids = tok([long_prompt, "short", long_prompt])
  records = [r for r in caplog.records if r.name == tokenizer_lib.__name__]
  assert len(records) == 1
  assert "prompt 0 lost 25 token(s)" in records[0].getMessage()
  assert "prompt 2 lost 25 token(s)" in records[0].getMessage()
  assert ids[0, -1] == 49407 and ids[0, -2] != 49407


def test_save_reloads_identically(tok, tok_dir, tmp_path):
  tok.save(str(tmp_path))
  with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as a, open(
      os.path.join(tmp_path, "vocab.json"), encoding="utf-8") as b:
    assert json.load(a) == json.load(b)
  with open(os.path.join(tok_dir, "merges.txt"), "rb") as a, open(
      os.path.join(tmp_path, "merges.txt"), "rb") as b:
    assert a.read() == b.read()
  again = tokenizer_lib.Tokenizer.from_dir(str(tmp_path))
  prompts = PROMPTS + ["wow!!"]
  np.testing.assert_array_equal(again(prompts), tok(prompts))


def test_bad_input(tok, tmp_path):
  with pytest.raises(TypeError, match="prompts must be strings"):
    tok(["ok", 3])
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tokenizer_lib.Tokenizer.from_dir(str(tmp_path))
