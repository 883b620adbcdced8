"""Device mesh, logical-axis rules and batch placement (MaxText vocabulary: data, fsdp, tensor).

Every parameter names its axes logically (`embed`, `mlp`, `qkv`, `heads`, ...; see
ddt_jax/models/layers.py). A config's `mesh.rules` map those names to mesh axes, so the same model
runs data-parallel on one host, FSDP on a pod, or with tensor parallelism, by changing the config
only.

The batch is split over `data` and `fsdp` together (FSDP is data parallelism whose replicas also
split the weights); `tensor` devices see the same examples.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def auto_fsdp_size(num_devices: int, fsdp_widths: Sequence[int]) -> int:
    """The largest divisor of `num_devices` that divides every FSDP-sharded width.

    XL's `embed` is 1152 = 2^7 * 9: FSDP over 256 chips would leave every weight replicated
    (10.8 GB of state per chip); this picks fsdp = 128 and data = 2 instead.
    """
    return max(d for d in range(1, num_devices + 1)
               if num_devices % d == 0 and all(w % d == 0 for w in fsdp_widths))


def mesh_shape(mesh_config, num_devices: int,
               fsdp_widths: Sequence[int] | None = None) -> tuple[int, ...]:
    """Resolves the config's (data, fsdp, tensor) sizes.

    One size may be -1 (= the rest of the devices). data = fsdp = -1 splits the rest between them:
    fsdp = `auto_fsdp_size(rest, fsdp_widths)` (all of the rest when no widths are given), so
    that every FSDP-sharded weight divides evenly, and data = the remainder.
    """
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if free == ["data", "fsdp"]:
        tensor = sizes[2]
        if tensor <= 0 or num_devices % tensor:
            raise ValueError(f"mesh tensor={tensor} does not divide the {num_devices} devices")
        rest = num_devices // tensor
        fsdp = auto_fsdp_size(rest, fsdp_widths or [rest])
        return rest // fsdp, fsdp, tensor
    if len(free) > 1:
        raise ValueError("at most one mesh axis may be -1 (the rest of the devices), or data and "
                         f"fsdp together (split by the model widths); got "
                         f"{dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1; got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {fixed}")
        sizes[MESH_AXES.index(free[0])] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None, *,
                fsdp_widths: Sequence[int] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes (sizes from `mesh_shape`).

    Not Explicit axes: those turn sharding constraints into asserts.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices), fsdp_widths)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
    """Config rules -> {logical: (mesh axes...)}.

    Each rule is (logical, mesh_axis | (mesh_axes...) | None).
    """
    out = {}
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"each logical-axis rule is (logical_name, mesh_axes); got {rule!r}")
        name, axes = rule
        if name == "batch":
            raise ValueError(
                f"mesh.rules has a rule for 'batch' ({rule!r}), but the batch is always split over "
                f"{BATCH_AXES} (the data-parallel axes; see sharding.batch_sharding): remove it")
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {unknown}; "
                             f"mesh axes are {MESH_AXES}")
        out[name] = axes
    return out


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: Mapping[str, tuple[str, ...]], *, what: str = "array") -> P:
    """A PartitionSpec for an array whose axes have logical names.

    A mesh axis is used at most once per array (the first logical axis that maps to it wins), and a
    dimension that does not divide evenly over its mesh axes stays replicated (e.g. the 1001-row
    label table over fsdp=8): uneven shards would cost padding and surprise checkpoint readers.
    """
    spec, fallbacks = _resolve_spec(logical, shape, mesh, rules, what)
    for name, dim, axes, size in fallbacks:
        logging.info("%s: axis %r (%d) does not divide over %s (%d): replicated",
                     what, name, dim, axes, size)
    return spec


def _resolve_spec(logical, shape, mesh, rules, what):
    """(PartitionSpec, [(logical name, dim, mesh axes, their size)] that fell back to
    replication because dim does not divide)."""
    if len(logical) != len(shape):
        raise ValueError(f"{what}: {len(logical)} logical axis names {tuple(logical)} "
                         f"for shape {tuple(shape)}")
    used, spec, fallbacks = set(), [], []
    for name, dim in zip(logical, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"{what}: logical axis {name!r} has no rule in mesh.rules "
                             f"(known: {sorted(rules)}); add ({name!r}, None) to replicate it")
        axes = tuple(a for a in rules[name] if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            fallbacks.append((name, dim, axes, size))
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec), fallbacks


def _variable_axes(variable) -> tuple | None:
    metadata = variable.get_metadata()
    axes = metadata.get("out_sharding") or metadata.get("sharding_names")
    return tuple(axes) if axes else None


def logical_to_named(state, mesh: jax.sharding.Mesh, rules) -> object:
    """NamedShardings for an nnx.State (abstract or concrete) from its params' logical-axis names.

    Variables without metadata are replicated. Returns a tree of the same structure as `state`.
    """
    rules = rules if isinstance(rules, dict) else rules_dict(rules)

    def one(path, variable):
        value = variable.get_value()
        axes = _variable_axes(variable)
        name = "/".join(str(p) for p in path)
        spec = P() if axes is None else logical_to_spec(axes, value.shape, mesh, rules, what=name)
        return variable.replace(NamedSharding(mesh, spec))

    return nnx.map_state(one, state)


def _logical_leaves(states):
    """(path name, shape, dtype, logical axes) of every variable with axis names of an nnx.State
    or a sequence of them."""
    for state in ([states] if isinstance(states, nnx.State) else states):
        for path, variable in nnx.to_flat_state(state):
            axes = _variable_axes(variable)
            value = variable.get_value()
            if axes is not None:
                yield "/".join(str(p) for p in path), tuple(value.shape), value.dtype, axes


def fsdp_widths(state, rules) -> list[int]:
    """The dims of `state` (an nnx.State or a sequence of them; abstract is enough) that the rules
    split over fsdp."""
    rules = rules if isinstance(rules, dict) else rules_dict(rules)
    return sorted({dim for _, shape, _, axes in _logical_leaves(state)
                   for name, dim in zip(axes, shape)
                   if name is not None and "fsdp" in rules.get(name, ())})


# A weight the rules shard but whose dim does not divide is replicated. Up to this share of the
# state's bytes that is harmless (XL's 1001-row label table is 0.2%); above it, memory per device
# is silently far above what the mesh promises, so it is an error.
MAX_FALLBACK_SHARE = 0.05


def check_replication_fallbacks(state, mesh: jax.sharding.Mesh, rules, *,
                                max_share: float = MAX_FALLBACK_SHARE) -> None:
    """Raises when weights the rules split are replicated for more than `max_share` of the bytes.

    Args:
      state: an nnx.State or a sequence of them (abstract is enough) whose variables carry
        logical axis names.
      mesh: the mesh the state will be placed on.
      rules: `mesh.rules` (or its `rules_dict`).
      max_share: the largest tolerated share of the state's bytes.

    Raises:
      ValueError: naming the largest replicated weights and a mesh that shards them.
    """
    rules = rules if isinstance(rules, dict) else rules_dict(rules)
    total, fallen = 0, []
    for name, shape, dtype, axes in _logical_leaves(state):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        total += nbytes
        _, dropped = _resolve_spec(axes, shape, mesh, rules, name)
        if dropped:
            fallen.append((nbytes, name, shape, dropped))
    share = sum(f[0] for f in fallen) / max(total, 1)
    if share <= max_share:
        return
    fallen.sort(reverse=True)
    def describe(name, shape, dropped):
        why = ", ".join(f"{n}={d} over {a}={size}" for n, d, a, size in dropped)
        return f"{name} {shape} ({why})"

    shown = "; ".join(describe(name, shape, drop) for _, name, shape, drop in fallen[:4])
    widths = fsdp_widths(state, rules)
    n = mesh.size // mesh.shape["tensor"]
    fsdp = auto_fsdp_size(n, widths)
    raise ValueError(
        f"mesh {dict(mesh.shape)} leaves {share:.0%} of the state's bytes replicated because "
        f"their dims do not divide over it: {shown}. Use --config.mesh.data={n // fsdp} "
        f"--config.mesh.fsdp={fsdp} (or data=-1 fsdp=-1, which picks it from the widths "
        f"{widths})")


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis split over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh,
                     process_count: int | None = None) -> int:
    """Returns the per-process batch size, or raises saying why the global batch cannot be split."""
    process_count = jax.process_count() if process_count is None else process_count
    dp = data_parallel_size(mesh)
    if global_batch_size % dp:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {dp} data-parallel "
            f"devices (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
            f"choose a multiple of {dp}")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{process_count} processes (hosts); each host loads an equal share")
    return global_batch_size // process_count


def host_to_global(batch: Mapping[str, np.ndarray],
                   mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch (this host's contiguous share) -> global arrays over (data, fsdp).

    Each process passes its local rows; `make_array_from_process_local_data` places them on the
    process's devices, so the global batch is the concatenation over processes in process order.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def host_to_sharded(tree, shardings):
    """Host (numpy) values -> global arrays in `shardings` (one sharding, or a matching tree).

    Every process holds the whole tree; each device copies its own shard from its host
    (`jax.make_array_from_callback`), so nothing is gathered or sent between hosts.
    """
    def put(value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda v: put(v, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def host_to_replicated(tree, mesh: jax.sharding.Mesh):
    """Host (or device) values -> arrays replicated over every device of `mesh`."""
    return host_to_sharded(tree, replicated(mesh))


def bytes_per_device(tree) -> int:
    """Bytes one device holds for a tree of (abstract or concrete) arrays with NamedShardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# JAX's default. A process declared dead stops the whole job (every process aborts), so the
# timeout trades how long the survivors of a real failure wait (measured on 2 CPU processes:
# 90 s after a SIGKILL of process 1; 11 s with 10) against false alarms: heartbeats are sent by
# a thread of JAX's distributed client, not by the Python loop, so a long compile or save does
# not miss them, only a process stalled as a whole (SIGSTOP, swapping, a host off the network).
# train.py --heartbeat_timeout sets it.
HEARTBEAT_TIMEOUT_SECONDS = 100
# JAX's default: how long jax.distributed.initialize waits for every process to connect. A peer
# that never starts (a typo in its flags, a host that did not boot) leaves the others waiting this
# long, then each aborts with "DEADLINE_EXCEEDED ... RegisterTask" (measured: 5.0 s at 5).
# train.py --init_timeout sets it.
INIT_TIMEOUT_SECONDS = 300

# Environment variables that mean "one of several processes" on the clusters JAX auto-detects.
_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                  "JAX_COORDINATOR_ADDRESS")
# PCI vendor id of Google's TPU chips, as /sys/bus/pci/devices/*/vendor lists it.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_vm() -> bool:
    """True on a Cloud TPU VM (a TPU chip on this host's PCI bus), whatever its env variables.

    Plain Cloud TPU VMs set none of the cluster variables: there jax.distributed.initialize()
    must run anyway (it finds the slice's peers from the metadata server, and is harmless on a
    single host), or orbax's multi-host barriers fail at the first save.
    """
    for vendor in pathlib.Path("/sys/bus/pci/devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def multiprocess_environment() -> bool:
    """True where jax.distributed.initialize() can find its peers by itself.

    That is on TPU VMs, SLURM and Open MPI clusters with more than one process, and wherever
    JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID).
    """
    value = {name: os.environ.get(name, "") for name in _CLUSTER_HINTS}
    return ("," in value["TPU_WORKER_HOSTNAMES"]
            or any(value[n].isdigit() and int(value[n]) > 1
                   for n in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
            or bool(value["JAX_COORDINATOR_ADDRESS"]) or tpu_vm())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return int(value)


def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, *,
                         heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
                         init_timeout_seconds: int = INIT_TIMEOUT_SECONDS) -> None:
    """jax.distributed.initialize for the entry points, then one log line per process.

    Peers come from, in order: the flags; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; auto-detection on TPU VMs (always), SLURM and Open MPI. Otherwise one process.
    Must run before anything touches a JAX backend.

    A process that dies (SIGKILL, OOM, a lost host) takes the others down within about
    `heartbeat_timeout_seconds`: the coordination service (in process 0) stops sensing its
    heartbeats and every process aborts with "Terminating process because the JAX distributed
    service detected fatal errors ... The following tasks are unhealthy (stopped sending
    heartbeats): <process ids>". Without it they would wait in the step's collective (gloo's
    all-reduce did not notice the dead peer: process 0 sat in the step until the heartbeat check
    stopped it). When process 0 itself dies the others lose the service and abort at once
    (measured: 0.5 s).

    Args:
      coordinator_address: HOST:PORT of process 0 (with num_processes and process_id).
      num_processes: the number of processes.
      process_id: this process's index.
      heartbeat_timeout_seconds: how long the coordination service waits for a process's
        heartbeat before declaring it dead and stopping every process (must be positive).
      init_timeout_seconds: how long each process waits for all of them to connect before it
        aborts (must be positive).

    Raises:
      ValueError: a timeout is not positive.
    """
    for name, value in (("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                        ("init_timeout_seconds", init_timeout_seconds)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    timeouts = {"heartbeat_timeout_seconds": int(heartbeat_timeout_seconds),
                "initialization_timeout": int(init_timeout_seconds)}
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address:
        num_processes = num_processes if num_processes is not None else _env_int(
            "JAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
        # Said first: if a peer never connects, JAX aborts this process with a bare deadline.
        logging.info("process %s of %s: connecting to the coordinator at %s; waiting up to %d s "
                     "for every process to connect (train.py --init_timeout)", process_id,
                     num_processes, coordinator_address, init_timeout_seconds)
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id, **timeouts)
    elif multiprocess_environment():
        logging.info("multi-process environment detected: waiting up to %d s for every process "
                     "to connect (train.py --init_timeout)", init_timeout_seconds)
        jax.distributed.initialize(**timeouts)
    logging.info("process %d of %d: %d local devices %s; %d devices in all",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 [d.id for d in jax.local_devices()], jax.device_count())
