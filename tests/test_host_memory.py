"""host_memory.use_huge_pages: XLA:CPU's temporaries fault in 2 MiB pages instead of 4 KiB ones.

Each case is a fresh Python process (the tunable is read when a program starts): one jitted
function with a 192 MiB temp buffer, run a few times, counting the process's minor page faults
per call, with huge pages as the entry points start and with them turned off in the same process
(the benchmarks' baseline).
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

from ddt_jax import host_memory
from test_trainer import REPO

WORKER = r"""
import json, os, resource, sys
from ddt_jax import host_memory
reason = host_memory.use_huge_pages()   # does not return when it re-executes
import jax, jax.numpy as jnp

x = jnp.ones((2048, 8192), jnp.float32)   # 64 MiB


@jax.jit
def f(x):
    a = jnp.sin(x)
    b = jnp.flip(a, 0) * a + jnp.flip(a, 1)
    return (jnp.cumsum(b, axis=1) * a).sum(axis=0)


compiled = f.lower(x).compile()


def faults_per_call(n=6):
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        compiled(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults[1:]


huge = faults_per_call()
host_memory.allow_huge_pages(False)
small = faults_per_call()
print(json.dumps({"reason": reason, "in_use": host_memory.huge_pages_in_use(), "huge": huge,
                  "small": small, "pid": os.getpid(), "argv": sys.argv,
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes // 4096}))
"""

HUGE_PAGES_POSSIBLE = (host_memory.thp_mode() in ("madvise", "always")
                       and (host_memory.glibc_version() or (0,)) >= host_memory.HUGETLB_MIN_GLIBC)


def run_worker(*args, **env) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               **env)
    env.pop(host_memory.TUNABLES_ENV, None)
    out = subprocess.run([sys.executable, "-c", WORKER, *args], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HUGE_PAGES_POSSIBLE,
                    reason="needs glibc >= 2.35 and transparent huge pages (madvise or always)")
def test_use_huge_pages_cuts_the_temporaries_faults():
    run = run_worker("an-argument", **{host_memory.OPT_OUT_ENV: "0"})
    pages = run["temp_pages"]
    assert pages >= 40000, pages   # 192 MiB: far above glibc's largest mmap threshold (32 MiB)
    assert run["in_use"], run
    if host_memory.thp_mode() == "madvise":
        # Re-executed itself with the tunable, with its command line intact.
        assert run["reason"] == f"GLIBC_TUNABLES already sets {host_memory.HUGETLB_TUNABLE}"
        assert run["tunables"] == f"{host_memory.HUGETLB_TUNABLE}=1"
        assert run["argv"] == ["-c", "an-argument"], run["argv"]
    # 4 KiB pages: every call maps a fresh temp buffer and faults all of it in again.
    assert min(run["small"]) > pages // 2, run
    # 2 MiB pages: 512x fewer faults for the buffer (measured ~1,150 a call, some ~5,250: small
    # buffers, and ranges the kernel had no free huge page for).
    assert statistics.median(run["huge"]) < pages // 20, run
    assert sum(run["huge"]) * 5 < sum(run["small"]), run


def test_the_opt_out_leaves_the_process_alone():
    run = run_worker(**{host_memory.OPT_OUT_ENV: "1"})
    assert run["reason"] == f"{host_memory.OPT_OUT_ENV} is set" and run["tunables"] == ""
    if host_memory.thp_mode() != "always":
        assert not run["in_use"] and min(run["huge"]) > run["temp_pages"] // 2, run


def test_use_huge_pages_leaves_a_process_that_imported_jax_alone(monkeypatch):
    monkeypatch.delenv(host_memory.OPT_OUT_ENV, raising=False)
    monkeypatch.delenv(host_memory.TUNABLES_ENV, raising=False)
    assert "jaxlib" in sys.modules   # this test process
    assert "jax is already imported" in host_memory.use_huge_pages()


def test_use_huge_pages_is_not_for_accelerators(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not host_memory.jax_will_run_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.jax_will_run_on_cpu()


def test_the_tunable_is_added_to_the_users_own():
    assert host_memory._tunables_with_hugetlb("") == "glibc.malloc.hugetlb=1"
    assert (host_memory._tunables_with_hugetlb("glibc.malloc.arena_max=2")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
