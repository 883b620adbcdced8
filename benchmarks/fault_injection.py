"""Fault injection: a tiny run killed, preempted and damaged ends bit-identical to an unbroken one.

    python benchmarks/fault_injection.py                        # 10 kills, ~7 min on a CPU
    python benchmarks/fault_injection.py --kills=20 --seed=3 --json=/tmp/faults.json
    STORAGE_EMULATOR_HOST=... python benchmarks/fault_injection.py --workdir_root=gs://bucket/fi

train.py trains configs/tiny.py (8 CPU devices, a checkpoint every --save_every steps, async
saves) twice in fresh workdirs under --workdir_root:

  reference    uninterrupted, to --steps;
  interrupted  the same command, started again after each of
               --kills SIGKILLs (kill -9) at seeded random moments: just after a step that
                 saves nothing (the next step running), or after the n-th async save started
                 (while it is written); where each landed is read off the log and what it left:
                 a save the log shows started, or a step directory, that did not commit =
                 during a save (an async save can still be written while later steps run),
                 else during a step;
               one SIGTERM right after an async save started: the run must finish that save,
                 save the step it is in, and exit 0 (preemption);
               one truncated file in the latest checkpoint: the restart must warn naming that
                 step and resume from the previous one; it then trains to --steps.

Then the final states of both runs (restored and verified with their checksums) must be
bit-identical: params, Adam state and EMA. The table lists every interruption (where it landed,
the step it was at, the step the restart resumed from), each restart's seconds from its start to
its first step (imports, compile-cache loads, restore: the time a restart loses besides the steps
it recomputes) and the totals. Compiled programs go to one cache under --workdir_root (the
reference run fills it), so restarts measure a warm start. Every run is pinned to one CPU core
(--no-one_cpu: all of them): with more intra-op threads XLA:CPU's sums are not bit-reproducible
from run to run even without faults (jax-ml/jax#39741; --repeat_reference measures it with a
second uninterrupted run). Exits 1 if any check fails.

gs:// roots need an emulator or credentials in the environment (tests/conftest.py's `gcs_bucket`
lists the variables each client reads); the subprocesses inherit it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)   # configs/ is no installed package

from configs import tiny  # noqa: E402
from ddt_jax import checkpoint as checkpoint_lib  # noqa: E402
from ddt_jax import files  # noqa: E402
from ddt_jax import sharding  # noqa: E402
from ddt_jax import trainer  # noqa: E402

NUM_DEVICES = 8
# XLA:CPU with more than one intra-op thread may sum in another order from call to call
# (jax-ml/jax#39741: bit-identical only at one thread). Measured here with both cores: two
# uninterrupted 80-step runs ended with 235 of 265 arrays differing (last bits; the logged losses
# first differed at step 29), so every run is pinned to one core unless --no-one_cpu.
STEP_LINE = re.compile(r"\] \[(\d+)\] .*\bloss=")          # clu's logging writer, every step
SAVE_LINE = re.compile(r"saving checkpoint at step (\d+)")
START_LINE = re.compile(r"training from step (\d+) to")
PREEMPTED_LINE = re.compile(r"preempted: saved step (\d+), stopping")
FALLBACK_LINE = re.compile(r"resuming from step (\d+), the newest checkpoint that verifies")


class TrainRun:
    """train.py in a subprocess (no wrapper: signals reach it), its log parsed as it comes.

    Args:
      command: the train.py command line.
      env: its environment.
      log_path: where its output is copied (local or gs://).
    """

    def __init__(self, command: list[str], env: dict[str, str], log_path: epath.Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log_path = log_path
        self.lines: list[str] = []
        self.first_step_s: float | None = None   # seconds from the start to the first step
        self.start_step: int | None = None        # "training from step N"
        self.last_step: int | None = None         # the last step logged
        self.saves: list[int] = []                # steps whose save started
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                if (m := STEP_LINE.search(line)):
                    if self.first_step_s is None:
                        self.first_step_s = time.monotonic() - self.started
                    self.last_step = int(m.group(1))
                elif (m := SAVE_LINE.search(line)):
                    self.saves.append(int(m.group(1)))
                elif (m := START_LINE.search(line)):
                    self.start_step = int(m.group(1))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def steps_done(self) -> int:
        """Steps this process trained so far (logged; not those it resumed past)."""
        if self.last_step is None or self.start_step is None:
            return 0
        return self.last_step - self.start_step

    def wait_until(self, predicate, timeout: float = 600) -> bool:
        """Blocks until predicate(self) holds, re-tested at each line of output.

        Args:
          predicate: a test of this run's parsed state (steps, saves).
          timeout: seconds to wait at most.

        Returns:
          True once it holds; False if the process ended (or `timeout` passed) first.
        """
        with self.changed:
            return self.changed.wait_for(
                lambda: predicate(self) or self.proc.poll() is not None, timeout) and predicate(
                    self)

    def finish(self, timeout: float = 900) -> int:
        """Waits for the exit (SIGKILLs it after `timeout` seconds) and writes the log.

        Args:
          timeout: seconds to wait at most.

        Returns:
          The exit code (negative: the signal that ended it).
        """
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.reader.join(30)
        self.log_path.write_text("".join(self.lines))
        return code

    def log(self) -> str:
        """The output so far."""
        return "".join(self.lines)


def unfinished_saves(workdir: str) -> list[str]:
    """What saves cut short left in a run's checkpoints directory.

    Args:
      workdir: the run directory (local or gs://).

    Returns:
      The sorted names of the entries of <workdir>/checkpoints that are no complete step
      (local: `<step>.orbax-checkpoint-tmp-*`; gs://: `<step>` without its commit marker).
    """
    directory = epath.Path(checkpoint_lib.checkpoint_dir(workdir))
    if not directory.exists():
        return []
    complete = {str(s) for s in ocp.utils.checkpoint_steps(directory)}
    return sorted(p.name for p in directory.iterdir() if p.name not in complete)


def complete_steps(workdir: str) -> list[int]:
    """The run's committed checkpoint steps, oldest first (orbax's own test of completeness).

    Args:
      workdir: the run directory (local or gs://).

    Returns:
      The steps, [] without a checkpoints directory.
    """
    directory = epath.Path(checkpoint_lib.checkpoint_dir(workdir))
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []


def _files_under(directory: epath.Path):
    # epath has no recursive glob on gs:// (one listing per directory instead).
    for p in directory.iterdir():
        if p.is_dir():
            yield from _files_under(p)
        else:
            yield p


def truncate_largest_file(step_dir: epath.Path) -> epath.Path:
    """Halves the largest file of a step's state item (works on gs:// too: rewrites it).

    Args:
      step_dir: <workdir>/checkpoints/<step>.

    Returns:
      The truncated file.
    """
    path = max(_files_under(step_dir / checkpoint_lib.STATE_ITEM), key=lambda p: p.stat().length)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def final_state(workdir: str, step: int, config) -> dict:
    """A run's state at one step, restored and verified against its checksums.

    Args:
      workdir: the run directory.
      step: the checkpointed step.
      config: the run's config (its mesh, optimizer and checkpoint settings).

    Returns:
      The `state` item as host arrays: {"step", "params", "opt_state", "ema_params"}.
    """
    mesh = sharding.create_mesh(config.mesh)
    layout = trainer.state_layout(config, mesh, trainer.make_optimizer(config.optim)[0])
    ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint, read_only=True)
    try:
        return jax.device_get(ckpt.restore(step, layout.abstract.to_dict()))
    finally:
        ckpt.close()


def compare_states(a: dict, b: dict) -> dict[str, dict[str, float]]:
    """How two states differ, per item: arrays not bit-identical, and the largest difference.

    Args:
      a: a state as `final_state` returns it.
      b: another.

    Returns:
      {"params" | "opt_state" | "ema_params": {"differing": number of arrays that differ in any
      bit, dtype, shape or tree position, "max_abs_diff": the largest |a - b| of an element}};
      all 0 when bit-identical.
    """
    out = {}
    for key in ("params", "opt_state", "ema_params"):
        la, lb = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
        if jax.tree.structure(a[key]) != jax.tree.structure(b[key]):
            out[key] = {"differing": max(len(la), len(lb)), "max_abs_diff": float("inf")}
            continue
        pairs = [(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)]
        differing = [(x, y) for x, y in pairs if not (x.dtype == y.dtype and x.shape == y.shape
                                                      and np.array_equal(x, y))]
        out[key] = {"differing": len(differing), "max_abs_diff": max(
            (float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
             if x.shape == y.shape and x.size else float("inf") for x, y in differing),
            default=0.0)}
    return out


def identical(diff: dict) -> bool:
    return not any(d["differing"] for d in diff.values())


class Benchmark:
    """The two runs and every interruption; `events` holds one dict per interruption."""

    def __init__(self, args):
        self.args = args
        root = args.workdir_root or tempfile.mkdtemp(prefix="ddt_fault_injection_")
        self.root = files.as_str(root)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.reference_dir = f"{self.root}/reference-{stamp}"
        self.workdir = f"{self.root}/interrupted-{stamp}"
        self.repeat_dir = f"{self.root}/reference-repeat-{stamp}"
        self.logs = epath.Path(self.root) / f"logs-{stamp}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(NUM_DEVICES),
                        CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(
                            p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        self.env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the config's cache, below
        self.rng = np.random.default_rng(args.seed)
        self.runs: list[TrainRun] = []
        self.events: list[dict] = []
        self.failures: list[str] = []

    def command(self, workdir: str) -> list[str]:
        a = self.args
        return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                f"--config.num_train_steps={a.steps}", "--config.logging.log_every=1",
                f"--config.checkpoint.every_steps={a.save_every}",
                f"--config.compilation_cache_dir={self.root}/compilation_cache"]

    def start(self, workdir: str, name: str) -> TrainRun:
        run = TrainRun(self.command(workdir), self.env, self.logs / f"{name}.log")
        self.runs.append(run)
        # This run is the restart of the interruption before it (the SIGTERM's is the one after
        # the truncation: they share it).
        for event in self.events:
            if event.get("restart") is None and event["event"] != "SIGTERM":
                event["restart"] = run
        return run

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok

    def reference(self, workdir: str, name: str) -> TrainRun:
        run = self.start(workdir, name)
        code = run.finish()
        self.check(code == 0 and run.last_step == self.args.steps,
                   f"the reference run exited {code} at step {run.last_step} (log: "
                   f"{run.log_path})")
        return run

    def sigkill(self, number: int) -> bool:
        """One SIGKILL at a seeded moment; False if the run ended first."""
        every = self.args.save_every
        if self.rng.random() < 0.5:
            # Just after a step that saves nothing: the next step is running (a step is ~0.25 s
            # on one core, a save's synchronous part longer), though an earlier save may still
            # be written in the background.
            n, delay = int(self.rng.integers(1, 5)), float(self.rng.uniform(0, 0.15))
            trigger = f"{delay:.2f} s after its step #{n}+ (one not saved)"
            fired = lambda r: r.steps_done() >= n and r.last_step % every != 0  # noqa: E731
        else:
            n, delay = int(self.rng.integers(1, 3)), float(self.rng.uniform(0, 0.3))
            trigger = f"{delay:.2f} s after its save #{n} began"
            fired = lambda r: len(r.saves) >= n  # noqa: E731
        run = self.start(self.workdir, f"run{len(self.runs):02d}-sigkill{number}")
        if not run.wait_until(fired):
            run.finish()
            return False
        time.sleep(delay)
        run.proc.send_signal(signal.SIGKILL)
        code = run.finish()
        unfinished = unfinished_saves(self.workdir)
        complete = complete_steps(self.workdir)
        # A save this run started that did not commit: cut short, also before orbax created its
        # directory (it does so in the background).
        cut = [step for step in run.saves if step not in complete]
        if (run.last_step is not None and run.last_step % every == 0
                and run.last_step not in complete and run.last_step not in cut):
            # The step's line is logged before its save is called; the next step is dispatched
            # after the call returns: the kill was in the save's synchronous part.
            cut.append(run.last_step)
        if run.last_step is None:
            landed = "start-up"
        elif cut or unfinished:
            saving = cut[-1] if cut else unfinished[0].split(".")[0]
            landed = (f"save of step {saving}" if str(saving) == str(run.last_step) else
                      f"save of step {saving} (step {run.last_step + 1} running)")
        else:
            landed = f"step {run.last_step + 1}"
        self.check(code == -signal.SIGKILL, f"SIGKILL {number}: exit code {code}")
        self.events.append({"event": f"SIGKILL {number}", "trigger": trigger,
                            "landed": landed, "during": landed.split(" ")[0],
                            "last_step": run.last_step, "exit_code": code,
                            "complete_steps": complete})
        return True

    def sigterm(self) -> None:
        """SIGTERM just after an async save started: the run saves and exits 0."""
        run = self.start(self.workdir, f"run{len(self.runs):02d}-sigterm")
        if not self.check(run.wait_until(lambda r: len(r.saves) >= 1),
                          "SIGTERM: the run ended before its first save"):
            run.finish()
            return
        run.proc.send_signal(signal.SIGTERM)
        in_save = bool(unfinished_saves(self.workdir))
        saved = run.saves[0]
        code = run.finish(300)
        stop = PREEMPTED_LINE.search(run.log())
        stop = int(stop.group(1)) if stop else None
        steps = complete_steps(self.workdir)
        self.check(code == 0, f"SIGTERM: exit code {code} (log: {run.log_path})")
        self.check(stop is not None and steps and steps[-1] == stop and saved in steps,
                   f"SIGTERM: stopped at {stop}, complete steps {steps}, the save of step "
                   f"{saved} in flight at the signal")
        self.events.append({"event": "SIGTERM", "trigger": f"at the save of step {saved}",
                            "landed": f"save of step {saved}" if in_save else "step",
                            "during": "save" if in_save else "step",
                            "last_step": run.last_step, "exit_code": code,
                            "complete_steps": steps, "stopped_at": stop})

    def corrupt_and_finish(self) -> TrainRun | None:
        """Truncates a file of the latest step; the restart must fall back and train to the end."""
        steps = complete_steps(self.workdir)
        if not self.check(len(steps) >= 2, f"corruption: needs 2 complete steps, has {steps}"):
            return None
        bad = steps[-1]
        path = truncate_largest_file(epath.Path(checkpoint_lib.checkpoint_dir(self.workdir))
                                     / str(bad))
        self.events.append({"event": "truncated file", "trigger": f"{path.name} of step {bad}",
                            "landed": f"checkpoint {bad}", "during": "checkpoint",
                            "last_step": None, "exit_code": None, "complete_steps": steps})
        run = self.start(self.workdir, f"run{len(self.runs):02d}-final")
        code = run.finish()
        log = run.log()
        fallback = FALLBACK_LINE.search(log)
        self.check(code == 0 and run.last_step == self.args.steps,
                   f"final run: exit code {code} at step {run.last_step} (log: {run.log_path})")
        self.check(re.search(rf"checkpoints/{bad} (cannot be read|fails verification)", log)
                   is not None, f"final run: no warning naming the truncated step {bad}")
        self.check(fallback is not None and int(fallback.group(1)) == steps[-2],
                   f"final run: did not resume from step {steps[-2]} (the one before {bad})")
        return run

    def run(self) -> dict:
        started = time.monotonic()
        reference = self.reference(self.reference_dir, "reference")
        # A second uninterrupted run: whether this machine reproduces a run at all (XLA:CPU's
        # threads may sum in another order under load), apart from any fault.
        repeat = (self.reference(self.repeat_dir, "reference-repeat")
                  if self.args.repeat_reference else None)
        done = 0
        while done < self.args.kills and self.sigkill(done + 1):
            done += 1
        self.check(done == self.args.kills, f"only {done} of {self.args.kills} SIGKILLs landed "
                   f"before step {self.args.steps}: raise --steps")
        self.sigterm()
        final = self.corrupt_and_finish()
        for event in self.events:   # each interruption's restart: where it resumed, when
            restart = event.pop("restart", None)
            if restart is None:
                continue
            event["resumed_from"] = restart.start_step
            event["restart_to_first_step_s"] = restart.first_step_s
            # The SIGKILLs lose the steps after their last complete save; the truncation those
            # after the step before it.
            last = (event["last_step"] if event["last_step"] is not None
                    else max(event["complete_steps"], default=None))
            if last is not None and restart.start_step is not None:
                event["steps_recomputed"] = max(last - restart.start_step, 0)
        # Every start of the interrupted run but its first.
        restarts = self.runs[3 if repeat is not None else 2:]
        same, diff, repeat_diff = None, None, None
        config = tiny.get_config()
        if final is not None and final.last_step == self.args.steps:
            want = final_state(self.reference_dir, self.args.steps, config)
            diff = compare_states(final_state(self.workdir, self.args.steps, config), want)
            same = identical(diff)
            self.check(same, f"the final states differ: {diff}")
            if repeat is not None and repeat.last_step == self.args.steps:
                repeat_diff = compare_states(
                    final_state(self.repeat_dir, self.args.steps, config), want)
        times = [r.first_step_s for r in restarts if r.first_step_s is not None]
        return {
            "kills": done, "seed": self.args.seed, "steps": self.args.steps,
            "save_every": self.args.save_every,
            "kills_during_step": sum(e["during"] == "step" for e in self.events
                                     if e["event"].startswith("SIGKILL")),
            "kills_during_save": sum(e["during"] == "save" for e in self.events
                                     if e["event"].startswith("SIGKILL")),
            "restarts": len(restarts),
            "reference_first_step_s": reference.first_step_s,
            "restart_to_first_step_s": {"mean": float(np.mean(times)) if times else None,
                                        "min": min(times, default=None),
                                        "max": max(times, default=None)},
            "steps_recomputed": sum(e.get("steps_recomputed") or 0 for e in self.events),
            "bit_identical": same, "difference": diff,
            "reference_repeat_identical": None if repeat_diff is None else identical(repeat_diff),
            "reference_repeat_difference": repeat_diff,
            "failures": self.failures, "events": self.events,
            "wall_s": time.monotonic() - started, "workdirs": [self.reference_dir, self.workdir],
            "logs": os.fspath(self.logs),
        }


def _difference(diff: dict | None) -> str:
    if diff is None or identical(diff):
        return ""
    return " (" + ", ".join(f"{k}: {d['differing']} arrays differ, max |diff| "
                            f"{d['max_abs_diff']:.3g}" for k, d in diff.items()) + ")"


def table(result: dict) -> str:
    """The report: one row per interruption, then the totals and the bit-identity check.

    Args:
      result: what `Benchmark.run` returns.

    Returns:
      The table as text.
    """
    rows = [("interruption", "trigger", "landed during", "last step", "exit", "resumed from",
             "recomputed", "restart->1st step s")]
    for e in result["events"]:
        t = e.get("restart_to_first_step_s")
        rows.append((e["event"], e["trigger"], e["landed"], str(e["last_step"] or "-"),
                     str(e["exit_code"] if e["exit_code"] is not None else "-"),
                     str(e.get("resumed_from", "-")), str(e.get("steps_recomputed", "-")),
                     f"{t:.1f}" if t is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = result["restart_to_first_step_s"]
    ref = result["reference_first_step_s"]
    lines += [
        "",
        f"SIGKILLs: {result['kills']} ({result['kills_during_step']} during a step, "
        f"{result['kills_during_save']} during an async save); restarts: {result['restarts']}",
        "restart -> first step: " + (f"mean {t['mean']:.1f} s, min {t['min']:.1f} s, max "
                                     f"{t['max']:.1f} s" if t["mean"] is not None else "-")
        + (f" (the reference's start from scratch: {ref:.1f} s)" if ref is not None else ""),
        f"steps recomputed in all: {result['steps_recomputed']} (of {result['steps']})",
        "final params, Adam state and EMA bit-identical to the uninterrupted run: "
        + {True: "yes", False: "NO", None: "not compared"}[result["bit_identical"]]
        + _difference(result["difference"]),
    ]
    if result["reference_repeat_difference"] is not None:
        lines.append("a second uninterrupted run bit-identical to the first: "
                     + ("yes" if result["reference_repeat_identical"] else "NO")
                     + _difference(result["reference_repeat_difference"]))
    lines += [
        f"wall time {result['wall_s']:.0f} s; logs in {result['logs']}",
    ]
    lines += [f"FAILED: {f}" for f in result["failures"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs (each then restarted)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--steps", type=int, default=None,
                        help="num_train_steps of both runs (default: 3 per kill + 20)")
    parser.add_argument("--save_every", type=int, default=2,
                        help="checkpoint.every_steps: 2 makes many kills land in a save")
    parser.add_argument("--workdir_root", default=None,
                        help="where both workdirs go (local or gs://; default: a new temp dir)")
    parser.add_argument("--one_cpu", action=argparse.BooleanOptionalAction, default=True,
                        help="pin every run to one CPU core: XLA:CPU is bit-reproducible on one "
                        "intra-op thread only (jax-ml/jax#39741)")
    parser.add_argument("--repeat_reference", action="store_true",
                        help="run the uninterrupted run twice: does it reproduce at all?")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    if args.steps is None:
        # 10 kills advanced the run by 1.2 steps each (measured): most land in the save of the
        # step they would have kept.
        args.steps = 3 * args.kills + 20
    # This process only restores the two final states: on the runs' 8 CPU devices.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    logging.set_verbosity(logging.ERROR)   # orbax's notes on read-only managers
    if args.one_cpu:   # the train.py subprocesses inherit it
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = Benchmark(args).run()
    print(table(result), flush=True)
    if args.json:
        files.atomic_write_text(files.as_path(args.json), json.dumps(result, indent=2) + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
