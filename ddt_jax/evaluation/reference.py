"""ADM reference batches: their stored statistics, and new ones written in the same format.

ADM's `VIRTUAL_imagenet256_labeled.npz` holds `arr_0` (10,000 uint8 images, the precision/recall
reference) and `mu, sigma, mu_s, sigma_s`: float64 pool_3 / mixed_6 statistics over the whole
ImageNet train set. `make_reference` writes that layout from a dataset of ours, an image folder or
a sample dump: the statistics stream over every image (1.28M x 2048 float32 activations would be
10 GB) and `arr_0` is a seeded random subset, copied in index order.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddt_jax import console
from ddt_jax import files
from ddt_jax.evaluation import inception_features as features_lib
from ddt_jax.models import inception
from input_pipeline import prepare_imagenet
from input_pipeline import records

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
DEFAULT_REF_IMAGES = 10_000     # ADM's reference batches
READ_BLOCK = 64                 # images decoded per block of a folder or record source
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # fixed timestamps: the same inputs give the same bytes


def stored_statistics(path) -> dict[str, np.ndarray] | None:
    """`mu, sigma, mu_s, sigma_s` of a reference batch as float64, or None if it has none.

    Raises if only some are present or a shape is not ADM's (2048 pool_3, 2023 mixed_6 features).
    """
    members = features_lib.npz_members(path)
    present = [k for k in STAT_KEYS if k in members]
    if not present:
        return None
    if len(present) < len(STAT_KEYS):
        missing = [k for k in STAT_KEYS if k not in present]
        raise ValueError(f"{path} holds {present} but not {missing}: a reference batch has all "
                         "four ADM statistics or none (then they are computed from arr_0)")
    with files.as_path(path).open("rb") as stream, np.load(stream) as f:
        stats = {k: np.asarray(f[k], np.float64) for k in STAT_KEYS}
    for suffix, dim in (("", inception.POOL_DIM), ("_s", inception.SPATIAL_DIM)):
        mu, sigma = stats["mu" + suffix], stats["sigma" + suffix]
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ValueError(f"{path}: mu{suffix} {mu.shape} / sigma{suffix} {sigma.shape} are "
                             f"not ({dim},) / ({dim}, {dim}): not statistics of ADM's Inception "
                             "features")
    return stats


class RunningStatistics:
    """float64 mean and covariance of rows seen a block at a time (Chan et al.'s pairwise update:
    np.cov(rowvar=False) of all rows to ~1e-12 relative, in O(D^2) memory)."""

    def __init__(self, dim: int):
        self.count, self.mean, self.scatter = 0, np.zeros(dim), np.zeros((dim, dim))

    def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        total = self.count + count
        if count == 0:
            return
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def update(self, rows) -> None:
        rows = np.asarray(rows, np.float64)
        if len(rows):
            mean = rows.mean(axis=0)
            centred = rows - mean
            self._merge(len(rows), mean, centred.T @ centred)

    def merge_processes(self) -> None:
        """Every process's rows merged, in process order (the same result on each)."""
        if jax.process_count() == 1:
            return
        # float64 travels as uint32 pairs: a jax array would round it to float32 (x64 is off).
        packed = np.concatenate([[float(self.count)], self.mean, self.scatter.ravel()])
        every = np.asarray(multihost_utils.process_allgather(packed.view(np.uint32)))
        every = every.view(np.float64)
        dim = len(self.mean)
        self.count, self.mean, self.scatter = 0, np.zeros(dim), np.zeros((dim, dim))
        for row in every:
            self._merge(int(row[0]), row[1:dim + 1], row[dim + 1:].reshape(dim, dim))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)): the mean and the unbiased covariance, float64."""
        if self.count < features_lib.MIN_IMAGES:
            raise ValueError(f"a covariance needs at least {features_lib.MIN_IMAGES} images, got "
                             f"{self.count}")
        return self.mean.copy(), self.scatter / (self.count - 1)


# ----------------------------------------------------------------------------------------------
# Image sources: a sample dump, records of ours, an image folder
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageSource:
    """A fixed, ordered list of uint8 (H, W, 3) images."""
    description: str
    num_images: int
    image_shape: tuple[int, int, int]
    read: Callable[[int, int], Iterator[np.ndarray]]     # rows [start, stop) as blocks
    take: Callable[[np.ndarray], Iterator[np.ndarray]]   # sorted indices -> blocks
    label: Callable[[np.ndarray], np.ndarray | None]     # sorted indices -> their labels


def _npz_source(path: epath.Path) -> ImageSource:
    header = features_lib.read_header(path)
    features_lib.check_images(header, path, statistics=False)
    labels = features_lib.read_labels(path, header.shape[0])

    def take(index):
        # Streams the whole member: a deflated one cannot seek, and 10K of 50K is most of it.
        start = 0
        for block in features_lib.iter_rows(path):
            local = index[(index >= start) & (index < start + len(block))] - start
            start += len(block)
            if len(local):
                yield block[local]

    return ImageSource(str(path), header.shape[0], header.shape[1:],
                       lambda a, b: features_lib.iter_rows(path, start=a, stop=b), take,
                       lambda index: None if labels is None else labels[index])


def _blocks(load: Callable[[int], np.ndarray], index, workers: int) -> Iterator[np.ndarray]:
    """Images `index` decoded on a thread pool (PIL and the record reader release the GIL)."""
    index = np.asarray(index)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for lo in range(0, len(index), READ_BLOCK):
            yield np.stack(list(pool.map(load, index[lo:lo + READ_BLOCK])))


def _records_source(path: epath.Path, workers: int) -> ImageSource:
    source = records.RecordSource(path)
    if "image" in source.spec:
        field = "image"
    elif source.info["kind"] == "pixel" and source.spec["pixels"].shape[-1] == 3:
        field = "pixels"
    else:
        raise ValueError(f"{path} holds {source.info['kind']} records without the uint8 `image` "
                         "field: rebuild it with `python -m input_pipeline.prepare_imagenet` "
                         "(which stores each crop) or pass the image folder it was made from")
    shape = tuple(source.spec[field].shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"{path}: {field} is {shape}; Inception-v3 needs RGB (H, W, 3) images")

    def load(i):
        value = source[i][field]
        # pixels are [-1, 1]: the same uint8 conversion as every sample dump.
        return value if field == "image" else np.clip((value + 1) * 127.5 + 0.5, 0,
                                                      255).astype(np.uint8)

    return ImageSource(f"records:{path}", len(source), shape,
                       lambda a, b: _blocks(load, range(a, b), workers),
                       lambda index: _blocks(load, index, workers),
                       lambda index: np.array([source[i]["label"] for i in index], np.int64))


def _folder_source(path: epath.Path, resolution: int | None, workers: int) -> ImageSource:
    if not resolution:
        raise ValueError(f"{path} is an image folder: pass --resolution=S (the side of ADM's "
                         "center crop, e.g. 256)")
    source = prepare_imagenet.FolderSource.open(os.fspath(path))
    if not source.files:
        raise ValueError(f"{path} has class folders but no images "
                         f"({', '.join(prepare_imagenet.IMAGE_EXTENSIONS)})")

    def load(i):
        rel = source.files[i][0]
        try:
            return prepare_imagenet.load_crop(os.path.join(source.root, rel), resolution)
        except Exception as e:  # noqa: BLE001 - named, then raised: a reference skips nothing
            raise ValueError(f"cannot decode {rel} in {path} ({type(e).__name__}: {e}); remove "
                             "or replace it") from e

    labels = np.array([label for _, label in source.files], np.int64)
    return ImageSource(f"folder:{path}@{resolution}", len(source), (resolution, resolution, 3),
                       lambda a, b: _blocks(load, range(a, b), workers),
                       lambda index: _blocks(load, index, workers), lambda index: labels[index])


def open_images(source, *, resolution: int | None = None, workers: int | None = None
                ) -> ImageSource:
    """A sample dump / .npz, a records directory of ours, or a class-per-folder image tree.

    Args:
      source: the path.
      resolution: the center-crop side for an image folder (required there); elsewhere it must
        equal the images' size if given.
      workers: decoding threads for folders and records; None: the CPU count.

    Returns:
      The ImageSource.
    """
    path = files.as_path(source)   # local or gs://
    workers = workers or os.cpu_count() or 1
    if path.is_file():
        images = _npz_source(path)
    elif (path / records.INFO_FILENAME).exists():
        images = _records_source(path, workers)
    elif path.is_dir():
        return _folder_source(path, resolution, workers)
    else:
        raise FileNotFoundError(f"{path} does not exist; --make_ref reads a sample .npz, a "
                                "records directory (input_pipeline.prepare_imagenet) or an image "
                                "folder (<root>/<class>/<image>)")
    if resolution and images.image_shape[:2] != (resolution, resolution):
        raise ValueError(f"{path} holds {images.image_shape} images but --resolution={resolution}; "
                         "drop --resolution (it only crops image folders)")
    return images


# ----------------------------------------------------------------------------------------------
# Writing a reference batch
# ----------------------------------------------------------------------------------------------

def select(num_images: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of the `count` images of arr_0: a seeded random subset (all if fewer)."""
    if count >= num_images:
        return np.arange(num_images)
    return np.sort(np.random.default_rng(seed).choice(num_images, count, replace=False))


def _write_npz(f, shape, blocks: Iterator[np.ndarray], arrays: dict[str, np.ndarray]) -> None:
    """An np.savez-compatible zip: arr_0 (uint8 `shape`) streamed from `blocks`, then `arrays`."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy", date_time=_ZIP_TIME), "w",
                     force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False, "shape": tuple(shape)})
            rows = 0
            for block in blocks:
                member.write(np.ascontiguousarray(block, np.uint8).tobytes())
                rows += len(block)
            if rows != shape[0]:
                raise RuntimeError(f"copied {rows} images into arr_0, expected {shape[0]}")
        for name, value in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), "w",
                         force_zip64=value.nbytes > 1 << 30) as member:
                np.lib.format.write_array(member, value)


def make_reference(source, output, runner: features_lib.InceptionRunner, *,
                   resolution: int | None = None, num_images: int = DEFAULT_REF_IMAGES,
                   seed: int = 0, workers: int | None = None, progress: bool = True) -> dict:
    """Writes a reference batch in ADM's format: statistics over all of `source`, a subset's images.

    Args:
      source: a sample .npz, a records directory (`image` or RGB `pixels`) or an image folder.
      output: the .npz to write (atomically; process 0).
      runner: the jitted net; every process calls this with the same arguments.
      resolution: center-crop side of an image folder.
      num_images: images in arr_0 (ADM: 10,000); all of them if the source has fewer.
      seed: the seed of arr_0's random subset.
      workers: decoding threads.
      progress: show images/s.

    Returns:
      What was written: output, source, num_source_images, num_ref_images, image_shape, seed.
    """
    images = open_images(source, resolution=resolution, workers=workers)
    output = files.as_path(output)
    # GCS has no folders (any prefix can be written); a local one must exist.
    if files.is_local(output) and not output.parent.is_dir():
        raise FileNotFoundError(f"--make_ref={output}: folder {output.parent} does not exist")
    header = features_lib.ArrayHeader((images.num_images, *images.image_shape),
                                      np.dtype(np.uint8), False)
    for warning in features_lib.check_images(header, images.description):
        logging.warning("%s", warning)
    pool = RunningStatistics(inception.POOL_DIM)
    spatial = RunningStatistics(inception.SPATIAL_DIM)

    def consume(block):
        pool.update(block["pool"])
        spatial.update(block["spatial"])

    logging.info("reference statistics over %d images of %s", images.num_images,
                 images.description)
    features_lib.run(runner, images.num_images, images.image_shape, images.read, consume,
                     progress=progress)
    pool.merge_processes()
    spatial.merge_processes()
    (mu, sigma), (mu_s, sigma_s) = pool.result(), spatial.result()

    index = select(images.num_images, num_images, seed)
    if jax.process_index() == 0:
        arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        labels = images.label(index)
        if labels is not None:
            arrays = {"arr_1": labels, **arrays}
        bar = console.Progress(len(index), enabled=progress, verb="copied")

        def blocks():
            for block in images.take(index):
                bar.update(len(block))
                yield block

        files.atomic_write(output, lambda f: _write_npz(
            f, (len(index), *images.image_shape), blocks(), arrays))
        bar.close()
        logging.info("wrote %s: arr_0 %d of %d images, statistics over all", output, len(index),
                     images.num_images)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("reference: written")
    return dict(output=str(output), source=images.description,
                num_source_images=images.num_images, num_ref_images=len(index),
                image_shape=list(images.image_shape), seed=seed)
