"""Where a compiled program spends its device time: a jax.profiler trace, summed per kind of op.

A trace (``jax.profiler.trace``) records every kernel (GPU) or thunk (CPU) with the HLO
instruction it belongs to (the ``hlo_op`` stat). This module reads the trace with
``jax.profiler.ProfileData`` and classifies each instruction from the optimised HLO text of the
same executable: cuDNN convolutions, cuBLAS / Triton matmuls, cuDNN attention, reduction
fusions (GroupNorm, LayerNorm, softmax), elementwise fusions, copies and transposes. The
result says which kind of work the time goes to, and how much of the traced window the device
was busy at all (launch gaps show up as busy < 100%).

  python -m bench.profile_summary TRACE_DIR [--hlo FILE] [--module NAME]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
from typing import Dict, List, Optional, Tuple

# ------------------------------------------------------------------------ HLO classification

# `%name = type opcode(...)`, and the attributes that tell what a fusion or custom call does.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([a-z][\w\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_KIND = re.compile(r"kind=k(\w+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def parse_hlo(text: str) -> Dict[str, str]:
  """Optimised HLO text -> {instruction name: category}."""
  comp_ops: Dict[str, set] = collections.defaultdict(set)
  comp_targets: Dict[str, set] = collections.defaultdict(set)
  instrs: List[Tuple[str, str, str]] = []
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    instrs.append((name, opcode, line))
    if current is not None:
      comp_ops[current].add(opcode)
      t = _TARGET.search(line)
      if t:
        comp_targets[current].add(t.group(1))
  out = {}
  for name, opcode, line in instrs:
    out[name] = _classify(opcode, line, comp_ops, comp_targets)
  return out


def _target_category(target: str) -> str:
  t = target.lower()
  if "fmha" in t or "attention" in t or "flash" in t:
    return "attention (cuDNN)"
  if "conv" in t:
    return "convolution (cuDNN)"
  if "gemm" in t or "cublas" in t or "matmul" in t:
    return "matmul (cuBLAS)"
  if "triton" in t:
    return "triton fusion"
  return f"custom-call {target}"


# Fusions made of these only move data (copies, transposes, pads, concatenations).
_DATA_MOVEMENT = {"parameter", "copy", "transpose", "bitcast", "tuple", "get-tuple-element", "slice",
                  "pad", "concatenate", "constant", "broadcast", "reshape", "dynamic-slice"}


def _classify(opcode: str, line: str, comp_ops, comp_targets) -> str:
  if opcode == "custom-call":
    t = _TARGET.search(line)
    return _target_category(t.group(1) if t else "?")
  if opcode == "fusion":
    called = _CALLS.search(line)
    kind = _KIND.search(line)
    kind = kind.group(1) if kind else "?"
    ops = comp_ops.get(called.group(1), set()) if called else set()
    targets = comp_targets.get(called.group(1), set()) if called else set()
    if "__triton_gemm" in line or ("dot" in ops and kind == "Custom"):
      return "matmul (fused kernel: Triton / YNNPACK)"
    if "__cudnn$fusion" in line or ("convolution" in ops and kind == "Custom"):
      return "convolution (fused kernel: cuDNN / YNNPACK)"
    if targets:
      return _target_category(sorted(targets)[0])
    if "convolution" in ops:
      return "convolution (XLA fusion)"
    if "dot" in ops:
      return "matmul (XLA fusion)"
    if ops and ops <= _DATA_MOVEMENT:
      return "copy / transpose"
    if kind == "Input" or "reduce" in ops:
      return "reduction fusion (norms, softmax)"
    return f"elementwise fusion (k{kind})"
  if opcode in ("convolution",):
    return "convolution (XLA)"
  if opcode == "dot":
    return "matmul (XLA)"
  if opcode in ("copy", "transpose", "copy-start", "copy-done"):
    return "copy / transpose"
  if opcode in ("reduce", "reduce-window"):
    return "reduction fusion (norms, softmax)"
  return opcode


def _kernel_category(kernel: str) -> str:
  """Fallback when the HLO op is unknown: guess from the kernel's name."""
  k = kernel.lower()
  if "fmha" in k or "flash" in k or "attn" in k:
    return "attention (cuDNN)"
  if "conv" in k or "fprop" in k or "dgrad" in k or "wgrad" in k:
    return "convolution (cuDNN)"
  if "gemm" in k or "nvjet" in k or "cutlass" in k or "xmma" in k:
    return "matmul (cuBLAS)"
  if "memcpy" in k or "memset" in k:
    return "memcpy / memset"
  if "nchwtonhwc" in k or "nhwctonchw" in k:
    return "layout conversion (cuDNN)"
  return "other"


# ------------------------------------------------------------------------------- the trace


def latest_xplane(trace_dir: str) -> str:
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir!r}")
  return max(files, key=os.path.getmtime)


def summarise(xplane_path: str, hlo_categories: Optional[Dict[str, str]] = None,
              module: Optional[str] = None, calls: int = 1, top: int = 15) -> dict:
  """Device time per category and per instruction.

  Args:
    xplane_path: a ``*.xplane.pb`` written by ``jax.profiler``.
    hlo_categories: from :func:`parse_hlo` on the executable's optimised HLO.
    module: keep only events of this HLO module (``hlo_module`` stat, prefix match).
    calls: how many calls of the program the trace holds (times are reported per call).
    top: how many instructions to list.

  Returns:
    dict with total_ms (per call), busy (kernel time / traced device window), categories
    [(name, ms per call, share)], top [(hlo_op, category, ms per call, share, kernel)].
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  hlo_categories = hlo_categories or {}
  # GPU kernels are named after their HLO fusion with '.' and '-' turned into '_'; under
  # command buffers (CUDA graphs) the hlo_op stat names the buffer, so the kernel name is the
  # reliable key there.
  by_kernel = {re.sub(r"[.\-]", "_", k): k for k in hlo_categories}
  data = ProfileData.from_file(xplane_path)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  on_device = bool(planes)
  if not planes:  # CPU: the thunks run on host threads.
    planes = [p for p in data.planes if p.name == "/host:CPU"]
  per_op: Dict[str, float] = collections.defaultdict(float)
  kernel_of: Dict[str, str] = {}
  longest: Dict[str, float] = {}
  t_min, t_max, total = None, None, 0.0
  for plane in planes:
    for line in plane.lines:
      lname = line.name.lower()
      # Derived lines (modules, ops, steps) repeat the kernels' time; keep the stream lines.
      if on_device and not ("stream" in lname or lname.startswith("#")):
        continue
      for ev in line.events:
        stats = dict(ev.stats)
        op = stats.get("hlo_op")
        if op is None and not on_device:
          continue
        if on_device:
          op = by_kernel.get(ev.name) or (op if op in hlo_categories else ev.name)
          if _kernel_category(ev.name) == "layout conversion (cuDNN)":
            op = ev.name  # inside a conv's custom call, but worth its own line
        mod = str(stats.get("hlo_module", ""))
        if module and mod and not mod.startswith(module):
          continue
        dur = ev.duration_ns
        if dur <= 0:
          continue
        per_op[str(op)] += dur
        if dur > longest.get(str(op), 0):  # name an op by its longest kernel
          longest[str(op)], kernel_of[str(op)] = dur, ev.name
        total += dur
        t_min = ev.start_ns if t_min is None else min(t_min, ev.start_ns)
        t_max = ev.end_ns if t_max is None else max(t_max, ev.end_ns)
  if not total:
    raise ValueError(f"no device events in {xplane_path}")
  cats: Dict[str, float] = collections.defaultdict(float)
  for op, dur in per_op.items():
    cat = hlo_categories.get(op) or _kernel_category(kernel_of.get(op, op))
    cats[cat] += dur
  calls = max(1, calls)
  ms = lambda ns: ns / 1e6 / calls
  return {
      "total_ms": ms(total),
      "window_ms": ms(t_max - t_min),
      "busy": total / max(1.0, t_max - t_min),
      "categories": sorted(((c, ms(d), d / total) for c, d in cats.items()), key=lambda r: -r[1]),
      "top": [(op, hlo_categories.get(op) or _kernel_category(kernel_of.get(op, op)), ms(d),
               d / total, kernel_of.get(op, op)[:60])
              for op, d in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]],
  }


def markdown(summary: dict, title: str) -> str:
  """A short markdown report of :func:`summarise`'s result."""
  lines = [f"**{title}**: {summary['total_ms']:.2f} ms of kernels per call over a "
           f"{summary['window_ms']:.2f} ms window (device busy {100 * summary['busy']:.0f}%).", "",
           "| category | ms / call | share |", "| --- | --- | --- |"]
  lines += [f"| {c} | {m:.2f} | {100 * s:.1f}% |" for c, m, s in summary["categories"]]
  lines += ["", "| top instructions | category | ms / call | share | kernel |",
            "| --- | --- | --- | --- | --- |"]
  lines += [f"| {op[:60]} | {c} | {m:.3f} | {100 * s:.1f}% | `{k}` |"
            for op, c, m, s, k in summary["top"]]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("trace_dir")
  p.add_argument("--hlo", default="", help="optimised HLO text of the traced executable")
  p.add_argument("--module", default=None)
  p.add_argument("--calls", type=int, default=1)
  args = p.parse_args()
  cats = {}
  if args.hlo:
    with open(args.hlo) as f:
      cats = parse_hlo(f.read())
  print(markdown(summarise(latest_xplane(args.trace_dir), cats, args.module, args.calls),
                 os.path.basename(args.trace_dir.rstrip("/"))))


if __name__ == "__main__":
  main()
