"""The one owner of where model weights live on disk, and the loader that places them on devices.

Three kinds of source hold DDT weights, and this module is the only code that knows their layout:

  a training run   <workdir>/config.json + <workdir>/checkpoints/<step>/state, the TrainState below
  a converted dir  <dir>/model_config.json + <dir>/params [+ <dir>/repa_projector] (orbax)
  an official file a Lightning .ckpt, a .pt/.pth state dict or a .safetensors (read by convert/)

Every loader takes abstract targets (ShapeDtypeStructs with shardings) and returns arrays already in
those shardings: orbax reads only each host's shards, and host weights from an official file become
global arrays through `jax.make_array_from_callback`, so a multi-process load never all-gathers
weights between hosts.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import convert
from ddt_jax import sharding
from ddt_jax.models import ddt

# ---------------------------------------------------------------------------------------------
# The layout of a training run's checkpointed state.

RUN_CONFIG = "config.json"          # the run's whole config, written by the trainer
MODEL, PROJECTOR = "model", "projector"   # the keys of TrainState.params


@flax.struct.dataclass
class TrainState:
    """Everything a train step updates; param trees are nested dicts of arrays (nnx pure dicts).

    Saved as one orbax item (checkpoint.STATE_ITEM) with exactly these keys.
    """
    step: jax.Array                 # int32 scalar: optimizer steps taken
    params: dict[str, Any]          # {MODEL: ..., PROJECTOR: ...}; no PROJECTOR without REPA
    opt_state: Any                  # AdamW state over `params`
    ema_params: dict[str, Any]      # EMA of params[MODEL] (what samples and evaluation use)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "ema_params": self.ema_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"],
                   ema_params=d["ema_params"])


def _run_subtree(which: str, tree) -> dict[str, Any]:
    """The partial TrainState dict that holds `tree` as the raw or EMA model params."""
    if which == "raw":
        return {"params": {MODEL: tree}}
    if which == "ema":
        return {"ema_params": tree}
    raise ValueError(f"weights must be 'raw' or 'ema', got {which!r}")


def _from_run_subtree(which: str, restored: dict[str, Any]):
    return restored["params"][MODEL] if which == "raw" else restored["ema_params"]


def split_params(module: nnx.Module):
    """(graphdef, nnx.State of the Params) of a module that carries nothing but Params."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(module).__name__} has non-Param state {rest}; only Params are "
                         "saved and loaded")
    return graphdef, params


# ---------------------------------------------------------------------------------------------
# The layout of a converted model directory.

CONVERTED_CONFIG = "model_config.json"   # written last: its presence marks a complete conversion
CONVERTED_PARAMS = "params"
CONVERTED_PROJECTOR = "repa_projector"
HOW_TO_CONVERT = ("`python -m ddt_jax.convert ddt --input MODEL.ckpt --num-encoder-blocks N "
                  "--output DIR`")


def save_converted(model: nnx.Module, output_dir: str | os.PathLike,
                   config: ml_collections.ConfigDict, repa_projector: nnx.Module | None = None
                   ) -> pathlib.Path:
    """Writes a model (and optionally its REPA projector) as a converted directory.

    Args:
      model: the DDT / DiT to save (its nnx.Param state is written).
      output_dir: the directory to create or overwrite.
      config: the model section that rebuilds `model` (`models.ddt.default_model_config()` form).
      repa_projector: saved beside the model when given, for fine-tuning with REPA.

    Returns:
      The absolute output directory.
    """
    out = pathlib.Path(output_dir).absolute()   # orbax needs absolute paths
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        # Pure dicts (nested dicts of arrays), the same trees a run's TrainState holds.
        ckptr.save(out / CONVERTED_PARAMS, nnx.state(model, nnx.Param).to_pure_dict(), force=True)
        if repa_projector is not None:
            ckptr.save(out / CONVERTED_PROJECTOR,
                       nnx.state(repa_projector, nnx.Param).to_pure_dict(), force=True)
    (out / CONVERTED_CONFIG).write_text(config.to_json(indent=2))
    return out


def is_converted_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / CONVERTED_CONFIG).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    """A run's workdir, its checkpoints/ directory or one checkpoints/<step> directory."""
    path = pathlib.Path(path)
    return path.is_dir() and not is_converted_dir(path) and (
        (path / RUN_CONFIG).is_file() or (path / checkpoint_lib.CHECKPOINT_DIR).is_dir()
        or (path / checkpoint_lib.STATE_ITEM).is_dir() or bool(_orbax_steps(path)))


def _orbax_steps(path: pathlib.Path) -> list[int]:
    try:
        return sorted(ocp.utils.checkpoint_steps(path)) if path.is_dir() else []
    except (OSError, ValueError):
        return []


def run_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in a run's workdir, oldest first."""
    return _orbax_steps(pathlib.Path(checkpoint_lib.checkpoint_dir(workdir)))


def read_model_config(path: str | os.PathLike, *, num_encoder_blocks: int | None = None
                      ) -> ml_collections.ConfigDict:
    """The model section that rebuilds the network stored at `path` (any of the three sources).

    Args:
      path: a run's workdir, a converted directory or an official weight file.
      num_encoder_blocks: official files only: the encoder depth, which shapes cannot tell
        (default: parsed from a name like `22en6de`).

    Returns:
      A model config (`models.ddt.default_model_config()` form).
    """
    path = pathlib.Path(path).absolute()
    if is_converted_dir(path):
        return ml_collections.ConfigDict(json.loads((path / CONVERTED_CONFIG).read_text()))
    if path.is_dir():
        config_path = path / RUN_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{path} is neither a training run (no {RUN_CONFIG}) nor a converted model (no "
                f"{CONVERTED_CONFIG}); create a converted one with {HOW_TO_CONVERT}")
        return ml_collections.ConfigDict(json.loads(config_path.read_text())["model"])
    if path.is_file():
        weights, _ = convert.split_ddt_checkpoint(convert.read_state_dict(path))
        return convert.infer_ddt_config(weights, num_encoder_blocks=num_encoder_blocks,
                                        name_hint=str(path))
    raise FileNotFoundError(f"{path} does not exist: pass a training run directory, a converted "
                            f"model directory ({HOW_TO_CONVERT}) or an official checkpoint file")


# ---------------------------------------------------------------------------------------------
# Loading into given shardings.

def abstract_params(module_fn, sharding) -> tuple[Any, dict[str, Any]]:
    """(graphdef, pure dict of ShapeDtypeStructs with `sharding`) of `module_fn()`, unallocated."""
    graphdef, params = split_params(nnx.eval_shape(module_fn))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            params.to_pure_dict())
    return graphdef, abstract


def place(tree, abstract, *, what: str = "weights"):
    """Host (numpy) or device arrays -> global arrays with `abstract`'s shapes, dtypes, shardings.

    Each device's shard is sliced from this host's copy (`jax.make_array_from_callback`), so every
    process must hold the whole tree, and no weights cross hosts.
    """
    treedef = jax.tree.structure(abstract)
    if jax.tree.structure(tree) != treedef:
        raise ValueError(f"{what} have another structure than the model they are loaded into")
    for value, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)):
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{what} have shape {tuple(value.shape)} where the model has "
                             f"{tuple(ref.shape)}")
    host = jax.tree.map(lambda v, ref: np.asarray(v).astype(ref.dtype), tree, abstract)
    return sharding.host_to_sharded(host, jax.tree.map(lambda ref: ref.sharding, abstract))


def _restore_converted(directory: pathlib.Path, item: str, abstract):
    """A converted item restored straight into `abstract`'s shardings (orbax reads each shard)."""
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(directory / item, abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{directory / item} does not fit the model it is loaded into "
                             f"({e}); its {CONVERTED_CONFIG} describes the model it holds") from e


def load_model_params(path: str | os.PathLike, abstract: dict[str, Any], *, which: str = "ema",
                      step: int | None = None, num_encoder_blocks: int | None = None
                      ) -> dict[str, Any]:
    """Model params from any source, placed in `abstract`'s shardings.

    Args:
      path: a run's workdir (or its checkpoints/ or checkpoints/<step>), a converted directory or
        an official .ckpt / .pt / .pth / .safetensors file.
      abstract: a pure dict of ShapeDtypeStructs with shardings (e.g. from `abstract_params`).
      which: "ema" or "raw". A converted directory and a plain state dict hold one set of weights,
        which serves as both; a run and a Lightning checkpoint hold both.
      step: runs only: the checkpoint step (None: the latest).
      num_encoder_blocks: official files only: the encoder depth (see `read_model_config`).

    Returns:
      A pure dict of global jax.Arrays with `abstract`'s structure, shapes and shardings.
    """
    path = pathlib.Path(path).absolute()
    if which not in ("ema", "raw"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {which!r}")
    if is_converted_dir(path):
        return _restore_converted(path, CONVERTED_PARAMS, abstract)
    if is_run_dir(path):
        restored = checkpoint_lib.restore_params(path, _run_subtree(which, abstract), step=step)
        return _from_run_subtree(which, restored)
    if path.is_file():
        return _file_model_params(convert.read_state_dict(path), path, abstract, which,
                                  num_encoder_blocks)
    raise FileNotFoundError(f"{path} is neither a run directory, a converted model directory "
                            f"({HOW_TO_CONVERT}) nor a checkpoint file")


def _file_model_params(state_dict, path: pathlib.Path, abstract, which: str,
                       num_encoder_blocks: int | None):
    """The raw or EMA model of an official file's (already read) state dict, placed."""
    weights, _ = convert.split_ddt_checkpoint(state_dict, use_ema=which == "ema")
    config = convert.infer_ddt_config(weights, num_encoder_blocks=num_encoder_blocks,
                                      name_hint=str(path))
    model = convert.ddt_from_state_dict(weights, config)
    return place(nnx.state(model, nnx.Param).to_pure_dict(), abstract,
                 what=f"the weights in {path}")


def _file_projector_params(state_dict, path: pathlib.Path, abstract):
    module = convert.repa_projector_from_state_dict(state_dict)
    if module is None:
        return None
    return place(nnx.state(module, nnx.Param).to_pure_dict(), abstract,
                 what=f"the REPA projector in {path}")


def _has_lightning_copies(state_dict) -> bool:
    return any(k.startswith(convert.LIGHTNING_EMA_PREFIX) for k in state_dict) and any(
        k.startswith(convert.LIGHTNING_RAW_PREFIX) for k in state_dict)


def has_both_copies(path: str | os.PathLike) -> bool:
    """Whether `path` holds raw and EMA weights apart (a run, or a Lightning checkpoint)."""
    path = pathlib.Path(path).absolute()
    if is_converted_dir(path):
        return False
    if is_run_dir(path):
        return True
    return _has_lightning_copies(convert.read_state_dict(path))


def load_projector_params(path: str | os.PathLike, abstract: dict[str, Any],
                          step: int | None = None) -> dict[str, Any] | None:
    """The REPA projector saved with the model at `path`, in `abstract`'s shardings; None if none.

    Args:
      path: as for `load_model_params`.
      abstract: the projector's pure dict of ShapeDtypeStructs with shardings.
      step: runs only: the checkpoint step (None: the latest).

    Returns:
      The projector params, or None when the source has no projector (or one of another width).
    """
    path = pathlib.Path(path).absolute()
    if is_converted_dir(path):
        if not (path / CONVERTED_PROJECTOR).is_dir():
            return None
        return _restore_converted(path, CONVERTED_PROJECTOR, abstract)
    if is_run_dir(path):
        try:
            restored = checkpoint_lib.restore_params(path, {"params": {PROJECTOR: abstract}},
                                                     step=step)
        except Exception as e:  # noqa: BLE001 - a run without REPA (or another width) has none
            logging.warning("%s: no usable REPA projector (%s)", path, e)
            return None
        return restored["params"][PROJECTOR]
    return _file_projector_params(convert.read_state_dict(path), path, abstract)


@flax.struct.dataclass
class InitWeights:
    """What a fresh run starts from: its own arrays for each (never one buffer twice, since the
    train step donates the state)."""
    params: dict[str, Any]                 # the model's raw weights
    ema: dict[str, Any]                    # its EMA (a copy of `params` where there is one set)
    projector: dict[str, Any] | None       # the REPA projector, None where the source has none


def load_init_weights(path: str | os.PathLike, abstract_model: dict[str, Any],
                      abstract_projector: dict[str, Any] | None = None, *,
                      num_encoder_blocks: int | None = None) -> InitWeights:
    """Raw weights, EMA and REPA projector to start a run from, reading the source once.

    Args:
      path: as for `load_model_params`.
      abstract_model: the model's pure dict of ShapeDtypeStructs with shardings (the EMA has the
        same layout).
      abstract_projector: the projector's, or None when the run has no REPA.
      num_encoder_blocks: official files only: the encoder depth (see `read_model_config`).

    Returns:
      An InitWeights placed in the given shardings.
    """
    path = pathlib.Path(path).absolute()
    if path.is_file():   # one read of a file that is 2.7 GB for XL/2
        state_dict = convert.read_state_dict(path)
        both = _has_lightning_copies(state_dict)
        params = _file_model_params(state_dict, path, abstract_model, "raw" if both else "ema",
                                    num_encoder_blocks)
        ema = _file_model_params(state_dict, path, abstract_model, "ema", num_encoder_blocks)
        projector = (None if abstract_projector is None
                     else _file_projector_params(state_dict, path, abstract_projector))
        return InitWeights(params=params, ema=ema, projector=projector)
    both = is_run_dir(path)   # a converted directory holds one set, which serves as both
    params = load_model_params(path, abstract_model, which="raw" if both else "ema")
    ema = load_model_params(path, abstract_model, which="ema")
    projector = (None if abstract_projector is None
                 else load_projector_params(path, abstract_projector))
    return InitWeights(params=params, ema=ema, projector=projector)


def load_converted(directory: str | os.PathLike, *, dtype: str | None = None, sharding=None
                   ) -> nnx.Module:
    """The model saved by `save_converted` (`python -m ddt_jax.convert ddt ...`).

    Args:
      directory: a converted model directory.
      dtype: compute dtype override ("float32", "bfloat16"); None keeps the saved config's.
      sharding: where every param goes (e.g. a replicated NamedSharding over a mesh); None: the
        first local device.

    Returns:
      The nnx model with its params loaded.
    """
    directory = pathlib.Path(directory).absolute()
    if not is_converted_dir(directory):
        raise FileNotFoundError(f"{directory} is not a converted model (no {CONVERTED_CONFIG}). "
                                f"Create one with {HOW_TO_CONVERT}")
    config = read_model_config(directory)
    if dtype is not None:
        config.dtype = dtype
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    graphdef, abstract = abstract_params(lambda: ddt.build_model(config, rngs=nnx.Rngs(0)),
                                         sharding)
    params = load_model_params(directory, abstract)
    return merge_params(graphdef, params)


def merge_params(graphdef, params: dict[str, Any]) -> nnx.Module:
    """The module of `graphdef` whose only state is the pure-dict `params`."""
    return nnx.merge(graphdef, params)
