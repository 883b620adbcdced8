"""glibc malloc settings that stop XLA:CPU from faulting in fresh pages on every step.

XLA:CPU allocates one buffer for all of an executable's temporaries on every call (DDT-S/2's
train step at batch 8: 1.6 GB) with posix_memalign, from a worker thread. glibc serves a block
that large with a fresh mmap and unmaps it when it is freed, so every step page-faults its whole
temp buffer in again: 399,180 minor faults (1.8 s of system time) per 8-9 s step on one thread.
PyTorch's step, whose tensors are smaller than glibc's mmap threshold, faults almost never.

`keep_freed_memory()` makes glibc serve large blocks from its heap and keep freed memory there
(one arena, no mmap, no trim below 2 GiB), so the second and later steps reuse warm pages: 0
faults per step, and the S/2 step 1.31x faster in the same process
(benchmarks/cpu_train_step.py, row "row_major, glibc malloc").

It must run before JAX starts its CPU client: glibc fixes the number of arenas the first time a
second thread allocates, and a thread's own arena would still mmap a block that large. The entry
points (train.py, sample.py, evaluate.py, the benchmarks) call it before importing jax. It only
applies where JAX will run on the CPU (no accelerator plugin installed, or JAX_PLATFORMS=cpu):
on a GPU or TPU host the temporaries live in device memory, and one arena would only serialise
the input pipeline's threads. DDT_JAX_SYSTEM_MALLOC=1 turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Free memory at the top of the heap is returned to the OS only above this (mallopt takes an
# int): 2 GiB, more than one S/2 or B/2 step's temporaries.
TRIM_THRESHOLD_BYTES = 2**31 - 1
MMAP_MAX_DEFAULT = 65536   # glibc's own default for M_MMAP_MAX
OPT_OUT_ENV = "DDT_JAX_SYSTEM_MALLOC"

_applied = False


def _glibc():
    """The process's glibc (ctypes.CDLL), or None on another C library or OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None   # e.g. musl: no gnu_get_libc_version, and no such mallopt parameters
    return libc


def jax_will_run_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting JAX.

    True when JAX_PLATFORMS names cpu first, or when no accelerator plugin (a `jax_plugins`
    entry point or module, e.g. jax-cuda12-plugin, or libtpu) is installed.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(name) is not None
                   for name in ("jax_plugins", "libtpu"))


def keep_freed_memory() -> bool:
    """Configures glibc malloc to reuse XLA:CPU's temporaries' pages (see the module docstring).

    Call before importing jax. A no-op (returns False) off glibc, when JAX will not run on the
    CPU, once jax is imported, with DDT_JAX_SYSTEM_MALLOC=1, or after a first call.

    Returns:
      Whether the settings were applied by this call.
    """
    global _applied
    if _applied or os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return False
    if "jaxlib" in sys.modules:
        # Too late to choose arenas for XLA's threads, and a running program (e.g. pytest that
        # imported an entry point) should keep the malloc it started with.
        return False
    libc = _glibc()
    if libc is None or not jax_will_run_on_cpu():
        return False
    ok = (libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
          and libc.mallopt(M_MMAP_MAX, 0))
    _applied = bool(ok)
    return _applied


def allow_mmap(allowed: bool) -> None:
    """Lets glibc mmap large blocks again (its default) or not: the benchmarks' in-process
    baseline. Only meaningful after `keep_freed_memory()` applied."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT if allowed else 0)


def applied() -> bool:
    """Whether `keep_freed_memory()` changed this process's malloc settings."""
    return _applied
