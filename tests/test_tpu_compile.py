"""TPU slices sized from this CPU host: topology names, HBM per chip, and a real libtpu compile of
the tiny train step (`train.py --compile_only --topology=v5e-4`).

libtpu lives in .venv/libtpu (the Makefile puts it there, outside the venv, so that no other JAX
process tries to start a TPU backend); only the subprocess here has it on its path.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ddt_jax import tpu_topology

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_DIR = pathlib.Path(sys.prefix) / "libtpu"


def test_topology_names_and_accelerator_types():
    assert tpu_topology.topology_name("v5e:4x4") == ("v5e", "4x4")
    assert tpu_topology.topology_name("v5e-256") == ("v5e", "16x16")
    assert tpu_topology.topology_name("v5litepod-16") == ("v5e", "4x4")
    # v4 and v5p accelerator types count TensorCores: v4-256 is 128 chips.
    assert tpu_topology.topology_name("v4-256") == ("v4", "4x4x8")
    assert tpu_topology.topology_name("v5p-128") == ("v5p", "4x4x4")
    assert tpu_topology.num_chips("v6e-16") == 16
    with pytest.raises(ValueError, match="not a v5e slice size"):
        tpu_topology.topology_name("v5e-3")
    with pytest.raises(ValueError, match="v5e:4x4 or v4:4x4x8"):
        tpu_topology.topology_name("tpu-big")
    with pytest.raises(ValueError, match="not one of"):
        tpu_topology.topology_name("v9:2x2")


def test_tiny_train_step_compiles_for_a_v5e_slice():
    if not (LIBTPU_DIR / "libtpu").is_dir():
        pytest.fail(f"libtpu is not in {LIBTPU_DIR}: `make test` installs it there "
                    "(pip install --target .venv/libtpu 'libtpu==0.0.42.*')")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(REPO), str(LIBTPU_DIR)]))
    out = subprocess.run(
        ["timeout", "-s", "KILL", "300", sys.executable, "train.py", "--config=configs/tiny.py",
         "--compile_only", "--topology=v5e-4"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    table = out.stdout
    print(table)
    assert "(4 devices, TPU v5 lite)" in table
    assert "{'data': 4, 'fsdp': 1, 'tensor': 1}" in table   # tiny.py: data parallel
    assert "device memory" in table and "16,384.00 MiB: fits" in table
    assert "XLA temporaries" in table and "total (peak estimate)" in table


def test_a_step_too_large_for_the_slice_is_a_clear_error():
    """XLA's out-of-HBM refusal becomes one line with the numbers and the settings to change."""
    if not (LIBTPU_DIR / "libtpu").is_dir():
        pytest.fail(f"libtpu is not in {LIBTPU_DIR}: `make test` installs it there")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(REPO), str(LIBTPU_DIR)]))
    out = subprocess.run(
        ["timeout", "-s", "KILL", "300", sys.executable, "train.py", "--config=configs/tiny.py",
         "--compile_only", "--topology=v5e-4", "--config.global_batch_size=1048576"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train step does not fit on 4 x TPU v5 lite"), last
    assert re.search(r"HLO temporaries \(\d+\.\d+G\) exceeds available HBM \(15\.75G\)", last)
    assert "--config.model.remat=full" in last and "grad_accum_steps" in last
    assert "Traceback" not in out.stderr
