"""The one DDT/DiT sampler: Euler ODE/SDE and Adams multistep, CFG with an interval, time shift,
and reuse of DDT's encoder state (uniform or dynamic-programming recompute schedules).

The options keep the official names (stateful_flow_matching `EulerSampler`, `AdamLMSampler`); they
are listed in `default_sampler_config`.

Work the official loop does that we skip (results equal the official ones up to float rounding):
  * Outside the guidance interval (and everywhere when guidance == 1) the official code still runs
    the model on [uncond, cond] and returns u + 1.0 * (c - u) = c. We run the conditional half only.
    That is exact because every sample in the batch is independent (attention and norms act within
    a sample), so c does not depend on the unconditional half; u + (c - u) differs from c by at most
    one float32 rounding.
  * The cached unconditional encoder state is still needed when a step *inside* the interval reuses
    a state recomputed *outside* it (the interval starts between two recomputes). So at a recompute
    step we run the encoder on the doubled batch iff some step that will reuse this state applies
    guidance; otherwise only on the conditional half, and the stale unconditional half is never read
    before the next recompute. The doubled-batch recompute then runs the whole model on both halves
    (the model has no encoder-only call), one extra unconditional decoder pass at most per entry
    into the interval.
  * When no step applies guidance, the unconditional state is not even allocated.
Everything is decided on the host from the static config, so the jitted loop picks one of at most
four branches per step with `lax.switch`: steps that reuse the state really skip the encoder, and
compile time does not grow with num_steps. `sample(..., skip_unused=False)` runs the official
doubled-batch work at every step (for checking the above).

The doubled batch [uncond, cond] is a new leading axis of size 2 that the model is vmapped over,
with the cached encoder states stacked the same way as (2, B, tokens, hidden), not a concatenate
along the batch axis: a batch sharded over devices stays on its devices (the compiled loop has no
collectives), and what both halves share (x, t: the patch and timestep embeddings) runs once.

The model's compute dtype (`config.model.dtype`, e.g. bfloat16) applies inside the model calls;
the state x, the CFG combination and the integration stay float32.

Numerics follow the official float32 torch code: the time grid is built in float32 as torch's
linspace does on the GPU (its vectorised CPU kernel can differ by one ulp at a few points), the
Adams time is the running float32 sum of the step widths as in the official loop, and the SDE score
uses the official scheduler formula. Adams coefficients are computed in float64 (the official code
computes them in float32, which loses accuracy for order >= 3 at hundreds of steps).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ddt_jax import files

SOLVERS = ("euler", "sde", "sde_mean", "sde_preserve", "adams")
SDE_SOLVERS = ("sde", "sde_mean", "sde_preserve")
NOISY_SOLVERS = ("sde", "sde_preserve")  # draw fresh Gaussian noise every step
W_SCHEDULERS = ("linear", "const")
MAX_ADAMS_ORDER = 4  # the official Lagrange pre-integration goes up to order 4

# Per-step work, decided on the host (see the module docstring).
FULL_CFG = 0    # encoder + decoder on [uncond, cond]
FULL_COND = 1   # encoder + decoder on the conditional half
DEC_CFG = 2     # decoder alone on [uncond, cond] with the cached doubled-batch state
DEC_COND = 3    # decoder alone on the conditional half


def default_sampler_config() -> ml_collections.ConfigDict:
    """Sampler section of every config: the official DDT-XL/2 256px settings (FID 1.26).

    The options, with the official names:

        num_steps            N; time grid linspace(0, 1 - last_step, N) then 1.0, shifted by
        timeshift            t -> t / (t + (1 - t) * timeshift)
        last_step            width of the final step before the shift; None = 1/N (Euler only;
                             the official Adams sampler has no default, so "adams" needs it
                             explicitly)
        guidance             CFG scale on the batch [uncond, cond]: v = u + g * (c - u), applied
        guidance_interval_*  only where min < t < max strictly (compared in float32, as torch does)
        state_refresh_rate   K: the encoder runs at steps i with i % K == 0, the decoder alone
                             reuses the cached state otherwise (DDT only)
        recompute_steps      explicit recompute steps (must contain 0), e.g. from
                             solve_recompute_steps; when given it replaces the i % K rule, as in
                             the official sharing sampler
        solver               "euler" (ODE), "sde", "sde_mean", "sde_preserve" (the official step
                             functions; the final step is always the ODE step), or "adams"
        order                Adams-Bashforth order 1-4 (Lagrange pre-integration on the time grid)
        w_scheduler          SDE diffusion weight w(t): "linear" = 1 - t (the official
                             LinearScheduler's sigma, used by the official configs), "const" = 1
    """
    return ml_collections.ConfigDict(dict(
        num_steps=250,
        guidance=2.0,                  # the 512px config uses 3.0
        guidance_interval_min=0.3,     # CFG only where 0.3 < t < 1.0 (t = 0 is noise)
        guidance_interval_max=1.0,
        timeshift=1.0,
        last_step=0.04,                # None: 1/num_steps
        state_refresh_rate=1,          # 1: recompute the encoder every step (the paper's FID runs)
        recompute_steps=None,          # list of step indices from solve_recompute_steps
        solver="euler",
        order=2,                       # Adams only
        w_scheduler="linear",          # SDE solvers only
    ))


# ----------------------------------------------------------------------------------------------
# Config checking and the host-side plan
# ----------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def read_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
    """Validates a sampler config and fills in the defaults.

    Args:
      config: a ConfigDict or mapping with any of the options of `default_sampler_config`.

    Returns:
      A plain dict with every option; `recompute_steps`, when set, as a sorted list of ints.

    Raises:
      ValueError: for an unknown option or a value out of range (the message names it).
    """
    defaults = default_sampler_config().to_dict()
    items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(items) - set(defaults))
    if unknown:
        raise ValueError(f"unknown sampler option(s) {unknown}; known: {sorted(defaults)}")
    c = {**defaults, **items}
    n = c["num_steps"]
    if not _is_int(n) or n < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {n!r}")
    for name in ("guidance", "guidance_interval_min", "guidance_interval_max", "timeshift"):
        if not _is_real(c[name]) or not np.isfinite(c[name]):
            raise ValueError(f"{name} must be a finite number, got {c[name]!r}")
    if c["guidance_interval_min"] > c["guidance_interval_max"]:
        raise ValueError("guidance interval is inverted: "
                         f"guidance_interval_min={c['guidance_interval_min']} > "
                         f"guidance_interval_max={c['guidance_interval_max']}")
    if c["timeshift"] <= 0:
        raise ValueError(f"timeshift must be > 0, got {c['timeshift']}")
    if c["solver"] not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {c['solver']!r}")
    if c["w_scheduler"] not in W_SCHEDULERS:
        raise ValueError(f"w_scheduler must be one of {W_SCHEDULERS}, got {c['w_scheduler']!r}")
    if not _is_int(c["order"]) or not 1 <= c["order"] <= MAX_ADAMS_ORDER:
        raise ValueError(f"order must be an integer in [1, {MAX_ADAMS_ORDER}], "
                         f"got {c['order']!r}")
    last = c["last_step"]
    if last is None:
        if c["solver"] == "adams":
            # The official AdamLMSampler reads self.last_step without ever setting a default.
            raise ValueError("solver 'adams' needs an explicit last_step (e.g. 0.04); "
                             "it has no default")
    elif not _is_real(last) or not 0.0 < last < 1.0:
        raise ValueError(f"last_step must be None or in (0, 1), got {last!r}")
    k = c["state_refresh_rate"]
    if not _is_int(k) or k < 1:
        raise ValueError(f"state_refresh_rate must be an integer >= 1, got {k!r}")
    steps = c["recompute_steps"]
    if steps is not None:
        steps = list(steps)
        if not all(_is_int(s) for s in steps):
            raise ValueError(f"recompute_steps must be integers, got {steps!r}")
        steps = [int(s) for s in steps]
        if len(set(steps)) != len(steps) or any(not 0 <= s < n for s in steps):
            raise ValueError(f"recompute_steps must be distinct step indices in [0, {n}), "
                             f"got {steps}")
        if 0 not in steps:
            raise ValueError("recompute_steps must contain step 0 (no encoder state exists "
                             f"before it), got {steps}")
        c["recompute_steps"] = sorted(steps)
    return c


def time_grid(config) -> np.ndarray:
    """The official (N + 1,) float32 time grid: linspace(0, 1 - last_step, N), then 1.0, shifted."""
    c = read_config(config)
    n = c["num_steps"]
    last = c["last_step"]
    if c["solver"] != "adams" and (last is None or n == 1):
        last = 1.0 / n  # the official EulerSampler's rule (a single step spans [0, 1])
    end = np.float32(1.0 - last)
    if n == 1:
        lin = np.zeros(1, np.float32)
    else:
        # torch.linspace in float32: step from the float32 end points, filled from both ends.
        step = np.float32(end / np.float32(n - 1))
        idx = np.arange(n)
        lin = np.where(idx < n // 2, step * idx.astype(np.float32),
                       end - step * (n - 1 - idx).astype(np.float32)).astype(np.float32)
    t = np.concatenate([lin, np.ones(1, np.float32)])
    shift = np.float32(c["timeshift"])
    return (t / (t + (np.float32(1.0) - t) * shift)).astype(np.float32)


def adams_coefficients(grid: np.ndarray, order: int) -> np.ndarray:
    """(N, order) Adams weights: step i integrates the Lagrange polynomial through the last
    min(order, i + 1) velocities over [grid[i], grid[i + 1]], normalised to sum to 1 as the
    official pre-integration does. Oldest first; leading zeros pad the first steps."""
    grid = np.asarray(grid, np.float64)
    n = len(grid) - 1
    out = np.zeros((n, order), np.float64)
    for i in range(n):
        o = min(order, i + 1)
        # Integrate in u = t - grid[i]: no cancellation between O(1) terms when steps are small.
        nodes = grid[i - o + 1:i + 1] - grid[i]
        h = grid[i + 1] - grid[i]
        ints = []
        for k in range(o):
            others = np.delete(nodes, k)
            poly = np.polynomial.polynomial.polyfromroots(others) / np.prod(nodes[k] - others)
            prim = np.polynomial.polynomial.polyint(poly)
            ints.append(np.polynomial.polynomial.polyval(h, prim))
        out[i, order - o:] = np.asarray(ints) / np.sum(ints)
    return out


@dataclasses.dataclass(frozen=True)
class _Program:
    """The static part of a run: with the input shapes, the key of the jit cache.

    Per-step numbers (times, CFG scales, which branch) travel as arrays, so configs that differ
    only in them (guidance, interval, shift, refresh rate with the same kinds of step) share one
    program.
    """
    kind: str                       # "euler", "sde" (the three SDE steps) or "adams"
    noisy: bool                     # draws Gaussian noise every step
    decoupled: bool
    null_class: int
    modes: tuple[int, ...]          # the kinds of step used (FULL_CFG..DEC_COND), in branch order
    collect_states: bool = False

    @property
    def uncond_state(self) -> bool:
        return self.decoupled and any(m in (FULL_CFG, DEC_CFG) for m in self.modes)


def _recompute_flags(c: dict) -> list[bool]:
    n = c["num_steps"]
    if c["recompute_steps"] is not None:
        steps = set(c["recompute_steps"])
        return [i in steps for i in range(n)]
    return [i % c["state_refresh_rate"] == 0 for i in range(n)]


def _sde_tables(t: np.ndarray, dt: np.ndarray, c: dict) -> dict[str, np.ndarray]:
    """Host float32 terms of the official SDE steps for the linear interpolant x_t = t x + (1-t) e:

        x + v dt + k * score * w * dt + noise_scale * eps,   score = (a v - x) / denom

    with a = 1/(dalpha/alpha) and denom = sigma^2 - a * dsigma*sigma as the official code writes
    them (at t = 0, a = 1/inf = 0 and the score is -x); k = 0.5 and noise_scale = sqrt(w dt) for
    "sde_preserve", k = 1 and sqrt(2 w dt) for "sde", no noise for "sde_mean". The final step is the
    official ODE last step: w = 0 and no noise there.
    """
    one = np.float32(1.0)
    with np.errstate(divide="ignore"):
        dalpha_over_alpha = one / t
        a = one / dalpha_over_alpha
    sigma = one - t
    dsigma_mul_sigma = np.float32(-1.0) * sigma
    denom = sigma * sigma - a * dsigma_mul_sigma
    w = sigma.copy() if c["w_scheduler"] == "linear" else np.ones_like(t)
    w[-1] = 0.0
    if c["solver"] == "sde":
        noise_scale = np.sqrt(np.float32(2.0) * w * dt)
    elif c["solver"] == "sde_preserve":
        noise_scale = np.sqrt(w * dt)
    else:
        noise_scale = np.zeros_like(t)
    k = np.full_like(t, 0.5 if c["solver"] == "sde_preserve" else 1.0)
    return dict(a=a, denom=denom, w=w, k=k, noise_scale=noise_scale.astype(np.float32))


def _make_plan(model, c: dict, *, skip_unused: bool, all_recompute: bool = False,
               collect_states: bool = False) -> tuple[_Program, dict[str, np.ndarray]]:
    """Decides every step on the host: returns the static program and its per-step tables."""
    n = c["num_steps"]
    grid = time_grid(c)
    dt = (grid[1:] - grid[:-1]).astype(np.float32)
    if c["solver"] == "adams":
        # The official Adams loop feeds the model the running float32 sum of the step widths.
        t = np.zeros(n, np.float32)
        acc = np.float32(0.0)
        for i in range(n):
            t[i] = acc
            acc = np.float32(acc + dt[i])
    else:
        t = grid[:-1]
    # torch compares a float32 tensor with a python float in float32.
    inside = ((t > np.float32(c["guidance_interval_min"]))
              & (t < np.float32(c["guidance_interval_max"])))
    scale = np.where(inside, np.float32(c["guidance"]), np.float32(1.0)).astype(np.float32)
    needs_uncond = inside & (c["guidance"] != 1.0) if skip_unused else np.ones(n, bool)

    decoupled = bool(model.is_decoupled)
    recompute = [True] * n if (all_recompute or not decoupled) else _recompute_flags(c)
    modes = []
    for i in range(n):
        if recompute[i]:
            # The state made here serves steps i .. (next recompute - 1).
            end = next((j for j in range(i + 1, n) if recompute[j]), n)
            modes.append(FULL_CFG if needs_uncond[i:end].any() else FULL_COND)
        else:
            modes.append(DEC_CFG if needs_uncond[i] else DEC_COND)
    used = tuple(sorted(set(modes)))
    tables = dict(branch=np.asarray([used.index(m) for m in modes], np.int32), t=t, dt=dt,
                  scale=scale)
    kind = "adams" if c["solver"] == "adams" else "euler" if c["solver"] == "euler" else "sde"
    if kind == "adams":
        tables["coeffs"] = adams_coefficients(grid, c["order"]).astype(np.float32)
    elif kind == "sde":
        tables.update(_sde_tables(t, dt, c))
    program = _Program(kind=kind, noisy=c["solver"] in NOISY_SOLVERS and n > 1,
                       decoupled=decoupled, null_class=int(model.num_classes), modes=used,
                       collect_states=collect_states)
    return program, tables


# ----------------------------------------------------------------------------------------------
# The jitted loop
# ----------------------------------------------------------------------------------------------

def _branches(graphdef, program: _Program, labels):
    """One function per kind of step: (params, x, t, scale, states) -> (v, states).

    `states` is the cached encoder state: (2, B, tokens, hidden) over [uncond, cond] when some
    step applies guidance, else (1, B, tokens, hidden) holding the conditional half alone; None
    for the DiT baseline.
    """
    null = jnp.full_like(labels, program.null_class)
    labels2 = jnp.stack([null, labels])   # (2, B): the CFG halves on a new leading axis
    decoupled = program.decoupled

    def both_halves(params, x, t, s2=None):
        # The doubled batch as a vmap over the new leading axis, not a concatenate along the
        # batch: under a batch-sharded x a (2B,) concatenate puts rows on other devices than
        # their samples (XLA then moves activations between devices at every step); here each
        # half keeps x's layout. x and t are the same for both halves, so what depends on them
        # alone (patch and timestep embeddings) runs once.
        model = nnx.merge(graphdef, params)
        return jax.vmap(lambda y, s: model(x, t, y, s=s))(labels2, s2)

    def full_cfg(params, x, t, scale, states):
        v2, s2 = both_halves(params, x, t)
        u, c = v2[0], v2[1]
        return u + scale * (c - u), (s2 if decoupled else states)

    def full_cond(params, x, t, scale, states):
        v, s = nnx.merge(graphdef, params)(x, t, labels)
        # The unconditional half (if carried) goes stale: no step reads it before the next
        # recompute.
        return v, (states.at[-1].set(s) if decoupled else states)

    def dec_cfg(params, x, t, scale, states):
        v2, _ = both_halves(params, x, t, states)
        u, c = v2[0], v2[1]
        return u + scale * (c - u), states

    def dec_cond(params, x, t, scale, states):
        v, _ = nnx.merge(graphdef, params)(x, t, labels, s=states[-1])
        return v, states

    funcs = {FULL_CFG: full_cfg, FULL_COND: full_cond, DEC_CFG: dec_cfg, DEC_COND: dec_cond}
    return [funcs[m] for m in program.modes]


def _run(graphdef, program: _Program, params, tables, noise, labels, key, step_noise):
    x = noise.astype(jnp.float32)   # the state integrates in float32 whatever the model dtype
    b = x.shape[0]
    n = tables["t"].shape[0]
    branches = _branches(graphdef, program, labels)

    states = None
    if program.decoupled:
        s_shape = jax.eval_shape(
            lambda p, x_: nnx.merge(graphdef, p)(x_, jnp.zeros((b,)), labels)[1], params, x)
        halves = 2 if program.uncond_state else 1
        states = jnp.zeros((halves,) + s_shape.shape, s_shape.dtype)
    hist = None
    if program.kind == "adams":
        hist = jnp.zeros((tables["coeffs"].shape[1],) + x.shape, jnp.float32)  # oldest first

    def step(carry, i):
        x, states, hist = carry
        tab = {name: value[i] for name, value in tables.items()}
        dt = tab["dt"]
        v, states = jax.lax.switch(tab["branch"], branches, params, x,
                                   jnp.full((b,), tab["t"]), tab["scale"], states)
        if program.kind == "adams":
            hist = jnp.concatenate([hist[1:], v[None]])
            v = jnp.zeros_like(v)
            for j in range(hist.shape[0]):  # the official accumulation order, oldest first
                v = v + tab["coeffs"][j] * hist[j]
        x_next = x + v * dt
        if program.kind == "sde":
            score = (tab["a"] * v - x) / tab["denom"]
            x_next = x_next + tab["k"] * score * tab["w"] * dt
            if program.noisy:
                # The final step (an ODE step) has noise_scale 0; step_noise has no slot for it.
                eps = (step_noise[jnp.minimum(i, n - 2)].astype(jnp.float32)
                       if step_noise is not None
                       else jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32))
                x_next = x_next + tab["noise_scale"] * eps
        return (x_next, states, hist), (states if program.collect_states else None)

    (x, _, _), collected = jax.lax.scan(step, (x, states, hist), jnp.arange(n))
    # collect_states: (num_steps, 2, B, tokens, hidden); calibrate flattens the halves.
    return collected if program.collect_states else x


_run_jit = jax.jit(_run, static_argnums=(0, 1))


def _execute(model, program, tables, noise, labels, key=None, step_noise=None):
    graphdef, params = nnx.split(model)
    tables = {name: jnp.asarray(value) for name, value in tables.items()}
    return _run_jit(graphdef, program, params, tables, noise, labels, key, step_noise)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_model_inputs(model, noise, labels):
    for attr in ("is_decoupled", "num_classes", "in_channels", "patch_size"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a ddt_jax DDT/DiT module (missing `{attr}`), "
                            f"got {type(model).__name__}")
    shape = tuple(np.shape(noise))
    if len(shape) != 4:
        raise ValueError(f"noise must be NHWC (B, H, W, C), got shape {shape}")
    c = model.in_channels
    if shape[-1] != c:
        hint = "; it looks NCHW: use noise.transpose(0, 2, 3, 1)" if shape[1] == c else ""
        raise ValueError(f"noise has {shape[-1]} channels (last axis) but the model expects {c}: "
                         f"noise must be NHWC, got shape {shape}{hint}")
    p = model.patch_size
    if shape[1] % p or shape[2] % p:
        raise ValueError(f"noise size {shape[1]}x{shape[2]} is not divisible by the patch "
                         f"size {p}")
    if not jnp.issubdtype(jnp.result_type(noise), jnp.floating):
        raise TypeError(f"noise must be floating point, got {jnp.result_type(noise)}")
    if tuple(np.shape(labels)) != (shape[0],):
        raise ValueError(f"labels must have shape ({shape[0]},) to match the noise batch, "
                         f"got {np.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"labels must be integers, got {jnp.result_type(labels)}")
    # Range check on the host when every value is visible here (not for multi-host global arrays).
    if not isinstance(labels, jax.Array) or labels.is_fully_addressable:
        values = np.asarray(labels)
        if values.size and (values.min() < 0 or values.max() > model.num_classes):
            raise ValueError(f"labels must be in [0, {model.num_classes}] ({model.num_classes} = "
                             f"the null class), got values in [{values.min()}, {values.max()}]")
    return jnp.asarray(labels, jnp.int32)


def _check_reuse(model, c: dict):
    if not model.is_decoupled and (c["state_refresh_rate"] != 1
                                   or c["recompute_steps"] is not None):
        raise ValueError("the DiT baseline has no encoder state to reuse: use state_refresh_rate=1 "
                         "and recompute_steps=None")


def sample(model, noise, labels, config, key=None, *, step_noise=None, skip_unused: bool = True):
    """Samples x at t = 1 from `noise` at t = 0.

    Compiled once per (model structure, shapes, kinds of step); inputs may be sharded over the
    batch.

    Args:
      model: the NNX DDT or DiT (`v, s = model(x, t, y)`; `model(x, t, y, s=s)` runs the decoder
        alone).
      noise: (B, H, W, C) NHWC floating-point noise.
      labels: (B,) ints in [0, num_classes]; the null class `num_classes` is the unconditional
        label.
      config: a sampler config, ConfigDict or mapping (see `default_sampler_config`).
      key: a jax PRNG key; needed by the "sde" and "sde_preserve" solvers (step i draws from
        fold_in(key, i)).
      step_noise: instead of key, the Gaussian noise of every step but the final (ODE) one,
        (num_steps - 1, B, H, W, C): reproduces a trajectory recorded elsewhere.
      skip_unused: False runs the official's doubled-batch work at every step (see the module
        docstring).

    Returns:
      The samples, float32 (B, H, W, C).
    """
    c = read_config(config)
    labels = _check_model_inputs(model, noise, labels)
    _check_reuse(model, c)
    program, tables = _make_plan(model, c, skip_unused=skip_unused)
    if program.noisy:
        if step_noise is not None:
            want = (c["num_steps"] - 1,) + tuple(np.shape(noise))
            if tuple(np.shape(step_noise)) != want:
                raise ValueError(f"step_noise must have shape {want} (num_steps - 1, B, H, W, C), "
                                 f"got {np.shape(step_noise)}")
            key = None
        elif key is None:
            raise ValueError(f"solver {c['solver']!r} draws noise at every step: "
                             "pass key=jax.random.key(seed)")
    else:
        key = step_noise = None  # deterministic: nothing to draw
    return _execute(model, program, tables, noise, labels, key, step_noise)


def calibrate(model, noise, labels, config, key=None):
    """Encoder states at every step of a run that recomputes the encoder at every step.

    This is the statistic the official sharing sampler collects (it uses 8 random samples); feed
    it to `solve_recompute_steps`.

    Args:
      model: a DDT (the DiT baseline has no encoder state).
      noise: (B, H, W, C) NHWC floating-point noise, as for `sample`.
      labels: (B,) ints in [0, num_classes], as for `sample`.
      config: a sampler config; its state_refresh_rate and recompute_steps are ignored (every step
        recomputes, on the doubled CFG batch).
      key: a jax PRNG key, needed by the "sde" and "sde_preserve" solvers.

    Returns:
      The states, (num_steps, 2B, tokens, hidden) over the CFG batch [uncond, cond].
    """
    c = read_config(config)
    labels = _check_model_inputs(model, noise, labels)
    if not model.is_decoupled:
        raise ValueError("calibrate needs a DDT (model.is_decoupled): the DiT baseline has no "
                         "encoder state")
    program, tables = _make_plan(model, c, skip_unused=False, all_recompute=True,
                                 collect_states=True)
    if program.noisy and key is None:
        raise ValueError(f"solver {c['solver']!r} draws noise at every step: "
                         "pass key=jax.random.key(seed)")
    states = _execute(model, program, tables, noise, labels, key if program.noisy else None)
    # (num_steps, 2, B, ...) -> (num_steps, 2B, ...) [uncond, cond], outside the loop: once per
    # call, where the sampler itself never moves rows between devices.
    return states.reshape((states.shape[0], -1) + states.shape[3:])


def _cosine_similarity_matrix(states: np.ndarray, chunk_tokens: int = 4096) -> np.ndarray:
    """(N, N) mean over (batch, token) of the cosine similarity between steps, in float64."""
    n, dim = states.shape[0], states.shape[-1]
    flat = states.reshape(n, -1, dim)
    gram = np.zeros((n, n), np.float64)
    for start in range(0, flat.shape[1], chunk_tokens):  # bounded memory for XL-sized states
        u = flat[:, start:start + chunk_tokens].astype(np.float64)
        u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps
        u = u.reshape(n, -1)
        gram += u @ u.T
    return gram / flat.shape[1]


def solve_recompute_steps(states, num_recompute: int) -> list[int]:
    """The official dynamic programme: which `num_recompute` steps recompute the encoder.

    Step 0 always recomputes. error[i][j] = 1 - cos(state_i, state_j) averaged over tokens;
    reusing the state of step j up to step i costs sum_{k=j..i} error[k][j]; the DP minimises the
    total over the N steps and breaks ties towards the earliest step, as the official loop does.
    states: (N, batch, tokens, hidden).
    """
    states = np.asarray(states)
    if states.ndim < 2:
        raise ValueError(f"states must be (num_steps, ..., hidden), got shape {states.shape}")
    n = states.shape[0]
    if not _is_int(num_recompute) or not 1 <= num_recompute <= n:
        raise ValueError(f"num_recompute must be an integer in [1, {n}] (num_steps), "
                         f"got {num_recompute!r}")
    err = 1.0 - _cosine_similarity_matrix(states)
    # cum[i, j] (j <= i): error of serving steps j..i with the state computed at step j.
    cum = err.copy()
    for i in range(1, n):
        cum[i, :i] = cum[i - 1, :i] + err[i, :i]
    # cost[r, i]: best error of the first i steps with r recomputes; prev[r, i]: the last recompute.
    cost = np.full((num_recompute + 1, n + 1), np.inf)
    prev = np.full((num_recompute + 1, n + 1), -1, np.int64)
    cost[1, 1:] = cum[np.arange(n), 0]
    prev[1, 1:] = 0
    for r in range(2, num_recompute + 1):
        for i in range(r, n + 1):
            j = np.arange(r - 1, i)
            total = cost[r - 1, j] + cum[i - 1, j]
            best = int(np.argmin(total))  # first minimum = the official strict '<' scan
            cost[r, i], prev[r, i] = total[best], j[best]
    steps = [n]
    for r in range(num_recompute, 0, -1):
        steps.append(int(prev[r, steps[-1]]))
    return steps[::-1][:-1]


def save_schedule(path: str | os.PathLike, steps: Sequence[int]) -> None:
    """Writes recompute steps as JSON ({"recompute_steps": [...]}) for sample.py --schedule.

    Args:
      path: the file (local or gs://), written atomically.
      steps: increasing distinct step indices starting at 0.
    """
    steps = [int(s) for s in steps]
    if not steps or steps[0] != 0 or sorted(set(steps)) != steps:
        raise ValueError("a schedule is increasing distinct step indices starting at 0, "
                         f"got {steps}")
    files.atomic_write_text(path, json.dumps({"recompute_steps": steps}) + "\n")


def load_schedule(path: str | os.PathLike) -> list[int]:
    """Reads a schedule written by save_schedule (local or gs://); set it as
    config.recompute_steps."""
    data = json.loads(files.as_path(path).read_text())
    if not isinstance(data, dict) or "recompute_steps" not in data:
        raise ValueError(f"{path}: expected a JSON object with 'recompute_steps'")
    steps = data["recompute_steps"]
    if (not isinstance(steps, list) or not steps or not all(_is_int(s) for s in steps)
            or steps[0] != 0 or sorted(set(steps)) != steps):
        raise ValueError(f"{path}: recompute_steps must be increasing distinct integers starting "
                         f"at 0, got {steps}")
    return steps
