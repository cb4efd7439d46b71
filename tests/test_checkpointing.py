"""Checkpointer: round trip into shardings, last-K + best retention, corrupt fallback, SIGTERM."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vidrd_jax import checkpointing
from vidrd_jax.parallel import sharding


def _state(mesh, value):
  w = jax.device_put(jnp.full((8, 4), value, jnp.float32), NamedSharding(mesh, P("fsdp", None)))
  return {"w": w, "step": jnp.asarray(int(value), jnp.int32), "rng": jax.random.PRNGKey(int(value))}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_round_trip_retention_and_best(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep_last=2, keep_best=1)
  losses = {1: 0.5, 2: 0.1, 3: 0.7, 4: 0.9, 5: 0.8}
  for step, loss in losses.items():
    assert ckpt.save(step, _state(mesh, step), data_state=b"\x00iter" + bytes([step]),
                     metrics={"loss": loss})
  ckpt.wait()
  # Last two (4, 5) plus the best loss (2).
  assert ckpt.all_steps() == [2, 4, 5]
  abstract = _abstract(_state(mesh, 0))
  step, state, data_state, meta = ckpt.restore_latest(abstract)
  assert step == 5 and data_state == b"\x00iter\x05" and meta["metrics"]["loss"] == 0.8
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 4), 5.0))
  assert state["w"].sharding.spec == P("fsdp", None)
  np.testing.assert_array_equal(np.asarray(state["rng"]), np.asarray(jax.random.PRNGKey(5)))
  ckpt.close()


def test_corrupt_latest_falls_back(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep_last=3, keep_best=0,
                                    async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(mesh, step), data_state={"pos": step}, metrics={"loss": 1.0})
  ckpt.wait()
  # Damage every file of the newest step's array data (a finished but unreadable checkpoint).
  damaged = 0
  for root, _, files in os.walk(tmp_path / "ckpt" / "2" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
      damaged += 1
  assert damaged
  step, state, data_state, _ = ckpt.restore_latest(_abstract(_state(mesh, 0)))
  assert step == 1 and data_state == {"pos": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 4), 1.0))
  # The bad step is moved aside, so a new save of step 2 does not collide with it.
  assert ckpt.all_steps() == [1]
  assert os.listdir(tmp_path / "ckpt_corrupt")
  ckpt.save(2, _state(mesh, 2), data_state={"pos": 2}, metrics={"loss": 1.0})
  ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1)
  assert ckpt.restore_latest(_abstract(_state(mesh, 0))) is None
  ckpt.close()


def test_preemption_watcher_turns_sigterm_into_a_flag():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionWatcher() as watcher:
    assert not watcher.preempted
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.preempted
  assert signal.getsignal(signal.SIGTERM) is previous


def test_bad_options():
  with pytest.raises(ValueError, match="best_mode"):
    checkpointing.Checkpointer("/tmp/unused_ckpt", save_every=1, best_mode="lowest")
  with pytest.raises(ValueError, match="keep_last"):
    checkpointing.Checkpointer("/tmp/unused_ckpt", save_every=1, keep_last=0)
