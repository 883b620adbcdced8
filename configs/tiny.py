"""A 1.3M-parameter DDT on synthetic data: the CPU config of the tests and of quick smoke runs.

    python train.py --config=configs/tiny.py --workdir=/tmp/ddt_tiny            # latents + REPA
    python train.py --config=configs/tiny.py:pixel --workdir=/tmp/ddt_tiny_px   # 32x32 RGB pixels

Same code path as the XL recipe (every field not set here is the schema's XL/2 default):
VAE-moment sampling, REPA against a 3-block DINOv2 from the test fixtures (its 4x4 tokens are
resized to the model's 8x8, the official bilinear path), label dropout, EMA, checkpoints, samples.
A step takes ~0.3 s on 2 busy CPU cores (8 virtual devices).
"""
import os

from ddt_jax import config_schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DINOV2 = os.path.join(REPO, "tests", "fixtures", "official", "dinov2_tiny.safetensors")


def get_config(arg: str | None = None):
    arg = arg or "latent"
    if arg not in ("latent", "pixel"):
        raise ValueError(f"tiny config argument must be 'latent' or 'pixel', got {arg!r}")
    c = config_schema.default_config()
    c.num_train_steps = 10
    c.global_batch_size = 16          # 2 examples on each of 8 test devices

    c.model.variant = "S/1"           # patch 1: 64 tokens on 8x8 latents
    c.model.hidden_size = 128
    c.model.num_heads = 4
    c.model.num_blocks = 4
    c.model.num_encoder_blocks = 3
    c.model.num_classes = 10
    c.model.dtype = "float32"         # bf16 matmuls are slower than f32 on CPUs

    c.data.source = "synthetic"
    c.data.kind = arg
    c.data.num_classes = 10
    c.data.num_records = 256
    c.data.read_threads = 1
    c.data.prefetch = 2
    if arg == "latent":
        c.data.image_size = 64        # 8x8x4 latents (SD-VAE factor 8) + 64x64 images for DINOv2
        c.data.channels = 4
        c.data.with_image = True
        c.model.in_channels, c.model.image_size = 4, 8
    else:
        c.data.image_size = 32        # pixels in [-1, 1]; the model sees them directly
        c.data.channels = 3
        c.data.with_image = False
        c.model.in_channels, c.model.image_size = 3, 32
        c.model.variant = "S/4"       # 64 tokens of 4x4x3 patches
        c.repa.weight = 0.0           # no raw images: no REPA

    c.repa.align_layer = 2
    c.repa.projector_dim = None       # the model's hidden size
    c.repa.feature_dim = 64           # the tiny DINOv2's width
    c.repa.dinov2_path = TINY_DINOV2
    c.repa.dinov2_dtype = "float32"
    c.repa.dinov2_num_heads = 4       # tests/fixtures/official/dinov2_tiny.json

    c.mesh.data = -1                  # pure data parallelism over the 8 test devices
    c.mesh.fsdp = 1

    c.checkpoint.every_steps = 5
    c.checkpoint.keep = 2
    c.checkpoint.keep_every_steps = 0

    c.logging.log_every = 5
    c.logging.sample_every = 0        # sample grids cost a jit of the sampler; tests turn them on
    c.logging.num_samples = 8
    c.logging.sample.num_steps = 4
    return c
