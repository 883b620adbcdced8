"""Trains DDT: `python train.py --config=configs/xl_256.py --workdir=/ckpt/ddt_xl_256`.

Restarting the same command resumes from the latest complete checkpoint in --workdir; any config
field can be overridden (`--config.optim.lr=2e-4`). `--compile_only` sizes the run instead: it
AOT-compiles the train step for the devices at hand and prints its memory per device and FLOPs,
without allocating the model or reading data.
"""
import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddt_jax import console
from ddt_jax import sharding
from ddt_jax import trainer

config_flags.DEFINE_config_file("config", None, "Training config file, e.g. "
                                "configs/xl_256.py[:dit].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and sample "
                    "grids (required unless --compile_only).")
flags.DEFINE_bool("compile_only", False, "Compile the train step for the devices at hand, print "
                  "its memory per device and FLOPs, and exit (no workdir, data or weights).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs "
                    "outside clusters JAX detects itself.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.compile_only and not FLAGS.workdir:
        raise app.UsageError("--workdir is required (or pass --compile_only to size the run)")
    console.quiet_library_logs()
    # Before anything touches a JAX backend: jax.distributed.initialize must come first.
    sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].device_kind)
    if FLAGS.compile_only:
        print(trainer.compile_only(FLAGS.config).table(), flush=True)
        return
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
