"""XLA:CPU kernel choice at the UNet3D's shapes: YNNPACK (XLA's default) vs Eigen vs PyTorch.

XLA:CPU sends convolutions, dots and reductions to YNNPACK by default (jaxlib 0.10.2:
``--xla_cpu_experimental_ynn_fusion_type`` = reduce, individual_dot, individual_convolution).
``import vidrd_jax`` takes convolutions out and adds YNNPACK's fusions of dots with their
elementwise neighbours (``dot,reduce,individual_dot``), so convolutions run on Eigen. This
script times each kind of op at the reduced UNet3D's shapes (batch 2 x 4 frames, 32x32
latents, float32) under both settings, compiled from the same
lowered program with per-compile options, next to PyTorch's oneDNN kernels, so the choice can
be re-checked on another CPU.

  python -m bench.bench_cpu_kernels
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top

_T = "LIBRARY_FUSION_TYPE_"
SETTINGS = {
    "XLA default (YNNPACK)": f"{_T}REDUCE,{_T}INDIVIDUAL_DOT,{_T}INDIVIDUAL_CONVOLUTION",
    "vidrd_jax (Eigen convolutions)": f"{_T}DOT,{_T}REDUCE,{_T}INDIVIDUAL_DOT",
}


def _cases(np):
  """(name, jax fn, numpy inputs, torch fn, torch inputs, axes taking torch's output to ours)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.attention import dot_product_attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  randn = lambda *s: rng.standard_normal(s).astype(np.float32)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  heads_first = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
  cases = []
  # 3x3 resnet convs of the four UNet levels (8 images = 2 videos x 4 frames).
  for h, cin, cout in ((32, 128, 128), (16, 256, 256), (8, 512, 512), (32, 256, 128)):
    x, w = randn(8, h, h, cin), randn(3, 3, cin, cout) * 0.05
    cases.append((
        f"conv 3x3, 8 x {h}x{h}, {cin}->{cout}",
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        (x, w),
        lambda x, w: torch.nn.functional.conv2d(x, w, padding=1),
        (nchw(x), torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))),
        (0, 2, 3, 1)))
  # Dense layers: GEGLU in-projection and attention projections at the first two levels.
  for m, k, n in ((8192, 128, 1024), (8192, 512, 128), (2048, 256, 2048), (512, 512, 4096)):
    a, b = randn(m, k), randn(k, n)
    cases.append((f"dense {m}x{k} @ {k}x{n}", lambda a, b: a @ b, (a, b), lambda a, b: a @ b,
                  (torch.from_numpy(a), torch.from_numpy(b)), (0, 1)))
  # Attention [B, L, heads, 64]: spatial self, cross (77 text tokens), temporal (4 frames).
  for b, lq, lk, n in ((8, 1024, 1024, 2), (8, 1024, 77, 2), (8, 256, 256, 4), (2048, 4, 4, 2)):
    q, k = randn(b, lq, n, 64), randn(b, lk, n, 64)
    cases.append((
        f"attention {b} x {lq} q x {lk} k x {n} heads",
        lambda q, k: dot_product_attention(q, k, k, implementation="xla"), (q, k),
        lambda q, k: torch.nn.functional.scaled_dot_product_attention(q, k, k),
        (heads_first(q), heads_first(k)), (0, 2, 1, 3)))
  return cases


def main():
  args = common.parse_args(__doc__.splitlines()[0])
  if args.backend != "cpu":
    raise SystemExit("bench_cpu_kernels compares XLA:CPU kernel libraries; run it with --device cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch = common.setup_torch(args)

  rows = []
  for name, jfn, inputs, tfn, tinputs, to_ours in _cases(np):
    jinputs = [jax.numpy.asarray(x) for x in inputs]
    lowered = jax.jit(jfn).lower(*jinputs)
    times, outs = [], []
    for fusion_types in SETTINGS.values():
      compiled = lowered.compile(
          compiler_options={"xla_cpu_experimental_ynn_fusion_type": fusion_types})
      outs.append(np.asarray(compiled(*jinputs)))
      times.append(common.time_fn(lambda c=compiled: c(*jinputs), warmup=args.warmup,
                                  iters=args.iters))
    t_torch = common.time_fn(lambda: tfn(*tinputs), warmup=args.warmup, iters=args.iters)
    ref = tfn(*tinputs).numpy().transpose(to_ours)
    err = max(float(np.abs(o - ref).max() / (np.abs(ref).max() + 1e-12)) for o in outs)
    rows.append([name] + [t.fmt() for t in times] + [t_torch.fmt(),
                 f"{times[0].median / t_torch.median:.2f}",
                 f"{times[1].median / t_torch.median:.2f}", f"{err:.1e}"])
    print(" | ".join(rows[-1]), flush=True)

  header = (["op (float32)"] + [f"{k} ms (min)" for k in SETTINGS]
            + ["torch ms (min)", "default / torch", "ours / torch", "max rel. err vs torch"])
  body = (f"Median of {args.iters} after {args.warmup} warm-up; PyTorch {args.torch_threads} "
          f"threads. Each XLA column compiles the same lowered program with "
          f"`--xla_cpu_experimental_ynn_fusion_type` set per compile.\n\n"
          + common.markdown_table(header, rows))
  common.append_section("XLA:CPU kernel choice (cpu)", body, args)


if __name__ == "__main__":
  main()
