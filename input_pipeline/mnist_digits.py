"""The embedded MNIST digits (data/mnist10k.npz) and their fixed train / held-out split.

The split is shared by everything that uses the digits: the diffusion model trains on `train`,
the evaluation classifier is scored on `test`, and the Frechet distance of held-out real digits
(`test` vs `train`) is the floor a generator is compared against.
"""
from __future__ import annotations

import pathlib

import numpy as np

MNIST_PATH = pathlib.Path(__file__).resolve().parents[1] / "data" / "mnist10k.npz"
NUM_TEST = 2000      # 20% held out: enough for a stable 64-d Frechet estimate and accuracy to 0.05%
SPLIT_SEED = 0


def load_mnist(split: str = "all",
               path: str | pathlib.Path = MNIST_PATH) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 28, 28), labels int32 (N,)) for split 'train', 'test' or 'all'.

    N is 8,000 for 'train', 2,000 for 'test' and 10,000 for 'all'.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown MNIST split {split!r}; use 'train', 'test' or 'all'")
    with np.load(path) as f:
        images, labels = f["images"], f["labels"].astype(np.int32)
    if split == "all":
        return images, labels
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    idx = order[NUM_TEST:] if split == "train" else order[:NUM_TEST]
    idx = np.sort(idx)
    return images[idx], labels[idx]
