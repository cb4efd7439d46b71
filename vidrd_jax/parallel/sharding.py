"""Device mesh, logical-axis rules and sharding helpers, all in one place.

The models name every parameter dimension with the logical axes of
:mod:`vidrd_jax.parallel.axes`; this module turns those names into mesh axes.
The mesh has up to three axes:

* ``data``: pure data parallelism (parameters replicated),
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3),
* ``tensor``: Megatron-style model parallelism of attention heads and MLP width.

The batch is split over ``data x fsdp``. A parameter dimension is sharded over a mesh axis
only when the rules say so *and* the dimension divides evenly; otherwise it stays
replicated along that axis (e.g. GroupNorm scales of 320 channels on a 16-way fsdp axis
are fine, the 4-channel conv_in kernel is not).

Usage (big_vision style)::

  mesh = make_mesh(config.mesh)
  abstract = jax.eval_shape(init_fn, rng)             # boxed with nn.LogicallyPartitioned
  shardings = param_shardings(abstract, mesh, rules)   # same tree, NamedSharding leaves
  params = jax.jit(init_fn, out_shardings=shardings)(rng)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vidrd_jax.parallel import axes

PyTree = Any

# Mesh axis names, outermost (slowest interconnect) first.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
# The batch dimension of every input is split over these mesh axes.
BATCH_AXES = (DATA, FSDP)

# Logical axis -> mesh axes, tried in order. The one table that decides the layout.
# FSDP shards the wide side of each kernel; tensor parallelism takes the heads / MLP width.
DEFAULT_RULES: tuple[tuple[str, Optional[tuple[str, ...]]], ...] = (
    (axes.BATCH, BATCH_AXES),
    (axes.FRAMES, None),
    (axes.LENGTH, None),
    (axes.EMBED, (FSDP,)),
    (axes.MLP, (TENSOR, FSDP)),
    (axes.HEADS, (TENSOR, FSDP)),
    (axes.VOCAB, (TENSOR, FSDP)),
    (axes.CONV_IN, (FSDP,)),
    (axes.CONV_OUT, (FSDP,)),
    (axes.NORM, None),
)


class ShardingError(ValueError):
  """Mesh, batch or parameter layout that cannot work on the given devices."""


def mesh_shape_from_config(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves a ``{axis: size}`` mapping, where at most one size may be -1 ("the rest").

  Args:
    mesh_config: sizes for a subset of ``data``, ``fsdp``, ``tensor``; missing axes are 1.
    num_devices: devices the mesh must cover exactly.

  Returns:
    ``{"data": d, "fsdp": f, "tensor": t}`` with ``d * f * t == num_devices``.
  """
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  shape = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
  fill = [name for name, size in shape.items() if size == -1]
  if len(fill) > 1:
    raise ShardingError(f"at most one mesh axis may be -1, got {fill} in {dict(mesh_config)}")
  for name, size in shape.items():
    if size == 0 or size < -1:
      raise ShardingError(f"mesh axis {name!r} has size {size}; sizes are positive or -1")
  known = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ShardingError(
          f"mesh {dict(mesh_config)}: the fixed axes ({known} devices) do not divide the "
          f"{num_devices} available devices")
    shape[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ShardingError(
        f"mesh {shape} covers {known} devices but {num_devices} are available; "
        f"set one axis to -1 to absorb the rest")
  return shape


def make_mesh(mesh_config: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh described by the config.

  Args:
    mesh_config: e.g. ``{"data": 2, "fsdp": -1}``.
    devices: defaults to ``jax.devices()`` (all processes).

  Returns:
    A Mesh with axis names ``("data", "fsdp", "tensor")``.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_from_config(mesh_config, len(devices))
  dims = tuple(shape[name] for name in MESH_AXES)
  if len(devices) == len(jax.devices()):
    try:
      # Topology-aware placement (keeps fsdp / tensor groups on fast links on TPU).
      device_array = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # pylint: disable=broad-except
      # Fallback for device counts mesh_utils has no layout for (e.g. odd CPU counts).
      device_array = np.asarray(devices).reshape(dims)
  else:
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(rules: Optional[Iterable[Sequence[Any]]] = None) -> tuple[tuple[str, Any], ...]:
  """Normalises rule overrides from a config (``[(logical, mesh_axes_or_None), ...]``).

  Overrides replace the default rule of the same logical axis; other defaults stay.
  """
  table = dict(DEFAULT_RULES)
  for rule in rules or ():
    if len(rule) != 2:
      raise ShardingError(f"a sharding rule is (logical_axis, mesh_axes), got {rule!r}")
    logical, mesh_axes = rule
    if mesh_axes is not None:
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      bad = set(mesh_axes) - set(MESH_AXES)
      if bad:
        raise ShardingError(f"rule for {logical!r} names unknown mesh axes {sorted(bad)}")
    table[logical] = mesh_axes
  return tuple(table.items())


def _spec_for_shape(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """Mesh PartitionSpec for one array from its logical names, respecting divisibility.

  Each mesh axis is used at most once per array; a dimension takes the rule's mesh axes
  that divide it (in rule order) and are still free.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    chosen = []
    for mesh_axis in (table.get(name) or ()) if name is not None else ():
      axis_size = mesh.shape[mesh_axis]
      if mesh_axis in used or axis_size == 1:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * axis_size) == 0:
        chosen.append(mesh_axis)
        used.add(mesh_axis)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def param_partition_specs(boxed_params: PyTree, mesh: Mesh,
                          rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PyTree:
  """PartitionSpecs for a (possibly abstract) parameter tree carrying logical names.

  Args:
    boxed_params: output of ``model.init`` or ``jax.eval_shape(model.init, ...)`` with
      ``nn.LogicallyPartitioned`` boxes; unboxed leaves are replicated.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.

  Returns:
    The unboxed tree structure with a PartitionSpec per leaf.
  """
  def spec(leaf):
    if _is_boxed(leaf):
      value = leaf.value
      names = tuple(leaf.names)
      if len(names) != len(value.shape):
        raise ShardingError(f"logical names {names} do not match parameter shape {value.shape}")
      return _spec_for_shape(names, value.shape, mesh, rules)
    return P()
  return jax.tree.map(spec, boxed_params, is_leaf=_is_boxed)


def param_shardings(boxed_params: PyTree, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PyTree:
  """NamedShardings for every parameter leaf (see :func:`param_partition_specs`)."""
  specs = param_partition_specs(boxed_params, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def fsdp_shardings_for(tree: PyTree, mesh: Mesh) -> PyTree:
  """Shards each array of an unannotated tree on its largest fsdp-divisible dimension.

  For trees the models do not annotate (e.g. frozen encoders loaded from disk), so large
  weights still do not sit whole on every device.
  """
  n = mesh.shape[FSDP]

  def spec(x):
    shape = np.shape(x)
    if n == 1 or not shape:
      return NamedSharding(mesh, P())
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
      if shape[i] % n == 0 and shape[i] >= n:
        parts = [None] * len(shape)
        parts[i] = FSDP
        return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())
  return jax.tree.map(spec, tree)


def unbox(tree: PyTree) -> PyTree:
  """Strips ``nn.LogicallyPartitioned`` boxes."""
  return nn.meta.unbox(tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-leading array: dim 0 over ``data x fsdp``, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_axes(mesh, *, nontrivial: bool = False) -> tuple[tuple[str, ...], int]:
  """The axes of ``BATCH_AXES`` that ``mesh`` (concrete or abstract) has, and their product.

  ``nontrivial`` leaves out axes of size 1 (a ``shard_map`` over them only adds overhead).
  """
  names = tuple(a for a in BATCH_AXES
                if a in mesh.axis_names and not (nontrivial and mesh.shape[a] == 1))
  return names, math.prod(mesh.shape[a] for a in names)


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "global batch size") -> None:
  """Raises if the batch cannot be split evenly over ``data x fsdp`` and the processes."""
  n = batch_parallelism(mesh)
  if global_batch_size <= 0 or global_batch_size % n:
    raise ShardingError(
        f"{what} {global_batch_size} is not divisible by the data-parallel size {n} "
        f"(mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]})")
  if global_batch_size % jax.process_count():
    raise ShardingError(
        f"{what} {global_batch_size} is not divisible by the {jax.process_count()} processes")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global batch arrays from this process's slice (numpy leaves).

  Each process passes its own ``global_batch / process_count`` examples; non-array leaves
  (e.g. caption strings) are dropped. Returns jax Arrays sharded over ``data x fsdp``.
  """
  out = {}
  for key, value in batch.items():
    if isinstance(value, (np.ndarray, jax.Array)) and np.asarray(value).dtype.kind in "biuf":
      value = np.asarray(value)
      out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
  return out
