"""Trains DDT: `python train.py --config=configs/xl_256.py --workdir=/ckpt/ddt_xl_256`.

Restarting the same command resumes from the latest complete checkpoint in --workdir. Any config
field can be overridden (`--config.optim.lr=2e-4`); configs/xl_256.py documents every field.

Multi-host: on TPU pods and SLURM/Open MPI clusters JAX finds its peers itself; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/xl_256.py[:dit].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and sample grids.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs "
                    "outside clusters JAX detects itself.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ddt_jax import console

    console.quiet_library_logs()
    import jax

    from ddt_jax import sharding

    sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)

    from ddt_jax import trainer
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
