"""evaluate.py and its pipeline (ddt_jax/evaluation/inception_features.py, reference.py,
evaluate_npz.py): the CLI end to end against adm.* on the net's own outputs, streaming reads, 1 vs
2 devices and two processes, the activation cache, reference batches (stored statistics,
--make_ref from a dump, records and an image folder), class-sorted warnings, bad-input errors.

    .venv/bin/python -m pytest tests/test_evaluate.py -q

The network is the Inception fixture (tests/fixtures/inception/: seeded weights regenerated from
its recipe) on 32x32 images: one input shape, so each mesh compiles it once (~5 s on 2 cores); a
forward costs ~0.25 s per image here, so the files hold about ten images each.
"""
import functools
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

import inception_weights
from ddt_jax import convert
from ddt_jax.evaluation import adm
from ddt_jax.evaluation import evaluate_npz
from ddt_jax.evaluation import inception_features as features_lib
from ddt_jax.evaluation import reference
from input_pipeline import prepare_imagenet
from input_pipeline import records

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE, BATCH, CLASSES = 32, 8, 4
NUM_REF, NUM_SAMPLES = 10, 11          # 2 steps each, the last one padded


def smooth_images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """uint8 (n, size, size, 3): blocky colour fields plus noise, different enough per image."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3))
    fine = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
    return np.clip(fine + rng.normal(0, 20, fine.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return inception_weights.write_safetensors(
        tmp_path_factory.mktemp("inception") / "inception.safetensors")


@pytest.fixture(scope="module")
def net(weights_file):
    return convert.load_inception(weights_file)


@pytest.fixture(scope="module")
def runner(net):
    """The jitted net on 2 devices, compiled once for the module."""
    return features_lib.InceptionRunner(net, batch_size=BATCH, devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ref.npz (stored, no statistics) and samples.npz (deflated, shuffled labels)."""
    root = tmp_path_factory.mktemp("npz")
    ref, samples = smooth_images(NUM_REF, 0), smooth_images(NUM_SAMPLES, 1)
    labels = np.random.default_rng(2).permutation(np.arange(NUM_SAMPLES) % CLASSES)
    np.savez(root / "ref.npz", arr_0=ref)
    np.savez_compressed(root / "samples.npz", arr_0=samples, arr_1=labels)
    return dict(root=root, ref=root / "ref.npz", samples=root / "samples.npz", ref_images=ref,
                sample_images=samples, labels=labels)


@pytest.fixture(scope="module")
def features(runner, data):
    """The pipeline's activations of both files on the 2-device runner (no cache)."""
    return {name: features_lib.compute_features(data[name], runner, progress=False)
            for name in ("ref", "samples")}


class FrechetSpy:
    """Records adm.frechet_distance's arguments; the first `real` calls return the real distance,
    the others a stand-in (0.0) where a test checks what was compared: one sqrtm of a 2048 x 2048
    product takes ~20 s on 2 cores (~45 s when the cores are shared)."""

    def __init__(self, real: int = 0):
        self.real, self.calls = real, []

    def __call__(self, mu1, sigma1, mu2, sigma2):
        real = len(self.calls) < self.real
        value = adm.frechet.frechet_distance(mu1, sigma1, mu2, sigma2) if real else 0.0
        self.calls.append(((mu1, sigma1, mu2, sigma2), value))
        return value


@pytest.fixture
def fake_frechet(monkeypatch):
    spy = FrechetSpy()
    monkeypatch.setattr(adm, "frechet_distance", spy)
    return spy


@functools.cache   # evaluate.py defines absl flags: one module per test session
def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return load_cli()


def counting(monkeypatch, runner) -> list:
    """Counts the runner's dispatches (each is one step of the net)."""
    calls, dispatch = [], runner.dispatch
    monkeypatch.setattr(runner, "dispatch", lambda images: calls.append(len(images))
                        or dispatch(images))
    return calls


def assert_features_close(got, want):
    """The per-device batch changes XLA's conv and matmul blocking: ~1e-5 apart on pool_3 values
    up to ~30, the Inception fixture's own tolerance."""
    for k in features_lib.FEATURES:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4 if k != "softmax" else 1e-5,
                                   rtol=1e-4 if k != "softmax" else 0)


# ----------------------------------------------------------------------------------------------
# Reading arr_0 by streaming
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_streaming_rows_equal_np_load(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 256, (13, 5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    save(path, arr_0=images, arr_1=np.arange(13), other=np.zeros(3))
    with np.load(path) as f:
        loaded = f["arr_0"]
    header = features_lib.read_header(path)
    assert header.shape == (13, 5, 7, 3) and header.dtype == np.uint8
    blocks = list(features_lib.iter_rows(path, chunk=4))
    assert [len(b) for b in blocks] == [4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), loaded)
    np.testing.assert_array_equal(
        np.concatenate(list(features_lib.iter_rows(path, start=6, stop=11, chunk=3))),
        loaded[6:11])
    assert features_lib.npz_members(path) == ["arr_0", "arr_1", "other"]
    np.testing.assert_array_equal(features_lib.read_labels(path, 13), np.arange(13))


# ----------------------------------------------------------------------------------------------
# Features on the mesh
# ----------------------------------------------------------------------------------------------

def test_features_equal_the_net_on_1_and_2_devices(net, data, features):
    got = features["samples"]                               # 2 devices, 4 images per device
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        "pool": ((NUM_SAMPLES, 2048), np.float32), "spatial": ((NUM_SAMPLES, 2023), np.float32),
        "softmax": ((NUM_SAMPLES, 1008), np.float32)}
    one = jax.jit(lambda x: net(x))(data["sample_images"])  # one device, the whole batch
    assert_features_close(got, {k: np.asarray(v) for k, v in one.items()})


def test_the_cli_end_to_end(cli, data, features, weights_file, tmp_path, capsys, monkeypatch):
    """evaluate.py on all 8 devices: its JSON holds adm.* of the net's outputs on the files (the
    real Frechet distance for FID; sFID's, the same function on other features, is a stand-in)."""
    spy = FrechetSpy(real=1)
    monkeypatch.setattr(adm, "frechet_distance", spy)
    output = tmp_path / "out" / "metrics.json"
    with flagsaver.flagsaver(inception=str(weights_file), output=str(output), batch_size=BATCH,
                             progress=False):
        cli.main(["evaluate.py", str(data["ref"]), str(data["samples"])])
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == [
        "Inception Score", "FID", "sFID", "Precision", "Recall"]   # ADM's order
    metrics = json.loads(output.read_text())
    for key in ("inception_score", "fid", "sfid", "precision", "recall", "num_samples", "num_ref",
                "ref", "samples", "ref_sha256", "samples_sha256", "inception", "warnings"):
        assert key in metrics, key
    assert lines[1] == f"FID: {metrics['fid']}"
    assert (metrics["num_samples"], metrics["num_ref"]) == (NUM_SAMPLES, NUM_REF)
    assert metrics["samples_sha256"] == features_lib.file_sha256(data["samples"])
    assert metrics["ref_statistics"] == "arr_0"

    # The activations it cached beside the inputs are the net's (on 2 devices, to 1e-4) ...
    acts = {}
    for name in ("ref", "samples"):
        (cache,) = data["root"].glob(f"{name}.npz.adm_acts.*.npz")
        with np.load(cache) as f:
            acts[name] = {k: f[k] for k in features_lib.FEATURES}
        assert_features_close(acts[name], features[name])
    # ... and the metrics are adm.* of them.
    ref, samples = acts["ref"], acts["samples"]
    assert metrics["inception_score"] == adm.inception_score(samples["softmax"])
    assert (metrics["precision"], metrics["recall"]) == adm.precision_recall(ref["pool"],
                                                                             samples["pool"])
    for (args, value), (key, feature) in zip(spy.calls, (("fid", "pool"), ("sfid", "spatial"))):
        want = (*adm.statistics(samples[feature]), *adm.statistics(ref[feature]))
        for got, expected in zip(args, want):
            np.testing.assert_array_equal(got, expected)
        assert metrics[key] == value
    assert len(spy.calls) == 2
    # 11 images: a singular covariance, said on stderr and in the JSON; the labels are shuffled.
    assert any("singular" in w for w in metrics["warnings"]) and "singular" in printed.err
    assert not any("class-sorted" in w for w in metrics["warnings"])

    # --make_ref on the same mesh: a reference batch from the dump.
    made = tmp_path / "made_ref.npz"
    with flagsaver.flagsaver(inception=str(weights_file), make_ref=str(made), ref_images=4,
                             batch_size=BATCH, progress=False):
        cli.main(["evaluate.py", str(data["samples"])])
    assert f"wrote {made}: arr_0 = 4 images" in capsys.readouterr().out
    check_reference_file(made, 4)


# Each of two processes (1 CPU device each) computes its slice of rows; process 0 saves.
TWO_PROCESS_SCRIPT = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import numpy as np
from ddt_jax import convert
from ddt_jax.evaluation import inception_features as features_lib
from ddt_jax.evaluation import reference
runner = features_lib.InceptionRunner(convert.load_inception(sys.argv[3]), batch_size=8)
assert runner.local_batch == 4 and jax.device_count() == 2
features = features_lib.compute_features(sys.argv[4], runner, progress=False)
reference.make_reference(sys.argv[4], sys.argv[5] + "/ref.npz", runner, num_images=5,
                         progress=False)
if jax.process_index() == 0:
    np.savez(sys.argv[5] + "/features.npz", **features)
"""


def test_two_processes_compute_the_features_of_one(data, features, weights_file, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(
        ["timeout", "-s", "KILL", "300", sys.executable, "-c", TWO_PROCESS_SCRIPT,
         f"127.0.0.1:{port}", str(i), str(weights_file), str(data["samples"]), str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    with np.load(tmp_path / "features.npz") as f:
        gathered = {k: f[k] for k in f.files}
    assert_features_close(gathered, features["samples"])   # rows 0-5 on one process, 6-10 on two
    with np.load(tmp_path / "ref.npz") as f:
        pool_sigma = f["sigma"]
    want = np.cov(gathered["pool"], rowvar=False)          # statistics merged over the processes
    assert np.abs(pool_sigma - want).max() <= 1e-12 * np.abs(want).max()


# ----------------------------------------------------------------------------------------------
# The activation cache
# ----------------------------------------------------------------------------------------------

def test_cache_hit_skips_the_net_and_a_corrupt_cache_is_rewritten(runner, data, tmp_path,
                                                                  monkeypatch, caplog):
    path = tmp_path / "samples.npz"
    labels = data["labels"][:5]
    np.savez(path, arr_0=data["sample_images"][:5], arr_1=labels)   # one step of the net
    calls = counting(monkeypatch, runner)
    first = features_lib.file_activations(path, runner, progress=False)
    assert not first.cached and calls
    (cache,) = tmp_path.glob("samples.npz.adm_acts.*.npz")
    np.testing.assert_array_equal(first.labels, labels)

    calls.clear()
    second = features_lib.file_activations(path, runner, progress=False)
    assert second.cached and not calls
    for k in features_lib.FEATURES:
        np.testing.assert_array_equal(second.features[k], first.features[k])

    cache.write_bytes(cache.read_bytes()[:1000])   # a partial file
    third = features_lib.file_activations(path, runner, progress=False)
    assert not third.cached and calls
    assert "ignoring the activation cache" in caplog.text
    with np.load(cache) as f:
        np.testing.assert_array_equal(f["pool"], first.features["pool"])

    # Another folder for the cache, or none at all.
    calls.clear()
    features_lib.file_activations(path, runner, cache_dir=tmp_path / "acts", progress=False)
    assert calls and len(list((tmp_path / "acts").glob("samples.npz.adm_acts.*.npz"))) == 1
    os.remove(cache)
    features_lib.file_activations(path, runner, cache=False, progress=False)
    assert not list(tmp_path.glob("*.adm_acts.*"))


# ----------------------------------------------------------------------------------------------
# Reference batches
# ----------------------------------------------------------------------------------------------

def test_stored_reference_statistics_are_used(runner, data, features, tmp_path, fake_frechet):
    """FID/sFID against the stored mu/sigma (not arr_0's); precision/recall against arr_0."""
    rng = np.random.default_rng(5)
    pool, spatial = rng.uniform(0, 2, (3000, 2048)), rng.uniform(0, 2, (3000, 2023))
    stats = dict(mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
                 sigma_s=np.cov(spatial, rowvar=False))
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=data["ref_images"][:4], **stats)
    # No cache: the samples' features are then this runner's, as in `features`.
    metrics = evaluate_npz.evaluate(path, data["samples"], runner, cache=False, progress=False)
    assert metrics["ref_statistics"] == "stored" and metrics["num_ref"] == 4
    samples = features["samples"]
    for (args, _), (suffix, feature) in zip(fake_frechet.calls, (("", "pool"),
                                                                 ("_s", "spatial"))):
        np.testing.assert_array_equal(args[2], stats["mu" + suffix])
        np.testing.assert_array_equal(args[3], stats["sigma" + suffix])
        np.testing.assert_allclose(args[0], samples[feature].mean(0), atol=1e-4)
    ref_pool = features["ref"]["pool"][:4]
    assert (metrics["precision"], metrics["recall"]) == adm.precision_recall(ref_pool,
                                                                             samples["pool"])

    np.savez(path, arr_0=data["ref_images"][:4], mu=stats["mu"], sigma=stats["sigma"])
    with pytest.raises(ValueError, match=r"not \['mu_s', 'sigma_s'\].*all four"):
        evaluate_npz.evaluate(path, data["samples"], runner, progress=False)


def test_running_statistics_equal_np_cov():
    rng = np.random.default_rng(0)
    rows = rng.normal(3.0, 2.0, (1000, 64)) * rng.uniform(0.1, 10, 64)   # mean far from 0
    stats = reference.RunningStatistics(64)
    lo = 0
    for size in (1, 250, 7, 500, 242):
        stats.update(rows[lo:lo + size])
        lo += size
    mu, sigma = stats.result()
    np.testing.assert_allclose(mu, rows.mean(0), rtol=1e-12)
    want = np.cov(rows, rowvar=False)
    assert np.abs(sigma - want).max() <= 1e-12 * np.abs(want).max()


def check_reference_file(path, num_images: int) -> dict:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    assert {k: (v.dtype, v.ndim) for k, v in arrays.items()} == {
        "arr_0": (np.uint8, 4), "arr_1": (np.int64, 1), "mu": (np.float64, 1),
        "sigma": (np.float64, 2), "mu_s": (np.float64, 1), "sigma_s": (np.float64, 2)}
    assert arrays["arr_0"].shape == (num_images, SIZE, SIZE, 3)
    assert arrays["sigma"].shape == (2048, 2048) and arrays["sigma_s"].shape == (2023, 2023)
    assert reference.stored_statistics(path) is not None   # what evaluate reads back
    return arrays


def test_make_ref_from_a_sample_dump(runner, data, features, tmp_path):
    out = tmp_path / "ref.npz"
    summary = reference.make_reference(data["samples"], out, runner, num_images=6, seed=3,
                                       progress=False)
    assert summary["num_source_images"] == NUM_SAMPLES and summary["num_ref_images"] == 6
    arrays = check_reference_file(out, 6)
    index = reference.select(NUM_SAMPLES, 6, 3)
    np.testing.assert_array_equal(arrays["arr_0"], data["sample_images"][index])
    np.testing.assert_array_equal(arrays["arr_1"], data["labels"][index])
    # Statistics over ALL images, streamed: np.cov of the whole feature set (same runner).
    for key, feature in (("", "pool"), ("_s", "spatial")):
        rows = features["samples"][feature].astype(np.float64)
        np.testing.assert_allclose(arrays["mu" + key], rows.mean(0), rtol=1e-12, atol=1e-12)
        want = np.cov(rows, rowvar=False)
        assert np.abs(arrays["sigma" + key] - want).max() <= 1e-12 * np.abs(want).max()


def test_make_ref_from_an_image_folder_and_records(runner, tmp_path):
    folder = tmp_path / "train"
    for i, (w, h) in enumerate([(40, 50), (64, 33), (32, 32), (90, 70), (45, 41)]):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_images(1, 10 + i, 96)[0]).resize((w, h)).save(
            folder / f"class{i % 2}" / f"{i}.png")
    files = sorted(folder.glob("*/*.png"))   # FolderSource's order: class folders, then names
    crops = np.stack([prepare_imagenet.center_crop(Image.open(p), SIZE) for p in files])
    labels = np.array([int(p.parent.name[-1]) for p in files])
    out = tmp_path / "folder_ref.npz"
    with pytest.raises(ValueError, match="--resolution=S"):
        reference.make_reference(folder, out, runner, progress=False)
    reference.make_reference(folder, out, runner, resolution=SIZE, num_images=3, seed=0,
                             workers=2, progress=False)
    from_folder = check_reference_file(out, 3)
    index = reference.select(len(files), 3, 0)
    np.testing.assert_array_equal(from_folder["arr_0"], crops[index])
    np.testing.assert_array_equal(from_folder["arr_1"], labels[index])

    # The same crops as latent records with the uint8 `image` (prepare_imagenet's layout).
    examples = [{"label": label, "moments": np.zeros((4, 4, 8), np.float32), "image": crop}
                for label, crop in zip(labels, crops)]
    records.write_shards(examples, tmp_path / "shards", 1, {   # 1 shard keeps the order
        "kind": "latent", "num_classes": 2, "image_size": SIZE, "source": "test"})
    reference.make_reference(tmp_path / "shards", tmp_path / "records_ref.npz", runner,
                             num_images=10, progress=False)
    from_records = check_reference_file(tmp_path / "records_ref.npz", len(crops))
    np.testing.assert_array_equal(from_records["arr_0"], crops)
    np.testing.assert_array_equal(from_records["arr_1"], labels)
    for key in reference.STAT_KEYS:   # the same images in the same order: the same statistics
        np.testing.assert_array_equal(from_records[key], from_folder[key])


# ----------------------------------------------------------------------------------------------
# Class-sorted warnings and bad inputs
# ----------------------------------------------------------------------------------------------

def test_class_sorted_labels_are_warned_about(runner, data, tmp_path, fake_frechet):
    path = tmp_path / "sorted.npz"
    order = np.argsort(data["labels"], kind="stable")
    np.savez(path, arr_0=data["sample_images"][order], arr_1=data["labels"][order])
    metrics = evaluate_npz.evaluate(data["ref"], path, runner, progress=False)
    assert any("labels (arr_1) look class-sorted" in w for w in metrics["warnings"])


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, match", [
    ("float", r"expected uint8 images in \[0, 255\], got float32.*astype\(np.uint8\)"),
    ("nchw", r"looks NCHW; transpose to NHWC"),
    ("gray", r"1 channels; Inception-v3 needs RGB.*mnist_eval"),
    ("no_arr_0", r"has no arr_0 \(found \['images'\]\)"),
    ("one", r"holds 1 image\(s\); FID statistics .* need at least 2"),
    ("size", r"reference images are 32x32 but the samples are 48x48.*--allow_size_mismatch"),
    ("not_npz", r"is not an .npz \(zip\) file"),
    ("labels", r"arr_1 must be \(3,\) integer class labels"),
])
def test_bad_inputs_name_the_problem_and_the_fix(runner, data, tmp_path, monkeypatch, case,
                                                 match):
    good = np.zeros((3, SIZE, SIZE, 3), np.uint8)
    samples = {
        "float": lambda p: write(p, arr_0=good.astype(np.float32)),
        "nchw": lambda p: write(p, arr_0=good.transpose(0, 3, 1, 2)),
        "gray": lambda p: write(p, arr_0=good[..., :1]),
        "no_arr_0": lambda p: write(p, images=good),
        "one": lambda p: write(p, arr_0=good[:1]),
        "size": lambda p: write(p, arr_0=np.zeros((3, 48, 48, 3), np.uint8)),
        "not_npz": lambda p: write_bytes(p, b"not a zip"),
        "labels": lambda p: write(p, arr_0=good, arr_1=np.zeros(3, np.float32)),
    }[case](tmp_path / "bad.npz")
    calls = counting(monkeypatch, runner)
    with pytest.raises(ValueError, match=match):
        evaluate_npz.evaluate(data["ref"], samples, runner, progress=False)
    if case != "labels":
        assert not calls   # checked from the headers, before the net runs
    if case in ("float", "nchw", "no_arr_0"):   # the reference is checked the same way
        with pytest.raises(ValueError, match=match):
            evaluate_npz.evaluate(samples, data["samples"], runner, progress=False)


def test_size_mismatch_can_be_allowed_and_is_then_warned_about():
    a = features_lib.ArrayHeader((3, 32, 32, 3), np.dtype(np.uint8), False)
    b = features_lib.ArrayHeader((3, 48, 40, 3), np.dtype(np.uint8), False)
    assert evaluate_npz.check_sizes(a, a) == []
    (note,) = evaluate_npz.check_sizes(a, b, allow_size_mismatch=True)
    assert "48x40" in note


def test_missing_inception_weights_say_how_to_get_them(cli, data, tmp_path):
    for value in (str(tmp_path / "nowhere.pth"), None):
        with flagsaver.flagsaver(inception=value), pytest.raises(SystemExit) as e:
            cli.main(["evaluate.py", str(data["ref"]), str(data["samples"])])
        message = str(e.value)
        assert "pt_inception-2015-12-05-6726825d.pth" in message
        assert "python -m ddt_jax.convert inception" in message
