"""Model speed/memory variants: attention kernels, remat policies, scanned blocks, both param
layouts in the converters and loaders, and FSDP's collectives in the compiled HLO.

Every variant must compute what the unrolled XLA model computes (float32 rounding).

    .venv/bin/python -m pytest tests/test_model_variants.py -q
"""
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from configs import tiny
from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import config_schema
from ddt_jax import convert
from ddt_jax import sharding
from ddt_jax import tpu_topology
from ddt_jax import trainer
from ddt_jax import weights
from ddt_jax.convert import ddt as ddt_convert
from ddt_jax.models import ddt
from ddt_jax.models import dinov2 as dinov2_lib
from ddt_jax.models import layers

from conftest import OFFICIAL

TOL = 1e-5
CKPT = OFFICIAL / "ddt_tiny.ckpt"   # the official tiny DDT, 3en1de


def model_config(**overrides):
    cfg = ddt.default_model_config()
    cfg.update(dict(variant="S/2", hidden_size=64, num_heads=4, num_blocks=3, num_encoder_blocks=2,
                    in_channels=4, num_classes=10))
    cfg.update(overrides)
    return cfg


def build(**overrides):
    model = ddt.build_model(model_config(**overrides), rngs=nnx.Rngs(0))
    # A random final layer (it is zero-initialised), so outputs and gradients are not trivial.
    kernel = model.final_layer.linear.kernel
    kernel[...] = 0.3 * jax.random.normal(jax.random.key(7), kernel.shape)
    return model


def inputs(batch=4, side=8):
    x = jax.random.normal(jax.random.key(0), (batch, side, side, 4))
    t = jnp.linspace(0.1, 0.9, batch)
    y = jnp.arange(batch) % 11
    return x, t, y


def forward_and_grad(model, x, t, y, feature_layer):
    """(v, s, feature, grads of a loss on all three) under jit, grads in the unrolled layout."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        v, s, h = nnx.merge(graphdef, params)(x, t, y, feature_layer=feature_layer)
        aux = (v, s, h)
        return jnp.mean(v ** 2) + jnp.mean(jnp.sin(h)) + (0 if s is None else jnp.mean(s)), aux

    (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return aux, ddt.unstack_blocks(grads.to_pure_dict())


def max_diff(a, b):
    return max(float(jnp.abs(jnp.asarray(u) - jnp.asarray(w)).max())
               for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Config fields

def test_config_fields_defaults_and_errors():
    cfg = ddt.default_model_config()
    assert (cfg.attention, cfg.remat, cfg.scan_blocks) == ("xla", "none", False)
    assert "attention" in config_schema.default_config().model
    for field, value, match in (("attention", "flash", "model.attention must be one of"),
                                ("remat", "some", "model.remat must be one of"),
                                ("scan_blocks", "yes", "model.scan_blocks must be True")):
        with pytest.raises(ValueError, match=match):
            ddt.model_kwargs(ml_collections.ConfigDict({**model_config().to_dict(), field: value}))
    # A config saved before these fields existed (converted dirs, old runs) gets the defaults.
    old = model_config().to_dict()
    for field in ("attention", "remat", "scan_blocks"):
        del old[field]
    kw = ddt.model_kwargs(ml_collections.ConfigDict(old))
    assert (kw["attention"], kw["remat"], kw["scan_blocks"]) == ("xla", "none", False)


def test_attention_resolution(monkeypatch):
    assert jax.default_backend() == "cpu"
    for dtype in (jnp.float32, jnp.bfloat16):
        assert layers.resolve_attention("auto", dtype) == "xla"
        assert layers.resolve_attention("xla", dtype) == "xla"
    with pytest.raises(ValueError, match="'cudnn'.*needs a GPU.*'cpu'"):
        layers.resolve_attention("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="'tpu_flash'.*needs a TPU.*'cpu'"):
        layers.resolve_attention("tpu_flash", jnp.float32)
    with pytest.raises(ValueError, match="attention must be one of"):
        layers.resolve_attention("flash", jnp.float32)
    # The model raises the same error when it is traced, not when it is built.
    model = build(attention="cudnn")
    with pytest.raises(ValueError, match="needs a GPU"):
        nnx.eval_shape(lambda m, x, t, y: m(x, t, y), model, *inputs())
    with layers.interpret_tpu_kernels():
        assert layers.resolve_attention("tpu_flash", jnp.float32) == "tpu_flash"
    # What "auto" picks elsewhere, and cuDNN's dtype requirement.
    monkeypatch.setattr(layers, "_platform", lambda: "gpu")
    assert layers.resolve_attention("auto", jnp.bfloat16) == "cudnn"
    assert layers.resolve_attention("auto", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        layers.resolve_attention("cudnn", jnp.float32)
    monkeypatch.setattr(layers, "_platform", lambda: "tpu")
    assert layers.resolve_attention("auto", jnp.bfloat16) == "tpu_flash"
    assert layers.resolve_attention("tpu_flash", jnp.float32) == "tpu_flash"


# ---------------------------------------------------------------------------------------------
# Attention kernels

def test_xla_attention_is_the_previous_computation():
    q, k, v = (jax.random.normal(key, (2, 24, 3, 8))
               for key in jax.random.split(jax.random.key(0), 3))
    np.testing.assert_array_equal(np.asarray(layers.dot_product_attention(q, k, v, "xla")),
                                  np.asarray(jax.nn.dot_product_attention(q, k, v)))


def test_tpu_flash_interpret_equals_xla(tokens=200):   # padded to 256 (DDT below: 256 exactly)
    q, k, v = (jax.random.normal(key, (1, tokens, 2, 16))
               for key in jax.random.split(jax.random.key(tokens), 3))

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, impl)))

    ref = layers.dot_product_attention(q, k, v, "xla")
    ref_grads = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    with layers.interpret_tpu_kernels():
        out = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, "tpu_flash"))(q, k, v)
        grads = jax.jit(jax.grad(loss("tpu_flash"), argnums=(0, 1, 2)))(q, k, v)
    assert max_diff(out, ref) < TOL
    assert max_diff(grads, ref_grads) < TOL


def test_tpu_flash_ddt_equals_xla_also_sharded():
    """DDT on 16x16 latents with patch 1 (256 tokens), plain and as a shard_map over a mesh."""
    cfg = dict(variant="S/1", num_blocks=2, num_encoder_blocks=1)
    ref_model = build(**cfg)
    graphdef, params = nnx.split(build(**cfg, attention="tpu_flash"), nnx.Param)
    x, t, y = inputs(batch=8, side=16)
    v_ref, s_ref = ref_model(x, t, y)
    forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x, t, y))
    mesh = jax.make_mesh((2, 4, 1), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    with layers.interpret_tpu_kernels(), jax.set_mesh(mesh):   # without a mesh: the test above
        v, s = forward(params, x_sharded)
    assert max_diff(v, v_ref) < TOL * float(jnp.abs(v_ref).max()) and max_diff(s, s_ref) < TOL
    assert not v.sharding.is_fully_replicated


def test_dinov2_attention_option():
    """DINOv2 with each kernel that runs here (its 1 + 4x4 tokens padded for the TPU one)."""
    kw = dict(embed_dim=32, depth=2, num_heads=2, img_size=56)
    ref = dinov2_lib.DINOv2(**kw, rngs=nnx.Rngs(0))
    flash = dinov2_lib.DINOv2(**kw, attention="tpu_flash", rngs=nnx.Rngs(0))
    auto = dinov2_lib.DINOv2(**kw, attention="auto", rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    want = ref(images)
    assert want.shape == (2, 16, 32)
    np.testing.assert_array_equal(np.asarray(auto(images)), np.asarray(want))
    with layers.interpret_tpu_kernels():
        got = jax.jit(lambda im: flash(im))(images)
    assert max_diff(got, want) < TOL * float(jnp.abs(want).max())
    with pytest.raises(ValueError, match="attention must be one of"):
        dinov2_lib.DINOv2(**kw, attention="flash", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Remat and scanned blocks

# The benchmark's variants (remat none / full / dots_saveable x scan), the other policies once
# ("nothing_saveable" is "full" by another name: same memory, same math); DiT shares the code.
VARIANTS = [("ddt", "none", True), ("ddt", "full", True), ("ddt", "dots_saveable", True),
            ("ddt", "full", False), ("ddt", "dots_with_no_batch_dims_saveable", False),
            ("dit", "dots_saveable", True)]


@pytest.fixture(scope="module")
def references():
    x, t, y = inputs()
    return {arch: forward_and_grad(build(arch=arch), x, t, y, 1) for arch in ("ddt", "dit")}


@pytest.mark.parametrize("arch,remat,scan", VARIANTS)
def test_remat_and_scan_match_unrolled(references, arch, remat, scan):
    feature_layer = 1
    want, want_grads = references[arch]
    model = build(arch=arch, remat=remat, scan_blocks=scan)
    got, grads = forward_and_grad(model, *inputs(), feature_layer)
    assert max_diff(got, want) < TOL * 10   # |v| ~ 10
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    assert max_diff(grads, want_grads) < TOL


@pytest.mark.parametrize("arch", ["ddt", "dit"])
def test_scanned_layout_and_feature_layers(arch):
    unrolled, scanned = build(arch=arch), build(arch=arch, scan_blocks=True)
    params = nnx.state(scanned, nnx.Param).to_pure_dict()
    # Same seed, same weights: the scanned model is built from the same unrolled blocks.
    assert max_diff(ddt.stack_blocks(nnx.state(unrolled, nnx.Param).to_pure_dict(),
                                     unrolled.num_encoder_blocks), params) == 0
    assert ddt.is_scanned(params) and "blocks" not in params
    assert ("decoder_blocks" in params) == (arch == "ddt")
    depth = 2 if arch == "ddt" else 3
    kernel = scanned.encoder_blocks.layers.attn.qkv.kernel
    assert kernel.shape == (depth, 64, 192)
    assert kernel.get_metadata()["out_sharding"] == (None, "embed", "qkv")
    x, t, y = inputs()
    # The REPA feature after the last encoder block (one scan; the other tests split it).
    _, _, want = unrolled(x, t, y, feature_layer=depth)
    _, _, got = scanned(x, t, y, feature_layer=depth)
    assert max_diff(got, want) < TOL


def test_stack_unstack_round_trip_and_errors():
    params = nnx.state(build(), nnx.Param).to_pure_dict()
    stacked = ddt.stack_blocks(params, 2)
    assert stacked["encoder_blocks"]["layers"]["mlp"]["w1"]["kernel"].shape[0] == 2
    assert stacked["decoder_blocks"]["layers"]["mlp"]["w1"]["kernel"].shape[0] == 1
    back = ddt.unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params) and max_diff(back, params) == 0
    assert ddt.stack_blocks(stacked, 2) is stacked and ddt.unstack_blocks(params) is params
    with pytest.raises(ValueError, match="num_encoder_blocks"):
        ddt.stack_blocks(params, 4)


# ---------------------------------------------------------------------------------------------
# Matmul layouts: the row-major VJPs (the CPU default) against jax's autodiff (the previous path)

def test_matmul_layout_resolution_and_config(monkeypatch):
    assert ddt.default_model_config().matmul_layout == "auto"
    assert layers.resolve_matmul_layout("auto") == "row_major"   # the tests run on CPU
    assert layers.resolve_matmul_layout("xla") == "xla"
    with pytest.raises(ValueError, match="model.matmul_layout must be one of"):
        ddt.model_kwargs(ml_collections.ConfigDict({**model_config().to_dict(),
                                                    "matmul_layout": "column_major"}))
    old = model_config().to_dict()
    del old["matmul_layout"]   # a config saved before the field existed
    assert ddt.model_kwargs(ml_collections.ConfigDict(old))["matmul_layout"] == "auto"
    for platform in ("gpu", "tpu"):
        monkeypatch.setattr(layers, "_platform", lambda platform=platform: platform)
        assert layers.resolve_matmul_layout("auto") == "xla"
        assert layers.resolve_matmul_layout("row_major") == "row_major"


@pytest.mark.parametrize("shape,features", [((2, 6, 8), 24), ((12, 24), 8), ((3, 5), 5)])
def test_row_major_dense_gradients(shape, features):
    """Both weight-gradient forms (transposing x, or dy when it is narrower) and 2-D/3-D x."""
    x = jax.random.normal(jax.random.key(1), shape)
    kernel = jax.random.normal(jax.random.key(2), (shape[-1], features))
    dims = (((x.ndim - 1,), (0,)), ((), ()))

    def loss(dot_general):
        return lambda x, kernel: jnp.sum(jnp.sin(dot_general(x, kernel, dims)))

    want = jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, kernel)
    got = jax.jit(jax.value_and_grad(loss(layers.row_major_dot_general), argnums=(0, 1)))(
        x, kernel)
    assert max_diff(got, want) < 1e-5
    # Not the dense case (batch dims): plain dot_general, same values.
    batched = (((2,), (1,)), ((0,), (0,)))
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    np.testing.assert_array_equal(layers.row_major_dot_general(a, b, batched),
                                  jax.lax.dot_general(a, b, batched))
    bf16 = layers.row_major_dot_general(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), dims)
    assert bf16.dtype == jnp.bfloat16


def test_row_major_attention_equals_xla():
    q, k, v = (jax.random.normal(key, (2, 24, 3, 8))
               for key in jax.random.split(jax.random.key(3), 3))

    def loss(layout):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, "xla",
                                                                            layout)))

    ref = layers.dot_product_attention(q, k, v, "xla", "xla")
    out = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, "xla", "row_major"))(
        q, k, v)
    assert out.dtype == ref.dtype and max_diff(out, ref) < 1e-6
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("row_major"), argnums=(0, 1, 2)))(q, k, v)
    assert max_diff(got, want) < 1e-6
    # bfloat16 keeps jax's own path (its f32 scores and casts), whatever the layout.
    q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
    np.testing.assert_array_equal(
        np.asarray(layers.dot_product_attention(q16, k16, v16, "xla", "row_major"), np.float32),
        np.asarray(layers.dot_product_attention(q16, k16, v16, "xla", "xla"), np.float32))


@pytest.mark.parametrize("arch,remat,scan", [("ddt", "none", False), ("ddt", "full", True),
                                             ("ddt", "dots_saveable", False),
                                             ("dit", "none", False)])
def test_row_major_model_matches_xla_layout(arch, remat, scan):
    """The whole model's outputs and gradients: the CPU default against the previous path."""
    x, t, y = inputs()
    want, want_grads = forward_and_grad(build(arch=arch, matmul_layout="xla"), x, t, y, 1)
    model = build(arch=arch, remat=remat, scan_blocks=scan, matmul_layout="row_major")
    got, grads = forward_and_grad(model, x, t, y, 1)
    assert max_diff(got, want) < TOL * 10   # |v| ~ 10
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    assert max_diff(grads, want_grads) < TOL
    # Same params whatever the layout (one seed, one tree).
    assert max_diff(nnx.state(build(arch=arch, matmul_layout="xla"), nnx.Param),
                    nnx.state(build(arch=arch, matmul_layout="row_major"), nnx.Param)) == 0


# ---------------------------------------------------------------------------------------------
# Converters and loaders read and write both layouts

def assert_official_forward(model):
    ref = dict(np.load(OFFICIAL / "ddt_tiny_forward.npz"))
    x = jnp.asarray(ref["x"].transpose(0, 2, 3, 1))
    v, s, h = model(x, jnp.asarray(ref["t"]), jnp.asarray(ref["y"]),
                    feature_layer=int(ref["align_layer"]))
    diffs = {"out": float(np.abs(np.asarray(v).transpose(0, 3, 1, 2) - ref["out"]).max()),
             "s": float(np.abs(np.asarray(s) - ref["s"]).max()),
             "align_feature": float(np.abs(np.asarray(h) - ref["align_feature"]).max())}
    v2, _ = model(jnp.asarray(ref["x2"].transpose(0, 2, 3, 1)), jnp.asarray(ref["t2"]),
                  jnp.asarray(ref["y"]), s=s)
    diffs["out_cached"] = float(np.abs(np.asarray(v2).transpose(0, 3, 1, 2)
                                       - ref["out_cached"]).max())
    assert max(diffs.values()) < TOL, diffs
    return diffs


def test_official_checkpoint_into_scanned_model(remat="dots_saveable"):
    config = convert.infer_ddt_config(load_file(OFFICIAL / "ddt_tiny.safetensors"),
                                      num_encoder_blocks=3)
    config.scan_blocks, config.remat = True, remat
    weights_file = load_file(OFFICIAL / "ddt_tiny.safetensors")
    model = convert.ddt_from_state_dict(weights_file, config)
    assert model.scan_blocks and model.encoder_blocks.layers.attn.qkv.kernel.shape[0] == 3
    assert_official_forward(model)   # incl. the decoder alone from a cached s
    # Written back under the official keys, from either layout: the file's own tensors.
    for params in (nnx.state(model, nnx.Param), ddt.unstack_blocks(
            nnx.state(model, nnx.Param).to_pure_dict())):
        back = ddt_convert.official_state_dict(params)
        assert set(back) == set(weights_file)
        assert all(np.array_equal(back[k], weights_file[k]) for k in weights_file)


def fsdp_abstract(model_cfg):
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    model = nnx.eval_shape(lambda: ddt.build_model(model_cfg, rngs=nnx.Rngs(0)))
    _, params = weights.split_params(model)
    shardings = sharding.logical_to_named(params, mesh, config_schema.default_config().mesh.rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params.to_pure_dict(), shardings.to_pure_dict())


def assert_same_params(tree, abstract, want):
    jax.tree.map(lambda a, ref: (a.sharding == ref.sharding) or pytest.fail(str(a.sharding)),
                 tree, abstract)
    want = weights.to_block_layout(jax.tree.map(np.asarray, want), abstract)
    assert jax.tree.structure(tree) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loaders_convert_between_layouts(tmp_path):
    config = weights.read_model_config(CKPT, num_encoder_blocks=3)
    scanned_config = config.copy_and_resolve_references()
    scanned_config.scan_blocks = True
    official = nnx.state(convert.load_ddt(CKPT, 3), nnx.Param).to_pure_dict()
    abstract_scanned, abstract_unrolled = fsdp_abstract(scanned_config), fsdp_abstract(config)
    # An official file (always unrolled) into a scanned, FSDP-sharded target.
    assert_same_params(weights.load_model_params(CKPT, abstract_scanned, num_encoder_blocks=3),
                       abstract_scanned, official)
    # A converted directory in each layout into a model of the other.
    raw = nnx.state(convert.load_ddt(CKPT, 3, use_ema=False), nnx.Param).to_pure_dict()
    unrolled_dir = weights.save_converted(convert.load_ddt(CKPT, 3, use_ema=False),
                                          tmp_path / "u", config)
    scanned_dir = weights.save_converted(convert.load_ddt(CKPT, 3, use_ema=False,
                                                          scan_blocks=True),
                                         tmp_path / "s", scanned_config)
    assert json.loads((scanned_dir / weights.CONVERTED_CONFIG).read_text())["scan_blocks"]
    # (Same-layout loads are tests/test_weights.py's.)
    for directory, abstract in ((unrolled_dir, abstract_scanned),
                                (scanned_dir, abstract_unrolled)):
        assert_same_params(weights.load_model_params(directory, abstract), abstract, raw)
    assert_official_forward(weights.load_converted(unrolled_dir, scan_blocks=True))
    with pytest.raises(ValueError, match="config.scan_blocks=False"):
        weights.save_converted(convert.load_ddt(CKPT, 3, scan_blocks=True), tmp_path / "x",
                               config)


def test_run_checkpoints_load_in_either_layout(tmp_path):
    """A scanned run's checkpoint into an unrolled model (e.g. to sample) and back."""
    config = tiny.get_config("pixel")
    config.model.scan_blocks = True
    mesh = sharding.create_mesh(config.mesh)
    tx, _ = trainer.make_optimizer(config.optim)
    layout = trainer.state_layout(config, mesh, tx)
    (tmp_path / weights.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))
    rng = np.random.default_rng(0)
    like = lambda abstract: jax.tree.map(lambda a: jax.device_put(
        rng.standard_normal(a.shape).astype(a.dtype), a.sharding), abstract)
    params = {weights.MODEL: like(layout.abstract.params[weights.MODEL])}
    state = weights.TrainState(step=jnp.int32(3), params=params,
                               opt_state=jax.jit(tx.init)(params),
                               ema_params=like(layout.abstract.ema_params))
    ckpt = checkpoint_lib.Checkpointer(tmp_path, config.checkpoint)
    ckpt.save(3, state.to_dict(), force=True)
    ckpt.close()
    saved = jax.device_get(state.ema_params)
    assert ddt.is_scanned(saved)
    unrolled_config = config.model.copy_and_resolve_references()
    unrolled_config.scan_blocks = False
    abstract = fsdp_abstract(unrolled_config)
    assert_same_params(weights.load_model_params(tmp_path, abstract), abstract, saved)
    # A step directory (its run's config.json two levels up tells the layout) into the scanned
    # layout it was saved in.
    step_dir = tmp_path / checkpoint_lib.CHECKPOINT_DIR / "3"
    abstract = fsdp_abstract(config.model)
    assert_same_params(weights.load_model_params(step_dir, abstract, which="raw"), abstract,
                       jax.device_get(state.params[weights.MODEL]))


# ---------------------------------------------------------------------------------------------
# FSDP: the collectives of a compiled train-like step

HLO_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """{op: [(element type, shape) of each result (tuple results: every element)]}."""
    out: dict[str, list] = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*%\S+ = (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(", line)
        if match:
            shapes = [(dtype, tuple(int(d) for d in dims.split(",") if d))
                      for dtype, dims in HLO_SHAPE.findall(match.group(1))]
            out.setdefault(match.group(2), []).extend(shapes)
    return out


def fsdp_step_hlo(devices, scan: bool, hidden: int = 96, side: int = 12) -> str:
    """Compiled HLO of forward + grad of a DDT FSDP-sharded over data=2 x fsdp=4 of `devices`,
    traced under the mesh like the trainer's step (REPA feature included)."""
    rules = config_schema.default_config().mesh.rules
    model = nnx.eval_shape(lambda: ddt.build_model(
        model_config(hidden_size=hidden, scan_blocks=scan), rngs=nnx.Rngs(0)))
    graphdef, params = weights.split_params(model)
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 4, 1), sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    param_shardings = sharding.logical_to_named(params, mesh, rules).to_pure_dict()
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params.to_pure_dict(), param_shardings)
    batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
    x = jax.ShapeDtypeStruct((8, side, side, 4), jnp.float32, sharding=batch)
    t = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=batch)
    y = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch)

    def loss(params, x, t, y):
        v, s, h = nnx.merge(graphdef, params)(x, t, y, feature_layer=1)
        return jnp.mean(v ** 2) + jnp.mean(h ** 2)

    step = jax.jit(jax.value_and_grad(loss), in_shardings=(param_shardings, batch, batch, batch),
                   out_shardings=(sharding.replicated(mesh), param_shardings))
    with jax.set_mesh(mesh):
        lowered = step.lower(abstract, x, t, y)
    assert "sharding_constraint" in lowered.as_text()   # layers.constrain_batch is in the graph
    return lowered.compile().as_text()


def assert_fsdp_collectives(hlo: str, hidden: int, tokens: int):
    ops = collectives(hlo)
    qkv = {hidden, 3 * hidden}   # the qkv kernel, split over fsdp on its embed dim
    # Forward: the weights are all-gathered (for the matmuls, and again in the backward).
    assert any(set(shape[-2:]) == qkv for _, shape in ops.get("all-gather", [])), ops
    # Backward: the f32 weight gradients are summed over the batch shards and scattered to their
    # fsdp shards: a reduce-scatter op, TPU's all-reduce-scatter fusion, or (CPU XLA, which has
    # no reduce-scatter) an all-reduce of the full gradient that each device dynamic-slices.
    scattered = [s for d, s in ops.get("reduce-scatter", []) if d == "f32"]
    fused = re.findall(r"%all-reduce-scatter\S* \(.*f32\[", hlo)
    reduced = [s for d, s in ops.get("all-reduce", []) if d == "f32" and set(s[-2:]) == qkv]
    assert scattered or fused or (reduced and "dynamic-slice" in hlo), ops
    # The hidden states (B, N, D) are never gathered or reduced: no collective of rank >= 3
    # has the token count among its dims.
    for op, shapes in ops.items():
        hidden_states = [s for _, s in shapes if len(s) >= 3 and tokens in s]
        assert not hidden_states, f"{op} of activations {hidden_states}"


@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_step_gathers_weights_not_activations(scan):
    """On the 8 CPU test devices (12x12 latents, patch 2: N = 36 tokens, no weight dim of 36)."""
    assert_fsdp_collectives(fsdp_step_hlo(jax.devices()[:8], scan), hidden=96, tokens=36)


def test_fsdp_step_on_a_tpu_slice_reduce_scatters():
    """The same step compiled for a v5e-8 slice from this host (needs libtpu, not a TPU): the
    gradients leave as f32 all-reduce-scatter fusions."""
    try:
        devices = tpu_topology.devices("v5e:2x4")
    except RuntimeError as e:
        pytest.skip(f"no TPU compiler: {e}")
    hlo = fsdp_step_hlo(devices, scan=True, hidden=128, side=12)
    assert re.search(r"%all-reduce-scatter\S* \(.*f32\[", hlo)
    assert_fsdp_collectives(hlo, hidden=128, tokens=36)
