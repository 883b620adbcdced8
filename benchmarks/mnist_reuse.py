"""Encoder reuse on the trained demo model: sampling speed and sample quality at refresh rate K.

For K = 1, 2, 4 (the encoder runs at steps i % K == 0, the decoder alone reuses its state otherwise)
the same 1,000 balanced labels and the same noise are sampled with the demo's settings (25 Euler
steps, CFG 3.0); images/s is the median of --repeats timed passes after a warm-up (compilation
excluded), all K measured in this process, so the ratios against K = 1 compare like with like.
Each K's samples are scored with the shipped MNIST classifier (label accuracy, Frechet distance to
the held-out digits). Needs a trained demo run (`make demo`); writes <workdir>/reuse.json.
"""
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np
from absl import app
from absl import flags

from ddt_jax import sample_dump
from ddt_jax import sampler as sampler_lib
from ddt_jax.evaluation import mnist_eval

flags.DEFINE_string("workdir", "runs/mnist", "A trained demo run (make demo).")
flags.DEFINE_string("refresh_rates", "1,2,4", "Comma-separated state_refresh_rate values K.")
flags.DEFINE_integer("num_samples", 1000, "Balanced samples per K.")
flags.DEFINE_integer("batch_size", 200, "Samples per sampler call.")
flags.DEFINE_integer("num_steps", 25, "Euler steps.")
flags.DEFINE_integer("repeats", 3, "Timed passes over the first batch per K (median reported).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    workdir = pathlib.Path(FLAGS.workdir).absolute()
    args = sample_dump.DumpArgs(workdir=str(workdir), output=str(workdir / "reuse"),
                                batch_size=FLAGS.batch_size)
    mesh = sample_dump.make_mesh()
    source = sample_dump.load_source(args, mesh)
    labels = sample_dump.sample_labels(FLAGS.num_samples, source.num_classes, seed=0, balanced=True)
    num_batches = FLAGS.num_samples // FLAGS.batch_size

    results = []
    for k in [int(v) for v in FLAGS.refresh_rates.split(",")]:
        config = sampler_lib.default_sampler_config()
        config.update(num_steps=FLAGS.num_steps, guidance=3.0, guidance_interval_min=0.0,
                      state_refresh_rate=k)
        batches = sample_dump.BatchSampler(source, sampler_lib.read_config(config),
                                           batch_size=FLAGS.batch_size, seed=0, mesh=mesh)
        jax.block_until_ready(batches(0, labels[:FLAGS.batch_size]))          # compile + warm up
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            jax.block_until_ready(batches(0, labels[:FLAGS.batch_size]))
            times.append(time.perf_counter() - start)
        images = np.concatenate(
            [np.asarray(batches(i, labels[i * FLAGS.batch_size:(i + 1) * FLAGS.batch_size]))
             for i in range(num_batches)])
        metrics = mnist_eval.evaluate_samples((images, labels[:len(images)]))
        results.append(dict(state_refresh_rate=k,
                            images_per_second=FLAGS.batch_size / statistics.median(times),
                            label_accuracy=metrics["label_accuracy"],
                            frechet_distance=metrics["frechet_distance"],
                            real_frechet_floor=metrics["real_frechet_floor"]))
    base = results[0]["images_per_second"]
    print(f"\n{FLAGS.num_samples} balanced samples, {FLAGS.num_steps} Euler steps, CFG 3.0, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"{'K':>3s} {'images/s':>10s} {'vs K=1':>8s} {'label acc':>10s} {'Frechet':>9s}")
    for r in results:
        r["speedup_vs_k1"] = r["images_per_second"] / base
        print(f"{r['state_refresh_rate']:3d} {r['images_per_second']:10.1f} "
              f"{r['speedup_vs_k1']:7.2f}x {r['label_accuracy']:10.4f} "
              f"{r['frechet_distance']:9.2f}")
    print(f"real-digit Frechet floor: {results[0]['real_frechet_floor']:.2f}")
    (workdir / "reuse.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)
