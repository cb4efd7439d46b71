"""Reading and writing PyTorch checkpoints as flat ``{name: np.ndarray}`` dicts.

Formats: ``.safetensors`` (preferred wherever both exist), and the pickle formats ``.bin`` /
``.pth`` / ``.pt`` / ``.ckpt``. A pickle can name any Python callable and have the unpickler call
it, so opening one the ordinary way runs whatever code its author chose. Pickles are therefore
only ever opened with ``torch.load(..., weights_only=True)``, whose unpickler accepts tensors,
containers and plain values and nothing else; a file that needs anything more is refused with a
message naming what it asked for. One exception keeps training checkpoints readable: when the
only extra names are training bookkeeping (Lightning's hyper-parameter and callback classes,
omegaconf configs; INERT_GLOBAL_PREFIXES), those objects are rebuilt as inert placeholders of
our own class, so nothing from the file is imported or called. PyTorch Lightning checkpoints
keep the weights under ``state_dict``; that entry is taken.

bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (bit-exact); everything else keeps
its dtype.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from typing import Mapping

import numpy as np

from weight_conversion.common import ConversionError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# File names diffusers / transformers write for one component, most preferred first. Sharded
# checkpoints are found through their index files.
COMPONENT_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)
CONFIG_NAMES = ("config.json", "scheduler_config.json")
logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ConversionError):
  """A pickle checkpoint needs arbitrary code to be unpickled; we refuse to run it."""


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - torch is a conversion-time dependency
    raise ImportError(
        "Reading PyTorch checkpoints needs torch (CPU build is enough): pip install torch") from e
  return torch


def tensor_to_numpy(t) -> np.ndarray:
  """torch.Tensor -> np.ndarray with the same dtype (bfloat16 via ml_dtypes, bit-exact)."""
  torch = _torch()
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    # NumPy has no bfloat16; reinterpret the raw 16 bits so no rounding happens.
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.contiguous().numpy().copy()


def numpy_to_tensor(a: np.ndarray):
  """np.ndarray -> torch.Tensor with the same dtype (bfloat16 bit-exact)."""
  torch = _torch()
  a = np.ascontiguousarray(a)
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def _check_file(path: str) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise ConversionError(f"expected a checkpoint file but got a directory: {path}")
  return path


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Loads a .safetensors file (any dtype, including bfloat16)."""
  path = _check_file(path)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  out = {}
  try:
    # The torch framework handles bfloat16, which the numpy one cannot.
    with safe_open(path, framework="pt") as f:
      for k in f.keys():
        out[k] = tensor_to_numpy(f.get_tensor(k))
  except SafetensorError as e:
    raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
  return out


def _unsafe_globals(path: str) -> list[str]:
  """Names of the callables a pickle asks for that weights_only would refuse (never calls them)."""
  torch = _torch()
  try:
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
  except Exception:  # pylint: disable=broad-except
    pass
  # Legacy (non-zip) pickles: walk the opcodes without executing anything.
  import pickletools  # pylint: disable=g-import-not-at-top
  names, strings = [], []
  try:
    with open(path, "rb") as f:
      for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL":
          names.append(str(arg).replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
          strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
          names.append(f"{strings[-2]}.{strings[-1]}")
        if op.name == "STOP":
          break
  except Exception:  # pylint: disable=broad-except
    pass
  return sorted(set(names))


def _unpickler_reason(e: Exception) -> str:
  # torch's message opens with advice to retry with weights_only=False; keep only the reason.
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  reasons = [l for l in lines if "GLOBAL" in l or "Unsupported" in l or "unsupported" in l]
  return (reasons or lines[-1:] or [type(e).__name__])[0]


# Bookkeeping classes that training frameworks put next to the weights (Lightning's
# hyper-parameters and callback states, hydra/omegaconf configs, type hints inside them). When a
# checkpoint names only these, they are rebuilt as inert placeholders (_Inert, our own class:
# nothing from the file is imported or called) and the weights are read as usual. Any other
# name still refuses the file; torch additionally blocks os/sys/posix/nt outright.
INERT_GLOBAL_PREFIXES = (
    "pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "typing.",
    "argparse.Namespace", "pathlib.", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.dtypes.",
)
# Dict subclasses among them: rebuilt as plain dicts (the unpickler fills them item by item).
_DICT_LIKE_SUFFIXES = ("AttributeDict",)


class _Inert:
  """Placeholder for an object a checkpoint describes with a class we do not load."""

  qualname = "?"

  def __new__(cls, *args, **kwargs):
    del kwargs
    obj = object.__new__(cls)
    obj.args = args
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"<inert {self.qualname}>"


def _inert_stub(full_name: str):
  if full_name.endswith(_DICT_LIKE_SUFFIXES):
    # NEWOBJ calls cls.__new__(cls): hand back a real dict so SETITEMS may fill it.
    return type("InertDict", (), {"__new__": staticmethod(lambda cls=None, *a, **k: {}),
                                  "qualname": full_name})
  return type("Inert", (_Inert,), {"qualname": full_name})


def _check_tensors_only(obj: Mapping, path: str) -> None:
  """Refuses a placeholder where weights are expected (it would mean silently missing data)."""
  inert = [str(k) for k, v in obj.items() if isinstance(v, _Inert)]
  if inert:
    raise UnsafeCheckpointError(
        f"refusing {path}: entries of the state dict ({', '.join(inert[:5])}) are objects of "
        "classes we do not load, not tensors")


def _torch_load_safe(path: str):
  torch = _torch()
  is_zip = zipfile.is_zipfile(path)
  try:
    # mmap keeps peak memory near one copy of the weights for multi-GB zip checkpoints.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
  except pickle.UnpicklingError as e:
    wanted = _unsafe_globals(path)
    if wanted and all(w.startswith(INERT_GLOBAL_PREFIXES) for w in wanted):
      stubs = [(_inert_stub(w), w) for w in wanted]
      try:
        with torch.serialization.safe_globals(stubs):
          obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
      except pickle.UnpicklingError as e2:
        e = e2
      else:
        logger.warning("%s: read with inert placeholders for %s (training bookkeeping, not "
                       "weights; nothing from the file was imported or run)", path, ", ".join(wanted))
        return obj
    wanted = [w for w in wanted if not w.startswith(INERT_GLOBAL_PREFIXES)] or wanted
    listed = ", ".join(wanted) if wanted else "(see detail below)"
    raise UnsafeCheckpointError(
        f"refusing to load {path}: this pickle needs arbitrary code to unpickle ({listed}). A pickle "
        "can make the loader call any function it names, so a checkpoint is only opened with "
        "torch.load(weights_only=True), which accepts tensors, containers and plain values. Re-save "
        "the weights as safetensors (or a plain state_dict) from a trusted environment.\n"
        f"unpickler said: {_unpickler_reason(e)}") from None
  except RuntimeError as e:
    raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {e}") from e


def _flatten_tensors(obj, prefix: str, out: dict, skipped: list) -> None:
  torch = _torch()
  for k, v in obj.items():
    name = f"{prefix}{k}"
    if isinstance(v, torch.Tensor):
      out[name] = tensor_to_numpy(v)
    elif isinstance(v, Mapping):
      _flatten_tensors(v, name + ".", out, skipped)
    else:
      skipped.append(name)


def load_pickle_state_dict(path: str) -> dict[str, np.ndarray]:
  """Loads a .bin/.pth/.pt/.ckpt with torch.load(weights_only=True); Lightning -> its state_dict."""
  path = _check_file(path)
  obj = _torch_load_safe(path)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ConversionError(
        f"{path} holds a {type(obj).__name__}, not a state dict (a mapping from names to tensors)")
  _check_tensors_only(obj, path)
  out, skipped = {}, []
  _flatten_tensors(obj, "", out, skipped)
  if not out:
    raise ConversionError(f"{path} contains no tensors")
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Any supported checkpoint file -> flat ``{name: np.ndarray}``.

  Args:
    path: a .safetensors, .bin, .pth, .pt or .ckpt file.

  Returns:
    The tensors by name, as NumPy arrays of the stored dtype.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: a pickle that needs more than tensors and plain containers.
    ConversionError: unknown format or unreadable file.
  """
  path = _check_file(path)
  lower = path.lower()
  if lower.endswith(".json"):
    with open(path) as f:
      index = json.load(f)
    if "weight_map" not in index:
      raise ConversionError(f"{path} is JSON but not a sharded-checkpoint index (no weight_map)")
    out = {}
    base = os.path.dirname(path)
    for shard in sorted(set(index["weight_map"].values())):
      out.update(load_state_dict(os.path.join(base, shard)))
    return out
  if lower.endswith(SAFETENSORS_SUFFIXES):
    return load_safetensors(path)
  if lower.endswith(PICKLE_SUFFIXES):
    return load_pickle_state_dict(path)
  raise ConversionError(
      f"unknown checkpoint format: {path} (expected one of "
      f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}, or a sharded *.index.json)")


def find_component_weights(folder: str) -> str:
  """The weight file of one diffusers/transformers component folder (safetensors preferred)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"component folder not found: {folder}")
  for name in COMPONENT_WEIGHT_NAMES:
    candidate = os.path.join(folder, name)
    if os.path.isfile(candidate):
      return candidate
  present = sorted(os.listdir(folder))
  raise ConversionError(
      f"no weights in {folder}: expected one of {', '.join(COMPONENT_WEIGHT_NAMES[:2])} (or .bin); "
      f"found {present or 'nothing'}")


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config not found: {path}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path} is not valid JSON: {e}") from e


def load_component(folder: str) -> tuple[dict[str, np.ndarray], dict]:
  """A diffusers/transformers component folder -> (state dict, config.json contents)."""
  state_dict = load_state_dict(find_component_weights(folder))
  return state_dict, read_json(os.path.join(folder, "config.json"))


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
  """Writes {name: np.ndarray} as safetensors (through torch so bfloat16 works)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: numpy_to_tensor(np.asarray(v)) for k, v in tensors.items()}, path,
            metadata=metadata or {"format": "pt"})
