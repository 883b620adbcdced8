"""How far bfloat16 VAE moments are from float32 ones (`prepare_imagenet --vae_dtype`).

    python benchmarks/vae_dtype_error.py                          # random SD-VAE-shaped weights
    python benchmarks/vae_dtype_error.py --vae=/ckpt/sd_vae       # the VAE you will cache with

Encodes the ADM crops of the images in --images (default: the test fixtures' six images, which
carry texture, edges and gradients) with the same weights in float32 and in bfloat16 compute, and
prints the max / RMS difference of the mean and of the logvar, each relative to the spread of the
float32 values, and of the scaled latent `scaling_factor * mean` against its std, the number that
decides whether bfloat16 caching changes what the model trains on.
"""
from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from PIL import Image

from ddt_jax import convert
from ddt_jax.models import vae as vae_lib
from input_pipeline import prepare_imagenet

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "center_crop"

flags.DEFINE_string("vae", None, "a VAE convert.load_vae reads; default: random SD-VAE shape")
flags.DEFINE_string("images", os.fspath(FIXTURES), "folder of images to crop and encode")
flags.DEFINE_integer("resolution", 256, "crop side")
FLAGS = flags.FLAGS


def _crops(folder: str, size: int) -> np.ndarray:
    paths = sorted(p for p in pathlib.Path(folder).iterdir()
                   if p.suffix.lower() in prepare_imagenet.IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    crops = [prepare_imagenet.center_crop(Image.open(p), size) for p in paths]
    # The mirrored crops double the sample at no cost (and are what --flips would encode).
    return np.stack(crops + [c[:, ::-1] for c in crops])


def _moments(vae, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(state, images):
        return nnx.merge(graphdef, state).encode(images.astype(jnp.float32) / 127.5 - 1.0)

    mean, logvar = encode(state, crops)
    return np.asarray(mean, np.float64), np.asarray(logvar, np.float64)


def _row(name: str, a: np.ndarray, b: np.ndarray) -> str:
    diff, spread = np.abs(a - b), a.std()
    return (f"{name:<14} max |diff| {diff.max():9.2e} ({diff.max() / spread:7.2%} of std)   "
            f"rms {np.sqrt((diff ** 2).mean()):9.2e} ({np.sqrt((diff ** 2).mean()) / spread:7.2%})"
            f"   std {spread:.3g}")


def main(argv):
    del argv
    if FLAGS.vae:
        f32 = convert.load_vae(FLAGS.vae, dtype=jnp.float32)
        bf16 = convert.load_vae(FLAGS.vae, dtype=jnp.bfloat16)
        name = FLAGS.vae
    else:
        f32 = vae_lib.AutoencoderKL(vae_lib.SD_VAE_CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))
        bf16 = vae_lib.AutoencoderKL(vae_lib.SD_VAE_CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        name = "random SD-VAE-shaped weights (rngs 0)"
    crops = _crops(FLAGS.images, FLAGS.resolution)
    mean32, logvar32 = _moments(f32, crops)
    mean16, logvar16 = _moments(bf16, crops)
    s = f32.scaling_factor
    print(f"{name}: {len(crops)} crops of {FLAGS.resolution}px from {FLAGS.images}, "
          f"{jax.devices()[0].device_kind}")
    print(_row("mean", mean32, mean16))
    print(_row("logvar", logvar32, logvar16))
    print(_row("scaled latent", s * mean32, s * mean16))
    std32 = np.exp(logvar32 / 2).mean()
    print(f"posterior std exp(logvar/2) averages {std32:.3g} (in latent units): the sampling noise "
          f"every training step adds, beside the bfloat16 error of the mean above")


if __name__ == "__main__":
    app.run(main)
