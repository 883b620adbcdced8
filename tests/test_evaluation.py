"""Tests of ddt_jax.evaluation: the ADM Frechet distance, the shipped classifier, sample metrics."""
import json

import numpy as np
import pytest

from ddt_jax.evaluation import frechet
from ddt_jax.evaluation import mnist_classifier
from ddt_jax.evaluation import mnist_eval
from input_pipeline.mnist_digits import load_mnist


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _pad32(images_28):
    """uint8 (N, 28, 28) -> (N, 32, 32, 1), the layout of the diffusion data and of sample dumps."""
    return np.pad(images_28, ((0, 0), (2, 2), (2, 2)))[..., None]


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------
def test_feature_statistics_float64_and_unbiased_covariance():
    feats = np.random.RandomState(0).normal(size=(300, 5)).astype(np.float32)
    mu, sigma = frechet.feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    x = feats.astype(np.float64)
    centred = x - x.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet.feature_statistics(feats[0])
    with pytest.raises(ValueError, match="at least 2"):
        frechet.feature_statistics(feats[:1])


def test_frechet_identical_feature_sets_is_zero():
    feats = np.random.RandomState(1).normal(size=(1000, 32)) * 3.0 + 5.0
    stats = frechet.feature_statistics(feats)
    trace = np.trace(stats[1])  # ~ 32 * 9 = 288: zero "up to rounding" relative to this scale
    assert abs(frechet.frechet_distance(*stats, *stats)) < 1e-9 * trace


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.RandomState(2)
    sigma = _random_spd(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2)
    np.testing.assert_allclose(frechet.frechet_distance(mu1, sigma, mu2, sigma), expected,
                               rtol=1e-8)


def test_frechet_diagonal_covariances_closed_form():
    rng = np.random.RandomState(3)
    a, b = rng.uniform(0.1, 4.0, size=8), rng.uniform(0.1, 4.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_full_covariances_match_symmetric_form():
    # tr sqrtm(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) for SPD S1, S2; the right side needs only eigh, so
    # it checks sqrtm of the non-symmetric product independently.
    rng = np.random.RandomState(4)
    s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(s1_half @ s2 @ s1_half)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    np.testing.assert_allclose(frechet.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)


def test_frechet_from_large_gaussian_samples():
    rng = np.random.RandomState(5)
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 0.25, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    n = 200_000  # sampling error of each term ~ 1/sqrt(n) relative: 0.2%
    x1 = mu1 + np.sqrt(a) * rng.normal(size=(n, 4))
    x2 = mu2 + np.sqrt(b) * rng.normal(size=(n, 4))
    # 3.686 + 5 = 8.686
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet.frechet_distance(*frechet.feature_statistics(x1), *frechet.feature_statistics(x2))
    np.testing.assert_allclose(got, expected, rtol=0.01)


def test_frechet_large_imaginary_part_raises():
    # Not a covariance (negative variance): sqrtm(diag(1, -1)) = diag(1, 1j).
    mu = np.zeros(2)
    with pytest.raises(frechet.FrechetDistanceError, match="[Ii]maginary component"):
        frechet.frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's own "singular" note
def test_frechet_singular_product_retries_with_eps_offset():
    # [[0, 1], [0, 0]] has no square root: sqrtm gives inf, so ADM adds eps to both diagonals, where
    # sqrtm([[e', 1+e], [0, e']]) has trace 2 sqrt(e') with e' = eps (1 + eps).
    eps = 1e-6
    sigma1 = np.array([[0.0, 1.0], [0.0, 0.0]])
    with pytest.warns(RuntimeWarning, match="adding"):
        got = frechet.frechet_distance(np.zeros(2), sigma1, np.zeros(2), np.eye(2), eps=eps)
    np.testing.assert_allclose(got, 2.0 - 4.0 * np.sqrt(eps * (1 + eps)), rtol=1e-6)


def test_frechet_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --------------------------------------------------------------------------------------------------
# The digit classifier
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    return mnist_classifier.load_classifier()


@pytest.fixture(scope="module")
def test_digits():
    return load_mnist("test")


def test_shipped_classifier_accuracy_on_held_out_split(classifier, test_digits):
    images, labels = test_digits
    accuracy = float((classifier.classify(images) == labels).mean())
    assert accuracy >= 0.98
    # The json records what the CLI measured; 0.001 = 2 of 2,000 digits of float/CPU leeway.
    assert abs(accuracy - classifier.metadata["test_accuracy"]) <= 1e-3
    assert classifier.metadata["train_split"] == "train"


def test_classifier_input_layouts_agree(classifier, test_digits):
    images = test_digits[0][:64]
    padded = _pad32(images)
    as_float = padded.astype(np.float32) / 127.5 - 1.0
    f28, f32, ffloat = (classifier.features(x) for x in (images, padded, as_float))
    assert f32.shape == (64, classifier.arch.feature_dim) and f32.dtype == np.float32
    np.testing.assert_allclose(f28, f32, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ffloat, f32, rtol=1e-5, atol=1e-5)
    # Batching (the padded last batch) does not change the answer.
    np.testing.assert_allclose(classifier.features_and_logits(padded, batch_size=40)[0], f32,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mnist_classifier.classify(padded), classifier.classify(padded))


def test_classifier_rejects_bad_inputs(classifier):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        classifier.classify(np.full((2, 32, 32, 1), 255.0, np.float32))
    with pytest.raises(ValueError, match="shape"):
        classifier.classify(np.zeros((2, 30, 30), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        classifier.classify(np.zeros((2, 32, 32, 1), np.int32))


def test_missing_weights_error_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m ddt_jax.evaluation.mnist_classifier"):
        mnist_classifier.load_classifier(tmp_path / "absent.safetensors")


def test_train_save_load_round_trip(tmp_path, test_digits):
    # A few steps only: checks the training loop runs and that saved weights reload exactly.
    clf, meta = mnist_classifier.train_classifier(seed=1, steps=3, batch_size=16, log_every=0)
    assert meta["steps"] == 3 and 0.0 <= meta["test_accuracy"] <= 1.0
    path = tmp_path / "clf.safetensors"
    mnist_classifier.save_classifier(clf, path, meta)
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["architecture"]["feature_dim"] == clf.arch.feature_dim and saved["seed"] == 1
    reloaded = mnist_classifier.load_classifier(path)
    images = test_digits[0][:32]
    np.testing.assert_array_equal(reloaded.logits(images), clf.logits(images))


# --------------------------------------------------------------------------------------------------
# Sample metrics
# --------------------------------------------------------------------------------------------------
def test_real_held_out_digits_score_like_real_data(tmp_path, classifier, test_digits):
    images, labels = test_digits
    order = np.random.RandomState(0).permutation(len(labels))  # dumps come in random class order
    path = _write_npz(tmp_path / "real.npz", arr_0=_pad32(images)[order], arr_1=labels[order])
    out = tmp_path / "metrics" / "real.json"
    m = mnist_eval.evaluate_samples(path, classifier=classifier, output=out)
    assert json.loads(out.read_text()) == m
    assert m["num_samples"] == 2000 and m["floor_num_train_digits"] == 2000
    assert m["label_accuracy"] >= 0.98
    assert min(m["label_accuracy_per_class"].values()) >= 0.9
    assert m["samples_per_class"] == {str(d): int((labels == d).sum()) for d in range(10)}
    # The samples *are* the reference set, so the distance is rounding only, below the real floor.
    assert m["real_frechet_floor"] > 0
    assert m["frechet_distance"] < 1e-6 * max(1.0, m["real_frechet_floor"])


def test_real_train_digits_land_near_the_floor(classifier):
    images, labels = load_mnist("train")
    idx = np.random.RandomState(123).choice(len(labels), 1000, replace=False)  # not a floor subset
    m = mnist_eval.evaluate_samples((_pad32(images[idx]), labels[idx]), classifier=classifier)
    assert m["label_accuracy"] >= 0.98
    assert 0.5 * m["real_frechet_floor"] < m["frechet_distance"] < 2.0 * m["real_frechet_floor"]


def test_noise_scores_badly(classifier):
    rng = np.random.RandomState(2)
    noise = rng.randint(0, 256, size=(500, 32, 32, 1)).astype(np.uint8)
    labels = rng.randint(0, 10, size=500)
    m = mnist_eval.evaluate_samples({"arr_0": noise, "arr_1": labels}, classifier=classifier)
    assert m["label_accuracy"] < 0.3  # chance is 0.1
    assert m["frechet_distance"] > 20 * m["real_frechet_floor"]


def test_floor_matches_sample_labels_even_beyond_the_train_split(classifier):
    # 700 samples of digit 5, of which the train split holds 684: the floor draws with replacement.
    images, labels = load_mnist("train")
    fives = _pad32(images[labels == 5])
    samples = np.concatenate([fives, fives[:700 - len(fives)]])
    m = mnist_eval.evaluate_samples((samples, np.full(700, 5)), classifier=classifier)
    assert len(fives) < 700 and m["floor_with_replacement"]
    assert m["samples_per_class"]["5"] == 700 and m["label_accuracy_per_class"]["0"] is None
    assert m["label_accuracy"] >= 0.99
    # Both sides are (nearly) the same real 5s, so they score alike.
    assert 0.5 * m["real_frechet_floor"] < m["frechet_distance"] < 2.0 * m["real_frechet_floor"]


def test_cli_prints_table_and_writes_json(tmp_path, capsys, test_digits):
    images, labels = test_digits
    path = _write_npz(tmp_path / "s.npz", arr_0=_pad32(images[:300]), arr_1=labels[:300])
    mnist_eval.main([str(path), "--output", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert "label accuracy" in printed and "Frechet distance" in printed
    assert "real-data floor" in printed
    assert json.loads((tmp_path / "m.json").read_text())["num_samples"] == 300


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((4, 32, 32, 1), np.float32), "arr_1": np.zeros(4, np.int64)}, "uint8"),
    ({"arr_0": np.zeros((4, 32, 32, 1), np.uint8)}, "missing arr_1"),
    ({"arr_0": np.zeros((4, 28, 28, 1), np.uint8), "arr_1": np.zeros(4, np.int64)},
     r"\(N, 32, 32, 1\)"),
    ({"arr_0": np.zeros((4, 32, 32, 3), np.uint8), "arr_1": np.zeros(4, np.int64)},
     r"\(N, 32, 32, 1\)"),
    ({"arr_0": np.zeros((4, 32, 32, 1), np.uint8), "arr_1": np.zeros(3, np.int64)},
     "arr_1 must have shape"),
    ({"arr_0": np.zeros((4, 32, 32, 1), np.uint8), "arr_1": np.zeros(4, np.float32)}, "integer"),
    ({"arr_0": np.zeros((4, 32, 32, 1), np.uint8), "arr_1": np.full(4, 10)}, "digits 0..9"),
])
def test_bad_sample_files_raise_clear_errors(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        mnist_eval.evaluate_samples(path)


def test_missing_sample_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mnist_eval.evaluate_samples(tmp_path / "absent.npz")
