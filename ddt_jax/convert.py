"""Official PyTorch checkpoints -> ddt-jax params, converted once, offline.

Reads the files users already have (nothing is downloaded):
  * DDT: the published Lightning `.ckpt`, a plain torch state dict (`.pt` / `.pth`) or `.safetensors`;
  * DINOv2: the torch-hub `dinov2_vit*14_pretrain.pth` or a `.safetensors` with the same keys;
  * SD-VAE: a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`) or one file.

torch is imported only to unpickle `.ckpt` / `.pt` / `.pth` files.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

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


# ------------------------------------------------------------------------------------------------
# DDT / DiT: Lightning .ckpt (denoiser. / ema_denoiser.), plain state dict or safetensors -> NNX model.
#
#   model = load_ddt("DDT-XL-22en6de-R256/model.ckpt")                  # EMA weights, 22en6de from the name
#   model = load_ddt("ddt.safetensors", num_encoder_blocks=22)          # plain state dict
#   python -m ddt_jax.convert ddt --input model.ckpt --num-encoder-blocks 22 --output /ckpt/ddt_xl_256
#
# Our parameter paths mirror the official names; `_ddt_torch_key` maps each of ours to exactly one
# official key, so a missing, extra or mis-shaped tensor is reported instead of silently skipped.
# ------------------------------------------------------------------------------------------------


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
_REPA_RENAMES = {"linear_1": "0.0", "linear_2": "0.2", "linear_3": "0.4"}


def _ddt_torch_key(path: tuple) -> str:
    key = ".".join(str(p) for p in path)
    for pattern, repl in _DDT_RENAMES:
        key = pattern.sub(repl, key)
    return key


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

    A Lightning checkpoint holds `denoiser.*` (raw) and `ema_denoiser.*` (EMA) copies of the network
    plus trainer entries such as the REPA projector `diffusion_trainer.proj.*` (returned as extras).
    A plain state dict is the network itself; `use_ema` then has no meaning and is ignored.
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
              if not (k.startswith(LIGHTNING_EMA_PREFIX) or k.startswith(LIGHTNING_RAW_PREFIX))}
    return weights, extras


def _parse_encoder_depth(name: str) -> int | None:
    """'DDT-XL-22en6de-R256' -> 22 (the official naming of the encoder/decoder split)."""
    match = re.search(r"(\d+)\s*en\s*(\d+)\s*de", name)
    return int(match.group(1)) if match else None


def _parse_resolution(name: str) -> int | None:
    """'DDT-XL-22en6de-R512' -> 512 (the pixel resolution in the official checkpoint names)."""
    match = re.search(r"R(\d{3,4})(?!\d)", name)
    return int(match.group(1)) if match else None


def _split_patch_features(patch_features: int, in_channels: int | None, patch_size: int | None) -> tuple[int, int]:
    """C*p*p -> (C, p). Shapes only tell the product: prefer what the caller says, else C = 4
    (SD-VAE latents), 3 (RGB pixels), 1 (grey) in that order, else p = 1."""
    def square_root(v):
        r = int(round(v ** 0.5))
        return r if r * r == v else None

    if in_channels:
        p = square_root(patch_features / in_channels) if patch_features % in_channels == 0 else None
        if p is None:
            raise ValueError(f"patch features {patch_features} are not in_channels={in_channels} * p * p")
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
                     image_size: int | None = None, name_hint: str = "") -> ml_collections.ConfigDict:
    """A model config (see `models.ddt.default_model_config`) that matches the official weights' shapes.

    `image_size` is the latent side the model samples at (shapes cannot tell it: RoPE positions are
    resolution-normalised); default: from a name like `R512` (512 / 8 = 64 for SD-VAE latents), else 32.
    """
    from ddt_jax.models import ddt

    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.attn.q_norm.weight")
    missing = [k for k in required if k not in weights]
    if missing:
        raise ValueError(f"not a DDT/DiT state dict: missing {missing}. Found keys such as "
                         f"{sorted(weights)[:8]}")
    hidden, patch_features = weights["x_embedder.proj.weight"].shape
    head_dim = weights["blocks.0.attn.q_norm.weight"].shape[0]
    num_blocks = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k)))
    c, p = _split_patch_features(patch_features, in_channels, patch_size)
    cfg = ddt.default_model_config()
    cfg.arch = "ddt" if "s_embedder.proj.weight" in weights else "dit"
    size = {v[0]: k for k, v in ddt.VARIANTS.items()}.get(hidden, "XL")
    cfg.variant = f"{size}/{p}"
    cfg.hidden_size, cfg.num_heads, cfg.num_blocks = int(hidden), int(hidden // head_dim), int(num_blocks)
    cfg.in_channels = int(c)
    cfg.num_classes = int(weights["y_embedder.embedding_table.weight"].shape[0] - 1)
    if image_size is None and (resolution := _parse_resolution(name_hint)) and c == 4:
        image_size = resolution // 8  # SD-VAE downsamples by 8
    cfg.image_size = int(image_size or 32)
    if cfg.arch == "ddt":
        depth = num_encoder_blocks or _parse_encoder_depth(name_hint)
        if depth is None:
            raise ValueError(
                "the encoder depth of a DDT cannot be read from its shapes: pass num_encoder_blocks "
                f"(--num-encoder-blocks; 22 for the published DDT-XL/2 22en6de), this model has {num_blocks} blocks")
        if not 0 < depth < num_blocks:
            raise ValueError(f"num_encoder_blocks={depth} must be in [1, {num_blocks - 1}] for a {num_blocks}-block model")
        cfg.num_encoder_blocks = int(depth)
    return cfg


def _fill_module(module: nnx.Module, weights: Mapping[str, np.ndarray], key_fn, what: str) -> None:
    """Copies torch tensors into every nnx.Param of `module`; any missing/extra/mis-shaped key raises."""
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    used, missing, misshaped, new_values = set(), [], [], {}
    for path, var in flat:
        key = key_fn(path)
        if key not in weights:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(weights[key], np.float32)
        if path[-1] == "kernel":
            value = value.T  # torch Linear (out, in) -> (in, out)
        if value.shape != var.shape:
            misshaped.append(f"{key}: file {value.shape} vs model {var.shape}")
            continue
        new_values[path] = value
    unexpected = sorted(set(weights) - used)
    if missing or unexpected or misshaped:
        raise ValueError(f"{what} weights do not match the model:\n  missing: {missing}\n  unexpected: "
                         f"{unexpected}\n  mis-shaped: {misshaped}")
    for path, var in flat:
        var.value = jnp.asarray(new_values[path], var.dtype)
    nnx.update(module, nnx.from_flat_state(flat))


def ddt_from_state_dict(weights: Mapping[str, np.ndarray], config: ml_collections.ConfigDict):
    """Builds the model for `config` and fills it with official-layout weights."""
    from ddt_jax.models import ddt

    model = ddt.build_model(config, rngs=nnx.Rngs(0))
    _fill_module(model, weights, _ddt_torch_key, f"{config.arch.upper()}")
    return model


def load_ddt(path: str | os.PathLike, num_encoder_blocks: int | None = None, *, use_ema: bool = True,
             in_channels: int | None = None, patch_size: int | None = None, dtype: str = "float32"):
    """Loads official DDT (or DiT-baseline) weights from .ckpt / .pt / .pth / .safetensors.

    The EMA copy is used by default (`use_ema=False` for the raw weights of a Lightning checkpoint).
    Widths, depth, heads, classes and patch features come from the shapes; the encoder depth from
    `num_encoder_blocks` or a name like `22en6de` in the path; channels/patch size from the caller
    when the patch-feature count is ambiguous (default assumes 4-channel SD-VAE latents).
    """
    weights, _ = split_ddt_checkpoint(read_state_dict(path), use_ema=use_ema)
    config = infer_ddt_config(weights, num_encoder_blocks=num_encoder_blocks, in_channels=in_channels,
                              patch_size=patch_size, name_hint=str(path))
    config.dtype = dtype
    return ddt_from_state_dict(weights, config)


def load_repa_projector(path: str | os.PathLike):
    """The REPA projector (`diffusion_trainer.proj.*`) of a Lightning checkpoint, or None if absent."""
    from ddt_jax.models import ddt

    _, extras = split_ddt_checkpoint(read_state_dict(path))
    proj = {k[len(LIGHTNING_REPA_PREFIX):]: v for k, v in extras.items() if k.startswith(LIGHTNING_REPA_PREFIX)}
    if not proj:
        return None
    w1, w3 = proj["0.0.weight"], proj["0.4.weight"]
    module = ddt.REPAProjector(w1.shape[1], w1.shape[0], w3.shape[0], rngs=nnx.Rngs(0))
    _fill_module(module, proj, lambda path: f"{_REPA_RENAMES[path[0]]}.{'weight' if path[-1] == 'kernel' else path[-1]}",
                 "REPA projector")
    return module


# A converted model on disk: DIR/model_config.json + DIR/params (orbax) [+ DIR/repa_projector].
CONVERTED_CONFIG = "model_config.json"


def save_converted(model, output_dir: str | os.PathLike, config: ml_collections.ConfigDict,
                   repa_projector=None) -> pathlib.Path:
    """Writes a converted model as an orbax checkpoint that `load_converted` and the trainer read."""
    import orbax.checkpoint as ocp

    out = pathlib.Path(output_dir).absolute()  # orbax needs absolute paths
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", nnx.state(model, nnx.Param), force=True)
        if repa_projector is not None:
            ckptr.save(out / "repa_projector", nnx.state(repa_projector, nnx.Param), force=True)
    # The config last: its presence marks a complete conversion.
    (out / CONVERTED_CONFIG).write_text(config.to_json(indent=2))
    return out


def load_converted(directory: str | os.PathLike, *, dtype: str | None = None, sharding=None):
    """Rebuilds the model saved by `save_converted` (`python -m ddt_jax.convert ddt ...`).

    `sharding` (e.g. a replicated NamedSharding over a mesh) places every param as it is read; without
    it orbax falls back to the saving topology, which fails when several processes load.
    """
    import orbax.checkpoint as ocp
    from ddt_jax.models import ddt

    directory = pathlib.Path(directory).absolute()
    config_path = directory / CONVERTED_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(
            f"{directory} is not a converted model (no {CONVERTED_CONFIG}). Create one with "
            "`python -m ddt_jax.convert ddt --input MODEL.ckpt --num-encoder-blocks N --output DIR`")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    if dtype is not None:
        config.dtype = dtype
    abstract = nnx.eval_shape(lambda: ddt.build_model(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if sharding is not None:
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                      abstract_state)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(directory / "params", abstract_state)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# SD-VAE: diffusers folder / diffusers single file / original LDM (CompVis) file -> NNX module.
#
#   vae = load_vae("/data/sd-vae-ft-ema")                        # config.json + weights
#   vae = load_vae("/data/vae-ft-ema-560000-ema-pruned.safetensors")   # LDM keys, SD config
#   vae = load_vae("/data/tiny_vae.safetensors", config={...})   # non-SD architecture, one file
#
# Every checkpoint is first renamed to the current diffusers key layout, then each parameter of
# our module asks for exactly one diffusers key; anything missing, left over or mis-shaped is an
# error, so a half-loaded VAE can never decode silently wrong images.
# ------------------------------------------------------------------------------------------------
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_vae(path: str | os.PathLike, *, dtype=jnp.float32, config=None):
    """Reads SD-VAE weights into `ddt_jax.models.vae.AutoencoderKL` (float32 params).

    `path`: a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`;
    a pipeline folder with a `vae/` subfolder also works) or one weight file with diffusers keys
    (either attention naming) or original LDM keys (`encoder.down.0.block.0.norm1.weight`, ...;
    a whole SD checkpoint's `first_stage_model.` entries are used). `config`: a diffusers-style
    dict or `VAEConfig`; it overrides the folder's config.json. Without either, the architecture is
    read off the weight shapes with the SD-VAE's norm_num_groups (32) and scaling_factor (0.18215),
    which shapes cannot reveal. `dtype`: compute dtype (e.g. jnp.bfloat16).
    """
    from ddt_jax.models import vae as vae_lib

    path = pathlib.Path(path)
    file_config = None
    if path.is_dir():
        path, file_config = _find_vae_files(path)
    state_dict = _vae_keys_to_diffusers(read_state_dict(path))
    config = config if config is not None else file_config
    if config is None:
        config = _infer_vae_config(state_dict, path)
    if not isinstance(config, vae_lib.VAEConfig):
        config = vae_lib.VAEConfig.from_dict(config)

    # Shapes only: the real SD-VAE would spend seconds on a random init we overwrite anyway.
    abstract = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat, missing, wrong_shape, used = [], [], [], set()
    for param_path, variable in nnx.to_flat_state(abstract_state):
        key = _vae_torch_key(param_path)
        shape = tuple(variable.get_value().shape)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = _vae_to_flax_layout(np.asarray(state_dict[key], np.float32), shape)
        if value is None:
            wrong_shape.append(f"{key}: {tuple(state_dict[key].shape)}, expected "
                               f"{_vae_torch_shape(shape)}")
            continue
        flat.append((param_path, variable.replace(jnp.asarray(value))))
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or wrong_shape:
        problems = [f"{name} ({len(keys)}): {_vae_head(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("wrong shapes", wrong_shape)) if keys]
        raise ValueError(
            f"{path}: the VAE weights do not fit the architecture {config}. " + "; ".join(problems)
            + ". If the checkpoint is a different VAE, pass load_vae(..., config=...) matching it "
            "(diffusers config.json keys).")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _find_vae_files(folder: pathlib.Path):
    if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"   # the root of a diffusers pipeline
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers VAE folder: no config.json. Pass the "
                                "folder that holds config.json, or one weight file.")
    for name in VAE_WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name, json.loads(config_path.read_text())
    raise FileNotFoundError(f"{folder} has a config.json but none of {list(VAE_WEIGHT_NAMES)}; "
                            "nothing is downloaded at run time, so copy the weights there first.")


# Original LDM (CompVis) names -> diffusers names, applied in order to each key.
_LDM_VAE_RENAMES = (
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
)
# diffusers < 0.15 saved the mid-block attention with these names.
_LEGACY_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                             "proj_attn": "to_out.0"}


def _vae_keys_to_diffusers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames any supported VAE key layout to the current diffusers one."""
    keys = list(state_dict)
    if any(k.startswith("first_stage_model.") for k in keys):   # a whole SD checkpoint
        state_dict = {k[len("first_stage_model."):]: v for k, v in state_dict.items()
                      if k.startswith("first_stage_model.")}
    # LDM training checkpoints also carry the LPIPS/discriminator loss; it is not part of the VAE.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    if any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in state_dict):
        # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
        levels = {int(m.group(1)) for k in state_dict
                  if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
        renamed = {}
        for key, value in state_dict.items():
            if m := re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", key):
                level, kind, rest = int(m.group(1)), m.group(2), m.group(3)
                kind = "resnets" if kind == "block" else "upsamplers.0"
                key = f"decoder.up_blocks.{len(levels) - 1 - level}.{kind}.{rest}"
            for pattern, replacement in _LDM_VAE_RENAMES:
                key = re.sub(pattern, replacement, key)
            renamed[key] = value
        state_dict = renamed
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", key):
            key = f"{m.group(1)}.{_LEGACY_ATTENTION_RENAMES[m.group(2)]}.{m.group(3)}"
        out[key] = value
    return out


def _infer_vae_config(state_dict: Mapping[str, np.ndarray], source) -> dict:
    """The architecture from diffusers-named weight shapes (norm groups and scale: SD defaults)."""
    from ddt_jax.models import vae as vae_lib

    def shape(key):
        if key not in state_dict:
            raise ValueError(f"{source}: cannot infer the VAE architecture, {key} is missing; pass "
                             "load_vae(..., config=...) or use a diffusers folder with config.json")
        return state_dict[key].shape

    def indices(pattern):
        return sorted({int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))})

    levels = indices(r"encoder\.down_blocks\.(\d+)\.")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                               for i in levels],
        "layers_per_block": len(indices(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": vae_lib.SD_VAE_CONFIG["norm_num_groups"],
        "scaling_factor": vae_lib.SD_VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in state_dict),
    }


def _vae_torch_key(param_path) -> str:
    """Our param path -> diffusers key, e.g. ('encoder', 'down_blocks', 0, 'downsample', 'kernel')
    -> 'encoder.down_blocks.0.downsamplers.0.conv.weight'."""
    names = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv",
             "to_out": "to_out.0", "kernel": "weight", "scale": "weight"}
    return ".".join(names.get(str(p), str(p)) for p in param_path)


def _vae_to_flax_layout(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """torch layout -> ours (conv OIHW -> HWIO, linear (out, in) -> (in, out)); None if it can't fit."""
    if len(shape) == 2 and value.ndim > 2 and all(d == 1 for d in value.shape[2:]):
        value = value.reshape(value.shape[:2])   # LDM 1x1 convs / old conv1d proj_attn as linears
    if value.ndim != len(shape):
        return None
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
        value = value.T
    return np.ascontiguousarray(value) if value.shape == shape else None


def _vae_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def _vae_head(items, n: int = 12) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------------
# DINOv2 (the frozen REPA target): torch-hub `dinov2_vit*14_pretrain.pth` or .safetensors -> NNX.
#
#   dino = load_dinov2("dinov2_vitb14_pretrain.pth", dtype=jnp.bfloat16)   # feats = dino(images)
#   convert_dinov2("dinov2_vitb14_pretrain.pth", "dinov2_vitb14.safetensors")  # torch-free copy
#
# The published files are the plain state dicts of the hub models (block_chunks=0, so keys are
# `blocks.N.*`); ViT-B is 86.6M params (346 MB in float32). Sizes come from the shapes, the head
# count from DINOV2_VARIANTS. Each of our params maps to exactly one torch key, so a missing, extra
# or mis-shaped tensor is reported instead of silently skipped.
# ------------------------------------------------------------------------------------------------


# nnx leaf name -> torch leaf name (Linear/Conv `kernel` and LayerNorm `scale` are torch's `weight`).
_DINOV2_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight"}


def dinov2_config_from_state_dict(sd: Mapping[str, np.ndarray], *, num_heads: int | None = None) -> dict:
    """Constructor kwargs of `DINOv2` inferred from the shapes of a dinov2 state dict.

    embed_dim, depth, patch size, position grid, FFN kind and width and register count come from
    the shapes; the head count is not in the weights, so it comes from DINOV2_VARIANTS by
    embed_dim (S 384 -> 6, B 768 -> 12, L 1024 -> 16, G 1536 -> 24) unless `num_heads` is given.
    """
    from ddt_jax.models.dinov2 import DINOV2_VARIANTS

    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError(f"not a DINOv2 state dict: missing {absent} (expected the keys of the torch-hub "
                         f"`dinov2_vit*14_pretrain.pth`; got keys such as {sorted(sd)[:5]})")
    embed_dim = int(sd["cls_token"].shape[-1])
    patch = sd["patch_embed.proj.weight"].shape
    if len(patch) != 4 or patch[1] != 3 or patch[2] != patch[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(patch)}; expected (D, 3, p, p)")
    grid_tokens = int(sd["pos_embed"].shape[1]) - 1
    grid = int(np.sqrt(grid_tokens))
    if grid * grid != grid_tokens:
        raise ValueError(f"pos_embed holds {grid_tokens} grid tokens, not a square grid")
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    if depth == 0:
        raise ValueError("DINOv2 state dict has no `blocks.N.*` keys (chunked `blocks.C.N.*` checkpoints "
                         "must be flattened first)")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn_layer, ffn_hidden = "swiglu", int(sd["blocks.0.mlp.w12.weight"].shape[0]) // 2
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn_layer, ffn_hidden = "mlp", int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    else:
        raise ValueError("DINOv2 state dict has neither blocks.0.mlp.fc1.weight (MLP) nor "
                         "blocks.0.mlp.w12.weight (SwiGLU)")
    if num_heads is None:
        by_dim = {v["embed_dim"]: v["num_heads"] for v in DINOV2_VARIANTS.values()}
        if embed_dim not in by_dim:
            raise ValueError(f"embed_dim {embed_dim} is not a published DINOv2 size {sorted(by_dim)}: "
                             "pass num_heads= (the head count is not stored in the weights)")
        num_heads = by_dim[embed_dim]
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=int(patch[2]),
                img_size=grid * int(patch[2]), ffn_layer=ffn_layer, ffn_hidden_dim=ffn_hidden,
                num_register_tokens=registers)


def _dinov2_torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _DINOV2_LEAF_TO_TORCH.get(leaf, leaf)])


def _dinov2_torch_shape(path: tuple, shape: tuple) -> tuple:
    """Shape of the torch tensor behind the nnx leaf at `path` (its layout differs only for kernels)."""
    if path[-1] == "kernel" and len(shape) == 4:  # Conv2d weight (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel":  # Linear weight (out, in)
        return tuple(reversed(shape))
    return tuple(shape)


def _dinov2_from_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    if path[-1] == "kernel":
        return value.T  # (out, in) -> (in, out)
    return value


def dinov2_state_from_state_dict(sd: Mapping[str, np.ndarray], config: dict):
    """(graphdef, nnx.State of float32 numpy arrays) for `DINOv2(**config)` from a dinov2 state dict.

    Every key of the model must be present with the right shape and nothing else may be: missing,
    unexpected and mis-shaped keys are reported together in one ValueError. `nnx.merge(graphdef,
    state)` gives the module; the state alone is what a converted-checkpoint writer would save.
    """
    from ddt_jax.models.dinov2 import DINOv2

    abstract = nnx.eval_shape(lambda: DINOv2(**config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    wanted = {_dinov2_torch_key(path): path for path in flat}
    missing = sorted(set(wanted) - set(sd))
    unexpected = sorted(set(sd) - set(wanted))
    misshaped, values = [], {}
    for key, path in wanted.items():
        if key not in sd:
            continue
        expected = _dinov2_torch_shape(path, flat[path].get_value().shape)
        if tuple(sd[key].shape) != expected:
            misshaped.append(f"{key}: got {tuple(sd[key].shape)}, expected {expected}")
            continue
        values[path] = _dinov2_from_torch(path, np.asarray(sd[key], dtype=np.float32))
    if missing or unexpected or misshaped:
        raise ValueError(
            "DINOv2 state dict does not match the model "
            f"(embed_dim={config['embed_dim']}, depth={config['depth']}, ffn={config['ffn_layer']}, "
            f"registers={config.get('num_register_tokens', 0)}):"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  mis-shaped keys: {misshaped}" if misshaped else ""))
    for path, var in flat.items():
        var.set_value(values[path])
    return graphdef, nnx.from_flat_state(flat)


def load_dinov2(path: str | os.PathLike, *, num_heads: int | None = None, dtype=jnp.float32,
                **model_kwargs):
    """Loads a DINOv2 backbone from a `dinov2_vit*14_pretrain.pth` (torch-hub layout) or `.safetensors`.

    `dtype` is the compute dtype (params stay float32); `model_kwargs` go to `DINOv2` (e.g.
    `nonsquare="direct"`).
    """
    sd = read_state_dict(path)
    config = dinov2_config_from_state_dict(sd, num_heads=num_heads)
    graphdef, state = dinov2_state_from_state_dict(sd, {**config, "dtype": dtype, **model_kwargs})
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def convert_dinov2(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                   num_heads: int | None = None) -> pathlib.Path:
    """Checks a DINOv2 .pth against the model and writes its tensors (same keys) to a .safetensors.

    Loading the .safetensors later needs no torch; `load_dinov2` reads both.
    """
    from safetensors.numpy import save_file

    output_path = pathlib.Path(output_path)
    if output_path.suffix != ".safetensors":
        raise ValueError(f"output {output_path} must end in .safetensors")
    sd = read_state_dict(input_path)
    config = dinov2_config_from_state_dict(sd, num_heads=num_heads)
    dinov2_state_from_state_dict(sd, config)  # raises on any missing / extra / mis-shaped key
    output_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, str(output_path))
    return output_path


def add_dinov2_command(subparsers) -> None:
    """Adds `dinov2 --input X.pth --output X.safetensors [--num-heads N]` to the convert CLI."""
    def run(args):
        out = convert_dinov2(args.input, args.output, num_heads=args.num_heads)
        print(f"converted {args.input} -> {out}")

    p = subparsers.add_parser("dinov2", help="DINOv2 .pth -> checked .safetensors (same keys, no torch needed)")
    p.add_argument("--input", required=True, help="dinov2_vit*14_pretrain.pth (or .safetensors)")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.add_argument("--num-heads", type=int, default=None, help="heads, for a width not in DINOV2_VARIANTS")
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _convert_ddt_command(args) -> None:
    weights, extras = split_ddt_checkpoint(read_state_dict(args.input), use_ema=not args.raw)
    config = infer_ddt_config(weights, num_encoder_blocks=args.num_encoder_blocks, in_channels=args.in_channels,
                              patch_size=args.patch_size, image_size=args.image_size, name_hint=str(args.input))
    model = ddt_from_state_dict(weights, config)
    projector = load_repa_projector(args.input) if any(k.startswith(LIGHTNING_REPA_PREFIX) for k in extras) else None
    from ddt_jax.models import ddt
    out = save_converted(model, args.output, config, repa_projector=projector)
    print(f"converted {args.input} ({'raw' if args.raw else 'EMA'} weights, {config.arch.upper()} "
          f"{config.variant} {config.num_encoder_blocks}en{config.num_blocks - config.num_encoder_blocks}de, "
          f"{ddt.count_params(model):,} params{', + REPA projector' if projector else ''}) -> {out}")


def main(argv=None) -> None:
    """python -m ddt_jax.convert ddt --input MODEL.ckpt --num-encoder-blocks 22 --output DIR"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ddt_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ddt", help="DDT / DiT weights -> orbax checkpoint (DIR/params + DIR/model_config.json)")
    p.add_argument("--input", required=True, help=".ckpt (Lightning), .pt/.pth or .safetensors")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-encoder-blocks", type=int, default=None,
                   help="encoder depth (22 for DDT-XL/2 22en6de); parsed from names like '22en6de' if omitted")
    p.add_argument("--raw", action="store_true", help="take the raw `denoiser.` weights instead of the EMA copy")
    p.add_argument("--in-channels", type=int, default=None, help="latent channels if not 4 (shapes tell only C*p*p)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size, when the channel count is unknown")
    p.add_argument("--image-size", type=int, default=None,
                   help="latent side to sample at (64 for 512px); default from a name like 'R512', else 32")
    p.set_defaults(run=_convert_ddt_command)
    add_dinov2_command(sub)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
