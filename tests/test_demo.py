"""The README's first command (`make demo`) end to end on a cut-down budget.

Runs the same Makefile target a user runs (shards -> train.py -> sample.py -> evaluation), with 12
training steps and 20 samples instead of 2,400 and 1,000, and checks what it leaves in the workdir.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_make_demo_cut_down(tmp_path):
    workdir = tmp_path / "mnist"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    cmd = ["make", "--no-print-directory", "-C", str(REPO),
           # The interpreter running the tests is installed: do not rebuild the venv.
           "-o", ".venv/.installed-runtime",
           f"PY={sys.executable}", "demo", f"DEMO_DIR={workdir}",
           "DEMO_TRAIN_FLAGS=--config.num_train_steps=12 --config.logging.log_every=4 "
           "--config.logging.sample_every=12 --config.logging.num_samples=10 "
           "--config.logging.sample.num_steps=2 --config.checkpoint.every_steps=6",
           "DEMO_SAMPLE_FLAGS=--num_samples=20 --batch_size=10"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    # Data shards, TensorBoard logs, checkpoints, the training grid.
    assert (workdir / "data" / "dataset_info.json").exists()
    assert list(workdir.glob("events.out.tfevents.*"))
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["12", "6"]
    assert (workdir / "samples" / "step_00000012.png").exists()
    # The ADM-layout sample file: balanced, shuffled, grey 32x32 uint8.
    with np.load(workdir / "eval_samples" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (20, 32, 32, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert not np.all(np.diff(labels) >= 0)
    assert (workdir / "eval_samples" / "samples.png").exists()
    # The metrics file the evaluation wrote, and its console table.
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert 0.0 <= metrics["label_accuracy"] <= 1.0
    assert metrics["frechet_distance"] > 0 and metrics["real_frechet_floor"] > 0
    assert "label accuracy" in output and "Frechet distance" in output
