"""DINOv2 (the frozen REPA target): torch-hub `dinov2_vit*14[_reg]_pretrain.pth` -> our NNX model.

The published files are the plain state dicts of the hub models (block_chunks=0, so keys are
`blocks.N.*`). Sizes come from the shapes, the head count from DINOV2_VARIANTS; each of our params
takes exactly one torch key through the shared filler. `convert_dinov2` writes a checked
`.safetensors` copy with the same keys, which later loads without torch.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_numpy

from ddt_jax.convert import fill
from ddt_jax.convert.state_dict import read_state_dict
from ddt_jax.models import dinov2 as dinov2_lib

# nnx leaf name -> torch leaf name (Linear/Conv `kernel` and LayerNorm `scale` are torch `weight`).
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight"}
_HINT = ("Expected the keys of a torch-hub `dinov2_vit*14[_reg]_pretrain.pth` (flat `blocks.N.*`, "
         "no head), or a .safetensors written from one by `python -m ddt_jax.convert dinov2`.")


def torch_key(path: tuple) -> str:
    """Our DINOv2 param path -> its torch-hub key, e.g. ('norm', 'scale') -> 'norm.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def dinov2_config_from_state_dict(sd: Mapping[str, np.ndarray], *,
                                  num_heads: int | None = None) -> dict:
    """Constructor kwargs of `DINOv2` inferred from the shapes of a dinov2 state dict.

    embed_dim, depth, patch size, position grid, FFN kind and width and register count come from
    the shapes; the head count is not in the weights, so it comes from DINOV2_VARIANTS by
    embed_dim (S 384 -> 6, B 768 -> 12, L 1024 -> 16, G 1536 -> 24) unless `num_heads` is given.
    """
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError(f"not a DINOv2 state dict: missing {absent} (expected the keys of the "
                         f"torch-hub `dinov2_vit*14_pretrain.pth`; got keys such as "
                         f"{sorted(sd)[:5]})")
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
        raise ValueError("DINOv2 state dict has no `blocks.N.*` keys (chunked `blocks.C.N.*` "
                         "checkpoints must be flattened first)")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn_layer, ffn_hidden = "swiglu", int(sd["blocks.0.mlp.w12.weight"].shape[0]) // 2
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn_layer, ffn_hidden = "mlp", int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    else:
        raise ValueError("DINOv2 state dict has neither blocks.0.mlp.fc1.weight (MLP) nor "
                         "blocks.0.mlp.w12.weight (SwiGLU)")
    if num_heads is None:
        by_dim = {v["embed_dim"]: v["num_heads"] for v in dinov2_lib.DINOV2_VARIANTS.values()}
        if embed_dim not in by_dim:
            raise ValueError(f"embed_dim {embed_dim} is not a published DINOv2 size "
                             f"{sorted(by_dim)}: pass num_heads= (the head count is not stored "
                             "in the weights)")
        num_heads = by_dim[embed_dim]
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=int(patch[2]),
                img_size=grid * int(patch[2]), ffn_layer=ffn_layer, ffn_hidden_dim=ffn_hidden,
                num_register_tokens=registers)


def dinov2_state_from_state_dict(sd: Mapping[str, np.ndarray], config: dict
                                 ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, nnx.State of float32 numpy arrays) for `DINOv2(**config)` from a state dict.

    Every key of the model must be present with the right shape and nothing else may be:
    missing, unexpected and mis-shaped keys are reported together in one ValueError.
    `nnx.merge(graphdef, state)` gives the module.
    """
    abstract = nnx.eval_shape(lambda: dinov2_lib.DINOv2(**config, rngs=nnx.Rngs(0)))
    what = (f"DINOv2 weights (embed_dim={config['embed_dim']}, depth={config['depth']}, "
            f"ffn={config['ffn_layer']}, registers={config.get('num_register_tokens', 0)})")
    state = fill.fill_params(abstract, sd, torch_key=torch_key, what=what, hint=_HINT)
    return nnx.graphdef(abstract), state


def load_dinov2(path: str | os.PathLike, *, num_heads: int | None = None, dtype=jnp.float32,
                **model_kwargs) -> dinov2_lib.DINOv2:
    """Loads a DINOv2 backbone.

    Args:
      path: a torch-hub `dinov2_vit*14[_reg]_pretrain.pth` or a `.safetensors` with its keys.
      num_heads: the head count, for a width not in DINOV2_VARIANTS.
      dtype: the compute dtype (params stay float32).
      **model_kwargs: more `DINOv2` arguments (e.g. `nonsquare="direct"`).

    Returns:
      The DINOv2 module; `model(images)` gives the REPA target features.
    """
    sd = read_state_dict(path)
    config = dinov2_config_from_state_dict(sd, num_heads=num_heads)
    graphdef, state = dinov2_state_from_state_dict(sd, {**config, "dtype": dtype, **model_kwargs})
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def convert_dinov2(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                   num_heads: int | None = None) -> pathlib.Path:
    """Checks a DINOv2 file against the model and writes its tensors (same keys) as safetensors.

    Args:
      input_path: a torch-hub `.pth` (or a `.safetensors`).
      output_path: the `.safetensors` file to write; `load_dinov2` reads it without torch.
      num_heads: the head count, for a width not in DINOv2_VARIANTS.

    Returns:
      `output_path`.
    """
    output_path = pathlib.Path(output_path)
    if output_path.suffix != ".safetensors":
        raise ValueError(f"output {output_path} must end in .safetensors")
    sd = read_state_dict(input_path)
    config = dinov2_config_from_state_dict(sd, num_heads=num_heads)
    dinov2_state_from_state_dict(sd, config)  # raises on any missing / extra / mis-shaped key
    output_path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
                                str(output_path))
    return output_path
