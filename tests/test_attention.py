"""The attention entry point: every implementation against jax.nn.dot_product_attention.

Budget: a few seconds on CPU. cudnn / splash tests run only where that backend exists.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidrd_jax.models import attention


def _qkv(seed=0, b=2, lq=9, lk=13, n=3, d=16, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, lq, n, d), jnp.float32)
  k = jax.random.normal(kk, (b, lk, n, d), jnp.float32)
  v = jax.random.normal(kv, (b, lk, n, d), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_xla_matches_jax_reference(scale):
  q, k, v = _qkv()
  got = attention.dot_product_attention(q, k, v, scale=scale, implementation="xla")
  want = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_xla_with_masks_matches_jax_reference():
  q, k, v = _qkv(1)
  rng = np.random.default_rng(0)
  full = rng.random((2, 3, 9, 13)) > 0.4
  full[..., 0] = True  # no fully masked row
  causal_like = np.tril(np.ones((9, 13), bool), k=4)[None, None]
  key_padding = np.arange(13)[None, None, None, :] < np.array([13, 6])[:, None, None, None]
  for mask in (full, causal_like, key_padding):
    mask = jnp.asarray(mask)
    got = attention.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  # Masked keys have no influence at all.
  mask = jnp.asarray(key_padding)
  v2 = v.at[1, 6:].set(1e3)
  np.testing.assert_array_equal(
      attention.dot_product_attention(q, k, v, mask=mask, implementation="xla")[1],
      attention.dot_product_attention(q, k, v2, mask=mask, implementation="xla")[1])


def test_tiles_change_nothing_but_memory_traffic():
  # The CPU path splits long self-attention into flash-style tiles; values and gradients must
  # equal the one-block computation (and jax's reference).
  q, k, v = _qkv(3, b=1, lq=1024, lk=1024, n=2, d=8)
  blocked = lambda q, k, v: attention._xla_attention(  # pylint: disable=protected-access
      q, k, v, mask=None, scale=0.35, upcast=True, block=256)
  whole = lambda q, k, v: attention._xla_attention(  # pylint: disable=protected-access
      q, k, v, mask=None, scale=0.35, upcast=True, block=None)
  want = jax.nn.dot_product_attention(q, k, v, scale=0.35, implementation="xla")
  np.testing.assert_allclose(blocked(q, k, v), want, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(whole(q, k, v), want, atol=2e-6, rtol=1e-5)
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
  g_blocked = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=0.35, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_blocked, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # The jitted blocked program holds no [B, N, Lq, Lk] buffer, only per-block scores.
  hlo = jax.jit(blocked).lower(q, k, v).as_text()
  assert "1x2x1024x1024" not in hlo and "1x2x256x256" in hlo


def test_upcast_in_bfloat16():
  # Large logits: bf16 scores lose the ordering of nearly equal keys; upcast keeps float32.
  q, k, v = _qkv(2, d=64, dtype=jnp.bfloat16)
  q = q * 4
  exact = jax.nn.dot_product_attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), implementation="xla")
  up = attention.dot_product_attention(q, k, v, upcast=True, implementation="xla")
  down = attention.dot_product_attention(q, k, v, upcast=False, implementation="xla")
  assert up.dtype == jnp.bfloat16 and down.dtype == jnp.bfloat16
  err_up = float(jnp.abs(up.astype(jnp.float32) - exact).max())
  err_down = float(jnp.abs(down.astype(jnp.float32) - exact).max())
  # Only the bf16 rounding of the output (and of the weights before the value product) is left.
  assert err_up < 0.05, err_up
  assert err_up <= err_down, (err_up, err_down)


def test_auto_and_bad_implementation():
  q, k, v = _qkv(3)
  if jax.default_backend() == "cpu":
    assert attention.default_implementation() == "xla"
  np.testing.assert_array_equal(
      attention.dot_product_attention(q, k, v),
      attention.dot_product_attention(q, k, v, implementation="xla"))
  with pytest.raises(ValueError, match="flash"):
    attention.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn needs an NVIDIA GPU")
def test_cudnn_matches_xla():
  # Long enough that the cudnn path is taken (short sequences fall back to XLA).
  q, k, v = _qkv(4, b=2, lq=256, lk=256, n=4, d=64, dtype=jnp.bfloat16)
  got = attention.dot_product_attention(q, k, v, implementation="cudnn")
  want = attention.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)
  # float32 inputs run in bf16 inside and come back as float32.
  q32, k32, v32 = (t.astype(jnp.float32) for t in (q, k, v))
  got32 = attention.dot_product_attention(q32, k32, v32, implementation="cudnn")
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, want.astype(np.float32), atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="splash/flash kernel needs a TPU")
def test_splash_matches_xla():
  q, k, v = _qkv(5, b=2, lq=256, lk=256, n=4, d=64)
  got = attention.dot_product_attention(q, k, v, implementation="splash")
  want = attention.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(got, want, atol=2e-2)


def test_per_batch_shard_runs_kernel_on_each_batch_shard():
  """Under a sharded jit with the mesh in context, a kernel XLA could not partition (Pallas TPU
  attention) runs per batch shard; the result equals the unsharded call."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from vidrd_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((8, 128, 2, 16)), jnp.float32) for _ in range(3))
  shapes_seen = []

  def kernel(q, k, v):
    shapes_seen.append(q.shape)
    return attention._xla_attention(q, k, v, mask=None, scale=0.25, upcast=True)  # pylint: disable=protected-access

  x_sh = NamedSharding(mesh, P(sharding.BATCH_AXES))

  def sharded(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return attention.per_batch_shard(kernel, q, k, v)

  out = jax.jit(sharded, in_shardings=(x_sh,) * 3, out_shardings=x_sh)(q, k, v)
  assert shapes_seen[-1] == (1, 128, 2, 16)  # 8 examples over 2 x 4 devices
  want = kernel(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6, rtol=1e-6)
  # No mesh in context: the kernel sees the whole batch.
  attention.per_batch_shard(kernel, q, k, v)
  assert shapes_seen[-1] == (8, 128, 2, 16)
  with pytest.raises(ValueError, match="does not split"):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      attention.per_batch_shard(kernel, q[:3], k[:3], v[:3])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu importable (ahead-of-time TPU compile; no TPU needed)")
def test_splash_compiles_for_a_sharded_tpu_slice():
  """Pallas TPU flash attention, forward and backward, on a batch sharded over a v5e x8 slice,
  compiled ahead of time on this host: it only compiles with the mesh in context (shard_map)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from vidrd_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1}, devices=devices)
  x = jax.ShapeDtypeStruct((16, 1024, 5, 64), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(sharding.BATCH_AXES)))

  def loss(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      out = attention.dot_product_attention(q, k, v, implementation="splash")
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  assert compiled.as_text().count("tpu_custom_call") >= 2  # the kernels themselves, fwd + bwd
