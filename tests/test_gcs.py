"""gs:// for real: epath, the ImageNet latent tool and the record reader against a GCS emulator.

Run: .venv/bin/python -m pytest tests/test_gcs.py -q

The `gcs_bucket` fixture (tests/conftest.py) starts fake-gcs-server on loopback and points every
client at it: tf.io.gfile (what epath uses for gs:// while TensorFlow is installed: the tool's
listing, uploads, renames and json files) through a local TLS proxy, and array_record's own GCS
reader (records.RecordSource, check_dataset) through CLOUD_STORAGE_EMULATOR_ENDPOINT.
"""
import os
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest
from etils import epath

from configs import tiny
from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import sampler as sampler_lib
from ddt_jax import sharding
from ddt_jax import trainer
from input_pipeline import pipeline
from input_pipeline import prepare_imagenet
from input_pipeline import records
from input_pipeline import synthetic

import test_prepare_imagenet as tpi   # its fixtures' helpers (tests/ is on sys.path)

RESOLUTION = tpi.RESOLUTION   # 64: 8x8x4 latents


@pytest.fixture
def gcs_dir(gcs_bucket):
    """A fresh directory in the emulator's bucket, for one test."""
    return epath.Path(gcs_bucket) / f"t-{uuid.uuid4().hex[:8]}"


def test_epath_on_gcs_uses_tensorflow_and_reaches_the_emulator(gcs_dir, tmp_path):
    # The client the tool uses in production: tf.io.gfile, not fsspec.
    assert type(gcs_dir._backend).__name__ == "_TfBackend"
    a = gcs_dir / "sub" / "a.bin"
    a.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(3 << 20)   # MBs through the proxy (downloads) and the upload session
    a.write_bytes(data)
    assert a.exists() and a.is_file() and not (gcs_dir / "missing").exists()
    assert a.read_bytes() == data and a.stat().length == len(data)
    (gcs_dir / "sub" / "b.json").write_text('{"x": 1}')
    assert sorted(p.name for p in gcs_dir.glob("sub/*")) == ["a.bin", "b.json"]
    assert sorted(p.name for p in (gcs_dir / "sub").iterdir()) == ["a.bin", "b.json"]
    assert (gcs_dir / "sub").is_dir()
    # rename to a new name; replace over an existing object; copy from a local file.
    c = a.rename(gcs_dir / "sub" / "c.bin")
    assert not a.exists() and c.read_bytes() == data
    (gcs_dir / "d.bin").write_bytes(b"old")
    c.replace(gcs_dir / "d.bin")
    assert (gcs_dir / "d.bin").read_bytes() == data and not c.exists()
    with pytest.raises(FileExistsError):
        (gcs_dir / "sub" / "b.json").rename(gcs_dir / "d.bin")
    local = epath.Path(tmp_path / "local.bin")
    local.write_bytes(b"local bytes")
    local.copy(gcs_dir / "e.bin")   # what records.publish_file does with a shard
    assert (gcs_dir / "e.bin").read_bytes() == b"local bytes"
    (gcs_dir / "e.bin").unlink()
    assert not (gcs_dir / "e.bin").exists()


CLASSES = ("n01000000", "n02000000")


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """6 files in 2 classes: 5 images (odd sizes, a gray one) and a truncated JPEG."""
    root = tmp_path_factory.mktemp("gcs_imagenet") / "train"
    rng = np.random.default_rng(1)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    a, b = (root / n for n in CLASSES)
    tpi._smooth_rgb(rng, 70, 53).save(a / "rgb_70x53.JPEG")
    tpi._smooth_rgb(rng, 150, 131).save(a / "rgb_150x131.JPEG")
    tpi._smooth_rgb(rng, 64, 99).convert("L").save(a / "gray.JPEG")
    tpi._smooth_rgb(rng, 81, 65).save(b / "png_data.JPEG", format="PNG")
    (b / "truncated.JPEG").write_bytes(tpi._jpeg_bytes(tpi._smooth_rgb(rng, 120, 90))[:900])
    tpi._smooth_rgb(rng, 200, 64).save(b / "wide.JPEG")
    return root


torch_vae = tpi.torch_vae   # the small random diffusers VAE fixture


def _args(source, vae_folder, output):
    return tpi._args(source, vae_folder, output, shard_size=2, workers=2, max_skipped=1)


@pytest.fixture(scope="module")
def local_run(small_folder, torch_vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("gcs_local_shards")
    info = prepare_imagenet.prepare(_args(small_folder, torch_vae[1], out))
    assert info["num_records"] == 5 and info["num_shards"] == 3 and info["num_skipped"] == 1
    return out, info


def _count_encoded(monkeypatch):
    encoded = []
    original = prepare_imagenet.Encoder.__call__
    monkeypatch.setattr(prepare_imagenet.Encoder, "__call__",
                        lambda self, images: encoded.append(len(images)) or original(self, images))
    return encoded


def _assert_same_as_local(data_dir, local_run):
    tpi._assert_same_records(tpi._read_all(data_dir), tpi._read_all(local_run[0]),
                             moments_atol=1e-6)


@pytest.fixture(scope="module")
def gcs_run(local_run, small_folder, torch_vae, gcs_bucket):
    """(gs:// output, info) of the tool's run from the local folder into the bucket."""
    out = f"{gcs_bucket}/imagenet64-{uuid.uuid4().hex[:8]}"
    return out, prepare_imagenet.prepare(_args(small_folder, torch_vae[1], out))


def test_prepare_writes_shards_to_gcs_that_read_back_like_a_local_run(
        gcs_run, local_run, small_folder, torch_vae, monkeypatch):
    out, info = gcs_run
    local_info = local_run[1]
    for key in ("num_records", "num_shards", "shard_lengths", "skipped", "element_spec",
                "class_names", "vae"):
        assert info[key] == local_info[key], key
    np.testing.assert_allclose(info["latent_stats"]["mean"], local_info["latent_stats"]["mean"],
                               rtol=1e-6)
    names = sorted(p.name for p in epath.Path(out).iterdir())
    assert names == sorted([records.INFO_FILENAME, prepare_imagenet.PARTS_DIR,
                            *(records.shard_filename(k, 3) for k in range(3))])   # no .tmp-*
    assert len(list(epath.Path(out, prepare_imagenet.PARTS_DIR).glob("*.json"))) == 3
    assert records.read_info(out) == info
    # array_record's own GCS reader: every record, equal to the local run's.
    source = records.RecordSource(out)
    assert len(source) == 5 and os.fspath(source.locate(0)[0]).startswith("gs://")
    _assert_same_as_local(out, local_run)
    stats = prepare_imagenet.check_dataset(out)
    assert stats["num_records"] == 5 and stats["num_skipped"] == 1
    assert stats["duplicate_source_ids"] == [] and stats["empty_classes"] == 0
    # A rerun finds every shard complete in the bucket and encodes nothing.
    encoded = _count_encoded(monkeypatch)
    again = prepare_imagenet.prepare(_args(small_folder, torch_vae[1], out))
    assert encoded == [] and again["shard_lengths"] == info["shard_lengths"]


def test_check_command_and_training_iterator_read_the_gcs_dataset(gcs_run, gcs_bucket):
    out, _ = gcs_run
    # A fresh process, pointed at the emulator by the fixture's variables alone.
    env = dict(os.environ, **gcs_bucket.env, JAX_PLATFORMS="cpu", PYTHONPATH=str(tpi.REPO))
    proc = subprocess.run(
        ["timeout", "-s", "KILL", "120", sys.executable, "-m", "input_pipeline.prepare_imagenet",
         f"--check={out}"], cwd=tpi.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "num_records: 5" in proc.stdout
    assert f"{out}: every shard and record is readable and valid" in proc.stdout
    config = tiny.get_config("latent")
    config.update_from_flattened_dict({
        "data.source": "array_record", "data.path": out, "data.image_size": RESOLUTION,
        "data.channels": 4, "data.num_classes": 2, "data.with_image": True})
    batch = next(pipeline.create_train_iterator(config.data, global_batch_size=4,
                                                process_index=0, process_count=1, seed=0))
    assert batch["image"].shape == (4, RESOLUTION, RESOLUTION, 3)
    assert batch["label"].shape == (4,) and set(batch["label"].tolist()) <= {0, 1}


def test_gcs_run_killed_after_one_shard_resumes_to_the_same_records(
        local_run, small_folder, torch_vae, gcs_dir, monkeypatch):
    # The source on GCS too: the remote listing and reads of FolderSource.
    src = gcs_dir / "train"
    for path in sorted(small_folder.rglob("*")):
        if path.is_file():
            (src / path.parent.name).mkdir(parents=True, exist_ok=True)
            (src / path.parent.name / path.name).write_bytes(path.read_bytes())
    out = gcs_dir / "imagenet64"
    args = _args(src, torch_vae[1], out)
    assert args.source.startswith("folder:gs://") and args.output.startswith("gs://")
    assert prepare_imagenet.prepare(args, max_shards=1) is None   # "killed" after one shard
    assert not (out / records.INFO_FILENAME).exists()
    assert [p.name for p in out.glob("data-*.array_record")] == [records.shard_filename(0, 3)]
    # What a kill during an upload leaves: a temporary object beside the shards.
    (out / f".tmp-{records.shard_filename(1, 3)}-1").write_bytes(b"half a shard")
    encoded = _count_encoded(monkeypatch)
    info = prepare_imagenet.prepare(args)
    assert sum(encoded) == 3   # shards 1 and 2 only: their 4 files, one of them truncated
    assert info["shard_lengths"] == local_run[1]["shard_lengths"]
    assert info["skipped"] == local_run[1]["skipped"]
    _assert_same_as_local(os.fspath(out), local_run)


def test_recompute_schedule_round_trips_through_gcs(gcs_dir):
    """sample.py --calibrate --schedule=gs://... writes and later reads the same steps."""
    path = os.fspath(gcs_dir / "schedules" / "k4.json")
    sampler_lib.save_schedule(path, [0, 3, 7, 12])
    assert sampler_lib.load_schedule(path) == [0, 3, 7, 12]
    assert [p.name for p in (gcs_dir / "schedules").iterdir()] == ["k4.json"]   # no temp left


def test_write_shards_to_gcs_stages_locally_and_reads_back(gcs_dir):
    # ArrayRecordWriter opens local files only: the MNIST tool's writer stages and publishes.
    rng = np.random.default_rng(0)
    examples = [{"label": np.int32(i % 3), "pixels": rng.uniform(-1, 1, (8, 8, 1)).astype(
        np.float32)} for i in range(7)]
    info = records.write_shards(examples, gcs_dir / "px", 2,
                                {"kind": "pixel", "num_classes": 3, "image_size": 8,
                                 "source": "test"})
    assert info["shard_lengths"] == [4, 3]
    assert not list((gcs_dir / "px").glob(".tmp-*"))
    source = records.RecordSource(gcs_dir / "px")
    got = sorted((int(source[i]["label"]), source[i]["pixels"].tobytes()) for i in range(7))
    want = sorted((int(e["label"]), e["pixels"].tobytes()) for e in examples)
    assert got == want


# ------------------------------------------------------------------------------------------------
# Training with its workdir and data on GCS, killed at random points.

def _tiny_records(config, out) -> None:
    """configs/tiny.py's synthetic latents (+ images) as one ArrayRecord shard at `out`, so the
    order of records is the synthetic source's."""
    d = config.data
    source = synthetic.SyntheticSource(kind=d.kind, image_size=d.image_size, channels=d.channels,
                                       num_classes=d.num_classes, num_records=d.num_records,
                                       with_image=d.with_image, seed=d.synthetic_seed)
    records.write_shards((source[i] for i in range(len(source))), out, 1,
                         {"kind": d.kind, "num_classes": d.num_classes,
                          "image_size": d.image_size, "source": "tiny synthetic"})


def _tiny_on(data_path, **overrides):
    config = tiny.get_config("latent")
    config.update_from_flattened_dict({"data.source": "array_record", "data.path": str(data_path),
                                       "num_train_steps": 36, "checkpoint.every_steps": 4,
                                       **overrides})
    return config


def _final_state(workdir, config):
    mesh = sharding.create_mesh(config.mesh)
    layout = trainer.state_layout(config, mesh, trainer.make_optimizer(config.optim)[0])
    ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint, read_only=True)
    step = ckpt.latest_step()
    state = jax.device_get(ckpt.restore(step, layout.abstract.to_dict()))
    ckpt.close()
    return step, state


def test_training_on_gcs_killed_at_random_points_ends_like_an_uninterrupted_run(
        gcs_dir, gcs_bucket, tmp_path):
    """train.py with --workdir and data.path on the emulator, SIGKILLed at random moments
    (start-up, steps, async saves) and restarted, ends bit-identical to an uninterrupted local
    run on the same records: checkpoints (tensorstore), config.json, TensorBoard events and the
    compilation cache all go through gs://."""
    local_data, gcs_data = tmp_path / "data", gcs_dir / "data"
    config = _tiny_on(local_data)
    _tiny_records(config, local_data)
    _tiny_records(config, gcs_data)
    reference = jax.device_get(trainer.train_and_evaluate(config, str(tmp_path / "run")))

    workdir = f"{gcs_dir}/run"
    command = [sys.executable, "train.py",
               "--config=configs/tiny.py", f"--workdir={workdir}",
               "--config.data.source=array_record", f"--config.data.path={gcs_data}",
               "--config.num_train_steps=36", "--config.checkpoint.every_steps=4",
               "--config.logging.log_every=1"]
    env = dict(os.environ, **gcs_bucket.env, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(tpi.REPO), PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the run's own cache, under the gs:// workdir
    rng = np.random.default_rng(0)
    kills = []
    for _ in range(3):
        # SIGKILL after a random number of logged steps (2-10) plus up to 0.5 s: mid-step, or
        # while an async save (every 4 steps) is in flight.
        after, delay = int(rng.integers(2, 11)), float(rng.uniform(0, 0.5))
        proc = subprocess.Popen(command, cwd=tpi.REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        logged = 0
        for line in proc.stdout:
            logged += "loss=" in line
            if logged == after:
                time.sleep(delay)
                break
        proc.kill()
        proc.communicate()
        steps = checkpoint_lib.Checkpointer(workdir, config.checkpoint, read_only=True)
        kills.append((after, round(delay, 2), steps.all_steps()))
        steps.close()
    proc = subprocess.run(command, cwd=tpi.REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (kills, proc.stderr[-3000:])
    step, state = _final_state(workdir, config)
    assert step == 36, kills
    for key in ("params", "opt_state", "ema_params"):
        for a, b in zip(jax.tree.leaves(state[key]), jax.tree.leaves(getattr(reference, key))):
            np.testing.assert_array_equal(a, b, err_msg=f"{key} after kills {kills}")
    run = epath.Path(workdir)
    assert (run / "config.json").exists()
    assert list(run.glob("events.out.tfevents.*"))
    assert list((run / trainer.COMPILATION_CACHE_DIR).iterdir())
    # The final run resumed from a checkpoint the killed runs left (not from scratch).
    assert kills[-1][2], kills
