"""Mesh construction, logical-axis rules and batch placement on the 8 test CPU devices.

    .venv/bin/python -m pytest tests/test_sharding.py -q
"""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ddt_jax import sharding
from ddt_jax.models import ddt

RULES = (("rows", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
         ("heads", "tensor"), ("feature", "tensor"), ("classes", None), ("patch", None),
         ("freq", None), ("norm", None))


def mesh_config(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_shape_resolves_the_rest_and_rejects_bad_sizes():
    assert sharding.mesh_shape(mesh_config(-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.mesh_shape(mesh_config(2, -1, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(mesh_config(1, 8, 1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.mesh_shape(mesh_config(-1, 1, -1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(mesh_config(-1, 3, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape(mesh_config(2, 2, 1), 8)


def test_data_and_fsdp_auto_split_by_the_fsdp_widths():
    # XL's embed is 1152 = 2^7 * 9: FSDP over all of 256 chips would replicate every weight.
    assert sharding.auto_fsdp_size(256, [1152]) == 128
    assert sharding.mesh_shape(mesh_config(-1, -1, 1), 256, [1152, 4608]) == (2, 128, 1)
    assert sharding.mesh_shape(mesh_config(-1, -1, 1), 16, [1152]) == (1, 16, 1)
    assert sharding.mesh_shape(mesh_config(-1, -1, 2), 8, [12]) == (1, 4, 2)
    assert sharding.mesh_shape(mesh_config(-1, -1, 1), 8) == (1, 8, 1)   # no widths: all fsdp
    assert sharding.mesh_shape(mesh_config(-1, -1, 1), 6, [64]) == (3, 2, 1)


def test_replicated_weights_above_a_small_share_are_an_error_naming_the_fix():
    cfg = ddt.default_model_config()
    cfg.update(variant="S/2", hidden_size=36, num_heads=4, num_blocks=2, num_encoder_blocks=1,
               num_classes=10)
    state = nnx.state(nnx.eval_shape(lambda: ddt.build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    assert sharding.fsdp_widths(state, RULES)[-1] == 36
    with pytest.raises(ValueError, match=r"replicated .*embed=36 over \('fsdp',\)=8.*"
                                         r"--config.mesh.data=2 --config.mesh.fsdp=4"):
        sharding.check_replication_fallbacks(state, sharding.create_mesh(mesh_config(1, 8, 1)),
                                             RULES)
    auto = sharding.create_mesh(mesh_config(-1, -1, 1),
                                fsdp_widths=sharding.fsdp_widths(state, RULES))
    assert dict(auto.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    sharding.check_replication_fallbacks(state, auto, RULES)
    # The 11-row label table alone falls back (classes -> None here, embed over fsdp): tolerated.
    sharding.check_replication_fallbacks(state, sharding.create_mesh(mesh_config(2, 4, 1)), RULES)


def test_create_mesh_has_auto_axes():
    mesh = sharding.create_mesh(mesh_config(2, 4, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec():
    mesh = sharding.create_mesh(mesh_config(1, 4, 2))
    rules = sharding.rules_dict(RULES)
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh, rules) == P("fsdp", "tensor")
    # 1001 label rows do not divide over fsdp=4: that axis stays replicated.
    assert (sharding.logical_to_spec(("classes", "embed"), (1001, 64), mesh, rules)
            == P(None, "fsdp"))
    assert sharding.logical_to_spec(("embed", "mlp"), (66, 96), mesh, rules) == P(None, "tensor")
    # A mesh axis is used once per array: the second `embed` stays replicated.
    assert sharding.logical_to_spec(("embed", "embed"), (64, 64), mesh, rules) == P("fsdp", None)
    assert sharding.logical_to_spec(("rows", None), (16, 3), mesh, rules) == P("fsdp", None)
    with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
        sharding.logical_to_spec(("bogus",), (4,), mesh, rules)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.rules_dict((("embed", "model"),))


def test_model_params_get_shardings_from_their_logical_axes():
    cfg = ddt.default_model_config()
    cfg.update(variant="S/2", hidden_size=64, num_heads=4, num_blocks=3, num_encoder_blocks=2,
               num_classes=10)
    abstract = nnx.eval_shape(lambda: ddt.build_model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    mesh = sharding.create_mesh(mesh_config(2, 2, 2))
    shardings = sharding.logical_to_named(state, mesh, RULES).to_pure_dict()
    assert shardings["blocks"][0]["attn"]["qkv"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["blocks"][0]["mlp"]["w2"]["kernel"].spec == P("tensor", "fsdp")
    assert (shardings["y_embedder"]["embedding_table"]["embedding"].spec
            == P(None, "fsdp"))   # 11 rows
    assert shardings["blocks"][0]["norm1"]["weight"].spec == P(None)
    nbytes = sharding.bytes_per_device(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        state.to_pure_dict(), shardings))
    total = sum(x.size * 4 for x in jax.tree.leaves(state))
    assert total / 4 <= nbytes < total   # most bytes split over fsdp x tensor = 4


def test_host_to_global_and_batch_checks():
    mesh = sharding.create_mesh(mesh_config(2, 4, 1))
    assert sharding.check_batch_size(16, mesh) == 16
    with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
        sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        sharding.check_batch_size(8, sharding.create_mesh(mesh_config(1, 1, -1)), process_count=3)
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "label": np.arange(16, dtype=np.int32)}
    out = sharding.host_to_global(local, mesh)
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    assert out["x"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
    np.testing.assert_array_equal(np.asarray(out["label"]), local["label"])
