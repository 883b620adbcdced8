"""End-to-end training on 8 CPU devices: smoke run, learning, resume, kills, meshes, two processes.

    .venv/bin/python -m pytest tests/test_trainer.py -q

Every run uses configs/tiny.py (a 1.3M-param DDT with REPA against a 3-block DINOv2 on synthetic
latents). Compiled programs go to a persistent JAX cache shared with the subprocesses, so each
distinct program compiles once per machine.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from configs import tiny
from configs import xl_256
from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import config_schema
from ddt_jax import convert
from ddt_jax import flow
from ddt_jax import sharding
from ddt_jax import trainer
from ddt_jax import weights
from ddt_jax.models import ddt
from input_pipeline import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
# One compilation cache for the whole suite and its subprocesses (programs are keyed by their HLO).
JIT_CACHE = os.path.join(tempfile.gettempdir(), f"ddt_jax_test_jit_cache_{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def tiny_config(kind: str = "latent", **overrides) -> ml_collections.ConfigDict:
    config = tiny.get_config(kind)
    config.update_from_flattened_dict(overrides)
    return config


def subprocess_env(num_devices: int = 8, **extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices),
                CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
                JAX_COMPILATION_CACHE_DIR=JIT_CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO), **extra)


def read_scalars(workdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in the TensorBoard events the run's clu writer wrote."""
    import tensorflow as tf

    out = {}
    for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.ndim == 0:   # scalars (images are logged beside them)
                    out.setdefault(value.tag, {})[event.step] = float(array)
    return out


def assert_trees_equal(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        if tol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 10-step tiny run every interrupted variant must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    state = trainer.train_and_evaluate(tiny_config(), str(workdir))
    return workdir, jax.device_get(state)


def test_smoke_run(reference):
    workdir, state = reference
    assert int(state.step) == 10
    assert sorted(checkpoint_lib.Checkpointer(workdir,
                                              tiny_config().checkpoint).all_steps()) == [5, 10]
    assert (workdir / "config.json").exists()
    scalars = read_scalars(workdir)
    for tag in ("loss", "fm_loss", "repa_loss", "grad_norm", "lr", "images_per_sec",
                "tflops_per_device"):
        assert set(scalars[tag]) == {5, 10}, tag
        assert all(np.isfinite(v) for v in scalars[tag].values()), tag
    assert scalars["repa_loss"][10] > 0   # REPA is on
    assert scalars["loss"][10] == pytest.approx(
        scalars["fm_loss"][10] + 0.5 * scalars["repa_loss"][10], rel=1e-5)
    assert "steps_per_sec" in scalars      # clu ReportProgress
    # EMA (decay 0.9999) moved 10 small steps towards the params from the same start.
    p, e = (state.params["model"]["final_layer"]["linear"]["kernel"],
            state.ema_params["final_layer"]["linear"]["kernel"])
    assert np.abs(p).max() > 0 and 0 < np.abs(e).max() < np.abs(p).max()


def test_resume_equals_uninterrupted(reference, tmp_path):
    ref_dir, ref_state = reference
    trainer.train_and_evaluate(tiny_config(num_train_steps=5), str(tmp_path))
    state = jax.device_get(trainer.train_and_evaluate(tiny_config(), str(tmp_path)))
    assert_trees_equal(state.params, ref_state.params)
    assert_trees_equal(state.ema_params, ref_state.ema_params)
    assert_trees_equal(state.opt_state, ref_state.opt_state)
    # The data position is a function of the step: the checkpoint holds no iterator state.
    assert not (ref_dir / "checkpoints" / "10" / "data").exists()


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(reference, tmp_path):
    _, ref_state = reference
    proc = subprocess.run(
        ["timeout", "-s", "KILL", "300", sys.executable, "tests/train_worker.py",
         "--config=configs/tiny.py", f"--workdir={tmp_path}"],
        cwd=REPO, env=subprocess_env(DDT_TEST_KILL_DURING_SAVE="10"), capture_output=True,
        text=True)
    assert "KILLING during the step-10 save" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ("5" in names and "10" not in names
            and any(n.startswith("10.orbax-checkpoint-tmp") for n in names)), names
    # Restart: the half-written step 10 is discarded and the run redoes steps 6-10 from step 5.
    state = jax.device_get(trainer.train_and_evaluate(tiny_config(), str(tmp_path)))
    assert_trees_equal(state.params, ref_state.params)
    assert_trees_equal(state.ema_params, ref_state.ema_params)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--config.num_train_steps=100000", "--config.logging.log_every=2",
         "--config.checkpoint.every_steps=1000"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, started = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "loss=" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(240), "".join(lines[-50:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-50:])
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    stopped = [line for line in lines if "preempted: saved step" in line]
    assert stopped, "".join(lines[-50:])
    step = int(stopped[0].split("preempted: saved step")[1].split(",")[0])
    assert 2 <= step < 1000   # not a regular interval save: the preemption save
    assert checkpoint_lib.Checkpointer(tmp_path, tiny_config().checkpoint).latest_step() == step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, *flags, timeout: int = 400) -> None:
    """train.py as 2 local processes x 4 CPU devices (gloo), both must exit 0."""
    port = _free_port()
    procs = [subprocess.Popen(
        ["timeout", "-s", "KILL", str(timeout), sys.executable, "train.py",
         "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *flags],
        cwd=REPO, env=subprocess_env(num_devices=4), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]


def restored_params(workdir):
    config = tiny_config()
    mesh = sharding.create_mesh(config.mesh)
    layout = trainer.state_layout(config, mesh, trainer.make_optimizer(config.optim)[0])
    return jax.device_get(checkpoint_lib.restore_params(
        workdir, {"params": layout.abstract.params, "ema_params": layout.abstract.ema_params,
                  "opt_state": layout.abstract.opt_state}))


def assert_close_to_reference(restored, ref_state):
    # 2 x 4 devices vs 1 x 8: the same rows on the same devices; gloo's cross-process sums may
    # round differently from the in-process ones.
    for key in ("params", "ema_params", "opt_state"):
        assert_trees_equal(restored[key], getattr(ref_state, key), rtol=1e-4, atol=1e-6)


def test_two_processes_match_one_process(reference, tmp_path):
    """2 processes x 4 devices (gloo) train like 1 process x 8 devices: the same global batches
    (each process reads its block of every batch), the same per-example noise."""
    ref_dir, ref_state = reference
    run_two_processes(tmp_path)
    got, want = read_scalars(tmp_path), read_scalars(ref_dir)
    for tag in ("loss", "fm_loss", "repa_loss", "grad_norm"):
        for step in (5, 10):
            assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-5), (tag, step)
    assert_close_to_reference(restored_params(tmp_path), ref_state)


def test_resume_on_another_number_of_processes(reference, tmp_path):
    """1 process -> 2 processes and 2 -> 1: the data position follows from the step, so both
    resumed runs end where the uninterrupted 1-process run does."""
    _, ref_state = reference
    one_then_two, two_then_one = tmp_path / "one_then_two", tmp_path / "two_then_one"
    trainer.train_and_evaluate(tiny_config(num_train_steps=5), str(one_then_two))
    run_two_processes(one_then_two)
    assert_close_to_reference(restored_params(one_then_two), ref_state)
    run_two_processes(two_then_one, "--config.num_train_steps=5")
    state = jax.device_get(trainer.train_and_evaluate(tiny_config(), str(two_then_one)))
    assert int(state.step) == 10
    assert_close_to_reference(
        {"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state},
        ref_state)


def _loss_and_grads(config):
    mesh = sharding.create_mesh(config.mesh)
    tx, _ = trainer.make_optimizer(config.optim)
    layout = trainer.state_layout(config, mesh, tx)
    state = trainer.init_train_state(config, layout, tx, jax.random.key(0))
    dinov2_graphdef, dinov2_params = trainer.load_dinov2(config, mesh)
    it = pipeline.create_train_iterator(config.data, global_batch_size=config.global_batch_size,
                                        process_index=0, process_count=1, seed=config.seed)
    batch = sharding.host_to_global(next(it), mesh)
    positions = trainer.example_positions(config.global_batch_size, mesh)
    grad_fn = jax.jit(jax.value_and_grad(trainer.make_loss_fn(config, layout, dinov2_graphdef),
                                         has_aux=True))
    with jax.set_mesh(mesh):
        (loss, parts), grads = grad_fn(state.params, batch, positions, jnp.int32(3), dinov2_params)
    return jax.device_get((state.params, loss, parts, grads))


def test_dinov2_gets_the_models_attention_kernel():
    """REPA's frozen DINOv2 runs model.attention, loaded or built abstractly (compile-only)."""
    config = tiny_config(**{"model.attention": "tpu_flash"})
    mesh = sharding.create_mesh(config.mesh)
    for graphdef, params in (trainer.load_dinov2(config, mesh),
                             trainer.abstract_dinov2(config, mesh)):
        dino = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params))
        kernels = {m.attention for _, m in dino.iter_modules() if hasattr(m, "attention")}
        assert kernels == {"tpu_flash"}


def test_data_and_fsdp_meshes_give_the_same_loss_and_grads():
    params_a, loss_a, parts_a, grads_a = _loss_and_grads(
        tiny_config(**{"mesh.data": 8, "mesh.fsdp": 1}))
    params_b, loss_b, parts_b, grads_b = _loss_and_grads(
        tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4}))
    assert_trees_equal(params_a, params_b)   # random init does not depend on the sharding
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    assert float(parts_a["repa_loss"]) == pytest.approx(float(parts_b["repa_loss"]), rel=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_a))
    assert_trees_equal(grads_a, grads_b, rtol=1e-4, atol=1e-6 * scale)


def test_noise_differs_across_devices_and_steps_but_not_meshes():
    config = tiny_config()
    spec = pipeline.element_spec(config.data)
    # Sixteen identical examples: anything that differs between rows comes from the per-example
    # keys.
    local = {k: np.zeros((16,) + v.shape, v.dtype) for k, v in spec.items()}

    def inputs(mesh_config, step):
        mesh = sharding.create_mesh(ml_collections.ConfigDict(mesh_config))
        batch = sharding.host_to_global(local, mesh)
        positions = trainer.example_positions(16, mesh)
        fn = jax.jit(lambda b, p, s: flow.training_inputs(b, flow.example_keys(config.seed, s, p),
                                                          config))
        return fn(batch, positions, jnp.int32(step))

    x, t, noise, labels = inputs(dict(data=8, fsdp=1, tensor=1), 7)
    shards = [np.asarray(s.data)
              for s in sorted(noise.addressable_shards, key=lambda s: s.index[0].start)]
    assert len(shards) == 8 and len({s.device for s in noise.addressable_shards}) == 8
    flat = np.concatenate([s.reshape(s.shape[0], -1) for s in shards])
    assert len({row.tobytes() for row in flat}) == 16            # every example its own noise
    assert len(set(np.asarray(t).tolist())) == 16                 # and its own t
    assert len({row.tobytes() for row in np.asarray(x).reshape(16, -1)}) == 16   # and latent sample
    assert set(np.asarray(labels).tolist()) <= {0, config.model.num_classes}
    _, t8, noise8, _ = inputs(dict(data=8, fsdp=1, tensor=1), 8)
    assert not np.allclose(np.asarray(noise8), np.asarray(noise)) and not np.allclose(t8, t)
    _, t24, noise24, _ = inputs(dict(data=2, fsdp=4, tensor=1), 7)
    np.testing.assert_array_equal(np.asarray(noise24), np.asarray(noise))
    np.testing.assert_array_equal(np.asarray(t24), np.asarray(t))


def test_loss_goes_down_on_a_fixed_dataset_and_samples_are_logged(tmp_path):
    config = tiny_config("pixel", **{
        "num_train_steps": 300, "data.num_records": 16, "optim.lr": 1e-3,
        "model.hidden_size": 64, "model.num_blocks": 2, "model.num_encoder_blocks": 1,
        "logging.log_every": 50, "checkpoint.every_steps": 1000, "logging.sample_every": 300})
    trainer.train_and_evaluate(config, str(tmp_path))
    loss = read_scalars(tmp_path)["loss"]
    assert loss[300] < 0.6 * loss[50], loss
    # The EMA sample grid: 8 32x32 images in a 3x3 grid, as a PNG and in TensorBoard.
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000300.png"))
    assert grid.shape == (96, 96, 3) and grid.dtype == np.uint8 and grid.std() > 0


def test_init_from_a_run_an_official_checkpoint_and_a_converted_one(reference, official_dir,
                                                                    tmp_path):
    ref_dir, ref_state = reference
    config = tiny_config(init_from=str(ref_dir))
    mesh = sharding.create_mesh(config.mesh)
    layout = trainer.state_layout(config, mesh, trainer.make_optimizer(config.optim)[0])
    state = trainer.restore_init_from(config, config.init_from, layout, layout.abstract)
    assert_trees_equal(jax.device_get(state.params), ref_state.params)   # model + REPA projector
    assert_trees_equal(jax.device_get(state.ema_params), ref_state.ema_params)

    # The official tiny DDT (4 channels, patch 2, hidden 64, 3en1de, 10 classes) in a Lightning
    # .ckpt.
    config = tiny_config(**{"model.variant": "S/2", "model.hidden_size": 64, "model.num_heads": 4,
                            "model.num_blocks": 4, "model.num_encoder_blocks": 3,
                            "model.image_size": 16, "data.image_size": 128})
    path = official_dir / "ddt_tiny.ckpt"
    layout = trainer.state_layout(config, mesh, trainer.make_optimizer(config.optim)[0])
    state = trainer.restore_init_from(config, str(path), layout, layout.abstract)
    raw = nnx.state(convert.load_ddt(path, 3, use_ema=False), nnx.Param).to_pure_dict()
    ema = nnx.state(convert.load_ddt(path, 3, use_ema=True), nnx.Param).to_pure_dict()
    assert_trees_equal(jax.device_get(state.params["model"]), raw)
    assert_trees_equal(jax.device_get(state.ema_params), ema)
    kernel = state.params["model"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert kernel.sharding == layout.shardings.params["model"]["blocks"][0]["attn"]["qkv"]["kernel"]
    # This checkpoint has no REPA projector: the fresh one is kept (here: the abstract placeholder).
    assert isinstance(jax.tree.leaves(state.params["projector"])[0], jax.ShapeDtypeStruct)

    # A directory written by `python -m ddt_jax.convert ddt`, here with a REPA projector beside the
    # model.
    projector = ddt.REPAProjector(64, 64, 64, rngs=nnx.Rngs(5))
    converted = weights.save_converted(convert.load_ddt(path, 3), tmp_path / "converted",
                                       config.model, projector)
    state = trainer.restore_init_from(config, str(converted), layout, layout.abstract)
    assert_trees_equal(jax.device_get(state.params["model"]), ema)
    assert_trees_equal(jax.device_get(state.ema_params), ema)
    assert_trees_equal(jax.device_get(state.params["projector"]),
                       nnx.state(projector, nnx.Param).to_pure_dict())
    with pytest.raises(FileNotFoundError, match="init_from"):
        trainer.restore_init_from(config, "/nonexistent/run", layout, layout.abstract)


@pytest.mark.parametrize("spec", ["xl_256", "xl_256:dit", "xl_512", "l_256", "b_256", "tiny",
                                  "tiny:pixel", "mnist", "mnist:dit"])
def test_every_config_loads_and_validates(spec, tmp_path):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    name, _, arg = spec.partition(":")
    flag_values(["train.py", f"--config={REPO}/configs/{name}.py" + (f":{arg}" if arg else "")])
    config = flag_values.config
    if config.repa.weight > 0 and not (config.repa.dinov2_path
                                       and os.path.exists(config.repa.dinov2_path)):
        with config.ignore_type():
            config.repa.dinov2_path = str(tmp_path / "dinov2_vitb14_pretrain.pth")
        (tmp_path / "dinov2_vitb14_pretrain.pth").touch()
    config_schema.validate_config(config)
    if spec == "xl_256:dit":
        assert config.model.arch == "dit" and config.optim.b2 == 0.999
    if spec.startswith(("xl", "l_", "b_")):
        assert ((config.optim.lr, config.optim.b1, config.global_batch_size, config.ema.decay)
                == (1e-4, 0.9, 256, 0.9999))
        assert ((config.flow.t_sampler, config.flow.label_drop_prob, config.repa.weight)
                == ("lognormal", 0.1, 0.5))


def test_bad_configs_fail_clearly(tmp_path):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    with pytest.raises(Exception, match="lrr"):
        flag_values(["train.py", f"--config={REPO}/configs/tiny.py", "--config.optim.lrr=1e-3"])

    config = tiny_config()
    with config.unlocked():
        config.optim.lr_decay = 0.5
    with pytest.raises(ValueError, match=r"section 'optim': unknown fields \['lr_decay'\]"):
        config_schema.validate_config(config)
    with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
        trainer.train_and_evaluate(tiny_config(global_batch_size=12), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        config_schema.validate_config(
            tiny_config(**{"repa.dinov2_path": str(tmp_path / "dinov2_vitb14_pretrain.pth")}))
    with pytest.raises(ValueError, match="needs the raw images"):
        config_schema.validate_config(tiny_config(**{"data.with_image": False}))
    with pytest.raises(ValueError, match="model.in_channels=3 but data.channels=4"):
        config_schema.validate_config(tiny_config(**{"model.in_channels": 3}))
    with pytest.raises(ValueError, match="align_layer=4 must be in"):
        config_schema.validate_config(tiny_config(**{"repa.align_layer": 4}))
    with pytest.raises(ValueError, match="t_sampler"):
        config_schema.validate_config(tiny_config(**{"flow.t_sampler": "cosine"}))


def test_nonfinite_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path):
    config = tiny_config("pixel", **{"num_train_steps": 4, "optim.lr": 1e30,
                                      "checkpoint.every_steps": 1, "logging.log_every": 1,
                                      "model.hidden_size": 64, "model.num_blocks": 2,
                                      "model.num_encoder_blocks": 1})
    with pytest.raises(FloatingPointError, match=r"after step (\d+) is not finite .*stopping "
                       r"without saving it. Last finite checkpoint: step \d+") as error:
        trainer.train_and_evaluate(config, str(tmp_path))
    # Saved every step up to the last finite one, not the diverged one.
    bad = int(error.value.args[0].split("after step ")[1].split(" ")[0])
    assert checkpoint_lib.Checkpointer(tmp_path, config.checkpoint).all_steps() == list(
        range(max(1, bad - 2), bad))


def test_xl_256_state_builds_abstractly_sharded(capsys):
    config = xl_256.get_config()
    # compile_only without compiling: the abstract state, the lowered step and the analytic FLOPs
    # (no DINOv2 file or data is needed: DINOv2-B/14 and the batch come from the config's shapes).
    report = trainer.compile_only(config, compile=False)
    mesh, layout = report.setup.mesh, report.setup.layout
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}   # fsdp over the 8 devices
    n_model = sum(x.size for x in jax.tree.leaves(layout.abstract.params["model"]))
    n_proj = sum(x.size for x in jax.tree.leaves(layout.abstract.params["projector"]))
    assert n_model == 674_646_352
    assert n_proj == 2 * 1152 * 1152 + 1152 * 768 + 2 * 1152 + 768
    assert (layout.shardings.params["model"]["blocks"][0]["mlp"]["w1"]["kernel"].spec
            == P("fsdp", None))
    per_device = sharding.bytes_per_device(layout.abstract)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract))
    # params, Adam mu and nu, EMA: 16 bytes per f32 param, split 8 ways (a few small arrays
    # replicated); no EMA of the projector.
    assert total == pytest.approx(16 * n_model + 12 * n_proj + 8, rel=1e-6)
    assert total / 8 < per_device < 1.02 * total / 8
    sizes = report.bytes_per_device
    # Everything but the 4-byte step.
    assert sizes["parameters"] + sizes["optimizer state"] + sizes["EMA"] == per_device - 4
    # The whole step traced and lowered with the XL shapes (REPA: 256 DINOv2 tokens vs 256 latent
    # tokens).
    batch = report.setup.abstract_batch
    assert {k: v.shape for k, v in batch.items()} == {
        "label": (256,), "moments": (256, 32, 32, 8), "image": (256, 256, 256, 3)}
    assert len(report.setup.abstract_dinov2["blocks"]) == 12      # DINOv2-B/14
    out_state, metrics = report.setup.lowered.out_info
    assert out_state.params["model"]["blocks"][0]["mlp"]["w1"]["kernel"].shape == (1152, 3072)
    flops = report.analytic_flops
    # 6 x params x tokens (fwd + bwd) for the params that act on every token (not the encoder's
    # per-image adaLN or the label table), plus attention, projector and DINOv2: ~0.2 PFLOP per
    # step.
    per_token = n_model - 22 * 6 * 1152 * (1152 + 1) - 1001 * 1152
    assert 6 * 256 * per_token * 256 < flops < 1.3 * 6 * 256 * per_token * 256
    with capsys.disabled():
        print(f"\nXL/2 256 train state per device on 8 devices: {per_device / 2**30:.2f} GiB "
              f"(total {total / 2**30:.1f} GiB); {flops / 1e15:.2f} PFLOP per step")


def test_compile_only_prints_memory_and_flops_without_a_workdir(tmp_path):
    proc = subprocess.run(
        ["timeout", "-s", "KILL", "300", sys.executable, str(REPO / "train.py"),
         f"--config={REPO}/configs/tiny.py", "--compile_only"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert "DDT S/1 (3en1de), 1,269,636 params, global batch 16, REPA" in table, table
    values = {m.group(1): float(m.group(2).replace(",", ""))
              for m in re.finditer(r"^  (\S.*?)\s{2,}([\d.,]+) ", table, re.M)}
    for name in ("parameters", "optimizer state", "EMA", "DINOv2 (frozen)", "batch",
                 "XLA arguments", "XLA temporaries", "XLA generated code"):
        assert name in values, (name, table)
    # The model's and projector's float32 params, replicated on each of the 8 data devices.
    config = tiny_config()
    layout = trainer.state_layout(config, sharding.create_mesh(config.mesh),
                                  trainer.make_optimizer(config.optim)[0])
    n = sum(x.size for x in jax.tree.leaves(layout.abstract.params))
    assert values["parameters"] == pytest.approx(4 * n / 2**20, abs=0.05)
    assert values["optimizer state"] == pytest.approx(2 * values["parameters"], abs=0.1)
    assert (values["XLA arguments"]
            >= values["parameters"] + values["optimizer state"] + values["EMA"])
    assert values["FLOPs (analytic)"] > 0 and values["FLOPs (XLA cost)"] > 0
    assert not any(tmp_path.iterdir())   # no workdir, no files


def _one_step(config):
    """(new state, metrics) of one jitted train step from the same init and batch."""
    mesh = sharding.create_mesh(config.mesh)
    dinov2_graphdef, dinov2_params = trainer.load_dinov2(config, mesh)
    abstract_dino = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), dinov2_params)
    setup = trainer.setup_step(config, mesh, dinov2_graphdef, abstract_dino)
    state = trainer.init_train_state(config, setup.layout, setup.tx, jax.random.key(0))
    it = pipeline.create_train_iterator(config.data, global_batch_size=config.global_batch_size,
                                        process_index=0, process_count=1, seed=config.seed)
    batch = sharding.host_to_global(next(it), mesh)
    positions = trainer.example_positions(config.global_batch_size, mesh)
    compiled = setup.lowered.compile()
    return jax.device_get(compiled(state, batch, positions, dinov2_params)), compiled


def test_gradient_accumulation_equals_the_whole_batch():
    """2 and 4 microbatches of a 32-example batch on 8 devices: the same loss, gradient norm and
    updated state as one pass over the whole batch (float32 sums in another order)."""
    (want, want_metrics), _ = _one_step(tiny_config(global_batch_size=32))
    for accum in (2, 4):
        (got, metrics), compiled = _one_step(
            tiny_config(global_batch_size=32, **{"optim.grad_accum_steps": accum}))
        for name in ("loss", "fm_loss", "repa_loss", "grad_norm"):
            assert float(metrics[name]) == pytest.approx(float(want_metrics[name]), rel=2e-6), (
                name, accum)
        assert bool(metrics[trainer.STATE_FINITE])
        for key in ("params", "opt_state", "ema_params"):
            assert_trees_equal(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-7)
        # One microbatch's activations at a time: the scan is in the program.
        assert "while" in compiled.as_text()
    # Microbatches that do not split over the 8 devices are refused, naming the fix.
    with pytest.raises(ValueError, match="grad_accum_steps=4 microbatches of global_batch_size=16 "
                       "do not split over the 8 data-parallel devices"):
        _one_step(tiny_config(**{"optim.grad_accum_steps": 4}))
    with pytest.raises(ValueError, match="must be >= 1 and divide global_batch_size=16"):
        config_schema.validate_config(tiny_config(**{"optim.grad_accum_steps": 3}))


def test_restart_loads_the_compiled_step_from_the_workdir_cache(tmp_path):
    """With no cache set outside, a run caches its programs in <workdir>/compilation_cache and
    the restarted run loads them instead of compiling (counted by JAX's cache-hit events)."""
    from jax.experimental.compilation_cache import compilation_cache
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    jax.config.update("jax_compilation_cache_dir", None)   # this suite's shared cache: off
    compilation_cache.reset_cache()
    try:
        trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
        cache = tmp_path / trainer.COMPILATION_CACHE_DIR
        assert len(list(cache.iterdir())) >= 2   # the init, the train step, the grid sampler
        first = len(hits)
        trainer.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path))
        assert len(hits) - first >= 1
        # compilation_cache_dir="" turns it off.
        trainer.train_and_evaluate(
            tiny_config(num_train_steps=2, compilation_cache_dir=""), str(tmp_path / "off"))
        assert not (tmp_path / "off" / trainer.COMPILATION_CACHE_DIR).exists()
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.monitoring.unregister_event_listener(listener)
        jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
        compilation_cache.reset_cache()
