"""The one owner of where model weights live on disk, and the loader that places them on devices.

Three kinds of source hold DDT weights, and this module is the only code that knows their layout:

  a training run   <workdir>/config.json + <workdir>/checkpoints/<step>/state, the TrainState below
  a converted dir  <dir>/model_config.json + <dir>/params [+ <dir>/repa_projector] (orbax)
  an official file a Lightning .ckpt, a .pt/.pth state dict or a .safetensors (read by convert/)

Every loader takes abstract targets (ShapeDtypeStructs with shardings) and returns arrays already in
those shardings: orbax reads only each host's shards, and host weights from an official file become
global arrays through `jax.make_array_from_callback`, so a multi-process load never all-gathers
weights between hosts.

Each source holds the model's blocks unrolled (`blocks.{i}`) or scanned (stacked per encoder /
decoder, `model.scan_blocks`; see `models.ddt.stack_blocks`), as its config says; official files
are always unrolled. Loaders read the saved layout and convert it to the target's
(`to_block_layout`), so any source loads into either kind of model.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import convert
from ddt_jax import files
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
                   ) -> epath.Path:
    """Writes a model (and optionally its REPA projector) as a converted directory.

    Args:
      model: the DDT / DiT to save (its nnx.Param state is written).
      output_dir: the directory to create or overwrite.
      config: the model section that rebuilds `model` (`models.ddt.default_model_config()` form).
      repa_projector: saved beside the model when given, for fine-tuning with REPA.

    Returns:
      The absolute output directory.
    """
    params = nnx.state(model, nnx.Param).to_pure_dict()
    if ddt.is_scanned(params) != bool(config.get("scan_blocks", False)):
        raise ValueError(f"config.scan_blocks={config.get('scan_blocks', False)} but the model's "
                         "blocks are " + ("scanned" if ddt.is_scanned(params) else "unrolled")
                         + ": save it with the config it was built from")
    out = files.as_path(output_dir)   # orbax needs absolute paths
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        # Pure dicts (nested dicts of arrays), the same trees a run's TrainState holds.
        ckptr.save(out / CONVERTED_PARAMS, params, force=True)
        if repa_projector is not None:
            ckptr.save(out / CONVERTED_PROJECTOR,
                       nnx.state(repa_projector, nnx.Param).to_pure_dict(), force=True)
    (out / CONVERTED_CONFIG).write_text(config.to_json(indent=2))
    return out


def is_converted_dir(path: str | os.PathLike) -> bool:
    return (files.as_path(path) / CONVERTED_CONFIG).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    """A run's workdir, its checkpoints/ directory or one checkpoints/<step> directory."""
    path = files.as_path(path)
    return path.is_dir() and not is_converted_dir(path) and (
        (path / RUN_CONFIG).is_file() or (path / checkpoint_lib.CHECKPOINT_DIR).is_dir()
        or (path / checkpoint_lib.STATE_ITEM).is_dir() or bool(_orbax_steps(path)))


def _orbax_steps(path: epath.Path) -> list[int]:
    try:
        return sorted(ocp.utils.checkpoint_steps(path)) if path.is_dir() else []
    except (OSError, ValueError):
        return []


def run_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in a run's workdir, oldest first."""
    return _orbax_steps(epath.Path(checkpoint_lib.checkpoint_dir(workdir)))


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
    path = files.as_path(path)
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
# The block layouts: unrolled `blocks.{i}` or scanned `encoder_blocks` / `decoder_blocks`.

def _spec(sharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _stack_abstract(leaves):
    """Abstract leaves of each block -> the abstract stacked leaf (layer axis replicated)."""
    a = leaves[0]
    sharding = a.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P(None, *_spec(sharding, a.ndim)))
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(a.shape), a.dtype, sharding=sharding)


def _index_abstract(a, i: int):
    """Layer i of an abstract stacked leaf (its layer axis dropped from the sharding)."""
    del i
    sharding = a.sharding
    if isinstance(sharding, NamedSharding):
        spec = _spec(sharding, a.ndim)
        if spec[0] is not None:
            raise ValueError(f"a stacked param's layer axis is sharded ({sharding.spec}); the "
                             "scanned layout keeps it replicated")
        sharding = NamedSharding(sharding.mesh, P(*spec[1:]))
    return jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype, sharding=sharding)


def abstract_in_layout(abstract: dict[str, Any], scanned: bool,
                       num_encoder_blocks: int | None = None) -> dict[str, Any]:
    """Model params' ShapeDtypeStructs (with shardings) in the scanned or unrolled layout.

    Args:
      abstract: a model's pure dict of ShapeDtypeStructs, either layout.
      scanned: the layout wanted.
      num_encoder_blocks: unrolled -> scanned only: the blocks that go to `encoder_blocks`.
    """
    if ddt.is_scanned(abstract) == scanned:
        return abstract
    if scanned:
        if num_encoder_blocks is None:
            raise ValueError("stacking blocks needs num_encoder_blocks")
        return ddt.stack_blocks(abstract, num_encoder_blocks, stack=_stack_abstract)
    return ddt.unstack_blocks(abstract, index=_index_abstract)


def to_block_layout(tree: dict[str, Any], abstract: dict[str, Any]) -> dict[str, Any]:
    """Model params (either layout) in the layout of `abstract`.

    Host (numpy) trees are converted on the host; device arrays by one jit whose outputs are in
    `abstract`'s shardings (the layer axis is replicated, so stacking and slicing move no data
    between devices).
    """
    if ddt.is_scanned(tree) == ddt.is_scanned(abstract):
        return tree
    if ddt.is_scanned(abstract):
        depth = ddt.encoder_depth_of(abstract)
        convert_fn = lambda t: ddt.stack_blocks(t, depth)
    else:
        convert_fn = ddt.unstack_blocks
    if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree)):
        return convert_fn(tree)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(convert_fn, out_shardings=shardings)(tree)


def _layout_of_config(model_config) -> tuple[bool, int]:
    """(scanned, blocks in the first stack) of the model a saved model config describes."""
    kw = ddt.model_kwargs(ml_collections.ConfigDict(model_config))
    return kw["scan_blocks"], kw.get("num_encoder_blocks", kw["num_blocks"])


def _saved_layout(path: epath.Path) -> tuple[bool, int] | None:
    """(scanned, encoder depth) of the params saved at a converted dir or a run (workdir,
    checkpoints/ or checkpoints/<step>), from the config saved beside them; None if none is."""
    if is_converted_dir(path):
        return _layout_of_config(json.loads((path / CONVERTED_CONFIG).read_text()))
    for directory in (path, path.parent, path.parent.parent):
        config_path = directory / RUN_CONFIG
        if config_path.is_file():
            try:
                return _layout_of_config(json.loads(config_path.read_text())["model"])
            except (ValueError, KeyError) as e:
                logging.warning("%s: cannot read the model section (%s); assuming the target's "
                                "block layout", config_path, e)
                return None
    return None


def _restore_in_saved_layout(path: epath.Path, abstract, restore_fn):
    """`restore_fn(target)` with the target in the layout saved at `path`, converted back to
    `abstract`'s layout."""
    saved = _saved_layout(path)
    if saved is None or saved[0] == ddt.is_scanned(abstract):
        return restore_fn(abstract)
    target = abstract_in_layout(abstract, saved[0], saved[1])
    return to_block_layout(restore_fn(target), abstract)


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


def _restore_converted(directory: epath.Path, item: str, abstract):
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
    path = files.as_path(path)
    if which not in ("ema", "raw"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {which!r}")
    if is_converted_dir(path):
        return _restore_in_saved_layout(
            path, abstract, lambda target: _restore_converted(path, CONVERTED_PARAMS, target))
    if is_run_dir(path):
        return _restore_in_saved_layout(path, abstract, lambda target: _from_run_subtree(
            which, checkpoint_lib.restore_params(path, _run_subtree(which, target), step=step)))
    if path.is_file():
        return _file_model_params(convert.read_state_dict(path), path, abstract, which,
                                  num_encoder_blocks)
    raise FileNotFoundError(f"{path} is neither a run directory, a converted model directory "
                            f"({HOW_TO_CONVERT}) nor a checkpoint file")


def _file_model_params(state_dict, path: epath.Path, abstract, which: str,
                       num_encoder_blocks: int | None):
    """The raw or EMA model of an official file's (already read) state dict, placed."""
    weights, _ = convert.split_ddt_checkpoint(state_dict, use_ema=which == "ema")
    config = convert.infer_ddt_config(weights, num_encoder_blocks=num_encoder_blocks,
                                      name_hint=str(path))
    model = convert.ddt_from_state_dict(weights, config)
    host = to_block_layout(jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict()),
                           abstract)
    return place(host, abstract, what=f"the weights in {path}")


def _file_projector_params(state_dict, path: epath.Path, abstract):
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
    path = files.as_path(path)
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
    path = files.as_path(path)
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
    path = files.as_path(path)
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


def load_converted(directory: str | os.PathLike, *, dtype: str | None = None, sharding=None,
                   scan_blocks: bool | None = None) -> nnx.Module:
    """The model saved by `save_converted` (`python -m ddt_jax.convert ddt ...`).

    Args:
      directory: a converted model directory.
      dtype: compute dtype override ("float32", "bfloat16"); None keeps the saved config's.
      sharding: where every param goes (e.g. a replicated NamedSharding over a mesh); None: the
        first local device.
      scan_blocks: build the scanned (True) or unrolled (False) layout whatever was saved; None
        keeps the saved config's.

    Returns:
      The nnx model with its params loaded.
    """
    directory = files.as_path(directory)
    if not is_converted_dir(directory):
        raise FileNotFoundError(f"{directory} is not a converted model (no {CONVERTED_CONFIG}). "
                                f"Create one with {HOW_TO_CONVERT}")
    config = read_model_config(directory)
    if dtype is not None:
        config.dtype = dtype
    if scan_blocks is not None:
        config.scan_blocks = scan_blocks
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    graphdef, abstract = abstract_params(lambda: ddt.build_model(config, rngs=nnx.Rngs(0)),
                                         sharding)
    params = load_model_params(directory, abstract)
    return merge_params(graphdef, params)


def merge_params(graphdef, params: dict[str, Any]) -> nnx.Module:
    """The module of `graphdef` whose only state is the pure-dict `params`."""
    return nnx.merge(graphdef, params)
