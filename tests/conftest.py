"""Test setup: 8 virtual CPU devices (before any JAX backend starts) and parsed absl flags.

The 8 devices let every test exercise real sharding (data, fsdp, tensor axes) on a laptop CPU.
"""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from absl import flags  # noqa: E402

# grain workers and absl-logging code read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official"


@pytest.fixture
def official_dir():
    return OFFICIAL
