"""host_memory.keep_freed_memory: XLA:CPU's temporaries reuse warm pages instead of fresh mmaps.

Each case is a fresh Python process (glibc's arena settings only take before threads start):
one jitted function with a 192 MiB temp buffer, run a few times, counting the process's minor
page faults per call.
"""
import json
import os
import subprocess
import sys

import pytest

from ddt_jax import host_memory
from test_trainer import REPO

WORKER = r"""
import json, resource
from ddt_jax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

x = jnp.ones((2048, 8192), jnp.float32)   # 64 MiB


@jax.jit
def f(x):
    a = jnp.sin(x)
    b = jnp.flip(a, 0) * a + jnp.flip(a, 1)
    return (jnp.cumsum(b, axis=1) * a).sum(axis=0)


compiled = f.lower(x).compile()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[1:],
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes // 4096}))
"""


def run_worker(**env) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               **env)
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc malloc only")
def test_keep_freed_memory_reuses_the_temporaries_pages():
    default = run_worker(**{host_memory.OPT_OUT_ENV: "1"})
    tuned = run_worker(**{host_memory.OPT_OUT_ENV: "0"})
    assert not default["applied"] and tuned["applied"]
    pages = tuned["temp_pages"]
    assert pages >= 40000, pages   # 192 MiB: far above glibc's largest mmap threshold (32 MiB)
    # glibc's default: every call maps a fresh temp buffer and faults all of it in again.
    assert min(default["faults"]) > pages // 2, default
    # Tuned: the freed buffer stays in the heap, and calls that find it whole reuse it with no
    # faults. (A call whose block was split by small allocations in between takes a fresh one.)
    assert min(tuned["faults"]) < pages // 100, tuned
    assert sum(tuned["faults"]) < sum(default["faults"]), (tuned, default)


def test_keep_freed_memory_leaves_a_process_that_imported_jax_alone():
    assert "jaxlib" in sys.modules   # this test process
    assert not host_memory.keep_freed_memory() and not host_memory.applied()


def test_keep_freed_memory_is_not_for_accelerators(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not host_memory.jax_will_run_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.jax_will_run_on_cpu()
