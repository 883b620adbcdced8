"""ddt_jax.evaluation.adm against the official ADM evaluator's own outputs on fixed features.

Fixture: tests/fixtures/adm/adm_metrics.npz (tests/fixtures/adm/README.md says what each array
holds and why the tolerances are what they are).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from ddt_jax.evaluation import adm
from ddt_jax.evaluation import frechet

NPZ = FIXTURES / "adm" / "adm_metrics.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(NPZ) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def softmax(ref):
    # ADM's softmax graph, softmax(x @ W) without a bias, in float32.
    logits = ref["sample_pool_is"] @ ref["softmax_w"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Statistics and Frechet distances
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pool", "spatial"])
def test_statistics_match_the_reference_batch(ref, kind):
    mu, sigma = adm.statistics(ref[f"ref_{kind}"])
    suffix = "" if kind == "pool" else "_s"
    np.testing.assert_array_equal(mu, ref[f"mu{suffix}"])
    assert mu.dtype == sigma.dtype == np.float64
    fingerprints = {"diag": np.diag(sigma), "block16": sigma[:16, :16], "trace": np.trace(sigma),
                    "sum": sigma.sum()}
    for name, value in fingerprints.items():
        np.testing.assert_allclose(value, ref[f"sigma{suffix}_{name}"], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind,key", [("pool", "fid"), ("spatial", "sfid")])
def test_fid_and_sfid(ref, kind, key):
    distance = adm.frechet_distance(*adm.statistics(ref[f"sample_{kind}"]),
                                    *adm.statistics(ref[f"ref_{kind}"]))
    np.testing.assert_allclose(distance, ref[key], rtol=1e-6)


def test_frechet_distance_is_frechet_py():
    assert adm.frechet_distance is frechet.frechet_distance


# --------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------
def test_inception_score(ref, softmax):
    splits = adm.inception_score_splits(softmax)
    assert splits.dtype == np.float32 and splits.shape == (3,)  # 5000, 5000, 2000 rows
    np.testing.assert_allclose(splits, ref["inception_score_splits"], rtol=1e-5)
    score = adm.inception_score(softmax)
    assert isinstance(score, float)
    np.testing.assert_allclose(score, ref["inception_score"], rtol=1e-5)


def test_inception_score_odd_split_size(softmax):
    # 12000 rows in splits of 3001: three full ones and a last one of 2997 rows, in row order.
    splits = adm.inception_score_splits(softmax, split_size=3001)
    p = softmax.astype(np.float64)
    expected = []
    for part in (p[:3001], p[3001:6002], p[6002:9003], p[9003:]):
        kl = np.sum(part * (np.log(part) - np.log(part.mean(axis=0))), axis=1)
        expected.append(np.exp(kl.mean()))
    np.testing.assert_allclose(splits, expected, rtol=1e-5)
    np.testing.assert_allclose(adm.inception_score(softmax, 3001), np.mean(expected), rtol=1e-5)
    # One split holding everything when split_size exceeds N.
    assert adm.inception_score_splits(softmax[:100], split_size=5000).shape == (1,)


def test_inception_score_depends_on_order(softmax):
    # Rows sorted by predicted class: each split sees fewer classes and scores lower (24.4 here
    # against 34.0; ImageNet's 50K dumps fall from ~300 to ~68).
    order = np.argsort(softmax.argmax(axis=1), kind="stable")
    assert adm.inception_score(softmax[order]) < 0.8 * adm.inception_score(softmax)


def test_inception_score_rejects_non_softmax(ref, softmax):
    for bad in (ref["sample_pool_is"][:50], np.log(softmax[:50]), softmax[0], np.zeros((0, 10)),
                np.full((4, 10), np.nan)):
        with pytest.raises(ValueError, match="pass the softmax, not pool features/logits"):
            adm.inception_score(bad)
    with pytest.raises(ValueError, match="split_size"):
        adm.inception_score(softmax[:10], split_size=0)


# --------------------------------------------------------------------------------------------------
# Radii, precision and recall
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["", "f16case_"])
def test_manifold_radii_exact(ref, case):
    for name in ("ref", "sample"):
        radii = adm.manifold_radii(ref[f"{case}{name}_pool"])
        assert radii.dtype == np.float32
        np.testing.assert_array_equal(radii, ref[f"{case}radii_{name}"])


@pytest.mark.parametrize("distance_dtype", ["float16", "float32"])
def test_precision_recall_exact_on_grid_features(ref, distance_dtype):
    # Every float16 quantity is exact on these features: all three dtypes give ADM's numbers.
    precision, recall = adm.precision_recall(ref["ref_pool"], ref["sample_pool"],
                                             distance_dtype=distance_dtype)
    assert isinstance(precision, float) and isinstance(recall, float)
    assert (precision, recall) == (ref["precision"], ref["recall"])
    assert (precision, recall) == (ref["precision_exactdist"], ref["recall_exactdist"])


def test_precision_recall_repeats_adm_float16_arithmetic(ref):
    # Exact, not within the ~1.4e-3 a float32-accumulated norm would leave (0.750000 / 0.870455):
    # the squared norms follow TF-CPU's float16 summation order bit for bit.
    got = adm.precision_recall(ref["f16case_ref_pool"], ref["f16case_sample_pool"])
    assert got == (ref["f16case_precision"], ref["f16case_recall"])
    # ADM's float64-distance variant; float32 distances give the same here (float64 is slower).
    exact = adm.precision_recall(ref["f16case_ref_pool"], ref["f16case_sample_pool"],
                                 distance_dtype="float32")
    assert exact == (ref["f16case_precision_exactdist"], ref["f16case_recall_exactdist"])


@pytest.mark.parametrize("block_size", [512, 700])
def test_smaller_padded_blocks_change_nothing(ref, block_size):
    # 2200 and 2100 rows divide by neither: the last block of each is padded.
    radii = adm.manifold_radii(ref["f16case_ref_pool"], block_size=block_size)
    np.testing.assert_array_equal(radii, ref["f16case_radii_ref"])
    got = adm.precision_recall(ref["f16case_ref_pool"], ref["f16case_sample_pool"],
                               block_size=block_size)
    assert got == (ref["f16case_precision"], ref["f16case_recall"])


def test_radii_match_brute_force_for_any_k_and_shape():
    # Odd dimension, blocks of 16 over 50 rows, float64 distances against a direct computation.
    x = np.random.RandomState(0).normal(size=(50, 37)).astype(np.float32)
    d = np.sum((x[:, None].astype(np.float64) - x[None]) ** 2, axis=-1)
    for k in (1, 3, 5):
        got = adm.manifold_radii(x, k=k, distance_dtype="float64", block_size=16)
        np.testing.assert_allclose(got, np.sort(d, axis=1)[:, k].astype(np.float32), rtol=1e-6)


def test_float16_overflow_falls_back_to_float32(ref):
    # Squared norms ~1e4 * 100 overflow float16 (65504): ADM redoes such blocks in float32.
    big = ref["f16case_ref_pool"][:300] * 100
    samples = ref["f16case_sample_pool"][:200] * 100
    np.testing.assert_array_equal(adm.manifold_radii(big),
                                  adm.manifold_radii(big, distance_dtype="float32"))
    assert adm.precision_recall(big, samples) == adm.precision_recall(
        big, samples, distance_dtype="float32")


def test_float16_squared_norms_follow_tensorflow_cpu():
    # Bitwise against tf.reduce_sum(tf.square(float16)), for lengths that take every path of
    # Eigen's reduction (scalar tail, packets, unrolled packets, tree splits off a packet boundary)
    # and values whose squares are float16 subnormals or overflow.
    tf = pytest.importorskip("tensorflow")
    rng = np.random.RandomState(1)
    for d in (5, 37, 1000, 2023, 2048):
        x = rng.lognormal(sigma=1.5, size=(16, d)) * rng.choice([1, 1e-2, 1e-3], size=(16, d))
        x = x.astype(np.float32)
        expected = tf.reduce_sum(tf.square(tf.cast(x, tf.float16)), axis=1).numpy()
        got = np.asarray(adm._squared_norms(jnp.asarray(x, jnp.float16)))
        np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16), err_msg=d)


def test_distance_input_errors(ref):
    x = ref["ref_pool"][:20]
    with pytest.raises(ValueError, match="distance_dtype"):
        adm.manifold_radii(x, distance_dtype="bfloat16")
    with pytest.raises(ValueError, match="block_size"):
        adm.manifold_radii(x, block_size=0)
    with pytest.raises(ValueError, match="needs more than 3"):
        adm.manifold_radii(x[:3])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        adm.manifold_radii(x[0])
    with pytest.raises(ValueError, match="inf or nan"):
        adm.manifold_radii(np.full((5, 4), np.inf, np.float32))
    with pytest.raises(ValueError, match="dimensions differ"):
        adm.precision_recall(x, x[:, :100])


# --------------------------------------------------------------------------------------------------
# Class-sorted dumps
# --------------------------------------------------------------------------------------------------
def test_looks_class_sorted():
    rng = np.random.RandomState(0)
    for classes, per_class in ((1000, 10), (10, 10)):
        labels = np.repeat(np.arange(classes), per_class)
        message = adm.looks_class_sorted(labels=labels)
        assert message is not None and "class-sorted" in message and "shuffle" in message
        assert adm.looks_class_sorted(labels=rng.permutation(labels)) is None
    # Batches of one class each are just as bad for IS; one class throughout says nothing.
    batches = np.repeat(rng.randint(0, 1000, size=40), 25)
    assert adm.looks_class_sorted(labels=batches) is not None
    assert adm.looks_class_sorted(labels=np.zeros(100, int)) is None
    # The softmax's argmax stands in for missing labels.
    onehot = np.eye(10)[np.repeat(np.arange(10), 30)]
    assert adm.looks_class_sorted(softmax=onehot) is not None
    assert adm.looks_class_sorted(softmax=onehot[rng.permutation(300)]) is None
    with pytest.raises(ValueError, match="labels"):
        adm.looks_class_sorted()
