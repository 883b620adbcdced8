"""The training input pipeline: a checkpointable grain iterator of per-process batches.

Order of operations (grain MapDataset, so every element is addressed by index and the iterator state
is one integer per process): source -> shuffle (a new permutation every epoch) -> this process's
slice `[process_index::process_count]` of each permutation -> repeat forever -> batch -> threads
(and optionally worker processes) that read batches ahead. Batching before the prefetch makes a
batch's contents independent of `read_threads` and `worker_count`.

The iterator is saved with the model inside one orbax CheckpointManager (`ddt_jax/checkpoint.py`);
each process writes its own `data/process_{i}-of-{n}.json`. A restore needs the same data config,
seed, global batch size and process count as the save (the state is a position in that sequence).
"""
from __future__ import annotations

import grain
import jax
import ml_collections

from input_pipeline import records
from input_pipeline import synthetic


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default (ImageNet 256 latents); configs override what they need."""
    c = ml_collections.ConfigDict()
    # "array_record": shards in `path`; "synthetic": generated on the fly, no files.
    c.source = "array_record"
    # Directory holding data-*.array_record and dataset_info.json (array_record only); None = unset.
    c.path = ml_collections.config_dict.placeholder(str)
    c.kind = "latent"           # "latent" (VAE moments) or "pixel"; must match dataset_info.json
    # Pixel resolution of the images; latents are image_size // latent_downsample.
    c.image_size = 256
    c.channels = 4              # model channels: 4 SD-VAE latent channels, or 1 / 3 for pixels
    c.latent_downsample = 8     # SD-VAE spatial factor; shapes synthetic latents
    c.num_classes = 1000        # labels in [0, num_classes); the null (CFG) class is num_classes
    # Yield the uint8 'image' field (the REPA DINOv2 target); dropped when False.
    c.with_image = False
    # Train each example on its crop or its horizontal mirror, chosen per example from the step's
    # key (flow.choose_flips; fast-DiT style). Needs shards cached with `prepare_imagenet --flips`
    # (the mirror's own VAE moments). Off in the official recipe, which has no flips.
    c.flips = False
    c.num_records = 10_000      # synthetic only: dataset size
    c.synthetic_seed = 0        # synthetic only: fixes the content, like a dataset on disk
    # Shuffle seed; unset uses the `seed` given to create_train_iterator (the run seed). Set it to
    # keep the data order fixed while the model seed varies.
    c.shuffle_seed = ml_collections.config_dict.placeholder(int)
    # Threads reading batches in each process; a thread reads a whole batch. On 2 slow cores, 256px
    # latents + images: 1 thread 510 examples/s, 8 threads 640-800, 8 threads + 2 workers 290-670.
    c.read_threads = 8
    # Batches read ahead per process (holds prefetch x per-process batch in RAM).
    c.prefetch = 8
    # Worker processes (0: read in the training process). Add them when decoding becomes CPU-bound
    # (threads share the GIL); the resume state is per worker, so keep it fixed across a restore.
    c.worker_count = 0
    return c


def _check_against_info(data_config: ml_collections.ConfigDict, info: dict) -> None:
    """Raises if the config describes different data than the shards hold.

    A silent mismatch trains junk.
    """
    spec = records.spec_from_json(info["element_spec"])
    main = spec["moments" if info["kind"] == "latent" else "pixels"]
    data_channels = main.shape[-1] // 2 if info["kind"] == "latent" else main.shape[-1]
    pairs = [("kind", data_config.kind, info["kind"]),
             ("num_classes", data_config.num_classes, info["num_classes"]),
             ("image_size", data_config.image_size, info["image_size"]),
             ("channels", data_config.channels, data_channels)]
    for name, want, have in pairs:
        if want != have:
            raise ValueError(f"data config says {name}={want!r} but "
                             f"{data_config.path}/{records.INFO_FILENAME} says {have!r}: set "
                             f"--config.data.{name}={have!r} or point data.path at the right "
                             "dataset")
    if data_config.flips and "moments_flip" not in spec:
        raise ValueError("data.flips is set but "
                         f"{data_config.path} has no 'moments_flip' field: cache the dataset with "
                         "`python -m input_pipeline.prepare_imagenet --flips` or set "
                         "data.flips=False")
    if data_config.with_image and "image" not in spec:
        raise ValueError("data.with_image is set (REPA needs the raw image) but "
                         f"{data_config.path} has no 'image' field: cache the dataset with images "
                         "or set data.with_image=False")


def _shard_directory(data_config: ml_collections.ConfigDict) -> str:
    """`data.path` of an array_record config; None (unset) and "" are an error that says why."""
    if not data_config.path:
        raise ValueError("data.path is empty; point it at a shard directory ("
                         + records.HOW_TO_CREATE + ")")
    return data_config.path


def make_source(data_config: ml_collections.ConfigDict):
    """The random-access source the config describes (RecordSource or SyntheticSource)."""
    if data_config.source == "array_record":
        source = records.RecordSource(_shard_directory(data_config))
        _check_against_info(data_config, source.info)
        return source
    if data_config.source == "synthetic":
        return synthetic.SyntheticSource(
            kind=data_config.kind, image_size=data_config.image_size, channels=data_config.channels,
            num_classes=data_config.num_classes, num_records=data_config.num_records,
            with_image=data_config.with_image, latent_downsample=data_config.latent_downsample,
            seed=data_config.synthetic_seed)
    raise ValueError(f"unknown data.source {data_config.source!r}; "
                     "use 'array_record' or 'synthetic'")


def element_spec(data_config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """What the iterator yields per example, without reading a record.

    Args:
      data_config: the data section (`default_data_config()` and overrides). For "array_record"
        only `dataset_info.json` in `data.path` is read, and checked against the config.

    Returns:
      {field: jax.ShapeDtypeStruct} of one example, sorted by field; no 'image' unless
      `data.with_image`.

    Raises:
      ValueError: the config is inconsistent with itself or with the dataset on disk, or an
        array_record config has no `data.path`.
    """
    if data_config.source == "array_record":
        info = records.read_info(_shard_directory(data_config))
        _check_against_info(data_config, info)
        spec = records.spec_from_json(info["element_spec"])
    elif data_config.source == "synthetic":
        spec = synthetic.synthetic_spec(data_config.kind, data_config.image_size,
                                        data_config.channels, with_image=data_config.with_image,
                                        latent_downsample=data_config.latent_downsample)
    else:
        raise ValueError(f"unknown data.source {data_config.source!r}; "
                         "use 'array_record' or 'synthetic'")
    for field in _unused_fields(data_config):
        spec.pop(field, None)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in sorted(spec.items())}


def check_latent_scaling(data_config: ml_collections.ConfigDict, scaling_factor: float) -> None:
    """Raises when the shards were cached with a VAE of another scaling factor than the run's
    `vae.scaling_factor` (latents would train at the wrong scale, silently).

    Args:
      data_config: the data section; only latent shards with a recorded VAE are checked.
      scaling_factor: the run's `vae.scaling_factor`.
    """
    if data_config.source != "array_record" or data_config.kind != "latent":
        return
    recorded = records.read_info(_shard_directory(data_config)).get("vae", {})
    cached = recorded.get("scaling_factor") if isinstance(recorded, dict) else None
    if cached is not None and abs(cached - scaling_factor) > 1e-6 * abs(cached):
        raise ValueError(f"{data_config.path} was cached with a VAE of scaling_factor {cached} "
                         f"but vae.scaling_factor={scaling_factor}: set "
                         f"--config.vae.scaling_factor={cached} or use shards of the run's VAE")


def _unused_fields(data_config) -> tuple[str, ...]:
    """Record fields the train step never reads: `source_id` (the record's provenance) always,
    `image` unless REPA needs it, `moments_flip` unless data.flips."""
    return (("source_id",) + (() if data_config.with_image else ("image",))
            + (() if data_config.flips else ("moments_flip",)))


class _DropFields:
    # A module-level class (not a lambda) so worker processes can unpickle the pipeline.
    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields

    def __call__(self, example: dict) -> dict:
        for field in self.fields:
            example.pop(field, None)
        return example


class _ProcessBlocks(grain.MapDataset):
    """Process `p`'s view of the global example stream: at local position k the global example
    (k // b) * B + p * b + k % b, for b = B / process_count examples of each global batch of B.

    Each process reads its contiguous block of every global batch, so global batch s is
    stream[s*B : (s+1)*B] in order whatever the number of processes: a run resumed on another
    process count sees the same batches, rows in the same places. (Slicing the permutation
    per process, ds[p::P], would tie the order to P.)
    """

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._offset + row]

    def __str__(self) -> str:
        return f"ProcessBlocks(global={self._global}, local={self._local}, offset={self._offset})"


def create_train_dataset(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                         process_index: int, process_count: int, seed: int,
                         start_step: int = 0) -> grain.IterDataset:
    """The grain dataset behind `create_train_iterator` (for benchmarks and inspection)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside "
                         f"[0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of "
                         f"process_count {process_count}: every process must load the same "
                         "number of examples")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    shuffle_seed = seed if data_config.shuffle_seed is None else data_config.shuffle_seed
    if not 0 <= shuffle_seed < 2**32:
        raise ValueError(f"shuffle seed {shuffle_seed} must lie in [0, 2**32)")
    source = make_source(data_config)

    ds = grain.MapDataset.source(source)
    # One global stream: a fresh permutation of every record each epoch (grain reseeds the
    # shuffle per epoch, seed + epoch), endless (the trainer counts steps, not epochs); batches
    # span epoch boundaries, so no example is ever dropped.
    ds = ds.shuffle(seed=shuffle_seed).repeat()
    ds = _ProcessBlocks(ds, global_batch_size, process_index, process_count)
    ds = ds.map(_DropFields(_unused_fields(data_config)))
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    # The position is a function of the step: a resumed run starts at its step's batch.
    ds = ds[start_step:]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                                   prefetch_buffer_size=data_config.prefetch))
    if data_config.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.worker_count))
    return iter_ds


def create_train_iterator(data_config: ml_collections.ConfigDict, *, global_batch_size: int,
                          process_index: int, process_count: int,
                          seed: int, start_step: int = 0) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's batches.

    Args:
      data_config: the data section (`default_data_config()` and overrides).
      global_batch_size: examples per step over all processes; a multiple of process_count.
      process_index: this process, in [0, process_count).
      process_count: the number of processes loading data (jax.process_count()).
      seed: the shuffle seed unless `data.shuffle_seed` is set (the run seed).
      start_step: the first batch to yield: the step a run resumes from. Batch s of every
        process is a function of (data, seed, s, global_batch_size) only, so a run resumes on
        any number of processes (see `_ProcessBlocks`).

    Returns:
      A grain iterator of dicts of numpy arrays with leading dim
      global_batch_size // process_count. Its state is `it.get_state()` / `it.set_state(s)`, or
      grain.checkpoint.CheckpointSave / CheckpointRestore inside an orbax CheckpointManager.

    Raises:
      ValueError: a bad config (an array_record config without `data.path` included), batch size
        or process index.
    """
    return iter(create_train_dataset(data_config, global_batch_size=global_batch_size,
                                     process_index=process_index, process_count=process_count,
                                     seed=seed, start_step=start_step))
