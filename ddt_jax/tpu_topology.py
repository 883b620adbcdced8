"""Abstract TPU slices on any host: `devices("v5e-256")` -> the devices to AOT-compile a run for.

`train.py --compile_only --topology=...` compiles the real train step for a TPU slice from a CPU
machine (libtpu's compiler through `jax.experimental.topologies`; no TPU needed) and compares its
memory per device with the chip's HBM, so a pod run is sized before it is launched.

Names: the topology form libtpu takes (`v5e:16x16`, `v4:4x4x8`, `v5p:4x4x4`, `v6e:4x4`) or the
Cloud TPU accelerator type (`v5e-256`, `v5litepod-16`, `v4-256`, `v5p-128`, `v6e-16`). In the
accelerator types of v4 and v5p the number counts TensorCores (2 per chip), in those of v5e and
v6e it counts chips.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies

GIB = 2**30
# HBM per chip (Cloud TPU documentation, system architecture pages).
HBM_PER_CHIP = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# The device_kind libtpu reports for each generation.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v6lite": "v6e"}
# Chip grids of the slice shapes Cloud TPU offers, by chip count.
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_HOW_TO_INSTALL = ('install libtpu (pip install -e ".[tpu]"): it holds the TPU compiler that '
                   "compiles for a slice from this host")


class LibtpuMissing(RuntimeError):
    """libtpu (the TPU compiler) is not installed."""


def topology_name(name: str) -> tuple[str, str]:
    """(generation, chip grid) of a topology or accelerator-type name, e.g. ('v5e', '16x16').

    Raises:
      ValueError: an unknown generation or a slice size Cloud TPU does not offer.
    """
    match = re.fullmatch(r"(v[0-9a-z]+)[:=_]([0-9]+(?:x[0-9]+)+)", name.strip().lower())
    if match:
        generation, grid = match.groups()
    else:
        match = re.fullmatch(r"(v[0-9a-z]+)-([0-9]+)", name.strip().lower())
        if not match:
            raise ValueError(f"TPU topology {name!r}: use a topology like v5e:4x4 or v4:4x4x8, "
                             "or an accelerator type like v5e-16, v4-256, v5p-128, v6e-16")
        generation, count = match.group(1), int(match.group(2))
        generation = _ALIASES.get(generation, generation)
        three_d = generation in ("v4", "v5p")
        chips = count // 2 if three_d else count
        grids = _GRIDS_3D if three_d else _GRIDS_2D
        if chips not in grids:
            offered = ", ".join(f"{generation}-{c * 2 if three_d else c}" for c in grids)
            raise ValueError(f"{name!r}: {chips} chips is not a {generation} slice size "
                             f"(offered: {offered})")
        grid = grids[chips]
    generation = _ALIASES.get(generation, generation)
    if generation not in HBM_PER_CHIP:
        raise ValueError(f"TPU generation {generation!r} of {name!r} is not one of "
                         f"{sorted(HBM_PER_CHIP)}")
    return generation, grid


def devices(name: str) -> list:
    """The abstract devices of a TPU slice, to pass to `trainer.compile_only(devices=...)`.

    Args:
      name: a topology (`v5e:4x4`) or an accelerator type (`v5e-16`).

    Returns:
      The slice's devices, one per chip (v4 and v5p chips as one megacore device, as JAX runs
      them on a real slice).

    Raises:
      ValueError: an unknown name; LibtpuMissing: libtpu is not installed.
    """
    generation, grid = topology_name(name)
    # Compiling for a slice never runs on a TPU: let this process load libtpu even when another
    # process (a second compile, a test) already holds libtpu's single-process lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu's default for v4 is one device per TensorCore (8 for v4-8); JAX on a v4 or v5p slice
    # runs each chip as one megacore device, so compile for that.
    options = {"chip_config_name": "megacore"} if generation in ("v4", "v5p") else {}
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing(f"cannot compile for {name}: {_HOW_TO_INSTALL}")
    topology = topologies.get_topology_desc(f"{generation}:{grid}", "tpu", **options)
    return list(topology.devices)


def hbm_per_device(device) -> int | None:
    """Bytes of accelerator memory one device may use: a TPU chip's HBM (one device per chip, as
    `devices` makes them), or what a local GPU reports; None when unknown (CPU)."""
    generation = DEVICE_KINDS.get(getattr(device, "device_kind", ""))
    if generation is not None:
        return HBM_PER_CHIP[generation]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU and abstract devices have no memory stats
        return None
    return None if not stats else stats.get("bytes_limit")


def describe(devices_: list) -> str:
    """'16 x TPU v5 lite (16 GiB each)' for a report's header."""
    hbm = hbm_per_device(devices_[0])
    kind = devices_[0].device_kind
    return f"{len(devices_)} x {kind}" + ("" if hbm is None else f" ({hbm / GIB:g} GiB each)")


def num_chips(name: str) -> int:
    """Chips of a topology or accelerator-type name."""
    return math.prod(int(x) for x in topology_name(name)[1].split("x"))
