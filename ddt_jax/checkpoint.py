"""Checkpoints of a training run: train state, EMA, REPA projector and data position, atomically.

One orbax `CheckpointManager` under `<workdir>/checkpoints/<step>/` holds two items per step:

    state   the train state, a dict of (sharded) arrays whose key layout `weights.TrainState`
            owns (see ddt_jax/weights.py): this module knows only the two items, not their keys
    data    the grain iterator's position, one JSON per process (so a resumed run sees exactly the
            batches an uninterrupted one would have seen)

Saves are asynchronous (the step loop continues while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when every item of every process is written, so a
run killed mid-save leaves a temporary directory that the next start deletes, and resumes from the
last complete step.

`PreemptionGuard` tells the loop when the job is being preempted (SIGTERM on one process; JAX's
preemption sync point, agreed by all hosts, on several).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM = "state", "data"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    # Absolute: orbax finalises saves in a background thread whose working directory may differ.
    return os.path.abspath(os.path.join(os.fspath(workdir), CHECKPOINT_DIR))


def _type_handlers():
    """orbax's default handlers, but each replicated array is written whole by its first replica.

    orbax's default "replica-parallel" save slices every replicated array into one piece per
    replica, one eager jax op per (array, slice), each compiled on first use: the first save of the
    1.3M-param tiny model ran 1952 of them (10 s of its 10.6 s on 2 CPU cores). Our big arrays are
    FSDP-sharded, so there is little to parallelise across replicas anyway.
    """
    return ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
        (str, ocp.type_handlers.StringHandler()),
    )


class Checkpointer:
    """A CheckpointManager for (state, data iterator) pairs; see the module docstring."""

    def __init__(self, workdir: str | os.PathLike, checkpoint_config, *, read_only: bool = False):
        cfg = checkpoint_config
        if cfg.every_steps <= 0:
            raise ValueError(f"checkpoint.every_steps must be positive, got {cfg.every_steps}")
        preserve = [ocp.checkpoint_managers.LatestN(cfg.keep)]   # None: keep every checkpoint
        if cfg.keep_every_steps > 0:
            # Milestones survive the LatestN rotation (e.g. every 100k steps for later FID curves).
            preserve.append(ocp.checkpoint_managers.EveryNSteps(cfg.keep_every_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(cfg.every_steps),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,   # leftovers of a save that was killed mid-way
            create=not read_only,
            read_only=read_only,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={
                STATE_ITEM: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                DATA_ITEM: grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_iterator=None, *,
             force: bool = False) -> bool:
        """Starts saving `state` (a dict of arrays) and the iterator, unless the policy skips it.

        Args:
          step: the training step the checkpoint is filed under.
          state: the `state` item, a pytree of arrays (e.g. `weights.TrainState.to_dict()`).
          data_iterator: a grain iterator whose position is saved as the `data` item; None: no
            `data` item.
          force: save even if `step` is not a multiple of `every_steps` (preemption, end of
            training).

        Returns:
          True if a save was started (in the background with `async_save`; `wait`/`close` block
          until it is written), False if the save policy skipped `step`.
        """
        items = {STATE_ITEM: ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict[str, Any] | None,
                data_iterator=None) -> dict[str, Any] | None:
        """Restores the state into `abstract_state`'s shardings (None: only the iterator, in place).

        Args:
          step: the checkpointed step to read.
          abstract_state: the `state` item's tree of ShapeDtypeStructs (with shardings), or None
            to skip the `state` item.
          data_iterator: a grain iterator to set, in place, to the saved position; None: the
            `data` item is not read.

        Returns:
          The restored `state` tree (arrays in `abstract_state`'s shardings), or None if
          `abstract_state` is None.
        """
        items = {}
        if abstract_state is not None:
            items[STATE_ITEM] = ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM] if abstract_state is not None else None

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str | os.PathLike, abstract: dict[str, Any],
                   step: int | None = None) -> dict[str, Any]:
    """Restores a subset of a run's train state, e.g. {"ema_params": ...} to sample or fine-tune.

    Args:
      path: a workdir, its `checkpoints/` directory or one `checkpoints/<step>` directory.
      abstract: a dict of ShapeDtypeStructs (with shardings) for the keys wanted; other keys of
        the `state` item are not read.
      step: the step to read under a workdir or `checkpoints/` directory; None: the latest
        complete one. Ignored when `path` is a step directory.

    Returns:
      `abstract`'s tree of arrays, in its shardings.

    Raises:
      FileNotFoundError: no complete checkpoint under `path`, or none for `step`.
    """
    path = epath.Path(os.path.abspath(os.fspath(path)))
    if (path / CHECKPOINT_DIR).exists():
        path = path / CHECKPOINT_DIR
    if (path / STATE_ITEM).exists():          # one step directory
        item_dir = path / STATE_ITEM
    else:
        steps = ocp.utils.checkpoint_steps(path) if path.exists() else []
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        step = max(steps) if step is None else step
        item_dir = path / str(step) / STATE_ITEM
        if not item_dir.exists():
            raise FileNotFoundError(
                f"no checkpoint for step {step} under {path} (have {sorted(steps)})")
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True))


class PreemptionGuard:
    """`reached(step)` turns True once the job should save and stop.

    One process: a SIGTERM handler sets a flag (the default action would kill the process mid-step).
    Several processes: JAX's preemption service catches SIGTERM on any host and all hosts agree on
    the step to stop at (`reached_preemption_sync_point` must be called on every host every step);
    a private flag could make hosts stop at different steps and deadlock the save.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._multiprocess = jax.process_count() > 1
        self._previous = None
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        del frame
        logging.warning("received signal %d: saving a checkpoint at the end of this step, "
                        "then stopping", signum)
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multiprocess:
            return ocp.multihost.reached_preemption(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
