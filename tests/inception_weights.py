"""The Inception fixture's weights (tests/fixtures/inception/), regenerated from their NumPy recipe.

Shared by the Inception, evaluator and FID-monitor tests: one generator, the keys in order, each
tensor drawn whole in float64 and cast to float32 (the recipe of inception_weights.json).
"""
import hashlib
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

HERE = pathlib.Path(__file__).parent / "fixtures" / "inception"
COUNTER = "num_batches_tracked"


def spec() -> dict:
    return json.loads((HERE / "inception_weights.json").read_text())


def regenerate(recipe: dict) -> dict[str, np.ndarray]:
    """The fixture's state dict, `num_batches_tracked` counters (int64 0, no draw) included."""
    rng = np.random.default_rng(recipe["seed"])
    draws = {".conv.weight": None, ".bn.weight": (rng.uniform, 0.5, 1.5),
             ".bn.bias": (rng.normal, 0.0, 0.1), ".bn.running_mean": (rng.normal, 0.0, 0.1),
             ".bn.running_var": (rng.uniform, 0.5, 1.5), "fc.weight": (rng.normal, 0.0, 0.02),
             "fc.bias": (rng.normal, 0.0, 1.0)}
    sd = {}
    for key, shape, _ in recipe["keys"]:
        if key.endswith(COUNTER):
            sd[key] = np.zeros(shape, np.int64)
            continue
        suffix = next(s for s in draws if key.endswith(s))
        if suffix == ".conv.weight":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), size=shape)
        else:
            draw, a, b = draws[suffix]
            value = draw(a, b, size=shape)
        sd[key] = value.astype(np.float32)
    return sd


def fingerprint(sd: dict) -> str:
    """SHA-256 of the float tensors' little-endian float32 bytes in key order (the json's)."""
    digest = hashlib.sha256()
    for key, value in sd.items():
        if not key.endswith(COUNTER):
            digest.update(np.ascontiguousarray(value, "<f4").tobytes())
    return digest.hexdigest()


def write_safetensors(path) -> pathlib.Path:
    """The regenerated weights (counters dropped) as a .safetensors that load_inception reads."""
    sd = regenerate(spec())
    save_file({k: v for k, v in sd.items() if not k.endswith(COUNTER)}, str(path))
    return pathlib.Path(path)
