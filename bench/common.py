"""Shared helpers for the benchmarks in bench/: flags, timing, FLOPs, MFU, memory, reporting.

Every bench script parses its flags with :func:`parse_args` *before* importing jax, so that
``--device`` can pick the JAX platform, then times JAX and PyTorch with the same protocol
(``warmup`` untimed calls, then the median of ``iters`` timed calls, each synchronised with
``block_until_ready`` / ``torch.cuda.synchronize``) and appends one section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from vidrd_jax import host_allocator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO_ROOT, "BENCHMARKS.md")

# Dense peak matmul throughput (FLOP/s) per device kind and compute dtype, from the vendors'
# data sheets (no structured sparsity). Keys are lower-cased substrings of jax's device_kind.
PEAK_FLOPS = {
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # SXM; fp32 = non-tensor
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "tpu v4": {"bfloat16": 275e12, "float16": 275e12, "float32": 275e12 / 4},
    "tpu v5 lite": {"bfloat16": 197e12, "float16": 197e12, "float32": 197e12 / 4},  # v5e
    "tpu v5e": {"bfloat16": 197e12, "float16": 197e12, "float32": 197e12 / 4},
}


# ----------------------------------------------------------------------------------- flags


def parse_args(description: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Common flags; sets JAX_PLATFORMS and quiet logging before jax is imported.

  --size small|full: reduced shapes that fit a 2-core CPU in a minute or two, or the real
    SD2.1-base / VidRD shapes (GPU/TPU).
  --device cpu|gpu|tpu|auto: the platform both frameworks run on (auto = jax's default).
  """
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--size", choices=("small", "full"), default=None,
                 help="problem size (default: full on gpu/tpu, small on cpu)")
  p.add_argument("--device", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                 help="compute dtype (auto: float32 on cpu, bfloat16 for jax / float16 for torch on gpu)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--omp-active", action="store_true",
                 help="keep OpenMP's spinning wait (PyTorch's default); by default the benchmarks set "
                      "OMP_WAIT_POLICY=PASSIVE, without which PyTorch loses 2x on a shared 2-core machine")
  p.add_argument("--no-append", action="store_true", help="print only; do not touch BENCHMARKS.md")
  p.add_argument("--note", default="", help="free text added to the BENCHMARKS.md section")
  if extra is not None:
    extra(p)
  args = p.parse_args(argv)
  if not args.omp_active:
    # Must be set before torch loads its OpenMP runtime (the bench scripts import torch later).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif args.device == "gpu":
    os.environ["JAX_PLATFORMS"] = "cuda"
  elif args.device == "tpu":
    os.environ["JAX_PLATFORMS"] = "tpu"
  if "jax" in sys.modules:
    print("warning: jax imported before bench.common.parse_args; --device may be ignored", file=sys.stderr)
  # As in any program that imports the package before starting a backend: its XLA:CPU kernel
  # choice (vidrd_jax/__init__.py) applies to everything the benchmark compiles.
  import vidrd_jax  # pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  args.backend = backend
  if args.size is None:
    args.size = "small" if backend == "cpu" else "full"
  if args.dtype == "auto":
    args.jax_dtype = "float32" if backend == "cpu" else "bfloat16"
    args.torch_dtype = "float32" if backend == "cpu" else "float16"
  else:
    args.jax_dtype = args.torch_dtype = args.dtype
  return args


def torch_device(args: argparse.Namespace) -> str:
  """The torch device matching the JAX backend ('cuda' on gpu, else 'cpu')."""
  return "cuda" if args.backend == "gpu" else "cpu"


def setup_torch(args: argparse.Namespace):
  """Imports torch with a fixed thread count (2 = the cores JAX uses on the CI machine)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  torch.set_grad_enabled(False)
  if torch_device(args) == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  return torch


# ---------------------------------------------------------------------------------- timing


class Timing:
  """Median and spread of repeated wall-clock measurements, in seconds."""

  def __init__(self, samples: List[float]):
    self.samples = list(samples)
    self.median = statistics.median(self.samples)
    self.min = min(self.samples)
    self.max = max(self.samples)

  def __repr__(self):
    return f"Timing(median={self.median:.4f}s, min={self.min:.4f}s, n={len(self.samples)})"

  def fmt(self, unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1.0
    return f"{self.median * scale:.1f} (min {self.min * scale:.1f})"


def _sync(out: Any) -> Any:
  """Blocks until every JAX array in ``out`` is computed; synchronises CUDA for torch."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(out)
  if any(isinstance(x, jax.Array) for x in leaves):
    return jax.block_until_ready(out)
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
      torch.cuda.synchronize()
  return out


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 3) -> Timing:
  """Median wall time of ``fn()`` after ``warmup`` untimed calls, each call synchronised."""
  for _ in range(warmup):
    _sync(fn())
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    _sync(fn())
    samples.append(time.perf_counter() - t0)
  return Timing(samples)


def time_once(fn: Callable[[], Any]) -> tuple:
  """(seconds, result) of one synchronised call: for first-call (compile) cost."""
  t0 = time.perf_counter()
  out = _sync(fn())
  return time.perf_counter() - t0, out


def compile_time(jitted, *args, **kwargs) -> tuple:
  """(trace+lower seconds, compile seconds, compiled executable, FLOPs per call).

  The FLOPs are counted on the program as lowered, before backend optimisation: on GPU the
  optimised program runs convolutions as cuDNN custom calls, which XLA's cost analysis counts
  as zero (the full UNet3D read 0.44 TFLOP there instead of 3.57).
  """
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, compiled, lowered_flops(lowered)


# ------------------------------------------------------------------------------ the model


# --size small: SD2.1-base's block layout with 2/5 of its channels.
SMALL_UNET_CHANNELS = (128, 256, 512, 512)


def unet3d_config(args: argparse.Namespace, channels: Optional[str] = None, **overrides: Any):
  """SD2.1-base UNet3D at the benchmark's ``--size``, in ``args.jax_dtype``, dropout off.

  ``channels``: comma-separated block_out_channels overriding the size's. Whenever the channels
  differ from SD2.1-base's, heads stay 64 channels wide, as in SD2.1, so the attention shapes
  stay realistic. ``overrides`` go to ``UNet3DConfig.sd21_base`` last.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConfig  # pylint: disable=g-import-not-at-top
  chans = (tuple(int(c) for c in channels.split(",")) if channels
           else None if args.size == "full" else SMALL_UNET_CHANNELS)
  kw: Dict[str, Any] = dict(dtype=jnp.dtype(args.jax_dtype), dropout=0.0, temp_conv_dropout=0.0)
  if chans:
    kw.update(block_out_channels=chans, attention_head_dim=tuple(c // 64 for c in chans))
  kw.update(overrides)
  return UNet3DConfig.sd21_base(**kw)


# ------------------------------------------------------------------------------ FLOPs / MFU


def lowered_flops(stage) -> float:
  """FLOPs of a lowered (or compiled) program from XLA's cost analysis; NaN when XLA has none."""
  from vidrd_jax import metrics  # pylint: disable=g-import-not-at-top
  return metrics.compiled_flops(stage) or float("nan")


_CPU_PEAK_CACHE: Dict[str, float] = {}


def measured_cpu_peak(dtype: str = "float32", n: int = 2048, iters: int = 5) -> float:
  """Achieved FLOP/s of a large jitted matmul on the CPU, used as its "peak".

  A CPU has no vendor-quoted tensor peak that JAX can reach, so MFU on CPU is reported against
  what XLA's own best kernel (one big GEMM) achieves on the same cores at the same time.
  """
  if dtype in _CPU_PEAK_CACHE:
    return _CPU_PEAK_CACHE[dtype]
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(jnp.matmul)
  t = time_fn(lambda: mm(a, b), warmup=1, iters=iters)
  peak = 2 * n**3 / t.min
  _CPU_PEAK_CACHE[dtype] = peak
  return peak


def peak_flops(dtype: str = "bfloat16", device=None) -> tuple:
  """(peak FLOP/s, where it comes from) for the device JAX runs on and a compute dtype."""
  import jax  # pylint: disable=g-import-not-at-top
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return measured_cpu_peak(dtype), f"measured 2048^3 {dtype} matmul on this CPU"
  for key, table in PEAK_FLOPS.items():
    if key in kind:
      return table.get(dtype, table["bfloat16"]), f"{key} {dtype} dense data-sheet peak"
  return float("nan"), f"unknown peak for {device.device_kind}"


def mfu(flops: float, seconds: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s."""
  return flops / seconds / peak


# ----------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
  """Current resident set size of this process."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


class PeakMemory(contextlib.AbstractContextManager):
  """Peak memory during a block: device ``peak_bytes_in_use`` on accelerators, sampled RSS on CPU.

  On CPU the value is the peak RSS *above* the RSS at entry, sampled every 5 ms, so weights
  already resident before the block are not counted.
  """

  def __init__(self, device=None, interval: float = 0.005):
    self.device = device
    self.interval = interval
    self.peak = 0
    self.kind = ""
    self._stop = threading.Event()

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.device = self.device or jax.devices()[0]
    stats = self.device.memory_stats() if self.device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
      # The allocator's peak only grows; remember the level at entry.
      self.kind = "device peak_bytes_in_use"
      self._start = stats.get("bytes_in_use", 0)
      self._thread = None
    else:
      self.kind = "RSS peak above start (sampled)"
      self._start = rss_bytes()
      self.peak = self._start

      def sample():
        while not self._stop.is_set():
          self.peak = max(self.peak, rss_bytes())
          time.sleep(self.interval)

      self._thread = threading.Thread(target=sample, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self.peak = max(self.peak, rss_bytes()) - self._start
    else:
      self.peak = self.device.memory_stats()["peak_bytes_in_use"]
    return False


def torch_peak_memory_reset():
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


# ---------------------------------------------------------------------------------- context


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown cpu"


def _version(mod: str) -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(mod)
  except Exception:  # pylint: disable=broad-except
    return "n/a"


def device_string() -> str:
  """One line naming the accelerator (or CPU model and core count) JAX runs on."""
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"CPU: {_cpu_model()}, {os.cpu_count()} cores visible"
  return f"{d.platform.upper()}: {d.device_kind} x{jax.device_count()}"


def versions_string(extra: Sequence[str] = ()) -> str:
  mods = ["jax", "jaxlib", "flax", "torch", "diffusers"] + list(extra)
  return ", ".join(f"{m} {_version(m)}" for m in mods) + f", python {platform.python_version()}"


def load_string() -> str:
  """The 1/5/15-minute load averages: benchmarks on a shared machine must say how busy it was."""
  try:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"
  except OSError:
    return "load average unknown"


def contention_note() -> str:
  one = os.getloadavg()[0]
  cores = os.cpu_count() or 1
  if one > 0.5 * cores:
    return (f"**Measured under contention** (1-min load {one:.2f} on {cores} cores at the end of the run): "
            "absolute times are inflated and PyTorch's spinning OpenMP threads may suffer more from "
            "oversubscription than XLA's thread pool (not verified), so ratios may favour us; the text "
            "says how runs were ordered.")
  return ""


# -------------------------------------------------------------------------------- reporting


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(x):
    if isinstance(x, float):
      return f"{x:.4g}"
    return str(x)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def append_section(title: str, body: str, args: Optional[argparse.Namespace] = None,
                   path: str = BENCHMARKS_MD) -> str:
  """Appends ``## title`` with date, device, versions, load and ``body`` to BENCHMARKS.md.

  Sections are only ever appended (under an exclusive file lock), so several scripts and
  helpers can add theirs without editing one another's.
  """
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])
  meta = [f"- date: {now}", f"- device: {device_string()}", f"- versions: {versions_string()}",
          f"- machine load at the end: {load_string()}", f"- command: `{cmd}`",
          f"- host allocator: {host_allocator.describe()}"]
  if args is not None and getattr(args, "note", ""):
    meta.append(f"- note: {args.note}")
  note = contention_note()
  section = f"\n## {title}\n\n" + "\n".join(meta) + "\n\n" + (note + "\n\n" if note else "") + body.strip() + "\n"
  print(section)
  if args is not None and getattr(args, "no_append", False):
    return section
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      f.seek(0, os.SEEK_END)
      if f.tell() == 0:
        f.write("# Benchmarks\n\nEach section is appended by a script (see bench/README.md); newest last.\n")
      f.write(section)
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
  return section


def ratio_str(ours: float, theirs: float) -> str:
  """'0.83x (ours faster)' style comparison of two times."""
  r = ours / theirs
  return f"{r:.2f}x ({'ours faster' if r < 1 else 'ours slower'})"


class CompileLog(contextlib.AbstractContextManager):
  """Records every XLA compilation inside a block: {jitted function name: [seconds, ...]}.

  Uses jax's own ``jax_log_compiles`` messages ("Finished XLA compilation of jit(f) in t sec"),
  so it counts real compilations, not dispatch-cache entries.
  """

  def __init__(self):
    import logging  # pylint: disable=g-import-not-at-top
    self.compiles: Dict[str, List[float]] = {}
    self._logging = logging
    self._handler = None

  def __enter__(self):
    import re  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    logging = self._logging
    pattern = re.compile(r"Finished XLA compilation of jit\((.+?)\) in ([0-9.e-]+) sec")
    log = self

    class _Handler(logging.Handler):

      def emit(self, record):
        m = pattern.search(record.getMessage())
        if m:
          log.compiles.setdefault(m.group(1), []).append(float(m.group(2)))

    self._prev = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    self._handler = _Handler(level=logging.DEBUG)
    self._loggers = [logging.getLogger(n) for n in ("jax._src.dispatch", "jax._src.interpreters.pxla",
                                                     "jax._src.compiler", "jax")]
    self._saved = []
    for lg in self._loggers:
      self._saved.append((lg.propagate, lg.level))
      lg.addHandler(self._handler)
      lg.propagate = False  # keep the (WARNING-level) messages off the console
      lg.setLevel(logging.DEBUG)
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_log_compiles", self._prev)
    for lg, (prop, level) in zip(self._loggers, self._saved):
      lg.removeHandler(self._handler)
      lg.propagate = prop
      lg.setLevel(level)
    return False

  def count(self, name: Optional[str] = None) -> int:
    if name is None:
      return sum(len(v) for v in self.compiles.values())
    return len(self.compiles.get(name, []))

  def seconds(self, name: Optional[str] = None) -> float:
    if name is None:
      return sum(sum(v) for v in self.compiles.values())
    return sum(self.compiles.get(name, []))

  def top(self, n: int = 5) -> str:
    items = sorted(self.compiles.items(), key=lambda kv: -sum(kv[1]))[:n]
    return ", ".join(f"{k} {sum(v):.1f}s" + (f" (x{len(v)})" if len(v) > 1 else "") for k, v in items)
