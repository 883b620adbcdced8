"""Sample dumps (sample.py / ddt_jax/sample_dump.py): the ADM file, equality with direct
sampling, resume after an interruption, 1 vs 8 devices, the zip stream, gs:// against the GCS
emulator, two processes (only process 0 writes), calibrate -> schedule, the CLI on a training run
and its sampler settings.

    .venv/bin/python -m pytest tests/test_sample.py -q

The model is the official tiny DDT fixture converted with `convert.cli.main` (16x16x4 latents),
decoded by a small random diffusers VAE (2 levels: 32x32 RGB); the CLI test samples a grey
pixel-space run written by the trainer's own state layout and checkpointer. 3 sampler steps keep
compiles short.
"""
import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ddt_jax import convert
from ddt_jax import sample_dump
from ddt_jax import sampler as sampler_lib
from ddt_jax import weights
from ddt_jax.convert import cli
from ddt_jax.evaluation import images as images_lib
from ddt_jax.sample_dump import DumpArgs

from conftest import OFFICIAL

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_SAMPLES, BATCH, LATENT, CLASSES = 20, 8, (16, 16, 4), 10   # 3 batches, the last one partial


def sampler_config(**overrides):
    config = sampler_lib.default_sampler_config()
    config.num_steps = 3      # t = 0 (conditional only), 0.48 and 0.96 (CFG): both kinds of step
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The converted tiny DDT and a tiny random SD-style VAE folder."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("weights")
    cli.main(["ddt", "--input", str(OFFICIAL / "ddt_tiny.ckpt"), "--num-encoder-blocks", "3",
                  "--output", str(root / "ddt")])
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(root / "vae")
    return dict(checkpoint=str(root / "ddt"), vae=str(root / "vae"))


def args_for(converted, output, **overrides):
    # image_size=16: the fixture's latent side (a converted config keeps the default 32).
    kw = dict(checkpoint=converted["checkpoint"], vae=converted["vae"], output=str(output),
              num_samples=NUM_SAMPLES, batch_size=BATCH, image_size=LATENT[0])
    kw.update(overrides)
    return DumpArgs(**kw)


def load_npz(path):
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        return f["arr_0"], f["arr_1"]


@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory):
    """An uninterrupted dump on all 8 devices."""
    output = tmp_path_factory.mktemp("reference")
    path = sample_dump.run(args_for(converted, output), sampler_config())
    return output, path


def test_dump_is_an_adm_file_equal_to_direct_sampling(converted, reference):
    from PIL import Image

    output, path = reference
    assert path == output / "samples.npz"
    images, labels = load_npz(path)
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 32, 32, 3)
    assert np.issubdtype(labels.dtype, np.integer) and labels.shape == (NUM_SAMPLES,)
    assert labels.min() >= 0 and labels.max() < CLASSES
    assert np.any(np.diff(labels) < 0), "labels must be in random order, not class-sorted"
    np.testing.assert_array_equal(labels, sample_dump.sample_labels(NUM_SAMPLES, CLASSES, seed=0))
    assert images.std() > 10   # real pictures, not a constant
    assert not (output / "parts").exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["sampler"]["num_steps"] == 3 and manifest["latent_shape"] == list(LATENT)
    # One row per class (10 classes), 8 columns.
    assert Image.open(output / "samples.png").size == (8 * 32, CLASSES * 32)

    # The same batches by hand: noise normal(fold_in(key(0), i)), the sampler, the VAE, uint8. On
    # the dump's 8-device mesh (1 vs 8 devices is the next test), so the compiled sampler is reused.
    mesh = sample_dump.make_mesh()
    replicated, rows_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = weights.load_converted(converted["checkpoint"])
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, replicated))
    vae_graphdef, vae_state = nnx.split(convert.load_vae(converted["vae"]))
    decode = jax.jit(lambda s, x: images_lib.to_uint8(nnx.merge(vae_graphdef, s).decode(x)))
    for b in range(3):
        rows = slice(b * BATCH, min((b + 1) * BATCH, NUM_SAMPLES))
        y = np.zeros(BATCH, np.int32)   # the last batch is padded to the batch size
        y[:rows.stop - rows.start] = labels[rows]
        noise = jax.device_put(sample_dump.batch_noise(0, b, (BATCH, *LATENT)), rows_sharded)
        with jax.set_mesh(mesh):
            x = sampler_lib.sample(model, noise, jax.device_put(y, rows_sharded), sampler_config())
            want = np.asarray(decode(jax.device_put(vae_state, replicated), x))
        np.testing.assert_array_equal(images[rows], want[:rows.stop - rows.start])


def test_one_device_equals_eight(converted, reference, tmp_path):
    path = sample_dump.run(args_for(converted, tmp_path), sampler_config(),
                           devices=jax.devices()[:1])
    one, labels_one = load_npz(path)
    eight, labels_eight = load_npz(reference[1])
    np.testing.assert_array_equal(labels_one, labels_eight)
    # The same noise and labels, so the same samples up to float32 rounding: XLA's CPU programs for
    # 1 and 8 devices reduce in other orders, and on this 2-core Xeon (AVX-512) one value of 61,440
    # lands on the other side of a uint8 step. Noise that depended on the device count would change
    # nearly every value.
    diff = np.abs(one.astype(np.int16) - eight.astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= one.size // 1000, np.count_nonzero(diff)


def test_resume_after_interruption_is_byte_identical(converted, tmp_path):
    config = sampler_config()
    full = sample_dump.run(args_for(converted, tmp_path / "full", balanced=True), config)

    args = args_for(converted, tmp_path / "resumed", balanced=True)
    assert sample_dump.run(args, config, max_batches=1) is None   # "killed" after one batch
    parts = tmp_path / "resumed" / "parts"
    assert (len(list(parts.glob("*.npz"))) == 1
            and not (tmp_path / "resumed" / "samples.npz").exists())
    # Killed mid-write: ignored.
    (parts / ".tmp.999.0000001.p0of1.npz").write_bytes(b"half a file")
    with pytest.raises(ValueError, match=r"other settings.*guidance: 2.0 -> 3.0"):
        sample_dump.run(args, sampler_config(guidance=3.0))
    with pytest.raises(ValueError, match="num_samples: 20 -> 30"):
        sample_dump.run(args_for(converted, tmp_path / "resumed", balanced=True, num_samples=30),
                        config)
    # A part whose rows changed after it was written (its name keeps their CRC-32) is refused
    # while samples.npz is assembled, by name; deleting it samples that batch again.
    (part,) = parts.glob("0*.npz")
    with np.load(part) as f:
        changed = dict(f)
    changed["images"][0, 0, 0, 0] ^= 1
    np.savez(part, **changed)
    with pytest.raises(ValueError, match=rf"{re.escape(str(part))} is corrupt: .* delete "
                                         rf"{re.escape(str(part))} and rerun"):
        sample_dump.run(args, config)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["manifest.json", "parts"]
    part.unlink()
    path = sample_dump.run(args, config)

    assert path.read_bytes() == full.read_bytes()   # the arrays and the file itself
    images, labels = load_npz(path)
    assert images.shape == (NUM_SAMPLES, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(labels, minlength=CLASSES),
                                  [NUM_SAMPLES // CLASSES] * CLASSES)
    assert np.any(np.diff(labels) < 0)
    # A finished dump is left alone.
    mtime = os.stat(path).st_mtime_ns
    assert sample_dump.run(args, config) == path and os.stat(path).st_mtime_ns == mtime


def _listing(directory):
    return sorted(p.name for p in epath.Path(directory).iterdir())


def test_gcs_dump_is_byte_identical_to_the_local_one(converted, reference, gcs_bucket):
    output = f"{gcs_bucket}/dump-{uuid.uuid4().hex[:8]}"
    path = sample_dump.run(args_for(converted, output), sampler_config())
    assert os.fspath(path) == f"{output}/samples.npz"
    assert _listing(output) == ["manifest.json", "samples.npz", "samples.png"]   # no parts/
    for name in ("samples.npz", "samples.png", "manifest.json"):
        assert (epath.Path(output) / name).read_bytes() == (reference[0] / name).read_bytes(), name


def test_gcs_dump_resumes_to_the_same_bytes(converted, reference, gcs_bucket):
    output = epath.Path(f"{gcs_bucket}/resumed-{uuid.uuid4().hex[:8]}")
    args = args_for(converted, os.fspath(output))
    assert sample_dump.run(args, sampler_config(), max_batches=1) is None
    parts = _listing(output / "parts")
    assert len(parts) == 1 and re.fullmatch(r"0000000\.[0-9a-f]{8}\.npz", parts[0]), parts
    (output / "parts" / ".tmp.999.0000001.0badc0de.npz").write_bytes(b"half a part")
    with pytest.raises(ValueError, match="other settings.*guidance: 2.0 -> 3.0"):
        sample_dump.run(args, sampler_config(guidance=3.0))
    path = sample_dump.run(args, sampler_config())
    assert path.read_bytes() == (reference[0] / "samples.npz").read_bytes()
    assert _listing(output) == ["manifest.json", "samples.npz", "samples.png"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_only_on_process_0_and_resume(converted, reference, tmp_path):
    """2 processes x 4 CPU devices (gloo): the rows are gathered to process 0, which alone touches
    the output; process 1 never opens, lists or creates anything under it."""
    # A dump one process started (8 devices): two processes finish it (parts are whole batches).
    from_one = tmp_path / "from_one_process"
    assert sample_dump.run(args_for(converted, from_one), sampler_config(), max_batches=1) is None
    two = tmp_path / "two_processes"
    control = tmp_path / "control"
    control.mkdir()

    def step(output, max_batches=None, **sampler):
        return dict(args=dataclasses.asdict(args_for(converted, output)),
                    sampler=dict(num_steps=3, **sampler), max_batches=max_batches)

    request = dict(watch=[str(two), str(from_one), str(control)], control=str(control),
                   steps=[step(two, max_batches=1), step(two), step(from_one),
                          step(two, guidance=3.0)])
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO))
    port = _free_port()
    procs = [subprocess.Popen(
        ["timeout", "-s", "KILL", "240", sys.executable, str(REPO / "tests" / "sample_worker.py"),
         f"127.0.0.1:{port}", str(i), str(tmp_path / "request.json"), str(tmp_path / f"p{i}.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    for i, report in enumerate(reports):
        assert (report["process"], report["devices"], report["local_devices"]) == (i, 8, 4)
        stopped, finished, resumed, refused = report["results"]
        assert stopped["path"] is None
        assert finished["path"] == str(two / "samples.npz")
        assert resumed["path"] == str(from_one / "samples.npz")
        assert refused["error"] == "ValueError" and "guidance: 2.0 -> 3.0" in refused["message"]
    # Process 1 learns of the refusal from process 0.
    assert reports[1]["results"][3]["message"].startswith("(on process 0) ")
    parts = reports[0]["results"][0]["parts"]
    assert len(parts) == 1 and parts[0].startswith("0000000."), parts
    assert reports[0]["results"][1]["parts"] is None   # deleted once samples.npz exists

    # The same bytes as the one-process, 8-device dump, for both.
    for output in (two, from_one):
        for name in ("samples.npz", "samples.png"):
            assert (output / name).read_bytes() == (reference[0] / name).read_bytes(), output

    def written(events):
        return sorted({os.path.relpath(re.sub(r"/\.tmp\.\d+\.", "/", path), tmp_path)
                       for event, path, mode in events if event == "open" and "w" in mode})

    # Process 1's hook saw its control write and nothing else; process 0 wrote every file.
    assert reports[1]["events"] == [["open", str(control / "p1.txt"), "w"]]
    by_0 = written(reports[0]["events"])
    assert {"two_processes/manifest.json", "two_processes/samples.npz",
            "two_processes/samples.png", "from_one_process/samples.npz"} <= set(by_0), by_0
    assert sum(p.startswith("two_processes/parts/") for p in by_0) == 3, by_0
    assert sum(p.startswith("from_one_process/parts/") for p in by_0) == 2, by_0


def test_calibrate_writes_a_schedule_that_sampling_uses(converted, reference, tmp_path):
    schedule = tmp_path / "schedule.json"
    steps = sample_dump.run(args_for(converted, "", calibrate=True, num_recompute=2,
                                     schedule=str(schedule)),
                            sampler_config())
    assert sampler_lib.load_schedule(schedule) == steps and len(steps) == 2 and steps[0] == 0
    with pytest.raises(ValueError, match="solved for num_steps=3 but num_steps is 4"):
        sample_dump.run(args_for(converted, tmp_path / "bad", schedule=str(schedule)),
                        sampler_config(num_steps=4))

    path = sample_dump.run(args_for(converted, tmp_path / "out", schedule=str(schedule)),
                           sampler_config())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sampler"]["recompute_steps"] == steps
    # The same as giving the steps in the sampler config; not the same as recomputing at every step.
    explicit = sample_dump.run(args_for(converted, tmp_path / "explicit"),
                               sampler_config(recompute_steps=steps))
    assert path.read_bytes() == explicit.read_bytes()
    reused, _ = load_npz(path)
    full, _ = load_npz(reference[1])
    # One step reused a stale encoder state (8.8% of values move).
    assert (reused != full).mean() > 0.01


def test_bad_arguments_fail_clearly(converted, tmp_path):
    config = sampler_config()
    with pytest.raises(ValueError,
                       match=r"--batch_size=12 is not divisible by the 8 devices.*--batch_size=8"):
        sample_dump.run(args_for(converted, tmp_path, batch_size=12), config)
    with pytest.raises(ValueError, match="exactly one of --workdir"):
        sample_dump.run(args_for(converted, tmp_path, workdir=str(tmp_path)), config)
    with pytest.raises(ValueError,
                       match="--balanced needs --num_samples divisible by the 10 classes"):
        sample_dump.run(args_for(converted, tmp_path, balanced=True, num_samples=15), config)
    with pytest.raises(ValueError, match="needs --vae"):
        sample_dump.run(args_for(converted, tmp_path, vae=""), config)
    sampler_lib.save_schedule(tmp_path / "long.json", [0, 5])
    with pytest.raises(ValueError, match="recomputes at step 5 but num_steps is 3"):
        sample_dump.run(args_for(converted, tmp_path, schedule=str(tmp_path / "long.json")),
                        config)
    with pytest.raises(FileNotFoundError, match="write one with --calibrate"):
        sample_dump.run(args_for(converted, tmp_path, schedule=str(tmp_path / "missing.json")),
                        config)


def test_sampler_settings_start_from_the_run_and_flags_win(converted, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(
        {"logging": {"sample": {"guidance": 3.0, "num_steps": 7, "timeshift": 2.0}}}))
    args = DumpArgs(workdir=str(workdir), output=str(tmp_path / "out"))
    # timeshift=1.0 is the default's value, given explicitly: it wins over the run's 2.0.
    config, origins = sample_dump.sampler_config_for(args, {"num_steps": 3, "timeshift": 1.0})
    defaults = sampler_lib.default_sampler_config().to_dict()
    assert config == {**defaults, "guidance": 3.0, "num_steps": 3, "timeshift": 1.0}
    assert origins["guidance"] == "the run's logging.sample"
    assert origins["num_steps"] == origins["timeshift"] == "--config"
    assert origins["last_step"] == "default"   # a config.json without the field
    # A converted checkpoint has no run settings: the defaults, as before.
    config, origins = sample_dump.sampler_config_for(args_for(converted, ""), {"guidance": 1.5})
    assert config == {**defaults, "guidance": 1.5}
    assert set(origins.values()) == {"--config", "default"}
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        sample_dump.sampler_config_for(DumpArgs(workdir=str(tmp_path)), {})


def test_cli_samples_the_ema_of_a_grey_pixel_run(tmp_path):
    """sample.py on a workdir in the trainer's format: EMA params (not the raw ones), C = 1 kept,
    the run's logging.sample under the --config flags given."""
    from PIL import Image
    from configs import tiny
    from ddt_jax import checkpoint as checkpoint_lib
    from ddt_jax import sharding
    from ddt_jax import trainer

    config = tiny.get_config("pixel")
    config.model.in_channels = config.data.channels = 1
    # Not the defaults (2.0, 1.0); the tiny config's num_steps is 4.
    config.logging.sample.guidance = 1.0
    config.logging.sample.timeshift = 3.0
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = sharding.create_mesh(config.mesh)
    tx, _ = trainer.make_optimizer(config.optim)
    layout = trainer.state_layout(config, mesh, tx)
    # Raw and EMA converted that differ everywhere, in the trainer's state layout (shapes, dtypes,
    # shardings); drawn on the host (eager per-leaf jax.random would compile once per shape).
    rng = np.random.default_rng(0)

    def weights_like(abstract):
        return jax.tree.map(
            lambda a: jax.device_put(0.05 * rng.standard_normal(a.shape).astype(a.dtype),
                                     a.sharding),
            abstract)

    params = {"model": weights_like(layout.abstract.params["model"])}
    state = weights.TrainState(step=jnp.int32(5), params=params,
                               opt_state=jax.jit(tx.init)(params),
                               ema_params=weights_like(layout.abstract.ema_params))
    ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    ckpt.save(5, state.to_dict(), force=True)
    ckpt.close()

    output = tmp_path / "samples"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={workdir}", f"--output={output}",
         "--num_samples=8", "--batch_size=8", "--seed=3", "--config.num_steps=2",
         "--config.timeshift=1.0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, labels = load_npz(output / "samples.npz")
    assert images.shape == (8, 32, 32, 1) and images.dtype == np.uint8
    assert Image.open(output / "samples.png").mode == "L"
    # guidance from the run; num_steps and timeshift (the default's value) from the flags.
    sampler = json.loads((output / "manifest.json").read_text())["sampler"]
    assert (sampler["guidance"], sampler["num_steps"], sampler["timeshift"]) == (1.0, 2, 1.0)
    assert re.search(r"sampler settings from --config: num_steps=2, timeshift=1\.0", proc.stderr)
    assert re.search(r"sampler settings from the run's logging.sample: .*guidance=1\.0",
                     proc.stderr)

    noise = sample_dump.batch_noise(3, 0, (8, 32, 32, 1))
    y = jnp.asarray(labels, jnp.int32)
    config_2 = sampler_config(num_steps=2, guidance=1.0)

    def direct(params):
        model = nnx.merge(layout.model_graphdef,
                          jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params))
        return np.asarray(images_lib.to_uint8(sampler_lib.sample(model, noise, y, config_2)))

    np.testing.assert_array_equal(direct(state.ema_params), images)
    # Not the raw params.
    assert np.abs(direct(state.params["model"]).astype(int) - images.astype(int)).mean() > 1
