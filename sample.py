"""Dumps samples for FID: `python sample.py --workdir=/ckpt/ddt_xl_256 --output=/samples/xl_256`.

The weights come from a training run (--workdir: its EMA or raw params at any step) or a converted
model directory (--checkpoint); `--config.FIELD` flags set the sampler over a base: the run's
`logging.sample` for a --workdir, sampler.default_sampler_config (the official DDT-XL/2 256px
settings) for a --checkpoint. Restarting the same command resumes the dump. The README's
"Sampling for FID" section lists every option.
"""
import dataclasses
import difflib
import os
import sys

from ddt_jax import host_memory

if __name__ == "__main__":
    # Before anything else runs: may re-execute this process with huge pages for XLA:CPU's
    # per-step temporaries (see ddt_jax/host_memory.py).
    host_memory.use_huge_pages()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddt_jax import checkpoint as checkpoint_lib  # noqa: E402
from ddt_jax import console  # noqa: E402
from ddt_jax import sample_dump  # noqa: E402
from ddt_jax import sampler as sampler_lib  # noqa: E402
from ddt_jax import sharding  # noqa: E402


def check_config_overrides(argv: list[str], config) -> None:
    """Exits with a one-line error for a --config.FIELD the sampler config lacks (ml_collections
    raises a bare AttributeError: "'foo'" while the flag below is defined)."""
    fields = list(config.keys())
    for arg in argv:
        name = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else ""
        if name and name not in fields:
            close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else f"fields: {', '.join(fields)}"
            sys.exit(f"error: --config.{name}: the sampler config has no field {name!r} ({hint})")


_D = sample_dump.DumpArgs()
check_config_overrides(sys.argv, sampler_lib.default_sampler_config())
config_flags.DEFINE_config_dict("config", sampler_lib.default_sampler_config(),
                                "Sampler settings over the run's logging.sample (--workdir) or "
                                "these defaults (--checkpoint), e.g. --config.num_steps=50 "
                                "--config.guidance=3.0.")
flags.DEFINE_string("output", _D.output, "Directory (local or gs://) for samples.npz, "
                    "samples.png and the resumable parts; process 0 alone writes it.")
flags.DEFINE_string("workdir", _D.workdir, "A training run: its config.json and checkpoints/.")
flags.DEFINE_string("checkpoint", _D.checkpoint, "A converted model directory "
                    "(python -m ddt_jax.convert ddt).")
flags.DEFINE_string("vae", _D.vae, "SD-VAE diffusers folder or weight file; default: the run's "
                    "vae.path; 'none' for a converted pixel-space model.")
flags.DEFINE_bool("raw", _D.raw, "Sample the run's raw params instead of the EMA.")
flags.DEFINE_integer("step", _D.step, "Checkpoint step of the run; default: the latest.")
flags.DEFINE_string("dtype", _D.dtype, "Model compute dtype (float32 / bfloat16; sets "
                    "model.dtype); default: the model config's. The sampler state and its "
                    "integration stay float32 (drift: benchmarks/sample_throughput.py "
                    "--dtype_steps).")
flags.DEFINE_integer("image_size", _D.image_size, "Model-input (latent) side, e.g. 64 for 512px; "
                     "default: the model config's.")
flags.DEFINE_integer("num_samples", _D.num_samples, "Samples in the dump.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size; a multiple of the device "
                     "count.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the labels and of every batch's noise.")
flags.DEFINE_bool("balanced", _D.balanced, "Exactly num_samples / num_classes samples per class "
                  "(shuffled).")
flags.DEFINE_string("schedule", _D.schedule, "Recompute-schedule json: read when sampling, "
                    "written by --calibrate.")
flags.DEFINE_bool("calibrate", _D.calibrate, "Solve a DP recompute schedule on a small batch; "
                  "write --schedule.")
flags.DEFINE_integer("num_recompute", _D.num_recompute, "--calibrate: encoder recomputes in the "
                     "schedule.")
flags.DEFINE_integer("calibrate_samples", _D.calibrate_samples, "--calibrate: samples of the "
                     "statistics.")
flags.DEFINE_bool("keep_parts", _D.keep_parts, "Keep DIR/parts/ after samples.npz is written.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs "
                    "outside clusters JAX detects itself.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS
# What a dump refuses with a message that names the problem and the fix: printed as one line.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, checkpoint_lib.CheckpointError)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error (no usage text) for a bad flag."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e} (--helpfull lists every flag)") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.quiet_library_logs()
    # Before anything touches a JAX backend: jax.distributed.initialize must come first.
    sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
    args = sample_dump.DumpArgs(**{f.name: FLAGS[f.name].value
                                   for f in dataclasses.fields(sample_dump.DumpArgs)})
    try:
        # Only the fields given on the command line: a --workdir's logging.sample is the base.
        overrides = config_flags.get_override_values(FLAGS["config"])
        config, _ = sample_dump.sampler_config_for(args, overrides)
        sample_dump.run(args, config)
    except USER_ERRORS as e:
        logging.debug("the error's traceback", exc_info=True)   # shown with --verbosity=1
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main, flags_parser=parse_flags)
