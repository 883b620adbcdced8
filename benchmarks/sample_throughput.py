"""Sampler throughput for FID dumps: compile time, call time, images/s and the projected time of a
50,000-image dump at state_refresh_rate K = 1, 2, 4, 8.

    python benchmarks/sample_throughput.py                        # S/2, 256px, batch 8, 10 steps
    python benchmarks/sample_throughput.py --variant=B/2 --batch_size=64 --num_steps=250
    python benchmarks/sample_throughput.py --dtype=bfloat16 --json=/tmp/throughput.json
    python benchmarks/sample_throughput.py --dtype_steps=10,50,250   # + float32 vs bfloat16 drift

The official sampler settings (Euler ODE, CFG 2.0 on 0.3 < t < 1, last_step 0.04, 250 steps) on a
DDT with random weights: the model's own init, with the zero-initialised final layer redrawn
(lecun normal) so that the velocity is not 0. The batch is split over all devices on a `data`
mesh, as sample.py splits it (one device when the device count does not divide the batch).

What is measured and what is projected:
  * compile s: trace + lower + compile of K's sampler program (`.lower().compile()`), timed
    apart from the calls. A K whose plan uses the same kinds of step as an earlier K shares its
    program, which sample() then finds in the jit cache: shown as 0 (K=...'s).
    Compile time does not grow with the step count (the loop is a lax.scan).
  * call s, images/s: median of --repeats calls at --num_steps after a warm-up call.
  * step s per kind: each of the four kinds of step (encoder + decoder on [uncond, cond] or on the
    conditional half; decoder alone on either) jitted alone and timed (median of --repeats calls,
    one dispatch each). Decoder-only steps skip the encoder blocks, CFG steps double the batch.
    The calls and the steps are timed round-robin, so a change in machine load hits all alike.
  * projected (--target_steps, default 250): the sampler's own plan at that step count counts each
    kind of step per K; projected call = measured call x (sum of count x step s at the target) /
    (the same sum at --num_steps). With --num_steps = --target_steps it is the measurement. The
    `plan fit` column (sum of count x step s at --num_steps / measured call) says how far the
    per-kind times are from the scan they sum to.
  * 50k dump: 50,000 / projected images/s, as wall hours and device-hours (x device count). The
    VAE decode, the noise draw and the file writes of a real dump are not included.

XLA on CPU usually runs bfloat16 matmuls through float32 (no faster): --dtype=bfloat16 timings
mean something on GPU/TPU only; its effect on the samples (--dtype_steps) is of a similar size
on any backend (bfloat16 operands and results, float32 accumulation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ddt_jax import host_memory

if __name__ == "__main__":
    # Before anything else runs: may re-execute this process with huge pages for XLA:CPU's
    # per-step temporaries (see ddt_jax/host_memory.py).
    host_memory.use_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ddt_jax import sampler as sampler_lib  # noqa: E402
from ddt_jax.models import ddt  # noqa: E402
from ddt_jax.models import layers  # noqa: E402

KIND_NAMES = {sampler_lib.FULL_CFG: "enc+dec CFG", sampler_lib.FULL_COND: "enc+dec cond",
              sampler_lib.DEC_CFG: "dec CFG", sampler_lib.DEC_COND: "dec cond"}
ALL_KINDS = tuple(sorted(KIND_NAMES))
DUMP_IMAGES = 50_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="S/2", help="SIZE/PATCH, e.g. S/2 or B/2")
    parser.add_argument("--num_encoder_blocks", type=int, default=None,
                        help="unset: the paper's split for the size")
    # Width overrides: the test builds a tiny model with them.
    parser.add_argument("--hidden_size", type=int, default=None)
    parser.add_argument("--num_heads", type=int, default=None)
    parser.add_argument("--num_blocks", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch")
    parser.add_argument("--num_steps", type=int, default=10, help="steps actually run")
    parser.add_argument("--target_steps", type=int, default=250, help="steps projected to")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--rates", default="1,2,4,8", help="state_refresh_rate values K")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per K and kind")
    parser.add_argument("--dtype", default="float32", choices=sorted(ddt.DTYPES),
                        help="model compute dtype (the sampler state is float32 always)")
    parser.add_argument("--attention", default="auto", choices=layers.ATTENTION_IMPLEMENTATIONS,
                        help="model.attention (auto: cuDNN flash on GPU in bfloat16, the splash "
                        "kernel on TPU, else xla)")
    parser.add_argument("--dtype_steps", default="",
                        help="comma-separated step counts: compare float32 and bfloat16 samples "
                             "of the same noise and labels (K = 1); empty: skip")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def build(args, dtype: str):
    """A random-weight DDT whose final layer is not zero (the same weights for every dtype)."""
    config = ddt.default_model_config()
    config.update(variant=args.variant, num_encoder_blocks=args.num_encoder_blocks,
                  hidden_size=args.hidden_size, num_heads=args.num_heads,
                  num_blocks=args.num_blocks, image_size=args.image_size, dtype=dtype,
                  attention=args.attention)
    model = ddt.build_model(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # The official zero init of the final layer gives v = 0 (nothing to sample or compare):
    # redraw its all-zero kernels; the zero biases stay.
    leaves = [jax.random.normal(k, a.shape, a.dtype) / np.sqrt(a.shape[0])
              if a.ndim == 2 and not np.any(np.asarray(a)) else a
              for k, a in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def sampler_config(args, rate: int, num_steps: int) -> dict:
    """The official settings (sampler.default_sampler_config) at K = rate and num_steps."""
    return {**sampler_lib.default_sampler_config().to_dict(), "num_steps": num_steps,
            "guidance": args.guidance, "state_refresh_rate": rate}


def plan_counts(model, config: dict) -> dict[int, int]:
    """How many steps of each kind the sampler's plan runs for `config`."""
    program, tables = sampler_lib._make_plan(model, sampler_lib.read_config(config),
                                             skip_unused=True)
    kinds = [program.modes[b] for b in tables["branch"]]
    return {kind: kinds.count(kind) for kind in ALL_KINDS}


def inputs(model, args, mesh):
    """Noise and labels, split over the mesh's `data` axis."""
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    shape = (args.batch_size, args.image_size, args.image_size, model.in_channels)
    noise = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    labels = jnp.arange(args.batch_size, dtype=jnp.int32) % model.num_classes
    return jax.device_put(noise, batch), jax.device_put(labels, batch)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compile_seconds(model, noise, labels, config: dict):
    """(the sampler's static program for `config`, seconds to trace, lower and compile it)."""
    program, tables = sampler_lib._make_plan(model, sampler_lib.read_config(config),
                                             skip_unused=True)
    graphdef, params = nnx.split(model)
    tables = {name: jnp.asarray(value) for name, value in tables.items()}
    start = time.perf_counter()
    sampler_lib._run_jit.lower(graphdef, program, params, tables, noise, labels, None,
                               None).compile()
    return program, time.perf_counter() - start


def step_functions(model, noise, labels) -> dict:
    """One zero-argument call per kind of step: the sampler's own branch code, jitted alone."""
    program = sampler_lib._Program(kind="euler", noisy=False, decoupled=True,
                                   null_class=int(model.num_classes), modes=ALL_KINDS)
    graphdef, params = nnx.split(model)
    branches = sampler_lib._branches(graphdef, program, labels)
    t = jnp.full((noise.shape[0],), 0.5, jnp.float32)
    _, s = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, t, labels))(params, noise)
    states = jnp.stack([s, s])
    calls = {}
    for kind, branch in zip(program.modes, branches):
        fn = jax.jit(branch)
        calls[kind] = lambda fn=fn: fn(params, noise, t, jnp.float32(2.0), states)
    return calls


def throughput(args, model, mesh) -> dict:
    """The K table: measured calls at --num_steps, projected to --target_steps."""
    rates = [int(r) for r in args.rates.split(",")]
    repeats = max(args.repeats, 1)
    noise, labels = inputs(model, args, mesh)
    configs = {k: sampler_config(args, k, args.num_steps) for k in rates}
    compile_s, shared, seen = {}, {}, {}
    for k in rates:
        program, seconds = compile_seconds(model, noise, labels, configs[k])
        if program in seen:   # sample() finds it in the jit cache: no compile
            compile_s[k], shared[k] = 0.0, seen[program]
        else:
            compile_s[k], seen[program] = seconds, k
        progress(f"K={k}: compile {compile_s[k]:.2f} s")
    run = lambda k: sampler_lib.sample(model, noise, labels, configs[k])
    steps = step_functions(model, noise, labels)
    for k in rates:
        progress(f"K={k}: warm-up call {timed(lambda: run(k)):.2f} s")
    for kind, call in steps.items():
        timed(call)   # compile + warm-up
    # Round-robin over K and the kinds of step, so a change in machine load hits all alike.
    times = {k: [] for k in rates}
    kind_times = {kind: [] for kind in steps}
    for r in range(repeats):
        for k in rates:
            times[k].append(timed(lambda: run(k)))
        for kind, call in steps.items():
            kind_times[kind].append(timed(call))
        progress(f"repeat {r + 1}: " + ", ".join(f"K={k} {times[k][-1]:.2f} s" for k in rates))
    per_kind = {kind: statistics.median(ts) for kind, ts in kind_times.items()}

    def plan_seconds(counts):
        return sum(counts[kind] * per_kind[kind] for kind in ALL_KINDS)

    rows = []
    for k in rates:
        call = statistics.median(times[k])
        measured_counts = plan_counts(model, configs[k])
        target_counts = plan_counts(model, sampler_config(args, k, args.target_steps))
        projected = call * plan_seconds(target_counts) / plan_seconds(measured_counts)
        speed = args.batch_size / projected
        dump_hours = DUMP_IMAGES / speed / 3600
        rows.append(dict(
            K=k, compile_s=compile_s[k], compile_shared_with=shared.get(k), call_s=call,
            images_per_s=args.batch_size / call, plan_fit=plan_seconds(measured_counts) / call,
            counts_measured={KIND_NAMES[kind]: n for kind, n in measured_counts.items()},
            counts_target={KIND_NAMES[kind]: n for kind, n in target_counts.items()},
            projected_call_s=projected, projected_images_per_s=speed,
            dump_hours=dump_hours, dump_device_hours=dump_hours * mesh.size))
    base = rows[0]
    for row in rows:
        row["speedup_measured"] = row["images_per_s"] / base["images_per_s"]
        row["speedup_projected"] = row["projected_images_per_s"] / base["projected_images_per_s"]
    return dict(rows=rows, step_s={KIND_NAMES[kind]: s for kind, s in per_kind.items()})


def dtype_drift(args, mesh) -> list[dict]:
    """float32 vs bfloat16 compute on the same weights, noise and labels (K = 1)."""
    steps = [int(n) for n in args.dtype_steps.split(",") if n.strip()]
    if not steps:
        return []
    model32, model16 = build(args, "float32"), build(args, "bfloat16")
    noise, labels = inputs(model32, args, mesh)
    out = []
    for n in steps:
        config = sampler_config(args, 1, n)
        x32 = np.asarray(sampler_lib.sample(model32, noise, labels, config), np.float64)
        x16 = np.asarray(sampler_lib.sample(model16, noise, labels, config), np.float64)
        diff = x16 - x32
        rms = np.sqrt(np.mean(diff ** 2))
        progress(f"float32 vs bfloat16 at {n} steps: rel RMS {rms / x32.std():.2e}")
        out.append(dict(
            num_steps=n, max_abs=float(np.abs(diff).max()), mean_abs=float(np.abs(diff).mean()),
            rel_rms_vs_spread=float(rms / x32.std()),
            # A random model moves the noise less than a trained one: relative to its move too.
            rel_rms_vs_move=float(rms / np.sqrt(np.mean((x32 - np.asarray(noise)) ** 2)))))
    return out


def print_tables(args, model, mesh, results: dict) -> None:
    n, target = args.num_steps, args.target_steps
    print(f"\n{args.variant} DDT ({model.num_encoder_blocks} encoder + "
          f"{model.num_blocks - model.num_encoder_blocks} decoder blocks, width "
          f"{model.hidden_size}), latent {args.image_size}x{args.image_size}x{model.in_channels} "
          f"({model.num_tokens(args.image_size, args.image_size)} tokens), batch "
          f"{args.batch_size} over {mesh.size} {jax.devices()[0].platform} device(s), "
          f"{args.dtype}, attention {args.attention} (runs as "
          f"{layers.resolve_attention(args.attention, ddt.DTYPES[args.dtype])}); Euler, CFG "
          f"{args.guidance} on 0.3 < t < 1, last_step 0.04")
    print("\nstep s per kind (each jitted alone): " + ", ".join(
        f"{name} {s:.4f}" for name, s in results["step_s"].items()))
    if n == target:
        p = ""
        print(f"\nMeasured at {n} steps (nothing projected).\n")
    else:
        p = "proj. "
        print(f"\nMeasured at {n} steps; 'proj.' columns: projected to {target} steps (measured "
              f"call x the plans' per-kind step-time sums at {target} / at {n}).\n")
    print(f"| K | compile s | call s ({n} st) | images/s ({n} st) | plan fit | "
          f"{p}call s ({target} st) | {p}images/s ({target} st) | {p}50k dump h | "
          f"{p}50k device-h | vs K=1 ({n} st) | {p}vs K=1 ({target} st) |")
    print("|---" * 11 + "|")
    for r in results["rows"]:
        compiled = (f"{r['compile_s']:.2f}" if r["compile_shared_with"] is None
                    else f"0 (K={r['compile_shared_with']}'s)")
        print(f"| {r['K']} | {compiled} | {r['call_s']:.3f} | {r['images_per_s']:.3f} "
              f"| {r['plan_fit']:.2f} | {r['projected_call_s']:.2f} | "
              f"{r['projected_images_per_s']:.4f} | {r['dump_hours']:.2f} | "
              f"{r['dump_device_hours']:.2f} | {r['speedup_measured']:.2f}x | "
              f"{r['speedup_projected']:.2f}x |")
    print(f"\nsteps per kind at {target} steps: " + "; ".join(
        f"K={r['K']}: " + ", ".join(f"{name} {c}" for name, c in r["counts_target"].items())
        for r in results["rows"]))
    if results["dtype_drift"]:
        print("\nbfloat16 vs float32 compute, same weights, noise and labels (K = 1); rel RMS = "
              "RMS(x_bf16 - x_f32) / std(x_f32), and / RMS(x_f32 - noise):\n")
        print("| steps | max abs | mean abs | rel RMS (spread) | rel RMS (move) |")
        print("|---" * 5 + "|")
        for d in results["dtype_drift"]:
            print(f"| {d['num_steps']} | {d['max_abs']:.2e} | {d['mean_abs']:.2e} | "
                  f"{d['rel_rms_vs_spread']:.2e} | {d['rel_rms_vs_move']:.2e} |")


def main(argv=None) -> dict:
    """Runs the benchmark and prints its tables.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).

    Returns:
      The results: settings, `rows` (one per K), `step_s` (per kind) and `dtype_drift`.
    """
    args = parse_args(argv)
    devices = jax.devices()
    if args.batch_size % len(devices):
        devices = devices[:1]   # a batch the devices do not divide runs on one
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    model = build(args, args.dtype)
    with jax.set_mesh(mesh):   # as sample.py samples
        results = throughput(args, model, mesh)
        results["dtype_drift"] = dtype_drift(args, mesh)
    results["settings"] = {**vars(args), "devices": mesh.size,
                           "platform": jax.devices()[0].platform}
    print_tables(args, model, mesh, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
