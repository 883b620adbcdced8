"""The Stable Diffusion VAE (`stabilityai/sd-vae-ft-ema`) in Flax NNX, NHWC.

THE SCALING FACTOR (0.18215 for the SD-VAE) IS APPLIED ONLY IN THIS MODULE: `sample_latents`
multiplies by it and `decode` divides by it. Everything else (the latent cache on disk, the data
pipeline, the diffusion model, the sampler) sees either raw moments (`encode`, unscaled, what the
cache stores) or model-space latents (scaled, what the diffusion model trains on and generates).
Nobody else multiplies or divides, so the factor can never be applied twice or forgotten.

Structure and parameter names follow diffusers' `AutoencoderKL`, so `convert.load_vae` maps
`encoder.down_blocks.0.resnets.1.conv1.weight` to `encoder/down_blocks/0/resnets/1/conv1/kernel`
with only these renames: `weight` -> `kernel` (convs, linears) or `scale` (norms),
`downsamplers.0.conv` -> `downsample`, `upsamplers.0.conv` -> `upsample`, `to_out.0` -> `to_out`.

Precision: float32 params. With `dtype=jnp.bfloat16` convs and attention matmuls run in bf16 while
GroupNorm statistics and the attention softmax stay in float32; `encode`/`decode` return float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

SD_VAE_SCALING_FACTOR = 0.18215

# diffusers clamps the log-variance to this range before use (DiagonalGaussianDistribution).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# The published SD-VAE (sd-vae-ft-ema / -mse and the original kl-f8): 83.7M params, 8x downsampling.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": SD_VAE_SCALING_FACTOR,
}

# Keys of a diffusers config.json that do not change the network we build.
_IGNORED_CONFIG_KEYS = {"sample_size", "force_upcast"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture; defaults are diffusers' `AutoencoderKL` defaults (as for a config.json)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = SD_VAE_SCALING_FACTOR
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Reads and validates a diffusers `AutoencoderKL` config dict (a parsed config.json)."""
        config = {k: v for k, v in config.items()
                  if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS}
        block_out_channels = tuple(int(c) for c in config.get("block_out_channels",
                                                               cls.block_out_channels))
        n = len(block_out_channels)
        # Only the plain SD-VAE block types exist here; diffusers' own default is one block.
        for name, kind in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.pop(name, (kind,) * n))
            if types != (kind,) * n:
                raise ValueError(f"VAE config: {name}={list(types)} is not supported; expected "
                                 f"{n} x {kind!r} (one per entry of block_out_channels)")
        act_fn = config.pop("act_fn", "silu")
        if act_fn != "silu":
            raise ValueError(f"VAE config: act_fn={act_fn!r} is not supported; only 'silu'")
        for name in ("shift_factor", "latents_mean", "latents_std"):
            if config.pop(name, None) is not None:
                raise ValueError(f"VAE config: {name} is set, but this port implements only the "
                                 "SD-VAE's single scaling_factor; remove it or set it to null")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"VAE config: unknown keys {unknown}; known keys are {sorted(fields)}")
        config["block_out_channels"] = block_out_channels
        out = cls(**config)
        out.validate()
        return out

    def validate(self) -> None:
        if not self.block_out_channels:
            raise ValueError("VAE config: block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE config: channels {bad} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}; pick a group count that divides every entry "
                             "of block_out_channels")
        if self.layers_per_block < 1:
            raise ValueError(f"VAE config: layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _conv(cin: int, cout: int, kernel: int, *, dtype, rngs: nnx.Rngs, strides: int = 1,
          padding=None) -> nnx.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2   # torch's symmetric `padding=k//2`
    return nnx.Conv(cin, cout, (kernel, kernel), strides=strides, padding=padding, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over NHWC with float32 statistics; returns the compute dtype."""

    def __init__(self, num_channels: int, num_groups: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        # Groups are contiguous channel ranges, as in torch (channel c is in group c // (C/G)).
        g = x.astype(jnp.float32).reshape(*shape[:-1], self.num_groups, -1)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = g.mean(axis=axes, keepdims=True)
        # Two-pass variance: E[x^2]-E[x]^2 loses digits on the large activations in the decoder.
        var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        y = g.reshape(shape) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice plus a skip (1x1-projected when widths differ).

    No time embedding.
    """

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, dtype=dtype)
        self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, groups, dtype=dtype)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))   # dropout is 0 in the SD-VAE and we never train it
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x.astype(h.dtype) + h


class Attention(nnx.Module):
    """Single-head self-attention over all H*W positions, GroupNorm in front, residual around."""

    def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.group_norm = GroupNorm(channels, groups, dtype=dtype)
        linear = lambda: nnx.Linear(channels, channels, dtype=dtype, param_dtype=jnp.float32,
                                    rngs=rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        # The full (HW x HW) matrix: 1024^2 per image at 256px, 4096^2 (64 MB f32) at 512px.
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits / math.sqrt(c), axis=-1)
        y = jnp.einsum("bqk,bkc->bqc", probs.astype(v.dtype), v)
        y = self.to_out(y).reshape(b, h, w, c)
        return x.astype(y.dtype) + y


class MidBlock(nnx.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = nnx.List(
            [Attention(channels, groups, dtype=dtype, rngs=rngs)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, *,
                 dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype,
                                             rngs=rngs) for i in range(num_layers)])
        # Asymmetric padding (0 before, 1 after) then a stride-2 3x3 conv, as in the LDM/diffusers
        # `Downsample2D(padding=0)`; symmetric 'SAME' padding would shift the sampling grid.
        self.downsample = (_conv(cout, cout, 3, strides=2, padding=((0, 1), (0, 1)), dtype=dtype,
                                 rngs=rngs) if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, *,
                 dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype,
                                             rngs=rngs) for i in range(num_layers)])
        self.upsample = _conv(cout, cout, 3, dtype=dtype, rngs=rngs) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)   # nearest-neighbour 2x
            x = self.upsample(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1,
                      dtype=dtype, rngs=rngs) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(ch[-1], g, dtype=dtype)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        # One resnet more per level than the encoder (diffusers' `layers_per_block + 1`).
        self.up_blocks = nnx.List([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1,
                    dtype=dtype, rngs=rngs) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(ch[-1], g, dtype=dtype)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder. Build the real one with `convert.load_vae`; random init is for tests."""

    def __init__(self, config: Mapping[str, Any] | VAEConfig | None = None, *,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if config is None:
            config = SD_VAE_CONFIG
        self.config = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        self.config.validate()
        self.dtype = dtype
        rngs = nnx.Rngs(0) if rngs is None else rngs
        cfg, latent = self.config, self.config.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = (_conv(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (_conv(latent, latent, 1, dtype=dtype, rngs=rngs)
                                if cfg.use_post_quant_conv else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, in_channels) in [-1, 1] -> raw (unscaled) float32 `mean, logvar`, each
        (B, H/f, W/f, latent_channels) with f = 8 for the SD-VAE; logvar clamped to [-30, 20]."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"VAE.encode: expected NHWC images (B, H, W, {cfg.in_channels}), got "
                             f"shape {images.shape}; transpose NCHW input with "
                             "x.transpose(0, 2, 3, 1)")
        f = cfg.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"VAE.encode: image size {images.shape[1:3]} is not divisible by the "
                             f"downsampling factor {f}; crop or pad the images first")
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Model-space latents (B, h, w, latent_channels), i.e. already times `scaling_factor`
        (what the diffusion model generates) -> float32 images (B, h*f, w*f, out_channels)."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"VAE.decode: expected NHWC latents (B, h, w, {cfg.latent_channels}), "
                             f"got shape {latents.shape}")
        z = latents.astype(jnp.float32) / cfg.scaling_factor
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)


def sample_latents(moments: jax.Array, key: jax.Array,
                   scaling_factor: float = SD_VAE_SCALING_FACTOR) -> jax.Array:
    """One posterior sample in model space: `scaling_factor * (mean + exp(logvar / 2) * eps)`.

    `moments` is `concat([mean, logvar], -1)` as `encode` returns it and the latent cache stores it,
    shape (..., 2C), any float dtype; the result is float32 (..., C). logvar is clamped to
    [-30, 20] again so that moments cached by other tools behave like diffusers'.
    """
    if moments.shape[-1] % 2:
        raise ValueError("sample_latents: the last axis of moments must be mean||logvar (even), "
                         f"got shape {moments.shape}")
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return scaling_factor * (mean + jnp.exp(0.5 * logvar) * eps)
