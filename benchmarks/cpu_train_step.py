"""DDT-S/2 train step on one CPU thread: matmul layouts before/after, and the official model.

    taskset -c 0 .venv/bin/python benchmarks/cpu_train_step.py
    .venv/bin/python benchmarks/cpu_train_step.py --repeats=7 --official_repo=/tmp/DDT

The trainer's own step (`trainer.setup_step`: flow-matching loss, AdamW, EMA; REPA off) of
DDT-S/2 on 32x32x4 latents (256 tokens), batch 8, float32, once per `model.matmul_layout`:
"xla" (jax's autodiff as is: the step before the row-major VJPs) and "row_major" (what "auto"
picks on CPU). XLA runs on one thread (XLA_FLAGS set here, before the CPU client starts; the
process is pinned to one core unless --no_pin). For each layout it times the forward (the loss),
value_and_grad of the loss, and the whole step, the variants interleaved in every repeat so they
share the machine's load; medians over the repeats. backward = value_and_grad - forward,
optimizer + EMA = step - value_and_grad.

Page size: the script starts as train.py does (host_memory.use_huge_pages(): XLA's per-step
temporaries in transparent huge pages), and runs every layout a second time with huge pages
turned off for the process ("<layout>, 4K pages": the same executable; every step then faults
its 1.6 GB of temporaries in 4 KiB at a time, as before host_memory). The first such row
("xla, 4K pages") is the step before all of the CPU work; the table also counts the minor page
faults per step.

--official_repo=PATH (a checkout of github.com/MCG-NJU/DDT) also times the official PyTorch model
(src/models/denoiser/decoupled_improved_dit.py, the same sizes) in eager mode, one torch thread, in
the same interleaved loop (benchmarks/official_train_step.py: forward under no_grad, and a step of
forward, MSE loss, backward, AdamW and the EMA update).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from ddt_jax import host_memory

if __name__ == "__main__":
    # Before anything else runs: may re-execute this process with huge pages for XLA:CPU's
    # per-step temporaries (see ddt_jax/host_memory.py).
    host_memory.use_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddt_jax import config_schema  # noqa: E402
from ddt_jax import sharding  # noqa: E402
from ddt_jax import trainer  # noqa: E402

import official_train_step  # noqa: E402  (benchmarks/, the script's own folder)
import train_step as train_step_benchmark  # noqa: E402

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
BEFORE, AFTER = "xla", "row_major"
SMALL_PAGES = "4K pages"   # the suffix of a variant run with transparent huge pages off
PARTS = ("forward", "value_and_grad", "step")


def make_config(args, matmul_layout: str):
    """As benchmarks/train_step.py: synthetic data, REPA off, xla attention, no remat."""
    c = config_schema.default_config()
    c.model.variant = args.variant
    c.model.num_encoder_blocks = None            # the paper's split for the size
    c.model.image_size = args.image_size // 8    # SD-VAE latents
    c.model.dtype = "float32"
    c.model.attention, c.model.remat, c.model.scan_blocks = "xla", "none", False
    c.model.matmul_layout = matmul_layout
    c.global_batch_size = args.batch_size
    c.data.source = "synthetic"
    c.data.image_size = args.image_size
    c.data.with_image = False
    c.repa.weight = 0.0
    return c


class JaxVariant:
    """One matmul layout's compiled step, loss and value_and_grad, and the state they run on."""

    def __init__(self, args, matmul_layout: str):
        self.name = matmul_layout
        config = make_config(args, matmul_layout)
        config_schema.validate_config(config, check_files=False)
        mesh = trainer.make_mesh(config)
        t0 = time.perf_counter()
        setup = trainer.setup_step(config, mesh, None, None, need_data=False)
        self.step_fn = setup.lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.state = trainer.init_train_state(config, setup.layout, setup.tx, jax.random.key(0))
        self.batch = train_step_benchmark.random_batch(setup.abstract_batch,
                                                       config.model.num_classes)
        self.positions = trainer.example_positions(
            sharding.check_batch_size(config.global_batch_size, mesh), mesh)
        loss_fn = trainer.make_loss_fn(config, setup.layout)
        loss_args = (self.batch, self.positions, jnp.zeros((), jnp.int32), None)
        with jax.set_mesh(mesh):
            self.loss = jax.jit(loss_fn).lower(self.state.params, *loss_args).compile()
            self.grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
                self.state.params, *loss_args).compile()
        self.loss_args = loss_args
        self.last_loss = None

    def run(self, part: str) -> None:
        if part == "forward":
            jax.block_until_ready(self.loss(self.state.params, *self.loss_args))
        elif part == "value_and_grad":
            jax.block_until_ready(self.grad(self.state.params, *self.loss_args))
        else:
            self.state, metrics = self.step_fn(self.state, self.batch, self.positions, None)
            jax.block_until_ready((self.state, metrics))
            self.last_loss = float(metrics["loss"])


class SmallPagesVariant:
    """A JAX variant run with transparent huge pages off (host_memory.allow_huge_pages): the
    step as it ran before host_memory.use_huge_pages(), in the same process."""

    def __init__(self, inner: JaxVariant):
        self.inner, self.name, self.compile_s = inner, f"{inner.name}, {SMALL_PAGES}", 0.0

    def run(self, part: str) -> None:
        host_memory.allow_huge_pages(False)
        try:
            self.inner.run(part)
        finally:
            host_memory.allow_huge_pages(True)


class OfficialVariant:
    """The official PyTorch DDT in eager mode on one torch thread (official_train_step.py)."""

    name = "official (torch eager)"

    def __init__(self, args, repo: str):
        self.step = official_train_step.OfficialStep(
            repo, args.variant, args.image_size, args.batch_size, device="cpu",
            dtype="float32", threads=1)
        self.compile_s = 0.0

    def run(self, part: str) -> None:
        self.step.run(part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="S/2")
    parser.add_argument("--image_size", type=int, default=256, help="pixels (latents: / 8)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layouts", default=f"{BEFORE},{AFTER}",
                        help="model.matmul_layout values, the first one the baseline")
    parser.add_argument("--official_repo", default=None,
                        help="a checkout of MCG-NJU/DDT: also time its PyTorch model")
    parser.add_argument("--threads", type=int, default=1,
                        help="1: one XLA thread and one core; 0: leave XLA and affinity alone")
    parser.add_argument("--no_pin", action="store_true", help="do not pin to one core")
    args = parser.parse_args()
    if args.threads == 1:
        # Read when the CPU client starts (the first device query below), not at import.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ONE_THREAD_FLAGS)
        if not args.no_pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"{args.variant}, {args.image_size}px ({args.image_size // 8}^2 latents), batch "
          f"{args.batch_size}, float32, REPA off; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up", flush=True)
    variants, layouts = [], args.layouts.split(",")
    for layout in layouts:
        variants.append(JaxVariant(args, layout))
        print(f"# {layout}: compiled in {variants[-1].compile_s:.1f} s", flush=True)
    if host_memory.huge_pages_in_use():
        # Each layout also as it ran with 4 KiB pages (every step faults its temporaries in
        # afresh); the first such row is the baseline. The same executables, so no compile.
        small = [SmallPagesVariant(v) for v in variants]
        variants = [small[0]] + [v for pair in zip(small[1:], variants[1:]) for v in pair]
        if len(layouts) == 1:
            variants.append(small[0].inner)
    else:
        print(f"# no huge pages here (kernel THP mode {host_memory.thp_mode()!r}, glibc "
              f"{host_memory.glibc_version()}, {host_memory.TUNABLES_ENV}="
              f"{os.environ.get(host_memory.TUNABLES_ENV, '')!r}): every variant runs with 4 KiB "
              "pages")
    if args.official_repo:
        variants.append(OfficialVariant(args, args.official_repo))
    # Wall time, and the process's CPU time (user + system: page faults of fresh temporaries
    # count), which other jobs on the machine disturb much less than the wall clock.
    wall = {(v.name, p): [] for v in variants for p in PARTS}
    cpu = {(v.name, p): [] for v in variants for p in PARTS}
    faults = {(v.name, p): [] for v in variants for p in PARTS}
    for r in range(args.warmup + args.repeats):
        for part in PARTS:
            for v in variants:
                t0, c0, f0 = time.perf_counter(), cpu_seconds(), minor_faults()
                v.run(part)
                if r >= args.warmup:
                    wall[(v.name, part)].append(time.perf_counter() - t0)
                    cpu[(v.name, part)].append(cpu_seconds() - c0)
                    faults[(v.name, part)].append(minor_faults() - f0)
        if r >= args.warmup:
            print(f"# round {r + 1 - args.warmup}: " + ", ".join(
                f"{v.name} step {wall[(v.name, 'step')][-1]:.2f} s "
                f"(CPU {cpu[(v.name, 'step')][-1]:.2f} s)" for v in variants), flush=True)
    for title, times in (("wall-clock", wall), ("CPU time (user + system)", cpu)):
        print(f"\n{title}, median of {args.repeats} rounds:")
        print(table(variants, {k: statistics.median(v) for k, v in times.items()},
                    {k: statistics.median(v) for k, v in faults.items()}))
    names = [v.name for v in variants]
    small_after = f"{AFTER}, {SMALL_PAGES}"
    for title, times in (("wall", wall), ("CPU", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        line = [f"{title}: {AFTER} step {med[(AFTER, 'step')]:.3f} s" if AFTER in names else ""]
        if AFTER in names and names[0] != AFTER:
            line.append(f"{med[(names[0], 'step')] / med[(AFTER, 'step')]:.2f}x the speed of "
                        f"{names[0]} (before)")
        if small_after in names and names[0] != small_after:
            line.append(f"{med[(small_after, 'step')] / med[(AFTER, 'step')]:.2f}x {small_after}")
        if OfficialVariant.name in names and AFTER in names:
            line.append(f"{med[(OfficialVariant.name, 'step')] / med[(AFTER, 'step')]:.2f}x the "
                        "official's")
        print(", ".join(x for x in line if x))


def minor_faults() -> int:
    """The process's minor page faults so far (fresh pages the kernel mapped in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def table(variants, med: dict, faults: dict) -> str:
    base = variants[0].name
    lines = ["| variant | forward s | backward s | value_and_grad s | optimizer+EMA s | step s "
             f"| step speed vs {base} | page faults per step |",
             "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        f, g, s = (med[(v.name, p)] for p in PARTS)
        lines.append(f"| {v.name} | {f:.3f} | {g - f:.3f} | {g:.3f} | {s - g:.3f} | {s:.3f} "
                     f"| {med[(base, 'step')] / s:.2f}x | {faults[(v.name, 'step')]:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
