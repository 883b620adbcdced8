"""DDT (Decoupled Diffusion Transformer) and the plain DiT baseline in Flax NNX.

DDT splits the transformer into a condition *encoder* and a velocity *decoder*:

    c = silu(t_emb + y_emb)
    s = s_embedder(patches(x));  s = encoder_blocks(s, c);  s = silu(t_emb + s)   # self-condition
    v = final_layer(decoder_blocks(x_embedder(patches(x)), s), s)                 # velocity

The decoder sees t and y only through the per-token state `s`, which is why a sampler may reuse
`s` across steps and run the decoder alone (`model(x, t, y, s=s)`).

The DiT baseline (`arch = "dit"`) uses the same blocks, all conditioned on silu(t + y), and no
s_embedder.

Two param layouts hold the same weights. Unrolled (the default, the official key names):
`blocks.{i}.*`, one subtree per block. Scanned (`scan_blocks=True`): `encoder_blocks.layers.*` and
`decoder_blocks.layers.*`, each block's params stacked on a leading axis (DiT: all its blocks in
`encoder_blocks`). `stack_blocks` / `unstack_blocks` convert a param tree between the two.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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
UNROLLED_BLOCKS = "blocks"
SCANNED_BLOCKS = ("encoder_blocks", "decoder_blocks")   # the scanned layout's stacks, in order


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


def _build_blocks(model, num_blocks: int, num_encoder_blocks: int, attention: str, remat: str,
                  scan_blocks: bool, hidden_size: int, num_heads: int, mlp_ratio: float, kw: dict):
    """Sets `model.blocks` (unrolled) or `model.encoder_blocks` / `model.decoder_blocks` (stacks).

    Both layouts create the same Blocks in the same order, so one seed gives the same weights.
    """
    model.matmul_layout = kw["matmul_layout"]
    model.remat, model.scan_blocks = layers.check_remat(remat), bool(scan_blocks)
    model.attention = layers.check_attention(attention)
    blocks = [layers.Block(hidden_size, num_heads, mlp_ratio, attention=attention, **kw)
              for _ in range(num_blocks)]
    if not scan_blocks:
        model.blocks = nnx.List(blocks)
        return
    model.encoder_blocks = layers.BlockStack(blocks[:num_encoder_blocks], remat=remat)
    if num_encoder_blocks < num_blocks:
        model.decoder_blocks = layers.BlockStack(blocks[num_encoder_blocks:], remat=remat)


def _run_blocks(model, start: int, stop: int, x, c, rope, feature_layer: int | None = None):
    """(output of blocks [start, stop), output of block `feature_layer` (1-based) or None).

    Scanned: the stack that holds the range runs as one scan, or as two split at feature_layer
    (the REPA feature is the carry between them: no per-layer outputs are kept for it).
    """
    if not model.scan_blocks:
        feature = None
        for i in range(start, stop):
            x = layers.apply_block(model.blocks[i], x, c, rope, model.remat)
            if feature_layer == i + 1:
                feature = x
        return x, feature
    stack = model.encoder_blocks if start == 0 else model.decoder_blocks
    if feature_layer is None or feature_layer == stop - start:
        x = stack(x, c, rope)
        return x, (None if feature_layer is None else x)
    feature = stack(x, c, rope, stop=feature_layer)
    return stack(feature, c, rope, start=feature_layer), feature


class DDT(nnx.Module):
    """Decoupled Diffusion Transformer: `num_encoder_blocks` encoder + the rest decoder blocks."""

    is_decoupled = True

    def __init__(self, *, in_channels: int = 4, patch_size: int = 2, hidden_size: int = 1152,
                 num_heads: int = 16, num_blocks: int = 28, num_encoder_blocks: int = 22,
                 num_classes: int = 1000, mlp_ratio: float = 4.0, attention: str = "xla",
                 remat: str = "none", scan_blocks: bool = False, matmul_layout: str = "auto",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not 0 < num_encoder_blocks < num_blocks:
            raise ValueError("num_encoder_blocks must be in [1, num_blocks - 1] = "
                             f"[1, {num_blocks - 1}], got {num_encoder_blocks}")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_heads, self.num_blocks, self.num_classes = num_heads, num_blocks, num_classes
        self.num_encoder_blocks = num_encoder_blocks
        self.dtype = dtype
        patch_features = in_channels * patch_size * patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype,
                  matmul_layout=layers.check_matmul_layout(matmul_layout), rngs=rngs)
        self.x_embedder = layers.PatchEmbed(patch_features, hidden_size, **kw)
        self.s_embedder = layers.PatchEmbed(patch_features, hidden_size, **kw)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, param_dtype=param_dtype,
                                                  matmul_layout=matmul_layout, rngs=rngs)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, param_dtype=param_dtype,
                                               rngs=rngs)
        _build_blocks(self, num_blocks, num_encoder_blocks, attention, remat, scan_blocks,
                      hidden_size, num_heads, mlp_ratio, kw)
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
            s, feature = _run_blocks(self, 0, self.num_encoder_blocks, self.s_embedder(tokens),
                                     c_enc, rope, feature_layer)
            s = jax.nn.silu(t_emb + s)
        out, _ = _run_blocks(self, self.num_encoder_blocks, self.num_blocks,
                             self.x_embedder(tokens), s, rope)
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
                 mlp_ratio: float = 4.0, attention: str = "xla", remat: str = "none",
                 scan_blocks: bool = False, matmul_layout: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_heads, self.num_blocks, self.num_classes = num_heads, num_blocks, num_classes
        # Every block is an "encoder" block for feature_layer purposes.
        self.num_encoder_blocks = num_blocks
        self.dtype = dtype
        patch_features = in_channels * patch_size * patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype,
                  matmul_layout=layers.check_matmul_layout(matmul_layout), rngs=rngs)
        self.x_embedder = layers.PatchEmbed(patch_features, hidden_size, **kw)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, param_dtype=param_dtype,
                                                  matmul_layout=matmul_layout, rngs=rngs)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, param_dtype=param_dtype,
                                               rngs=rngs)
        _build_blocks(self, num_blocks, num_blocks, attention, remat, scan_blocks, hidden_size,
                      num_heads, mlp_ratio, kw)
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
        out, feature = _run_blocks(self, 0, self.num_blocks, self.x_embedder(layers.patchify(x, p)),
                                   cond, rope, feature_layer)
        out = self.final_layer(out, cond)
        v = layers.unpatchify(out, p, h, w, c).astype(jnp.float32)
        return (v, None) if feature_layer is None else (v, None, feature)


class REPAProjector(nnx.Module):
    """REPA head: Linear(h, d) - SiLU - Linear(d, d) - SiLU - Linear(d, out), torch-default init.

    Maps the hidden state after encoder block `align_layer` to the DINOv2 feature width (768 for
    B/14).
    """

    def __init__(self, hidden_size: int, projector_dim: int, out_dim: int = 768, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, matmul_layout: str = "auto",
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, matmul_layout=matmul_layout, rngs=rngs)
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
        # Attention kernel: "xla" (plain XLA; keeps the f32 scores B*H*N^2 for the backward),
        # "cudnn" (cuDNN flash attention: GPU, bf16/fp16), "tpu_flash" (Pallas splash kernel:
        # TPU), "auto" (cudnn on GPU in bf16/fp16, tpu_flash on TPU, else xla). Same weights.
        attention="xla",
        # jax.checkpoint per block: "none", "full" (= "nothing_saveable": keep only each block's
        # input), "dots_saveable" (keep every matmul output), "dots_with_no_batch_dims_saveable"
        # (keep the weight matmuls, recompute attention). Less memory for more compute.
        remat="none",
        # True: encoder and decoder blocks each as one scan over stacked params (compile time
        # independent of depth). Changes the param layout (see `stack_blocks`), not the math.
        # Pair it with remat: a scan without one stores every intermediate of every block
        # (B/2 256px bf16, batch 16 per TPU v5e chip, compiled: 1.9x the unrolled step's
        # temporaries; with remat "full" 0.24x).
        scan_blocks=False,
        # How the dense layers' and float32 XLA attention's matmuls are written: "xla" (jax's
        # autodiff as is: the previous code path), "row_major" (custom VJPs whose matmuls
        # XLA:CPU runs in YNNPACK: the DDT-S/2 batch-8 train step on one CPU thread 1.7x faster,
        # benchmarks/cpu_train_step.py), "auto" (row_major on CPU, else xla). Same values to
        # float32 rounding, same params.
        matmul_layout="auto",
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


def _speed_kwargs(config: ml_collections.ConfigDict) -> dict:
    """attention / remat / scan_blocks / matmul_layout, checked; configs saved before these
    fields existed (converted directories, old runs) get the defaults."""
    defaults = default_model_config()
    kw = {name: config.get(name, defaults[name])
          for name in ("attention", "remat", "scan_blocks", "matmul_layout")}
    for name, check in (("attention", layers.check_attention), ("remat", layers.check_remat),
                        ("matmul_layout", layers.check_matmul_layout)):
        try:
            check(kw[name])
        except ValueError as e:
            raise ValueError(f"model.{e}") from None
    if not isinstance(kw["scan_blocks"], (bool, np.bool_)):
        raise ValueError(f"model.scan_blocks must be True or False, got {kw['scan_blocks']!r}")
    kw["scan_blocks"] = bool(kw["scan_blocks"])
    return kw


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
        num_classes=config.num_classes, mlp_ratio=config.mlp_ratio, dtype=DTYPES[config.dtype],
        **_speed_kwargs(config))
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


# ---------------------------------------------------------------------------------------------
# The two param layouts (unrolled `blocks.{i}` and scanned `encoder_blocks` / `decoder_blocks`).

def is_scanned(params) -> bool:
    """Whether a model's param tree (pure dict or nnx.State) is in the scanned layout."""
    return SCANNED_BLOCKS[0] in params


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack_blocks(params: dict, num_encoder_blocks: int, *, stack=_stack) -> dict:
    """Unrolled -> scanned layout of a pure-dict param tree (numpy, jax or traced arrays).

    Args:
      params: a model's params with `blocks` = {0: ..., 1: ..., ...}.
      num_encoder_blocks: blocks [0, n) go to `encoder_blocks`, the rest to `decoder_blocks`
        (DiT: n = num_blocks, no decoder stack).
      stack: [the leaf of each block] -> the stacked leaf (e.g. for ShapeDtypeStructs).

    Returns:
      The same tree with `blocks` replaced by the stacks (each leaf gains a leading layer axis).
    """
    if is_scanned(params):
        return params
    blocks = params[UNROLLED_BLOCKS]
    order = sorted(blocks, key=int)
    if [int(i) for i in order] != list(range(len(order))):
        raise ValueError(f"params['blocks'] must hold blocks 0..{len(order) - 1}, got {order}")
    if not 0 < num_encoder_blocks <= len(order):
        raise ValueError(f"num_encoder_blocks={num_encoder_blocks} must be in [1, {len(order)}]")
    out = {k: v for k, v in params.items() if k != UNROLLED_BLOCKS}
    groups = (order[:num_encoder_blocks], order[num_encoder_blocks:])
    for name, keys in zip(SCANNED_BLOCKS, groups):
        if keys:
            out[name] = {"layers": jax.tree.map(lambda *xs: stack(xs),
                                                *[blocks[k] for k in keys])}
    return out


def unstack_blocks(params: dict, *, index=lambda a, i: a[i]) -> dict:
    """Scanned -> unrolled layout of a pure-dict param tree: the inverse of `stack_blocks`.

    `index(leaf, i)` takes layer i of a stacked leaf (e.g. for ShapeDtypeStructs).
    """
    if not is_scanned(params):
        return params
    out = {k: v for k, v in params.items() if k not in SCANNED_BLOCKS}
    blocks, count = {}, 0
    for name in SCANNED_BLOCKS:
        if name not in params:
            continue
        stacked = params[name]["layers"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(depth):
            blocks[count] = jax.tree.map(lambda a, i=i: index(a, i), stacked)
            count += 1
    out[UNROLLED_BLOCKS] = blocks
    return out


def encoder_depth_of(params) -> int:
    """The number of blocks in `encoder_blocks` of a scanned tree (DiT: all of them)."""
    return int(jax.tree.leaves(params[SCANNED_BLOCKS[0]])[0].shape[0])
