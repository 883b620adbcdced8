"""The EMA sample grids of a training run: the same noise and labels every time, so grids from
successive steps show the model's progress on the same samples (PNG in the workdir + TensorBoard).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from ddt_jax import convert
from ddt_jax import files
from ddt_jax import rng
from ddt_jax import sampler as sampler_lib
from ddt_jax import sharding
from ddt_jax.evaluation import images as images_lib

SAMPLES_DIR = "samples"


class GridSampler:
    """`grid(ema_params) -> uint8 (rows*H, cols*W, 3)` on every process; see `make_grid_sampler`."""

    def __init__(self, config: ml_collections.ConfigDict, model_graphdef, mesh, vae=None):
        self.config, self.model_graphdef, self.mesh = config, model_graphdef, mesh
        n, m = config.logging.num_samples, config.model
        self.vae_graphdef = self.vae_params = None
        if vae is not None:
            self.vae_graphdef, vae_state = nnx.split(vae)
            self.vae_params = sharding.host_to_replicated(vae_state.to_pure_dict(), mesh)
        side = (m.image_size, m.image_width if m.image_width is not None else m.image_size)
        noise = jax.random.normal(rng.stream(config.seed, rng.GRID_NOISE),
                                  (n, *side, m.in_channels), jnp.float32)
        labels = jnp.asarray((np.arange(n) * max(1, m.num_classes // n)) % m.num_classes,
                             jnp.int32)
        # Split over the data-parallel devices when the grid divides over them, else replicated.
        split = n % sharding.data_parallel_size(mesh) == 0
        self.noise = jax.device_put(
            noise, sharding.batch_sharding(mesh, 4) if split else sharding.replicated(mesh))
        self.labels = jax.device_put(
            labels, sharding.batch_sharding(mesh, 1) if split else sharding.replicated(mesh))
        self.sampler_key = rng.stream(config.seed, rng.GRID_SAMPLER)
        self._to_images = jax.jit(self._decode, out_shardings=sharding.replicated(mesh))

    def _decode(self, x, vae_params):
        finite = jnp.all(jnp.isfinite(x))   # uint8 casts NaN to 0: a black grid would hide it
        if self.vae_graphdef is not None:
            x = nnx.merge(self.vae_graphdef, vae_params).decode(x)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        return images_lib.to_uint8(x), finite

    def __call__(self, ema_params) -> np.ndarray:
        """The grid of `ema_params`' samples.

        Args:
          ema_params: the model's params (a pure dict of arrays on the mesh).

        Returns:
          uint8 (rows*H, cols*W, 3).

        Raises:
          FloatingPointError: the params or the samples hold NaN or Inf (no grid is made).
        """
        if not bool(_host(_all_finite(ema_params))):
            raise FloatingPointError("the EMA params hold NaN or Inf: no sample grid of them")
        with jax.set_mesh(self.mesh):
            # The sampler jits its own loop (compiled on the first grid, cached after).
            model = nnx.merge(self.model_graphdef, ema_params)
            x = sampler_lib.sample(model, self.noise, self.labels, self.config.logging.sample,
                                   key=self.sampler_key)
            images, finite = self._to_images(x, self.vae_params)
        if not bool(_host(finite)):
            raise FloatingPointError("the EMA sample grid came out NaN or Inf from finite params:"
                                     " check logging.sample (the sampler settings)")
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return images_lib.image_grid(images)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _host(x: jax.Array) -> np.ndarray:
    # A replicated scalar: the local copy is the global value, on any number of processes.
    return np.asarray(x.addressable_data(0))


def make_grid_sampler(config: ml_collections.ConfigDict, model_graphdef, mesh
                      ) -> GridSampler | None:
    """The run's grid sampler, or None when grids are off or latent grids have no VAE to decode.

    Args:
      config: the run config (logging.*, model.*, vae.*, seed).
      model_graphdef: the graphdef of the trained model (its params come with each call).
      mesh: the training mesh.

    Returns:
      A GridSampler, or None.
    """
    if config.logging.sample_every <= 0:
        return None
    vae = None
    if config.data.kind == "latent":
        if not config.vae.path:
            logging.warning("logging.sample_every > 0 but vae.path is unset: no sample grids for "
                            "latent data")
            return None
        vae = convert.load_vae(config.vae.path)
        if not math.isclose(vae.scaling_factor, config.vae.scaling_factor, rel_tol=1e-6):
            raise ValueError(f"the VAE at vae.path={config.vae.path} has scaling_factor "
                             f"{vae.scaling_factor} but vae.scaling_factor="
                             f"{config.vae.scaling_factor}: decode with the VAE the latents "
                             "were cached with")
    return GridSampler(config, model_graphdef, mesh, vae)


def write_grid(workdir: str, step: int, grid: np.ndarray) -> str:
    """Saves a grid as <workdir>/samples/step_<step>.png (process 0 only); returns the path."""
    path = files.as_path(workdir) / SAMPLES_DIR / f"step_{step:08d}.png"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return str(path)
