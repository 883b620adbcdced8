"""Integrity (issue 13): a checkpoint or a dump is either verified or refused, never silently wrong.

    .venv/bin/python -m pytest tests/test_integrity.py -q

One tiny run (configs/tiny.py: 10 steps, checkpoints at 5 and 10) is damaged in copies: a flipped
bit, a truncated array file, a deleted item or checksums must each fall back to step 5
(the resumed run ends bit-identical to the undamaged one) or, when no step verifies, stop naming
every bad step while the workdir stays byte-identical. Non-finite states are never saved or sampled;
a refused resume leaves config.json alone; the CLI's errors are one line; SIGTERM during start-up
exits 0; interrupted writes leave no temporary files.
"""
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import sample_dump
from ddt_jax import sampler as sampler_lib
from ddt_jax import sharding
from ddt_jax import trainer
from ddt_jax import weights
from ddt_jax.evaluation import grids
from ddt_jax.evaluation import mnist_eval
from ddt_jax.models import ddt

from test_trainer import REPO, assert_trees_equal, subprocess_env, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The undamaged run: (workdir, its final state on the host)."""
    workdir = tmp_path_factory.mktemp("run")
    state = trainer.train_and_evaluate(tiny_config(), str(workdir))
    return workdir, jax.device_get(state)


@pytest.fixture(scope="module")
def abstract():
    config = tiny_config()
    layout = trainer.state_layout(config, sharding.create_mesh(config.mesh),
                                  trainer.make_optimizer(config.optim)[0])
    return layout.abstract


def copy_run(run, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    return workdir


def snapshot(directory) -> dict[str, str]:
    """Every file under `directory` with the sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def flip_bit(step_dir: pathlib.Path) -> None:
    path = largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(step_dir: pathlib.Path) -> None:
    path = largest_array_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def delete_state(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "state")


def delete_checksums(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "checksums")


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints

def test_bit_flip_falls_back_and_the_run_ends_bit_identical(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    flip_bit(workdir / "checkpoints" / "10")
    state = jax.device_get(trainer.train_and_evaluate(tiny_config(), str(workdir)))
    # Resumed from step 5 and redid steps 6-10: the same final state as the undamaged run.
    assert_trees_equal(state.params, run[1].params)
    assert_trees_equal(state.ema_params, run[1].ema_params)
    assert_trees_equal(state.opt_state, run[1].opt_state)
    reason = (workdir / "rejected_checkpoints" / "10" / "REJECTED.txt").read_text()
    assert f"{workdir}/checkpoints/10 fails verification" in reason
    assert "reads back with checksum" in reason
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]


@pytest.mark.parametrize("damage, reason", [
    (truncate, r"cannot be read \(ValueError: OUT_OF_RANGE: Error reading"),
    (delete_state, r"cannot be read \(KeyError: .*Item \"state\" was not found"),
    (delete_checksums, r"has no checksums item although step 5 has one"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_damaged_latest_step_falls_back_to_the_previous_one(run, abstract, tmp_path, damage,
                                                            reason):
    workdir = copy_run(run, tmp_path)
    damage(workdir / "checkpoints" / "10")
    ckpt = checkpoint_lib.Checkpointer(workdir, tiny_config().checkpoint)
    step, state = ckpt.restore_latest(abstract.to_dict())
    ckpt.close()
    assert step == 5
    rejected = (workdir / "rejected_checkpoints" / "10" / "REJECTED.txt").read_text()
    assert rejected.startswith(f"{workdir}/checkpoints/10 ")
    assert re.search(reason, rejected), rejected
    assert ckpt.all_steps() == [5]
    if damage is truncate:   # once: what it restored is the undamaged step 5
        original = checkpoint_lib.Checkpointer(run[0], tiny_config().checkpoint, read_only=True)
        assert_trees_equal(jax.device_get(state),
                           jax.device_get(original.restore(5, abstract.to_dict())))
        original.close()


def test_no_step_verifies_stops_naming_each_and_changes_nothing(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    flip_bit(workdir / "checkpoints" / "10")
    truncate(workdir / "checkpoints" / "5")
    before = snapshot(workdir)
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
        trainer.train_and_evaluate(tiny_config(), str(workdir))
    message = str(error.value)
    assert message.startswith(f"no checkpoint in {workdir}/checkpoints verifies: ")
    assert f"{workdir}/checkpoints/10 fails verification" in message
    assert f"{workdir}/checkpoints/5 cannot be read" in message
    assert "Restore these step directories from a copy, or move them away" in message
    assert snapshot(workdir) == before   # config.json, checkpoints: nothing moved or written


def test_sampling_a_damaged_step_names_it_and_the_other_steps(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    delete_state(workdir / "checkpoints" / "10")
    config = tiny_config()
    _, target = weights.abstract_params(
        lambda: ddt.build_model(config.model, rngs=nnx.Rngs(0)),
        sharding.replicated(sharding.create_mesh(config.mesh)))
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=rf"{re.escape(str(workdir))}/checkpoints/10 cannot be read \(its "
                             r"state item is missing\); read another step \(other steps: \[5\]\)"):
        weights.load_model_params(workdir, target, step=10)
    assert_trees_equal(jax.device_get(weights.load_model_params(workdir, target, step=5)),
                       jax.device_get(weights.load_model_params(run[0], target, step=5)))


def test_reading_a_flipped_bit_fails_verification(tmp_path):
    """The path of sample.py and init_from (a subset of the state) verifies what it reads."""
    mesh = sharding.create_mesh(tiny_config().mesh)
    w = jax.device_put(jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256),
                       sharding.replicated(mesh))
    ckpt = checkpoint_lib.Checkpointer(tmp_path, tiny_config().checkpoint)
    ckpt.save(5, {"w": w, "step": jnp.int32(5)}, force=True)
    ckpt.close()
    flip_bit(tmp_path / "checkpoints" / "5")   # the largest file: w's 256 KiB
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w.sharding)}
    with pytest.raises(checkpoint_lib.CheckpointError,
                       # A flip inside compressed data may also decode to NaN: then both.
                       match=rf"{re.escape(str(tmp_path))}/checkpoints/5 fails verification: "
                             r"(\['w'\] holds NaN or Inf; )?"
                             r"\['w'\] reads back with checksum [0-9a-f]{16}, saved with "
                             r"[0-9a-f]{16}; read another step or another run"):
        checkpoint_lib.restore_params(tmp_path, target)


# ------------------------------------------------------------------------------------------------
# Non-finite states: never saved, never sampled

def test_lr_inf_saving_every_step_saves_nothing(tmp_path):
    # 1e39 is finite for the config check (which refuses lr=inf) but inf in float32.
    config = tiny_config("pixel", **{"num_train_steps": 3, "optim.lr": 1e39,
                                      "checkpoint.every_steps": 1, "logging.log_every": 1,
                                      "model.hidden_size": 64, "model.num_blocks": 2,
                                      "model.num_encoder_blocks": 1})
    with pytest.raises(FloatingPointError, match=r"the train state after step 1 is not finite .*"
                       r"stopping without saving it. No checkpoint was saved before it"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == []


def test_save_refuses_and_restore_rejects_nonfinite_states(tmp_path):
    mesh = sharding.create_mesh(tiny_config().mesh)
    good = {"w": jax.device_put(jnp.ones((8, 4)), sharding.replicated(mesh)),
            "step": jnp.int32(3)}
    bad = {**good, "w": good["w"].at[1, 2].set(jnp.inf)}
    config = tiny_config().checkpoint
    ckpt = checkpoint_lib.Checkpointer(tmp_path, config)
    with pytest.raises(FloatingPointError, match=r"not saving step 5 .*1 arrays hold NaN or Inf "
                                                 r"\(\['w'\]\)"):
        ckpt.save(5, bad, force=True)
    # What the code before checksums could save (lr=inf): a step without checksums holding inf.
    ckpt.manager.save(5, args=checkpoint_lib.ocp.args.Composite(
        state=checkpoint_lib.ocp.args.PyTreeSave(bad)), force=True)
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(tmp_path, config)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          good)
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=rf"{re.escape(str(tmp_path))}/checkpoints/5 fails verification: "
                             r"\['w'\] holds NaN"):
        ckpt.restore_latest(target)
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"\['w'\] holds NaN or Inf"):
        checkpoint_lib.restore_params(tmp_path, {"w": target["w"]})
    # A finite step of that vintage is restored, unverified (a warning says so).
    ckpt.manager.save(6, args=checkpoint_lib.ocp.args.Composite(
        state=checkpoint_lib.ocp.args.PyTreeSave(good)), force=True)
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(tmp_path, config)
    step, state = ckpt.restore_latest(target)
    ckpt.close()
    assert step == 6 and float(state["w"].sum()) == 32


def tiny_pixel_model(scale: float):
    config = tiny_config("pixel", **{"model.hidden_size": 64, "model.num_blocks": 2,
                                      "model.num_encoder_blocks": 1})
    model = ddt.build_model(config.model, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * scale + scale, params))
    return model, config


def test_sample_dump_refuses_nonfinite_weights_and_outputs(tmp_path):
    sampler_config = sampler_lib.default_sampler_config()
    sampler_config.update(num_steps=2, guidance=1.0)
    for name, scale in (("nan", float("nan")), ("huge", 1e20)):
        model, config = tiny_pixel_model(scale)
        weights.save_converted(model, tmp_path / name, config.model)
    args = dict(vae="none", num_samples=8, batch_size=8)

    output = tmp_path / "out_nan"
    with pytest.raises(ValueError, match=r"the ema weights in .*/nan hold NaN or Inf .*refusing "
                                         "to sample them"):
        sample_dump.run(sample_dump.DumpArgs(checkpoint=str(tmp_path / "nan"),
                                             output=str(output), **args), sampler_config)
    assert not output.exists()

    # Finite weights whose samples overflow: the batch is refused, nothing is written for it.
    output = tmp_path / "out_huge"
    (output / "parts").mkdir(parents=True)
    stale = output / "parts" / ".tmp.999.0000000.p0of1.npz"   # a SIGKILLed write's leftover
    stale.write_bytes(b"half a part")
    with pytest.raises(FloatingPointError, match=r"batch 0 of the dump in .*: the sampler "
                                                 r"produced NaN or Inf from finite weights"):
        sample_dump.run(sample_dump.DumpArgs(checkpoint=str(tmp_path / "huge"),
                                             output=str(output), **args), sampler_config)
    assert sorted(p.name for p in output.rglob("*")) == ["manifest.json", "parts"]


def test_grid_sampler_refuses_nonfinite_params():
    model, config = tiny_pixel_model(float("nan"))
    config.logging.sample_every = 1
    mesh = sharding.create_mesh(config.mesh)
    graphdef, params = weights.split_params(model)
    sampler = grids.make_grid_sampler(config, graphdef, mesh)
    params = jax.device_put(params.to_pure_dict(), sharding.replicated(mesh))
    with pytest.raises(FloatingPointError, match="the EMA params hold NaN or Inf: no sample grid"):
        sampler(params)


# ------------------------------------------------------------------------------------------------
# A refused start changes nothing on disk

def test_resume_with_another_model_size_changes_nothing(run, tmp_path):
    workdir = copy_run(run, tmp_path)
    before = snapshot(workdir)
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(tiny_config(**{"model.hidden_size": 64}), str(workdir))
    message = str(error.value)
    assert message.startswith(f"{workdir} holds a run with other settings than this config: "
                              "model.hidden_size: 128 -> 64. ")
    assert "--allow_config_change=model.hidden_size" in message
    assert snapshot(workdir) == before
    assert weights.read_model_config(workdir).hidden_size == 128   # sample.py still loads it
    # Allowed on purpose: the saved arrays cannot fit, one message (no orbax cascade), no change.
    with pytest.raises(checkpoint_lib.LayoutError,
                       match=rf"{re.escape(str(workdir))}/checkpoints/10 is intact but holds "
                             r"another model .* is saved as float32\[768\], wanted as "
                             r"float32\[384\]; .*Use the settings it was saved with"):
        trainer.train_and_evaluate(tiny_config(**{"model.hidden_size": 64}), str(workdir),
                                   allow_config_change=("model.hidden_size",))
    assert snapshot(workdir) == before


def test_resume_check_allows_benign_and_allowed_changes(run):
    workdir = str(run[0])
    benign = tiny_config(**{"num_train_steps": 20, "optim.lr": 3e-4, "logging.log_every": 2,
                            "checkpoint.every_steps": 3, "mesh.data": 2, "mesh.fsdp": 4})
    trainer.check_resume_config(workdir, benign)
    changed = tiny_config(**{"seed": 1, "global_batch_size": 32, "data.num_records": 128})
    with pytest.raises(ValueError, match=r"data.num_records: 256 -> 128; global_batch_size: "
                                         r"16 -> 32; seed: 0 -> 1\. "):
        trainer.check_resume_config(workdir, changed)
    trainer.check_resume_config(workdir, changed, ("seed", "global_batch_size", "data"))
    with pytest.raises(ValueError, match=r"names no config field: \['modle'\]"):
        trainer.check_resume_config(workdir, benign, ("modle",))
    # A field added to the schema since the run was saved is unchanged at its default.
    saved = json.loads((run[0] / "config.json").read_text())
    del saved["model"]["image_width"]
    assert trainer.config_changes(saved, tiny_config()) == []
    assert trainer.config_changes(saved, tiny_config(**{"model.image_width": 4})) == [
        "model.image_width: None -> 4"]


# ------------------------------------------------------------------------------------------------
# One-line errors, SIGTERM, temporary files

def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 32, 32, 1), np.uint8), arr_1=np.zeros(4, np.int64))
    os.truncate(samples, samples.stat().st_size - 100)
    train = [sys.executable, "train.py", "--config=configs/tiny.py"]
    cases = {
        "unknown key": (train + [f"--workdir={tmp_path}/w", "--config.foo=1"],
                        "error: --config.foo: the config has no field 'foo' (top-level fields: "
                        "checkpoint, compilation_cache_dir, data,"),
        "close key": (train + [f"--workdir={tmp_path}/w", "--config.optim.lrr=1"],
                      "error: --config.optim.lrr: the config has no field 'optim.lrr' (closest: "
                      "optim.lr"),
        "missing config": ([sys.executable, "train.py", "--config=configs/nope.py",
                            f"--workdir={tmp_path}/w"],
                           "error: --config=configs/nope.py: no such file; the recipes are "
                           "b_256.py,"),
        "workdir is a file": (train + [f"--workdir={tmp_path}/a_file"],
                              f"error: --workdir={tmp_path}/a_file is a file, not a directory"),
        "sampler key": ([sys.executable, "sample.py", f"--workdir={tmp_path}",
                         f"--output={tmp_path}/o", "--config.foo=1"],
                        "error: --config.foo: the sampler config has no field 'foo'"),
        "truncated npz": ([sys.executable, "-m", "ddt_jax.evaluation.mnist_eval", str(samples)],
                          f"error: {samples} is not a complete .npz (BadZipFile"),
    }
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (cmd, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith(cases[name][1]), (name, err[-3000:])
        assert "Traceback" not in err, (name, err[-3000:])
    assert not (tmp_path / "w").exists()


def test_truncated_npz_names_the_file(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.zeros((4, 32, 32, 1), np.uint8), arr_1=np.zeros(4, np.int64))
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a complete .npz "
                                         r".*probably truncated"):
        mnist_eval.load_samples(path)


def test_sigterm_during_start_up_exits_0_with_nothing_lost(run, abstract, tmp_path):
    # During the imports (~5 s), before the trainer exists: recorded, then nothing starts.
    proc = subprocess.Popen([sys.executable, "train.py", "--config=configs/tiny.py",
                             f"--workdir={tmp_path}/early"], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.wait(1.5)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM during start-up: stopping before" in out, out[-3000:]
    assert weights.run_steps(tmp_path / "early") == []   # it trained no step

    # While resuming (before the first step): exits 0 and the run's checkpoints still verify.
    workdir = copy_run(run, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.num_train_steps=1000", "--config.checkpoint.every_steps=1000"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    lines, started = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "train state" in line and "per device" in line:   # set up; restoring next
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
    log = "".join(lines)
    assert "SIGTERM during start-up: stopping before step 11" in log or "preempted: saved" in log
    ckpt = checkpoint_lib.Checkpointer(workdir, tiny_config().checkpoint)
    step, _ = ckpt.restore_latest(abstract.to_dict())
    ckpt.close()
    assert step >= 10


def test_interrupted_writes_leave_no_temporary_file(tmp_path):
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt   # what SIGTERM (sample.py's handler) and Ctrl-C raise

    with pytest.raises(KeyboardInterrupt):
        sample_dump._atomic_write(tmp_path / "samples.npz", interrupted)
    assert list(tmp_path.iterdir()) == []
    # A SIGKILL leaves them: the next dump removes them first.
    (tmp_path / "parts").mkdir()
    leftovers = [tmp_path / ".tmp.123.samples.npz", tmp_path / "parts" / ".tmp.9.0000003.p0of1.npz"]
    for path in leftovers:
        path.write_bytes(b"x")
    (tmp_path / "parts" / "0000001.p0of1.npz").write_bytes(b"a finished part")
    assert sorted(sample_dump.remove_stale_temps(tmp_path)) == sorted(leftovers)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["0000001.p0of1.npz"]
