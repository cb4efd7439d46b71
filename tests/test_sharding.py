"""Mesh construction, logical-axis rules, batch checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vidrd_jax.parallel import axes
from vidrd_jax.parallel import sharding


def test_mesh_from_config_fills_minus_one():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  assert mesh.size == 1


@pytest.mark.parametrize("mesh_config, message", [
    ({"data": 3, "fsdp": -1}, "do not divide the 8 available devices"),
    ({"data": 2, "fsdp": 2}, "covers 4 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"data": 2, "model": 4}, "unknown mesh axes"),
    ({"data": 0, "fsdp": -1}, "sizes are positive"),
])
def test_bad_mesh_is_a_clear_error(mesh_config, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.make_mesh(mesh_config)


def test_batch_must_divide_data_parallel_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  sharding.check_batch_size(16, mesh)
  with pytest.raises(sharding.ShardingError, match="not divisible by the data-parallel size 8"):
    sharding.check_batch_size(12, mesh)


def test_data_parallel_axes_of_concrete_and_abstract_meshes():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  for m in (mesh, mesh.abstract_mesh):
    assert sharding.data_parallel_axes(m) == (("data", "fsdp"), 4)
    # Size-1 axes left out: what a shard_map over the batch needs.
    assert sharding.data_parallel_axes(m, nontrivial=True) == (("fsdp",), 4)
  tensor_only = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("tensor",))
  assert sharding.data_parallel_axes(tensor_only) == ((), 1)


class _Annotated(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    wide = self.param("wide", nn.with_logical_partitioning(init, (axes.EMBED, axes.MLP)), (64, 128))
    # 3 input channels do not divide over fsdp=2: that dimension stays replicated.
    odd = self.param("odd", nn.with_logical_partitioning(init, (None, None, axes.CONV_IN, axes.CONV_OUT)),
                     (3, 3, 3, 6))
    norm = self.param("norm", nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)), (64,))
    plain = self.param("plain", init, (8, 8))
    return x @ wide, odd, norm, plain


def test_param_specs_follow_rules_and_divisibility():
  boxed = jax.eval_shape(_Annotated().init, jax.random.PRNGKey(0), jnp.ones((1, 64)))["params"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  specs = sharding.param_partition_specs(boxed, mesh)
  assert specs["wide"] == P("fsdp", "tensor")
  # Neither 3 nor 6 input / output channels: 3 is not divisible by 2, 6 is.
  assert specs["odd"] == P(None, None, None, "fsdp")
  assert specs["norm"] == P(None)
  assert specs["plain"] == P()
  # Overriding a rule: MLP over both tensor and fsdp when embed is replicated.
  rules = sharding.rules_from_config([(axes.EMBED, None), (axes.MLP, ("tensor", "fsdp"))])
  specs = sharding.param_partition_specs(boxed, mesh, rules)
  assert specs["wide"] == P(None, ("tensor", "fsdp"))
  with pytest.raises(sharding.ShardingError, match="unknown mesh axes"):
    sharding.rules_from_config([(axes.EMBED, "model")])


def test_shard_batch_places_rows_over_data_and_fsdp():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  batch = {"video": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "caption": ["x"] * 8}
  out = sharding.shard_batch(batch, mesh)
  assert set(out) == {"video"}
  assert out["video"].sharding.spec == P(("data", "fsdp"), None)
  assert len(out["video"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["video"]), batch["video"])
