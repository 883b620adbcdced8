"""DINOv2 REPA target: parity with the official dinov2 + DDT REPA code, loading, resizing, errors.

Reference vectors: tests/fixtures/official/dinov2_tiny_* (256px) and tests/fixtures/dinov2_extra/
(384px, non-square, plain forward_features, a SwiGLU + registers model, hub key shapes); see
tests/fixtures/README-dinov2.md. Arrays there are NCHW; our model takes NHWC.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, OFFICIAL
from ddt_jax import convert
from ddt_jax.convert import cli
from ddt_jax.models import dinov2 as dinov2_lib

EXTRA = FIXTURES / "dinov2_extra"
TINY_ST = OFFICIAL / "dinov2_tiny.safetensors"
TOL = 1e-5  # float32 CPU parity with torch


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


@nnx.jit
def repa(model, images):
    return model(images)


@nnx.jit
def forward_features(model, x):
    return model.forward_features(x)


def normalise_u8(images_nchw):
    x = nhwc(images_nchw).astype(np.float32) / 255.0
    mean = np.asarray(dinov2_lib.IMAGENET_MEAN, np.float32)
    return (x - mean) / np.asarray(dinov2_lib.IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def tiny():
    return convert.load_dinov2(TINY_ST, num_heads=4)


@pytest.fixture(scope="module")
def extra():
    return np.load(EXTRA / "dinov2_tiny_extra.npz")


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------- loading + parity

def test_pth_and_safetensors_match_official_features(tiny):
    ref = np.load(OFFICIAL / "dinov2_tiny_features.npz")
    spec = json.loads((OFFICIAL / "dinov2_tiny.json").read_text())
    from_pth = convert.load_dinov2(OFFICIAL / "dinov2_tiny_pretrain.pth",
                                   num_heads=spec["num_heads"])
    for model in (tiny, from_pth):
        assert len(model.blocks) == spec["depth"] and model.embed_dim == spec["embed_dim"]
        feats = repa(model, jnp.asarray(nhwc(ref["images"])))
        assert feats.shape == ref["features"].shape == (2, 256, 64) and feats.dtype == jnp.float32
        assert max_err(feats, ref["features"]) <= TOL


def test_other_sizes_match_official(tiny, extra):
    # 384px -> 336px -> 24x24 tokens; 128x512 -> 112x448 -> 8x32 tokens, where dinov2 re-reads the
    # 256-token grid as 16x16 and resamples it again (the official non-square behaviour).
    for key, tokens in (("384", 576), ("128x512", 256)):
        feats = repa(tiny, jnp.asarray(nhwc(extra[f"a_images_{key}"])))  # uint8 input
        assert feats.shape == (1, tokens, 64)
        assert max_err(feats, extra[f"a_features_{key}"]) <= TOL, key


def test_nonsquare_without_square_token_count(tiny, extra):
    images = jnp.asarray(nhwc(extra["a_images_256x384"]))  # 16x24 = 384 tokens: official asserts
    with pytest.raises(ValueError, match="nonsquare='direct'"):
        repa(tiny, images)
    direct = convert.load_dinov2(TINY_ST, num_heads=4, nonsquare="direct")
    assert max_err(repa(direct, images), extra["a_features_256x384_direct"]) <= TOL
    # square images are the same under both settings
    square = jnp.asarray(nhwc(extra["a_images_384"]))
    assert max_err(repa(direct, square), extra["a_features_384"]) <= TOL


def test_forward_features_resamples_like_dinov2(tiny, extra):
    # plain dinov2 on a 112px input: its own 37x37 -> 8x8 resample with the 0.1 offset kludge
    out = forward_features(tiny, jnp.asarray(normalise_u8(extra["ff112_images"])))
    assert max_err(out["x_norm_patchtokens"], extra["a_ff112_patchtokens"]) <= TOL
    assert max_err(out["x_norm_clstoken"], extra["a_ff112_clstoken"]) <= TOL


def test_swiglu_registers_other_width():
    spec = json.loads((EXTRA / "dinov2_swiglu_reg.json").read_text())
    ref = np.load(EXTRA / "dinov2_swiglu_reg_features.npz")
    sd = load_file(str(EXTRA / "dinov2_swiglu_reg.safetensors"))
    config = convert.dinov2_config_from_state_dict(sd, num_heads=spec["num_heads"])
    assert config["ffn_layer"] == "swiglu"
    assert config["num_register_tokens"] == spec["num_register_tokens"]
    # dinov2's SwiGLUFFNFused width: int(160 * 2/3) = 106, rounded up to a multiple of 8 -> 112
    assert config["ffn_hidden_dim"] == spec["swiglu_hidden"] == 112
    assert dinov2_lib.swiglu_hidden_dim(spec["embed_dim"]) == 112
    model = convert.load_dinov2(EXTRA / "dinov2_swiglu_reg.safetensors",
                                num_heads=spec["num_heads"])
    assert max_err(repa(model, jnp.asarray(nhwc(ref["images_256"]))), ref["features_256"]) <= TOL
    out = forward_features(model, jnp.asarray(normalise_u8(ref["ff112_images"])))
    for name in ("patchtokens", "regtokens", "clstoken"):
        assert max_err(out[f"x_norm_{name}"], ref[f"ff112_{name}"]) <= TOL, name


def test_published_layouts_and_variant_table():
    """Every torch-hub backbone's key/shape layout loads (zero-memory stand-in tensors)."""
    hub = json.loads((EXTRA / "dinov2_hub_shapes.json").read_text())
    params = {"dinov2_vits14": 22_056_576, "dinov2_vitb14": 86_580_480,
              "dinov2_vitl14": 304_368_640,
              "dinov2_vitg14": 1_136_480_768, "dinov2_vitb14_reg": 86_583_552}
    for name, shapes in hub.items():
        sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
        config = convert.dinov2_config_from_state_dict(sd)
        variant = {384: "S", 768: "B", 1024: "L", 1536: "G"}[config["embed_dim"]]
        expected = dinov2_lib.DINOV2_VARIANTS[variant]
        assert {k: config[k] for k in expected} == expected, name
        assert (config["img_size"], config["patch_size"]) == (518, 14)
        assert config["num_register_tokens"] == (4 if name.endswith("_reg") else 0)
        # blocks are identical, so check the full layout on the first two (40 G blocks take ~15 s)
        head = {k: v for k, v in sd.items()
                if not k.startswith("blocks.") or k.split(".")[1] in "01"}
        _, state = convert.dinov2_state_from_state_dict(head, {**config, "depth": 2})
        counts = {b: sum(np.size(v) for k, v in head.items() if k.startswith(f"blocks.{b}."))
                  for b in "01"}
        assert counts["0"] == counts["1"]
        total = (sum(np.size(x) for x in jax.tree.leaves(state))
                 + (config["depth"] - 2) * counts["0"])
        assert total == params[name], name
    g = nnx.eval_shape(lambda: dinov2_lib.DINOv2.from_variant("G", depth=1, rngs=nnx.Rngs(0)))
    assert g.blocks[0].mlp.w3.kernel.shape == (4096, 1536)  # default width = the published one


# ----------------------------------------------------------------------------- resizing

def test_resize_matrices_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    for (h, w) in ((256, 256), (384, 384), (512, 512), (256, 384)):
        x = rng.normal(size=(2, 3, h, w)).astype(np.float32) * 2
        size = dinov2_lib.repa_input_size(h, w)
        ref = F.interpolate(torch.from_numpy(x), size, mode="bicubic", align_corners=False).numpy()
        out = dinov2_lib.resize_bicubic_torch(jnp.asarray(nhwc(x)), size)
        assert out.shape[1:3] == size
        assert max_err(out, nhwc(ref)) <= TOL, (h, w)
    assert dinov2_lib.repa_input_size(256, 256) == (224, 224)
    assert dinov2_lib.repa_input_size(512, 384) == (448, 336)
    # jax.image.resize's bicubic (a=-0.5) is not torch's (a=-0.75): that is why the matrices exist
    x = rng.uniform(size=(1, 256, 256, 3)).astype(np.float32)
    gap = max_err(jax.image.resize(x, (1, 224, 224, 3), "bicubic", antialias=False),
                  dinov2_lib.resize_bicubic_torch(jnp.asarray(x), (224, 224)))
    assert gap > 1e-2


def test_pos_grid_resamples_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    pos = np.random.default_rng(1).normal(size=(1, 1 + 37 * 37, 32)).astype(np.float32)
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    for hw in ((16, 16), (24, 24), (8, 32), (48, 48)):
        # timm's resample_abs_pos_embed: bicubic with antialias
        ref = F.interpolate(grid, size=hw, mode="bicubic", antialias=True)
        ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 32)
        out = dinov2_lib.resample_abs_pos_embed(jnp.asarray(pos), hw)
        assert out.shape == (1, 1 + hw[0] * hw[1], 32)
        assert np.array_equal(out[:, 0], pos[:, 0]) and max_err(out[:, 1:], ref.numpy()) <= TOL, hw
        # dinov2's interpolate_pos_encoding: no antialias, scale factors (n + 0.1) / 37
        scale = ((hw[0] + 0.1) / 37, (hw[1] + 0.1) / 37)
        ref = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        out = dinov2_lib.interpolate_pos_encoding(jnp.asarray(pos), *hw)
        assert max_err(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 32).numpy()) <= TOL, hw
    assert dinov2_lib.resample_abs_pos_embed(jnp.asarray(pos), (37, 37)) is not None
    assert np.array_equal(dinov2_lib.interpolate_pos_encoding(jnp.asarray(pos), 37, 37), pos)


# ----------------------------------------------------------------------------- dtypes, gradients

def test_uint8_bf16_and_no_gradient(tiny, extra):
    images_u8 = jnp.asarray(nhwc(extra["a_images_384"]))
    images_f = images_u8.astype(jnp.float32) / 255.0
    ref = extra["a_features_384"]
    assert max_err(repa(tiny, images_u8), repa(tiny, images_f)) <= 1e-5  # x/255 in or out of jit
    bf16 = convert.load_dinov2(TINY_ST, num_heads=4, dtype=jnp.bfloat16)
    assert bf16.blocks[0].attn.qkv.kernel.dtype == jnp.float32  # params stay float32
    feats = np.asarray(repa(bf16, images_u8))
    assert feats.dtype == np.float32
    cos = (feats * ref).sum(-1) / np.linalg.norm(feats, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.999 and max_err(feats, ref) < 0.05 * np.abs(ref).max()
    assert max_err(feats, ref) > 1e-4  # it really ran in bfloat16
    grad = nnx.jit(lambda m, x: jax.grad(lambda x: m(x).sum())(x))(tiny, images_f[:, :32, :32])
    assert not np.any(np.asarray(grad))  # frozen: stop_gradient on the output


def test_logical_axes_and_fsdp_sharded_run(tiny):
    """Params carry the DDT logical-axis vocabulary and the model runs with `embed` split 8 ways."""
    vocabulary = {"embed", "qkv", "heads", "mlp", "norm", None}
    state = nnx.state(tiny, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert set(axes) <= vocabulary, path
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = nnx.map_state(
        lambda _, v: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            *("fsdp" if a == "embed" else None for a in v.get_metadata()["out_sharding"]))), state)
    graphdef, _, rest = nnx.split(tiny, nnx.Param, ...)
    sharded = nnx.merge(graphdef, jax.device_put(state, specs), rest)
    assert sharded.blocks[0].attn.qkv.kernel[...].sharding.shard_shape((64, 192)) == (8, 192)
    ref = np.load(OFFICIAL / "dinov2_tiny_features.npz")
    assert max_err(repa(sharded, jnp.asarray(nhwc(ref["images"]))), ref["features"]) <= TOL


# ----------------------------------------------------------------------------- errors, CLI

def test_bad_state_dicts_raise_clear_errors():
    sd = load_file(str(TINY_ST))
    with pytest.raises(ValueError, match="pass num_heads"):
        convert.dinov2_config_from_state_dict(sd)  # 64 is not a published width
    config = convert.dinov2_config_from_state_dict(sd, num_heads=4)
    bad = dict(sd)
    del bad["blocks.1.attn.qkv.bias"]
    bad["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    bad["blocks.2.mlp.fc1.weight"] = np.zeros((256, 63), np.float32)
    with pytest.raises(ValueError) as err:
        convert.dinov2_state_from_state_dict(bad, config)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.attn.qkv.bias\n" in msg
    assert "unexpected keys (1): blocks.0.extra.weight\n" in msg
    assert "mis-shaped keys (1): blocks.2.mlp.fc1.weight: got (256, 63), expected (256, 64)" in msg
    with pytest.raises(ValueError, match="not a DINOv2 state dict"):
        convert.dinov2_config_from_state_dict({"weight": np.zeros(3)})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        convert.load_dinov2("/nonexistent/dinov2_vitb14_pretrain.pth")


def test_fill_report_lists_every_problem_together():
    """The shared filler raises once, with counts, every kind of problem and the fix."""
    sd = load_file(str(TINY_ST))
    config = convert.dinov2_config_from_state_dict(sd, num_heads=4)
    bad = {k: v for k, v in sd.items() if k not in ("mask_token", "norm.weight")}
    bad["head.weight"] = np.zeros((10, 64), np.float32)
    bad["pos_embed"] = sd["pos_embed"][:, :-1]
    with pytest.raises(ValueError) as err:
        convert.dinov2_state_from_state_dict(bad, config)
    lines = str(err.value).splitlines()
    assert lines[0] == ("DINOv2 weights (embed_dim=64, depth=3, ffn=mlp, registers=0) do not "
                        "match the model (2 missing, 1 unexpected, 1 mis-shaped):")
    assert lines[1:4] == ["  missing keys (2): mask_token, norm.weight",
                          "  unexpected keys (1): head.weight",
                          "  mis-shaped keys (1): pos_embed: got (1, 1369, 64), expected "
                          f"{sd['pos_embed'].shape}"]
    assert "torch-hub" in lines[4] and len(lines) == 5


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="NHWC"):
        tiny(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="uint8 images or float"):
        tiny(jnp.zeros((1, 64, 64, 3), jnp.int32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        repa(tiny, jnp.zeros((1, 100, 100, 3)))  # 100 -> 87 px
    with pytest.raises(ValueError, match="ffn_layer"):
        dinov2_lib.DINOv2(64, 1, 4, ffn_layer="swiglufused", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown DINOv2 variant"):
        dinov2_lib.DINOv2.from_variant("H", rngs=nnx.Rngs(0))


def test_convert_command_writes_checked_safetensors(tmp_path):
    out = tmp_path / "dinov2_tiny.safetensors"
    cli.main(["dinov2", "--input", str(OFFICIAL / "dinov2_tiny_pretrain.pth"),
              "--output", str(out), "--num-heads", "4"])
    written, original = load_file(str(out)), load_file(str(TINY_ST))
    assert sorted(written) == sorted(original)
    assert all(np.array_equal(written[k], original[k]) for k in original)
    broken = {k: v for k, v in original.items() if k != "norm.bias"}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="missing keys \\(1\\): norm.bias\n"):
        convert.convert_dinov2(tmp_path / "broken.safetensors", tmp_path / "x.safetensors",
                               num_heads=4)
    assert not (tmp_path / "x.safetensors").exists()
