"""evaluate.py on gs://: the inputs, the Inception weights, the activation caches, the metrics JSON
and --make_ref's output on a GCS emulator (the `gcs_bucket` fixture of tests/conftest.py), with
the same numbers and bytes as the same files on the local disk.

    .venv/bin/python -m pytest tests/test_evaluate_gcs.py -q
"""
import json
import uuid

import numpy as np
import pytest
from absl.testing import flagsaver
from etils import epath

from ddt_jax.evaluation import adm

# The evaluation tests' fixtures (the seeded Inception net, the small ref/sample files).
from test_evaluate import BATCH, FrechetSpy, cli, data, features, net, runner  # noqa: F401
from test_evaluate import weights_file  # noqa: F401

PATH_KEYS = ("ref", "samples")   # what differs between a local and a gs:// run: the names


@pytest.fixture
def gcs_dir(gcs_bucket):
    return epath.Path(gcs_bucket) / f"eval-{uuid.uuid4().hex[:8]}"


def run_cli(cli, monkeypatch, inception, *paths, **flags):  # noqa: F811 - the fixture's module
    """evaluate.py's main with the stand-in Frechet distance; returns the spy's calls."""
    spy = FrechetSpy()
    monkeypatch.setattr(adm, "frechet_distance", spy)
    with flagsaver.flagsaver(inception=str(inception), batch_size=BATCH, progress=False, **flags):
        cli.main(["evaluate.py", *map(str, paths)])
    return spy.calls


def test_evaluate_on_gcs_equals_the_local_run(cli, data, weights_file, gcs_dir,  # noqa: F811
                                              tmp_path, monkeypatch, capsys):
    local = tmp_path / "local"
    local.mkdir()
    for name in ("ref", "samples"):
        (local / f"{name}.npz").write_bytes(data[name].read_bytes())
        (gcs_dir / f"{name}.npz").write_bytes(data[name].read_bytes())
    (gcs_dir / "inception.safetensors").write_bytes(weights_file.read_bytes())

    want_calls = run_cli(cli, monkeypatch, weights_file, local / "ref.npz", local / "samples.npz",
                         output=str(local / "metrics.json"))
    got_calls = run_cli(cli, monkeypatch, gcs_dir / "inception.safetensors",
                        gcs_dir / "ref.npz", gcs_dir / "samples.npz",
                        output=str(gcs_dir / "out" / "metrics.json"))
    want = json.loads((local / "metrics.json").read_text())
    got = json.loads((gcs_dir / "out" / "metrics.json").read_text())
    assert got["samples"] == f"{gcs_dir}/samples.npz"   # not a collapsed gs:/ local path
    for key in PATH_KEYS:
        got.pop(key), want.pop(key)
    got["warnings"] = [w.replace(str(gcs_dir), "DIR") for w in got["warnings"]]
    want["warnings"] = [w.replace(str(local), "DIR") for w in want["warnings"]]
    assert got == want                                     # every metric, hash and warning
    for (got_args, _), (want_args, _) in zip(got_calls, want_calls, strict=True):
        for a, b in zip(got_args, want_args):
            np.testing.assert_array_equal(a, b)            # the statistics the distance saw

    # The activation caches went beside the gs:// inputs; a second run reads them.
    caches = sorted(p.name for p in gcs_dir.glob("*.adm_acts.*.npz"))
    assert len(caches) == 2 and caches[0].startswith("ref.npz."), caches
    run_cli(cli, monkeypatch, gcs_dir / "inception.safetensors", gcs_dir / "ref.npz",
            gcs_dir / "samples.npz", output=str(gcs_dir / "again.json"))
    again = json.loads((gcs_dir / "again.json").read_text())
    assert again["cached"] == {"ref": True, "samples": True}
    assert again["fid"] == got["fid"]

    # --cache_dir on gs:// too.
    run_cli(cli, monkeypatch, weights_file, local / "ref.npz", local / "samples.npz",
            cache_dir=str(gcs_dir / "cache"), output=str(local / "cached.json"))
    assert len(list((gcs_dir / "cache").glob("*.adm_acts.*.npz"))) == 2
    capsys.readouterr()

    # --make_ref from a gs:// dump to a gs:// reference batch: the local run's bytes.
    run_cli(cli, monkeypatch, weights_file, local / "samples.npz",
            make_ref=str(local / "made.npz"), ref_images=4)
    run_cli(cli, monkeypatch, weights_file, gcs_dir / "samples.npz",
            make_ref=str(gcs_dir / "refs" / "made.npz"), ref_images=4)
    assert f"wrote {gcs_dir}/refs/made.npz" in capsys.readouterr().out
    assert (gcs_dir / "refs" / "made.npz").read_bytes() == (local / "made.npz").read_bytes()


def test_missing_gcs_input_names_it(cli, weights_file, gcs_dir, monkeypatch):  # noqa: F811
    (gcs_dir / "ref.npz").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match=r"gs://.*/ref\.npz is not an \.npz"):
        run_cli(cli, monkeypatch, weights_file, gcs_dir / "ref.npz", gcs_dir / "none.npz")
    with pytest.raises(SystemExit, match=r"gs://.*/none\.npz does not exist"):
        run_cli(cli, monkeypatch, weights_file, gcs_dir / "none.npz", gcs_dir / "ref.npz")
