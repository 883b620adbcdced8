"""Reads a weight file as a flat {key: numpy array} dict, the common input of every converter.

torch pickles (`.ckpt` / `.pt` / `.pth` / `.bin`) and `.safetensors` files are both read here, so
the family converters never touch a file format and torch stays an optional dependency.
"""
from __future__ import annotations

import io
import os
from typing import Mapping

import numpy as np
from safetensors import numpy as safetensors_numpy

from ddt_jax import files

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads the tensors of a torch pickle or a safetensors file.

    A Lightning checkpoint's `state_dict` entry is returned whole (prefixes such as `denoiser.`
    and `ema_denoiser.` are kept; callers pick what they need). Non-tensor entries are dropped and
    bfloat16 tensors become float32.

    Args:
      path: a `.safetensors` file or a torch pickle (one of PICKLE_SUFFIXES), local or gs://
        (a remote file is read into memory once).

    Returns:
      {key: numpy array} with the file's key names.
    """
    path = files.as_path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"weight file {path} does not exist. Convert weights from a file you have locally; "
            "nothing is downloaded at run time.")
    if path.suffix == ".safetensors":
        if files.is_local(path):
            return dict(safetensors_numpy.load_file(str(path)))
        return dict(safetensors_numpy.load(path.read_bytes()))
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format {path.suffix!r}; expected .safetensors "
                         f"or one of {PICKLE_SUFFIXES} (torch pickles)")
    try:
        import torch  # imported here: torch is optional, needed only to unpickle torch files
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs PyTorch (it is a torch pickle): `pip install torch` (the CPU "
            "build is enough), or convert it to .safetensors elsewhere") from e
    source = str(path) if files.is_local(path) else io.BytesIO(path.read_bytes())
    obj = torch.load(source, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of tensors), got "
                         f"{type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            out[key] = value.numpy()
    return out
