"""A synthetic random-access source with the element spec of real shards, for tests and benchmarks.

Example `i` is a pure function of (seed, i): smooth random fields (a coarse 4x4 Gaussian grid,
bilinearly upsampled, so neighbouring pixels correlate like images do) and a uniform label. The
pipeline runs unchanged on it, without files.
"""
from __future__ import annotations

import numpy as np

from input_pipeline import records

COARSE = 4   # coarse-grid size of the random fields: ~4 blobs per side, smooth at every resolution
LOGVAR_MEAN = -6.0   # typical SD-VAE log-variance: the posterior is narrow compared with the mean


def _upsample_matrix(n_out: int) -> np.ndarray:
    """(n_out, COARSE) linear interpolation matrix, align_corners style, for smooth fields."""
    pos = np.linspace(0, COARSE - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), COARSE - 2)
    frac = pos - lo
    m = np.zeros((n_out, COARSE))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _smooth_field(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """(size, size, channels) float32 with unit-scale values varying smoothly in space."""
    coarse = rng.standard_normal((COARSE, COARSE, channels))
    up = _upsample_matrix(size)
    # optimize=True: 20x faster.
    return np.einsum("hi,wj,ijc->hwc", up, up, coarse, optimize=True).astype(np.float32)


def synthetic_spec(kind: str, image_size: int, channels: int, *, with_image: bool = False,
                   latent_downsample: int = 8) -> dict[str, records.FieldSpec]:
    """The element spec a synthetic source (and a matching real dataset) has."""
    if kind == "latent":
        if image_size % latent_downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of latent_downsample "
                             f"{latent_downsample}")
        h = image_size // latent_downsample
        spec = {"moments": records.FieldSpec((h, h, 2 * channels), np.dtype(np.float32))}
    elif kind == "pixel":
        spec = {"pixels": records.FieldSpec((image_size, image_size, channels),
                                            np.dtype(np.float32))}
    else:
        raise ValueError(f"unknown kind {kind!r}; use one of {records.KINDS}")
    spec["label"] = records.FieldSpec((), np.dtype(np.int32))
    if with_image:
        spec["image"] = records.FieldSpec((image_size, image_size, 3), np.dtype(np.uint8))
    return spec


class SyntheticSource:
    """grain random-access source of deterministic synthetic examples (see the module docstring)."""

    def __init__(self, *, kind: str, image_size: int, channels: int, num_classes: int,
                 num_records: int, with_image: bool = False, latent_downsample: int = 8,
                 seed: int = 0):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.spec = synthetic_spec(kind, image_size, channels, with_image=with_image,
                                   latent_downsample=latent_downsample)
        self.kind, self.image_size, self.channels = kind, image_size, channels
        self.num_classes, self.num_records = num_classes, num_records
        self.with_image, self.seed = with_image, seed

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, key) -> dict[str, np.ndarray]:
        key = int(key)
        if not 0 <= key < self.num_records:
            raise IndexError(f"record {key} out of range for {self.num_records} synthetic records")
        rng = np.random.default_rng((self.seed, key))
        out = {"label": np.int32(rng.integers(self.num_classes))}
        if self.kind == "latent":
            h = self.spec["moments"].shape[0]
            mean = _smooth_field(rng, h, self.channels)
            logvar = LOGVAR_MEAN + 0.1 * rng.standard_normal(mean.shape).astype(np.float32)
            out["moments"] = np.concatenate([mean, logvar], axis=-1)
        else:
            out["pixels"] = np.tanh(_smooth_field(rng, self.image_size, self.channels))
        if self.with_image:
            field = np.tanh(_smooth_field(rng, self.image_size, 3))
            out["image"] = np.clip((field + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        return {k: np.asarray(v) for k, v in out.items()}

    def __repr__(self) -> str:
        return (f"SyntheticSource(kind={self.kind!r}, image_size={self.image_size}, "
                f"channels={self.channels}, num_classes={self.num_classes}, "
                f"num_records={self.num_records}, seed={self.seed})")
