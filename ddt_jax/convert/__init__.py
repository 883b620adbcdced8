"""Official PyTorch checkpoints (DDT / DiT, DINOv2, SD-VAE, FID Inception) -> NNX models.

Each family has its own module (`ddt`, `dinov2`, `vae`, `inception`) that renames keys and
infers the architecture from the tensor shapes; all of them read files with
`state_dict.read_state_dict` and fill our params with the one shared `fill.fill_params`, which
maps every param to exactly one torch key and reports missing, unexpected and mis-shaped tensors
together. Only local files are read (nothing is downloaded); torch is needed only to unpickle torch
files. The command line lives in `cli` (`python -m ddt_jax.convert`); converted DDT directories
are owned by `ddt_jax.weights`.
"""
from ddt_jax.convert.ddt import (
    LIGHTNING_EMA_PREFIX,
    LIGHTNING_RAW_PREFIX,
    LIGHTNING_REPA_PREFIX,
    ddt_from_state_dict,
    infer_ddt_config,
    load_ddt,
    load_repa_projector,
    repa_projector_from_state_dict,
    split_ddt_checkpoint,
)
from ddt_jax.convert.dinov2 import (
    convert_dinov2,
    dinov2_config_from_state_dict,
    dinov2_state_from_state_dict,
    load_dinov2,
)
from ddt_jax.convert.fill import fill_params
from ddt_jax.convert.inception import (
    convert_inception,
    inception_from_state_dict,
    load_inception,
)
from ddt_jax.convert.state_dict import PICKLE_SUFFIXES, read_state_dict
from ddt_jax.convert.vae import VAE_WEIGHT_NAMES, convert_vae, load_vae

__all__ = [
    "LIGHTNING_EMA_PREFIX", "LIGHTNING_RAW_PREFIX", "LIGHTNING_REPA_PREFIX", "PICKLE_SUFFIXES",
    "VAE_WEIGHT_NAMES", "convert_dinov2", "convert_inception", "convert_vae",
    "ddt_from_state_dict", "dinov2_config_from_state_dict", "dinov2_state_from_state_dict",
    "fill_params", "inception_from_state_dict", "infer_ddt_config", "load_ddt", "load_dinov2",
    "load_inception", "load_repa_projector", "load_vae",
    "read_state_dict", "repa_projector_from_state_dict", "split_ddt_checkpoint",
]
