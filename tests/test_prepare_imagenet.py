"""The ImageNet latent tool: ADM crops, odd files, VAE parity, resume, 2 processes, training.

Run: .venv/bin/python -m pytest tests/test_prepare_imagenet.py -q

One small random diffusers VAE (4 levels, so the SD-VAE's factor 8) and one generated ImageFolder
(3 classes, odd sizes and modes, two unreadable files) serve every test; the 1-process run of the
whole tool on them is made once and compared against by the others. Resolution 64: 8x8x4 latents,
what configs/tiny.py trains on.
"""
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from etils import epath
from PIL import Image

from configs import tiny
from ddt_jax import flow
from ddt_jax import trainer
from input_pipeline import prepare_imagenet
from input_pipeline import records

REPO = pathlib.Path(__file__).resolve().parents[1]
CROPS = pathlib.Path(__file__).parent / "fixtures" / "center_crop"
JIT_CACHE = os.path.join(tempfile.gettempdir(), f"ddt_jax_test_jit_cache_{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

RESOLUTION = 64
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
# Class folders are created out of order: labels must follow the sorted names.
CLASSES = ("n02000000", "n01000000", "n03000000")
UNREADABLE = {"n01000000/truncated.JPEG": "truncated", "n03000000/text.JPEG": "cannot identify"}


def _smooth_rgb(rng, w, h):
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _jpeg_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder tree of 14 files: 12 decodable (odd sizes and modes), 2 not, 1 non-image."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    a, b, c = (root / n for n in CLASSES)
    _smooth_rgb(rng, 70, 53).save(a / "rgb_70x53.JPEG")
    _smooth_rgb(rng, 150, 131).save(a / "rgb_150x131.JPEG")            # BOX halving at S=64
    _smooth_rgb(rng, 90, 64).convert("CMYK").save(a / "cmyk.JPEG")
    _smooth_rgb(rng, 64, 99).convert("L").save(a / "gray.JPEG")
    _smooth_rgb(rng, 81, 65).convert("RGBA").save(b / "rgba.png")
    _smooth_rgb(rng, 77, 70).save(b / "png_data.JPEG", format="PNG")   # PNG behind a .JPEG name
    _smooth_rgb(rng, 66, 66).convert("P").save(b / "palette.png")
    (b / "truncated.JPEG").write_bytes(_jpeg_bytes(_smooth_rgb(rng, 120, 90))[:900])
    (b / "readme.txt").write_text("not an image, not an image extension: ignored")
    for i in range(4):
        _smooth_rgb(rng, 64 + 7 * i, 80 - 3 * i).save(c / f"img_{i}.JPEG", quality=90)
    (c / "text.JPEG").write_text("this is text, not a JPEG")
    _smooth_rgb(rng, 200, 64).save(c / "wide.JPEG")
    return root


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    """A small random diffusers VAE (every weight random) saved as a diffusers folder."""
    torch.manual_seed(0)
    model = TorchVAE(**TINY_VAE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_scale = "norm" in name and name.endswith("weight")
                p.copy_(float(is_scale) + 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


def _args(folder, vae_folder, output, **kw):
    base = dict(source=f"folder:{folder}", vae=os.fspath(vae_folder), output=os.fspath(output),
                resolution=RESOLUTION, batch_size=8, workers=4, shard_size=4, max_skipped=2,
                progress=False)
    return prepare_imagenet.PrepareArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(image_folder, torch_vae, tmp_path_factory):
    """(output dir, info) of the 1-process run on 8 devices."""
    out = tmp_path_factory.mktemp("shards")
    info = prepare_imagenet.prepare(_args(image_folder, torch_vae[1], out))
    return out, info


def _read_all(data_dir):
    """{source_id: example} of every record."""
    source = records.RecordSource(data_dir)
    out = {}
    for i in range(len(source)):
        ex = source[i]
        out[records.decode_source_id(ex["source_id"])] = ex
    assert len(out) == len(source), "duplicate source ids"
    return out


def _assert_same_records(got, want, moments_atol=1e-5):
    assert sorted(got) == sorted(want)
    for sid in want:
        assert int(got[sid]["label"]) == int(want[sid]["label"]), sid
        np.testing.assert_array_equal(got[sid]["image"], want[sid]["image"], err_msg=sid)
        np.testing.assert_allclose(got[sid]["moments"], want[sid]["moments"], atol=moments_atol,
                                   err_msg=sid)


def test_center_crop_equals_adm_reference():
    """Pillow 13.0.0 / libjpeg-turbo 3.2.0 made the reference; exact equality, no tolerance."""
    expected = np.load(CROPS / "center_crop_expected.npz")
    assert len(expected.files) == 12
    for key in expected.files:
        name, size = key.split("@")
        got = prepare_imagenet.load_crop(os.fspath(CROPS / name), int(size))
        assert got.dtype == np.uint8 and got.shape == (int(size), int(size), 3)
        np.testing.assert_array_equal(got, expected[key], err_msg=key)
        # From bytes (the TFDS path) too.
        np.testing.assert_array_equal(
            prepare_imagenet.load_crop((CROPS / name).read_bytes(), int(size)), expected[key])


def test_folder_to_shards_labels_modes_and_skipped(prepared, image_folder):
    out, info = prepared
    assert info["class_names"] == sorted(CLASSES) and info["num_classes"] == 3
    assert info["kind"] == "latent" and info["image_size"] == RESOLUTION
    assert info["num_records"] == 12 and info["num_shards"] == 4
    assert sum(info["shard_lengths"]) == 12
    assert info["element_spec"]["moments"] == {"shape": [8, 8, 8], "dtype": "float32"}
    assert info["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert len(info["vae"]["config_sha256"]) == 64 and info["vae_dtype"] == "float32"
    assert len(info["vae"]["params_sha256"]) == 64
    assert len(info["latent_stats"]["mean"]) == 4 and len(info["latent_stats"]["std"]) == 4
    assert info["num_ignored_non_image_files"] == 1
    skipped = {s["file"]: s["reason"] for s in info["skipped"]}
    assert set(skipped) == set(UNREADABLE)
    for name, words in UNREADABLE.items():
        assert words in skipped[name], skipped[name]
    examples = _read_all(out)
    for sid, ex in examples.items():
        assert int(ex["label"]) == sorted(CLASSES).index(sid.split("/")[0]), sid
        want = prepare_imagenet.load_crop(os.fspath(image_folder / sid), RESOLUTION)
        np.testing.assert_array_equal(ex["image"], want, err_msg=sid)
    for converted in ("n02000000/cmyk.JPEG", "n02000000/gray.JPEG", "n01000000/rgba.png",
                      "n01000000/png_data.JPEG", "n01000000/palette.png"):
        assert converted in examples
    # The gray image became three equal channels.
    gray = examples["n02000000/gray.JPEG"]["image"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    stats = prepare_imagenet.check_dataset(out, workers=3)
    assert stats["num_records"] == 12 and stats["duplicate_source_ids"] == []
    assert stats["num_skipped"] == 2 and stats["empty_classes"] == 0
    moments = np.stack([ex["moments"] for ex in examples.values()]).astype(np.float64)
    np.testing.assert_allclose(stats["moments_mean"], moments.mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(stats["moments_std"], moments.std((0, 1, 2)), atol=1e-4)


def test_check_names_a_truncated_shard(prepared, tmp_path):
    shutil.copytree(prepared[0], tmp_path / "ds")
    shard = tmp_path / "ds" / records.shard_filename(2, 4)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(records.DataFormatError, match=shard.name):
        prepare_imagenet.check_dataset(tmp_path / "ds")


def test_too_many_unreadable_files_fail_clearly(image_folder, torch_vae, tmp_path):
    with pytest.raises(prepare_imagenet.TooManySkipped,
                       match=r"2 files could not be decoded .*--max_skipped=1"):
        prepare_imagenet.prepare(_args(image_folder, torch_vae[1], tmp_path, max_skipped=1))
    assert not (tmp_path / records.INFO_FILENAME).exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_moments_equal_diffusers(prepared, torch_vae):
    model, _ = torch_vae
    examples = _read_all(prepared[0])
    images = np.stack([ex["image"] for ex in examples.values()])
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    want = np.concatenate([dist.mean.numpy(), dist.logvar.numpy()], axis=1).transpose(0, 2, 3, 1)
    got = np.stack([ex["moments"] for ex in examples.values()])
    assert got.dtype == np.float32
    err = float(np.abs(got - want).max())
    print(f"moments vs diffusers: max abs err {err:.2e} (values up to {np.abs(want).max():.1f})")
    assert err <= 1e-4


def test_rerun_skips_complete_shards_and_resume_gives_the_same_records(
        prepared, image_folder, torch_vae, tmp_path, monkeypatch):
    args = _args(image_folder, torch_vae[1], tmp_path)
    # Killed after two shards (and with a stale temporary file of a third one lying around).
    assert prepare_imagenet.prepare(args, max_shards=2) is None
    assert not (tmp_path / records.INFO_FILENAME).exists()
    assert len(list(tmp_path.glob("data-*.array_record"))) == 2
    (tmp_path / ".tmp-data-00002-of-00004.array_record-1").write_bytes(b"half a shard")
    encoded = []
    original = prepare_imagenet.Encoder.__call__
    monkeypatch.setattr(prepare_imagenet.Encoder, "__call__",
                        lambda self, images: encoded.append(len(images)) or original(self, images))
    info = prepare_imagenet.prepare(args)
    assert sum(encoded) == 5   # shards 2 and 3 only: the 6 files of n03000000, one is text
    assert info["shard_lengths"] == prepared[1]["shard_lengths"]
    _assert_same_records(_read_all(tmp_path), _read_all(prepared[0]))
    # A rerun of a complete dataset encodes nothing.
    encoded.clear()
    again = prepare_imagenet.prepare(args)
    assert encoded == [] and again["num_records"] == 12
    # Other settings into the same directory are an error, not a silent mix.
    with pytest.raises(ValueError, match="other settings"):
        prepare_imagenet.prepare(_args(image_folder, torch_vae[1], tmp_path, resolution=32))


def test_two_processes_write_the_same_records_as_one(prepared, image_folder, torch_vae, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=JIT_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(
        ["timeout", "-s", "KILL", "120", sys.executable, "-m", "input_pipeline.prepare_imagenet",
         f"--source=folder:{image_folder}", f"--vae={torch_vae[1]}", f"--output={tmp_path}",
         f"--resolution={RESOLUTION}", "--batch_size=4", "--workers=2", "--shard_size=4",
         "--max_skipped=2", "--noprogress"],
        # Peers from the environment (train.py's tests pass them as flags): both paths work.
        cwd=REPO, env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    info = json.loads((tmp_path / records.INFO_FILENAME).read_text())
    assert info["shard_lengths"] == prepared[1]["shard_lengths"]
    assert info["skipped"] == prepared[1]["skipped"]
    _assert_same_records(_read_all(tmp_path), _read_all(prepared[0]))


def test_trainer_runs_on_the_produced_shards(prepared, tmp_path):
    out, info = prepared
    config = tiny.get_config("latent")
    config.update_from_flattened_dict({
        "num_train_steps": 2, "data.source": "array_record", "data.path": os.fspath(out),
        "data.image_size": RESOLUTION, "data.channels": 4, "data.num_classes": 3,
        "model.num_classes": 3, "data.with_image": True, "checkpoint.every_steps": 2,
        "logging.log_every": 1})
    wrong = config.copy_and_resolve_references()
    wrong.vae.scaling_factor = 0.13025   # the SDXL VAE's: not what the shards were cached with
    with pytest.raises(ValueError, match="cached with a VAE of scaling_factor"):
        trainer.train_and_evaluate(wrong, os.fspath(tmp_path / "wrong"))
    trainer.train_and_evaluate(config, os.fspath(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "2").exists()


def test_flips_store_the_mirror_moments_and_training_picks_one_per_example(
        prepared, image_folder, torch_vae, tmp_path):
    out = tmp_path / "flips"
    info = prepare_imagenet.prepare(_args(image_folder, torch_vae[1], out, flips=True))
    assert info["flips"] and "moments_flip" in info["element_spec"]
    got, plain = _read_all(out), _read_all(prepared[0])
    _assert_same_records(got, plain)   # the crops' moments do not change with --flips
    # The mirror's moments are the VAE's encoding of the mirrored crop (not mirrored moments).
    images = np.stack([ex["image"][:, ::-1] for ex in got.values()])
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        dist = torch_vae[0].encode(x).latent_dist
    want = np.concatenate([dist.mean.numpy(), dist.logvar.numpy()], axis=1).transpose(0, 2, 3, 1)
    flipped = np.stack([ex["moments_flip"] for ex in got.values()])
    assert np.abs(flipped - want).max() <= 1e-4
    assert np.abs(flipped - flipped[:, :, ::-1]).max() > 1e-2   # not flip-equivariant

    # The train step's choice: per example from its key, the REPA image mirrored to match.
    batch = {"label": np.zeros(len(got), np.int32), "image": np.stack([e["image"] for e in
                                                                        got.values()]),
             "moments": np.stack([e["moments"] for e in got.values()]), "moments_flip": flipped}
    keys = flow.example_keys(0, 3, np.arange(len(got)))
    chosen = flow.choose_flips(batch, keys)
    assert "moments_flip" not in chosen
    is_flip = np.asarray([np.array_equal(c, f) for c, f in zip(chosen["moments"], flipped)])
    assert 0 < is_flip.sum() < len(got)   # 12 fair coins: both outcomes (p(all equal) = 2^-11)
    np.testing.assert_array_equal(np.asarray(chosen["image"])[is_flip],
                                  batch["image"][is_flip][:, :, ::-1])
    np.testing.assert_array_equal(np.asarray(chosen["image"])[~is_flip], batch["image"][~is_flip])
    again = flow.choose_flips(batch, keys)
    np.testing.assert_array_equal(again["moments"], chosen["moments"])

    config = tiny.get_config("latent")
    config.update_from_flattened_dict({
        "num_train_steps": 2, "data.source": "array_record", "data.path": os.fspath(out),
        "data.image_size": RESOLUTION, "data.num_classes": 3, "model.num_classes": 3,
        "data.with_image": True, "data.flips": True, "checkpoint.every_steps": 2})
    trainer.train_and_evaluate(config, os.fspath(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "2").exists()
    config.data.path = os.fspath(prepared[0])   # no moments_flip: a clear error
    with pytest.raises(ValueError, match="no 'moments_flip' field"):
        trainer.train_and_evaluate(config, os.fspath(tmp_path / "run_plain"))


def test_shard_copy_helper_is_atomic(tmp_path):
    src = tmp_path / "a.tmp"
    src.write_bytes(b"x")
    dest = tmp_path / "b"
    records.publish_file(os.fspath(src), epath.Path(dest))
    assert dest.read_bytes() == b"x" and not src.exists()


def test_tfds_source_through_mock_data(torch_vae, tmp_path):
    """tfds.testing.mock_data: imagenet2012's class names (sorted wnids), encoded JPEG bytes via
    SkipDecoding, file names as source ids. The mock has no split sizes and ignores slices, so
    the source is built with its size and holds one shard."""
    import tensorflow_datasets as tfds  # heavy (TensorFlow)

    with tfds.testing.mock_data(num_examples=5):
        names = tfds.builder("imagenet2012").info.features["label"].names
        assert len(names) == 1000 and names == sorted(names) and names[0] == "n01440764"
        source = prepare_imagenet.TfdsSource("imagenet2012", "train", None, names, 5)
        args = _args("unused", torch_vae[1], tmp_path, source="tfds:imagenet2012:train",
                     shard_size=5)
        info = prepare_imagenet.prepare(args, source=source)
    assert info["num_records"] == 5 and info["num_classes"] == 1000
    assert info["source"] == "tfds:imagenet2012:train"
    examples = records.RecordSource(tmp_path)
    assert all(records.decode_source_id(examples[i]["source_id"]) for i in range(5))
