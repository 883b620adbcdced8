"""Checkpoints of a training run: train state, EMA and REPA projector, atomically and verified.

One orbax `CheckpointManager` under `<workdir>/checkpoints/<step>/` (local or gs://) holds the

    state   the train state, a dict of (sharded) arrays whose key layout `weights.TrainState`
            owns (see ddt_jax/weights.py): this module knows only the items, not their keys

The data position needs no item: the pipeline's batch s is a function of the step
(input_pipeline/pipeline.py), so a run resumes with the batch an uninterrupted run would have seen
next, on any number of processes. (Checkpoints of earlier versions also hold a `data` item, the
grain iterator's position per process; it is not read.)

Saves are asynchronous (the step loop continues while the arrays are written) and atomic: orbax
writes into a temporary directory and, when every item of every process is written, renames it
(on GCS, where a rename is not atomic, it writes a commit marker instead), so a run killed mid-save
leaves an unfinished step that the next start ignores and deletes, and resumes from the last
complete step.

Every save is verified on restore. With the arrays it writes a second item,

    checksums   one JSON (process 0): a 64-bit digest, shape and dtype of every array of `state`,
                computed on device from the arrays being saved

so the digests commit atomically with the step and nothing is read back. A restore recomputes the
digests on device from the arrays it read and also requires them to be finite; a step that fails
(a changed byte, a truncated or missing file or item, an orbax/tensorstore read error, NaN/Inf) is
a `CheckpointError` naming its directory and the reason. `restore_latest` then falls back to the
newest step that verifies, setting the bad ones aside under `<workdir>/rejected_checkpoints/`, or
stops naming every bad step and the fix. A save refuses a non-finite state.

`PreemptionGuard` tells the loop when the job is being preempted (SIGTERM on one process; JAX's
preemption sync point, agreed by all hosts, on several).
"""
from __future__ import annotations

import functools
import gc
import json
import os
import signal
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddt_jax import files

CHECKPOINT_DIR = "checkpoints"
REJECTED_DIR = "rejected_checkpoints"     # beside checkpoints/: steps that failed verification
STATE_ITEM, CHECKSUMS_ITEM = "state", "checksums"
CHECKSUMS_FILE = "checksums.json"         # <step>/checksums/checksums.json
CHECKSUMS_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (the message names its path and why), or none usable."""


class LayoutError(CheckpointError):
    """An intact checkpoint of another model or optimizer than the one it is restored into."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """<workdir>/checkpoints: absolute when local (orbax finalises saves in a background thread
    whose working directory may differ), gs://... as it is."""
    return os.fspath(files.as_path(workdir) / CHECKPOINT_DIR)


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


# -------------------------------------------------------------------------------------------------
# Digests: computed on device, so a save reads nothing back and any sharding gives the same value.

# Odd multipliers of murmur3's finaliser and the golden ratio: mixing steps that are bijections
# on uint32, so a change of any one element always changes the sum.
_K = tuple(np.uint32(k) for k in (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x7FEB352D, 0x846CA68B))


def _uint32_words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 (one word per element; 8-byte elements give a trailing 2)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2^32), from iotas. No reshape: flattening a (1152, 3072)
    kernel split over its second axis would regather it on every device."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride = stride * shape[axis] % 2 ** 32
    return index


def _mix(h: jax.Array, a, b) -> jax.Array:
    h = h * a
    h = h ^ (h >> 16)
    h = h * b
    return h ^ (h >> 13)


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(two uint32 lane sums, all finite) of one array: position-keyed, so moved values count."""
    words = _uint32_words(x)
    index = _positions(words.shape)
    lane0 = jnp.sum(_mix(words ^ (index * _K[0]), _K[1], _K[2]), dtype=jnp.uint32)
    lane1 = jnp.sum(_mix(words + index * _K[3] + _K[0], _K[4], _K[1]), dtype=jnp.uint32)
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.bool_(True))
    return jnp.stack([lane0, lane1]), finite


@functools.lru_cache(maxsize=None)
def _digest_program(replicated):
    # One small program per (shape, dtype, sharding), reused across the tree's leaves: a single
    # program over every leaf compiled in 5 s for the tiny state's 265 arrays but in 47 s for
    # 1,400 (XL's count), and jit caches these by signature (18 for the tiny state).
    return jax.jit(_leaf_digest, out_shardings=replicated)


# Programs dispatched before their results are read. Each one all-reduces a sharded array's sums;
# with 265 in flight at once, XLA's CPU collectives (8 devices on 2 cores) deadlocked.
_DIGESTS_IN_FLIGHT = 8


def _replicated(x) -> jax.sharding.Sharding | None:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def _host_value(x: jax.Array) -> np.ndarray:
    # The digests are replicated: any local copy is the global value, on any number of hosts.
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def digests(tree) -> dict[str, dict[str, Any]]:
    """The on-device digest of every array of `tree`, keyed by its path.

    Args:
      tree: a pytree of jax (or numpy) arrays, e.g. the train state; leaves without a dtype
        are skipped.

    Returns:
      {keystr path: {"digest": 16 hex digits, "shape": [...], "dtype": "float32", "finite": bool}}.
      Equal arrays give equal digests whatever their sharding or mesh (exact integer sums); a
      changed element always changes the digest.
    """
    pairs = [(jax.tree_util.keystr(path), x)
             for path, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "dtype")]
    out = {}
    for start in range(0, len(pairs), _DIGESTS_IN_FLIGHT):
        wave = pairs[start:start + _DIGESTS_IN_FLIGHT]
        results = [_digest_program(_replicated(x))(x) for _, x in wave]
        for (key, x), (sums, finite) in zip(wave, results):
            sums = _host_value(sums)
            out[key] = {"digest": f"{int(sums[0]):08x}{int(sums[1]):08x}",
                        "shape": list(x.shape), "dtype": str(x.dtype),
                        "finite": bool(_host_value(finite))}
    return out


def _verify(tree, record: dict | None) -> list[str]:
    """What is wrong with restored arrays: non-finite values, or digests unlike the record's."""
    problems = []
    for key, got in digests(tree).items():
        if not got["finite"]:
            problems.append(f"{key} holds NaN or Inf")
        if record is None:
            continue
        want = record["arrays"].get(key)
        if want is None:
            problems.append(f"{key} has no recorded checksum")
        elif [want["shape"], want["dtype"]] != [got["shape"], got["dtype"]]:
            problems.append(f"{key} is {got['dtype']}{got['shape']} but was saved as "
                            f"{want['dtype']}{want['shape']}")
        elif want["digest"] != got["digest"]:
            problems.append(f"{key} reads back with checksum {got['digest']}, saved with "
                            f"{want['digest']}")
    return problems


def _read_record(step_dir: epath.Path) -> dict | None:
    """The checksums item of a step directory; None for a step saved without one."""
    path = step_dir / CHECKSUMS_ITEM / CHECKSUMS_FILE
    if not (step_dir / CHECKSUMS_ITEM).exists():
        return None
    try:
        record = json.loads(path.read_text())
        record["arrays"]   # noqa: B018 - a record without arrays is damaged
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{step_dir}: its checksums cannot be read ({_brief(e)})") from e
    return record


def _brief(error: BaseException) -> str:
    """The first line of the innermost cause: orbax wraps tensorstore's "Error reading <array> in
    <file>: byte range not valid" in a message that is mostly a JSON spec (kilobytes)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:400]}"


def _layout_problems(abstract: dict[str, Any], record: dict, *, whole: bool) -> list[str]:
    """How `abstract` differs from the arrays a checksums record lists (shapes, dtypes, keys)."""
    saved = record["arrays"]
    wanted = {jax.tree_util.keystr(path): x
              for path, x in jax.tree_util.tree_leaves_with_path(abstract)}
    problems = []
    for key, x in wanted.items():
        if key not in saved:
            problems.append(f"{key} is not in the checkpoint")
        elif [saved[key]["shape"], saved[key]["dtype"]] != [list(x.shape), str(x.dtype)]:
            problems.append(f"{key} is saved as {saved[key]['dtype']}{saved[key]['shape']}, "
                            f"wanted as {x.dtype}{list(x.shape)}")
    if whole:
        problems += [f"{key} is saved but not wanted" for key in saved if key not in wanted]
    return problems


def _check_layout(step_dir: epath.Path, abstract: dict[str, Any], record: dict | None, *,
                  whole: bool) -> None:
    """Raises LayoutError, before orbax reads anything, for targets unlike the saved arrays: a
    restore into other shapes fails on every array at once (a cascade of tracebacks)."""
    problems = [] if record is None else _layout_problems(abstract, record, whole=whole)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LayoutError(
            f"{step_dir} is intact but holds another model or optimizer state than the one it is "
            f"restored into: {'; '.join(problems[:3])}{more}. Use the settings it was saved with "
            "(the run's config.json), or train in a new --workdir")


def _collect_abandoned_reads() -> None:
    """orbax leaves the other reads of a failed restore pending: collected later (at exit), each
    prints "Exception ignored ... Event loop is closed". Collect them now, quietly."""
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if not ((code is not None and "orbax" in code.co_filename)
                or "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process, so all of them accept or reject a step together."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _check_readable(step_dir: epath.Path, error: BaseException | None) -> None:
    """Raises CheckpointError on every process if reading the step failed on any of them."""
    if not _all_processes(error is None):
        reason = _brief(error) if error is not None else "it failed to read on another process"
        raise CheckpointError(f"{step_dir} cannot be read ({reason})") from error


def _check_verified(step_dir: epath.Path, problems: list[str]) -> None:
    if not _all_processes(not problems):
        shown = "; ".join(problems[:3]) if problems else "it failed on another process"
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{step_dir} fails verification: {shown}{more}")


class Checkpointer:
    """A CheckpointManager of train states with checksums; see the module docstring."""

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
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={
                STATE_ITEM: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(filename=CHECKSUMS_FILE)})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def save(self, step: int, state: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving `state` (a dict of arrays) and its checksums, unless the policy skips
        the step.

        Args:
          step: the training step the checkpoint is filed under.
          state: the `state` item, a pytree of arrays (e.g. `weights.TrainState.to_dict()`).
          force: save even if `step` is not a multiple of `every_steps` (preemption, end of
            training).

        Returns:
          True if a save was started (in the background with `async_save`; `wait`/`close` block
          until it is written), False if the save policy skipped `step`.

        Raises:
          FloatingPointError: `state` holds NaN or Inf (nothing is written).
        """
        if not force and not self.manager.should_save(step):
            return False
        arrays = digests(state)
        bad = [key for key, d in arrays.items() if not d["finite"]]
        if bad:
            raise FloatingPointError(
                f"not saving step {step} in {self.directory}: {len(bad)} arrays hold NaN or Inf "
                f"({', '.join(bad[:3])}); a checkpoint is only written of a finite state")
        record = {"version": CHECKSUMS_VERSION,
                  "arrays": {k: {f: d[f] for f in ("digest", "shape", "dtype")}
                             for k, d in arrays.items()}}
        items = {STATE_ITEM: ocp.args.PyTreeSave(state)}
        items[CHECKSUMS_ITEM] = ocp.args.JsonSave(record)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict[str, Any]) -> dict[str, Any]:
        """Restores and verifies the state, in `abstract_state`'s shardings.

        Args:
          step: the checkpointed step to read.
          abstract_state: the `state` item's tree of ShapeDtypeStructs (with shardings).

        Returns:
          The restored `state` tree (arrays in `abstract_state`'s shardings).

        Raises:
          CheckpointError: the step cannot be read, or what it read differs from what was saved
            (its checksums) or is not finite; the message names the step directory and why.
        """
        step_dir = self.step_dir(step)
        record = _read_record(step_dir)
        _check_layout(step_dir, abstract_state, record, whole=True)
        items = {STATE_ITEM: ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        restored, error = None, None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
            error = e
            _collect_abandoned_reads()
        _check_readable(step_dir, error)
        state = restored[STATE_ITEM]
        _check_verified(step_dir, _verify(state, record))
        if record is None:
            logging.warning("%s has no checksums (saved before they were recorded): restored "
                            "it unverified (only checked to be finite)", step_dir)
        return state

    def restore_latest(self, abstract_state: dict[str, Any]
                       ) -> tuple[int | None, dict[str, Any] | None]:
        """Restores the newest step that verifies; bad newer steps are reported and set aside.

        Args:
          abstract_state: as for `restore`.

        Returns:
          (step, restored state) of the newest step that verifies, or (None, None) when there is
          no checkpoint at all.

        Raises:
          CheckpointError: there are checkpoints but none verifies; the message names each with
            its reason and what to do. Nothing on disk is changed then.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None, None
        recorded = {s: (self.step_dir(s) / CHECKSUMS_ITEM).exists() for s in steps}
        rejected = []
        for step in steps:
            try:
                older = [t for t in steps if t < step and recorded[t]]
                if not recorded[step] and older:
                    raise CheckpointError(
                        f"{self.step_dir(step)} has no checksums item although step {older[0]} "
                        "has one: the step is incomplete")
                state = self.restore(step, abstract_state)
            except LayoutError:
                raise   # every step has the run's layout: no fallback helps
            except CheckpointError as e:
                logging.warning("%s", e)
                rejected.append((step, str(e)))
                continue
            self._set_aside(rejected)
            if rejected:
                logging.warning("resuming from step %d, the newest checkpoint that verifies",
                                step)
            return step, state
        raise CheckpointError(
            f"no checkpoint in {self.directory} verifies: "
            + " | ".join(reason for _, reason in rejected)
            + f". Restore these step directories from a copy, or move them away (e.g. into "
            f"{epath.Path(self.directory).parent / REJECTED_DIR}) to start the run "
            "from scratch, or train in a new --workdir")

    def _set_aside(self, rejected: list[tuple[int, str]]) -> None:
        """Moves rejected steps to <workdir>/rejected_checkpoints/<step> (with the reason), so
        the resumed run can save those steps again and the files stay for inspection."""
        if not rejected or self.read_only:
            return
        if jax.process_index() == 0:
            target_root = epath.Path(self.directory).parent / REJECTED_DIR
            target_root.mkdir(parents=True, exist_ok=True)
            for step, reason in rejected:
                target, n = target_root / str(step), 1
                while target.exists():
                    target, n = target_root / f"{step}.{n}", n + 1
                self.step_dir(step).rename(target)
                (target / "REJECTED.txt").write_text(reason + "\n")
                logging.warning("moved the rejected step %d to %s", step, target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("ddt_checkpoint_set_aside")
        self.manager.reload()

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
      CheckpointError: the step cannot be read, or the arrays read differ from their checksums
        or are not finite (the message names the step directory, the reason and the fix).
    """
    path = files.as_path(path)
    if (path / CHECKPOINT_DIR).exists():
        path = path / CHECKPOINT_DIR
    if (path / STATE_ITEM).exists():          # one step directory
        step_dir, steps = path, None
    else:
        steps = sorted(ocp.utils.checkpoint_steps(path)) if path.exists() else []
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        step = max(steps) if step is None else step
        step_dir = path / str(step)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} under {path} (have {steps})")
    others = ("" if not steps or len(steps) < 2 else
              f" (other steps: {[s for s in steps if s != step]})")
    fix = f"; read another step{others} or another run"
    try:
        restored = _read_partial(step_dir / STATE_ITEM, abstract, _read_record(step_dir))
    except CheckpointError as e:
        raise CheckpointError(f"{e}{fix}") from e
    return restored


def _read_partial(item_dir: epath.Path, abstract: dict[str, Any], record: dict | None
                  ) -> dict[str, Any]:
    """`abstract`'s subset of a state item, verified against `record` (None: only finiteness)."""
    step_dir = item_dir.parent
    if not item_dir.exists():
        raise CheckpointError(f"{step_dir} cannot be read (its {STATE_ITEM} item is missing)")
    _check_layout(step_dir, abstract, record, whole=False)
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract)
    restored, error = None, None
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
        error = e
        _collect_abandoned_reads()
    _check_readable(step_dir, error)
    _check_verified(step_dir, _verify(restored, record))
    if record is None:
        logging.warning("%s has no checksums (saved before they were recorded): read it "
                        "unverified (only checked to be finite)", step_dir)
    return restored


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
            # A handler before this one that recorded a SIGTERM (train.py's, while it imports)
            # hands it over: the run stops before its first step.
            if getattr(self._previous, "received", False):
                self._flag.set()

    def _handler(self, signum, frame):
        del frame
        logging.warning("received signal %d: stopping at the end of this step (saving it) or, "
                        "during start-up, before the first step", signum)
        self._flag.set()

    def requested(self) -> bool:
        """Whether a SIGTERM came, on one process (e.g. during start-up, before any step).

        Several processes: always False; their hosts agree on a step to stop at in the loop.
        """
        return not self._multiprocess and self._flag.is_set()

    def reached(self, step: int) -> bool:
        if self._multiprocess:
            return ocp.multihost.reached_preemption(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
