"""Transparent huge pages for XLA:CPU's temporaries: an entry point re-executes itself once.

XLA:CPU allocates one buffer for all of an executable's temporaries on every call (DDT-S/2's
train step at batch 8: 1.6 GB) with posix_memalign, from a worker thread. glibc serves a block
that large with a fresh mmap and unmaps it when it is freed, so every step page-faults its whole
temp buffer in again, 4 KiB at a time: 399,180 minor faults per step, which made the S/2 step on
one thread 1.3x (AMD EPYC host) to 1.9x (Xeon host) slower than the same executable without them.
PyTorch's step, whose tensors are smaller than glibc's mmap threshold, faults almost never.

glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) makes malloc madvise its mmapped blocks
for transparent huge pages: the kernel then maps the temp buffer in 2 MiB pages, 512x fewer
faults (~1,100 per S/2 step). Tunables are read only when a program starts, so
`use_huge_pages()` re-executes the process (same pid, argv and open files) with the tunable
added to GLIBC_TUNABLES, before anything else has run. It only does so where it helps: Linux with
glibc >= 2.35, the kernel's THP mode "madvise" (with "always" the kernel already uses huge pages;
with "never" nothing can), and JAX running on the CPU (on a GPU or TPU the temporaries live in
device memory). DDT_JAX_SYSTEM_MALLOC=1, or a GLIBC_TUNABLES that already sets the tunable,
leaves the process alone.

An earlier version kept the freed buffer in glibc's heap instead (one malloc arena, no mmap):
0 faults, but with one arena every thread contends for one lock, and the test suite's train.py
runs (several XLA threads and a data pipeline) took 1.2-1.35x longer; huge pages cost them
nothing measurable.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pathlib
import sys

OPT_OUT_ENV = "DDT_JAX_SYSTEM_MALLOC"
TUNABLES_ENV = "GLIBC_TUNABLES"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
HUGETLB_MIN_GLIBC = (2, 35)   # the first glibc with glibc.malloc.hugetlb
THP_MODE_FILE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
PR_SET_THP_DISABLE = 41        # prctl option (linux/prctl.h)


def _glibc():
    """The process's glibc (ctypes.CDLL), or None on another C library or OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None   # e.g. musl: no gnu_get_libc_version, and no glibc tunables
    return libc


def glibc_version() -> tuple[int, ...] | None:
    """glibc's (major, minor), or None when the process does not run on glibc."""
    libc = _glibc()
    if libc is None:
        return None
    return tuple(int(x) for x in libc.gnu_get_libc_version().decode().split(".")[:2])


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


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


def _tunables_with_hugetlb(tunables: str) -> str:
    return f"{tunables}:{HUGETLB_TUNABLE}=1" if tunables else f"{HUGETLB_TUNABLE}=1"


def reexec_reason() -> str | None:
    """Why `use_huge_pages()` would leave this process alone, or None when it would re-exec."""
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return f"{OPT_OUT_ENV} is set"
    if HUGETLB_TUNABLE in os.environ.get(TUNABLES_ENV, ""):
        return f"{TUNABLES_ENV} already sets {HUGETLB_TUNABLE}"
    if "jaxlib" in sys.modules:
        return "jax is already imported (re-executing would discard a running program)"
    version = glibc_version()
    if version is None or version < HUGETLB_MIN_GLIBC:
        return f"not glibc >= {'.'.join(map(str, HUGETLB_MIN_GLIBC))} (found {version})"
    mode = thp_mode()
    if mode != "madvise":
        return f"the kernel's transparent huge page mode is {mode!r}, not 'madvise'"
    if not jax_will_run_on_cpu():
        return "JAX will not run on the CPU"
    if not getattr(sys, "orig_argv", None):
        return "the command line is unknown (sys.orig_argv)"
    return None


def use_huge_pages() -> str:
    """Re-executes this process with glibc.malloc.hugetlb=1 where that helps (module docstring).

    Call it first thing in an entry point's `if __name__ == "__main__"` code, before jax or any
    thread starts and before anything is printed or read: the process image is replaced, so all
    state is lost and the program starts over (same pid). It does not return when it re-executes.

    Returns:
      Why the process was left alone (`reexec_reason()`), when it was.
    """
    reason = reexec_reason()
    if reason is not None:
        return reason
    env = dict(os.environ)
    env[TUNABLES_ENV] = _tunables_with_hugetlb(env.get(TUNABLES_ENV, ""))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:   # e.g. the interpreter was removed since it started
        return f"re-executing {sys.executable} failed: {e}"
    raise AssertionError("unreachable: execve returned")


def huge_pages_in_use() -> bool:
    """Whether malloc's large blocks get transparent huge pages in this process: the kernel's
    THP mode is "always", or "madvise" and glibc >= 2.35 started with glibc.malloc.hugetlb=1."""
    mode = thp_mode()
    if mode == "always":
        return True
    version = glibc_version()
    tunables = os.environ.get(TUNABLES_ENV, "").split(":")
    return (mode == "madvise" and version is not None and version >= HUGETLB_MIN_GLIBC
            and f"{HUGETLB_TUNABLE}=1" in tunables)


def allow_huge_pages(allowed: bool) -> None:
    """Turns transparent huge pages off (False) or back on (True) for this process's new page
    faults, via prctl(PR_SET_THP_DISABLE): the benchmarks' in-process 4 KiB-page baseline."""
    libc = _glibc()
    if libc is None or libc.prctl(PR_SET_THP_DISABLE, 0 if allowed else 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno() if libc else 0,
                      "prctl(PR_SET_THP_DISABLE) failed: needs Linux >= 3.15 and glibc")
