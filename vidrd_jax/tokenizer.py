"""SD2.1's text tokenizer, offline.

Stable Diffusion 2.1 tokenizes prompts with transformers' ``CLIPTokenizer`` (the OpenAI CLIP
byte-level BPE, 49408 entries) and pads every prompt to 77 tokens with ``"!"`` (id 0). We build
exactly that tokenizer from local ``vocab.json`` / ``merges.txt`` files. When no tokenizer folder
is at hand, :func:`write_tokenizer_files` derives the files from the BPE merge list that ships
inside the ``open_clip_torch`` wheel (``bpe_simple_vocab_16e6.txt.gz``), constructing the
vocabulary the same way OpenAI and Hugging Face did: the 256 byte-unicode characters, their
``</w>`` (end of word) forms, one entry per merge, then the two special tokens.

One deliberate difference from open_clip's own tokenizer: SD2.1 registers the pad token ``"!"``
as a special token, so transformers splits every ``"!"`` out of the text before BPE. ``"wow!!"``
becomes ``wow</w>, !, !`` (ids ..., 0, 0) here and in diffusers / the VidRD reference, where
open_clip produces a single merged ``!!</w>`` token. We follow transformers, because that is what
the released text encoder saw during training of SD2.1 and VidRD.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"
VOCAB_SIZE = 49408
# OpenAI's CLIP keeps the first 49152 - 256 - 2 merges of the file (the rest are unused).
NUM_MERGES = 49152 - 256 - 2

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

logger = logging.getLogger(__name__)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP byte -> printable unicode character table.

  BPE works on strings, so every byte gets a visible character; printable latin-1 bytes map to
  themselves and the others (whitespace, control) to code points from 256 upwards.
  """
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  codes = printable[:]
  n = 0
  all_bytes = printable[:]
  for b in range(256):
    if b not in printable:
      all_bytes.append(b)
      codes.append(256 + n)
      n += 1
  return dict(zip(all_bytes, (chr(c) for c in codes)))


def find_open_clip_bpe() -> str:
  """Path of open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip.

  Importing open_clip pulls in torchvision; we only need one data file from its folder.
  """
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the CLIP BPE merges file ships in the open_clip_torch wheel, which is not installed; "
        "run `pip install --no-deps open_clip_torch==3.3.0` or pass a tokenizer folder "
        "(vocab.json + merges.txt)")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, _BPE_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{_BPE_FILE} not found in open_clip's folder "
                          f"{list(spec.submodule_search_locations)}")


def write_tokenizer_files(out_dir: str, bpe_path: Optional[str] = None) -> str:
  """Writes an SD2.1-style tokenizer folder (vocab.json, merges.txt, configs) to ``out_dir``.

  Args:
    out_dir: destination folder (created if needed).
    bpe_path: the gzipped CLIP merge list; default: the one inside open_clip_torch.

  Returns:
    ``out_dir``.
  """
  bpe_path = bpe_path or find_open_clip_bpe()
  with gzip.open(bpe_path) as f:
    lines = f.read().decode("utf-8").split("\n")
  # Line 0 is a version header; OpenAI uses the next NUM_MERGES lines.
  merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{bpe_path} is not a CLIP BPE merge list "
                     f"(want {NUM_MERGES} merges of two symbols each)")
  byte_chars = list(_bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars]
  vocab += ["".join(m) for m in merges]
  vocab += [BOS_TOKEN, EOS_TOKEN]
  encoder = {tok: i for i, tok in enumerate(vocab)}
  if len(encoder) != VOCAB_SIZE:
    raise ValueError(f"derived vocabulary has {len(encoder)} entries, expected {VOCAB_SIZE}")

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(encoder, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.write("\n".join(" ".join(m) for m in merges) + "\n")

  _write_special_token_files(out_dir)
  return out_dir


def _write_special_token_files(out_dir: str, max_length: int = MAX_LENGTH) -> None:
  """special_tokens_map.json + tokenizer_config.json as in SD2.1's tokenizer folder."""
  special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
             "pad_token": PAD_TOKEN}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2)
  config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=max_length,
                do_lower_case=True, errors="replace", add_prefix_space=False)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


class Tokenizer:
  """Prompts -> ``np.int32 [B, 77]`` token ids, exactly as SD2.1's tokenizer pads them.

  ``<|startoftext|>``, the BPE tokens, ``<|endoftext|>``, then ``"!"`` (id 0) up to 77; prompts
  longer than 75 BPE tokens are cut (a warning names how many tokens were lost).
  """

  def __init__(self, hf_tokenizer, max_length: int = MAX_LENGTH):
    self.hf = hf_tokenizer
    self.max_length = max_length

  @classmethod
  def from_dir(cls, path: str, max_length: int = MAX_LENGTH) -> "Tokenizer":
    """Loads a tokenizer folder (SD2.1's ``tokenizer/`` or one written by write_tokenizer_files)."""
    from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

    for name in ("vocab.json", "merges.txt"):
      if not os.path.isfile(os.path.join(path, name)):
        raise FileNotFoundError(f"tokenizer folder {path!r} has no {name}")
    # SD2.1's special_tokens_map.json says pad "!"; pass it explicitly so that a folder whose
    # tokenizer_config.json says otherwise (SD2.1's says <|endoftext|>) still pads like SD2.1.
    hf = CLIPTokenizer.from_pretrained(path, pad_token=PAD_TOKEN, model_max_length=max_length,
                                       local_files_only=True)
    return cls(hf, max_length)

  @classmethod
  def from_open_clip_vocab(cls, cache_dir: str, max_length: int = MAX_LENGTH) -> "Tokenizer":
    """Writes the tokenizer files into ``cache_dir`` (once) and loads them."""
    if not os.path.isfile(os.path.join(cache_dir, "merges.txt")):
      write_tokenizer_files(cache_dir)
    return cls.from_dir(cache_dir, max_length)

  @property
  def pad_id(self) -> int:
    return int(self.hf.pad_token_id)

  def save(self, out_dir: str) -> None:
    """Writes an SD2.1-layout folder (vocab.json, merges.txt, configs) that from_dir reads."""
    os.makedirs(out_dir, exist_ok=True)
    # transformers 5's save_pretrained writes only tokenizer.json; the BPE model itself
    # writes the vocab.json / merges.txt pair every CLIPTokenizer version reads.
    self.hf.backend_tokenizer.model.save(out_dir)
    _write_special_token_files(out_dir, self.max_length)

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    """Tokenizes a batch of prompts.

    Args:
      prompts: B strings (a single string is treated as a batch of one).

    Returns:
      np.int32 [B, max_length].
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    if not prompts:
      return np.zeros((0, self.max_length), np.int32)
    ids = self.hf(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                  return_tensors="np")["input_ids"].astype(np.int32)
    # transformers drops the overflow silently with truncation=True; count it ourselves.
    lengths = [len(x) for x in self.hf(prompts, add_special_tokens=True,
                                       verbose=False)["input_ids"]]
    cut = [(i, n - self.max_length) for i, n in enumerate(lengths) if n > self.max_length]
    if cut:
      logger.warning(
          "%d prompt(s) longer than the text encoder's %d tokens were truncated: %s",
          len(cut), self.max_length,
          ", ".join(f"prompt {i} lost {n} token(s)" for i, n in cut))
    return ids
