"""benchmarks/train_step.py end to end on tiny models: the variant grid, the baseline ratios, the
JSON a stopped run keeps, and the official-comparison plumbing (a subprocess with JAX kept off
the accelerator) with a small torch stand-in in place of the user's official checkout."""
import argparse
import importlib.util
import json
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--variants=S/2", "--hidden_size=64", "--num_heads=4", "--num_blocks=2",
        "--num_encoder_blocks=1", "--image_size=64", "--batch_size=8", "--steps=1",
        "--warmup=1"]

# A torch model with the official DDT's constructor and call signature (x, t, y) -> (v, state):
# what train_step.py's --official_repo runs, without the official code (never part of this repo).
STAND_IN = '''
import torch
import torch.nn as nn


class DDT(nn.Module):
    def __init__(self, in_channels, num_groups, hidden_size, num_blocks, num_encoder_blocks,
                 patch_size, num_classes):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.label = nn.Embedding(num_classes + 1, hidden_size)
        self.out = nn.ConvTranspose2d(hidden_size, in_channels, patch_size, stride=patch_size)

    def forward(self, x, t, y):
        h = self.embed(x) + self.label(y)[:, :, None, None] * t[:, None, None, None]
        return self.out(torch.nn.functional.silu(h)), None
'''


def load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def bench():
    return load("train_step")


def stand_in_repo(root: pathlib.Path) -> pathlib.Path:
    path = root / "official" / "src" / "models" / "denoiser" / "decoupled_improved_dit.py"
    path.parent.mkdir(parents=True)
    path.write_text(STAND_IN)
    return root / "official"


def test_train_step_only_variants_baseline_json_and_official_rows(bench, tmp_path, capsys):
    out = tmp_path / "steps.json"
    # --only: these variants in this order, not the grid the other flags would give.
    results = bench.main(TINY + ["--attention=xla", "--remat=none", "--scan=0,1",
                                 "--only=xla:none:0:1,xla:full:1:1", f"--json={out}",
                                 f"--official_repo={stand_in_repo(tmp_path)}",
                                 "--official_modes=eager"])
    rows = results["rows"]
    assert [(r["remat"], r["scan"]) for r in rows] == [("none", False), ("full", True)]
    for r in rows:
        assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(8 / r["step_s"])
        assert r["analytic_tflop_per_step"] > 0 and r["total_gib"] > 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert not (tmp_path / "steps.json.tmp").exists()

    (official,) = results["official"]
    assert official["name"] == "official torch eager" and official["device"] == "cpu"
    assert official["dtype"] == "float32" and official["step_s"] > 0
    # The stand-in's parameters: conv 4->64 (2x2) + bias, embedding 1001x64, deconv 64->4 + bias.
    assert official["num_params"] == 4 * 64 * 4 + 64 + 1001 * 64 + 64 * 4 * 4 + 4
    # Same shapes as ours without REPA: the same analytic FLOPs as our REPA-off rows.
    assert official["analytic_tflop_per_step"] == pytest.approx(rows[0]["analytic_tflop_per_step"])

    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| S/2 |")]
    assert len(lines) == 2 + 1
    baseline = lines[0].split("|")
    assert baseline[2].strip() == "xla" and baseline[4].strip() == "False"
    assert baseline[-4].strip() == "1.00"           # speed x of the baseline against itself
    fastest = min(rows, key=lambda r: r["step_s"])
    ratio = official["step_s"] / fastest["step_s"]
    assert re.search(rf"\| official torch eager \|.*\| {ratio:.2f} \|$", lines[-1])


def test_an_official_run_that_fails_is_reported_not_raised(bench, tmp_path, capsys):
    args = argparse.Namespace(
        official_repo=str(tmp_path / "not_a_checkout"), image_size=64, batch_size=8,
        dtype=None, steps=1, warmup=1, official_timeout=None,
        hidden_size=64, num_heads=4, num_blocks=2, num_encoder_blocks=1)
    assert bench.run_official(args, "S/2", "eager") is None
    printed = capsys.readouterr().out
    assert "official S/2 eager: FAILED (exit 1)" in printed
    assert "decoupled_improved_dit.py: pass a checkout of github.com/MCG-NJU/DDT" in printed


def test_only_and_also_reject_a_malformed_variant(bench):
    for flag in ("--also", "--only"):
        with pytest.raises(SystemExit, match="ATTENTION:REMAT:SCAN:ACCUM"):
            bench.main(TINY + [f"{flag}=xla:none"])
