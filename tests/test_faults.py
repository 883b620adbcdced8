"""Faults of multi-process runs: a killed peer, a preempted peer, a damaged checkpoint.

    .venv/bin/python -m pytest tests/test_faults.py -q

Each test runs train.py as 2 local processes x 4 CPU devices (gloo), as
tests/test_trainer.py's `run_two_processes` does, and does something to one of them:

  * SIGKILL of process 1: process 0 must not wait in the step's collective for good; the
    coordination service misses process 1's heartbeats and stops it (non-zero exit, naming the
    dead task) within --heartbeat_timeout;
  * SIGTERM of process 1 alone: JAX's preemption sync point makes both stop at the same step,
    save it once and exit 0; a restart then ends like the uninterrupted run;
  * a truncated file in the latest checkpoint: both processes reject it, warn, and resume from
    the same previous step.

benchmarks/fault_injection.py is the long, single-process version (random SIGKILLs, timings).
"""
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from ddt_jax import checkpoint as checkpoint_lib

from test_integrity import truncate
from test_trainer import (REPO, _free_port, assert_close_to_reference, reference,  # noqa: F401
                          restored_params, run_two_processes, subprocess_env, tiny_config)

# Short enough to keep the test short, long enough that 2 busy shared cores (compiling, or
# running other tests) never delay a heartbeat that much: heartbeats come from a gRPC thread.
HEARTBEAT_TIMEOUT = 15


class TwoProcesses:
    """train.py as processes 0 and 1 of one run, their output collected line by line.

    The Popen objects are the python processes themselves (no `timeout` wrapper), so a signal
    sent to one reaches train.py.
    """

    def __init__(self, workdir, *flags):
        port = _free_port()
        self.procs = [subprocess.Popen(
            [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}", *flags],
            cwd=REPO, env=subprocess_env(num_devices=4, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        self.lines = [[], []]
        self.steps = [0, 0]                     # the last step each process logged
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True)
                        for i in range(2)]
        for reader in self.readers:
            reader.start()

    def _read(self, i):
        for line in self.procs[i].stdout:
            match = re.search(r"\] \[(\d+)\] .*\bloss=", line)
            with self.changed:
                self.lines[i].append(line)
                if match:
                    self.steps[i] = int(match.group(1))
                self.changed.notify_all()

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        """Blocks until both processes logged `step` (fails if either exits first)."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: min(self.steps) >= step
                or any(p.poll() is not None for p in self.procs), timeout)
        assert ok and min(self.steps) >= step, self.output()

    def wait(self, timeout: float = 240) -> list[int]:
        """Both exit codes (a process still running after `timeout` is killed: fails)."""
        try:
            codes = [p.wait(timeout) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for reader in self.readers:
            reader.join(10)
        return codes

    def log(self, i: int) -> str:
        return "".join(self.lines[i])

    def output(self) -> str:
        return "\n".join(f"----- process {i}:\n{self.log(i)[-4000:]}" for i in range(2))


def saved_steps(workdir) -> list[int]:
    ckpt = checkpoint_lib.Checkpointer(workdir, tiny_config().checkpoint, read_only=True)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    return steps


def test_killed_peer_stops_the_survivor_within_the_heartbeat_timeout(tmp_path):
    run = TwoProcesses(tmp_path, "--config.num_train_steps=100000",
                       "--config.logging.log_every=1", "--config.checkpoint.every_steps=1000",
                       f"--heartbeat_timeout={HEARTBEAT_TIMEOUT}")
    run.wait_for_step(2)
    run.procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        code = run.procs[0].wait(HEARTBEAT_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        code = None
    waited = time.monotonic() - killed
    codes = run.wait(10)
    print(f"process 0 exited {waited:.1f} s after process 1 was killed (code {code})")
    # Process 0 waits in the step's gloo all-reduce until the heartbeat check stops it: measured
    # 90 s after the kill with JAX's default timeout (100 s), 11 s with 10 s, 15 s with 15 s.
    assert code is not None and code != 0, (code, waited, run.output())
    assert codes[1] == -signal.SIGKILL
    assert waited < HEARTBEAT_TIMEOUT + 30, (waited, run.output())
    log = run.log(0)
    assert "JAX distributed service detected fatal errors" in log, run.output()
    # The dead task is named: "unhealthy (stopped sending heartbeats):\n1".
    assert re.search(r"stopped sending heartbeats\):\s*1\b", log), run.output()


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A 10-step 2-process run whose process 1 got a SIGTERM after step 2: (workdir, the
    TwoProcesses, their exit codes)."""
    workdir = tmp_path_factory.mktemp("preempted")
    run = TwoProcesses(workdir, "--config.logging.log_every=1")
    run.wait_for_step(2)
    run.procs[1].send_signal(signal.SIGTERM)
    return workdir, run, run.wait()


def test_sigterm_to_one_process_stops_both_at_one_saved_step(preempted, reference):
    workdir, run, codes = preempted
    assert codes == [0, 0], run.output()
    stops = [re.findall(r"preempted: saved step (\d+), stopping", run.log(i)) for i in range(2)]
    assert len(stops[0]) == 1 and stops[0] == stops[1], (stops, run.output())
    step = int(stops[0][0])
    assert 2 < step < 10, run.output()
    for i in range(2):   # one save of the step on each process, not a second forced one
        assert run.log(i).count(f"saving checkpoint at step {step}\n") == 1, run.output()
    assert saved_steps(workdir)[-1] == step
    # The restart continues from the preemption step to 10, like the uninterrupted run.
    run_two_processes(workdir)
    assert_close_to_reference(restored_params(workdir), reference[1])


def test_two_processes_reject_a_truncated_latest_step_together(preempted, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(preempted[0], workdir)
    if saved_steps(workdir)[-1] != 10:   # the previous test's resume did not run: run it here
        run_two_processes(workdir)
    steps = saved_steps(workdir)
    assert steps[-1] == 10 and len(steps) == 2, steps
    previous = steps[0]
    truncate(workdir / "checkpoints" / "10")
    run = TwoProcesses(workdir, "--config.logging.log_every=1")
    codes = run.wait()
    assert codes == [0, 0], run.output()
    for i in range(2):
        log = run.log(i)
        assert re.search(r"checkpoints/10 cannot be read \(", log), run.output()
        assert f"resuming from step {previous}, the newest checkpoint that verifies" in log
        assert f"resuming from the checkpoint at step {previous} in" in log
    assert (workdir / checkpoint_lib.REJECTED_DIR / "10" / "REJECTED.txt").exists()
    assert_close_to_reference(restored_params(workdir), reference[1])


def test_a_peer_that_never_connects_stops_the_other_within_the_init_timeout(tmp_path):
    # Process 1 is never started (a typo in its flags, a host that did not boot): process 0 says
    # how long it waits, then stops non-zero after --init_timeout instead of JAX's 300 s.
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
         f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2",
         "--process_id=0", "--init_timeout=5"],
        cwd=REPO, env=subprocess_env(num_devices=4, PYTHONUNBUFFERED="1"),
        capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-3000:]
    wait = "waiting up to 5 s for every process to connect (train.py --init_timeout)"
    assert wait in log, log[-3000:]
    assert "DEADLINE_EXCEEDED" in log and "RegisterTask" in log, log[-3000:]
    assert elapsed < 120, elapsed       # start-up (imports) + 5 s; the default would be 300 s
    assert not (tmp_path / "w").exists()   # nothing was written before the processes met
