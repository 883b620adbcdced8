"""DDT / DiT parity with the official PyTorch model, conversion, variants, sharding, input checks.

    .venv/bin/python -m pytest tests/test_ddt.py -q
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from ddt_jax import convert, weights
from ddt_jax.convert import cli
from ddt_jax.convert import ddt as ddt_convert
from ddt_jax.convert import fill
from ddt_jax.models import ddt

from conftest import FIXTURES, OFFICIAL

EXTRA = FIXTURES / "ddt_extra"
TOL = 1e-5


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def assert_forward_matches(model, ref, feature_layer):
    y = jnp.asarray(ref["y"])
    v, s, h = model(nhwc(ref["x"]), jnp.asarray(ref["t"]), y, feature_layer=feature_layer)
    np.testing.assert_allclose(nchw(v), ref["out"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(h), ref["align_feature"], atol=TOL, rtol=0)
    if "s" in ref:
        np.testing.assert_allclose(np.asarray(s), ref["s"], atol=TOL, rtol=0)
        v2, s2 = model(nhwc(ref["x2"]), jnp.asarray(ref["t2"]), y, s=s)
        assert s2 is s
        np.testing.assert_allclose(nchw(v2), ref["out_cached"], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def tiny_ref():
    return dict(np.load(OFFICIAL / "ddt_tiny_forward.npz"))


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """The reference weights as a plain torch state dict (.pth), the third published layout."""
    path = tmp_path_factory.mktemp("pth") / "ddt_tiny.pth"
    state = load_file(OFFICIAL / "ddt_tiny.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("source", ["safetensors", "ckpt", "pth"])
def test_tiny_forward_matches_official(source, tiny_ref, tiny_pth):
    path = {"safetensors": OFFICIAL / "ddt_tiny.safetensors", "ckpt": OFFICIAL / "ddt_tiny.ckpt",
            "pth": tiny_pth}[source]
    model = convert.load_ddt(path, num_encoder_blocks=3, use_ema=False)
    spec = json.loads((OFFICIAL / "ddt_tiny.json").read_text())
    assert ddt.count_params(model) == spec["num_params"]
    assert_forward_matches(model, tiny_ref, int(tiny_ref["align_layer"]))


def test_use_ema_picks_the_ema_copy(tiny_ref):
    raw = torch.load(OFFICIAL / "ddt_tiny.ckpt", map_location="cpu",
                     weights_only=False)["state_dict"]
    # use_ema=True is the default
    ema = convert.load_ddt(OFFICIAL / "ddt_tiny.ckpt", num_encoder_blocks=3)
    kernel = np.asarray(ema.blocks[1].attn.qkv.kernel[...])
    np.testing.assert_array_equal(kernel, raw["ema_denoiser.blocks.1.attn.qkv.weight"].numpy().T)
    assert not np.allclose(kernel, raw["denoiser.blocks.1.attn.qkv.weight"].numpy().T)
    v, _ = ema(nhwc(tiny_ref["x"]), jnp.asarray(tiny_ref["t"]), jnp.asarray(tiny_ref["y"]))
    assert np.abs(nchw(v) - tiny_ref["out"]).max() > 1e-2  # a different model


@pytest.mark.parametrize("case", ["nonsquare", "patch1_rgb", "dit"])
def test_other_shapes_match_official(case):
    ref = dict(np.load(EXTRA / f"ddt_{case}_forward.npz"))
    spec = json.loads((EXTRA / f"ddt_{case}.json").read_text())
    model = convert.load_ddt(EXTRA / f"ddt_{case}.safetensors",
                             num_encoder_blocks=spec.get("num_encoder_blocks"),
                             in_channels=spec["in_channels"])
    assert model.is_decoupled == (case != "dit")
    assert (model.patch_size, model.num_heads) == (spec["patch_size"], spec["num_groups"])
    assert_forward_matches(model, ref, int(ref["align_layer"]))


def test_encoder_depth_from_name_and_patch_inference(tmp_path):
    weights = load_file(OFFICIAL / "ddt_tiny.safetensors")
    cfg = convert.infer_ddt_config(weights, name_hint="/ckpts/DDT-tiny-3en1de/model.ckpt")
    assert (cfg.num_encoder_blocks, cfg.in_channels, cfg.variant[-2:], cfg.num_classes) == (
        3, 4, "/2", 10)
    assert cfg.image_size == 32
    cfg = convert.infer_ddt_config(weights, name_hint="/ckpts/DDT-tiny-2en2de-R512/model.ckpt")
    assert (cfg.num_encoder_blocks, cfg.image_size) == (2, 64)
    with pytest.raises(ValueError, match="num_encoder_blocks"):
        convert.infer_ddt_config(weights, name_hint="model.ckpt")
    with pytest.raises(ValueError, match=r"must be in \[1, 3\]"):
        convert.infer_ddt_config(weights, num_encoder_blocks=4)


def test_bad_checkpoints_list_the_problem(tmp_path):
    weights = load_file(OFFICIAL / "ddt_tiny.safetensors")
    broken = dict(weights)
    del broken["blocks.2.mlp.w3.weight"]
    broken["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    broken["final_layer.linear.bias"] = np.zeros(5, np.float32)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError) as err:
        convert.load_ddt(tmp_path / "broken.safetensors", num_encoder_blocks=3)
    msg = str(err.value)
    assert "blocks.2.mlp.w3.weight" in msg and "blocks.0.attn.extra.weight" in msg
    assert "final_layer.linear.bias" in msg and "mis-shaped" in msg
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        convert.load_ddt(tmp_path / "missing.ckpt", num_encoder_blocks=3)
    with pytest.raises(ValueError, match="use_ema=False"):
        save_file({f"denoiser.{k}": v for k, v in weights.items()},
                  tmp_path / "raw_only.safetensors")
        convert.load_ddt(tmp_path / "raw_only.safetensors", num_encoder_blocks=3)


def xl_config():
    cfg = ddt.default_model_config()
    cfg.variant = "XL/2"
    return cfg


def test_xl_param_count_and_key_round_trip():
    """DDT-XL/2 22en6de: 674,646,352 params; its official key set converts back to its config."""
    abstract = nnx.eval_shape(lambda: ddt.build_model(xl_config(), rngs=nnx.Rngs(0)))
    assert ddt.count_params(abstract) == 674_646_352
    # Official keys/shapes of XL, produced from our abstract params (no memory: broadcast views).
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    official = {}
    for path, var in flat:
        shape = var.shape[::-1] if path[-1] == "kernel" else var.shape
        official[ddt_convert.torch_key(path)] = np.broadcast_to(np.float32(0), shape)
    # The same key layout as the official tiny model, with 28 blocks instead of 4.
    tiny_keys = load_file(OFFICIAL / "ddt_tiny.safetensors").keys()
    expected = {re.sub(r"^blocks\.\d+\.", f"blocks.{i}.", k) for k in tiny_keys for i in range(28)}
    assert set(official) == expected
    cfg = convert.infer_ddt_config(official, name_hint="DDT-XL-22en6de-R256/model.ckpt")
    assert (cfg.arch, cfg.hidden_size, cfg.num_heads, cfg.num_blocks, cfg.num_encoder_blocks) == (
        "ddt", 1152, 16, 28, 22)
    assert (cfg.in_channels, cfg.variant, cfg.num_classes) == (4, "XL/2", 1000)


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_every_variant_builds(size, patch):
    cfg = ddt.default_model_config()
    cfg.variant = f"{size}/{patch}"
    model = nnx.eval_shape(lambda: ddt.build_model(cfg, rngs=nnx.Rngs(0)))
    hidden, depth, heads = ddt.VARIANTS[size]
    assert (model.hidden_size, model.num_blocks, model.num_heads) == (hidden, depth, heads)
    assert model.num_encoder_blocks == ddt.DEFAULT_ENCODER_BLOCKS[size]
    x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    v, s = nnx.eval_shape(lambda m, x, t, y: m(x, t, y), model, x, t, y)
    assert v.shape == (2, 32, 32, 4) and s.shape == (2, (32 // patch) ** 2, hidden)


def small_model(**overrides):
    cfg = ddt.default_model_config()
    cfg.update(dict(variant="S/2", hidden_size=64, num_heads=4, num_blocks=3, num_encoder_blocks=2,
                    in_channels=4, num_classes=10))
    cfg.update(overrides)
    return ddt.build_model(cfg, rngs=nnx.Rngs(0))


def test_initialisation_follows_the_official_recipe():
    model = small_model(num_classes=1000)
    zero = [model.final_layer.linear.kernel, model.final_layer.linear.bias,
            model.final_layer.adaLN_modulation.kernel, model.final_layer.adaLN_modulation.bias,
            model.x_embedder.proj.bias, model.s_embedder.proj.bias]
    assert all(float(jnp.abs(p[...]).max()) == 0.0 for p in zero)
    table = np.asarray(model.y_embedder.embedding_table.embedding[...])
    assert table.shape == (1001, 64) and abs(table.std() - 0.02) < 0.001
    assert abs(float(model.t_embedder.mlp_in.kernel[...].std()) - 0.02) < 0.002
    # xavier-uniform patch embedders: bound sqrt(6 / (fan_in + fan_out)), fan_in = C*p*p = 16.
    bound = np.sqrt(6 / (16 + 64))
    k = np.asarray(model.x_embedder.proj.kernel[...])
    assert k.max() <= bound and k.max() > 0.9 * bound
    # torch-default Linear elsewhere: U(+-1/sqrt(fan_in)) for weights and biases.
    qkv = np.asarray(model.blocks[0].attn.qkv.kernel[...])
    assert qkv.max() <= 1 / 8 and qkv.max() > 0.95 / 8
    b = np.asarray(model.blocks[0].adaLN_modulation.bias[...])
    assert b.max() <= 1 / 8 and b.max() > 0.9 / 8
    assert float(model.blocks[0].norm1.weight[...].min()) == 1.0


def test_encoder_reuse_runs_only_the_decoder():
    model = small_model()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([0.3, 0.7]), jnp.array([1, 10])
    v, s = model(x, t, y)
    v_again, s_again = model(x, t, y, s=s)
    assert s_again is s
    np.testing.assert_allclose(v_again, v, atol=1e-6)
    # The decoder sees t and y only through s: other labels with the cached s change nothing.
    v_other, _ = model(x, t, jnp.array([3, 4]), s=s)
    np.testing.assert_array_equal(v_other, v_again)


def test_non_square_and_patch_one_inputs_run():
    model = small_model(variant="S/1", in_channels=3)
    v, s, h = model(jnp.ones((2, 6, 10, 3)), jnp.array([0.1, 0.9]), jnp.array([0, 10]),
                    feature_layer=1)
    assert v.shape == (2, 6, 10, 3) and s.shape == (2, 60, 64) and h.shape == (2, 60, 64)


def test_bfloat16_compute_is_close_to_float32():
    model = small_model()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, y = jnp.array([0.2, 0.6]), jnp.array([2, 5])
    # Random final layer so the output is not identically zero.
    kernel_shape = model.final_layer.linear.kernel.shape
    model.final_layer.linear.kernel[...] = jax.random.normal(jax.random.key(2), kernel_shape) * 0.1
    v32, _ = model(x, t, y)
    bf16 = small_model(dtype="bfloat16")
    nnx.update(bf16, nnx.state(model, nnx.Param))
    v16, _ = bf16(x, t, y)
    assert v16.dtype == jnp.float32
    scale = float(jnp.abs(v32).max())
    assert float(jnp.abs(v16 - v32).max()) < 0.05 * scale
    assert float(jnp.abs(v16 - v32).max()) > 0  # it really computed in bf16


def logical_shardings(state, mesh, rules):
    """NamedShardings for an NNX state from its logical axis names (rules: logical -> mesh axis)."""
    specs = nnx.get_partition_spec(state)

    def to_mesh(spec):
        axes = tuple(rules.get(a) if a is not None else None for a in spec)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

    return jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (4, 1, 2), (1, 8, 1)])
def test_sharded_forward_equals_unsharded(mesh_shape):
    model = small_model(num_heads=4)
    kernel_shape = model.final_layer.linear.kernel.shape
    model.final_layer.linear.kernel[...] = jax.random.normal(jax.random.key(3), kernel_shape)
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    t, y = jax.random.uniform(jax.random.key(1), (8,)), jnp.arange(8) % 11
    expected, s_expected = model(x, t, y)

    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = {"embed": "fsdp", "mlp": "tensor", "qkv": "tensor", "heads": "tensor"}
    graphdef, state = nnx.split(model)
    shardings = logical_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    x, t, y = (jax.device_put(a, batch) for a in (x, t, y))

    @jax.jit
    def forward(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    v, s = forward(state, x, t, y)
    assert len(v.sharding.device_set) == 8
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
               for a in jax.tree.leaves(state) if a.ndim == 2)
    np.testing.assert_allclose(v, expected, atol=2e-5)
    np.testing.assert_allclose(s, s_expected, atol=2e-5)


def test_bad_inputs_raise_clear_errors():
    model = small_model()
    x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([0.1, 0.2]), jnp.array([0, 1])
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((2, 4, 8, 8)), t, y)  # NCHW by mistake
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(jnp.zeros((2, 7, 8, 4)), t, y)
    with pytest.raises(TypeError, match="must be integers"):
        model(x, t, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        model(x, jnp.array([0.1, 0.2, 0.3]), y)
    with pytest.raises(ValueError, match="encoder state"):
        model(x, t, y, s=jnp.zeros((2, 15, 64)))
    with pytest.raises(ValueError, match="1-based"):
        model(x, t, y, feature_layer=3)
    with pytest.raises(ValueError, match="SIZE/PATCH"):
        small_model(variant="XL")
    with pytest.raises(ValueError, match="unknown model size"):
        small_model(variant="H/2")
    with pytest.raises(ValueError, match="divisible by 4"):
        small_model(hidden_size=60, num_heads=6)(jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                                                 jnp.zeros((1,), jnp.int32))


def test_convert_cli_writes_a_checkpoint_later_tools_load(tmp_path, tiny_ref):
    out = tmp_path / "converted"
    cli.main(["ddt", "--input", str(OFFICIAL / "ddt_tiny.ckpt"), "--num-encoder-blocks", "3",
              "--raw", "--output", str(out)])
    model = weights.load_converted(out)
    assert_forward_matches(model, tiny_ref, int(tiny_ref["align_layer"]))
    with pytest.raises(FileNotFoundError, match="python -m ddt_jax.convert ddt"):
        weights.load_converted(tmp_path / "nothing")


def test_fill_report_lists_every_problem_together():
    """The shared filler raises once, with counts, every kind of problem and the fix."""
    state = load_file(OFFICIAL / "ddt_tiny.safetensors")
    config = convert.infer_ddt_config(state, num_encoder_blocks=3)
    bad = {k: v for k, v in state.items() if not k.startswith("blocks.3.")}  # 12 keys
    del bad["final_layer.linear.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :-1]
    with pytest.raises(ValueError) as err:
        convert.ddt_from_state_dict(bad, config)
    lines = str(err.value).splitlines()
    assert lines[0] == ("DDT 3en1de (hidden_size 64, patch 2) weights do not match the model "
                        "(13 missing, 1 unexpected, 1 mis-shaped):")
    assert lines[1].startswith("  missing keys (13): blocks.3.adaLN_modulation.0.bias, ")
    assert lines[1].endswith(", ... (1 more)")   # long lists are cut after 12 keys
    assert lines[2] == "  unexpected keys (1): extra.weight"
    assert lines[3] == ("  mis-shaped keys (1): x_embedder.proj.weight: got (64, 15), "
                        "expected (64, 16)")
    assert "official DDT / DiT key names" in lines[4] and len(lines) == 5
    # A key mapping that sends two params to one key is a bug, not a file problem.
    with pytest.raises(ValueError, match="both map to the torch key 'w'"):
        fill.fill_params(ddt_convert.ddt_from_state_dict(state, config), state,
                         torch_key=lambda path: "w", what="DDT")


def official_repa_projector(hidden, width, out, seed=0):
    """The official projector's keys (nn.Sequential(nn.Sequential(Linear, SiLU, ...))), random."""
    rng = np.random.default_rng(seed)
    shapes = {"0.0": (width, hidden), "0.2": (width, width), "0.4": (out, width)}
    sd = {}
    for name, shape in shapes.items():
        sd[f"{convert.LIGHTNING_REPA_PREFIX}{name}.weight"] = rng.normal(size=shape).astype("f4")
        sd[f"{convert.LIGHTNING_REPA_PREFIX}{name}.bias"] = rng.normal(size=shape[0]).astype("f4")
    return sd


def test_repa_projector_loads_converts_and_reports(tmp_path):
    state = load_file(OFFICIAL / "ddt_tiny.safetensors")
    proj = official_repa_projector(64, 32, 24)
    save_file({**{f"ema_denoiser.{k}": v for k, v in state.items()}, **proj},
              tmp_path / "DDT-tiny-3en1de.safetensors")
    module = convert.load_repa_projector(tmp_path / "DDT-tiny-3en1de.safetensors")
    p = convert.LIGHTNING_REPA_PREFIX
    np.testing.assert_array_equal(module.linear_1.kernel[...], proj[f"{p}0.0.weight"].T)
    np.testing.assert_array_equal(module.linear_3.bias[...], proj[f"{p}0.4.bias"])
    # The CLI writes it beside the model, where the trainer's init_from finds it.
    out = tmp_path / "converted"
    cli.main(["ddt", "--input", str(tmp_path / "DDT-tiny-3en1de.safetensors"),
              "--output", str(out)])
    _, abstract = weights.abstract_params(
        lambda: ddt.REPAProjector(64, 32, 24, rngs=nnx.Rngs(0)),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    restored = weights.load_projector_params(out, abstract)
    np.testing.assert_array_equal(restored["linear_2"]["kernel"], proj[f"{p}0.2.weight"].T)
    # Its keys go through the shared filler too.
    bad = dict(proj)
    del bad[f"{p}0.2.bias"]
    bad[f"{p}0.6.weight"] = np.zeros((3, 3), np.float32)
    bad[f"{p}0.4.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError) as err:
        convert.repa_projector_from_state_dict(bad)
    msg = str(err.value)
    assert msg.startswith("REPA projector weights do not match the model (1 missing, 1 unexpected, "
                          "1 mis-shaped):")
    assert "missing keys (1): 0.2.bias" in msg and "unexpected keys (1): 0.6.weight" in msg
    assert "mis-shaped keys (1): 0.4.bias: got (5,), expected (24,)" in msg
