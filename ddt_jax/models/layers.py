"""Building blocks shared by DDT and the DiT baseline, in Flax NNX with exact official numerics.

Every parameter carries logical axis names (see `sharding.py` for the rules that map them to the
`data` / `fsdp` / `tensor` mesh axes):
  embed    the model width (hidden_size)          mlp      SwiGLU hidden, adaLN outputs (6h, 2h)
  qkv      fused q/k/v outputs (3h)               heads    attention features entering `proj`
  patch    C*p*p patch features                   freq     the 256 sinusoid timestep channels
  classes  label-table rows                       norm     norm scales (always replicated)
  feature  REPA target width (768 for DINOv2-B)    batch    the batch dim of activations and inputs

Variables are created without eager sharding: shardings are applied by the caller from the logical
names (jit out_shardings / device_put), so a model can also be built with no mesh at all.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The timestep sinusoid uses max_period 10 (not DiT's 10000) because t lives in [0, 1].
TIMESTEP_FREQ_CHANNELS = 256
TIMESTEP_MAX_PERIOD = 10.0
NORM_EPS = 1e-6
ROPE_THETA = 10000.0
ROPE_SCALE = 16.0  # positions span linspace(0, 16, side): resolution-normalised, not integer


def partitioned(init, axes: Sequence[str | None]):
    """An initializer that records logical axis names without sharding eagerly."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def torch_linear_kernel_init():
    """torch.nn.Linear's default weight init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           use_bias: bool = True, kernel_init=None, bias_init=None, dtype=jnp.float32,
           param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear with torch-default init unless told otherwise, and logical axes on its params.

    The kernel is (in, out): the transpose of torch's (out, in) weight.
    """
    kernel_init = kernel_init or torch_linear_kernel_init()
    bias_init = bias_init or torch_linear_bias_init(in_features)
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, axes), bias_init=partitioned(bias_init, (axes[1],)),
        rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm with a learnable scale; statistics in float32, scale applied after the cast back."""

    def __init__(self, dim: int, *, eps: float = NORM_EPS, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(
            partitioned(nnx.initializers.ones, ("norm",))(None, (dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # Cast back first, then scale (as the official RMSNorm); keep the input dtype in bf16 mode.
        return (self.weight[...] * x32.astype(x.dtype)).astype(x.dtype)


def layer_norm_no_affine(x, eps: float = NORM_EPS):
    """LayerNorm without scale/bias (the final layer's), statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_frequencies(t, dim: int = TIMESTEP_FREQ_CHANNELS,
                         max_period: float = TIMESTEP_MAX_PERIOD):
    """Sinusoidal features of t in [cos, sin] order, float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    """t -> 256 sinusoid channels -> Linear -> SiLU -> Linear.

    Kept in float32: it conditions every block.
    """

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.02)
        self.mlp_in = linear(TIMESTEP_FREQ_CHANNELS, hidden_size, ("freq", "embed"),
                             kernel_init=normal, param_dtype=param_dtype, rngs=rngs)
        self.mlp_out = linear(hidden_size, hidden_size, ("mlp", "embed"), kernel_init=normal,
                              param_dtype=param_dtype, rngs=rngs)

    def __call__(self, t):
        return self.mlp_out(jax.nn.silu(self.mlp_in(timestep_frequencies(t))))


class LabelEmbedder(nnx.Module):
    """Label table with num_classes + 1 rows; the last row is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.embedding_table = nnx.Embed(
            num_classes + 1, hidden_size, param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("classes", "embed")),
            rngs=rngs)

    def __call__(self, y):
        return self.embedding_table(y)


class PatchEmbed(nnx.Module):
    """Linear patch embedding over (C, p, p)-ordered patch features (xavier-uniform, zero bias)."""

    def __init__(self, patch_features: int, hidden_size: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = linear(patch_features, hidden_size, ("patch", "embed"),
                           kernel_init=nnx.initializers.xavier_uniform(),
                           bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def patchify(x, p: int):
    """(B, H, W, C) -> (B, H/p * W/p, C*p*p), features in torch `unfold` order (C, p, p)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # B, H/p, W/p, C, p, p
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x, p: int, h: int, w: int, c: int):
    """Inverse of `patchify`: (B, N, C*p*p) -> (B, H, W, C)."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, c, p, p)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # B, H/p, p, W/p, p, C
    return x.reshape(b, h, w, c)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace rounded exactly as torch's CPU kernel does (symmetric from both ends)."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((end - start) / (steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    out = np.where(idx < half, np.float32(start) + step * idx.astype(np.float32),
                   np.float32(end) - step * (steps - idx - 1).astype(np.float32))
    return out.astype(np.float32)


def rope_2d_angles(head_dim: int, height: int, width: int, theta: float = ROPE_THETA,
                   scale: float = ROPE_SCALE) -> np.ndarray:
    """Rotation angles (N, head_dim/2) of the 2-D RoPE, one per adjacent element pair.

    Pair 2m rotates with the x position and pair 2m+1 with the y position, both at frequency
    1/theta^(4m/head_dim); positions are linspace(0, 16, side) so any resolution spans the same
    range.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim} "
                         "(hidden_size / num_heads); pick a width/head count that gives it")
    x_pos = _torch_linspace_f32(0.0, scale, width)
    y_pos = _torch_linspace_f32(0.0, scale, height)
    y_grid, x_grid = np.meshgrid(y_pos, x_pos, indexing="ij")
    exponents = np.arange(0, head_dim, 4)[: head_dim // 4].astype(np.float32) / np.float32(head_dim)
    freqs = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    x_ang = np.outer(x_grid.reshape(-1), freqs).astype(np.float32)
    y_ang = np.outer(y_grid.reshape(-1), freqs).astype(np.float32)
    return np.stack([x_ang, y_ang], axis=-1).reshape(height * width, head_dim // 2)


def apply_rope(x, angles):
    """Rotates adjacent pairs of x (B, N, H, D) by angles (N, D/2) in float32 (complex multiply)."""
    b, n, h, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(b, n, h, d).astype(x.dtype)


class RoPEAttention(nnx.Module):
    """Multi-head self-attention: qkv without bias, per-head q/k RMSNorm, 2-D RoPE.

    The output projection `proj` has a bias.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dtype = dtype
        self.qkv = linear(hidden_size, 3 * hidden_size, ("embed", "qkv"), use_bias=False,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(self.head_dim, param_dtype=param_dtype)
        self.k_norm = RMSNorm(self.head_dim, param_dtype=param_dtype)
        self.proj = linear(hidden_size, hidden_size, ("heads", "embed"), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope_angles):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # B, N, H, D
        q = apply_rope(self.q_norm(q), rope_angles)
        k = apply_rope(self.k_norm(k), rope_angles)
        # jax.nn.dot_product_attention keeps the softmax in float32 and picks a fused kernel
        # (cuDNN flash attention on GPU for bf16) where one exists.
        out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype))
        return self.proj(out.reshape(b, n, c))


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x) without biases.

    Hidden width int(2 * 4h / 3), as in the official FeedForward.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = int(2 * int(hidden_size * mlp_ratio) / 3)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1 = linear(hidden_size, inner, ("embed", "mlp"), **kw)
        self.w3 = linear(hidden_size, inner, ("embed", "mlp"), **kw)
        self.w2 = linear(inner, hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
    """adaLN transformer block: RMSNorm, RoPE attention, SwiGLU, 6-way modulation from `c`.

    `c` is (B, 1, h) for the encoder (silu(t + y)) and per-token (B, N, h) for the decoder (s);
    adaLN is a single Linear: the caller has already applied the SiLU.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(hidden_size, param_dtype=param_dtype)
        self.attn = RoPEAttention(hidden_size, num_heads, **kw)
        self.norm2 = RMSNorm(hidden_size, param_dtype=param_dtype)
        self.mlp = SwiGLU(hidden_size, mlp_ratio, **kw)
        self.adaLN_modulation = linear(hidden_size, 6 * hidden_size, ("embed", "mlp"), **kw)

    def __call__(self, x, c, rope_angles):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.adaLN_modulation(c), 6, axis=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_angles)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nnx.Module):
    """LayerNorm (no affine) + 2-way adaLN + Linear to C*p*p.

    Zero-initialised like the official model.
    """

    def __init__(self, hidden_size: int, patch_features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros
        kw = dict(kernel_init=zeros, bias_init=zeros, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
        self.adaLN_modulation = linear(hidden_size, 2 * hidden_size, ("embed", "mlp"), **kw)
        self.linear = linear(hidden_size, patch_features, ("embed", "patch"), **kw)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
        return self.linear(modulate(layer_norm_no_affine(x), shift, scale))
