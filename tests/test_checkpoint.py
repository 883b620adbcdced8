"""The checkpoint manager of training runs (ddt_jax/checkpoint.py), on 8 CPU devices.

    .venv/bin/python -m pytest tests/test_checkpoint.py -q

Whole-run behaviour (resume == uninterrupted, SIGKILL mid-save, SIGTERM) is in test_trainer.py.
"""
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import sharding


def ckpt_config(**kw):
    c = ml_collections.ConfigDict(dict(every_steps=2, keep=2, keep_every_steps=0, async_save=True))
    c.update(kw)
    return c


def make_state(mesh, value=1.0):
    fsdp = NamedSharding(mesh, P("fsdp", None))
    return {"step": jnp.int32(3),
            "params": {"w": jax.device_put(value * jnp.arange(32.0).reshape(8, 4), fsdp)},
            "opt_state": (jnp.zeros(()), {"mu": jax.device_put(jnp.full((8, 4), value), fsdp)})}


def abstract(state, mesh, spec):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
        if a.ndim == 2 else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                 sharding=NamedSharding(mesh, P())),
        state)


def test_roundtrip_with_resharding(tmp_path):
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    state = make_state(mesh)
    ckpt = checkpoint_lib.Checkpointer(tmp_path, ckpt_config())
    assert ckpt.latest_step() is None
    assert ckpt.save(2, state)
    ckpt.close()

    # Restore on another layout (split over data instead of fsdp).
    mesh2 = sharding.create_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    ckpt = checkpoint_lib.Checkpointer(tmp_path, ckpt_config())
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(2, abstract(state, mesh2, P("data", None)))
    ckpt.close()
    assert restored["params"]["w"].sharding.spec == P("data", None)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The items: the state and its checksums (no data-iterator item).
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "2").iterdir()
                  if p.is_dir()) == ["checksums", "state"]


def test_interval_force_and_retention(tmp_path):
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    state = make_state(mesh)
    ckpt = checkpoint_lib.Checkpointer(tmp_path,
                                       ckpt_config(every_steps=2, keep=2, keep_every_steps=4))
    saved = [step for step in range(1, 10) if ckpt.save(step, state)]
    assert saved == [2, 4, 6, 8]
    assert ckpt.save(9, state, force=True)          # preemption / end of training
    ckpt.close()
    # The 2 latest plus the every-4 milestones.
    assert sorted(checkpoint_lib.Checkpointer(tmp_path, ckpt_config()).all_steps()) == [4, 8, 9]


def test_incomplete_save_is_ignored(tmp_path):
    """(A real SIGKILL mid-save, and its clean-up on restart: test_trainer.py.)"""
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    ckpt = checkpoint_lib.Checkpointer(tmp_path, ckpt_config())
    ckpt.save(2, make_state(mesh))
    ckpt.close()
    # What a process killed mid-save leaves behind: a temporary directory with part of the items.
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    ckpt = checkpoint_lib.Checkpointer(tmp_path, ckpt_config())
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
    ckpt.close()


def test_restore_params_reads_a_subset(tmp_path):
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    ckpt = checkpoint_lib.Checkpointer(tmp_path, ckpt_config())
    ckpt.save(2, make_state(mesh, 1.0))
    ckpt.save(4, make_state(mesh, 2.0))
    ckpt.close()
    want = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                                 sharding=NamedSharding(mesh, P()))}}
    latest = checkpoint_lib.restore_params(tmp_path, want)
    np.testing.assert_array_equal(latest["params"]["w"], 2.0 * np.arange(32.0).reshape(8, 4))
    assert set(latest) == {"params"}
    older = checkpoint_lib.restore_params(tmp_path / "checkpoints" / "2", want)
    np.testing.assert_array_equal(older["params"]["w"], np.arange(32.0).reshape(8, 4))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint_lib.restore_params(tmp_path / "nowhere", want)


def test_preemption_guard_catches_sigterm():
    guard = checkpoint_lib.PreemptionGuard()
    try:
        assert not guard.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.reached(2)
    finally:
        guard.close()
    assert signal.getsignal(signal.SIGTERM) is not guard._handler
