"""Train-step speed and memory of every model variant: attention x remat x scan x accumulation.

    python benchmarks/train_step.py                              # S/2 and B/2, 256px, batch 8
    python benchmarks/train_step.py --variants=B/2 --steps=3 --accum=1,2 --json=/tmp/steps.json
    python benchmarks/train_step.py --variants=XL/2 --batch_size=32 --dtype=bfloat16 --repa
    python benchmarks/train_step.py --variants=XL/2 --batch_size=256 --repa \
        --topology=v5e-16 --remat=none,full --scan=0,1     # TPU memory per chip, from this host

The step is the trainer's own (`trainer.setup_step`: AdamW, EMA, the flow-matching loss, REPA
when --repa; state donated, FSDP/data mesh from the default rules), built once per variant in one
process. For each: compile time, step time (median of --steps after --warmup), images/s,
TFLOP/s per device and MFU (analytic FLOPs of ddt_jax/flops.py; XLA's cost_analysis beside them)
and the compiled memory per device (arguments, temporaries). The table ends with each variant's
ratios to the default variant (xla, remat none, unrolled) measured in the same run.

Attention variants: xla everywhere, tpu_flash on TPU, cudnn on GPU (bf16/fp16 only). With --repa
the frozen DINOv2-B/14 is randomly initialised (same shapes and cost as the published one).
--accum=1,2,4 adds optim.grad_accum_steps to the grid (the same update in N microbatches).

--official_repo=PATH (a checkout of github.com/MCG-NJU/DDT) first times the official PyTorch DDT's
step on the same shapes, batch and dtype (benchmarks/official_train_step.py, in a subprocess that
runs before JAX takes the accelerator; REPA off there) for each of --official_modes (eager, torch
compile), and ends with its rows and our fastest variant's speed against each.

--topology=SLICE (needs libtpu, not a TPU: `pip install -e ".[tpu]"`) compiles each variant for
that TPU slice instead (`trainer.compile_only` on `jax.experimental.topologies` devices, the
mesh chosen as train.py would) and prints memory per chip against the chip's HBM and the compile
time; nothing runs, so there are no step times. Run it with JAX_PLATFORMS=cpu.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import subprocess
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

from ddt_jax import config_schema  # noqa: E402
from ddt_jax import flops as flops_lib  # noqa: E402
from ddt_jax import sharding  # noqa: E402
from ddt_jax import tpu_topology  # noqa: E402
from ddt_jax import trainer  # noqa: E402
from ddt_jax.models import ddt  # noqa: E402
from ddt_jax.models import dinov2 as dinov2_lib  # noqa: E402

import official_train_step  # noqa: E402  (benchmarks/, the script's own folder)

GIB = 2.0 ** 30
REMATS = ("none", "full", "dots_saveable")
DEFAULT_VARIANT = ("xla", "none", False, 1)   # attention, remat, scan, accumulation steps


def attentions(dtype: str) -> list[str]:
    """The attention kernels that run on this backend for `dtype`."""
    backend = jax.default_backend()
    out = ["xla"]
    if backend == "tpu":
        out.append("tpu_flash")
    if backend == "gpu" and dtype in ("bfloat16", "float16"):
        out.append("cudnn")
    return out


def make_config(args, size: str, attention: str, remat: str, scan: bool, accum: int = 1):
    c = config_schema.default_config()
    c.model.variant = size
    c.model.num_encoder_blocks = None            # the paper's split for the size
    for name in official_train_step.SIZE_FLAGS:  # overrides of the size's (tests: tiny models)
        if getattr(args, name, None) is not None:
            c.model[name] = getattr(args, name)
    c.model.image_size = args.image_size // 8    # SD-VAE latents
    c.model.dtype = args.dtype
    c.model.attention, c.model.remat, c.model.scan_blocks = attention, remat, scan
    c.global_batch_size = args.batch_size
    c.optim.grad_accum_steps = accum
    c.data.source = "synthetic"
    c.data.image_size = args.image_size
    c.data.with_image = args.repa
    c.repa.weight = 0.5 if args.repa else 0.0
    c.repa.dinov2_dtype = args.dtype
    return c


def random_batch(abstract_batch, num_classes: int, seed: int = 0):
    """Arrays of the batch's shapes, dtypes and shardings (labels in range, images uint8)."""
    rng = np.random.default_rng(seed)

    def one(name, a):
        if name == "label":
            host = rng.integers(0, num_classes, a.shape).astype(a.dtype)
        elif a.dtype == np.uint8:
            host = rng.integers(0, 256, a.shape).astype(np.uint8)
        else:
            host = (0.5 * rng.standard_normal(a.shape)).astype(a.dtype)
        return jax.device_put(host, a.sharding)

    return {k: one(k, a) for k, a in abstract_batch.items()}


def random_dinov2(config, mesh):
    """(graphdef, replicated params) of a randomly initialised DINOv2 of the configured width."""
    graphdef, abstract = trainer.abstract_dinov2(config, mesh)
    if graphdef is None:
        return None, None, None
    by_width = {v["embed_dim"]: v for v in dinov2_lib.DINOV2_VARIANTS.values()}
    kwargs = by_width[config.repa.feature_dim]
    dtype = ddt.DTYPES[config.repa.dinov2_dtype]
    init = lambda: nnx.split(dinov2_lib.DINOv2(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))[1]
    params = jax.jit(lambda: init().to_pure_dict(),
                     out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()
    return graphdef, abstract, params


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure(args, size: str, attention: str, remat: str, scan: bool, accum: int, dino) -> dict:
    """Compiles and times one variant's train step."""
    config = make_config(args, size, attention, remat, scan, accum)
    config_schema.validate_config(config, check_files=False)
    mesh = trainer.make_mesh(config)
    dinov2_graphdef, abstract_dino, dinov2_params = dino
    t0 = time.perf_counter()
    setup = trainer.setup_step(config, mesh, dinov2_graphdef, abstract_dino, need_data=False)
    compiled = setup.lowered.compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state = trainer.init_train_state(config, setup.layout, setup.tx, jax.random.key(0))
    batch = random_batch(setup.abstract_batch, config.model.num_classes)
    positions = trainer.example_positions(
        sharding.check_batch_size(config.global_batch_size, mesh), mesh)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, positions, dinov2_params)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    step_s = statistics.median(times)
    depth = 0 if dinov2_params is None else len(dinov2_params["blocks"])
    analytic = trainer.step_flops(config, setup.abstract_batch, dinov2_depth=depth)
    devices = mesh.size
    tflops = analytic / step_s / devices / 1e12
    peak = flops_lib.peak_flops_per_device(jax.devices()[0], args.peak_tflops)
    return dict(
        model=size, attention=attention, remat=remat, scan=scan, accum=accum,
        mesh=dict(mesh.shape),
        compile_s=compile_s, step_s=step_s, images_per_s=config.global_batch_size / step_s,
        tflops_per_device=tflops, mfu=None if peak is None else tflops * 1e12 / peak,
        analytic_tflop_per_step=analytic / 1e12,
        xla_tflop_per_device=(None if (x := _xla_flops(compiled)) is None else x / 1e12),
        temp_gib=None if memory is None else memory.temp_size_in_bytes / GIB,
        argument_gib=None if memory is None else memory.argument_size_in_bytes / GIB,
        total_gib=None if memory is None else compiled_total_bytes(memory) / GIB,
        loss=loss)


def compiled_total_bytes(memory) -> int:
    """Arguments + outputs + temporaries - what outputs alias (the donated state): the
    executable's footprint per device, the number to hold against the device's memory."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def measure_on_topology(args, size: str, attention: str, remat: str, scan: bool, accum: int,
                        devices) -> dict:
    """Compiles one variant's train step for abstract TPU devices: memory per chip, no timing."""
    config = make_config(args, size, attention, remat, scan, accum)
    t0 = time.perf_counter()
    report = trainer.compile_only(config, devices=devices)
    compile_s = time.perf_counter() - t0
    b = report.bytes_per_device
    return dict(
        model=size, attention=attention, remat=remat, scan=scan, accum=accum,
        mesh=dict(report.setup.mesh.shape), compile_s=compile_s,
        argument_gib=b["XLA arguments"] / GIB, temp_gib=b["XLA temporaries"] / GIB,
        total_gib=report.total_bytes / GIB,
        hbm_gib=None if report.memory_per_device is None else report.memory_per_device / GIB,
        fits=report.fits, analytic_tflop_per_step=report.analytic_flops / 1e12)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _variant(r: dict) -> tuple:
    return r["attention"], r["remat"], r["scan"], r["accum"]


def baselines(rows: list[dict]) -> dict:
    """Each model's baseline row: the default variant (xla, remat none, unrolled, accum 1) when
    the grid has it, else the model's first row."""
    out = {}
    for r in rows:
        out.setdefault(r["model"], r)
        if _variant(r) == DEFAULT_VARIANT:
            out[r["model"]] = r
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | attention | remat | scan | accum | compile s | step s | img/s | TFLOP/s/dev "
            "| MFU | XLA TFLOP/dev | temp GiB | args GiB | total GiB | speed x | temp x "
            "| compile x |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = baselines(rows)
    for r in rows:
        b = base[r["model"]]
        ratio = lambda num, den: None if not den else num / den
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['remat']} | {r['scan']} | {r['accum']} "
            f"| {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['images_per_s']:.2f} "
            f"| {r['tflops_per_device']:.4f} | {_fmt(r['mfu'], '.1%')} "
            f"| {_fmt(r['xla_tflop_per_device'], '.3f')} | {_fmt(r['temp_gib'], '.3f')} "
            f"| {_fmt(r['argument_gib'], '.3f')} | {_fmt(r.get('total_gib'), '.3f')} "
            f"| {_fmt(ratio(b['step_s'], r['step_s']), '.2f')} "
            f"| {_fmt(ratio(r['temp_gib'] or 0, b['temp_gib']), '.2f')} "
            f"| {_fmt(ratio(r['compile_s'], b['compile_s']), '.2f')} |")
    return "\n".join(lines)


def run_official(args, size: str, mode: str) -> dict | None:
    """official_train_step.py for `size` in `mode` (eager | compile), in a subprocess with JAX
    kept off the accelerator; its result, or None (printed) when it failed."""
    script = pathlib.Path(__file__).with_name("official_train_step.py")
    cmd = [sys.executable, str(script), f"--official_repo={args.official_repo}",
           f"--variant={size}", f"--image_size={args.image_size}",
           f"--batch_size={args.batch_size}", f"--dtype={args.dtype or 'auto'}",
           f"--steps={args.steps}", f"--warmup={max(args.warmup, 2)}"]
    cmd += [f"--{name}={getattr(args, name)}" for name in official_train_step.SIZE_FLAGS
            if getattr(args, name) is not None]
    if mode == "compile":
        cmd.append("--compile")
    repo_root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [repo_root,
                                                        os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.official_timeout)
    except subprocess.TimeoutExpired:
        print(f"# official {size} {mode}: FAILED (no result in {args.official_timeout} s)",
              flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith(official_train_step.JSON_PREFIX):
            result = json.loads(line[len(official_train_step.JSON_PREFIX):])
            result["wall_s"] = time.perf_counter() - t0
            result["analytic_tflop_per_step"] = official_flops(size, args) / 1e12
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f"# official {size} {mode}: FAILED (exit {proc.returncode}): " + " / ".join(tail),
          flush=True)
    return None


def official_flops(size: str, args) -> float:
    """Analytic FLOPs of the official step: ours with REPA off (the same model and batch)."""
    sizes_only = argparse.Namespace(**{**vars(args), "dtype": "float32", "repa": False})
    model = make_config(sizes_only, size, *DEFAULT_VARIANT).model   # FLOPs do not see dtype
    tokens = (model.image_size // ddt.parse_variant(model.variant)[1]) ** 2
    return flops_lib.train_step_flops(
        batch=args.batch_size, model_forward=trainer.model_forward_flops(model, tokens),
        projector_forward=0.0, dinov2_forward=0.0)


def official_table(official: list[dict], rows: list[dict], peak_tflops: float | None) -> str:
    """The official rows and, for each, our fastest variant of that model against it."""
    head = ("| model | official | step s | img/s | TFLOP/s | MFU | peak GiB | forward s "
            "| our fastest variant | its step s | ours x official |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in official:
        tflops = o["analytic_tflop_per_step"] / o["step_s"]
        mfu = None if peak_tflops is None else tflops / peak_tflops
        ours = [r for r in rows if r["model"] == o["model"]]
        best = min(ours, key=lambda r: r["step_s"]) if ours else None
        variant = "-" if best is None else " ".join(
            f"{k}={best[k]}" for k in ("attention", "remat", "scan", "accum"))
        lines.append(
            f"| {o['model']} | {o['name']} | {o['step_s']:.3f} | {o['images_per_s']:.2f} "
            f"| {tflops:.4f} | {_fmt(mfu, '.1%')} | {_fmt(o['peak_gib'], '.2f')} "
            f"| {o['forward_s']:.3f} | {variant} "
            f"| {_fmt(None if best is None else best['step_s'], '.3f')} "
            f"| {_fmt(None if best is None else o['step_s'] / best['step_s'], '.2f')} |")
    return "\n".join(lines)


def topology_table(rows: list[dict], slice_name: str) -> str:
    head = (f"| model | attention | remat | scan | accum | mesh ({slice_name}) | compile s "
            "| args GiB/chip | temp GiB/chip | total GiB/chip | HBM GiB | fits |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        used = "" if r["hbm_gib"] is None else f" ({r['total_gib'] / r['hbm_gib']:.0%})"
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO") + used
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['remat']} | {r['scan']} | {r['accum']} "
            f"| {mesh} | {r['compile_s']:.0f} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} "
            f"| {r['total_gib']:.2f} | {_fmt(r['hbm_gib'], '.1f')} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Runs the benchmark and prints its tables.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).

    Returns:
      {"rows": one dict per variant measured, "official": the official runs' results}.
    """
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="S/2,B/2", help="model sizes, comma-separated")
    for name in official_train_step.SIZE_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None,
                            help="override the sizes' (e.g. tiny models for a quick check)")
    parser.add_argument("--image_size", type=int, default=256, help="pixels (latents: / 8)")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch")
    parser.add_argument("--dtype", default=None,
                        help="compute dtype; default float32 on CPU, bfloat16 elsewhere and for "
                        "--topology")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repa", action="store_true", help="REPA on, random DINOv2-B/14")
    parser.add_argument("--attention", default=None,
                        help="attention kernels to try (default: those this backend runs)")
    parser.add_argument("--remat", default=",".join(REMATS))
    parser.add_argument("--scan", default="0,1", help="scan_blocks values: 0, 1 or both")
    parser.add_argument("--accum", default="1", help="optim.grad_accum_steps values, e.g. 1,2,4")
    parser.add_argument("--topology", default=None,
                        help="compile for this TPU slice (e.g. v5e-16, v5p-128) instead of running")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s per device for MFU (default: looked up by kind)")
    parser.add_argument("--also", default="",
                        help="variants run before the grid, ATTENTION:REMAT:SCAN:ACCUM each, "
                        "comma-separated; e.g. xla:none:0:1 (the ratios' baseline)")
    parser.add_argument("--only", default="",
                        help="run just these ATTENTION:REMAT:SCAN:ACCUM variants, in this order "
                        "(no grid)")
    parser.add_argument("--official_repo", default=None,
                        help="a checkout of MCG-NJU/DDT: also time its PyTorch step")
    parser.add_argument("--official_modes", default="eager,compile",
                        help="official runs: eager, compile (torch.compile) or both")
    parser.add_argument("--official_timeout", type=float, default=None,
                        help="seconds each official run may take (default: no limit)")
    parser.add_argument("--json", default=None,
                        help="write the rows here (rewritten after every variant, so a run "
                        "stopped early keeps what it measured)")
    args = parser.parse_args(argv)
    flag = "--only" if args.only else "--also"
    extra = [parse_variant_spec(v, flag) for v in (args.only or args.also).split(",") if v]
    official = []
    if args.official_repo and not args.topology:
        # Before anything asks JAX for a device: JAX would claim most of the GPU's memory.
        for size in args.variants.split(","):
            for mode in args.official_modes.split(","):
                result = run_official(args, size, mode)
                if result is not None:
                    official.append(result)
                    print(f"# {size} {result['name']} ({result['dtype']}, {result['device']}): "
                          f"step {result['step_s']:.3f} s, {result['images_per_s']:.2f} img/s",
                          flush=True)
                    write_json(args.json, [], official)
    devices = tpu_topology.devices(args.topology) if args.topology else None
    on_cpu = jax.default_backend() == "cpu" and devices is None
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    if args.attention:
        kernels = args.attention.split(",")
    else:
        kernels = ["xla", "tpu_flash"] if devices is not None else attentions(args.dtype)
    scans = [bool(int(v)) for v in args.scan.split(",")]
    accums = [int(v) for v in args.accum.split(",")]
    where = (f"TPU {args.topology} ({tpu_topology.describe(devices)}), compile only"
             if devices is not None else
             f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"# {where}, jax {jax.__version__}; {args.image_size}px, batch {args.batch_size}, "
          f"{args.dtype}, REPA {'on' if args.repa else 'off'}"
          + ("" if devices is not None else
             f"; median of {args.steps} steps after {args.warmup} warm-up"), flush=True)
    rows = []
    for size in args.variants.split(","):
        dino = (None, None, None)
        if args.repa and devices is None:
            default = make_config(args, size, *DEFAULT_VARIANT)
            dino = random_dinov2(default, trainer.make_mesh(default))
        grid = [] if args.only else list(
            itertools.product(kernels, args.remat.split(","), scans, accums))
        for attention, remat, scan, accum in unique(extra + grid):
            try:
                if devices is not None:
                    row = measure_on_topology(args, size, attention, remat, scan, accum, devices)
                else:
                    row = measure(args, size, attention, remat, scan, accum, dino)
            except Exception as e:  # noqa: BLE001 - report the variant and go on with the rest
                print(f"# {size} {attention} {remat} scan={scan} accum={accum}: FAILED "
                      f"{type(e).__name__}: {str(e)[:800]}", flush=True)
                continue
            rows.append(row)
            write_json(args.json, rows, official)
            done = (f"total {row['total_gib']:.2f} GiB/chip" if devices is not None else
                    f"step {row['step_s']:.3f} s, loss {row['loss']:.4f}")
            print(f"# {size} {attention:9} remat={remat:13} scan={scan!s:5} accum={accum} "
                  f"compile {row['compile_s']:6.1f} s, {done}", flush=True)
    if devices is not None:
        print(topology_table(rows, args.topology))
    else:
        print(table(rows))
        print("speed x = baseline's step time / this one's; temp x = temporaries / the "
              "baseline's; compile x likewise (baseline = xla, remat none, unrolled, accum 1 "
              "where measured, else the model's first row).")
        if official:
            peak = flops_lib.peak_flops_per_device(jax.devices()[0], args.peak_tflops)
            print(official_table(official, rows, None if peak is None else peak / 1e12))
            if args.repa:
                print("(the official rows have REPA off; ours above have it on)")
    return {"rows": rows, "official": official}


def parse_variant_spec(text: str, flag: str) -> tuple:
    """"xla:none:0:1" -> ("xla", "none", False, 1); `flag` names the flag it came from in the
    error."""
    try:
        attention, remat, scan, accum = text.split(":")
        return attention, remat, bool(int(scan)), int(accum)
    except ValueError:
        raise SystemExit(f"{flag}={text!r}: expected ATTENTION:REMAT:SCAN:ACCUM, e.g. "
                         "xla:none:0:1") from None


def unique(variants: list[tuple]) -> list[tuple]:
    return list(dict.fromkeys(variants))


def write_json(path: str | None, rows: list[dict], official: list[dict]) -> None:
    """{"rows": our variants, "official": the official runs} to `path`, replaced atomically."""
    if not path:
        return
    tmp = pathlib.Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"rows": rows, "official": official}, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
