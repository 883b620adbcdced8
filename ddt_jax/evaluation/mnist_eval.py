"""How good are class-conditional MNIST samples? Label accuracy and a Frechet distance with context.

For a sample dump in the ADM layout (`arr_0` uint8 NHWC (N, 32, 32, 1), `arr_1` int labels), using
the shipped digit classifier (mnist_classifier.py, trained on the `train` split only):
  * label_accuracy: fraction of samples the classifier reads as their conditioning label (overall
    and per class): does the model draw the digit it was asked for;
  * frechet_distance: Frechet distance (ADM arithmetic, frechet.py) between the classifier's 64-d
    penultimate features of the samples and of the 2,000 held-out real `test` digits;
  * real_frechet_floor: the same distance from real `train` digits to the same `test` digits: what
    real data scores. A generator as good as the data lands near the floor, not at 0. The floor
    digits are drawn with the samples' label histogram (so N matches, and the estimate's bias
    depends on N) and the mean and std over 5 fixed-seed draws are reported. Matching the labels
    matters: the feature distribution is a mixture of 10 well separated classes, so the class
    proportions of a subset move the distance. Measured at N = 1000 over 10 draws: uniformly
    random train subsets 12.1 +- 4.8; label-matched to the test split 6.4 +- 0.9; 100 per class
    9.4 +- 1.5 (the class mix differs from the test split's). Evaluate >= 2,000 samples: at N =
    2000 the same three read 6.9 +- 1.9, 4.1 +- 0.5 and 7.1 +- 0.9. (The classifier saw the train
    digits in training, so the floor may be slightly optimistic.)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import zipfile
from typing import Mapping

import numpy as np

from ddt_jax.evaluation import frechet
from ddt_jax.evaluation import mnist_classifier
from input_pipeline.mnist_digits import load_mnist

FLOOR_SEED = 0
FLOOR_REPEATS = 5
NUM_CLASSES = mnist_classifier.NUM_CLASSES
SAMPLE_SHAPE = (mnist_classifier.IMAGE_SIZE, mnist_classifier.IMAGE_SIZE, 1)
LAYOUT = ("ADM layout: arr_0 = uint8 images (N, 32, 32, 1) NHWC, "
          "arr_1 = integer class labels (N,)")


def validate_samples(images, labels, source: str = "samples") -> tuple[np.ndarray, np.ndarray]:
    """Checks an (arr_0, arr_1) pair against the ADM layout.

    Returns (uint8 images, int32 labels).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: arr_0 must be uint8 in [0, 255], got {images.dtype} "
                         "(write samples as uint8(clip((x + 1) * 127.5 + 0.5)) from [-1, 1]); "
                         f"{LAYOUT}")
    if images.ndim != 4 or images.shape[1:] != SAMPLE_SHAPE:
        raise ValueError(f"{source}: arr_0 must have shape (N, 32, 32, 1), got {images.shape}; "
                         f"{LAYOUT}")
    if images.shape[0] < 2:
        raise ValueError(f"{source}: need at least 2 samples for a covariance, "
                         f"got {images.shape[0]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: arr_1 must hold integer class labels, got {labels.dtype}; "
                         f"{LAYOUT}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{source}: arr_1 must have shape ({images.shape[0]},) to match arr_0, "
                         f"got {labels.shape}; {LAYOUT}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{source}: arr_1 labels must be digits 0..{NUM_CLASSES - 1}, got range "
                         f"[{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int32)


def load_samples(samples) -> tuple[np.ndarray, np.ndarray, str]:
    """A .npz path, an {arr_0, arr_1} mapping or an (images, labels) pair.

    Returns (images, labels, source), checked by `validate_samples`.
    """
    if isinstance(samples, (str, os.PathLike)):
        path = pathlib.Path(samples)
        if not path.exists():
            raise FileNotFoundError(f"sample file {path} does not exist")
        arrays, source = _read_npz(path), str(path)
    elif isinstance(samples, Mapping):
        arrays, source = dict(samples), "samples"
    elif isinstance(samples, (tuple, list)) and len(samples) == 2:
        arrays, source = {"arr_0": samples[0], "arr_1": samples[1]}, "samples"
    else:
        raise TypeError("samples must be a .npz path, a mapping with arr_0/arr_1 or an "
                        f"(images, labels) pair, got {type(samples).__name__}")
    missing = [k for k in ("arr_0", "arr_1") if k not in arrays]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)} (found {sorted(arrays)}); the "
                         f"evaluation needs class-conditional samples in the {LAYOUT}")
    images, labels = validate_samples(arrays["arr_0"], arrays["arr_1"], source)
    return images, labels, source


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a .npz, or a ValueError naming the file when it is damaged or truncated."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a complete .npz ({type(e).__name__}: {e}); it is probably truncated "
            "(an interrupted copy or dump): copy it again, or rerun sample.py with the same "
            "--output to rewrite it (delete the damaged samples.npz first)") from e


@functools.lru_cache(maxsize=4)
def _real_features(classifier: mnist_classifier.Classifier, split: str) -> np.ndarray:
    """Features of a real split, computed once per classifier (8,000 train digits take seconds)."""
    features = classifier.features(load_mnist(split)[0])
    features.setflags(write=False)
    return features


def _same_labels_subset(train_labels: np.ndarray, sample_labels: np.ndarray,
                        rng: np.random.RandomState) -> tuple[np.ndarray, bool]:
    """Indices of train digits with the same per-class counts as the samples; with replacement only
    for a class asked more often than the train split holds it (~680-900 digits per class)."""
    subset, replaced = [], False
    for digit in range(NUM_CLASSES):
        count = int((sample_labels == digit).sum())
        pool = np.flatnonzero(train_labels == digit)
        replace = count > len(pool)
        subset.append(rng.choice(pool, count, replace=replace))
        replaced |= replace
    return np.concatenate(subset), replaced


def evaluate_samples(samples, *,
                     classifier: mnist_classifier.Classifier | str | os.PathLike | None = None,
                     output: str | os.PathLike | None = None, floor_seed: int = FLOOR_SEED) -> dict:
    """Label accuracy and Frechet distance of class-conditional digit samples (see module doc).

    Args:
      samples: a .npz path in the ADM layout, a mapping with `arr_0` and `arr_1`, or an
        (images, labels) pair: uint8 (N, 32, 32, 1) images, N >= 2, and int labels 0..9.
      classifier: a `mnist_classifier.Classifier`, the path of saved weights, or None for the
        shipped classifier.
      output: where to write the metrics as JSON as well (parent directories are created).
      floor_seed: seed of the label-matched real-digit draws of the floor.

    Returns:
      The metrics: `label_accuracy` (and per class), `frechet_distance`, `real_frechet_floor`
      (with its std and the individual draws), per-class sample and prediction counts, and where
      the samples, reference and classifier came from.
    """
    images, labels, source = load_samples(samples)
    if classifier is None:
        classifier = mnist_classifier.default_classifier()
    elif not isinstance(classifier, mnist_classifier.Classifier):
        classifier = mnist_classifier.load_classifier(classifier)
    n = len(labels)

    sample_feats, sample_logits = classifier.features_and_logits(images)
    predicted = sample_logits.argmax(axis=-1)
    correct = predicted == labels
    per_class, counts = {}, {}
    for digit in range(NUM_CLASSES):
        mask = labels == digit
        counts[str(digit)] = int(mask.sum())
        per_class[str(digit)] = float(correct[mask].mean()) if mask.any() else None

    test_feats = _real_features(classifier, "test")
    train_feats = _real_features(classifier, "train")
    ref_stats = frechet.feature_statistics(test_feats)
    fd = frechet.frechet_distance(*frechet.feature_statistics(sample_feats), *ref_stats)

    # The floor: real train digits with the samples' label histogram, FLOOR_REPEATS draws
    # (module doc).
    train_labels = load_mnist("train")[1]
    rng = np.random.RandomState(floor_seed)
    floors, with_replacement = [], False
    for _ in range(FLOOR_REPEATS):
        subset, replaced = _same_labels_subset(train_labels, labels, rng)
        with_replacement |= replaced
        floors.append(frechet.frechet_distance(*frechet.feature_statistics(train_feats[subset]),
                                               *ref_stats))

    metrics = {
        "samples": source,
        "num_samples": n,
        "label_accuracy": float(correct.mean()),
        "label_accuracy_per_class": per_class,
        "samples_per_class": counts,
        "predicted_per_class": {str(d): int((predicted == d).sum()) for d in range(NUM_CLASSES)},
        "frechet_distance": fd,
        "real_frechet_floor": float(np.mean(floors)),
        "real_frechet_floor_std": float(np.std(floors)),
        "real_frechet_floor_runs": floors,
        "floor_num_train_digits": n,
        "floor_with_replacement": with_replacement,
        "floor_seed": floor_seed,
        "reference": f"held-out MNIST test split ({len(test_feats)} digits)",
        "feature_dim": int(sample_feats.shape[1]),
        "classifier": classifier.metadata.get("path"),  # None for an unsaved classifier
        "classifier_test_accuracy": classifier.metadata.get("test_accuracy"),
    }
    if output is not None:
        output = pathlib.Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_metrics(m: dict) -> str:
    clf_acc = m["classifier_test_accuracy"]
    clf_note = (f"   (classifier on real held-out digits: {clf_acc:.4f})" if clf_acc is not None
                else "")
    per_class = "  ".join(f"{d}:{'  -  ' if a is None else f'{a:.3f}'}"
                          for d, a in m["label_accuracy_per_class"].items())
    return "\n".join([
        f"samples            {m['num_samples']} from {m['samples']}",
        f"label accuracy     {m['label_accuracy']:.4f}{clf_note}",
        f"  per class        {per_class}",
        f"Frechet distance   {m['frechet_distance']:.4f}   "
        f"(classifier features vs {m['reference']})",
        f"real-data floor    {m['real_frechet_floor']:.4f} +- {m['real_frechet_floor_std']:.4f}   "
        f"({m['floor_num_train_digits']} real train digits vs the same reference, "
        f"{len(m['real_frechet_floor_runs'])} subsets)",
    ])


def main(argv=None) -> None:
    """The command line: scores a sample .npz, prints the metrics and optionally writes them.

    Args:
      argv: the arguments after the program name; None reads them from sys.argv.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help=f"sample .npz ({LAYOUT})")
    parser.add_argument("--output", default=None, help="write the metrics here as JSON")
    parser.add_argument("--classifier", default=str(mnist_classifier.DEFAULT_WEIGHTS),
                        help="classifier weights (.safetensors, json beside it)")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_samples(args.samples, classifier=args.classifier, output=args.output)
    except (ValueError, FileNotFoundError) as e:
        # A bad sample file or missing weights: say so, without a traceback.
        raise SystemExit(f"error: {e}") from e
    print(format_metrics(metrics))
    if args.output:
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
