"""The paper's claim in miniature: DDT's encoder/decoder split vs the plain DiT baseline on MNIST.

Every model has the demo's size (configs/mnist.py: hidden 96, 6 blocks, 4 heads, patch 4; the DiT
baseline lacks only DDT's 1,632-parameter s_embedder) and trains the same number of steps on the
same data order; only the architecture and the seed change. Each run then draws 1,000 balanced
samples (CFG 3.0, 50 Euler steps) and is scored with the shipped MNIST classifier: label accuracy
and the Frechet distance of its features to the held-out digits (lower is better). Runs already
finished in --workdir are read back, so an interrupted ablation continues where it stopped.
Prints a table and writes <workdir>/ablation.json.
"""
import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags

# configs/ is a directory of the repository, not an installed package: import it from the root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import mnist as mnist_config  # noqa: E402
from ddt_jax import sample_dump  # noqa: E402
from ddt_jax import trainer  # noqa: E402
from ddt_jax.evaluation import mnist_eval  # noqa: E402
from input_pipeline import mnist  # noqa: E402

flags.DEFINE_string("workdir", "runs/ablation", "Where runs, samples and ablation.json go.")
flags.DEFINE_integer("steps", 600, "Training steps per run.")
flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
flags.DEFINE_string("archs", "dit,en2,en4,en5",
                    "configs/mnist.py arguments: 'dit' or 'enN' (N encoder blocks of 6).")
flags.DEFINE_integer("num_samples", 1000, "Balanced samples per run.")
FLAGS = flags.FLAGS

NAMES = {"dit": "DiT baseline (6 blocks)", "en2": "DDT 2en4de", "en3": "DDT 3en3de",
         "en4": "DDT 4en2de", "en5": "DDT 5en1de", "en1": "DDT 1en5de"}


def run_one(arch: str, seed: int, root: pathlib.Path, data_dir: pathlib.Path) -> dict:
    run_dir = root / f"{arch}_seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    config = mnist_config.get_config(arch)
    config.seed = seed
    config.num_train_steps = FLAGS.steps
    config.data.path = str(data_dir)
    # The same data order for every run: only the model and seed change.
    config.data.shuffle_seed = 0
    config.logging.sample_every = 0
    config.checkpoint.every_steps = FLAGS.steps
    start = time.time()
    trainer.train_and_evaluate(config, str(run_dir))
    train_s = time.time() - start

    sampler_config = sample_dump.resolve_sampler_config(config.logging.sample)
    args = sample_dump.DumpArgs(output=str(run_dir / "samples"), workdir=str(run_dir),
                                num_samples=FLAGS.num_samples, batch_size=100, seed=1234,
                                balanced=True)
    sample_dump.run(args, sampler_config)
    metrics = mnist_eval.evaluate_samples(str(run_dir / "samples" / "samples.npz"))
    result = dict(arch=arch, name=NAMES.get(arch, arch), seed=seed, steps=FLAGS.steps,
                  train_seconds=train_s, label_accuracy=metrics["label_accuracy"],
                  frechet_distance=metrics["frechet_distance"],
                  real_frechet_floor=metrics["real_frechet_floor"],
                  real_frechet_floor_std=metrics["real_frechet_floor_std"])
    result_path.write_text(json.dumps(result, indent=2))
    return result


def main(argv):
    del argv
    root = pathlib.Path(FLAGS.workdir).absolute()
    data_dir = root / "data"
    mnist.write_mnist_shards(data_dir, split="train")
    seeds = [int(s) for s in FLAGS.seeds.split(",")]
    archs = FLAGS.archs.split(",")
    results = [run_one(arch, seed, root, data_dir) for arch in archs for seed in seeds]
    (root / "ablation.json").write_text(json.dumps(results, indent=2))

    print(f"\n{FLAGS.steps} steps, batch {mnist_config.get_config().global_batch_size}, "
          f"{FLAGS.num_samples} balanced samples, CFG 3.0, 50 Euler steps")
    print(f"{'model':26s} {'label accuracy':>22s} {'Frechet distance':>22s}")
    for arch in archs:
        rows = [r for r in results if r["arch"] == arch]
        acc = [r["label_accuracy"] for r in rows]
        fd = [r["frechet_distance"] for r in rows]
        spread = lambda v: f"{sum(v) / len(v):.4f} ({' / '.join(f'{x:.4f}' for x in v)})"
        print(f"{NAMES.get(arch, arch):26s} {spread(acc):>22s} {spread(fd):>22s}")
    r = results[0]
    print("real train digits vs the held-out digits (the floor): "
          f"Frechet {r['real_frechet_floor']:.3f} +- {r['real_frechet_floor_std']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)
