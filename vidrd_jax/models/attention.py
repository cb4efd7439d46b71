"""One attention entry point for every model, with the implementation picked per backend.

All models call :func:`dot_product_attention` with ``[B, L, heads, head_dim]`` tensors, the
layout of ``jax.nn.dot_product_attention``. The implementation is chosen once per call site
from ``implementation``:

* ``"xla"``: plain einsum-softmax-einsum; exact float32 reference, and the CPU default.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on
  NVIDIA GPUs; needs fp16/bf16 inputs).
* ``"splash"``: the Pallas TPU flash-attention kernel shipped with JAX.
* ``None`` / ``"auto"``: the best one for the default backend and dtype.

All of them agree within the tolerance of their compute dtype (tests/test_attention.py).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


# On CPU, the [B, N, Lq, Lk] scores of a long self-attention (8 x 2 x 1024^2 floats = 64 MiB
# at the VidRD shape) cost more to write and re-read than the two matmuls cost to compute.
# Flash-style tiles of this many queries x keys keep each tile's scores in cache.
_CPU_BLOCK = 256


def _tiles(length: int, block: int) -> int:
  """Tile size for a sequence: ``block``, grown so that there are at most 8 tiles."""
  return max(block, length // 8)


def _xla_attention(q, k, v, *, mask, scale, upcast, block=None):
  # q: [B, Lq, N, D], k/v: [B, Lk, N, D]
  compute_dtype = jnp.float32 if upcast else q.dtype
  # Heads before tokens: [B, N, L, D], so both products are plain batched matmuls.
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  # The scale goes on the queries ([.., Lq, D]) rather than on the scores ([.., Lq, Lk]) as
  # diffusers' baddbmm does: D multiplies per query instead of Lk, and XLA:CPU's fused product
  # ran 3% (8 x 256 tokens) to 8% (8 x 1024) faster. Done in compute_dtype, so an upcast bf16
  # model does not round the scaled queries; for power-of-two scales (head dim 64) the result
  # is bit-identical.
  qt = qt.astype(compute_dtype) * jnp.asarray(scale, compute_dtype)
  kt = kt.astype(compute_dtype)
  lq, lk = q.shape[1], k.shape[1]
  bq, bk = (_tiles(lq, block), _tiles(lk, block)) if block else (lq, lk)
  if mask is not None or lq % bq or lk % bk or (lq <= bq and lk <= bk):
    bq, bk = lq, lk

  def scores(qb, kb):
    return jnp.einsum("bnqd,bnkd->bnqk", qb, kb)

  def weighted(w, vb):
    return jnp.einsum("bnqk,bnkd->bnqd", w.astype(v.dtype), vb).astype(jnp.float32)

  # Softmax with its normalisation after the second product (the division runs over
  # [.., Lq, D], not [.., Lq, Lk]), accumulated over key tiles with the running-max rescaling
  # of flash attention. The maxima are shift constants: stopping their gradient is exact.
  outs = []
  for i in range(0, lq, bq):
    qb = qt[:, :, i:i + bq]
    m = acc = den = None
    for j in range(0, lk, bk):
      logits = scores(qb, kt[:, :, j:j + bk])
      if mask is not None:
        # mask: broadcastable to [B, N, Lq, Lk], True = attend (only with a single tile).
        logits = jnp.where(mask, logits, jnp.finfo(compute_dtype).min)
      m_new = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
      if m is not None:
        m_new = jnp.maximum(m, m_new)
      w = jnp.exp(logits - m_new)
      w_sum = w.sum(axis=-1, keepdims=True, dtype=jnp.float32)
      w_v = weighted(w, vt[:, :, j:j + bk])
      if m is None:
        acc, den = w_v, w_sum
      else:
        rescale = jnp.exp(m - m_new).astype(jnp.float32)
        acc, den = acc * rescale + w_v, den * rescale + w_sum
      m = m_new
    outs.append((acc / den).astype(v.dtype))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return jnp.swapaxes(out, 1, 2)


def _cudnn_attention(q, k, v, *, mask, scale):
  dtype = q.dtype
  if dtype not in (jnp.float16, jnp.bfloat16):
    # cudnn flash attention only runs in half precision.
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  return out.astype(dtype)


def _splash_attention(q, k, v, *, mask, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # pylint: disable=g-import-not-at-top
  if mask is not None:
    raise NotImplementedError("splash attention path takes no mask; use implementation='xla'")
  # The kernel wants [B, N, L, D] and sequence lengths in multiples of its block size.
  lq, lk = q.shape[1], k.shape[1]
  if lq % 128 or lk % 128:
    return _xla_attention(q, k, v, mask=None, scale=scale, upcast=True)

  def kernel(q, k, v):
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    return jnp.swapaxes(tpu_flash.flash_attention(qt, kt, vt, sm_scale=scale), 1, 2)

  return per_batch_shard(kernel, q, k, v)


def per_batch_shard(kernel: Callable[..., jax.Array], *args: jax.Array) -> jax.Array:
  """``kernel(*args)`` on each device's slice of the batch (dim 0 of every arg and the output).

  XLA cannot partition a Mosaic (Pallas TPU) kernel: under a jit whose inputs are sharded over
  the mesh, the call must sit inside a ``shard_map``. The mesh is the one in context
  (``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh``; the trainer sets it around its step),
  split over its data-parallel axes. Without a mesh, or when they are all of size 1, the kernel
  runs as is.
  """
  from vidrd_jax.parallel.sharding import data_parallel_axes  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(*args)
  batch_axes, shards = data_parallel_axes(mesh, nontrivial=True)
  if not batch_axes:
    return kernel(*args)
  if args[0].shape[0] % shards:
    raise ValueError(f"attention batch {args[0].shape[0]} does not split over the mesh's "
                     f"data-parallel axes {batch_axes} ({shards} shards)")
  spec = jax.sharding.PartitionSpec(batch_axes)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       check_vma=False)(*args)


@functools.lru_cache(maxsize=None)
def default_implementation(backend: Optional[str] = None) -> str:
  backend = backend or jax.default_backend()
  if backend == "gpu":
    return "cudnn"
  if backend == "tpu":
    return "splash"
  return "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Multi-head attention.

  Args:
    q: [B, Lq, N, D] queries.
    k: [B, Lk, N, D] keys.
    v: [B, Lk, N, D] values.
    mask: optional boolean, broadcastable to [B, N, Lq, Lk]; True where attention is allowed.
    scale: logit scale, default 1/sqrt(D).
    upcast: compute scores and softmax in float32 (SD2.1's ``upcast_attention``; always on
      for the XLA path in float32, relevant in bf16).
    implementation: one of ``IMPLEMENTATIONS`` or None (auto).

  Returns:
    [B, Lq, N, D] in q's dtype.
  """
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
  scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
  if implementation in (None, "auto"):
    impl = default_implementation()
    # Fused kernels run in half precision; a float32 model asked for float32 numbers, so auto
    # mode keeps it on XLA rather than silently casting (force "cudnn" to trade precision).
    if impl == "cudnn" and q.dtype == jnp.float32:
      impl = "xla"
  else:
    impl = implementation
  # Tiny problems (temporal attention over a handful of frames) gain nothing from fused
  # kernels and some kernels reject them; keep them on XLA.
  if impl != "xla" and (k.shape[1] < 64 or q.shape[-1] > 256):
    impl = "xla"
  # cuDNN's flash kernels (jax 0.11) reject sequence lengths that are not multiples of 64 when
  # differentiated (cross-attention over 77 text tokens), and XLA already fuses that small
  # product well (0.5 ms fwd at 16x4096x77 on an H200), so auto mode keeps them on XLA.
  if impl == "cudnn" and implementation in (None, "auto") and (
      q.shape[1] % 64 or k.shape[1] % 64):
    impl = "xla"
  if impl == "xla":
    block = _CPU_BLOCK if jax.default_backend() == "cpu" else None
    return _xla_attention(q, k, v, mask=mask, scale=scale, upcast=upcast, block=block)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, mask=mask, scale=scale)
  return _splash_attention(q, k, v, mask=mask, scale=scale)
