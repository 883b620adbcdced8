"""FID during training: the monitor's samples and features against a direct computation, its
reference statistics, its history file and the config checks.

A tiny pixel DDT (32x32 RGB) on the 8 test devices, the regenerated Inception fixture weights and
12 samples in batches of 8 (the second batch's last 4 samples are dropped).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import inception_weights
from configs import tiny
from ddt_jax import config_schema
from ddt_jax import convert
from ddt_jax import rng
from ddt_jax import sampler as sampler_lib
from ddt_jax import sharding
from ddt_jax import trainer
from ddt_jax.evaluation import adm
from ddt_jax.evaluation import fid_monitor
from ddt_jax.evaluation import images as images_lib
from ddt_jax.models import ddt

NUM_SAMPLES, BATCH = 12, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    weights_file = inception_weights.write_safetensors(tmp / "inception.safetensors")
    config = tiny.get_config("pixel")
    config.update_from_flattened_dict({
        "logging.fid_every": 5, "logging.fid_num_samples": NUM_SAMPLES,
        "logging.fid_batch_size": BATCH, "logging.fid_inception": str(weights_file),
        "logging.fid_reference": str(tmp / "ref.npz"), "logging.sample.num_steps": 2})
    reference = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp / "ref.npz", arr_0=reference)
    model = ddt.build_model(config.model, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    mesh = sharding.create_mesh(config.mesh)
    params = sharding.host_to_replicated(nnx.state(model, nnx.Param).to_pure_dict(), mesh)
    monitor = fid_monitor.make_fid_monitor(config, graphdef, mesh)
    return dict(config=config, model=model, params=params, monitor=monitor, tmp=tmp,
                net=convert.load_inception(weights_file), reference=reference,
                graphdef=graphdef, mesh=mesh)


def test_features_equal_sampling_and_embedding_directly(setup):
    config, net = setup["config"], setup["net"]
    pool, softmax = setup["monitor"].features(setup["params"])
    assert pool.shape == (NUM_SAMPLES, 2048) and softmax.shape == (NUM_SAMPLES, 1008)
    # The same draws without a mesh: batch b from the FID streams of the run seed.
    want_pool, want_softmax = [], []
    for b in range(2):
        noise = jax.random.normal(jax.random.fold_in(rng.stream(config.seed, rng.FID_NOISE), b),
                                  (BATCH, 32, 32, 3), jnp.float32)
        labels = jax.random.randint(jax.random.fold_in(
            rng.stream(config.seed, rng.FID_LABELS), b), (BATCH,), 0, 10)
        key = jax.random.fold_in(rng.stream(config.seed, rng.FID_SAMPLER), b)
        x = sampler_lib.sample(setup["model"], noise, labels, config.logging.sample, key=key)
        out = net(images_lib.to_uint8(x))
        want_pool.append(np.asarray(out["pool"]))
        want_softmax.append(np.asarray(out["softmax"]))
    np.testing.assert_allclose(pool, np.concatenate(want_pool)[:NUM_SAMPLES], atol=2e-3)
    np.testing.assert_allclose(softmax, np.concatenate(want_softmax)[:NUM_SAMPLES], atol=1e-4)
    again, _ = setup["monitor"].features(setup["params"])
    np.testing.assert_array_equal(again, pool)   # the same samples at every evaluation


def test_metrics_are_the_evaluators_on_those_features(setup, monkeypatch):
    monitor = setup["monitor"]
    pool, softmax = monitor.features(setup["params"])
    # The reference batch had no mu/sigma: they come from its arr_0 through the same network.
    ref_pool = np.asarray(setup["net"](setup["reference"])["pool"])
    ref_mu, ref_sigma = adm.statistics(ref_pool)
    np.testing.assert_allclose(monitor.ref_mu, ref_mu, atol=1e-4)
    np.testing.assert_allclose(monitor.ref_sigma, ref_sigma, atol=1e-3)
    seen = []

    def spy(mu1, sigma1, mu2, sigma2):   # a 2048x2048 sqrtm costs ~20 s here; adm's own tests
        seen.append((mu1, sigma1, mu2, sigma2))   # check the distance itself
        return 42.0

    monkeypatch.setattr(adm, "frechet_distance", spy)
    metrics = monitor(setup["params"])
    assert metrics == {f"fid_{NUM_SAMPLES}": 42.0,
                       f"inception_score_{NUM_SAMPLES}": adm.inception_score(softmax)}
    mu, sigma = adm.statistics(pool)
    np.testing.assert_array_equal(seen[0][0], mu)
    np.testing.assert_array_equal(seen[0][1], sigma)
    assert seen[0][2] is monitor.ref_mu and seen[0][3] is monitor.ref_sigma


def test_stored_reference_statistics_are_used(setup):
    mu, sigma = np.arange(2048.0), np.eye(2048)
    path = setup["tmp"] / "stats.npz"
    np.savez(path, mu=mu, sigma=sigma, arr_0=setup["reference"])
    got_mu, got_sigma = fid_monitor.reference_statistics(str(path), setup["net"])
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.savez(setup["tmp"] / "empty.npz", labels=np.zeros(3))
    with pytest.raises(ValueError, match="neither mu/sigma nor arr_0"):
        fid_monitor.reference_statistics(str(setup["tmp"] / "empty.npz"), setup["net"])
    with pytest.raises(FileNotFoundError, match="--make_ref"):
        fid_monitor.reference_statistics(str(setup["tmp"] / "missing.npz"), setup["net"])


def test_history_keeps_the_best_step(tmp_path):
    assert fid_monitor.record(str(tmp_path), 10, {"fid_5000": 30.0})["step"] == 10
    assert fid_monitor.record(str(tmp_path), 20, {"fid_5000": 12.5})["step"] == 20
    best = fid_monitor.record(str(tmp_path), 30, {"fid_5000": 14.0})
    assert best == {"step": 20, "fid_5000": 12.5}
    fid_monitor.record(str(tmp_path), 30, {"fid_5000": 11.0})   # a resumed run redoes step 30
    history = json.loads((tmp_path / fid_monitor.HISTORY_FILE).read_text())
    assert [e["step"] for e in history["evaluations"]] == [10, 20, 30]
    assert history["best"] == {"step": 30, "fid_5000": 11.0}


def test_config_errors_name_the_field_and_the_fix(setup):
    config = setup["config"].copy_and_resolve_references()
    config.logging.fid_inception = None
    with pytest.raises(ValueError, match="needs logging.fid_inception: pytorch-fid's"):
        config_schema.validate_config(config)
    config.logging.fid_inception = "/nonexistent/pt_inception.pth"
    with pytest.raises(FileNotFoundError, match="logging.fid_inception=.* does not exist"):
        config_schema.validate_config(config)
    config = setup["config"].copy_and_resolve_references()
    config.logging.fid_num_samples = 1
    with pytest.raises(ValueError, match="fid_num_samples must be >= 2"):
        config_schema.validate_config(config)
    config = setup["config"].copy_and_resolve_references()
    config.logging.fid_batch_size = 12   # not a multiple of the 8 data-parallel devices
    with pytest.raises(ValueError, match="12"):
        fid_monitor.make_fid_monitor(config, setup["graphdef"], setup["mesh"])


def test_training_logs_fid_and_keeps_the_best(setup, tmp_path):
    config = setup["config"].copy_and_resolve_references()
    config.update_from_flattened_dict({"num_train_steps": 2, "logging.fid_every": 2,
                                       "checkpoint.every_steps": 2})
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    history = json.loads((tmp_path / "run" / fid_monitor.HISTORY_FILE).read_text())
    [entry] = history["evaluations"]
    assert entry["step"] == 2 and history["best"] == entry
    # The real distance this time (the other tests spy on it): finite, positive, and the same
    # as the evaluator's on the monitor's own features of the trained EMA.
    assert np.isfinite(entry[f"fid_{NUM_SAMPLES}"]) and entry[f"fid_{NUM_SAMPLES}"] > 0
    assert 1.0 <= entry[f"inception_score_{NUM_SAMPLES}"] <= 10.0   # at most the 10 classes' worth
