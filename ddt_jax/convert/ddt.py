"""Official DDT / DiT weights (and the REPA projector) -> our NNX models.

Reads the published Lightning `.ckpt` (`denoiser.` / `ema_denoiser.` copies), a plain torch state
dict or a `.safetensors`. The architecture comes from the tensor shapes, and our param paths mirror
the official names: `torch_key` maps each of ours to exactly one official key, so the shared filler
reports a missing, extra or mis-shaped tensor instead of skipping it.

Scanned models (`model.scan_blocks`) are filled through the unrolled layout: the per-block tensors
are stacked afterwards (`models.ddt.stack_blocks`); `official_state_dict` writes either layout back
under the official keys.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ddt_jax.convert import fill
from ddt_jax.convert.state_dict import read_state_dict
from ddt_jax.models import ddt

LIGHTNING_EMA_PREFIX = "ema_denoiser."
LIGHTNING_RAW_PREFIX = "denoiser."
LIGHTNING_REPA_PREFIX = "diffusion_trainer.proj."
# Official module names that differ from ours (Sequential indices, nnx attribute names).
_DDT_RENAMES = (
    (re.compile(r"^t_embedder\.mlp_in\."), "t_embedder.mlp.0."),
    (re.compile(r"^t_embedder\.mlp_out\."), "t_embedder.mlp.2."),
    (re.compile(r"\.adaLN_modulation\."), ".adaLN_modulation.0."),
    (re.compile(r"^y_embedder\.embedding_table\.embedding$"), "y_embedder.embedding_table.weight"),
    (re.compile(r"\.kernel$"), ".weight"),
)
# Our REPAProjector layers -> the indices of the official nn.Sequential(nn.Sequential(...)).
_REPA_RENAMES = {"linear_1": "0.0", "linear_2": "0.2", "linear_3": "0.4"}
_HINT = ("The model was built from the file's shapes; only the official DDT / DiT key names "
         "load (a Lightning .ckpt, or a plain .pt / .pth / .safetensors state dict).")


def torch_key(path: tuple) -> str:
    """Our DDT param path -> its official key, e.g. ('t_embedder', 'mlp_in', 'kernel') ->
    't_embedder.mlp.0.weight'."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in _DDT_RENAMES:
        key = pattern.sub(repl, key)
    return key


def repa_torch_key(path: tuple) -> str:
    """Our REPAProjector param path -> its key under `diffusion_trainer.proj.`."""
    leaf = "weight" if path[-1] == "kernel" else str(path[-1])
    return f"{_REPA_RENAMES[str(path[0])]}.{leaf}"


def _strip_wrappers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes torch.compile's `_orig_mod.` and DDP's leading `module.` from key names."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def split_ddt_checkpoint(state_dict: Mapping[str, np.ndarray], *, use_ema: bool = True
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(denoiser weights, other entries) of a Lightning or plain state dict.

    A Lightning checkpoint holds `denoiser.*` (raw) and `ema_denoiser.*` (EMA) copies of the
    network plus trainer entries such as the REPA projector `diffusion_trainer.proj.*` (returned
    as extras). A plain state dict is the network itself; `use_ema` then has no meaning.
    """
    state_dict = _strip_wrappers(state_dict)
    has_ema = any(k.startswith(LIGHTNING_EMA_PREFIX) for k in state_dict)
    has_raw = any(k.startswith(LIGHTNING_RAW_PREFIX) for k in state_dict)
    if not (has_ema or has_raw):
        return dict(state_dict), {}
    prefix = LIGHTNING_EMA_PREFIX if use_ema else LIGHTNING_RAW_PREFIX
    if not any(k.startswith(prefix) for k in state_dict):
        other = "use_ema=False" if use_ema else "use_ema=True"
        raise ValueError(f"checkpoint has no {prefix}* weights; load the other copy with {other}")
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    extras = {k: v for k, v in state_dict.items()
              if not k.startswith((LIGHTNING_EMA_PREFIX, LIGHTNING_RAW_PREFIX))}
    return weights, extras


def _parse_encoder_depth(name: str) -> int | None:
    """'DDT-XL-22en6de-R256' -> 22 (the official naming of the encoder/decoder split)."""
    match = re.search(r"(\d+)\s*en\s*(\d+)\s*de", name)
    return int(match.group(1)) if match else None


def _parse_resolution(name: str) -> int | None:
    """'DDT-XL-22en6de-R512' -> 512 (the pixel resolution in the official checkpoint names)."""
    match = re.search(r"R(\d{3,4})(?!\d)", name)
    return int(match.group(1)) if match else None


def _split_patch_features(patch_features: int, in_channels: int | None,
                          patch_size: int | None) -> tuple[int, int]:
    """C*p*p -> (C, p). Shapes only tell the product: prefer what the caller says, else C = 4
    (SD-VAE latents), 3 (RGB pixels), 1 (grey) in that order, else p = 1."""
    def square_root(v):
        r = int(round(v ** 0.5))
        return r if r * r == v else None

    if in_channels:
        p = square_root(patch_features / in_channels) if patch_features % in_channels == 0 else None
        if p is None:
            raise ValueError(f"patch features {patch_features} are not in_channels={in_channels} "
                             "* p * p")
        return in_channels, p
    if patch_size:
        if patch_features % (patch_size * patch_size):
            raise ValueError(f"patch features {patch_features} are not C * {patch_size}^2")
        return patch_features // (patch_size * patch_size), patch_size
    for c in (4, 3, 1):
        if patch_features % c == 0 and (p := square_root(patch_features // c)):
            return c, p
    return patch_features, 1


def infer_ddt_config(weights: Mapping[str, np.ndarray], *, num_encoder_blocks: int | None = None,
                     in_channels: int | None = None, patch_size: int | None = None,
                     image_size: int | None = None, name_hint: str = ""
                     ) -> ml_collections.ConfigDict:
    """The model config that matches official DDT / DiT weights' shapes.

    Args:
      weights: the denoiser's state dict (official key names, no Lightning prefix).
      num_encoder_blocks: the DDT encoder depth, which shapes cannot tell; default: parsed from
        a name like `22en6de` in `name_hint`.
      in_channels: latent channels, when the patch-feature count C*p*p is ambiguous (default: 4).
      patch_size: the patch size, when the channel count is unknown.
      image_size: the latent side the model samples at (RoPE positions are resolution-normalised,
        so shapes cannot tell it); default: from a name like `R512` (512 / 8 = 64 for SD-VAE
        latents), else 32.
      name_hint: the checkpoint's path or name, searched for `22en6de` and `R512`.

    Returns:
      A `models.ddt.default_model_config()`-form config.
    """
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight",
                "blocks.0.attn.q_norm.weight")
    missing = [k for k in required if k not in weights]
    if missing:
        raise ValueError(f"not a DDT/DiT state dict: missing {missing}. Found keys such as "
                         f"{sorted(weights)[:8]}")
    hidden, patch_features = weights["x_embedder.proj.weight"].shape
    head_dim = weights["blocks.0.attn.q_norm.weight"].shape[0]
    num_blocks = 1 + max(int(m.group(1)) for k in weights
                         if (m := re.match(r"blocks\.(\d+)\.", k)))
    c, p = _split_patch_features(patch_features, in_channels, patch_size)
    cfg = ddt.default_model_config()
    cfg.arch = "ddt" if "s_embedder.proj.weight" in weights else "dit"
    size = {v[0]: k for k, v in ddt.VARIANTS.items()}.get(hidden, "XL")
    cfg.variant = f"{size}/{p}"
    cfg.hidden_size, cfg.num_heads = int(hidden), int(hidden // head_dim)
    cfg.num_blocks = int(num_blocks)
    cfg.in_channels = int(c)
    cfg.num_classes = int(weights["y_embedder.embedding_table.weight"].shape[0] - 1)
    if image_size is None and (resolution := _parse_resolution(name_hint)) and c == 4:
        image_size = resolution // 8  # SD-VAE downsamples by 8
    cfg.image_size = int(image_size or 32)
    if cfg.arch == "ddt":
        depth = num_encoder_blocks or _parse_encoder_depth(name_hint)
        if depth is None:
            raise ValueError(
                "the encoder depth of a DDT cannot be read from its shapes: pass "
                "num_encoder_blocks (--num-encoder-blocks; 22 for the published DDT-XL/2 "
                f"22en6de), this model has {num_blocks} blocks")
        if not 0 < depth < num_blocks:
            raise ValueError(f"num_encoder_blocks={depth} must be in [1, {num_blocks - 1}] for a "
                             f"{num_blocks}-block model")
        cfg.num_encoder_blocks = int(depth)
    return cfg


def _describe(config: ml_collections.ConfigDict) -> str:
    """'DDT 22en6de (hidden_size 1152, patch 2)', for messages."""
    if config.arch == "ddt":
        encoder, decoder = config.num_encoder_blocks, config.num_blocks - config.num_encoder_blocks
        depth = f"{encoder}en{decoder}de"
    else:
        depth = f"{config.num_blocks} blocks"
    patch = config.variant.split("/")[-1]
    return f"{config.arch.upper()} {depth} (hidden_size {config.hidden_size}, patch {patch})"


def ddt_from_state_dict(weights: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
                        ) -> nnx.Module:
    """The model for `config`, filled with official-layout weights (no random init is spent).

    A scanned config (`scan_blocks=True`) gets the per-block tensors stacked.
    """
    unrolled = config.copy_and_resolve_references()
    unrolled.scan_blocks = False
    abstract = nnx.eval_shape(lambda: ddt.build_model(unrolled, rngs=nnx.Rngs(0)))
    params = fill.fill_params(abstract, weights, torch_key=torch_key,
                              what=f"{_describe(config)} weights", hint=_HINT)
    if not config.get("scan_blocks", False):
        return nnx.merge(nnx.graphdef(abstract), jax.tree.map(jnp.asarray, params))
    params = ddt.stack_blocks(params.to_pure_dict(), abstract.num_encoder_blocks)
    scanned = nnx.eval_shape(lambda: ddt.build_model(config, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(scanned), jax.tree.map(jnp.asarray, params))


def official_state_dict(params) -> dict[str, np.ndarray]:
    """A model's params (pure dict or nnx.State, either layout) under the official DDT keys.

    Kernels are transposed back to torch's (out, in) weights; the result loads into the official
    PyTorch model with `load_state_dict` (as numpy arrays; wrap with torch.from_numpy).
    """
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    flat = nnx.traversals.flatten_mapping(ddt.unstack_blocks(params))
    return {torch_key(path): fill.ours_to_torch(path, np.asarray(value))
            for path, value in flat.items()}


def load_ddt(path: str | os.PathLike, num_encoder_blocks: int | None = None, *,
             use_ema: bool = True, in_channels: int | None = None, patch_size: int | None = None,
             dtype: str = "float32", scan_blocks: bool = False) -> nnx.Module:
    """Loads official DDT (or DiT-baseline) weights.

    Widths, depth, heads, classes and patch features come from the shapes (see
    `infer_ddt_config`).

    Args:
      path: a Lightning `.ckpt`, a `.pt` / `.pth` state dict or a `.safetensors`.
      num_encoder_blocks: the DDT encoder depth; default: parsed from a name like `22en6de`.
      use_ema: a Lightning checkpoint's EMA copy (default) or, if False, its raw weights.
      in_channels: latent channels when C*p*p is ambiguous (default assumes 4, SD-VAE latents).
      patch_size: the patch size, when the channel count is unknown.
      dtype: compute dtype ("float32", "bfloat16"); params stay float32.
      scan_blocks: build the scanned layout (blocks stacked per encoder / decoder).

    Returns:
      The nnx model with the file's weights.
    """
    weights, _ = split_ddt_checkpoint(read_state_dict(path), use_ema=use_ema)
    config = infer_ddt_config(weights, num_encoder_blocks=num_encoder_blocks,
                              in_channels=in_channels, patch_size=patch_size, name_hint=str(path))
    config.dtype = dtype
    config.scan_blocks = scan_blocks
    return ddt_from_state_dict(weights, config)


def repa_projector_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> nnx.Module | None:
    """The REPA projector in a (Lightning) state dict's `diffusion_trainer.proj.*`, or None."""
    proj = {k[len(LIGHTNING_REPA_PREFIX):]: v for k, v in _strip_wrappers(state_dict).items()
            if k.startswith(LIGHTNING_REPA_PREFIX)}
    if not proj:
        return None
    for key in ("0.0.weight", "0.4.weight"):
        if key not in proj:
            raise ValueError(f"the REPA projector {LIGHTNING_REPA_PREFIX}* has no {key}; found "
                             f"{sorted(proj)}")
    w1, w3 = proj["0.0.weight"], proj["0.4.weight"]
    abstract = nnx.eval_shape(
        lambda: ddt.REPAProjector(w1.shape[1], w1.shape[0], w3.shape[0], rngs=nnx.Rngs(0)))
    params = fill.fill_params(
        abstract, proj, torch_key=repa_torch_key, what="REPA projector weights",
        hint=f"Expected the official 3-layer MLP {LIGHTNING_REPA_PREFIX}{{0.0,0.2,0.4}}.*")
    return nnx.merge(nnx.graphdef(abstract), jax.tree.map(jnp.asarray, params))


def load_repa_projector(path: str | os.PathLike) -> nnx.Module | None:
    """The REPA projector saved in a Lightning checkpoint.

    Args:
      path: a Lightning `.ckpt` (or any weight file `read_state_dict` reads).

    Returns:
      The `models.ddt.REPAProjector` from `diffusion_trainer.proj.*`, or None if it has none.
    """
    return repa_projector_from_state_dict(read_state_dict(path))
