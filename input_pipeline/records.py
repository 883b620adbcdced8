"""The on-disk example format: ArrayRecord shards of msgpack dicts plus a dataset_info.json.

One record is one example, a self-describing dict of numpy arrays serialised with
`flax.serialization.msgpack_serialize` (no TensorFlow needed to read or write it):

    label    int32 ()                     class id in [0, num_classes)
    moments  float16|float32 (h, w, 2C)   kind "latent": VAE mean ‖ logvar, raw and unscaled (the
                                          trainer samples z = mean + exp(logvar/2)*eps and
                                          scales it)
    moments_flip  like moments            optional (kind "latent"): the moments of the
                                          horizontally mirrored crop (`prepare_imagenet --flips`)
    pixels   float32 (H, W, C)            kind "pixel": image in [-1, 1]
    image    uint8 (H, W, 3)              optional: the raw image (the REPA DINOv2 target)
    source_id uint8 (L,)                  optional: where the example came from (a path relative
                                          to the source root, or a TFDS file name), UTF-8,
                                          zero-padded to a fixed L (`encode_source_id`); msgpack
                                          cannot carry numpy byte strings, so it is uint8

Exactly one of `moments` / `pixels` is present, according to the dataset's kind. Beside the shards
`data-XXXXX-of-YYYYY.array_record` lies `dataset_info.json` (element spec, record counts per shard,
kind, num_classes, image_size, source). The json is written last: a directory without it is an
unfinished write, never a dataset.

Writers (the MNIST tool, the ImageNet latent-caching tool) call `write_shards`; readers use
`RecordSource`, a grain random-access source that decodes and checks each record.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import grain
import numpy as np
from array_record.python import array_record_module
from etils import epath
from flax import serialization

FORMAT = "ddt-jax-records"
FORMAT_VERSION = 1
INFO_FILENAME = "dataset_info.json"
KINDS = ("latent", "pixel")
# group_size:1 makes every record its own chunk: grain reads records in random (shuffled) order, and
# a larger group would decompress a whole group for each record. Compression stays ArrayRecord's
# default, zstd:3. Measured on 2 slow cores with 213 KB records (256px latents + uint8 image, random
# reads): zstd 1430 reads/s, 174 writes/s; "group_size:1,uncompressed" 4190 reads/s, 1470 writes/s,
# 10% larger on these synthetic images (real photos compress better). Readers detect either.
WRITER_OPTIONS = "group_size:1"
# Keys of dataset_info.json that write_shards computes; a caller may not set them.
_COMPUTED_INFO_KEYS = ("format", "format_version", "num_records", "num_shards", "shard_lengths")
_REQUIRED_INFO_KEYS = ("kind", "num_classes", "image_size", "source")
HOW_TO_CREATE = (
    "create shards with `python -m input_pipeline.mnist --output DIR` (MNIST pixels) or the "
    "ImageNet latent-caching tool, or use data.source='synthetic'"
)


class DataFormatError(ValueError):
    """A dataset directory, its dataset_info.json or one of its records is not what it should be."""


class FieldSpec(NamedTuple):
    """Shape and dtype of one field of a single example."""
    shape: tuple[int, ...]
    dtype: np.dtype


def shard_filename(index: int, num_shards: int) -> str:
    return f"data-{index:05d}-of-{num_shards:05d}.array_record"


def spec_to_json(spec: Mapping[str, FieldSpec]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name}
            for k, v in sorted(spec.items())}


def spec_from_json(spec: Mapping[str, Any]) -> dict[str, FieldSpec]:
    return {k: FieldSpec(tuple(int(d) for d in v["shape"]), np.dtype(v["dtype"]))
            for k, v in spec.items()}


# --------------------------------------------------------------------------------------------------
# Validation of single examples (shared by the writer, which checks everything, and the reader).

def check_spec(spec: Mapping[str, FieldSpec], kind: str, image_size: int) -> None:
    """Raises unless `spec` has the fields a dataset of `kind` must have.

    The fields must also have allowed dtypes and sizes.
    """
    main = "moments" if kind == "latent" else "pixels"
    other = "pixels" if kind == "latent" else "moments"
    unknown = set(spec) - {"label", "moments", "moments_flip", "pixels", "image", "source_id"}
    if unknown:
        raise DataFormatError(f"unknown fields {sorted(unknown)}; "
                              "allowed: label, moments, moments_flip, pixels, image, source_id")
    if "label" not in spec or main not in spec:
        raise DataFormatError(f"a {kind!r} example needs fields 'label' and {main!r}; "
                              f"got {sorted(spec)}")
    if other in spec:
        raise DataFormatError(f"a {kind!r} example has {main!r}, not {other!r}: got both")
    label = spec["label"]
    if label.shape != () or label.dtype != np.int32:
        raise DataFormatError(f"'label' must be an int32 scalar, got shape {label.shape} "
                              f"{label.dtype}")
    m = spec[main]
    if len(m.shape) != 3:
        raise DataFormatError(f"{main!r} must be (height, width, channels) NHWC, "
                              f"got shape {m.shape}")
    if kind == "latent":
        if m.dtype not in (np.float16, np.float32):
            raise DataFormatError(f"'moments' must be float16 or float32, got {m.dtype}")
        if m.shape[-1] % 2:
            raise DataFormatError("'moments' holds mean ‖ logvar: its channel count must be "
                                  f"even, got {m.shape}")
    else:
        if m.dtype != np.float32:
            raise DataFormatError(f"'pixels' must be float32 in [-1, 1], got {m.dtype}")
        if m.shape[:2] != (image_size, image_size):
            raise DataFormatError(f"'pixels' is {m.shape} but the dataset's image_size is "
                                  f"{image_size}")
    if "moments_flip" in spec and (kind != "latent" or spec["moments_flip"] != m):
        raise DataFormatError("'moments_flip' must be like 'moments' in a 'latent' dataset, got "
                              f"{spec['moments_flip']} beside {main} {m}")
    if "source_id" in spec:
        source_id = spec["source_id"]
        if source_id.dtype != np.uint8 or len(source_id.shape) != 1:
            raise DataFormatError("'source_id' must be uint8 (length,) (UTF-8, zero-padded), got "
                                  f"{source_id.shape} {source_id.dtype}")
    if "image" in spec:
        image = spec["image"]
        if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
            raise DataFormatError("'image' must be uint8 (image_size, image_size, 3) = "
                                  f"({image_size}, {image_size}, 3), got {image.shape} "
                                  f"{image.dtype}")


def _as_arrays(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(example, Mapping):
        raise DataFormatError("an example must be a dict of numpy arrays, "
                              f"got {type(example).__name__}")
    out = {k: np.asarray(v) for k, v in example.items()}
    label = out.get("label")
    # Labels often arrive as Python ints (int64 arrays): accept any integer scalar, store int32.
    if label is not None and label.shape == () and np.issubdtype(label.dtype, np.integer):
        out["label"] = label.astype(np.int32)
    return out


def validate_example(example: Mapping[str, Any], spec: Mapping[str, FieldSpec], *, num_classes: int,
                     check_values: bool = True) -> dict[str, np.ndarray]:
    """Returns `example` as numpy arrays, or raises DataFormatError naming the field that is wrong.

    Shapes and dtypes must equal `spec` exactly. With `check_values` the values are checked too:
    label range, pixels in [-1, 1], finite moments (one NaN in a cached latent poisons a run).
    """
    arrays = _as_arrays(example)
    if set(arrays) != set(spec):
        raise DataFormatError(f"fields {sorted(arrays)} differ from the dataset's fields "
                              f"{sorted(spec)}")
    for name, field in spec.items():
        a = arrays[name]
        if a.shape != field.shape or a.dtype != field.dtype:
            raise DataFormatError(f"field {name!r} is {a.shape} {a.dtype}, the dataset's spec says "
                                  f"{field.shape} {field.dtype}")
    if check_values:
        label = int(arrays["label"])
        if not 0 <= label < num_classes:
            raise DataFormatError(f"label {label} is outside [0, num_classes={num_classes})")
        if "pixels" in arrays:
            p = arrays["pixels"]
            if not (np.isfinite(p).all() and p.min() >= -1.0 and p.max() <= 1.0):
                raise DataFormatError("'pixels' must be finite and in [-1, 1], got range "
                                      f"[{p.min()}, {p.max()}] (scale uint8 images with "
                                      "x / 127.5 - 1)")
        if "moments" in arrays and not np.isfinite(arrays["moments"]).all():
            raise DataFormatError("'moments' contains NaN or inf")
    return arrays


def infer_spec(example: Mapping[str, Any]) -> dict[str, FieldSpec]:
    return {k: FieldSpec(a.shape, a.dtype) for k, a in _as_arrays(example).items()}


def encode_source_id(source_id: str, length: int) -> np.ndarray:
    """`source_id` as the uint8 (length,) field: its UTF-8 bytes, zero-padded."""
    data = source_id.encode("utf-8")
    if len(data) > length or b"\0" in data:
        raise DataFormatError(f"source id {source_id!r} is {len(data)} bytes (or holds NUL); the "
                              f"field holds at most {length}")
    return np.frombuffer(data.ljust(length, b"\0"), np.uint8).copy()


def decode_source_id(field: np.ndarray) -> str:
    """The string `encode_source_id` stored."""
    return np.asarray(field, np.uint8).tobytes().rstrip(b"\0").decode("utf-8")


def serialize_example(example: Mapping[str, np.ndarray]) -> bytes:
    return serialization.msgpack_serialize({k: np.asarray(v) for k, v in example.items()})


def deserialize_example(data: bytes) -> dict[str, np.ndarray]:
    example = serialization.msgpack_restore(data)
    if not isinstance(example, dict):
        raise DataFormatError(f"record decodes to {type(example).__name__}, not a dict of arrays")
    return {k: np.asarray(v) for k, v in example.items()}


# --------------------------------------------------------------------------------------------------
# Writing.

def _check_info(info: Mapping[str, Any]) -> dict[str, Any]:
    info = dict(info)
    missing = [k for k in _REQUIRED_INFO_KEYS if k not in info]
    if missing:
        raise DataFormatError(f"info is missing {missing}; it needs {list(_REQUIRED_INFO_KEYS)}")
    computed = [k for k in _COMPUTED_INFO_KEYS if k in info]
    if computed:
        raise DataFormatError(f"info sets {computed}, which write_shards computes; remove them")
    if info["kind"] not in KINDS:
        raise DataFormatError(f"info['kind'] is {info['kind']!r}; use one of {KINDS}")
    if not (isinstance(info["num_classes"], int) and info["num_classes"] > 0):
        raise DataFormatError("info['num_classes'] must be a positive int, "
                              f"got {info['num_classes']!r}")
    if not (isinstance(info["image_size"], int) and info["image_size"] > 0):
        raise DataFormatError("info['image_size'] must be a positive int, "
                              f"got {info['image_size']!r}")
    return info


def is_local(path: str | os.PathLike) -> bool:
    """False for gs:// (or any other scheme's) paths, which ArrayRecordWriter cannot open."""
    return "://" not in os.fspath(path)


def publish_file(local: str, dest: epath.Path) -> None:
    """Moves a finished local file to `dest` atomically: a rename, or (remote) an upload under a
    temporary name and a rename, so a reader never sees half a file."""
    if is_local(dest):
        os.replace(local, os.fspath(dest))
        return
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    epath.Path(local).copy(tmp, overwrite=True)
    tmp.replace(dest)
    os.remove(local)


def write_shards(examples: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, num_shards: int,
                 info: Mapping[str, Any], *, overwrite: bool = False,
                 writer_options: str = WRITER_OPTIONS) -> dict[str, Any]:
    """Writes `examples` to `num_shards` ArrayRecord shards in `out_dir`.

    Example i goes to shard i % num_shards, so `examples` may be a stream of unknown length.
    dataset_info.json is written last (atomically, via a rename), so a writer that dies leaves
    shards without a json, which readers reject as unfinished. If the writer raises, its partial
    shards are removed.

    Args:
      examples: dicts of numpy arrays (the label may be a Python int) in the format of the module
        docstring; every one is checked, values included.
      out_dir: the dataset directory; created if missing.
      num_shards: the number of shards; each must receive at least one example.
      info: kind ('latent' | 'pixel'), num_classes, image_size (pixel resolution of the source
        images) and source (free text); other JSON-able keys (e.g. the VAE's name) are kept as
        they are. It may carry `element_spec` ({field: {"shape", "dtype"}}); otherwise the first
        example defines it and every later example must match it.
      overwrite: replace a dataset (or an unfinished write) already in `out_dir`.
      writer_options: the ArrayRecordWriter options string (keep group_size:1).

    Returns:
      The dataset info as written to dataset_info.json (with the computed record counts, shard
      lengths and element spec).

    Raises:
      DataFormatError: a bad info or example (the message names the example).
      FileExistsError: `out_dir` holds files already and `overwrite` is False.
    """
    info = _check_info(info)
    if not (isinstance(num_shards, int) and num_shards > 0):
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("data-*.array_record")) + sorted(out_dir.glob(INFO_FILENAME))
    if existing and not overwrite:
        what = ("a dataset" if (out_dir / INFO_FILENAME).exists()
                else "shards of an unfinished write (no dataset_info.json)")
        raise FileExistsError(f"{out_dir} already holds {what}: {len(existing)} files, e.g. "
                              f"{existing[0].name}; pass overwrite=True or choose an empty "
                              "directory")
    # The json goes first so that no reader takes the half-replaced directory for a dataset.
    (out_dir / INFO_FILENAME).unlink(missing_ok=True)
    for path in existing:
        path.unlink(missing_ok=True)

    spec = spec_from_json(info["element_spec"]) if "element_spec" in info else None
    if spec is not None:
        check_spec(spec, info["kind"], info["image_size"])
    paths = [out_dir / shard_filename(i, num_shards) for i in range(num_shards)]
    # ArrayRecordWriter writes local files only: remote shards are written to a local temporary
    # directory and published (uploaded, then renamed) when complete.
    staging = None if is_local(out_dir) else tempfile.mkdtemp(prefix="write_shards_")
    local = paths if staging is None else [pathlib.Path(staging) / p.name for p in paths]
    writers = [array_record_module.ArrayRecordWriter(os.fspath(p), writer_options) for p in local]
    lengths = [0] * num_shards
    try:
        for i, example in enumerate(examples):
            try:
                if spec is None:
                    spec = infer_spec(example)
                    check_spec(spec, info["kind"], info["image_size"])
                arrays = validate_example(example, spec, num_classes=info["num_classes"])
            except DataFormatError as e:
                raise DataFormatError(f"example {i}: {e}") from None
            writers[i % num_shards].write(serialize_example(arrays))
            lengths[i % num_shards] += 1
        if min(lengths) == 0:
            raise DataFormatError(f"got {sum(lengths)} examples for {num_shards} shards: every "
                                  "shard needs at least one; write fewer shards")
        for w in writers:
            w.close()
        if staging is not None:
            for src, dest in zip(local, paths):
                publish_file(os.fspath(src), dest)
    except BaseException:
        for w, p in zip(writers, paths):
            w.close()
            p.unlink(missing_ok=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    info.update(format=FORMAT, format_version=FORMAT_VERSION, num_records=sum(lengths),
                num_shards=num_shards, shard_lengths=lengths, element_spec=spec_to_json(spec))
    tmp = out_dir / (INFO_FILENAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.rename(out_dir / INFO_FILENAME)
    return info


# --------------------------------------------------------------------------------------------------
# Reading.

def read_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns the parsed dataset_info.json of `data_dir`.

    Raises a DataFormatError saying what to do when there is none or it is not valid.
    """
    data_dir = epath.Path(data_dir)
    if not data_dir.exists():
        raise DataFormatError(f"data directory {data_dir} does not exist; {HOW_TO_CREATE}")
    info_path = data_dir / INFO_FILENAME
    if not info_path.exists():
        shards = list(data_dir.glob("data-*.array_record"))
        if shards:
            raise DataFormatError(f"{data_dir} has {len(shards)} shards but no {INFO_FILENAME}: "
                                  "the writer did not finish; rerun it (with overwrite) to "
                                  "rewrite the dataset")
        raise DataFormatError(f"{data_dir} holds no dataset ({INFO_FILENAME} missing); "
                              f"{HOW_TO_CREATE}")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{info_path} is not valid JSON ({e}); rewrite the dataset") from None
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(f"{info_path} is format {info.get('format')!r} version "
                              f"{info.get('format_version')!r}; this code reads {FORMAT!r} version "
                              f"{FORMAT_VERSION}: rewrite the dataset with this code")
    try:
        check_spec(spec_from_json(info["element_spec"]), info["kind"], info["image_size"])
    except (DataFormatError, KeyError, TypeError) as e:
        raise DataFormatError(f"{info_path} is inconsistent ({type(e).__name__}: {e}); "
                              "rewrite the dataset") from None
    return info


def _count_records(path: epath.Path) -> int:
    reader = None
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        return reader.num_records()
    except Exception as e:  # riegeli raises RuntimeError, sometimes with an empty message.
        raise DataFormatError(f"shard {path} is unreadable (truncated or corrupt: "
                              f"{type(e).__name__} {e}); rewrite the dataset") from None
    finally:
        if reader is not None:
            try:
                reader.close()
            except Exception:  # closing a truncated shard raises again; the error above says it all
                pass


def check_shards(data_dir: str | os.PathLike, info: Mapping[str, Any]) -> list[epath.Path]:
    """Returns the shard paths after checking that each exists.

    Each shard must also hold the number of records the info says.
    """
    data_dir = epath.Path(data_dir)
    paths = [data_dir / shard_filename(i, info["num_shards"]) for i in range(info["num_shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise DataFormatError(f"{data_dir}: {INFO_FILENAME} lists {len(paths)} shards but "
                              f"{missing[:3]} {'and more ' if len(missing) > 3 else ''}are "
                              "missing; rewrite the dataset")
    # Opening a shard reads its footer: cheap, but many shards on network storage add up, so in
    # parallel.
    with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:
        counts = list(pool.map(_count_records, paths))
    for path, count, expected in zip(paths, counts, info["shard_lengths"]):
        if count != expected:
            raise DataFormatError(f"shard {path} holds {count} records but {INFO_FILENAME} "
                                  f"says {expected}; rewrite the dataset")
    return paths


class RecordSource:
    """grain random-access source over a shard directory: `source[key]` is a checked example dict.

    A record that cannot be read or decoded, or whose fields differ from the element spec, raises a
    DataFormatError naming its shard file and its index within that shard.
    """

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = epath.Path(data_dir)
        self.info = read_info(self.data_dir)
        self.spec = spec_from_json(self.info["element_spec"])
        self._paths = check_shards(self.data_dir, self.info)
        # The "path[start:end]" form tells ArrayRecordDataSource the counts already checked
        # above, so it does not open every shard a second time.
        self._source = grain.sources.ArrayRecordDataSource(
            [f"{p}[0:{n}]" for p, n in zip(self._paths, self.info["shard_lengths"])])
        self._starts = np.cumsum([0] + self.info["shard_lengths"])

    def __len__(self) -> int:
        return int(self.info["num_records"])

    def locate(self, key: int) -> tuple[epath.Path, int]:
        """(shard path, index within the shard) of global record `key`."""
        shard = int(np.searchsorted(self._starts, key, side="right")) - 1
        return self._paths[shard], int(key - self._starts[shard])

    def __getitem__(self, key) -> dict[str, np.ndarray]:
        key = int(key)
        if not 0 <= key < len(self):
            raise IndexError(f"record {key} out of range for {len(self)} records in "
                             f"{self.data_dir}")
        try:
            example = deserialize_example(self._source[key])
            return validate_example(example, self.spec, num_classes=self.info["num_classes"],
                                    check_values=False)
        except Exception as e:
            path, index = self.locate(key)
            raise DataFormatError(f"corrupt record {index} of shard {path} (global record {key}): "
                                  f"{type(e).__name__}: {e}; rewrite this dataset") from e

    def __repr__(self) -> str:
        return f"RecordSource({os.fspath(self.data_dir)!r}, num_records={len(self)})"
