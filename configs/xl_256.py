"""DDT-XL/2 (22 encoder + 6 decoder blocks) on ImageNet 256x256 latents: the paper's recipe.

The recipe is the schema's defaults (ddt_jax/config_schema.py says where each comes from); the
`dit` argument gives the paper's improved-DiT baseline trained the same way.
"""
import ml_collections

from ddt_jax import config_schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "" for DDT, "dit" for the improved-DiT baseline (same recipe, no encoder/decoder)."""
    arg = arg or ""
    if arg not in ("", "ddt", "dit"):
        raise ValueError(f"config argument must be '', 'ddt' or 'dit', got {arg!r}")
    c = config_schema.default_config()
    if arg == "dit":
        c.model.arch = "dit"
        c.optim.b2 = 0.999          # official: the DiT-baseline yamls keep torch's default
    return c
