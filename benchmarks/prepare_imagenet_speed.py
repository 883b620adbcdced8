"""Speed of the ImageNet latent-caching tool: decode + ADM crop alone vs the whole tool.

    python benchmarks/prepare_imagenet_speed.py                  # small random VAE, 256 px
    python benchmarks/prepare_imagenet_speed.py --vae_config=sd  # the SD-VAE's shape (random)

Generates ImageNet-like JPEGs (500x375, quality 90, smooth content with texture) and measures
images/s of (a) decode + crop on the worker pool alone and (b) `prepare_imagenet.prepare` end to
end (decode, crop, VAE encode over all local devices, record writing), compile excluded (the
second of two runs). Prints the ratio, the projected hours for ImageNet's 1,281,167 training
images on this machine, and the bytes per record on disk (raw uint8 image) beside what a PNG of
the same crop would take.
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from PIL import Image

from ddt_jax.models import vae as vae_lib
from input_pipeline import prepare_imagenet
from input_pipeline import records

IMAGENET_TRAIN = 1_281_167
SMALL_VAE = {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
             "latent_channels": 4}

flags.DEFINE_integer("num_images", 256, "generated JPEGs")
flags.DEFINE_integer("resolution", 256, "crop side")
flags.DEFINE_integer("workers", os.cpu_count() or 2, "decode threads")
flags.DEFINE_integer("batch_size", 0, "VAE batch (0: 8 per local device)")
flags.DEFINE_enum("vae_config", "small", ["small", "sd"], "random VAE: small, or the SD-VAE shape")
FLAGS = flags.FLAGS


def _write_jpegs(root: str, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"n{i % 4:08d}")
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), np.int16)
        noise = rng.integers(-12, 13, base.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        image.save(os.path.join(folder, f"img_{i:05d}.JPEG"), quality=90)


def _decode_rate(paths: list[str], size: int, workers: int, kind: str = "thread") -> float:
    with prepare_imagenet.make_pool(kind, workers) as pool:
        sizes = [size] * len(paths)
        list(pool.map(prepare_imagenet.load_crop, paths[:workers], sizes))   # warm (spawns)
        start = time.perf_counter()
        list(pool.map(prepare_imagenet.load_crop, paths, sizes, chunksize=4 if kind == "process"
                      else 1))
    return len(paths) / (time.perf_counter() - start)


def main(argv):
    del argv
    size = FLAGS.resolution
    batch = FLAGS.batch_size or 8 * jax.local_device_count()
    config = SMALL_VAE if FLAGS.vae_config == "small" else vae_lib.SD_VAE_CONFIG
    vae = vae_lib.AutoencoderKL(config, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "train")
        _write_jpegs(src, FLAGS.num_images)
        source = prepare_imagenet.FolderSource.open(src)
        paths = [os.path.join(src, rel) for rel, _ in source.files]
        one = _decode_rate(paths, size, 1)
        pool = _decode_rate(paths, size, FLAGS.workers)
        procs = _decode_rate(paths, size, FLAGS.workers, "process")

        def run(out):
            args = prepare_imagenet.PrepareArgs(
                source=f"folder:{src}", vae=f"random {FLAGS.vae_config}", output=out,
                resolution=size, batch_size=batch, workers=FLAGS.workers, shard_size=128,
                progress=False)
            start = time.perf_counter()
            info = prepare_imagenet.prepare(args, source=source, vae=vae)
            return info, time.perf_counter() - start

        run(os.path.join(tmp, "warm"))          # compiles the encoder
        encode = _encode_rate(vae, paths, size, batch)
        info, seconds = run(os.path.join(tmp, "out"))
        tool = info["num_records"] / seconds
        shard_bytes = sum(os.path.getsize(os.path.join(tmp, "out", records.shard_filename(
            k, info["num_shards"]))) for k in range(info["num_shards"]))
        crop = prepare_imagenet.load_crop(paths[0], size)
        png = _png_size(crop)

    print(f"{jax.local_device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"{FLAGS.num_images} JPEGs 500x375 -> {size}px, VAE {FLAGS.vae_config} (random), "
          f"batch {batch}")
    print(f"decode + crop, 1 thread:              {one:8.1f} images/s")
    print(f"decode + crop, {FLAGS.workers:2d} threads:            {pool:8.1f} images/s")
    print(f"decode + crop, {FLAGS.workers:2d} processes:          {procs:8.1f} images/s")
    print(f"VAE encode alone (all local devices): {encode:8.1f} images/s")
    print(f"whole tool (decode, VAE, write):      {tool:8.1f} images/s "
          f"({tool / pool:.2f}x of decode alone, {tool / encode:.2f}x of the VAE alone)")
    print(f"projected for {IMAGENET_TRAIN:,} images: {IMAGENET_TRAIN / tool / 3600:.1f} h "
          f"(decode alone would take {IMAGENET_TRAIN / pool / 3600:.1f} h)")
    print(f"record on disk: {shard_bytes / info['num_records'] / 1024:.1f} KiB per image "
          f"(raw uint8 image {size * size * 3 / 1024:.0f} KiB + float32 moments "
          f"{np.prod(info['element_spec']['moments']['shape']) * 4 / 1024:.0f} KiB, zstd); "
          f"a PNG of the crop would be {png / 1024:.1f} KiB")


def _encode_rate(vae, paths: list[str], size: int, batch: int) -> float:
    encoder = prepare_imagenet.Encoder(vae, batch)
    crops = np.stack([prepare_imagenet.load_crop(p, size) for p in paths[:batch]])
    np.asarray(encoder(crops))   # compile
    reps = max(1, 64 // batch)
    start = time.perf_counter()
    outs = [encoder(crops) for _ in range(reps)]
    for out in outs:
        np.asarray(out)
    return reps * batch / (time.perf_counter() - start)


def _png_size(crop: np.ndarray) -> int:
    with tempfile.TemporaryFile() as f:
        Image.fromarray(crop).save(f, format="PNG")
        return f.tell()


if __name__ == "__main__":
    app.run(main)
