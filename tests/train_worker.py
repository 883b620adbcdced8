"""`train.py` for subprocess tests, optionally SIGKILLing itself in the middle of a checkpoint save.

With DDT_TEST_KILL_DURING_SAVE=N the process kills itself (SIGKILL: no cleanup, no finally) while
the step-N checkpoint is being written: after orbax created its temporary directory and started the
train-state write, as the checksums item is written. Everything else is exactly train.py.
"""
import os
import re
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddt_jax import host_memory  # noqa: E402

if __name__ == "__main__":
    host_memory.use_huge_pages()   # first, as train.py's own __main__ does

import orbax.checkpoint as ocp  # noqa: E402
from absl import app  # noqa: E402

import train  # noqa: E402

if __name__ == "__main__":
    kill_step = os.environ.get("DDT_TEST_KILL_DURING_SAVE")
    if kill_step:
        handler = ocp.JsonCheckpointHandler   # the checksums item's
        original_write = handler._save_fn      # runs once the step's directories exist

        async def write_then_die(self, item, directory):
            if re.search(rf"/{int(kill_step)}\.orbax-checkpoint-tmp", str(directory)):
                print(f"KILLING during the step-{kill_step} save", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return await original_write(self, item, directory)

        handler._save_fn = write_then_die
    app.run(train.main)
