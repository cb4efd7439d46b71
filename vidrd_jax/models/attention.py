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
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def _xla_attention(q, k, v, *, mask, scale, upcast):
  # q: [B, Lq, N, D], k/v: [B, Lk, N, D]
  compute_dtype = jnp.float32 if upcast else q.dtype
  # Scores in the compute dtype; scale applied to the product, as diffusers does (baddbmm alpha).
  logits = jnp.einsum("bqnd,bknd->bnqk", q.astype(compute_dtype), k.astype(compute_dtype))
  logits = logits * jnp.asarray(scale, compute_dtype)
  if mask is not None:
    # mask: broadcastable to [B, N, Lq, Lk], True = attend.
    logits = jnp.where(mask, logits, jnp.finfo(compute_dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v)


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
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  out = tpu_flash.flash_attention(qt, kt, vt, sm_scale=scale)
  return jnp.swapaxes(out, 1, 2)


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
    return _xla_attention(q, k, v, mask=mask, scale=scale, upcast=upcast)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, mask=mask, scale=scale)
  return _splash_attention(q, k, v, mask=mask, scale=scale)
