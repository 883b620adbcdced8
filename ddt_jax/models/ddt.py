"""DDT (Decoupled Diffusion Transformer) and the plain DiT baseline in Flax NNX.

DDT splits the transformer into a condition *encoder* and a velocity *decoder*:

    c = silu(t_emb + y_emb)
    s = s_embedder(patches(x));  s = encoder_blocks(s, c);  s = silu(t_emb + s)   # self-condition
    v = final_layer(decoder_blocks(x_embedder(patches(x)), s), s)                 # velocity

The decoder sees t and y only through the per-token state `s`, which is why a sampler may reuse
`s` across steps and run the decoder alone (`model(x, t, y, s=s)`).

The DiT baseline (`arch = "dit"`) uses the same blocks, all conditioned on silu(t + y), and no
s_embedder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ddt_jax.models import layers

# (hidden_size, num_blocks, num_heads): DiT/SiT widths and depths, as used by the paper.
VARIANTS = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
# The paper's encoder/decoder split per size (B 8en4de, L 20en4de, XL 22en6de; S like B).
DEFAULT_ENCODER_BLOCKS = {"S": 8, "B": 8, "L": 20, "XL": 22}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_variant(variant: str) -> tuple[str, int]:
    """'XL/2' -> ('XL', 2)."""
    try:
        size, patch = variant.split("/")
        patch = int(patch)
    except ValueError:
        raise ValueError(f"model variant {variant!r} is not of the form SIZE/PATCH, "
                         "e.g. 'XL/2' or 'B/1'") from None
    if size not in VARIANTS:
        raise ValueError(f"unknown model size {size!r} in {variant!r}; "
                         f"known sizes: {sorted(VARIANTS)}")
    return size, patch


def _check_inputs(model, x, t, y):
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (B, H, W, C), got shape {x.shape}")
    b, h, w, c = x.shape
    if c != model.in_channels:
        raise ValueError(f"x has {c} channels but the model expects {model.in_channels} "
                         "(inputs are NHWC: put channels last)")
    p = model.patch_size
    if h % p or w % p:
        raise ValueError(f"input size {h}x{w} is not divisible by the patch size {p}")
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and t.shape[0] != b):
        raise ValueError(f"t must be a scalar or shape ({b},), got shape {jnp.shape(t)}")
    if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
        raise TypeError(f"labels y must be integers (null class = {model.num_classes}), "
                        f"got {jnp.asarray(y).dtype}")
    if jnp.shape(y) != (b,):
        raise ValueError(f"labels y must have shape ({b},), got {jnp.shape(y)}")
    return b, h, w, c


class DDT(nnx.Module):
    """Decoupled Diffusion Transformer: `num_encoder_blocks` encoder + the rest decoder blocks."""

    is_decoupled = True

    def __init__(self, *, in_channels: int = 4, patch_size: int = 2, hidden_size: int = 1152,
                 num_heads: int = 16, num_blocks: int = 28, num_encoder_blocks: int = 22,
                 num_classes: int = 1000, mlp_ratio: float = 4.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not 0 < num_encoder_blocks < num_blocks:
            raise ValueError("num_encoder_blocks must be in [1, num_blocks - 1] = "
                             f"[1, {num_blocks - 1}], got {num_encoder_blocks}")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_heads, self.num_blocks, self.num_classes = num_heads, num_blocks, num_classes
        self.num_encoder_blocks = num_encoder_blocks
        self.dtype = dtype
        patch_features = in_channels * patch_size * patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.x_embedder = layers.PatchEmbed(patch_features, hidden_size, **kw)
        self.s_embedder = layers.PatchEmbed(patch_features, hidden_size, **kw)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, param_dtype=param_dtype,
                                               rngs=rngs)
        self.blocks = nnx.List([layers.Block(hidden_size, num_heads, mlp_ratio, **kw)
                                for _ in range(num_blocks)])
        self.final_layer = layers.FinalLayer(hidden_size, patch_features, **kw)

    def num_tokens(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def __call__(self, x, t, y, s=None, *, feature_layer: int | None = None):
        b, h, w, c = _check_inputs(self, x, t, y)
        p = self.patch_size
        n = self.num_tokens(h, w)
        if s is not None and s.shape != (b, n, self.hidden_size):
            raise ValueError(f"encoder state s must have shape {(b, n, self.hidden_size)}, "
                             f"got {s.shape}")
        if feature_layer is not None:
            if s is not None:
                raise ValueError("feature_layer needs the encoder to run: do not pass s with it")
            if not 1 <= feature_layer <= self.num_encoder_blocks:
                raise ValueError("feature_layer is 1-based and must be in "
                                 f"[1, {self.num_encoder_blocks}] (encoder blocks), "
                                 f"got {feature_layer}")
        rope = jnp.asarray(layers.rope_2d_angles(self.hidden_size // self.num_heads, h // p,
                                                 w // p))
        tokens = layers.patchify(x, p)
        t_emb = self.t_embedder(jnp.broadcast_to(t, (b,)))[:, None, :]
        feature = None
        if s is None:
            c_enc = jax.nn.silu(t_emb + self.y_embedder(y)[:, None, :])
            s = self.s_embedder(tokens)
            for i in range(self.num_encoder_blocks):
                s = self.blocks[i](s, c_enc, rope)
                if feature_layer == i + 1:
                    feature = s
            s = jax.nn.silu(t_emb + s)
        out = self.x_embedder(tokens)
        for i in range(self.num_encoder_blocks, self.num_blocks):
            out = self.blocks[i](out, s, rope)
        out = self.final_layer(out, s)
        v = layers.unpatchify(out, p, h, w, c).astype(jnp.float32)
        return (v, s) if feature_layer is None else (v, s, feature)


class DiT(nnx.Module):
    """The improved DiT baseline: the same blocks, all conditioned on silu(t + y).

    There is no encoder state: `s` is always None.
    """

    is_decoupled = False

    def __init__(self, *, in_channels: int = 4, patch_size: int = 2, hidden_size: int = 1152,
                 num_heads: int = 16, num_blocks: int = 28, num_classes: int = 1000,
                 mlp_ratio: float = 4.0, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_heads, self.num_blocks, self.num_classes = num_heads, num_blocks, num_classes
        # Every block is an "encoder" block for feature_layer purposes.
        self.num_encoder_blocks = num_blocks
        self.dtype = dtype
        patch_features = in_channels * patch_size * patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.x_embedder = layers.PatchEmbed(patch_features, hidden_size, **kw)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, param_dtype=param_dtype,
                                               rngs=rngs)
        self.blocks = nnx.List([layers.Block(hidden_size, num_heads, mlp_ratio, **kw)
                                for _ in range(num_blocks)])
        self.final_layer = layers.FinalLayer(hidden_size, patch_features, **kw)

    num_tokens = DDT.num_tokens

    def __call__(self, x, t, y, s=None, *, feature_layer: int | None = None):
        if s is not None:
            raise ValueError("the DiT baseline has no encoder state to reuse: call it without s")
        b, h, w, c = _check_inputs(self, x, t, y)
        if feature_layer is not None and not 1 <= feature_layer <= self.num_blocks:
            raise ValueError(f"feature_layer is 1-based and must be in [1, {self.num_blocks}], "
                             f"got {feature_layer}")
        p = self.patch_size
        rope = jnp.asarray(layers.rope_2d_angles(self.hidden_size // self.num_heads, h // p,
                                                 w // p))
        t_emb = self.t_embedder(jnp.broadcast_to(t, (b,)))[:, None, :]
        cond = jax.nn.silu(t_emb + self.y_embedder(y)[:, None, :])
        out = self.x_embedder(layers.patchify(x, p))
        feature = None
        for i, block in enumerate(self.blocks):
            out = block(out, cond, rope)
            if feature_layer == i + 1:
                feature = out
        out = self.final_layer(out, cond)
        v = layers.unpatchify(out, p, h, w, c).astype(jnp.float32)
        return (v, None) if feature_layer is None else (v, None, feature)


class REPAProjector(nnx.Module):
    """REPA head: Linear(h, d) - SiLU - Linear(d, d) - SiLU - Linear(d, out), torch-default init.

    Maps the hidden state after encoder block `align_layer` to the DINOv2 feature width (768 for
    B/14).
    """

    def __init__(self, hidden_size: int, projector_dim: int, out_dim: int = 768, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.linear(hidden_size, projector_dim, ("embed", "mlp"), **kw)
        self.linear_2 = layers.linear(projector_dim, projector_dim, ("mlp", "embed"), **kw)
        self.linear_3 = layers.linear(projector_dim, out_dim, ("embed", "feature"), **kw)

    def __call__(self, h):
        h = jax.nn.silu(self.linear_1(h))
        h = jax.nn.silu(self.linear_2(h))
        return self.linear_3(h).astype(jnp.float32)


def default_model_config() -> ml_collections.ConfigDict:
    """Model section of every config; sizes come from `variant` unless set (None = unset)."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(dict(
        arch="ddt",             # "ddt" (encoder/decoder) or "dit" (plain baseline, for ablations)
        variant="XL/2",         # SIZE/PATCH: S, B, L, XL with patch 1, 2 or 4
        # None: the paper's split for the size (S/B 8, L 20, XL 22); DiT has no encoder
        num_encoder_blocks=placeholder(int),
        hidden_size=placeholder(int),   # None: from the variant (S 384, B 768, L 1024, XL 1152)
        num_heads=placeholder(int),     # None: from the variant (S 6, B 12, L 16, XL 16)
        num_blocks=placeholder(int),    # None: from the variant (S/B 12, L 24, XL 28)
        mlp_ratio=4.0,          # SwiGLU hidden = int(2 * 4h / 3)
        in_channels=4,          # SD-VAE latents
        image_size=32,          # latent side (256 px / 8); the height when image_width is set
        image_width=placeholder(int),   # None: square
        num_classes=1000,       # ImageNet; the label table has num_classes + 1 rows (null last)
        dtype="float32",        # compute dtype of matmuls/attention ("bfloat16" on accelerators)
    ))


def _size_or_default(config, name: str, default: int) -> int:
    """`config.name` if set, else the variant's `default`; 0 or negative sizes are errors."""
    value = config.get(name)
    if value is None:
        return default
    if value < 1:
        raise ValueError(f"model.{name}={value} must be positive, or None (unset) for the "
                         f"variant's {default}")
    return int(value)


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """Resolves a model config into constructor arguments (variant defaults filled in).

    Args:
      config: a model section (`default_model_config()` and overrides).

    Returns:
      The keyword arguments of `DDT` (or `DiT` for arch "dit"), dtype resolved to a jnp dtype.
    """
    size, patch = parse_variant(config.variant)
    hidden, depth, heads = VARIANTS[size]
    if config.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    kw = dict(
        in_channels=config.in_channels, patch_size=patch,
        hidden_size=_size_or_default(config, "hidden_size", hidden),
        num_heads=_size_or_default(config, "num_heads", heads),
        num_blocks=_size_or_default(config, "num_blocks", depth),
        num_classes=config.num_classes, mlp_ratio=config.mlp_ratio, dtype=DTYPES[config.dtype])
    if config.arch == "ddt":
        kw["num_encoder_blocks"] = _size_or_default(config, "num_encoder_blocks",
                                                    DEFAULT_ENCODER_BLOCKS[size])
    elif config.arch != "dit":
        raise ValueError(f"model.arch must be 'ddt' or 'dit', got {config.arch!r}")
    return kw


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> DDT | DiT:
    """Builds DDT or the DiT baseline from a model config.

    Args:
      config: a model section (`default_model_config()` and overrides); unset sizes come from the
        variant.
      rngs: the parameter initialisation keys, e.g. `nnx.Rngs(0)`.

    Returns:
      A freshly initialised `DDT` (arch "ddt") or `DiT` (arch "dit").
    """
    kw = model_kwargs(config)
    return DDT(**kw, rngs=rngs) if config.arch == "ddt" else DiT(**kw, rngs=rngs)


def count_params(model_or_state) -> int:
    state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    return sum(int(x.size) for x in jax.tree.leaves(state))
