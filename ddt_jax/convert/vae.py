"""SD-VAE: a diffusers folder, a diffusers single file or an original LDM (CompVis) file -> NNX.

Every checkpoint is first renamed to the current diffusers key layout, then each param of our
`AutoencoderKL` takes exactly one diffusers key through the shared filler, so a half-loaded VAE can
never decode silently wrong images. `convert_vae` writes any of these as a plain diffusers folder
(float32 safetensors), which later loads without torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_numpy

from ddt_jax import files
from ddt_jax.convert import fill
from ddt_jax.convert.state_dict import read_state_dict
from ddt_jax.models import vae as vae_lib

VAE_CONFIG_NAME = "config.json"
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_HINT = ("If the checkpoint is a different VAE, pass load_vae(..., config=...) matching it "
         "(diffusers config.json keys).")

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
# Our module names -> diffusers' (nnx `kernel` / `scale` are torch `weight`).
_TORCH_NAMES = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv",
                "to_out": "to_out.0", "kernel": "weight", "scale": "weight"}


def load_vae(path: str | os.PathLike, *, dtype=jnp.float32, config=None) -> vae_lib.AutoencoderKL:
    """Reads SD-VAE weights into `models.vae.AutoencoderKL` (float32 params).

    Without a config (the argument or a folder's config.json) the architecture is read off the
    weight shapes with the SD-VAE's norm_num_groups (32) and scaling_factor (0.18215), which
    shapes cannot reveal.

    Args:
      path: a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`;
        a pipeline folder with a `vae/` subfolder also works) or one weight file with diffusers
        keys (either attention naming) or original LDM keys (`encoder.down.0.block.0.norm1.weight`,
        ...; a whole SD checkpoint's `first_stage_model.` entries are used).
      dtype: the compute dtype (e.g. jnp.bfloat16).
      config: a diffusers-style dict or a `VAEConfig`; it overrides a folder's config.json.

    Returns:
      The AutoencoderKL with the file's weights.
    """
    path = files.as_path(path)   # local or gs://
    file_config = None
    if path.is_dir():
        path, file_config = _find_vae_files(path)
    state_dict = keys_to_diffusers(read_state_dict(path))
    config = config if config is not None else file_config
    if config is None:
        config = infer_config(state_dict, path)
    if not isinstance(config, vae_lib.VAEConfig):
        config = vae_lib.VAEConfig.from_dict(config)
    # Shapes only: the real SD-VAE would spend seconds on a random init we overwrite anyway.
    abstract = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    params = fill.fill_params(abstract, state_dict, torch_key=torch_key, to_ours=_to_ours,
                              what=f"{path}: VAE weights for {config}", hint=_HINT)
    return nnx.merge(nnx.graphdef(abstract), jax.tree.map(jnp.asarray, params))


def _find_vae_files(folder: pathlib.Path) -> tuple[pathlib.Path, dict]:
    if not (folder / VAE_CONFIG_NAME).exists() and (folder / "vae" / VAE_CONFIG_NAME).exists():
        folder = folder / "vae"   # the root of a diffusers pipeline
    config_path = folder / VAE_CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers VAE folder: no config.json. Pass the "
                                "folder that holds config.json, or one weight file.")
    for name in VAE_WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name, json.loads(config_path.read_text())
    raise FileNotFoundError(f"{folder} has a config.json but none of {list(VAE_WEIGHT_NAMES)}; "
                            "nothing is downloaded at run time, so copy the weights there first.")


def keys_to_diffusers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames any supported VAE key layout (LDM, old diffusers) to the current diffusers one."""
    if any(k.startswith("first_stage_model.") for k in state_dict):   # a whole SD checkpoint
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


def infer_config(state_dict: Mapping[str, np.ndarray], source) -> dict:
    """The architecture from diffusers-named weight shapes (norm groups and scale: SD defaults)."""
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


def torch_key(path: tuple) -> str:
    """Our param path -> diffusers key, e.g. ('encoder', 'down_blocks', 0, 'downsample', 'kernel')
    -> 'encoder.down_blocks.0.downsamplers.0.conv.weight'."""
    return ".".join(_TORCH_NAMES.get(str(p), str(p)) for p in path)


def _to_ours(path: tuple, value: np.ndarray, shape: tuple) -> np.ndarray | None:
    """The shared layout change, after reading LDM 1x1 convs (and old conv1d proj_attn) as
    linears."""
    if len(shape) == 2 and value.ndim > 2 and all(d == 1 for d in value.shape[2:]):
        value = value.reshape(value.shape[:2])
    return fill.torch_to_ours(path, value, shape)


def diffusers_config(config: vae_lib.VAEConfig) -> dict:
    """A diffusers `AutoencoderKL` config.json dict for `config` (what `VAEConfig.from_dict` and
    diffusers both read)."""
    out = {"_class_name": "AutoencoderKL", **dataclasses.asdict(config)}
    n = len(config.block_out_channels)
    out["block_out_channels"] = list(config.block_out_channels)
    out["down_block_types"] = ["DownEncoderBlock2D"] * n
    out["up_block_types"] = ["UpDecoderBlock2D"] * n
    out["act_fn"] = "silu"
    return out


def vae_state_dict(vae: vae_lib.AutoencoderKL) -> dict[str, np.ndarray]:
    """Our VAE's params as a float32 state dict in the current diffusers key layout."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        value = fill.ours_to_torch(path, np.asarray(variable.get_value(), np.float32))
        out[torch_key(path)] = np.ascontiguousarray(value)
    return out


def convert_vae(input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                config=None) -> pathlib.Path:
    """Checks a VAE checkpoint against our AutoencoderKL and writes it as a diffusers folder.

    The folder holds `config.json` (diffusers keys, scaling_factor included) and
    `diffusion_pytorch_model.safetensors` (current diffusers key layout, float32), so `load_vae`
    reads it without torch and gives the same params. config.json is removed first and written
    last: a folder left half-written by a crash has none, so it is never taken for a VAE.

    Args:
      input_path: anything `load_vae` reads (diffusers folder or file, LDM file, SD checkpoint).
      output_dir: the folder to create or overwrite (not the input folder).
      config: as for `load_vae`, for a single file whose architecture is not the SD-VAE's.

    Returns:
      `output_dir`.
    """
    input_path, output_dir = pathlib.Path(input_path), pathlib.Path(output_dir)
    if input_path.is_dir() and output_dir.resolve() in (input_path.resolve(),
                                                        (input_path / "vae").resolve()):
        raise ValueError(f"output {output_dir} is the input folder; write to another folder")
    vae = load_vae(input_path, config=config)   # raises on any missing / extra / mis-shaped key
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / VAE_CONFIG_NAME
    config_path.unlink(missing_ok=True)
    weights_path = output_dir / VAE_WEIGHT_NAMES[0]
    _write_atomically(weights_path, lambda tmp: safetensors_numpy.save_file(
        vae_state_dict(vae), str(tmp), metadata={"format": "pt"}))
    text = json.dumps(diffusers_config(vae.config), indent=2) + "\n"
    _write_atomically(config_path, lambda tmp: tmp.write_text(text))
    return output_dir


def _write_atomically(path: pathlib.Path, write) -> None:
    """`write(tmp)` into a temporary sibling, then renames it to `path` (atomic on one disk)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
