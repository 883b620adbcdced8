"""ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`) behind evaluate.py:
Inception Score, FID, sFID, precision and recall of a sample .npz against a reference batch.

As ADM computes them: FID / sFID against the reference's stored whole-train-set statistics when it
holds them (`mu, sigma, mu_s, sigma_s`), else against its arr_0's; precision / recall between
arr_0's and all samples' pool_3 features; IS over consecutive splits of 5,000 samples (so it
depends on the sample order: a class-sorted dump is warned about).
"""
from __future__ import annotations

import json
import warnings

import jax
from flax import nnx

from ddt_jax import convert
from ddt_jax import files
from ddt_jax.evaluation import adm
from ddt_jax.evaluation import inception_features as features_lib
from ddt_jax.evaluation import reference

# (JSON key, ADM's printed name), in the order ADM prints them.
METRICS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
           ("precision", "Precision"), ("recall", "Recall"))
DISTANCE_DTYPES = adm.DISTANCE_DTYPES   # float16 is ADM's; float32/64 on request
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
HOW_TO_GET_INCEPTION = (
    f"get pytorch-fid's {INCEPTION_FILE} (the 2015 Inception-v3 of ADM's TF graph: "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    f"{INCEPTION_FILE}) and pass it as --inception, or convert it once with `python -m "
    f"ddt_jax.convert inception --input={INCEPTION_FILE} --output=inception.safetensors`")


def load_inception(path) -> nnx.Module:
    """The Inception-v3 of a pytorch-fid .pth or converted .safetensors; a clear error if absent."""
    if not path or not files.as_path(path).is_file():
        raise FileNotFoundError(f"--inception={path or ''}: no such file; {HOW_TO_GET_INCEPTION}")
    return convert.load_inception(path)


def check_sizes(ref: features_lib.ArrayHeader, samples: features_lib.ArrayHeader, *,
                allow_size_mismatch: bool = False) -> list[str]:
    """Raises (or, allowed, warns) when the reference and the samples differ in image size."""
    if ref.shape[1:3] == samples.shape[1:3]:
        return []
    (h, w), (sh, sw) = ref.shape[1:3], samples.shape[1:3]
    message = (f"the reference images are {h}x{w} but the samples are {sh}x{sw}: ADM resizes both "
               "to 299x299, so the metrics would compare resolutions, not the model (a 256 px "
               "dump against a 512 px reference batch is a mistake)")
    if not allow_size_mismatch:
        raise ValueError(f"{message}; use the reference batch of the samples' resolution, or "
                         "pass --allow_size_mismatch to compare them anyway")
    return [message]


def compute_metrics(ref: dict, samples: dict, ref_stats: dict | None = None, *,
                    distance_dtype: str = "float16") -> tuple[dict, list[str]]:
    """The five ADM metrics from activations.

    Args:
      ref: the reference batch's arr_0 features ({"pool", "spatial", ...}).
      samples: the samples' features ({"pool", "spatial", "softmax"}).
      ref_stats: stored `mu, sigma, mu_s, sigma_s`; None: computed from `ref`.
      distance_dtype: precision/recall distances ("float16" as ADM, or "float32").

    Returns:
      ({inception_score, fid, sfid, precision, recall} as floats, warnings raised meanwhile).
    """
    if ref_stats is None:
        mu, sigma = adm.statistics(ref["pool"])
        mu_s, sigma_s = adm.statistics(ref["spatial"])
    else:
        mu, sigma, mu_s, sigma_s = (ref_stats[k] for k in reference.STAT_KEYS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid = adm.frechet_distance(*adm.statistics(samples["pool"]), mu, sigma)
        sfid = adm.frechet_distance(*adm.statistics(samples["spatial"]), mu_s, sigma_s)
        precision, recall = adm.precision_recall(ref["pool"], samples["pool"],
                                                 distance_dtype=distance_dtype)
        score = adm.inception_score(samples["softmax"])
    values = dict(inception_score=score, fid=fid, sfid=sfid, precision=precision, recall=recall)
    return ({k: float(v) for k, v in values.items()},
            list(dict.fromkeys(str(w.message) for w in caught)))


def evaluate(ref_path, sample_path, net, *, batch_size: int = features_lib.DEFAULT_BATCH_SIZE,
             devices=None, cache: bool = True, cache_dir=None, distance_dtype: str = "float16",
             allow_size_mismatch: bool = False, output=None, progress: bool = True) -> dict:
    """IS, FID, sFID, precision and recall of a sample .npz against an ADM reference batch.

    Args:
      ref_path: the reference batch (arr_0 uint8 NHWC; `mu, sigma, mu_s, sigma_s` optional).
      sample_path: the samples (arr_0 uint8 NHWC, N >= 2; arr_1 labels optional).
      net: an InceptionV3, or an InceptionRunner (then `batch_size` and `devices` are its own).
      batch_size: images per step over all devices (padded to a multiple of the device count).
      devices: the mesh's devices; None: all.
      cache: read and write the activation caches beside the inputs (or in `cache_dir`).
      cache_dir: where the caches live when not beside the inputs.
      distance_dtype: precision/recall distances, "float16" (ADM's) or "float32".
      allow_size_mismatch: evaluate samples whose size differs from the reference's.
      output: write the metrics as JSON here too (atomically, by process 0).
      progress: show images/s.

    Returns:
      {inception_score, fid, sfid, precision, recall, num_samples, num_ref, ref, samples,
      ref_sha256, samples_sha256, inception (weights fingerprint), ref_statistics ("stored" or
      "arr_0"), ref_image_shape, sample_image_shape, distance_dtype, cached, warnings}.
    """
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"--distance_dtype={distance_dtype!r}: use one of {DISTANCE_DTYPES}")
    # Every check that reads only headers comes before the network runs for minutes.
    ref_stats = reference.stored_statistics(ref_path)
    ref_header = features_lib.read_header(ref_path)
    sample_header = features_lib.read_header(sample_path)
    features_lib.check_images(ref_header, ref_path, statistics=ref_stats is None)
    features_lib.check_images(sample_header, sample_path)
    notes = check_sizes(ref_header, sample_header, allow_size_mismatch=allow_size_mismatch)

    runner = (net if isinstance(net, features_lib.InceptionRunner)
              else features_lib.InceptionRunner(net, batch_size=batch_size, devices=devices))
    kwargs = dict(cache=cache, cache_dir=cache_dir, progress=progress)
    ref = features_lib.file_activations(ref_path, runner, statistics=ref_stats is None, **kwargs)
    samples = features_lib.file_activations(sample_path, runner, **kwargs)
    metrics, raised = compute_metrics(ref.features, samples.features, ref_stats,
                                      distance_dtype=distance_dtype)
    sorted_note = adm.looks_class_sorted(labels=samples.labels,
                                         softmax=samples.features["softmax"])
    notes += ref.warnings + samples.warnings + raised + ([sorted_note] if sorted_note else [])

    result = dict(
        metrics, num_samples=samples.shape[0], num_ref=ref.shape[0], ref=str(ref_path),
        samples=str(sample_path), ref_sha256=ref.sha256, samples_sha256=samples.sha256,
        inception=runner.fingerprint, ref_statistics="arr_0" if ref_stats is None else "stored",
        ref_image_shape=list(ref.shape[1:]), sample_image_shape=list(samples.shape[1:]),
        distance_dtype=distance_dtype, cached=dict(ref=ref.cached, samples=samples.cached),
        warnings=notes)
    if output is not None and jax.process_index() == 0:
        output = files.as_path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        text = (json.dumps(result, indent=2) + "\n").encode()
        files.atomic_write(output, lambda f: f.write(text))
    return result


def format_metrics(metrics: dict) -> str:
    """ADM's table: one `Name: value` line per metric, in ADM's order."""
    return "\n".join(f"{name}: {metrics[key]}" for key, name in METRICS)
