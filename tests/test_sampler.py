"""Sampler parity with the official PyTorch samplers, the recompute DP, the skipped CFG work,
sharding (no activations moved between devices), bfloat16 compute, the throughput benchmark and
config checks.
"""
import importlib.util
import itertools
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from ddt_jax import convert
from ddt_jax import sampler as sampler_lib
from ddt_jax.models import ddt

from conftest import FIXTURES, OFFICIAL

SAMPLER = FIXTURES / "sampler"
REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_TOL = 1e-4   # whole trajectories, float32 (PROVENANCE.md)
SAME_TOL = 1e-5     # two of our own paths that must agree up to rounding
CONFIG_KEYS = ("num_steps", "guidance", "guidance_interval_min", "guidance_interval_max",
               "timeshift", "state_refresh_rate", "last_step", "solver", "order", "w_scheduler")
PARITY_CASES = ["official/ddt_tiny_euler_a", "official/ddt_tiny_euler_b", "euler_interval_k3",
                "euler_k4_shift", "euler_one_step", "sde_linear", "sde_mean_linear",
                "sde_preserve_const", "sde_const", "adams_o1", "adams_o2_k2", "adams_o3",
                "adams_o4", "sharing_dp"]


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def load_case(name):
    path = (OFFICIAL / f"{name.split('/')[1]}.npz" if name.startswith("official/")
            else SAMPLER / f"{name}.npz")
    return dict(np.load(path))


def config_of(ref):
    """The sampler config a reference file was made with (NaN last_step = None)."""
    config = {}
    for key in CONFIG_KEYS:
        if key in ref:
            value = ref[key].item()
            config[key] = None if isinstance(value, float) and math.isnan(value) else value
    if "recompute_steps" in ref:
        config["recompute_steps"] = [int(s) for s in ref["recompute_steps"]]
    return config


@pytest.fixture(scope="module")
def tiny():
    return convert.load_ddt(OFFICIAL / "ddt_tiny.safetensors", num_encoder_blocks=3, use_ema=False)


@pytest.fixture(scope="module")
def inputs():
    ref = load_case("official/ddt_tiny_euler_a")
    return nhwc(ref["noise"]), jnp.asarray(ref["y"])


def reference_loop(model, noise, labels, config, *, cfg=True):
    """A plain Euler ODE loop with the official semantics: no caching, no skipping,
    the model on [uncond, cond] at every step (only [cond] with cfg=False); torch's time grid."""
    n, last = config["num_steps"], config.get("last_step") or 1.0 / config["num_steps"]
    grid = torch.cat([torch.linspace(0.0, 1 - last, n), torch.tensor([1.0])])
    grid = (grid / (grid + (1 - grid) * config["timeshift"])).numpy()
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y)[0])
    b = noise.shape[0]
    y2 = jnp.concatenate([jnp.full((b,), model.num_classes), labels]) if cfg else labels
    x = noise
    for i in range(n):
        t = jnp.float32(grid[i])
        if cfg:
            out = forward(params, jnp.concatenate([x, x]), jnp.full((2 * b,), t), y2)
            u, c = out[:b], out[b:]
            inside = config["guidance_interval_min"] < grid[i] < config["guidance_interval_max"]
            v = u + (config["guidance"] if inside else 1.0) * (c - u)
        else:
            v = forward(params, x, jnp.full((b,), t), y2)
        x = x + v * jnp.float32(grid[i + 1] - grid[i])
    return np.asarray(x)


# ---------------------------------------------------------------- parity with the official code

@pytest.mark.parametrize("case", PARITY_CASES)
def test_matches_official_sampler(case, tiny):
    ref = load_case(case)
    config = config_of(ref)
    step_noise = (jnp.asarray(ref["step_noise"].transpose(0, 1, 3, 4, 2))
                  if "step_noise" in ref else None)
    x = sampler_lib.sample(tiny, nhwc(ref["noise"]), jnp.asarray(ref["y"]), config,
                           step_noise=step_noise)
    assert x.shape == nhwc(ref["noise"]).shape and x.dtype == jnp.float32
    np.testing.assert_allclose(nchw(x), ref["samples"], atol=SAMPLE_TOL, rtol=0)
    # Within one float32 ulp (torch's vectorised CPU linspace may round differently).
    if "timesteps" in ref:
        np.testing.assert_allclose(sampler_lib.time_grid(config), ref["timesteps"], atol=1.2e-7,
                                   rtol=0)


@pytest.mark.parametrize("case", ["adams_o1", "adams_o2_k2", "adams_o3", "adams_o4"])
def test_adams_coefficients_match_official(case):
    ref = load_case(case)
    coeffs = sampler_lib.adams_coefficients(sampler_lib.time_grid(config_of(ref)),
                                            int(ref["order"]))
    # The official weights are computed in float32 from differences of cubes and quartics (order
    # >= 3 loses up to ~2e-4 here, and overflows at 250 steps); ours are float64 and exact for
    # polynomials (next test). The samples still agree to 1e-5.
    np.testing.assert_allclose(coeffs, ref["solver_coeffs"], atol=5e-4, rtol=0)


def test_adams_coefficients_integrate_polynomials_exactly():
    grid = sampler_lib.time_grid(dict(num_steps=12, last_step=0.05, timeshift=2.0, solver="adams",
                                      order=4))
    for order in (1, 2, 3, 4):
        coeffs = sampler_lib.adams_coefficients(grid, order)
        np.testing.assert_allclose(coeffs.sum(1), 1.0, atol=1e-12)
        for i in range(order - 1, len(grid) - 1):  # full-order steps: exact for degree < order
            nodes = grid[i - order + 1:i + 1].astype(np.float64)
            a, b = float(grid[i]), float(grid[i + 1])
            for degree in range(order):
                exact = (b ** (degree + 1) - a ** (degree + 1)) / (degree + 1) / (b - a)
                assert abs(np.dot(coeffs[i], nodes ** degree) - exact) < 1e-9


# ---------------------------------------------------------------- caching, skipping, sharding

def test_refresh_rate_one_equals_no_caching(tiny, inputs):
    config = config_of(load_case("official/ddt_tiny_euler_a"))
    assert config["state_refresh_rate"] == 1
    x = sampler_lib.sample(tiny, *inputs, config)
    np.testing.assert_allclose(np.asarray(x), reference_loop(tiny, *inputs, config),
                               atol=SAME_TOL, rtol=0)


def test_guidance_one_equals_conditional_only(tiny, inputs):
    config = dict(num_steps=8, guidance=1.0, guidance_interval_min=0.0, guidance_interval_max=1.0,
                  timeshift=1.0, last_step=None, state_refresh_rate=1)
    program, _ = sampler_lib._make_plan(tiny, sampler_lib.read_config(config), skip_unused=True)
    assert program.modes == (sampler_lib.FULL_COND,) and not program.uncond_state
    x = np.asarray(sampler_lib.sample(tiny, *inputs, config))
    np.testing.assert_allclose(x, reference_loop(tiny, *inputs, config, cfg=False),
                               atol=SAME_TOL, rtol=0)


def test_skipped_unconditional_work_changes_nothing(tiny):
    # The interval opens between two recomputes and closes before 1: steps of every kind occur,
    # including a recompute outside the interval (step 3) whose state guided steps (4, 5) reuse.
    ref = load_case("euler_interval_k3")
    config = config_of(ref)
    program, tables = sampler_lib._make_plan(tiny, sampler_lib.read_config(config),
                                             skip_unused=True)
    modes = [program.modes[b] for b in tables["branch"]]
    assert modes == [sampler_lib.FULL_COND, sampler_lib.DEC_COND, sampler_lib.DEC_COND,
                     sampler_lib.FULL_CFG, sampler_lib.DEC_CFG, sampler_lib.DEC_CFG,
                     sampler_lib.FULL_CFG, sampler_lib.DEC_COND]
    assert tables["scale"][3] == 1.0 and tables["scale"][4] == config["guidance"]
    skipped = sampler_lib.sample(tiny, nhwc(ref["noise"]), jnp.asarray(ref["y"]), config)
    full = sampler_lib.sample(tiny, nhwc(ref["noise"]), jnp.asarray(ref["y"]), config,
                              skip_unused=False)
    np.testing.assert_allclose(np.asarray(skipped), np.asarray(full), atol=SAME_TOL, rtol=0)


def test_changing_numbers_reuses_the_compiled_program(tiny, inputs):
    base = config_of(load_case("official/ddt_tiny_euler_b"))
    sampler_lib.sample(tiny, *inputs, base)
    size = sampler_lib._run_jit._cache_size()
    # Other guidance, shift, last step, same kinds of step: same program.
    x = sampler_lib.sample(tiny, *inputs,
                           {**base, "guidance": 4.0, "timeshift": 2.0, "last_step": 0.1})
    assert sampler_lib._run_jit._cache_size() == size
    assert np.isfinite(np.asarray(x)).all()


def test_loop_does_not_unroll_with_num_steps(tiny, inputs):
    def hlo_size(num_steps):
        c = sampler_lib.read_config(dict(num_steps=num_steps, state_refresh_rate=2,
                                         guidance_interval_min=0.0))
        program, tables = sampler_lib._make_plan(tiny, c, skip_unused=True)
        graphdef, params = nnx.split(tiny)
        tables = {k: jnp.asarray(v) for k, v in tables.items()}
        return len(sampler_lib._run_jit.lower(graphdef, program, params, tables, inputs[0],
                                              inputs[1], None, None)
                   .as_text())
    small, large = hlo_size(4), hlo_size(200)
    assert abs(large - small) < 0.01 * small


SHARDED_CONFIG = dict(num_steps=6, solver="sde", guidance=2.0, guidance_interval_min=-1.0,
                      guidance_interval_max=2.0, last_step=0.04, state_refresh_rate=2)


@pytest.fixture(scope="module")
def batch8():
    noise = jax.random.normal(jax.random.key(3), (8, 16, 16, 4))
    labels = jnp.arange(8, dtype=jnp.int32) % 11  # includes the null class 10
    return noise, labels


def test_sharded_sampling_equals_single_device(tiny, batch8):
    # An SDE run, so the per-step noise drawn under sharding is checked too.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    noise, labels = batch8
    key = jax.random.key(5)
    single = sampler_lib.sample(tiny, noise, labels, SHARDED_CONFIG, key=key)
    sharded = sampler_lib.sample(tiny, jax.device_put(noise, batch),
                                 jax.device_put(labels, batch), SHARDED_CONFIG, key=key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=SAME_TOL, rtol=0)


def test_sde_key_draws_match_explicit_noise(tiny, batch8):
    noise, labels = batch8
    key = jax.random.key(5)
    x = sampler_lib.sample(tiny, noise, labels, SHARDED_CONFIG, key=key)
    again = sampler_lib.sample(tiny, noise, labels, SHARDED_CONFIG, key=key)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(again))
    draws = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), noise.shape)
                       for i in range(SHARDED_CONFIG["num_steps"] - 1)])
    explicit = sampler_lib.sample(tiny, noise, labels, SHARDED_CONFIG, step_noise=draws)
    np.testing.assert_allclose(np.asarray(x), np.asarray(explicit), atol=SAME_TOL, rtol=0)
    other = sampler_lib.sample(tiny, noise, labels, SHARDED_CONFIG, key=jax.random.key(8))
    assert np.abs(np.asarray(other) - np.asarray(x)).max() > 1e-2


# A compiled collective op (also the async "-start" forms), as in `%all-to-all.7 = ... all-to-all(`.
COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|"
                        r"collective-broadcast)(-start)?\(")


def test_sharded_cfg_moves_no_activations_between_devices(tiny, batch8):
    # The interval opens between two recomputes: all four kinds of step, CFG ones included.
    config = dict(num_steps=6, guidance=2.0, guidance_interval_min=0.3, state_refresh_rate=2)
    program, tables = sampler_lib._make_plan(tiny, sampler_lib.read_config(config),
                                             skip_unused=True)
    assert program.modes == (sampler_lib.FULL_CFG, sampler_lib.FULL_COND, sampler_lib.DEC_CFG,
                             sampler_lib.DEC_COND)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    noise, labels = batch8
    noise_s, labels_s = jax.device_put(noise, batch), jax.device_put(labels, batch)
    graphdef, params = nnx.split(tiny)
    tables = {k: jnp.asarray(v) for k, v in tables.items()}
    with jax.set_mesh(mesh):   # traced under the mesh, as sample.py samples
        hlo = sampler_lib._run_jit.lower(graphdef, program, params, tables, noise_s, labels_s,
                                         None, None).compile().as_text()
        sharded = sampler_lib.sample(tiny, noise_s, labels_s, config)
        states = sampler_lib.calibrate(tiny, noise_s, labels_s, config)
    # Samples are independent and the params replicated, so no step needs another device's rows.
    # A (2B,) concatenate of the CFG halves did: it all-gathered t and all-to-all'ed x and the
    # states at every step.
    moved = [line.strip()[:160] for line in hlo.splitlines() if COLLECTIVE.search(line)]
    assert not moved, moved
    assert len(sharded.sharding.device_set) == 8
    single = sampler_lib.sample(tiny, noise, labels, config)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=SAME_TOL, rtol=0)
    single_states = sampler_lib.calibrate(tiny, noise, labels, config)
    assert states.shape == single_states.shape == (6, 16, 64, 64)   # (steps, 2B, tokens, hidden)
    np.testing.assert_allclose(np.asarray(states), np.asarray(single_states), atol=SAME_TOL,
                               rtol=0)


def test_bfloat16_compute_stays_close_and_integrates_in_float32(tiny, inputs):
    bf16 = convert.load_ddt(OFFICIAL / "ddt_tiny.safetensors", num_encoder_blocks=3,
                            use_ema=False, dtype="bfloat16")
    config = dict(num_steps=10, state_refresh_rate=2)   # the official CFG settings otherwise
    noise, labels = inputs
    x32 = np.asarray(sampler_lib.sample(tiny, noise, labels, config), np.float64)
    x16 = sampler_lib.sample(bf16, noise, labels, config)
    assert x16.dtype == jnp.float32
    rel = np.sqrt(np.mean((np.asarray(x16, np.float64) - x32) ** 2)) / x32.std()
    # Far above float32 rounding (bf16 did run), far below the sample spread.
    assert 1e-4 < rel < 0.05, rel
    # The loop carries x in float32 even for bfloat16 noise and matmuls.
    program, tables = sampler_lib._make_plan(bf16, sampler_lib.read_config(config),
                                             skip_unused=True)
    graphdef, params = nnx.split(bf16)
    jaxpr = jax.make_jaxpr(sampler_lib._run, static_argnums=(0, 1))(
        graphdef, program, params, {k: jnp.asarray(v) for k, v in tables.items()},
        noise.astype(jnp.bfloat16), labels, None, None)
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    x_carry = scan.outvars[0].aval
    assert x_carry.shape == noise.shape and x_carry.dtype == jnp.float32


def test_throughput_benchmark_runs_and_projects(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "sample_throughput", REPO / "benchmarks" / "sample_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "throughput.json"
    results = bench.main(["--hidden_size=64", "--num_heads=4", "--num_blocks=2",
                          "--num_encoder_blocks=1", "--image_size=8", "--batch_size=8",
                          "--num_steps=2", "--repeats=1", f"--json={path}"])
    rows = results["rows"]
    assert [r["K"] for r in rows] == [1, 2, 4, 8]
    for r in rows:
        assert r["compile_s"] >= 0
        for name in ("call_s", "images_per_s", "plan_fit", "projected_call_s",
                     "projected_images_per_s", "dump_hours", "dump_device_hours",
                     "speedup_measured", "speedup_projected"):
            assert r[name] > 0 and math.isfinite(r[name]), (r["K"], name)
        assert sum(r["counts_target"].values()) == 250 and sum(r["counts_measured"].values()) == 2
    # Reuse skips encoder runs at 250 steps: fewer full steps, so more projected images/s.
    assert rows[-1]["counts_target"]["enc+dec CFG"] < rows[0]["counts_target"]["enc+dec CFG"]
    assert all(s > 0 for s in results["step_s"].values()) and len(results["step_s"]) == 4
    table = [line for line in capsys.readouterr().out.splitlines()
             if re.match(r"\| [1248] \|", line)]
    assert len(table) == 4 and all(line.count("|") == 12 for line in table)
    assert json.loads(path.read_text())["rows"][0]["K"] == 1


def test_dit_baseline_samples_without_state(inputs):
    cfg = ddt.default_model_config()
    # The tiny DDT's widths, so building reuses the initialisers already compiled for it.
    cfg.update(arch="dit", variant="S/2", hidden_size=64, num_heads=4, num_blocks=4,
               num_classes=10, image_size=16)
    model = ddt.build_model(cfg, rngs=nnx.Rngs(0))
    config = dict(num_steps=4, guidance=2.0, guidance_interval_min=0.3, guidance_interval_max=1.0,
                  last_step=None)
    x = sampler_lib.sample(model, *inputs, config)
    np.testing.assert_allclose(np.asarray(x),
                               reference_loop(model, *inputs, {**config, "timeshift": 1.0}),
                               atol=SAME_TOL, rtol=0)
    with pytest.raises(ValueError, match="no encoder state"):
        sampler_lib.sample(model, *inputs, {**config, "state_refresh_rate": 2})
    with pytest.raises(ValueError, match="DDT"):
        sampler_lib.calibrate(model, *inputs, config)


# ---------------------------------------------------------------- the recompute DP

def brute_force_cost(states, steps):
    """Total error of a schedule, straight from the definition (float64 cosine, per token)."""
    s = np.asarray(states, np.float64)
    s = s / np.linalg.norm(s, axis=-1, keepdims=True)
    n = s.shape[0]
    total = 0.0
    bounds = list(steps) + [n]
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            total += 1.0 - np.mean(np.sum(s[i] * s[start], axis=-1))
    return total


def test_dp_equals_brute_force():
    rng = np.random.default_rng(0)
    n = 9
    states = np.cumsum(rng.normal(size=(n, 2, 5, 4)) * rng.uniform(0.1, 1.5, (n, 1, 1, 1)), axis=0)
    for r in range(1, n + 1):
        steps = sampler_lib.solve_recompute_steps(states, r)
        assert len(steps) == r and steps[0] == 0 and steps == sorted(set(steps))
        best = min(brute_force_cost(states, (0,) + rest)
                   for rest in itertools.combinations(range(1, n), r - 1))
        assert brute_force_cost(states, steps) == pytest.approx(best, abs=1e-12)


def test_dp_hand_checked_case():
    # Steps 0-2 share one direction, 3-5 an orthogonal one: two recomputes belong at 0 and 3 (zero
    # error); any further recompute is free too, and the official scan keeps the earliest of equals.
    a, b = np.eye(4)[0], np.eye(4)[1]
    states = np.stack([a, a, a, b, b, b])[:, None, None, :]
    assert sampler_lib.solve_recompute_steps(states, 1) == [0]
    assert sampler_lib.solve_recompute_steps(states, 2) == [0, 3]
    # Ties are broken to the earliest step.
    assert sampler_lib.solve_recompute_steps(states, 3) == [0, 1, 3]
    assert sampler_lib.solve_recompute_steps(states, 6) == [0, 1, 2, 3, 4, 5]


def test_dp_matches_official_on_random_states():
    ref = dict(np.load(SAMPLER / "dp_random.npz"))
    for seed in range(3):
        states = ref[f"states_{seed}"]
        for r in range(1, states.shape[0] + 1):
            expected = ref[f"steps_{seed}_{r}"].tolist()
            assert sampler_lib.solve_recompute_steps(states, r) == expected, (seed, r)


def test_calibrate_and_dp_match_official_sharing_sampler(tiny, tmp_path):
    ref = load_case("sharing_dp")
    config = {k: v for k, v in config_of(ref).items() if k != "recompute_steps"}
    states = sampler_lib.calibrate(tiny, nhwc(ref["noise"]), jnp.asarray(ref["y"]), config)
    assert states.shape == ref["states"].shape  # (num_steps, 2B [uncond, cond], tokens, hidden)
    np.testing.assert_allclose(np.asarray(states), ref["states"], atol=SAMPLE_TOL, rtol=0)
    for r in range(1, config["num_steps"] + 1):
        assert sampler_lib.solve_recompute_steps(states, r) == ref[f"dp_{r}"].tolist(), r
    path = tmp_path / "schedule.json"
    sampler_lib.save_schedule(path, ref["recompute_steps"].tolist())
    assert sampler_lib.load_schedule(path) == ref["recompute_steps"].tolist()
    assert json.loads(path.read_text()) == {"recompute_steps": ref["recompute_steps"].tolist()}


def test_schedule_file_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"recompute_steps": [1, 2]}))
    with pytest.raises(ValueError, match="starting at 0"):
        sampler_lib.load_schedule(path)
    path.write_text(json.dumps([0, 1]))
    with pytest.raises(ValueError, match="recompute_steps"):
        sampler_lib.load_schedule(path)
    with pytest.raises(ValueError, match="starting at 0"):
        sampler_lib.save_schedule(path, [0, 3, 3])
    with pytest.raises(ValueError, match="num_recompute"):
        sampler_lib.solve_recompute_steps(np.ones((4, 1, 2, 3)), 5)


# ---------------------------------------------------------------- bad input

def test_default_config_is_the_official_xl_setting():
    c = sampler_lib.default_sampler_config()
    assert isinstance(c, ml_collections.ConfigDict)
    assert (c.num_steps, c.guidance, c.guidance_interval_min, c.guidance_interval_max,
            c.last_step) == (250, 2.0, 0.3, 1.0, 0.04)
    c.recompute_steps = [0, 5]
    assert sampler_lib.read_config(c)["recompute_steps"] == [0, 5]


@pytest.mark.parametrize("override, match", [
    (dict(state_refresh_rate=0), "state_refresh_rate"),
    (dict(state_refresh_rate=1.5), "state_refresh_rate"),
    (dict(guidance_interval_min=0.8, guidance_interval_max=0.2), "inverted"),
    (dict(solver="adams", last_step=None), "explicit last_step"),
    (dict(solver="heun"), "solver"),
    (dict(num_steps=0), "num_steps"),
    (dict(last_step=1.0), "last_step"),
    (dict(timeshift=0.0), "timeshift"),
    (dict(order=5), "order"),
    (dict(w_scheduler="gvp"), "w_scheduler"),
    (dict(recompute_steps=[1, 3]), "step 0"),
    (dict(recompute_steps=[0, 8]), r"\[0, 8\)"),
    (dict(cfg_scale=2.0), "unknown sampler option"),
])
def test_bad_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        sampler_lib.read_config({"num_steps": 8, **override})


def test_bad_inputs_raise(tiny, inputs):
    noise, labels = inputs
    config = dict(num_steps=2)
    with pytest.raises(ValueError, match="NCHW"):
        sampler_lib.sample(tiny, noise.transpose(0, 3, 1, 2), labels, config)
    with pytest.raises(ValueError, match="NHWC"):
        sampler_lib.sample(tiny, noise[0], labels, config)
    with pytest.raises(ValueError, match="divisible"):
        sampler_lib.sample(tiny, noise[:, :15, :15], labels, config)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        sampler_lib.sample(tiny, noise, labels.at[0].set(11), config)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        sampler_lib.sample(tiny, noise, labels.at[0].set(-1), config)
    with pytest.raises(ValueError, match="shape"):
        sampler_lib.sample(tiny, noise, labels[:2], config)
    with pytest.raises(TypeError, match="integers"):
        sampler_lib.sample(tiny, noise, labels.astype(jnp.float32), config)
    with pytest.raises(ValueError, match="key"):
        sampler_lib.sample(tiny, noise, labels, dict(config, solver="sde"))
    with pytest.raises(ValueError, match="step_noise"):
        sampler_lib.sample(tiny, noise, labels, dict(config, solver="sde"),
                           step_noise=jnp.zeros((2,) + noise.shape))
