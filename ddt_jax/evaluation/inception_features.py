"""Images of an .npz -> ADM's Inception activations (pool_3, mixed_6/conv, softmax), on all devices.

A 50K x 512 px dump is 39 GB, so `arr_0` is never loaded whole: its .npy header is parsed from the
zip member and rows are read a batch at a time (a stored member straight from its offset in the
file, a deflated one through zipfile). The jitted net runs over a data mesh of every device; with
several processes each reads and computes its own contiguous slice of rows and the features are
gathered. Activations are cached beside the input (`<file>.adm_acts.<key16>.npz`) under a key of
the file's sha256 and the weights' fingerprint: a second evaluation of a dump skips the network.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from ddt_jax import console
from ddt_jax import files
from ddt_jax import sharding
from ddt_jax.models import inception

FEATURES = ("pool", "spatial", "softmax")
DIMS = {"pool": inception.POOL_DIM, "spatial": inception.SPATIAL_DIM,
        "softmax": inception.NUM_LOGITS}
DEFAULT_BATCH_SIZE = 250
CACHE_TAG = ".adm_acts."
CACHE_VERSION = 1               # bump when the features of the same weights and images change
MIN_IMAGES = 2                  # a covariance needs two rows
HASH_CHUNK = 16 << 20           # bytes per read when hashing (a 50K x 256 px dump is 9.8 GB)
LAYOUT = "ADM layout: arr_0 = uint8 images (N, H, W, 3) NHWC, optional arr_1 = int labels (N,)"
_LOCAL_HEADER = 30              # fixed part of a zip local file header (APPNOTE 4.3.7)
_END_RECORD = 22                # the smallest zip: its end of central directory (APPNOTE 4.3.16)


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
    """What the .npy header of one .npz member says."""
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


@dataclasses.dataclass
class Activations:
    """The activations of one .npz and where they came from."""
    path: str
    sha256: str                          # of the whole file: the cache key
    shape: tuple[int, ...]               # of arr_0 (N, H, W, 3)
    features: dict[str, np.ndarray]      # pool (N, 2048), spatial (N, 2023), softmax (N, 1008)
    labels: np.ndarray | None            # arr_1 when the file has it
    cached: bool                         # read from the cache (the net did not run)
    warnings: list[str]


# ----------------------------------------------------------------------------------------------
# Reading one array of an .npz, row by row
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _open_zip(path) -> Iterator[zipfile.ZipFile]:
    path = files.as_path(path)   # local or gs://: zipfile only needs a seekable file
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    # A ZipFile leaves a file object it was given open: this one is closed here.
    with path.open("rb") as stream:
        try:
            size = path.stat().length
            if size < _END_RECORD:
                # tf.io.gfile (gs://) cannot seek before the start, as zipfile tries here.
                raise zipfile.BadZipFile(f"{size} bytes")
            zf = zipfile.ZipFile(stream)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path} is not an .npz (zip) file ({e}); write images with "
                             f"np.savez(path, arr_0=images, arr_1=labels); {LAYOUT}") from None
        with zf:
            yield zf


def npz_members(path) -> list[str]:
    """The array names of an .npz (`arr_0`, `mu`, ...), without reading any array."""
    with _open_zip(path) as zf:
        return [name.removesuffix(".npy") for name in zf.namelist()]


def _stored_data_offset(f, info: zipfile.ZipInfo) -> int:
    # The local header's extra field may differ from the central directory's (zip64), so it is
    # read, not assumed.
    f.seek(info.header_offset)
    local = f.read(_LOCAL_HEADER)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"corrupt zip: no local header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + _LOCAL_HEADER + name_length + extra_length


def _read_header(stream, source: str) -> ArrayHeader:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"{source}: .npy format {version} is not supported (np.save writes 1.0 "
                         "or 2.0)")
    return ArrayHeader(tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran_order))


@contextlib.contextmanager
def _open_member(path, key: str):
    """Yields (header, stream at the first data byte) of array `key` of the .npz at `path`."""
    with _open_zip(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            found = sorted(name.removesuffix(".npy") for name in zf.namelist())
            raise ValueError(f"{path} has no {key} (found {found}); {LAYOUT}") from None
        with contextlib.ExitStack() as stack:
            if info.compress_type == zipfile.ZIP_STORED:
                # Read the file itself: seeking to row k is then free (zipfile reads up to it).
                stream = stack.enter_context(files.as_path(path).open("rb"))
                stream.seek(_stored_data_offset(stream, info))
            else:
                stream = stack.enter_context(zf.open(info))
            yield _read_header(stream, f"{path}:{key}"), stream


def read_header(path, key: str = "arr_0") -> ArrayHeader:
    """The shape and dtype of array `key` of an .npz, read from its header only."""
    with _open_member(path, key) as (header, _):
        return header


def _read_exact(stream, size: int, source: str) -> bytes:
    parts, have = [], 0
    while have < size:
        part = stream.read(size - have)
        if not part:
            raise ValueError(f"{source} is truncated ({size - have} bytes missing): rewrite it")
        parts.append(part)
        have += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_rows(path, key: str = "arr_0", *, start: int = 0, stop: int | None = None,
              chunk: int = DEFAULT_BATCH_SIZE) -> Iterator[np.ndarray]:
    """Rows [start, stop) of array `key` of an .npz, `chunk` rows at a time (never all at once).

    Args:
      path: the .npz (stored, as np.savez writes, or deflated, as np.savez_compressed writes).
      key: the array.
      start: the first row.
      stop: one past the last row; None: the array's end.
      chunk: rows per yielded block.

    Returns:
      An iterator of (n, ...) read-only arrays of the member's dtype, in row order.
    """
    with _open_member(path, key) as (header, stream):
        if not header.shape:
            raise ValueError(f"{path}:{key} is a scalar, not an array of rows")
        if header.fortran_order and len(header.shape) > 1:
            raise ValueError(f"{path}:{key} is in Fortran order and cannot be read by rows; save "
                             "it with np.savez(path, arr_0=np.ascontiguousarray(images))")
        stop = header.shape[0] if stop is None else min(stop, header.shape[0])
        row = math.prod(header.shape[1:]) * header.dtype.itemsize
        stream.seek(stream.tell() + start * row)
        for lo in range(start, stop, chunk):
            n = min(chunk, stop - lo)
            data = _read_exact(stream, n * row, f"{path}:{key}")
            yield np.frombuffer(data, header.dtype).reshape(n, *header.shape[1:])


def read_labels(path, num_images: int) -> np.ndarray | None:
    """`arr_1` of an .npz as int64 (N,) class labels, or None when the file has none."""
    if "arr_1" not in npz_members(path):
        return None
    with files.as_path(path).open("rb") as stream, np.load(stream) as f:
        labels = f["arr_1"]   # loads only this member
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (num_images,):
        raise ValueError(f"{path}: arr_1 must be ({num_images},) integer class labels matching "
                         f"arr_0, got {labels.dtype} {labels.shape}; {LAYOUT}")
    return labels.astype(np.int64)


def check_images(header: ArrayHeader, source, *, statistics: bool = True) -> list[str]:
    """Raises unless `header` describes ADM input images; returns warnings.

    Args:
      header: arr_0's header.
      source: what to name in the messages (the file).
      statistics: the images' own mean and covariance will be computed (so N >= 2 is needed, and
        N < 2048 gets a warning).

    Returns:
      Warnings for the report (a singular covariance).
    """
    shape, dtype = header.shape, header.dtype
    if dtype != np.uint8:
        raise ValueError(f"{source}: arr_0: expected uint8 images in [0, 255], got {dtype}: "
                         "convert with np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8) "
                         f"from [-1, 1] (sample.py writes uint8); {LAYOUT}")
    if len(shape) != 4:
        raise ValueError(f"{source}: arr_0 has shape {shape}; expected (N, H, W, 3); {LAYOUT}")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise ValueError(f"{source}: arr_0 {shape} looks NCHW; transpose to NHWC: "
                             "np.transpose(images, (0, 2, 3, 1))")
        hint = (" (MNIST dumps are scored by `python -m ddt_jax.evaluation.mnist_eval`)"
                if shape[-1] == 1 else "")
        raise ValueError(f"{source}: arr_0 {shape} has {shape[-1]} channels; Inception-v3 needs "
                         f"RGB (N, H, W, 3){hint}")
    if not statistics:
        return []
    if shape[0] < MIN_IMAGES:
        raise ValueError(f"{source}: arr_0 holds {shape[0]} image(s); FID statistics (a "
                         f"covariance) need at least {MIN_IMAGES} (ADM's protocol: 50,000)")
    if shape[0] < inception.POOL_DIM:
        return [f"{source}: only {shape[0]} images: the {inception.POOL_DIM}x"
                f"{inception.POOL_DIM} pool_3 covariance has rank <= {shape[0] - 1} (singular), "
                "so FID is biased up and not comparable to published numbers (ADM: 50,000)"]
    return []


# ----------------------------------------------------------------------------------------------
# The net over all devices
# ----------------------------------------------------------------------------------------------

def make_mesh(devices=None) -> jax.sharding.Mesh:
    """Every device (of every process) data-parallel; tests pass a subset."""
    return sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                                devices)


def fingerprint(state) -> str:
    """16 hex digits of the sha256 of the weights' values in path order: the same weights give the
    same key whether they were read from the .pth or from a converted .safetensors."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
    out = nnx.merge(graphdef, state)(images)
    return {k: jax.lax.with_sharding_constraint(out[k], P(sharding.BATCH_AXES)) for k in FEATURES}


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in row order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


class InceptionRunner:
    """The net jitted over a data mesh: this process's uint8 rows -> their features on the host.

    Args:
      net: an InceptionV3 (`convert.load_inception`, or random weights in tests).
      batch_size: images per step over all devices, any value: rounded up to a multiple of the
        device count (the padding rows are computed and dropped).
      devices: the mesh's devices; None: every device of every process.
      weights_id: the weights' fingerprint for the cache key; None: hashed from the net's values.
    """

    def __init__(self, net: nnx.Module, *, batch_size: int = DEFAULT_BATCH_SIZE, devices=None,
                 weights_id: str | None = None):
        if batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        self.mesh = make_mesh(devices)
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        self.local_batch = self.batch_size // jax.process_count()
        self.graphdef, state = nnx.split(net)
        self.fingerprint = weights_id or fingerprint(state)
        self.state = sharding.host_to_replicated(state, self.mesh)

    def dispatch(self, images: np.ndarray) -> dict[str, jax.Array]:
        """Starts the net on this process's (<= local_batch) rows; returns without waiting."""
        pad = self.local_batch - len(images)
        images = np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
        batch = sharding.host_to_global({"images": images}, self.mesh)["images"]
        with jax.set_mesh(self.mesh):
            return _forward(self.graphdef, self.state, batch)

    @staticmethod
    def fetch(out: dict[str, jax.Array], n: int) -> dict[str, np.ndarray]:
        """The first `n` of this process's rows of each output: the padding dropped."""
        return {k: _local_rows(v)[:n].astype(np.float32) for k, v in out.items()}


def process_slices(num_rows: int, process_count: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of the contiguous rows each process computes (the last ones may be short)."""
    count = jax.process_count() if process_count is None else process_count
    per = -(-num_rows // count)
    return [(min(p * per, num_rows), min((p + 1) * per, num_rows)) for p in range(count)]


def _rechunk(blocks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Blocks of any sizes -> blocks of exactly `size` rows (the last may be shorter)."""
    buffer, have = [], 0
    for block in blocks:
        buffer.append(block)
        have += len(block)
        while have >= size:
            rows = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            yield rows[:size]
            buffer = [rows[size:]] if len(rows) > size else []
            have = len(rows) - size
    if have:
        yield np.concatenate(buffer)


def run(runner: InceptionRunner, num_rows: int, image_shape: tuple[int, ...],
        read: Callable[[int, int], Iterable[np.ndarray]],
        consume: Callable[[dict[str, np.ndarray]], None], *, progress: bool = True) -> None:
    """Runs the net over rows [0, num_rows) of a source, each process over its own slice.

    Every process calls it; all run the same number of steps (a process whose slice is done
    computes padding), with one step in flight while the next rows are read.

    Args:
      runner: the jitted net.
      num_rows: rows of the whole source.
      image_shape: (H, W, 3) of every row.
      read: read(start, stop) yields this process's rows [start, stop) as uint8 blocks of any
        sizes, in order.
      consume: called with this process's features ({name: (n, D) float32}), block by block in
        row order.
      progress: show images/s and ETA (process 0).
    """
    slices = process_slices(num_rows)
    start, stop = slices[jax.process_index()]
    size = runner.local_batch
    steps = -(-(slices[0][1] - slices[0][0]) // size)
    blocks = _rechunk(read(start, stop), size) if stop > start else iter(())
    empty = np.zeros((0, *image_shape), np.uint8)
    bar = console.Progress(num_rows, enabled=progress and jax.process_index() == 0,
                           verb="featurized")
    pending, seen = None, 0
    for step in range(steps + 1):
        current = None
        if step < steps:
            block = next(blocks, empty)
            seen += len(block)
            current = (runner.dispatch(block), len(block))
        if pending is not None:
            consume(runner.fetch(*pending))
            bar.update(sum(min(size, max(0, b - a - (step - 1) * size)) for a, b in slices))
        pending = current
    bar.close()
    if seen != stop - start or next(blocks, None) is not None:
        raise RuntimeError(f"the reader gave {seen} rows for rows [{start}, {stop})")


def gather_rows(local: dict[str, np.ndarray], num_rows: int) -> dict[str, np.ndarray]:
    """Every process's rows (process_slices order) of each feature, on every process."""
    slices = process_slices(num_rows)
    if len(slices) == 1:
        return local
    per = slices[0][1] - slices[0][0]
    out = {}
    for k, v in local.items():
        padded = np.zeros((per, v.shape[1]), v.dtype)
        padded[:len(v)] = v
        every = np.asarray(multihost_utils.process_allgather(padded))   # (processes, per, D)
        out[k] = np.concatenate([every[p, :b - a] for p, (a, b) in enumerate(slices)])
    return out


def compute_features(path, runner: InceptionRunner, *, progress: bool = True
                     ) -> dict[str, np.ndarray]:
    """The activations of arr_0 of an .npz, streamed through the net; equal on every process."""
    header = read_header(path)
    parts = []
    run(runner, header.shape[0], header.shape[1:],
        lambda a, b: iter_rows(path, start=a, stop=b, chunk=runner.local_batch), parts.append,
        progress=progress)
    local = {k: (np.concatenate([p[k] for p in parts]) if parts
                 else np.zeros((0, DIMS[k]), np.float32)) for k in FEATURES}
    return gather_rows(local, header.shape[0])


# ----------------------------------------------------------------------------------------------
# The activation cache
# ----------------------------------------------------------------------------------------------

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with files.as_path(path).open("rb") as f:
        while block := f.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def cache_path(path, sha256: str, weights_id: str, cache_dir=None) -> epath.Path:
    """`<dir>/<file name>.adm_acts.<key16>.npz`: beside the input, or in `cache_dir`."""
    path = files.as_path(path)
    key = hashlib.sha256(f"{CACHE_VERSION}:{sha256}:{weights_id}".encode()).hexdigest()[:16]
    folder = files.as_path(cache_dir) if cache_dir else path.parent
    return folder / f"{path.name}{CACHE_TAG}{key}.npz"


def _cache_meta(sha256: str, weights_id: str, shape) -> dict:
    return dict(version=CACHE_VERSION, sha256=sha256, inception=weights_id, shape=list(shape))


def load_cache(file: epath.Path, meta: dict) -> dict[str, np.ndarray] | None:
    """The cached activations, or None when the file is missing, unreadable or not for `meta`."""
    if not file.exists():
        return None
    try:
        with file.open("rb") as stream, np.load(stream) as f:
            if json.loads(str(f["meta"])) != meta:
                raise ValueError("written for another file, weights or cache version")
            features = {k: f[k] for k in FEATURES}
        for k, v in features.items():
            if v.shape != (meta["shape"][0], DIMS[k]) or v.dtype != np.float32:
                raise ValueError(f"{k} is {v.dtype} {v.shape}")
    except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed, never trusted
        logging.warning("ignoring the activation cache %s (%s: %s): recomputing it", file,
                        type(e).__name__, e)
        return None
    logging.info("activations of %d images from the cache %s", meta["shape"][0], file)
    return features


def save_cache(file: epath.Path, features: dict[str, np.ndarray], meta: dict) -> None:
    """Writes the cache atomically; an unwritable folder costs only a log line."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(file, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **features))
        logging.info("cached the activations in %s", file)
    except OSError as e:
        logging.warning("cannot write the activation cache %s (%s); pass --cache_dir=DIR (a "
                        "writable folder) to cache them", file, e)


def _all_processes(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.array(flag))).all())


def file_activations(path, runner: InceptionRunner, *, cache: bool = True, cache_dir=None,
                     statistics: bool = True, progress: bool = True) -> Activations:
    """The activations of arr_0 of an .npz (from the cache when it holds them), checked first.

    Args:
      path: the .npz: an ADM reference batch or a sample dump (arr_0 uint8 NHWC, arr_1 labels).
      runner: the jitted net.
      cache: read and write the activation cache.
      cache_dir: where the cache lives; None: beside `path`.
      statistics: FID statistics will be computed from these images (see `check_images`).
      progress: show images/s and ETA.

    Returns:
      Activations; the same on every process.
    """
    header = read_header(path)
    warnings = check_images(header, path, statistics=statistics)
    labels = read_labels(path, header.shape[0])
    sha256 = file_sha256(path)
    meta = _cache_meta(sha256, runner.fingerprint, header.shape)
    file = cache_path(path, sha256, runner.fingerprint, cache_dir) if cache else None
    features = load_cache(file, meta) if file is not None else None
    cached = _all_processes(features is not None)
    if not cached:
        logging.info("Inception activations of %s: %d images of %s", path, header.shape[0],
                     header.shape[1:])
        features = compute_features(path, runner, progress=progress)
        if file is not None and jax.process_index() == 0:
            save_cache(file, features, meta)
    return Activations(path=str(path), sha256=sha256, shape=header.shape, features=features,
                       labels=labels, cached=cached, warnings=warnings)
