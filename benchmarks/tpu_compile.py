"""Does a recipe fit a TPU slice? AOT-compiles the real train step for each slice from this host.

    python benchmarks/tpu_compile.py                                   # the BENCHMARKS.md table
    python benchmarks/tpu_compile.py --configs=xl_256 --slices=v5e-16 --batch_size=256
    python benchmarks/tpu_compile.py --configs=xl_512 --slices=v5e-16 \
        --config.model.remat=full --config.model.scan_blocks=True   # other flags: to train.py

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU. Each (config, slice) compiles in its own
process (`train.py --compile_only --topology=...`), so one that fails to compile or runs this
host out of memory does not stop the rest; XL/2 takes ~8 minutes per slice on 2 CPU cores.
Prints one markdown row per case: the mesh chosen, memory per chip against the chip's HBM, and
the compile time.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_case(config: str, slice_name: str, batch_size: int, extra: list[str],
             timeout: int) -> tuple[str, float]:
    cmd = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / config}.py",
           "--compile_only", f"--topology={slice_name}",
           f"--config.global_batch_size={batch_size}", *extra]
    # PYTHONPATH is extended, not replaced: libtpu may live in a folder of its own there (as the
    # Makefile's .venv/libtpu does).
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=python_path)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        text = out.stdout + ("" if out.returncode == 0 else "\nFAILED: " + out.stderr[-2000:])
    except subprocess.TimeoutExpired:
        text = f"FAILED: no result within {timeout} s"
    return text, time.perf_counter() - start


def row(config: str, slice_name: str, batch_size: int, text: str, seconds: float) -> str:
    mesh = re.search(r"on mesh (\{[^}]*\})", text)
    total = re.search(r"total \(peak estimate\)\s+([\d,\.]+) MiB", text)
    memory = re.search(r"device memory\s+([\d,\.]+) MiB: (.*)", text)
    args = re.search(r"XLA arguments\s+([\d,\.]+) MiB", text)
    temps = re.search(r"XLA temporaries\s+([\d,\.]+) MiB", text)
    if not total:
        # XLA's TPU out-of-memory error says how much the step needed: "the total memory
        # required for HLO temporaries (152.15G) exceeds available HBM (15.75G)".
        oom = re.search(r"required for HLO temporaries \(([\d.]+\w?)\) exceeds available HBM "
                        r"\(([\d.]+\w?)\)", text)
        if oom:
            reason = (f"DOES NOT FIT: {oom.group(1)} of temporaries per chip, {oom.group(2)} "
                      "HBM")
        else:
            reason = text.strip().splitlines()[-1][:120] if text.strip() else "no output"
        return f"| {config} | {slice_name} | {batch_size} | - | - | - | - | failed: {reason} |"

    def gib(m):
        return f"{float(m.group(1).replace(',', '')) / 1024:.2f}"

    return (f"| {config} | {slice_name} | {batch_size} | {mesh.group(1) if mesh else '?'} | "
            f"{gib(args)} + {gib(temps)} | {gib(total)} | {gib(memory)} | {memory.group(2)} "
            f"({seconds:.0f} s) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="xl_256,xl_512")
    parser.add_argument("--slices", default="v5e-16,v5e-256,v5p-128,v4-256")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    # Any other flag goes to train.py as is (argparse's nargs="*" positional would refuse them).
    args, extra = parser.parse_known_args()
    print("| config | slice | batch | mesh | GiB/chip: arguments + temporaries | GiB/chip total "
          "| HBM GiB | fits (compile time) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        for slice_name in args.slices.split(","):
            text, seconds = run_case(config, slice_name, args.batch_size, extra,
                                     args.timeout)
            print(row(config, slice_name, args.batch_size, text, seconds), flush=True)


if __name__ == "__main__":
    main()
