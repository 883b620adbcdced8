"""ADM's FID Inception-v3: parity with pytorch-fid's network behind TF's legacy resize, loading from
.pth and .safetensors, odd inputs, converter errors and the CLI.

Reference: tests/fixtures/inception/ (see its README): seeded weights, regenerated here from the
json recipe, and features of 256px and 512px images. Each distinct input shape compiles the
network once (~5 s on 2 cores), so the tests share a few batches.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

import inception_weights
from conftest import FIXTURES
from ddt_jax import convert
from ddt_jax.convert import cli
from ddt_jax.models import inception

HERE = FIXTURES / "inception"
COUNTER = inception_weights.COUNTER
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@nnx.jit
def features(model, images):
    return model(images)


@pytest.fixture(scope="module")
def spec():
    return json.loads((HERE / "inception_weights.json").read_text())


@pytest.fixture(scope="module")
def state_dict(spec):
    sd = inception_weights.regenerate(spec)
    assert list(sd) == [k for k, _, _ in spec["keys"]] and len(sd) == spec["num_keys"] == 566
    # The regeneration is the fixture's:
    assert inception_weights.fingerprint(sd) == spec["sha256_float32_le"]
    return sd


@pytest.fixture(scope="module")
def weight_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inception")


@pytest.fixture(scope="module")
def safetensors_file(weight_dir, state_dict):
    path = weight_dir / "inception.safetensors"
    save_file({k: v for k, v in state_dict.items() if not k.endswith(COUNTER)}, str(path))
    return path


@pytest.fixture(scope="module")
def pth_file(weight_dir, state_dict):
    """The regenerated weights as pytorch-fid's file is: a torch state dict with int64 counters."""
    torch = pytest.importorskip("torch")
    path = weight_dir / PTH_NAME
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def model(safetensors_file):
    return convert.load_inception(safetensors_file)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(HERE / "inception_features.npz"))


# ----------------------------------------------------------------------------- preprocessing

def legacy_resize_numpy(x: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear (no half pixels) written out with NumPy, W then H, float32."""
    x = x.astype(np.float32)
    for axis in (2, 1):
        n = x.shape[axis]
        src = np.arange(size, dtype=np.float32) * (np.float32(n) / np.float32(size))
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = np.expand_dims(src - lo, [d for d in range(4) if d != axis])
        a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
        x = a + (b - a) * frac
    return x


def test_resize_matches_tensorflow(ref):
    out = jax.jit(inception.preprocess)(ref["images_256"][:2])
    assert out.shape == (2, 299, 299, 3) and out.dtype == jnp.float32
    assert max_err(out, ref["resized_256"]) <= 1e-5
    # other sizes (odd, non-square, downsampling) against the NumPy formula
    rng = np.random.default_rng(0)
    for h, w in ((64, 64), (200, 300), (37, 511)):
        x = rng.uniform(0, 255, size=(1, h, w, 3)).astype(np.float32)
        got = jax.jit(inception.legacy_bilinear_resize)(x)
        assert max_err(got, legacy_resize_numpy(x, 299)) <= 1e-4, (h, w)
    x = rng.uniform(0, 255, size=(1, 299, 299, 3)).astype(np.float32)
    assert np.array_equal(jax.jit(inception.legacy_bilinear_resize)(x), x)  # identity
    # the trap: a half-pixel resize is a different image
    half = jax.image.resize(ref["images_256"][:2].astype(np.float32), (2, 299, 299, 3), "bilinear")
    assert max_err((half - 128) * 0.0078125, ref["resized_256"]) > 0.1


# ----------------------------------------------------------------------------- parity

def check_features(out, ref, size: str):
    n = ref[f"pool_{size}"].shape[0]
    shapes = {"pool": (n, 2048), "spatial": (n, 2023), "softmax": (n, 1008)}
    assert {k: v.shape for k, v in out.items()} == shapes
    assert all(v.dtype == jnp.float32 for v in out.values())
    for name in ("pool", "spatial"):
        np.testing.assert_allclose(out[name], ref[f"{name}_{size}"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["softmax"], ref[f"softmax_{size}"], atol=1e-5, rtol=0)


def test_features_match_fixture_on_a_sharded_batch(model, ref):
    """The 256px batch split over 4 devices (params replicated): per-example, no collectives."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    graphdef, state = nnx.split(model)
    replicated = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
    images = jax.device_put(ref["images_256"], NamedSharding(mesh, P("data")))
    out = features(replicated, images)
    assert out["pool"].sharding.shard_shape(out["pool"].shape) == (1, 2048)
    check_features(out, ref, "256")


def test_features_match_fixture_512(model, ref):
    check_features(features(model, ref["images_512"]), ref, "512")


def test_pth_and_safetensors_load_the_same_weights(model, pth_file):
    from_pth = convert.load_inception(pth_file)
    assert all(np.array_equal(a, b) for a, b in zip(params(model), params(from_pth)))
    assert model.Conv2d_1a_3x3.conv.kernel.shape == (3, 3, 3, 32)  # OIHW -> HWIO
    assert model.Mixed_6d.branch1x1.bn.mean.shape == (192,)


def test_nonsquare_small_and_float_inputs(model):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(1, 200, 300, 3), dtype=np.uint8)
    out = features(model, wide)
    assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 2023)
    assert abs(float(out["softmax"].sum()) - 1.0) < 1e-5
    small = rng.integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    out = features(model, small.astype(np.float32))  # float in [0, 255] is the same input
    assert all(np.isfinite(v).all() for v in out.values()) and out["softmax"].shape == (1, 1008)
    assert np.array_equal(inception.preprocess(small),
                          inception.preprocess(small.astype(np.float32)))


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="looks NCHW: transpose it"):
        model(jnp.zeros((1, 3, 64, 64), jnp.uint8))
    with pytest.raises(ValueError, match="NHWC RGB images"):
        model(jnp.zeros((64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="uint8 images or float"):
        model(jnp.zeros((1, 64, 64, 3), jnp.int32))
    with pytest.raises(ValueError, match="pool must be"):
        inception.InceptionE(2048, "mean", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- converter, CLI

def test_bad_state_dicts_raise_clear_errors(state_dict):
    bad = dict(state_dict)
    del bad["Mixed_6d.branch1x1.bn.running_var"]
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError) as err:
        convert.inception_from_state_dict(bad)
    lines = str(err.value).splitlines()
    assert lines[0] == ("Inception-v3 (pytorch-fid FID) weights do not match the model "
                        "(1 missing, 1 unexpected, 1 mis-shaped):")
    assert lines[1:4] == ["  missing keys (1): Mixed_6d.branch1x1.bn.running_var",
                          "  unexpected keys (1): AuxLogits.fc.weight",
                          "  mis-shaped keys (1): fc.weight: got (1000, 2048), expected "
                          "(1008, 2048)"]
    assert PTH_NAME in lines[4] and len(lines) == 5  # the counters are ignored, not unexpected
    with pytest.raises(FileNotFoundError, match="releases of github.com/mseitzer/pytorch-fid"):
        convert.load_inception(f"/nonexistent/{PTH_NAME}")


def test_convert_command_round_trip(tmp_path, model, pth_file):
    out = tmp_path / "inception.safetensors"
    cli.main(["inception", "--input", str(pth_file), "--output", str(out)])
    written = load_file(str(out))
    assert len(written) == 566 - 94 and not any(k.endswith(COUNTER) for k in written)
    assert all(v.dtype == np.float32 for v in written.values())
    assert all(np.array_equal(a, b)
               for a, b in zip(params(model), params(convert.load_inception(out))))
    broken = {k: v for k, v in written.items() if k != "fc.bias"}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="missing keys \\(1\\): fc.bias\n"):
        convert.convert_inception(tmp_path / "broken.safetensors", tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors",
                                                          "inception.safetensors"]
