"""Model outputs as pictures: the uint8 conversion every sample takes, and image grids.

One conversion for the FID dumps and the training grids alike, so a grid shows exactly the pixels
a dump would hold.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] float -> uint8 as the official dumps: clip((x + 1) * 127.5 + 0.5), truncated."""
    return jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tiles (N, H, W, C) uint8 images row by row into one (rows*H, cols*W, C) image.

    Args:
      images: the images in reading order; an all-zero image leaves a black cell.
      cols: images per row; None: as square as N allows (ceil(sqrt(N))).

    Returns:
      The grid, uint8, rows = ceil(N / cols).
    """
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n))) if cols is None else cols
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid
