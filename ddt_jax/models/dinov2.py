"""Frozen DINOv2 ViT-{S,B,L,G}/14 (torch-hub `dinov2_vit*14`) in Flax NNX: the REPA target of DDT.

`dino(images)` is exactly the DDT REPA feature path (`DINOv2.forward` of the official
`training_repa.py`): ImageNet mean/std normalisation; torch bicubic resize (a=-0.75, no antialias)
to (int(224*H/256), int(224*W/256)); the 37x37 position grid resampled to the patch grid with
antialiased bicubic (timm's `resample_abs_pos_embed`); then dinov2's own `interpolate_pos_encoding`
on that grid, and `forward_features(x)["x_norm_patchtokens"]`. 256px images give 16x16 = 256 tokens,
512px images 32x32 = 1024 tokens.

Non-square images: the official path resamples the grid to (h, w) correctly, but dinov2's
`interpolate_pos_encoding` then only skips its own resample when the *image* is square. For a
non-square image it reads the h*w grid as an M x M square (M = sqrt(h*w)) and resizes that to
(h, w) again, which scrambles the positions; when h*w is not a perfect square it fails an assert.
`nonsquare="official"` (the default) reproduces both: the same scrambled positions, and a
ValueError where the official code asserts. `nonsquare="direct"` uses the (h, w) grid as the DDT
code clearly intended. Square images (all DDT configs) are identical under both settings.

Sharding: every param carries logical axis names from the DDT vocabulary (ddt_jax/models/layers.py:
`embed`, `qkv`, `heads`, `mlp`, `norm`), recorded without eager sharding, so the model builds
with no mesh and the trainer places it with the same rules as DDT (or replicates it: ViT-B is
346 MB in float32).

Attention: `attention` picks the kernel as DDT's `model.attention` does ("xla", "cudnn",
"tpu_flash", "auto"; see ddt_jax/models/layers.py `dot_product_attention`). The 1 + h*w tokens
(257 at 256px) are padded to whole 128-token blocks for the TPU kernel.

Precision: params are float32. `dtype=jnp.bfloat16` runs the patch embedding, the linear layers
and attention's matmuls in bfloat16, while LayerNorm statistics, softmax, the residual stream, the
preprocessing and the returned features stay float32.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddt_jax.models import layers

# Sizes of the published torch-hub backbones (all patch 14, 518px -> 37x37 grid, layer scale,
# MLP ratio 4). G is `vit_giant2` with the fused SwiGLU FFN.
DINOV2_VARIANTS = {
    "S": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "B": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "G": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}

# timm's IMAGENET_DEFAULT_MEAN / _STD, which the official REPA code normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LN_EPS = 1e-6  # dinov2 builds every LayerNorm with eps 1e-6 (torch's default is 1e-5).


def repa_input_size(height: int, width: int) -> tuple[int, int]:
    """The size the official REPA code resizes an HxW image to before DINOv2.

    256 -> 224, 512 -> 448.
    """
    return int(224 * height / 256), int(224 * width / 256)


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """dinov2's SwiGLUFFNFused width: 2/3 of the MLP width, rounded up to a multiple of 8.

    4096 for G.
    """
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


# ----------------------------------------------------------------------------- resampling helpers

def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """torch's cubic convolution weights (A = -0.75) for taps at -1, 0, 1, 2 from floor(src).

    Returns (..., 4); the same float32 operations as torch's `get_cubic_upsample_coefficients`.
    """
    a, one = np.float32(-0.75), np.float32(1)

    def near(x):  # |x| <= 1
        return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

    return np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=-1)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int,
                         scale_factor: float | None = None) -> np.ndarray:
    """(out_size, in_size) float32 M with `M @ x` == torch `F.interpolate(x, mode="bicubic")`.

    This is torch's non-antialiased bicubic along one axis: the a=-0.75 cubic kernel,
    align_corners=False, source index `(dst + 0.5) * scale - 0.5` (not clamped at 0 for cubic) and
    out-of-range taps clamped to the border. `scale` is in/out, or 1/scale_factor when the caller
    passed torch a scale factor (as dinov2's `interpolate_pos_encoding` does). jax.image.resize uses
    a=-0.5 and differs from this by up to 0.1 on images, so it cannot stand in for it.

    Everything is computed in float32 as torch does for float32 tensors: 256/224 rounded to float32
    moves the source index by up to 2e-5 (at src ~ 250), which exact arithmetic would turn into
    1e-4 differences on normalised images. Matches torch's weights to ~2 ulp.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    f32 = np.float32
    scale = f32(in_size) / f32(out_size) if scale_factor is None else f32(1.0 / scale_factor)
    src = scale * (np.arange(out_size).astype(f32) + f32(0.5)) - f32(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    weights = _cubic_weights(np.clip(src - base.astype(f32), f32(0), f32(1)))
    taps = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    mat = np.zeros((out_size, in_size), np.float32)
    np.add.at(mat, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return mat


def resize_bicubic_torch(x: jax.Array, size: tuple[int, int],
                         scale_factor: tuple[float, float] | None = None) -> jax.Array:
    """Resizes NHWC `x` to `size` like torch's bicubic `F.interpolate` without antialias.

    See `torch_bicubic_matrix`.
    """
    (h_in, w_in), (h_out, w_out) = x.shape[1:3], size
    sh, sw = (None, None) if scale_factor is None else scale_factor
    mh = jnp.asarray(torch_bicubic_matrix(h_in, h_out, sh))
    mw = jnp.asarray(torch_bicubic_matrix(w_in, w_out, sw))
    hi = jax.lax.Precision.HIGHEST  # the matrices are tiny; keep full float32 accuracy on TPU/GPU
    x = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def resample_abs_pos_embed(pos_embed: jax.Array, new_size: tuple[int, int],
                           num_prefix_tokens: int = 1) -> jax.Array:
    """timm's `resample_abs_pos_embed`: a square (1, prefix + S*S, D) grid -> (1, prefix + h*w, D).

    timm calls torch bicubic with antialias=True, i.e. the a=-0.5 kernel widened when
    downsampling; jax.image.resize's antialiased bicubic is the same filter (equal to ~1e-6).
    Like timm, returns the input unchanged when the grid already has h*w tokens and h == w.
    """
    h, w = new_size
    num_pos = pos_embed.shape[1] - num_prefix_tokens
    if num_pos == h * w and h == w:
        return pos_embed
    side = math.isqrt(num_pos)
    if side * side != num_pos:
        raise ValueError(f"pos_embed has {num_pos} grid tokens, which is not a square grid")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.astype(jnp.float32).reshape(1, side, side, dim)
    grid = jax.image.resize(grid, (1, h, w, dim), method="bicubic", antialias=True)
    return jnp.concatenate([prefix.astype(jnp.float32), grid.reshape(1, h * w, dim)], axis=1)


def interpolate_pos_encoding(pos_embed: jax.Array, h0: int, w0: int,
                             offset: float = 0.1) -> jax.Array:
    """dinov2's `DinoVisionTransformer.interpolate_pos_encoding` for an h0 x w0 patch grid.

    Returns `pos_embed` unchanged when it has h0*w0 grid tokens and the grid is square. Otherwise
    it reads the grid tokens as an M x M square (M = sqrt(N); N not a square -> the official code
    asserts, we raise) and resizes it with torch's non-antialiased bicubic, passing torch the
    scale factors (h0 + 0.1)/M, (w0 + 0.1)/M (the "historical kludge" offset of the hub models),
    which shift the sampling positions slightly compared to a plain resize to (h0, w0).
    """
    num_pos = pos_embed.shape[1] - 1
    if num_pos == h0 * w0 and h0 == w0:
        return pos_embed
    side = math.isqrt(num_pos)
    if side * side != num_pos:
        raise ValueError(
            f"dinov2's interpolate_pos_encoding needs a square position grid, got {num_pos} "
            f"tokens for a {h0}x{w0} patch grid (the official code fails `assert N == M * M` "
            "here). For non-square images use DINOv2(..., nonsquare='direct'), which uses the "
            "resampled grid as is")
    scale = ((h0 + offset) / side, (w0 + offset) / side)
    # torch derives the output size as floor(M * scale_factor) and then asserts it is (h0, w0).
    out = (math.floor(side * scale[0]), math.floor(side * scale[1]))
    if out != (h0, w0):
        raise ValueError(f"position grid resample gives {out}, expected {(h0, w0)}")
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].astype(jnp.float32).reshape(1, side, side, dim)
    grid = resize_bicubic_torch(grid, (h0, w0), scale_factor=scale)
    return jnp.concatenate([pos_embed[:, :1].astype(jnp.float32), grid.reshape(1, h0 * w0, dim)],
                           axis=1)


# ----------------------------------------------------------------------------- layers

def _axes(init, axes: tuple):
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _param(value: jax.Array, axes: tuple) -> nnx.Param:
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


def _linear(din: int, dout: int, axes: tuple[str, str], dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # dinov2 (timm init): trunc-normal(0.02) weights, zero biases. Only matters for random init.
    return nnx.Linear(din, dout, dtype=dtype, rngs=rngs,
                      kernel_init=_axes(nnx.initializers.truncated_normal(0.02), axes),
                      bias_init=_axes(nnx.initializers.zeros, axes[1:]))


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Always float32 with two-pass variance, like torch's LayerNorm; the residual stream is float32.
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=jnp.float32, use_fast_variance=False, rngs=rngs,
                         scale_init=_axes(nnx.initializers.ones, ("norm",)),
                         bias_init=_axes(nnx.initializers.zeros, ("norm",)))


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        self.gamma = _param(jnp.full((dim,), init_values, jnp.float32), ("norm",))

    def __call__(self, x):
        return x * self.gamma[...]


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, attention: str = "xla", dtype,
                 rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention = layers.check_attention(attention)
        self.qkv = _linear(dim, 3 * dim, ("embed", "qkv"), dtype, rngs)
        self.proj = _linear(dim, dim, ("heads", "embed"), dtype, rngs)

    def __call__(self, x):
        b, n, d = x.shape
        # torch's qkv layout: the 3*D outputs are (3, heads, head_dim).
        q, k, v = jnp.unstack(
            self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads), axis=2)
        # scale 1/sqrt(head_dim); logits and softmax are computed in float32 whatever q/k's dtype.
        out = layers.dot_product_attention(q, k, v, self.attention)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, ("embed", "mlp"), dtype, rngs)
        self.fc2 = _linear(hidden, dim, ("mlp", "embed"), dtype, rngs)

    def __call__(self, x):
        # torch's nn.GELU is the erf form.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLUFFN(nnx.Module):
    """dinov2's SwiGLUFFNFused: one fused `w12` projection split into (gate, value) halves."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.w12 = _linear(dim, 2 * hidden, ("embed", "mlp"), dtype, rngs)
        self.w3 = _linear(hidden, dim, ("mlp", "embed"), dtype, rngs)

    def __call__(self, x):
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class Block(nnx.Module):
    def __init__(self, dim: int, num_heads: int, ffn_layer: str, ffn_hidden: int, *,
                 attention: str = "xla", dtype, rngs):
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, attention=attention, dtype=dtype, rngs=rngs)
        self.ls1 = LayerScale(dim)
        self.norm2 = _layer_norm(dim, rngs)
        ffn = Mlp if ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(dim, ffn_hidden, dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(dim)

    def __call__(self, x):
        # LayerScale's float32 gamma brings bf16 branch outputs back to the float32 residual stream.
        x = layers.constrain_batch(x)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return layers.constrain_batch(x + self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        # torch Conv2d default init (kaiming-uniform a=sqrt(5)); kernel (p, p, 3, D)
        self.proj = nnx.Conv(
            3, dim, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID",
            dtype=dtype, rngs=rngs,
            kernel_init=_axes(nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                              (None, None, None, "embed")),
            bias_init=_axes(nnx.initializers.zeros, ("embed",)))

    def __call__(self, x):
        b, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {p}; "
                             "with the REPA resize (224/256) use image sides that are multiples "
                             "of 16")
        x = self.proj(x)
        return x.reshape(b, (h // p) * (w // p), x.shape[-1])  # row-major, as torch's flatten(2)


# ----------------------------------------------------------------------------- the model

class DINOv2(nnx.Module):
    """DinoVisionTransformer as the torch hub builds it (init_values 1.0, no block chunks).

    Params mirror the torch keys: `cls_token`, `pos_embed`, `mask_token`, `register_tokens`,
    `patch_embed.proj`, `blocks[i].{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 (or
    mlp.w12/w3), ls2.gamma}`, `norm`; Linear/Conv `kernel` is torch's `weight` transposed.
    """

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, *,
                 patch_size: int = 14, img_size: int = 518, ffn_layer: str = "mlp",
                 mlp_ratio: float = 4.0, ffn_hidden_dim: int | None = None,
                 num_register_tokens: int = 0, interpolate_offset: float = 0.1,
                 nonsquare: Literal["official", "direct"] = "official",
                 attention: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
        if ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' (S/B/L) or 'swiglu' (G), got {ffn_layer!r}")
        if nonsquare not in ("official", "direct"):
            raise ValueError(f"nonsquare must be 'official' or 'direct', got {nonsquare!r}")
        if ffn_hidden_dim is None:
            ffn_hidden_dim = (int(embed_dim * mlp_ratio) if ffn_layer == "mlp"
                              else swiglu_hidden_dim(embed_dim, mlp_ratio))
        self.embed_dim, self.patch_size, self.dtype = embed_dim, patch_size, dtype
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.nonsquare = nonsquare
        grid = img_size // patch_size
        key, tokens = rngs.params, (None, None, "embed")
        self.cls_token = _param(1e-6 * jax.random.normal(key(), (1, 1, embed_dim)), tokens)
        self.pos_embed = _param(
            0.02 * jax.random.truncated_normal(key(), -2.0, 2.0, (1, 1 + grid * grid, embed_dim)),
            tokens)
        # unused here (no masking); kept so every published key has a home
        self.mask_token = _param(jnp.zeros((1, embed_dim)), (None, "embed"))
        if num_register_tokens:
            self.register_tokens = _param(
                1e-6 * jax.random.normal(key(), (1, num_register_tokens, embed_dim)), tokens)
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(embed_dim, num_heads, ffn_layer, ffn_hidden_dim,
                                      attention=attention, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm = _layer_norm(embed_dim, rngs)

    @classmethod
    def from_variant(cls, variant: str, *, rngs: nnx.Rngs, **kwargs) -> "DINOv2":
        """A randomly initialised hub-sized model: variant in DINOV2_VARIANTS ("S", "B", "L", "G").

        `kwargs` override the table or set other options (e.g. `num_register_tokens=4`, `dtype`).
        """
        if variant not in DINOV2_VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {variant!r}; "
                             f"choose one of {sorted(DINOV2_VARIANTS)}")
        return cls(**{**DINOV2_VARIANTS[variant], **kwargs}, rngs=rngs)

    def forward_features(self, x: jax.Array,
                         pos_embed: jax.Array | None = None) -> dict[str, jax.Array]:
        """dinov2's `forward_features` on ImageNet-normalised NHWC float images (no masks).

        `pos_embed` replaces `self.pos_embed` for this call (what the REPA code does by assigning
        `encoder.pos_embed.data`); dinov2's `interpolate_pos_encoding` then runs on it as usual.
        """
        b, h, w, _ = x.shape
        h0, w0 = h // self.patch_size, w // self.patch_size
        tokens = self.patch_embed(x).astype(jnp.float32)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        pos = self.pos_embed[...] if pos_embed is None else pos_embed
        # "direct" skips dinov2's resample when the grid already has h0*w0 tokens; for square grids
        # that resample is a no-op anyway, so the two settings differ only on non-square images.
        if not (self.nonsquare == "direct" and pos.shape[1] == 1 + h0 * w0):
            pos = interpolate_pos_encoding(pos, h0, w0, self.interpolate_offset)
        tokens = tokens + pos
        if self.num_register_tokens:
            regs = jnp.broadcast_to(self.register_tokens[...],
                                    (b, self.num_register_tokens, self.embed_dim))
            tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)
        for block in self.blocks:
            tokens = block(tokens)
        x_norm = self.norm(tokens)
        r = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:1 + r],
                "x_norm_patchtokens": x_norm[:, 1 + r:], "x_prenorm": tokens}

    def __call__(self, images: jax.Array) -> jax.Array:
        """REPA target: (B, H, W, 3) uint8 or float in [0, 1] -> (B, h*w, D) float32 features.

        The patch features are frozen (no gradient flows back).
        """
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("DINOv2 expects NHWC RGB images (B, H, W, 3), got shape "
                             f"{images.shape}; transpose NCHW arrays with x.transpose(0, 2, 3, 1)")
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        elif not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError("DINOv2 expects uint8 images or float images in [0, 1], "
                             f"got {images.dtype}")
        x = images.astype(jnp.float32)
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = resize_bicubic_torch(x, repa_input_size(*x.shape[1:3]))
        h0, w0 = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        pos = resample_abs_pos_embed(self.pos_embed[...], (h0, w0))
        feats = self.forward_features(x, pos_embed=pos)["x_norm_patchtokens"]
        return jax.lax.stop_gradient(feats)
