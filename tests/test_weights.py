"""The weights module: one loader for runs, converted directories and official files, placing
params straight into the shardings it is given (also across two processes)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import config_schema
from ddt_jax import convert
from ddt_jax import sharding
from ddt_jax import trainer
from ddt_jax import weights
from ddt_jax.models import ddt

from conftest import OFFICIAL

REPO = pathlib.Path(__file__).resolve().parents[1]
CKPT = OFFICIAL / "ddt_tiny.ckpt"   # the official tiny DDT: raw and EMA copies, 3en1de


def fsdp_target(model_config):
    """(graphdef, abstract params FSDP-sharded over the 8 test devices by the default rules)."""
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    model = nnx.eval_shape(lambda: ddt.build_model(model_config, rngs=nnx.Rngs(0)))
    graphdef, params = weights.split_params(model)
    shardings = sharding.logical_to_named(params, mesh, config_schema.default_config().mesh.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params.to_pure_dict(), shardings.to_pure_dict())
    return graphdef, abstract


def assert_placed(tree, abstract, want):
    jax.tree.map(lambda a, ref: (a.sharding == ref.sharding) or pytest.fail(str(a.sharding)),
                 tree, abstract)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def pure(module):
    return nnx.state(module, nnx.Param).to_pure_dict()


def test_official_file_raw_and_ema_into_fsdp_shardings():
    config = weights.read_model_config(CKPT, num_encoder_blocks=3)
    assert (config.arch, config.num_encoder_blocks, config.hidden_size) == ("ddt", 3, 64)
    _, abstract = fsdp_target(config)
    assert weights.has_both_copies(CKPT)
    for which, use_ema in (("raw", False), ("ema", True)):
        params = weights.load_model_params(CKPT, abstract, which=which, num_encoder_blocks=3)
        assert_placed(params, abstract, pure(convert.load_ddt(CKPT, 3, use_ema=use_ema)))
    kernel = params["blocks"][0]["mlp"]["w1"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape)[0] == kernel.shape[0] // 8   # really split
    # This file has no REPA projector (diffusion_trainer.proj.*): there is none to load.
    replicated = sharding.replicated(kernel.sharding.mesh)
    abstract_projector = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        pure(ddt.REPAProjector(64, 64, 64, rngs=nnx.Rngs(0))))
    assert weights.load_projector_params(CKPT, abstract_projector) is None


def test_converted_directory_round_trip(tmp_path):
    config = weights.read_model_config(CKPT, num_encoder_blocks=3)
    model = convert.load_ddt(CKPT, 3)
    projector = ddt.REPAProjector(64, 32, 16, rngs=nnx.Rngs(1))
    out = weights.save_converted(model, tmp_path / "conv", config, projector)
    assert weights.is_converted_dir(out) and not weights.is_run_dir(out)
    assert weights.read_model_config(out).to_dict() == config.to_dict()
    graphdef, abstract = fsdp_target(config)
    params = weights.load_model_params(out, abstract)
    assert_placed(params, abstract, pure(model))
    assert not weights.has_both_copies(out)   # one set serves as raw and EMA
    replicated = jax.sharding.NamedSharding(sharding.create_mesh(
        ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))), jax.sharding.PartitionSpec())
    abstract_projector = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                     sharding=replicated),
                                      pure(projector))
    assert_placed(weights.load_projector_params(out, abstract_projector), abstract_projector,
                  pure(projector))
    # The loaded module computes what the converted one does.
    loaded = weights.load_converted(out)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    t, y = jnp.array([0.3, 0.8]), jnp.array([1, 10])
    np.testing.assert_array_equal(np.asarray(loaded(x, t, y)[0]), np.asarray(model(x, t, y)[0]))
    # Without a projector there is none to load.
    bare = weights.save_converted(model, tmp_path / "bare", config)
    assert weights.load_projector_params(bare, abstract_projector) is None


def test_run_directory_any_step_raw_or_ema(tmp_path):
    config = tiny.get_config("pixel")
    mesh = sharding.create_mesh(config.mesh)
    tx, _ = trainer.make_optimizer(config.optim)
    layout = trainer.state_layout(config, mesh, tx)
    (tmp_path / weights.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))
    rng = np.random.default_rng(0)

    def like(abstract):
        return jax.tree.map(lambda a: jax.device_put(
            rng.standard_normal(a.shape).astype(a.dtype), a.sharding), abstract)

    saved = {}
    ckpt = checkpoint_lib.Checkpointer(tmp_path, config.checkpoint)
    for step in (5, 10):
        params = {weights.MODEL: like(layout.abstract.params[weights.MODEL])}
        state = weights.TrainState(step=jnp.int32(step), params=params,
                                   opt_state=jax.jit(tx.init)(params),
                                   ema_params=like(layout.abstract.ema_params))
        ckpt.save(step, state.to_dict(), force=True)
        saved[step] = jax.device_get(state)
    ckpt.close()
    assert weights.run_steps(tmp_path) == [5, 10] and weights.is_run_dir(tmp_path)
    assert weights.read_model_config(tmp_path).to_dict() == config.model.to_dict()
    _, abstract = fsdp_target(config.model)
    assert_placed(weights.load_model_params(tmp_path, abstract), abstract, saved[10].ema_params)
    assert_placed(weights.load_model_params(tmp_path, abstract, which="raw", step=5), abstract,
                  saved[5].params[weights.MODEL])
    # One step directory is a source too.
    step_dir = tmp_path / checkpoint_lib.CHECKPOINT_DIR / "5"
    assert_placed(weights.load_model_params(step_dir, abstract), abstract, saved[5].ema_params)


def test_bad_sources_fail_clearly(tmp_path):
    config = weights.read_model_config(CKPT, num_encoder_blocks=3)
    _, abstract = fsdp_target(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.read_model_config(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a training run"):
        weights.read_model_config(tmp_path)
    with pytest.raises(ValueError, match="weights must be 'raw' or 'ema'"):
        weights.load_model_params(CKPT, abstract, which="best")
    other = config.copy_and_resolve_references()
    other.hidden_size = 128
    _, wrong = fsdp_target(other)
    with pytest.raises(ValueError, match=r"ddt_tiny.ckpt have shape \(\d+.*\) where the model has"):
        weights.load_model_params(CKPT, wrong, num_encoder_blocks=3)
    out = weights.save_converted(convert.load_ddt(CKPT, 3), tmp_path / "conv", config)
    with pytest.raises(ValueError, match="does not fit the model"):
        weights.load_model_params(out, wrong)
    with pytest.raises(FileNotFoundError, match="not a converted model"):
        weights.load_converted(tmp_path / "missing")


def test_two_processes_each_load_only_their_shards(tmp_path):
    """2 processes x 4 devices load the official file FSDP-sharded over all 8: every process
    builds its own shards from its host copy; none is gathered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(
        ["timeout", "-s", "KILL", "300", sys.executable, str(REPO / "tests" / "weights_worker.py"),
         f"127.0.0.1:{port}", str(i), str(CKPT), str(tmp_path / f"p{i}.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    for i, report in enumerate(reports):
        assert report["process"] == i and report["global_devices"] == 8
        assert report["local_shards"] == report["shards_checked"] > 0
    # Each process holds a different half of the FSDP-split kernel.
    assert reports[0]["kernel_rows"] != reports[1]["kernel_rows"]
    assert len(reports[0]["kernel_rows"]) == len(reports[1]["kernel_rows"]) == 4


def test_init_weights_read_an_official_file_once(monkeypatch, tmp_path):
    """init_from a 2.7 GB XL/2 file reads it once for raw, EMA and projector; a converted
    directory's single set gives the EMA its own arrays (the train step donates the state)."""
    config = weights.read_model_config(CKPT, num_encoder_blocks=3)
    _, abstract = fsdp_target(config)
    reads = []
    read = convert.read_state_dict
    monkeypatch.setattr(convert, "read_state_dict", lambda p: reads.append(p) or read(p))
    init = weights.load_init_weights(CKPT, abstract, num_encoder_blocks=3)
    assert len(reads) == 1 and init.projector is None
    assert_placed(init.params, abstract, pure(convert.load_ddt(CKPT, 3, use_ema=False)))
    assert_placed(init.ema, abstract, pure(convert.load_ddt(CKPT, 3, use_ema=True)))
    out = weights.save_converted(convert.load_ddt(CKPT, 3), tmp_path / "conv", config)
    init = weights.load_init_weights(out, abstract)
    assert_placed(init.ema, abstract, init.params)
    for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(init.ema)):
        assert a is not b
