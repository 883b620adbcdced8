"""Official PyTorch checkpoints -> ddt-jax params, converted once, offline.

Reads the files users already have (nothing is downloaded):
  * DDT: the published Lightning `.ckpt`, a plain torch state dict (`.pt` / `.pth`) or `.safetensors`;
  * DINOv2: the torch-hub `dinov2_vit*14_pretrain.pth` or a `.safetensors` with the same keys;
  * SD-VAE: a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`) or one file.

torch is imported only to unpickle `.ckpt` / `.pt` / `.pth` files.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat {key: float32/int numpy array} dict from a torch pickle or a safetensors file.

    A Lightning checkpoint's `state_dict` entry is returned whole (prefixes such as `denoiser.` and
    `ema_denoiser.` are kept; callers pick what they need).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"weight file {path} does not exist. Convert weights from a file you have locally; "
            "nothing is downloaded at run time.")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return dict(load_file(str(path)))
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format {path.suffix!r}; expected .safetensors or one "
                         f"of {PICKLE_SUFFIXES} (torch pickles)")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs PyTorch (it is a torch pickle): `pip install torch` (CPU build is "
            "enough), or convert it to .safetensors elsewhere") from e
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            out[key] = value.numpy()
    return out
