"""Trains DDT: `python train.py --config=configs/xl_256.py --workdir=/ckpt/ddt_xl_256`.

Restarting the same command resumes from the latest complete checkpoint in --workdir; any config
field can be overridden (`--config.optim.lr=2e-4`). `--compile_only` sizes the run instead: it
AOT-compiles the train step for the devices at hand and prints its memory per device and FLOPs,
without allocating the model or reading data; `--topology=v5e-256` does it for a TPU slice from
any host (libtpu's compiler, no TPU needed). A resumed run must keep the model, batch, seed and
data of the run in --workdir (`--allow_config_change=FIELD,...` to change them on purpose).
"""
import difflib
import os
import signal

from ddt_jax import host_memory

if __name__ == "__main__":
    # First of all (a SIGTERM recorded below would not survive it): may re-execute this process
    # with huge pages for XLA:CPU's per-step temporaries (see ddt_jax/host_memory.py).
    host_memory.use_huge_pages()


class _EarlySigterm:
    """Records a SIGTERM that comes before the trainer's handler exists (e.g. during the ~5 s of
    imports below), instead of the default exit 143; checkpoint.PreemptionGuard takes it over.
    (Raising SystemExit here was swallowed inside imports in 2 of 3 tries: the run trained on.)"""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        del signum, frame
        self.received = True


EARLY_SIGTERM = _EarlySigterm()
signal.signal(signal.SIGTERM, EARLY_SIGTERM)

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddt_jax import checkpoint as checkpoint_lib  # noqa: E402
from ddt_jax import console  # noqa: E402
from ddt_jax import sharding  # noqa: E402
from ddt_jax import tpu_topology  # noqa: E402
from ddt_jax import trainer  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
# What a run refuses with a message that names the problem and the fix: printed as one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError,
               checkpoint_lib.CheckpointError, tpu_topology.LibtpuMissing)

config_flags.DEFINE_config_file("config", None, "Training config file, e.g. "
                                "configs/xl_256.py[:dit].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and sample "
                    "grids (required unless --compile_only).")
flags.DEFINE_string("topology", None, "With --compile_only: compile for this TPU slice instead "
                    "(v5e-16, v5e-256, v4-256, v5p-128, v6e-16 or v5e:4x4, ...; needs libtpu: "
                    'pip install -e ".[tpu]").')
flags.DEFINE_bool("compile_only", False, "Compile the train step for the devices at hand, print "
                  "its memory per device and FLOPs, and exit (no workdir, data or weights).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs "
                    "outside clusters JAX detects itself.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("heartbeat_timeout", sharding.HEARTBEAT_TIMEOUT_SECONDS, "Multi-process "
                     "runs: seconds without a heartbeat after which a process counts as dead and "
                     "every process stops with an error (instead of waiting in a collective).",
                     lower_bound=1)
flags.DEFINE_integer("init_timeout", sharding.INIT_TIMEOUT_SECONDS, "Multi-process runs: "
                     "seconds each process waits for all of them to connect to the coordinator "
                     "before it stops with an error.", lower_bound=1)
flags.DEFINE_list("allow_config_change", [], "Config fields (or sections, e.g. model) that may "
                  "differ from the saved config.json of the run being resumed.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _config_arg(argv: list[str]) -> str | None:
    """The value of --config (`--config=PATH[:ARG]` or `--config PATH[:ARG]`), if given."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _field_names(config, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, "items"):
            names += _field_names(value, f"{prefix}{key}.")
    return names


def _unknown_override(argv: list[str], config_arg: str) -> str | None:
    """The message for the first --config.FIELD=... that the config has no FIELD for."""
    alone, args = flags.FlagValues(), ["train.py", f"--config={config_arg}"]
    # sys_argv: without it config_flags registers the overrides of sys.argv, the bad one too.
    config_flags.DEFINE_config_file("config", flag_values=alone, sys_argv=args)
    alone(args)
    names = _field_names(alone.config)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config."):].split("=", 1)[0]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = (f"closest: {', '.join(close)}" if close else "top-level fields: "
                    + ", ".join(n for n in names if "." not in n))
            return (f"--config.{name}: the config has no field {name!r} ({hint}); every field "
                    "is declared in ddt_jax/config_schema.py")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors for a missing config file or an unknown field."""
    config_arg = _config_arg(argv)
    if config_arg is not None and not os.path.isfile(config_arg.split(":")[0]):
        recipes = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                         if f.endswith(".py") and not f.startswith("_"))
        raise SystemExit(f"error: --config={config_arg}: no such file; the recipes are "
                         f"{', '.join(recipes)} in {os.path.join(REPO, 'configs')}")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e} (--helpfull lists every flag)") from e
    except (AttributeError, KeyError) as e:
        message = _unknown_override(argv, config_arg) if config_arg else None
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.topology and not FLAGS.compile_only:
        raise app.UsageError("--topology sizes a TPU slice from this host: use it with "
                             "--compile_only")
    if not FLAGS.compile_only and not FLAGS.workdir:
        raise app.UsageError("--workdir is required (or pass --compile_only to size the run)")
    if EARLY_SIGTERM.received:   # nothing has started: nothing to save
        logging.warning("SIGTERM during start-up: stopping before anything was written")
        return
    console.quiet_library_logs()
    # Before anything touches a JAX backend: jax.distributed.initialize must come first.
    sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id,
                                  heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
                                  init_timeout_seconds=FLAGS.init_timeout)
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].device_kind)
    try:
        if FLAGS.compile_only:
            # --topology: abstract devices of a TPU slice; otherwise the devices at hand.
            devices = tpu_topology.devices(FLAGS.topology) if FLAGS.topology else None
            print(trainer.compile_only(FLAGS.config, devices=devices).table(), flush=True)
            return
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                   allow_config_change=tuple(FLAGS.allow_config_change))
    except USER_ERRORS as e:
        logging.debug("the error's traceback", exc_info=True)   # shown with --verbosity=1
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
