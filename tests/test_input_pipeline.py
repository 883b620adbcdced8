"""Record format, grain pipeline, iterator checkpointing and the MNIST shards."""
import json
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module

from input_pipeline import mnist
from input_pipeline import mnist_digits
from input_pipeline import pipeline
from input_pipeline import records
from input_pipeline import synthetic

PIXEL_INFO = {"kind": "pixel", "num_classes": 48, "image_size": 4,
              "source": "test: label = example id"}


def _id_examples(n):
    """Pixel examples whose label is their id and whose pixels encode it, to track every example."""
    for i in range(n):
        yield {"label": i, "pixels": np.full((4, 4, 1), i / n, np.float32)}


def _id_config(path, **overrides):
    c = pipeline.default_data_config()
    c.update(path=os.fspath(path), kind="pixel", image_size=4, channels=1, num_classes=48,
             read_threads=2, prefetch=2)
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory):
    """48 records in 3 shards, label = example id."""
    path = tmp_path_factory.mktemp("ids")
    records.write_shards(_id_examples(48), path, 3, PIXEL_INFO)
    return path


def _synthetic_config(**overrides):
    c = pipeline.default_data_config()
    c.update(source="synthetic", kind="latent", image_size=32, channels=4, num_classes=10,
             num_records=64, read_threads=2, prefetch=2)
    c.update(overrides)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- record format ------------------------------------------------------------------------------

def test_round_trip_every_field(tmp_path):
    rng = np.random.default_rng(0)
    examples = [{"label": np.int32(i % 5),
                 "moments": rng.standard_normal((4, 4, 8)).astype(np.float16),
                 "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)} for i in range(7)]
    info = records.write_shards(examples, tmp_path, 2,
                                {"kind": "latent", "num_classes": 5, "image_size": 32,
                                 "source": "random", "vae": "sd-vae-ft-ema"})
    on_disk = json.loads((tmp_path / records.INFO_FILENAME).read_text())
    assert on_disk == info
    assert on_disk["num_records"] == 7 and on_disk["shard_lengths"] == [4, 3]
    assert on_disk["vae"] == "sd-vae-ft-ema"
    assert on_disk["element_spec"] == {"image": {"shape": [32, 32, 3], "dtype": "uint8"},
                                       "label": {"shape": [], "dtype": "int32"},
                                       "moments": {"shape": [4, 4, 8], "dtype": "float16"}}
    source = records.RecordSource(tmp_path)
    assert len(source) == 7
    # Example i went to shard i % 2: global keys list shard 0 (0, 2, 4, 6), then shard 1 (1, 3, 5).
    for key, i in enumerate([0, 2, 4, 6, 1, 3, 5]):
        got = source[key]
        assert got.keys() == examples[i].keys()
        for k, v in examples[i].items():
            assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.asarray(v).shape
            np.testing.assert_array_equal(got[k], v)

    pixels = [{"label": 3, "pixels": np.linspace(-1, 1, 48, dtype=np.float32).reshape(4, 4, 3)}]
    records.write_shards(pixels, tmp_path / "px", 1, {**PIXEL_INFO, "num_classes": 4})
    got = records.RecordSource(tmp_path / "px")[0]
    # A Python int label is stored as int32.
    assert got["label"].dtype == np.int32 and got["label"] == 3
    np.testing.assert_array_equal(got["pixels"], pixels[0]["pixels"])


@pytest.mark.parametrize("bad, message", [
    ({"label": 1, "pixels": np.zeros((4, 4, 1), np.float64)}, "float32"),
    ({"label": 1, "pixels": np.full((4, 4, 1), 2.0, np.float32)}, r"\[-1, 1\]"),
    ({"label": 48, "pixels": np.zeros((4, 4, 1), np.float32)}, "outside"),
    ({"label": 1, "pixels": np.zeros((4, 4, 2), np.float32)}, "spec says"),
    ({"label": 1, "pixels": np.zeros((4, 4, 1), np.float32),
      "moments": np.zeros((1, 1, 2), np.float32)}, "differ"),
    ({"label": 1.5, "pixels": np.zeros((4, 4, 1), np.float32)}, "int32"),
])
def test_writer_rejects_bad_examples_and_leaves_nothing(tmp_path, bad, message):
    good = list(_id_examples(3))
    with pytest.raises(records.DataFormatError, match=message) as e:
        records.write_shards(good + [bad], tmp_path, 2, PIXEL_INFO)
    assert "example 3" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_writer_rules_on_first_example_and_info(tmp_path):
    with pytest.raises(records.DataFormatError, match="needs fields"):
        records.write_shards([{"label": 0, "moments": np.zeros((2, 2, 8), np.float32)}], tmp_path,
                             1, PIXEL_INFO)
    with pytest.raises(records.DataFormatError, match="image_size"):
        records.write_shards([{"label": 0, "pixels": np.zeros((8, 8, 1), np.float32)}], tmp_path,
                             1, PIXEL_INFO)
    with pytest.raises(records.DataFormatError, match="missing"):
        records.write_shards(_id_examples(2), tmp_path, 1, {"kind": "pixel"})
    with pytest.raises(records.DataFormatError, match="at least one"):
        records.write_shards(_id_examples(2), tmp_path, 3, PIXEL_INFO)
    assert os.listdir(tmp_path) == []


def test_existing_dataset_needs_overwrite(tmp_path):
    records.write_shards(_id_examples(4), tmp_path, 2, PIXEL_INFO)
    with pytest.raises(FileExistsError, match="overwrite"):
        records.write_shards(_id_examples(6), tmp_path, 3, PIXEL_INFO)
    records.write_shards(_id_examples(6), tmp_path, 3, PIXEL_INFO, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ([records.shard_filename(i, 3) for i in range(3)]
                                            + [records.INFO_FILENAME])
    assert len(records.RecordSource(tmp_path)) == 6


def test_corrupt_record_names_shard_and_index(tmp_path):
    records.write_shards(_id_examples(10), tmp_path, 2, PIXEL_INFO)
    shard = tmp_path / records.shard_filename(1, 2)
    # Rewrite shard 1 with its record 2 replaced by bytes that are not a msgpack example.
    source = records.RecordSource(tmp_path)
    originals = [records.serialize_example(source[5 + j]) for j in range(5)]
    writer = array_record_module.ArrayRecordWriter(os.fspath(shard), records.WRITER_OPTIONS)
    for j, data in enumerate(originals):
        writer.write(b"\x93not a record" if j == 2 else data)
    writer.close()

    source = records.RecordSource(tmp_path)
    assert int(source[6]["label"]) == 3   # neighbours still read
    with pytest.raises(records.DataFormatError, match=f"corrupt record 2 of shard .*{shard.name}"):
        source[7]
    # Through the pipeline the same message reaches the trainer.
    it = pipeline.create_train_iterator(_id_config(tmp_path, num_classes=48), global_batch_size=10,
                                        process_index=0, process_count=1, seed=0)
    with pytest.raises(Exception, match=f"corrupt record 2 of shard .*{shard.name}"):
        next(it)


def test_truncated_shard_named(tmp_path):
    records.write_shards(_id_examples(10), tmp_path, 2, PIXEL_INFO)
    shard = tmp_path / records.shard_filename(0, 2)
    shard.write_bytes(shard.read_bytes()[:1000])
    message = f"shard .*{shard.name} .*rewrite the dataset"
    with pytest.raises(records.DataFormatError, match=message):
        records.RecordSource(tmp_path)
    shard.write_bytes(b"")
    with pytest.raises(records.DataFormatError, match=message):
        records.RecordSource(tmp_path)


def test_missing_or_unfinished_dataset_errors(tmp_path):
    with pytest.raises(records.DataFormatError, match="does not exist.*input_pipeline.mnist"):
        records.RecordSource(tmp_path / "nope")
    with pytest.raises(records.DataFormatError, match="holds no dataset.*input_pipeline.mnist"):
        records.RecordSource(tmp_path)
    records.write_shards(_id_examples(4), tmp_path, 2, PIXEL_INFO)
    (tmp_path / records.INFO_FILENAME).unlink()   # what a writer that died before the json leaves
    with pytest.raises(records.DataFormatError,
                       match="2 shards but no dataset_info.json.*did not finish"):
        records.RecordSource(tmp_path)
    with pytest.raises(ValueError, match="data.path is empty"):
        pipeline.make_source(pipeline.default_data_config())
    # Unset (None, the default) and "" alike, wherever the path is first needed.
    for path in (None, ""):
        config = pipeline.default_data_config()
        config.path = path
        with pytest.raises(ValueError, match="data.path is empty"):
            pipeline.element_spec(config)
        with pytest.raises(ValueError, match="data.path is empty"):
            pipeline.create_train_iterator(config, global_batch_size=8, process_index=0,
                                           process_count=1, seed=0)


def test_config_must_match_dataset(id_dataset):
    with pytest.raises(ValueError,
                       match=r"image_size=32 .* says 4: set --config.data.image_size=4"):
        pipeline.element_spec(_id_config(id_dataset, image_size=32))
    with pytest.raises(ValueError, match="no 'image' field"):
        pipeline.make_source(_id_config(id_dataset, with_image=True))


# --- pipeline -----------------------------------------------------------------------------------

def _labels(batches):
    return np.concatenate([b["label"] for b in batches])


def test_process_slices_disjoint_and_complete(id_dataset):
    config = _id_config(id_dataset)
    # Global batch 8 over 2 processes: 4 per process; each process has 24 records per epoch =
    # 6 batches.
    per_process = []
    for index in (0, 1):
        it = pipeline.create_train_iterator(config, global_batch_size=8, process_index=index,
                                            process_count=2, seed=3)
        batches = _take(it, 12)
        assert all(b["label"].shape == (4,) and b["pixels"].shape == (4, 4, 4, 1) for b in batches)
        per_process.append(_labels(batches).reshape(2, 24))   # (epoch, example)
    for epoch in (0, 1):
        a, b = per_process[0][epoch], per_process[1][epoch]
        assert len(set(a)) == 24 and len(set(b)) == 24 and not set(a) & set(b)
        assert set(a) | set(b) == set(range(48))
    # Each epoch is a new permutation: process 0 sees a different subset in epoch 1.
    assert set(per_process[0][0]) != set(per_process[0][1])
    # The pixels travel with their label.
    batch = next(pipeline.create_train_iterator(config, global_batch_size=8, process_index=0,
                                                process_count=2, seed=3))
    np.testing.assert_array_equal(batch["pixels"][:, 0, 0, 0],
                                  batch["label"].astype(np.float32) / 48)


def test_global_batches_do_not_depend_on_the_process_count(id_dataset):
    """Global batch s is the same rows in the same order for 1, 2 or 4 processes (each process
    reads its contiguous block), across epoch boundaries (48 records, 12 per batch), and
    start_step=s starts at batch s: what resuming on another number of hosts relies on."""
    config = _id_config(id_dataset)

    def global_batches(process_count, start_step=0, steps=9):
        per_process = [_take(pipeline.create_train_iterator(
            config, global_batch_size=12, process_index=p, process_count=process_count, seed=5,
            start_step=start_step), steps) for p in range(process_count)]
        return [{k: np.concatenate([batches[s][k] for batches in per_process])
                 for k in per_process[0][s]} for s in range(steps)]

    one = global_batches(1)
    assert sorted(_labels(one[:4])) == list(range(48))   # an epoch is 4 batches: a permutation
    for process_count in (2, 4):
        _assert_same_batches(global_batches(process_count), one)
    _assert_same_batches(global_batches(2, start_step=5, steps=4), one[5:])
    _assert_same_batches(global_batches(1, start_step=7, steps=2), one[7:])
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        pipeline.create_train_iterator(config, global_batch_size=12, process_index=0,
                                       process_count=1, seed=5, start_step=-1)


def test_seeds_decide_the_order(id_dataset):
    def order(**kw):
        seed = kw.pop("seed")
        it = pipeline.create_train_iterator(_id_config(id_dataset, **kw), global_batch_size=8,
                                            process_index=0, process_count=1, seed=seed)
        return _labels(_take(it, 6))

    first = order(seed=1)
    assert sorted(first) == list(range(48))          # one epoch, a permutation
    np.testing.assert_array_equal(first, order(seed=1))
    assert not np.array_equal(first, order(seed=2))
    assert not np.array_equal(first, np.arange(48))
    # data.shuffle_seed pins the order whatever the run seed.
    np.testing.assert_array_equal(order(seed=2, shuffle_seed=1), first)


def test_batch_must_divide_over_processes(id_dataset):
    with pytest.raises(ValueError, match="not a positive multiple of process_count 3"):
        pipeline.create_train_iterator(_id_config(id_dataset), global_batch_size=8, process_index=0,
                                       process_count=3, seed=0)


def test_synthetic_source_has_the_spec():
    config = _synthetic_config(with_image=True)
    spec = pipeline.element_spec(config)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
        "image": ((32, 32, 3), np.uint8), "label": ((), np.int32),
        "moments": ((4, 4, 8), np.float32)}
    source = pipeline.make_source(config)
    for key in (0, 63):
        example = source[key]
        records.validate_example(example, source.spec, num_classes=10)   # finite, labels in range
        assert ({k: (v.shape, v.dtype) for k, v in example.items()}
                == {k: (v.shape, v.dtype) for k, v in spec.items()})
    # Deterministic in (seed, key); a different seed is different data; fields are smooth, not
    # white noise.
    np.testing.assert_array_equal(source[5]["moments"], pipeline.make_source(config)[5]["moments"])
    other = pipeline.make_source(_synthetic_config(with_image=True, synthetic_seed=1))
    assert not np.array_equal(source[5]["moments"], other[5]["moments"])
    # The batches carry the spec with a leading per-process batch dim; the image is dropped
    # unless asked for.
    batch = next(pipeline.create_train_iterator(_synthetic_config(), global_batch_size=6,
                                                process_index=1, process_count=2, seed=0))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "label": ((3,), np.int32), "moments": ((3, 4, 4, 8), np.float32)}
    pixels = synthetic.SyntheticSource(kind="pixel", image_size=32, channels=3, num_classes=2,
                                       num_records=4)[0]["pixels"]
    assert pixels.shape == (32, 32, 3) and np.abs(pixels).max() <= 1
    # Smooth like an image, not white noise: neighbours differ far less than the values spread.
    assert np.abs(np.diff(pixels, axis=0)).mean() < 0.2 * pixels.std()


def test_state_round_trip_get_set(id_dataset):
    make = lambda: pipeline.create_train_iterator(_id_config(id_dataset), global_batch_size=8,
                                                  process_index=1, process_count=2, seed=0)
    it = make()
    _take(it, 7)   # past the end of the first epoch (6 batches)
    state = it.get_state()
    expected = _take(it, 8)
    resumed = make()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 8), expected)


def test_state_round_trip_through_orbax_checkpoint_manager(tmp_path):
    config = _synthetic_config()
    make = lambda: pipeline.create_train_iterator(config, global_batch_size=4, process_index=0,
                                                  process_count=1, seed=0)
    it = make()
    _take(it, 3)
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    # Absolute path: orbax resolves relative ones in its background thread.
    with ocp.CheckpointManager(tmp_path.absolute() / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                             data=grain.checkpoint.CheckpointSave(it)))
        expected = _take(it, 5)   # the saved state must be the one at save time, not after these
        mngr.wait_until_finished()
    assert (tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").exists()

    with ocp.CheckpointManager(tmp_path.absolute() / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        resumed = make()
        restored = mngr.restore(
            3, args=ocp.args.Composite(state=ocp.args.StandardRestore(params),
                                       data=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(restored.state["w"], params["w"])
    assert restored.data is resumed
    _assert_same_batches(_take(resumed, 5), expected)


def test_worker_processes_give_the_same_batches(id_dataset):
    make = lambda workers: pipeline.create_train_iterator(
        _id_config(id_dataset, worker_count=workers), global_batch_size=8, process_index=0,
        process_count=1, seed=0)
    expected = _take(make(0), 8)
    it = make(2)
    try:
        got = _take(it, 4)
        state = it.get_state()
        got += _take(it, 4)
    finally:
        it.close()
    _assert_same_batches(got, expected)
    resumed = make(2)
    try:
        resumed.set_state(state)
        _assert_same_batches(_take(resumed, 4), expected[4:])
    finally:
        resumed.close()


# --- MNIST --------------------------------------------------------------------------------------

def test_mnist_shards(tmp_path):
    info, wrote = mnist.write_mnist_shards(tmp_path, "test", num_shards=4)
    assert wrote and info["num_records"] == 2000 and info["num_shards"] == 4
    assert info["kind"] == "pixel"
    images, labels = mnist_digits.load_mnist("test")
    source = records.RecordSource(tmp_path)
    got = [source[k] for k in range(len(source))]
    pixels = np.stack([g["pixels"] for g in got])
    got_labels = np.array([g["label"] for g in got])
    assert pixels.shape == (2000, 32, 32, 1) and pixels.dtype == np.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (pixels[:, border] == -1.0).all()
    # Shard s holds examples s, s + 4, ...: map each record back to its position in load_mnist.
    order = np.concatenate([np.arange(s, 2000, 4) for s in range(4)])
    np.testing.assert_array_equal(got_labels, labels[order])
    np.testing.assert_array_equal(pixels[:, 2:30, 2:30, 0],
                                  images[order].astype(np.float32) / 127.5 - 1)

    mtime = os.path.getmtime(tmp_path / records.INFO_FILENAME)
    info2, wrote2 = mnist.write_mnist_shards(tmp_path, "test", num_shards=4)
    assert not wrote2 and info2 == info
    assert os.path.getmtime(tmp_path / records.INFO_FILENAME) == mtime
    with pytest.raises(FileExistsError):   # a different dataset is there: never silently replaced
        mnist.write_mnist_shards(tmp_path, "test", num_shards=2)

    config = pipeline.default_data_config()
    config.update(path=os.fspath(tmp_path), kind="pixel", image_size=32, channels=1, num_classes=10)
    assert ({k: v.shape for k, v in pipeline.element_spec(config).items()}
            == {"label": (), "pixels": (32, 32, 1)})
