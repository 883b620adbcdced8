"""Pixel-space shards of the embedded MNIST digits: the small demo dataset (32x32x1, 10 classes).

Each 28x28 digit becomes `x / 127.5 - 1` in [-1, 1], zero-padded by 2 pixels on every side to 32x32
(the padding is background, -1 after scaling), so a patch-2 model sees a 16x16 token grid. Running
it again on a complete dataset with the same info does nothing.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app
from absl import flags

from input_pipeline import mnist_digits
from input_pipeline import records

IMAGE_SIZE = 32
PAD = (IMAGE_SIZE - 28) // 2
NUM_CLASSES = 10


def mnist_info(split: str) -> dict:
    return {"kind": "pixel", "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE,
            "source": f"embedded MNIST digits (data/mnist10k.npz), split {split!r} of "
                      "input_pipeline.mnist_digits.load_mnist, x/127.5-1, zero-padded 28->32"}


def to_pixels(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 32, 32, 1) float32 in [-1, 1], padded with background (-1)."""
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))   # zeros = black background
    return (padded.astype(np.float32) / 127.5 - 1.0)[..., None]


def _is_complete(out_dir: str | os.PathLike, expected: dict, num_records: int,
                 num_shards: int) -> bool:
    """True if `out_dir` holds a finished dataset with this info; False if it holds none."""
    try:
        info = records.read_info(out_dir)
    except records.DataFormatError:
        return False
    same = (all(info.get(k) == v for k, v in expected.items())
            and info["num_records"] == num_records and info["num_shards"] == num_shards)
    if not same:
        return False
    records.check_shards(out_dir, info)   # raises if a shard went missing or was truncated
    return True


def write_mnist_shards(out_dir: str | os.PathLike, split: str = "train", num_shards: int = 4,
                       *, overwrite: bool = False) -> tuple[dict, bool]:
    """Writes the `split` digits as pixel shards to `out_dir`.

    A complete dataset with the same info is left alone; a different dataset there is an error
    unless `overwrite`.

    Args:
      out_dir: the dataset directory (created if missing).
      split: 'train' (8,000 digits), 'test' (the 2,000 held out) or 'all'.
      num_shards: the number of ArrayRecord shards.
      overwrite: replace a different dataset already in `out_dir`.

    Returns:
      (info, wrote): the dataset info, and whether anything was written.
    """
    images, labels = mnist_digits.load_mnist(split)
    expected = mnist_info(split)
    if not overwrite and _is_complete(out_dir, expected, len(labels), num_shards):
        return records.read_info(out_dir), False
    pixels = to_pixels(images)
    examples = ({"label": labels[i], "pixels": pixels[i]} for i in range(len(labels)))
    return records.write_shards(examples, out_dir, num_shards, expected, overwrite=overwrite), True


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module never adds global absl flags.
    flags.DEFINE_string("output", None, "directory for the shards and dataset_info.json",
                        required=True)
    flags.DEFINE_enum("split", "train", ["train", "test", "all"], "which fixed split of the digits")
    flags.DEFINE_integer("num_shards", 4, "number of ArrayRecord shards")
    flags.DEFINE_bool("overwrite", False, "replace a different dataset already in --output")


def main(argv):
    del argv
    f = flags.FLAGS
    out_dir = os.path.abspath(f.output)
    try:
        info, wrote = write_mnist_shards(out_dir, f.split, f.num_shards, overwrite=f.overwrite)
    except FileExistsError as e:
        raise app.UsageError(f"{e} (--overwrite replaces it)") from None
    verb = "wrote" if wrote else "already complete, skipped:"
    spec = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}"
                     for k, v in info["element_spec"].items())
    print(f"{verb} {info['num_records']} MNIST {f.split!r} examples in {info['num_shards']} shards "
          f"to {out_dir} ({spec})")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
