"""Images/s of ADM's FID Inception-v3 forward (random weights, jitted): the batch sharded over
every device on a 1-D data mesh, next to the same batch on one device.

Input: uint8 images of --image_size px, resized to 299 inside the jit as ADM's evaluator does.
Timing: a warm-up call (the compile) is excluded, then the median of --repeats calls, each waited
for. On CPU, --cpu_devices splits the host into that many devices (it does not add cores).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np
from flax import nnx

from ddt_jax import sharding
from ddt_jax.models import inception


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def images_per_second(model: inception.InceptionV3, images: np.ndarray, devices,
                      repeats: int) -> float:
    """Median images/s of the forward on `images` split over `devices` (weights replicated)."""
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    if len(images) % mesh.size:
        raise ValueError(f"batch {len(images)} does not divide over {mesh.size} devices")
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.replicated(mesh))
    batch = jax.device_put(images, sharding.batch_sharding(mesh, images.ndim))
    jax.block_until_ready(_forward(graphdef, state, batch))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(_forward(graphdef, state, batch))
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", default="16,64",
                        help="comma-separated global batch sizes")
    parser.add_argument("--image_size", type=int, default=256, help="input side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="split the CPU into this many devices (CPU runs only)")
    args = parser.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    devices = jax.devices()
    model = inception.InceptionV3(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    print(f"{len(devices)} x {devices[0].device_kind}, {args.image_size}px uint8 -> 299")
    print(f"{'batch':>6} {'all devices img/s':>18} {'one device img/s':>17}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        images = rng.integers(0, 256, (batch_size, args.image_size, args.image_size, 3), np.uint8)
        every = images_per_second(model, images, devices, args.repeats)
        one = images_per_second(model, images, devices[:1], args.repeats)
        print(f"{batch_size:>6} {every:>18.1f} {one:>17.1f}")


if __name__ == "__main__":
    main()
