"""Attention kernels at the UNet3D's shapes: XLA vs cuDNN flash vs Pallas flash.

Shapes (SD2.1-base first level, 64-dim heads, VidRD inference batch = 2 (CFG) x 8 frames on a
32x32 latent grid):

* spatial self-attention: [B*F, 4096 tokens, 5 heads, 64]
* cross-attention: 4096 queries x 77 text tokens
* temporal attention: [B*h*w, F frames, 5 heads, 64], F = 8 and 16 (many tiny problems)

On CPU only the XLA rows run (``--size small`` uses 2 instead of 16 images for the spatial
shapes); the cuDNN and Pallas rows report "n/a on cpu".

  python -m bench.bench_attention                 # CPU, small
  python -m bench.bench_attention --device gpu    # full shapes, bf16
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top


def _impls(backend: str):
  """name -> (fn(q, k, v, scale) or None, reason when unavailable)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import attention as attn  # pylint: disable=g-import-not-at-top

  impls = {}
  impls["ours xla (einsum-softmax-einsum)"] = (
      lambda q, k, v, s: attn.dot_product_attention(q, k, v, scale=s, implementation="xla"), "")
  impls[f"ours auto (-> {attn.default_implementation(backend)})"] = (
      lambda q, k, v, s: attn.dot_product_attention(q, k, v, scale=s), "")
  impls["jax.nn xla"] = (
      lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, scale=s, implementation="xla"), "")
  if backend == "gpu":
    impls["jax.nn cudnn (flash)"] = (
        lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, scale=s, implementation="cudnn"), "")
    try:
      from jax.experimental.pallas.ops.gpu import attention as pl_gpu  # pylint: disable=g-import-not-at-top
      impls["pallas triton flash"] = (
          lambda q, k, v, s: pl_gpu.mha(q, k, v, segment_ids=None, sm_scale=s), "")
    except Exception as e:  # pylint: disable=broad-except
      impls["pallas triton flash"] = (None, f"import failed: {e}")
    try:
      from jax.experimental.pallas.ops.gpu import attention_mgpu as pl_mgpu  # pylint: disable=g-import-not-at-top

      def mgpu(q, k, v, s):
        # The Mosaic-GPU (Hopper) kernel applies 1/sqrt(D) itself; pre-scale q for any other scale.
        q = q * (s * q.shape[-1] ** 0.5)
        cfg = pl_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2)
        return pl_mgpu.attention(q, k, v, cfg)
      impls["pallas mosaic-gpu flash (hopper)"] = (mgpu, "")
    except Exception as e:  # pylint: disable=broad-except
      impls["pallas mosaic-gpu flash (hopper)"] = (None, f"import failed: {e}")
  else:
    impls["jax.nn cudnn (flash)"] = (None, f"n/a on {backend}")
    impls["pallas triton flash"] = (None, f"n/a on {backend}")
  if backend == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention as pl_tpu  # pylint: disable=g-import-not-at-top
    impls["pallas tpu flash"] = (
        lambda q, k, v, s: jax.numpy.swapaxes(pl_tpu.flash_attention(
            *(jax.numpy.swapaxes(x, 1, 2) for x in (q, k, v)), sm_scale=s), 1, 2), "")
  else:
    impls["pallas tpu flash"] = (None, f"n/a on {backend}")
  return impls


def shapes(size: str):
  """name -> (batch, q tokens, kv tokens, heads, head_dim)."""
  images = 16 if size == "full" else 2
  return {
      f"spatial self {images}x4096": (images, 4096, 4096, 5, 64),
      f"cross {images}x4096x77": (images, 4096, 77, 5, 64),
      "temporal 2048x8": (2048, 8, 8, 5, 64),
      "temporal 2048x16": (2048, 16, 16, 5, 64),
  }


def main():
  args = common.parse_args(__doc__.splitlines()[0],
                           extra=lambda p: p.add_argument("--backward", action="store_true", default=True))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(args.jax_dtype)
  peak, peak_src = common.peak_flops(args.jax_dtype)
  impls = _impls(args.backend)
  rows = []
  for shape_name, (b, lq, lk, h, d) in shapes(args.size).items():
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, lq, h, d), dtype)
    k = jax.random.normal(kk, (b, lk, h, d), dtype)
    v = jax.random.normal(kv, (b, lk, h, d), dtype)
    scale = d ** -0.5
    # Two matmuls of 2*Lq*Lk*D FLOPs each per (batch, head); backward adds about 2.5x.
    fwd_flops = 4.0 * b * h * lq * lk * d
    ref = None
    for name, (fn, why) in impls.items():
      if fn is None:
        rows.append([shape_name, name, why, "", "", "", ""])
        continue
      try:
        f = jax.jit(functools.partial(fn, s=scale))
        out = f(q, k, v)
        if ref is None:
          ref = np.asarray(out, np.float32)
        err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)) / (ref.std() + 1e-12))
        t = common.time_fn(lambda: f(q, k, v), warmup=args.warmup, iters=args.iters)

        def loss(q, k, v, fn=fn):
          return jnp.sum(fn(q, k, v, scale).astype(jnp.float32) ** 2)
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        tb = common.time_fn(lambda: g(q, k, v), warmup=args.warmup, iters=args.iters)
        rows.append([shape_name, name, t.fmt(), tb.fmt(),
                     f"{fwd_flops / t.median / 1e12:.3f}",
                     f"{100 * fwd_flops / t.median / peak:.1f}%", f"{err:.1e}"])
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).splitlines()[0][:90] if str(e) else type(e).__name__
        rows.append([shape_name, name, f"failed: {msg}", "", "", "", ""])
      print(rows[-1], flush=True)

  header = ["shape", "implementation", "fwd ms (min)", "fwd+bwd ms (min)", "fwd TFLOP/s",
            "fwd % of peak", "max err / std vs first row"]
  body = (f"{args.jax_dtype}; `[batch, tokens, heads, head_dim]`; median of {args.iters} after "
          f"{args.warmup} warm-up; peak = {peak / 1e12:.3g} TFLOP/s ({peak_src}).\n\n"
          + common.markdown_table(header, rows))
  common.append_section(f"Attention kernels ({args.backend}, {args.size})", body, args)


if __name__ == "__main__":
  main()
