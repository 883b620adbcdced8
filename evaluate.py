"""ADM's evaluator in JAX: `python evaluate.py REF.npz SAMPLES.npz --inception=PTH`.

Prints ADM's table (Inception Score, FID, sFID, Precision, Recall) and writes --output as JSON;
`python evaluate.py SOURCE --make_ref=OUT.npz --inception=PTH` writes a reference batch in ADM's
format from a sample .npz, a records directory or an image folder. The README's "Evaluation"
section has the details.
"""
import os
import sys

from ddt_jax import host_memory

if __name__ == "__main__":
    # Before anything else runs: may re-execute this process with huge pages for XLA:CPU's
    # per-step temporaries (see ddt_jax/host_memory.py).
    host_memory.use_huge_pages()

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from ddt_jax import console  # noqa: E402
from ddt_jax import sharding  # noqa: E402
from ddt_jax.evaluation import evaluate_npz  # noqa: E402
from ddt_jax.evaluation import inception_features as features_lib  # noqa: E402
from ddt_jax.evaluation import reference  # noqa: E402

flags.DEFINE_string("inception", None, "Inception-v3 weights: pytorch-fid's "
                    f"{evaluate_npz.INCEPTION_FILE} or its converted .safetensors.")
flags.DEFINE_string("output", None, "Write the metrics here as JSON.")
flags.DEFINE_integer("batch_size", features_lib.DEFAULT_BATCH_SIZE, "Images per step over all "
                     "devices (rounded up to a multiple of the device count).")
flags.DEFINE_string("cache_dir", None, "Folder of the activation caches; default: beside each "
                    "input file.")
flags.DEFINE_bool("no_cache", False, "Neither read nor write the activation caches.")
flags.DEFINE_enum("distance_dtype", "float16", evaluate_npz.DISTANCE_DTYPES,
                  "Precision/recall distances: float16 as ADM, or float32.")
flags.DEFINE_bool("allow_size_mismatch", False, "Evaluate samples whose size differs from the "
                  "reference images'.")
flags.DEFINE_string("make_ref", None, "Write a reference batch from the one SOURCE argument "
                    "(sample .npz, records directory or image folder) to this .npz.")
flags.DEFINE_integer("resolution", None, "--make_ref from an image folder: ADM center-crop side.")
flags.DEFINE_integer("ref_images", reference.DEFAULT_REF_IMAGES, "--make_ref: images in arr_0.")
flags.DEFINE_integer("ref_seed", 0, "--make_ref: seed of arr_0's random subset.")
flags.DEFINE_integer("workers", None, "--make_ref: image decoding threads; default: CPU count.")
flags.DEFINE_bool("progress", True, "Show images/s and ETA.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs "
                    "outside clusters JAX detects itself.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS


def _run(paths: list[str]) -> str:
    expected = 1 if FLAGS.make_ref else 2
    if len(paths) != expected:
        raise app.UsageError("usage: evaluate.py REF.npz SAMPLES.npz --inception=PTH, or "
                             "evaluate.py SOURCE --make_ref=OUT.npz --inception=PTH; "
                             f"got {len(paths)} positional arguments")
    net = evaluate_npz.load_inception(FLAGS.inception)
    runner = features_lib.InceptionRunner(net, batch_size=FLAGS.batch_size)
    if FLAGS.make_ref:
        summary = reference.make_reference(
            paths[0], FLAGS.make_ref, runner, resolution=FLAGS.resolution,
            num_images=FLAGS.ref_images, seed=FLAGS.ref_seed, workers=FLAGS.workers,
            progress=FLAGS.progress)
        return (f"wrote {summary['output']}: arr_0 = {summary['num_ref_images']} images, "
                f"statistics over all {summary['num_source_images']} of {summary['source']}")
    metrics = evaluate_npz.evaluate(
        paths[0], paths[1], runner, cache=not FLAGS.no_cache, cache_dir=FLAGS.cache_dir,
        distance_dtype=FLAGS.distance_dtype, allow_size_mismatch=FLAGS.allow_size_mismatch,
        output=FLAGS.output, progress=FLAGS.progress)
    for warning in metrics["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return evaluate_npz.format_metrics(metrics)


def main(argv):
    console.quiet_library_logs()
    # Before anything touches a JAX backend: jax.distributed.initialize must come first.
    sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
    try:
        report = _run(argv[1:])
    except (ValueError, FileNotFoundError) as e:
        # A bad input file or missing weights: say so, without a traceback.
        raise SystemExit(f"error: {e}") from e
    if jax.process_index() == 0:
        print(report)
        if FLAGS.output and not FLAGS.make_ref:
            print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)
