"""The training objective (ddt_jax/flow.py) against its definition and torch's reference ops.

    .venv/bin/python -m pytest tests/test_flow.py -q
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddt_jax import flow


def test_interpolant_endpoints_and_velocity():
    key = jax.random.key(0)
    x = jax.random.normal(key, (3, 4, 4, 2))
    eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    np.testing.assert_allclose(flow.interpolate(x, eps, jnp.zeros(3)), eps)      # t = 0 is noise
    np.testing.assert_allclose(flow.interpolate(x, eps, jnp.ones(3)), x)         # t = 1 is data
    t = jnp.array([0.1, 0.5, 0.9])
    x_t = flow.interpolate(x, eps, t)
    np.testing.assert_allclose(x_t[1], 0.5 * x[1] + 0.5 * eps[1], rtol=1e-6)
    # v is the derivative of x_t along t: a finite difference recovers it exactly on a straight
    # path.
    dt = 1e-2
    fd = (flow.interpolate(x, eps, t + dt) - x_t) / dt
    np.testing.assert_allclose(fd, flow.velocity_target(x, eps), atol=1e-3)


def test_t_samplers():
    key = jax.random.key(1)
    t = np.asarray(flow.sample_t(key, 200_000, "lognormal"))
    assert t.shape == (200_000,) and t.dtype == np.float32
    assert 0 < t.min() and t.max() < 1
    logit = np.log(t / (1 - t))
    assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1.0) < 0.01    # sigmoid(N(0, 1))
    shifted = np.asarray(flow.sample_t(key, 50_000, "lognormal", mean=-0.5, std=2.0))
    logit = np.log(shifted / (1 - shifted))
    assert abs(logit.mean() + 0.5) < 0.05 and abs(logit.std() - 2.0) < 0.05
    u = np.asarray(flow.sample_t(key, 200_000, "uniform"))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert flow.sample_t(key, (), "uniform").shape == ()
    with pytest.raises(ValueError, match="unknown t sampler"):
        flow.sample_t(key, 4, "beta")


def test_label_dropout_rate_and_null_class():
    labels = jnp.arange(100_000, dtype=jnp.int32) % 1000
    out = np.asarray(flow.drop_labels(jax.random.key(2), labels, 0.1, 1000))
    dropped = out == 1000
    assert abs(dropped.mean() - 0.1) < 0.005
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert out.dtype == np.int32
    np.testing.assert_array_equal(flow.drop_labels(jax.random.key(2), labels, 0.0, 1000), labels)


def test_flow_matching_loss_is_mean_over_all_elements():
    a = jnp.arange(24.0).reshape(2, 3, 2, 2)
    b = jnp.ones_like(a)
    assert float(flow.flow_matching_loss(a.astype(jnp.bfloat16), b)) == pytest.approx(
        float(np.mean((np.asarray(a) - 1) ** 2)), rel=1e-3)
    assert flow.flow_matching_loss(a, b).dtype == jnp.float32


def test_cosine_and_repa_loss_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 16, 8)).astype(np.float32)
    b = rng.standard_normal((2, 16, 8)).astype(np.float32)
    a[0, 0] = 0.0   # a zero vector: torch clamps the norm product to eps
    want = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b),
                                                 dim=-1).numpy()
    np.testing.assert_allclose(flow.cosine_similarity(jnp.asarray(a), jnp.asarray(b)), want,
                               atol=1e-6)
    loss = flow.repa_loss(jnp.asarray(a), jnp.asarray(b), height=4, width=4)
    assert float(loss) == pytest.approx(float(np.mean(1 - want)), abs=1e-6)


@pytest.mark.parametrize("src_hw,dst_tokens,hw", [
    ((4, 4), 64, (8, 8)),       # 2x up: a patch-1 model on DINOv2's 4x4 grid (the tiny config)
    ((16, 16), 64, (32, 32)),   # 2x down: 256px DINOv2 tokens for a patch-4 model
    ((16, 16), 1024, (64, 64)),  # 2x up
    ((2, 4), 32, (8, 16)),      # non-square
])
def test_target_resize_matches_torch_bilinear(src_hw, dst_tokens, hw):
    """The official code: view as a grid, F.interpolate(scale_factor=sqrt(N/M), bilinear,
    align_corners=False)."""
    torch = pytest.importorskip("torch")
    b, d = 2, 5
    m = src_hw[0] * src_hw[1]
    target = np.random.default_rng(1).standard_normal((b, m, d)).astype(np.float32)
    scale = (dst_tokens / m) ** 0.5
    grid = torch.from_numpy(target).view(b, *src_hw, d).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="bilinear",
                                           align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(b, -1, d).numpy()
    got = flow.resize_target_tokens(jnp.asarray(target), dst_tokens, *hw)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_target_resize_is_identity_when_counts_match_and_rejects_misfits():
    x = jnp.ones((1, 16, 3))
    assert flow.resize_target_tokens(x, 16, 8, 8) is x
    with pytest.raises(ValueError, match="cannot view"):
        flow.resize_target_tokens(jnp.ones((1, 15, 3)), 60, 8, 8)


def test_repa_loss_does_not_differentiate_the_target():
    a = jax.random.normal(jax.random.key(3), (2, 4, 8))
    b = jax.random.normal(jax.random.key(4), (2, 4, 8))
    g = jax.grad(lambda t: flow.repa_loss(a, t, height=2, width=2))(b)
    np.testing.assert_array_equal(g, 0.0)
