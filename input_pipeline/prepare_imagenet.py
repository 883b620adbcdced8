"""ImageNet JPEGs -> the latent ArrayRecord shards train.py reads (`kind` "latent").

    python -m input_pipeline.prepare_imagenet --source=folder:/data/ILSVRC/train \\
        --vae=/ckpt/sd_vae --resolution=256 --output=/data/imagenet256_latents
    python -m input_pipeline.prepare_imagenet --check=/data/imagenet256_latents

Each image is decoded, converted to RGB and ADM-center-cropped (`center_crop`, guided-diffusion's
`center_crop_arr`) on a pool of CPU workers, while the VAE encoder, jitted over all local devices,
turns the previous batch into raw moments (mean || logvar, unscaled). One record per image:
`label`, `moments`, `image` (the uint8 crop, the REPA target) and `source_id` (path relative to the
source root, or the TFDS file name); with `--flips` also `moments_flip`, the moments of the mirrored
crop (the VAE is not flip-equivariant, so a mirrored latent is not the latent of the mirror).

Why this shape: a shard is a fixed slice of the global file list, so any process can write any
shard, several JAX processes split the shards between them (shard k belongs to process
k % process_count), and a rerun skips every shard that is complete. A shard is written under a
temporary name and renamed when complete, with a small json beside it (in `parts/`: its record
count, skipped files and latent sums) renamed last; process 0 writes dataset_info.json only once
every shard exists. Unreadable files are never dropped silently: each one is listed with its reason
in dataset_info.json, and more than --max_skipped of them stop the run.

Labels: index of the class folder name in sorted order (torchvision ImageFolder). TFDS imagenet2012
labels are the sorted wnids too; the TFDS reader checks this against the builder's class names.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from ddt_jax import console
from ddt_jax import convert
from ddt_jax import sharding
from input_pipeline import records

CROP_METHOD = ("ADM center_crop_arr: convert('RGB'); while min(W, H) >= 2*S: BOX resize to "
               "(W//2, H//2); BICUBIC resize to round(W*S/min), round(H*S/min); centre crop S x S")
# ImageFolder's IMG_EXTENSIONS: other files in a class folder are not images (counted, not read).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_ID_LENGTH = 128        # bytes; ILSVRC train names are ~40 ("n01440764/n01440764_10026.JPEG")
PARTS_DIR = "parts"           # per-shard completion files
MAX_SKIPPED_LISTED = 10_000   # dataset_info.json lists at most this many skipped files


class TooManySkipped(RuntimeError):
    """More files could not be decoded than --max_skipped allows."""


# --------------------------------------------------------------------------------------------------
# The crop.

def center_crop(pil_image: Image.Image, size: int) -> np.ndarray:
    """ADM's training crop (guided-diffusion `center_crop_arr`) of any PIL image.

    Args:
      pil_image: an opened image of any mode (CMYK, L, P, RGBA, ...); converted to RGB first
        (alpha is dropped, not composited, as in ADM).
      size: the side S of the square crop.

    Returns:
      uint8 (S, S, 3): halve with BOX while the short side is >= 2S, resize with BICUBIC so that
      the short side is S (each side `round(x * S / min(W, H))`), then crop the centre.
    """
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def load_crop(payload: str | bytes, size: int) -> np.ndarray:
    """Decodes a file and returns its `center_crop`; raises if unreadable.

    PIL sniffs the format from the data, so PNG data behind a .JPEG name decodes as PNG;
    truncated files raise (Pillow's LOAD_TRUNCATED_IMAGES stays off).

    Args:
      payload: a path (local, or any `etils.epath` URL such as gs://...) or the file's bytes.
      size: the crop side S.

    Returns:
      uint8 (S, S, 3).
    """
    if isinstance(payload, str) and "://" in payload:
        payload = epath.Path(payload).read_bytes()
    with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as image:
        image.load()
        return center_crop(image, size)


def _load_or_reason(payload: str | bytes, size: int) -> np.ndarray | str:
    """The crop, or a one-line reason why the file cannot be decoded (for dataset_info)."""
    try:
        return load_crop(payload, size)
    except Exception as e:  # noqa: BLE001 - every decode failure is reported, not raised
        return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# Sources: a fixed, ordered list of items; shard k holds items [k * shard_size, (k+1) * shard_size).

@dataclasses.dataclass
class FolderSource:
    """A class-per-subfolder tree (ILSVRC `train/<wnid>/*.JPEG`), listed in sorted order."""
    root: str
    class_names: list[str]
    files: list[tuple[str, int]]     # (path relative to root, label)
    ignored: list[str]               # files without an image extension

    @classmethod
    def open(cls, root: str) -> "FolderSource":
        root_path = epath.Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"--source folder {root} does not exist or is no directory")
        class_names = sorted(p.name for p in root_path.iterdir() if p.is_dir())
        if not class_names:
            raise ValueError(f"{root} has no class subfolders (expected <root>/<class>/<image>)")
        files, ignored = [], []
        for label, name in enumerate(class_names):
            for rel in _list_files(root, name):
                if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                    files.append((rel, label))
                else:
                    ignored.append(rel)
        return cls(os.fspath(root), class_names, files, ignored)

    def describe(self) -> str:
        return f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.files)

    def items(self, start: int, stop: int) -> Iterator[tuple[str, int, str]]:
        """(source_id, label, payload) of items [start, stop); the payload is the file's path."""
        for rel, label in self.files[start:stop]:
            yield rel, label, os.path.join(self.root, rel)


@dataclasses.dataclass
class TfdsSource:
    """A TFDS image classification dataset (imagenet2012 from the user's manual_dir)."""
    name: str
    split: str
    data_dir: str | None
    class_names: list[str]
    num_items: int
    ignored: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, name: str, split: str, data_dir: str | None,
             manual_dir: str | None) -> "TfdsSource":
        import tensorflow_datasets as tfds  # heavy (TensorFlow): only for this source

        builder = tfds.builder(name, data_dir=data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        class_names = list(builder.info.features["label"].names)
        if name.startswith("imagenet2012") and class_names != sorted(class_names):
            raise ValueError(f"TFDS {name} class names are not the sorted wnids, so its labels "
                             "differ from the folder convention; refusing to mix conventions")
        try:
            num_items = builder.info.splits[split].num_examples
        except KeyError as e:
            raise ValueError(f"TFDS {name} has no split {split!r} ({e}); prepare it first (the "
                             "ILSVRC tars in --tfds_manual_dir)") from None
        return cls(name, split, data_dir, class_names, num_items)

    def describe(self) -> str:
        return f"tfds:{self.name}:{self.split}"

    def __len__(self) -> int:
        return self.num_items

    def items(self, start: int, stop: int) -> Iterator[tuple[str, int, bytes]]:
        """(file name, label, encoded image bytes) of examples [start, stop) of the split."""
        import tensorflow_datasets as tfds  # heavy (TensorFlow): only for this source

        ds = tfds.load(self.name, split=f"{self.split}[{start}:{stop}]", data_dir=self.data_dir,
                       shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                       download=False)
        n = 0
        for ex in itertools.islice(tfds.as_numpy(ds), stop - start):
            name = ex.get("file_name", f"{self.split}[{start + n}]".encode())
            name = name.decode() if isinstance(name, bytes) else str(name)
            yield name, int(ex["label"]), bytes(ex["image"])
            n += 1
        if n != stop - start:
            raise ValueError(f"TFDS {self.name} {self.split}[{start}:{stop}] gave {n} examples, "
                             f"not {stop - start}: the prepared dataset changed; rerun from "
                             "scratch")


def _list_files(root: str, name: str) -> list[str]:
    """Sorted paths relative to `root` of the files under `root/name` (recursive when local; one
    level on remote storage, where a recursive listing costs an RPC per folder)."""
    if "://" not in root:
        out = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            out.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames)
        return sorted(out)
    return sorted(f"{name}/{p.name}" for p in (epath.Path(root) / name).iterdir() if p.is_file())


def open_source(spec: str, *, tfds_data_dir: str | None = None,
                tfds_manual_dir: str | None = None):
    """Opens the --source.

    Args:
      spec: `folder:DIR` (class-per-subfolder tree) or `tfds:NAME[:SPLIT]` (split default
        'train').
      tfds_data_dir: TFDS data_dir (tfds only; None = TFDS's default).
      tfds_manual_dir: where the ILSVRC tars lie, for a TFDS dataset not prepared yet.

    Returns:
      A FolderSource or TfdsSource: `len()`, `class_names`, `describe()`, `items(start, stop)`.
    """
    kind, _, rest = spec.partition(":")
    if kind == "folder" and rest:
        return FolderSource.open(rest)
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return TfdsSource.open(name, split or "train", tfds_data_dir, tfds_manual_dir)
    raise ValueError(f"--source={spec!r}: use folder:DIR or tfds:imagenet2012[:split]")


# --------------------------------------------------------------------------------------------------
# The encoder, over all local devices.

class Encoder:
    """uint8 crops -> float32 moments (mean || logvar, raw), the batch split over local devices."""

    def __init__(self, vae, batch_size: int, *, flips: bool = False):
        devices = jax.local_devices()
        if batch_size % len(devices):
            raise ValueError(f"--batch_size {batch_size} must be a multiple of the "
                             f"{len(devices)} local devices")
        self.batch_size = batch_size
        mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
        self.in_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        graphdef, state = nnx.split(vae)
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh,
                                                                 jax.sharding.PartitionSpec()))

        @jax.jit
        def encode(state, images):
            x = images.astype(jnp.float32) / 127.5 - 1.0
            if flips:   # one pass over [crops, mirrored crops]: (2B, ...) -> (B, ..., 2 * 2C)
                x = jnp.concatenate([x, x[:, :, ::-1]])
            mean, logvar = nnx.merge(graphdef, state).encode(x)
            moments = jnp.concatenate([mean, logvar], axis=-1)
            return jnp.concatenate(jnp.split(moments, 2), axis=-1) if flips else moments

        self._encode = lambda images: encode(state, images)

    def __call__(self, images: np.ndarray) -> jax.Array:
        """Starts encoding (asynchronously) a batch of at most batch_size crops; pads the rest.

        Returns (n, h, w, 2C) moments, or with flips (n, h, w, 4C): the crop's then the mirror's.
        """
        n = len(images)
        if n < self.batch_size:
            images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]),
                                                      images.dtype)])
        return self._encode(jax.device_put(images, self.in_sharding))[:n]


def vae_identity(vae, path: str, dtype: str) -> dict[str, Any]:
    """What dataset_info.json records about the VAE: its path, config, scaling factor and the
    SHA-256 of its config (canonical json) and of its float32 params (so that two VAEs with one
    config, e.g. ft-EMA and ft-MSE, are never mixed in one dataset)."""
    config = json.dumps(dataclasses.asdict(vae.config), sort_keys=True, default=list)
    params = hashlib.sha256()
    for key, variable in sorted(nnx.to_flat_state(nnx.state(vae, nnx.Param)),
                                key=lambda kv: str(kv[0])):
        params.update(str(key).encode())
        params.update(np.ascontiguousarray(np.asarray(variable.get_value(), np.float32)).tobytes())
    return {"path": os.fspath(path), "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "params_sha256": params.hexdigest(), "config": json.loads(config),
            "scaling_factor": vae.scaling_factor, "dtype": dtype}


# --------------------------------------------------------------------------------------------------
# Shards.

@dataclasses.dataclass(frozen=True)
class Plan:
    """The shard layout: shard k holds items [k * shard_size, min(N, (k + 1) * shard_size))."""
    num_items: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_items / self.shard_size))

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.num_items, (shard + 1) * self.shard_size)


def _part_path(out_dir: epath.Path, shard: int, num_shards: int) -> epath.Path:
    return out_dir / PARTS_DIR / records.shard_filename(shard, num_shards).replace(
        ".array_record", ".json")


def _write_json(path: epath.Path, data: dict) -> None:
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _complete_part(out_dir: epath.Path, shard: int, plan: Plan, run: dict) -> dict | None:
    """The shard's part json if the shard is complete and was made with the same settings."""
    part_path = _part_path(out_dir, shard, plan.num_shards)
    if not part_path.exists():
        return None
    part = json.loads(part_path.read_text())
    if part["run"] != run:
        raise ValueError(f"{part_path} was written with other settings ({part['run']}); this run "
                         f"has {run}. Use another --output, or delete that directory")
    shard_path = out_dir / records.shard_filename(shard, plan.num_shards)
    if not shard_path.exists():
        return None
    return part


class _ShardWriter:
    """Writes one shard to a local temporary file; `finish` publishes it and its part json."""

    def __init__(self, out_dir: epath.Path, shard: int, plan: Plan, run: dict, spec: dict,
                 num_classes: int, tmp_dir: str):
        self.out_dir, self.shard, self.plan, self.run = out_dir, shard, plan, run
        self.spec, self.num_classes = spec, num_classes
        name = records.shard_filename(shard, plan.num_shards)
        if records.is_local(out_dir):
            tmp_dir = os.fspath(out_dir)
        self.tmp = os.path.join(tmp_dir, f".tmp-{name}-{os.getpid()}")
        self.writer = array_record_module.ArrayRecordWriter(self.tmp, records.WRITER_OPTIONS)
        self.count, self.skipped = 0, []
        self.sum = self.sum_sq = None

    def add(self, example: dict[str, np.ndarray], scaling_factor: float) -> None:
        arrays = records.validate_example(example, self.spec, num_classes=self.num_classes)
        self.writer.write(records.serialize_example(arrays))
        self.count += 1
        # Statistics of scaled posterior samples z = s * (mean + std * eps), exactly in expectation:
        # E[z] = s * mean and E[z^2] = s^2 * (mean^2 + exp(logvar)), summed over pixels.
        mean, logvar = np.split(arrays["moments"].astype(np.float64), 2, axis=-1)
        s = np.asarray([scaling_factor * mean.sum((0, 1)),
                        scaling_factor ** 2 * (mean ** 2 + np.exp(logvar)).sum((0, 1))])
        self.sum = s if self.sum is None else self.sum + s

    def finish(self) -> dict:
        self.writer.close()
        name = records.shard_filename(self.shard, self.plan.num_shards)
        records.publish_file(self.tmp, self.out_dir / name)
        c = self.sum.shape[1] if self.sum is not None else 0
        part = {"shard": self.shard, "num_records": self.count, "skipped": self.skipped,
                "run": self.run, "bounds": list(self.plan.bounds(self.shard)),
                "latent_sum": [] if self.sum is None else self.sum[0].tolist(),
                "latent_sum_sq": [] if self.sum is None else self.sum[1].tolist(),
                "latent_pixels": self.count * int(np.prod(self.spec["moments"].shape[:2])),
                "latent_channels": c}
        _write_json(_part_path(self.out_dir, self.shard, self.plan.num_shards), part)
        return part

    def abort(self) -> None:
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def make_pool(kind: str, workers: int) -> concurrent.futures.Executor:
    """The decode pool: threads (Pillow releases the GIL while decoding and resampling) or
    spawned processes (no GIL at all; each worker imports this module once, ~seconds)."""
    if kind == "thread":
        return concurrent.futures.ThreadPoolExecutor(workers)
    if kind == "process":
        return concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
    raise ValueError(f"--worker_kind {kind!r}: use thread or process")


def _decoded_stream(source, shards: Sequence[int], plan: Plan, size: int,
                    pool: concurrent.futures.Executor, window: int
                    ) -> Iterator[tuple[int, str, int, np.ndarray | str]]:
    """(shard, source_id, label, crop or reason) in order, decoding up to `window` files ahead."""
    pending = collections.deque()

    def items():
        for shard in shards:
            for source_id, label, payload in source.items(*plan.bounds(shard)):
                yield shard, source_id, label, payload

    for shard, source_id, label, payload in items():
        pending.append((shard, source_id, label, pool.submit(_load_or_reason, payload, size)))
        if len(pending) >= window:
            shard_, sid, lab, future = pending.popleft()
            yield shard_, sid, lab, future.result()
    while pending:
        shard_, sid, lab, future = pending.popleft()
        yield shard_, sid, lab, future.result()


def _batches(stream, batch_size: int, on_skip: Callable[[int, str, str], None]):
    """Groups decodable items into batches of (shards, source_ids, labels, crops); reports skips."""
    batch = []
    for shard, source_id, label, crop in stream:
        if isinstance(crop, str):
            on_skip(shard, source_id, crop)
            continue
        batch.append((shard, source_id, label, crop))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# The tool.

@dataclasses.dataclass
class PrepareArgs:
    """The tool's settings (the flags of `main`)."""
    source: str
    vae: str
    output: str
    resolution: int = 256
    vae_dtype: str = "float32"
    batch_size: int = 64
    workers: int = 16
    shard_size: int = 1024
    max_skipped: int = 100
    worker_kind: str = "thread"
    tfds_data_dir: str | None = None
    tfds_manual_dir: str | None = None
    progress: bool = True
    flips: bool = False


def prepare(args: PrepareArgs, *, source=None, vae=None,
            max_shards: int | None = None) -> dict | None:
    """Writes this process's missing shards; process 0 then writes dataset_info.json.

    Every JAX process calls it with the same arguments (after `sharding.initialize_processes`).

    Args:
      args: the settings; `output` may be local or any `etils.epath` path (gs://...).
      source: an opened source (default: `open_source(args.source)`).
      vae: a loaded VAE (default: `convert.load_vae(args.vae, dtype=args.vae_dtype)`).
      max_shards: for tests: stop after writing this many new shards, as if killed.

    Returns:
      The dataset info written (on every process), or None when `max_shards` stopped early.

    Raises:
      TooManySkipped: more than `args.max_skipped` files could not be decoded.
      ValueError: bad settings, or `output` holds shards written with other settings.
    """
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution} must be a positive multiple of 8")
    if args.vae_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--vae_dtype {args.vae_dtype!r}: use float32 or bfloat16")
    if source is None:
        source = open_source(args.source, tfds_data_dir=args.tfds_data_dir,
                             tfds_manual_dir=args.tfds_manual_dir)
    if len(source) == 0:
        raise ValueError(f"{source.describe()} holds no images")
    if vae is None:
        vae = convert.load_vae(args.vae, dtype=jnp.dtype(args.vae_dtype))
    factor = vae.config.downsample_factor
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE's "
                         f"downsampling factor {factor}")
    out_dir = epath.Path(args.output)
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    plan = Plan(len(source), args.shard_size)
    identity = vae_identity(vae, args.vae, args.vae_dtype)
    latent = args.resolution // factor
    spec = {"label": records.FieldSpec((), np.dtype(np.int32)),
            "moments": records.FieldSpec((latent, latent, 2 * vae.config.latent_channels),
                                         np.dtype(np.float32)),
            "image": records.FieldSpec((args.resolution, args.resolution, 3), np.dtype(np.uint8)),
            "source_id": records.FieldSpec((SOURCE_ID_LENGTH,), np.dtype(np.uint8))}
    if args.flips:
        spec["moments_flip"] = spec["moments"]
    records.check_spec(spec, "latent", args.resolution)
    # Everything that changes a shard's content: a rerun with other values is an error.
    run = {"source": source.describe(), "num_items": plan.num_items, "shard_size": plan.shard_size,
           "resolution": args.resolution, "vae_config_sha256": identity["config_sha256"],
           "vae_params_sha256": identity["params_sha256"], "vae_dtype": args.vae_dtype,
           "crop": CROP_METHOD, "flips": args.flips}

    index, count = jax.process_index(), jax.process_count()
    mine = list(range(index, plan.num_shards, count))
    todo = [k for k in mine if _complete_part(out_dir, k, plan, run) is None]
    if max_shards is not None:
        todo = todo[:max_shards]
    logging.info("process %d/%d: %d of its %d shards to write (%d shards, %d images in all)",
                 index, count, len(todo), len(mine), plan.num_shards, plan.num_items)
    _write_shards(source, vae, args, out_dir, plan, run, spec, todo)

    if max_shards is not None:
        return None
    if count > 1:
        multihost_utils.sync_global_devices("prepare_imagenet: shards written")
    # Every process reads the parts, so a missing shard or too many skipped files fails all of
    # them (instead of leaving the others waiting at the barrier below).
    parts = _collect_parts(out_dir, plan, run, args.max_skipped)
    if index == 0:
        info = _write_info(out_dir, plan, parts, spec, source, identity, args)
    if count > 1:
        multihost_utils.sync_global_devices("prepare_imagenet: info written")
    return records.read_info(out_dir) if index != 0 else info


def _write_shards(source, vae, args: PrepareArgs, out_dir: epath.Path, plan: Plan, run: dict,
                  spec: dict, todo: list[int]) -> None:
    if not todo:
        return
    encoder = Encoder(vae, args.batch_size, flips=args.flips)
    total = sum(b - a for a, b in map(plan.bounds, todo))
    progress = console.Progress(total, enabled=args.progress and jax.process_index() == 0,
                                verb="encoded")
    tmp_dir = tempfile.mkdtemp(prefix="prepare_imagenet_")
    writers: dict[int, _ShardWriter] = {}
    remaining = {k: plan.bounds(k)[1] - plan.bounds(k)[0] for k in todo}
    skipped_here = []

    def writer(shard):
        if shard not in writers:
            writers[shard] = _ShardWriter(out_dir, shard, plan, run, spec, len(source.class_names),
                                          tmp_dir)
        return writers[shard]

    def done_one(shard):
        remaining[shard] -= 1
        progress.update(1)
        if remaining[shard] == 0:
            writer(shard).finish()
            del writers[shard]

    def on_skip(shard, source_id, reason):
        writer(shard).skipped.append({"file": source_id, "reason": reason})
        skipped_here.append((source_id, reason))
        logging.warning("skipping %s: %s", source_id, reason)
        if len(skipped_here) > args.max_skipped:
            raise TooManySkipped(_too_many_message(len(skipped_here), args.max_skipped,
                                                   skipped_here, "so far in this process"))
        done_one(shard)

    def emit(batch, moments):
        moments = np.asarray(moments)
        for (shard, source_id, label, crop), m in zip(batch, moments):
            example = {"label": np.int32(label), "image": crop,
                       "source_id": records.encode_source_id(source_id, SOURCE_ID_LENGTH)}
            if args.flips:
                example["moments"], example["moments_flip"] = np.split(m, 2, axis=-1)
            else:
                example["moments"] = m
            writer(shard).add(example, vae.scaling_factor)
            done_one(shard)

    window = max(2 * args.batch_size, 4 * args.workers)
    try:
        with make_pool(args.worker_kind, args.workers) as pool:
            stream = _decoded_stream(source, todo, plan, args.resolution, pool, window)
            in_flight = None
            for batch in _batches(stream, args.batch_size, on_skip):
                moments = encoder(np.stack([b[3] for b in batch]))   # asynchronous dispatch
                if in_flight is not None:
                    emit(*in_flight)   # blocks on the previous batch while this one runs
                in_flight = (batch, moments)
            if in_flight is not None:
                emit(*in_flight)
        for shard in list(writers):   # shards whose last items were all skipped
            if remaining[shard] == 0:
                writers.pop(shard).finish()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        progress.close()
        try:
            os.rmdir(tmp_dir)
        except OSError:
            pass


def _too_many_message(n: int, limit: int, skipped: Sequence[tuple[str, str]], where: str) -> str:
    shown = "; ".join(f"{f}: {r}" for f, r in skipped[:5])
    return (f"{n} files could not be decoded {where}, more than --max_skipped={limit} allows "
            f"(e.g. {shown}). Fix or remove them, or raise --max_skipped; complete shards are "
            "kept and a rerun resumes")


def _collect_parts(out_dir: epath.Path, plan: Plan, run: dict, max_skipped: int) -> list[dict]:
    """The part json of every shard; raises if one is missing or too many files were skipped."""
    parts = []
    for shard in range(plan.num_shards):
        part = _complete_part(out_dir, shard, plan, run)
        if part is None:
            raise RuntimeError(f"shard {shard} of {plan.num_shards} in {out_dir} is missing after "
                               "every process finished; rerun to write it")
        parts.append(part)
    skipped = [s for p in parts for s in p["skipped"]]
    if len(skipped) > max_skipped:
        raise TooManySkipped(_too_many_message(len(skipped), max_skipped,
                                               [(s["file"], s["reason"]) for s in skipped],
                                               "in all"))
    return parts


def _write_info(out_dir: epath.Path, plan: Plan, parts: list[dict], spec: dict, source,
                identity: dict, args: PrepareArgs) -> dict:
    skipped = [s for p in parts for s in p["skipped"]]
    counts = [p["num_records"] for p in parts]
    with_stats = [p for p in parts if p["num_records"]]
    pixels = sum(p["latent_pixels"] for p in with_stats)
    total = np.sum([p["latent_sum"] for p in with_stats], axis=0)
    total_sq = np.sum([p["latent_sum_sq"] for p in with_stats], axis=0)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean ** 2, 0.0))
    info = {
        "kind": "latent", "num_classes": len(source.class_names), "image_size": args.resolution,
        "source": source.describe(), "class_names": list(source.class_names),
        "label_order": "index of the class name in sorted order (torchvision ImageFolder)",
        "vae": identity, "vae_dtype": args.vae_dtype, "crop": CROP_METHOD,
        "resolution": args.resolution, "moments": "float32 mean || logvar, raw (unscaled), NHWC",
        "flips": args.flips,
        "latent_stats": {"what": "per-channel mean/std of scaled posterior samples (of the crops) "
                                 "scaling_factor * (mean + exp(logvar/2) * eps), in expectation",
                         "mean": mean.tolist(), "std": std.tolist()},
        "num_skipped": len(skipped), "skipped": skipped[:MAX_SKIPPED_LISTED],
        "num_ignored_non_image_files": len(source.ignored),
        "format": records.FORMAT, "format_version": records.FORMAT_VERSION,
        "num_records": sum(counts), "num_shards": plan.num_shards, "shard_lengths": counts,
        "element_spec": records.spec_to_json(spec),
    }
    _write_json(out_dir / records.INFO_FILENAME, info)
    records.check_shards(out_dir, records.read_info(out_dir))
    return info


# --------------------------------------------------------------------------------------------------
# --check

def _check_records(source: records.RecordSource, start: int, stop: int,
                   progress: console.Progress) -> dict[str, Any]:
    """Sums over records [start, stop) of one shard: labels, moments, source ids."""
    info = source.info
    labels = np.zeros(info["num_classes"], np.int64)
    moment_sum = moment_sq = None
    pixels, source_ids = 0, []
    for key in range(start, stop):
        try:
            example = records.validate_example(source[key], source.spec,
                                               num_classes=info["num_classes"])
        except records.DataFormatError as e:
            path, index = source.locate(key)
            raise records.DataFormatError(f"record {index} of {path}: {e}") from None
        labels[int(example["label"])] += 1
        if "moments" in example:
            m = example["moments"].astype(np.float64)
            s, sq = m.sum((0, 1)), (m ** 2).sum((0, 1))
            moment_sum = s if moment_sum is None else moment_sum + s
            moment_sq = sq if moment_sq is None else moment_sq + sq
            pixels += m.shape[0] * m.shape[1]
        if "source_id" in example:
            source_ids.append(records.decode_source_id(example["source_id"]))
        progress.update(1)
    return {"labels": labels, "sum": moment_sum, "sq": moment_sq, "pixels": pixels,
            "source_ids": source_ids}


def check_dataset(data_dir: str | os.PathLike, *, workers: int = 16,
                  progress: bool = False) -> dict[str, Any]:
    """Reads and checks every record of every shard (shards in parallel); returns statistics.

    Args:
      data_dir: a dataset directory this tool (or any records.py writer) wrote, local or gs://.
      workers: shards read at once (threads: array_record and zstd release the GIL).
      progress: show a progress bar of records checked.

    Returns:
      num_records, per-label counts, moments mean/std per channel (raw), duplicate source ids,
      the number of skipped files the info lists.

    Raises:
      records.DataFormatError: a missing or truncated shard, or a bad record.
    """
    source = records.RecordSource(data_dir)
    info = source.info
    bounds = np.cumsum([0] + list(info["shard_lengths"]))
    bar = console.Progress(len(source), enabled=progress, verb="checked")
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(bounds) - 1))) as pool:
            parts = list(pool.map(lambda k: _check_records(source, int(bounds[k]),
                                                           int(bounds[k + 1]), bar),
                                  range(len(bounds) - 1)))
    finally:
        bar.close()
    labels = np.sum([p["labels"] for p in parts], axis=0)
    seen, duplicates = set(), []
    for sid in (sid for p in parts for sid in p["source_ids"]):
        if sid in seen:
            duplicates.append(sid)
        seen.add(sid)
    stats = {"num_records": len(source), "num_shards": info["num_shards"],
             "label_counts_min_max": [int(labels.min()), int(labels.max())],
             "empty_classes": int((labels == 0).sum()), "duplicate_source_ids": duplicates[:20],
             "num_skipped": info.get("num_skipped", len(info.get("skipped", [])))}
    with_moments = [p for p in parts if p["sum"] is not None]
    if with_moments:
        pixels = sum(p["pixels"] for p in with_moments)
        mean = np.sum([p["sum"] for p in with_moments], axis=0) / pixels
        sq = np.sum([p["sq"] for p in with_moments], axis=0) / pixels
        stats["moments_mean"] = mean.round(4).tolist()
        stats["moments_std"] = np.sqrt(np.maximum(sq - mean ** 2, 0)).round(4).tolist()
    if "latent_stats" in info:
        stats["scaled_latent_mean"] = info["latent_stats"]["mean"]
        stats["scaled_latent_std"] = info["latent_stats"]["std"]
    return stats


# --------------------------------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
    # Defined only when run as a script, so importing this module never adds global absl flags.
    flags.DEFINE_string("source", None, "folder:DIR (class-per-subfolder tree) or "
                        "tfds:imagenet2012[:split]")
    flags.DEFINE_string("vae", None, "anything ddt_jax.convert.load_vae reads")
    flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype")
    flags.DEFINE_integer("resolution", 256, "crop side S (a multiple of 8)")
    flags.DEFINE_string("output", None, "dataset directory (local or gs://)")
    flags.DEFINE_integer("batch_size", 64, "VAE batch per process (multiple of local devices)")
    flags.DEFINE_integer("workers", 16, "decode workers per process")
    flags.DEFINE_enum("worker_kind", "thread", ["thread", "process"], "decode workers: threads "
                      "or spawned processes")
    flags.DEFINE_integer("shard_size", 1024, "images per shard")
    flags.DEFINE_bool("flips", False, "also store the moments of the mirrored crop "
                      "(moments_flip), for training with --config.data.flips")
    flags.DEFINE_integer("max_skipped", 100, "fail when more files than this are unreadable")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir (tfds sources)")
    flags.DEFINE_string("tfds_manual_dir", None, "TFDS manual_dir holding the ILSVRC tars")
    flags.DEFINE_string("check", None, "verify every shard of this dataset and print statistics")
    flags.DEFINE_bool("progress", True, "show a progress bar (process 0)")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process "
                        "runs outside clusters JAX detects itself")
    flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.check:
        for key, value in check_dataset(f.check, workers=f.workers,
                                        progress=f.progress).items():
            print(f"{key}: {value}")
        print(f"{f.check}: every shard and record is readable and valid")
        return
    missing = [n for n in ("source", "vae", "output") if not getattr(f, n)]
    if missing:
        raise app.UsageError(f"--{', --'.join(missing)} required (or --check=DIR)")
    sharding.initialize_processes(f.coordinator_address, f.num_processes, f.process_id)
    args = PrepareArgs(source=f.source, vae=f.vae, output=f.output, resolution=f.resolution,
                       vae_dtype=f.vae_dtype, batch_size=f.batch_size, workers=f.workers,
                       shard_size=f.shard_size, max_skipped=f.max_skipped,
                       worker_kind=f.worker_kind,
                       tfds_data_dir=f.tfds_data_dir, tfds_manual_dir=f.tfds_manual_dir,
                       progress=f.progress, flips=f.flips)
    try:
        info = prepare(args)
    except TooManySkipped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(f"wrote {info['num_records']} records in {info['num_shards']} shards to "
              f"{args.output} ({info['num_skipped']} files skipped)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
