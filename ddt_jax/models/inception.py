"""ADM's FID Inception-v3 (the 2015 TF graph, as pytorch-fid ports it) in Flax NNX.

FID / sFID / IS numbers are only comparable with the literature when the features come from the
exact network and preprocessing of ADM's evaluator (guided-diffusion `evaluations/evaluator.py`):
uint8 NHWC images of any size -> float32 [0, 255] -> TF1 *legacy* bilinear resize to 299x299 (no
half-pixel centres: `src = dst * in/out`; `jax.image.resize` and torch `F.interpolate` use half
pixels and move pool_3 by 0.04-0.10) -> `(x - 128) * 0.0078125` (not pytorch-fid's `2x/255 - 1`)
-> the network. Inside it: BatchNorm eps 1e-3; the branch average pools of the A, C and first E
blocks exclude the padding from their counts; the last E block (Mixed_7c) max-pools instead.
Outputs: `pool` = pool_3 (FID), `spatial` = the first 7 channels of `Mixed_6d.branch1x1` (TF's
`mixed_6/conv`, sFID), `softmax` = softmax(pool @ fc.weight.T) *without* the fc bias (IS).

Convs and the fc matmul run at `Precision.HIGHEST`, so TF32/bf16 defaults on GPU/TPU cannot break
float32 parity. The computation is per example, so a batch sharded over devices needs no
communication.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_DIM = 2023  # 17 * 17 * 7
NUM_LOGITS = 1008  # the 2015 graph's 1008 classes (1000 ImageNet + 8 unused)
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- preprocessing

@functools.lru_cache(maxsize=64)
def _legacy_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, lerp) of TF1's ResizeBilinear along one axis, float32 as in TF."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src)
    upper = np.minimum(lower.astype(np.int64) + 1, in_size - 1)
    return lower.astype(np.int64), upper, (src - lower).astype(np.float32)


def legacy_bilinear_resize(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """TF1's `ResizeBilinear(align_corners=False, half_pixel_centers=False)` of NHWC float images.

    Like TF, interpolates along W first (`top = tl + (tr - tl) * x_lerp`, same for the bottom row)
    and then along H (`top + (bottom - top) * y_lerp`), with TF's float32 `in/out` scale and
    source positions and the same roundings: bit-exact with TF on CPU. A 299x299 input comes
    back unchanged.

    Args:
      images: (N, H, W, C) float array.
      size: the output side (square output).

    Returns:
      (N, size, size, C) float32.
    """
    x = jnp.asarray(images, jnp.float32)
    for axis in (2, 1):
        lo, hi, lerp = _legacy_taps(x.shape[axis], size)
        shape = [1] * x.ndim
        shape[axis] = size
        a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
        step = (b - a) * jnp.asarray(lerp).reshape(shape)
        # The select keeps XLA (CPU) from contracting `a + step` into one FMA, which rounds once
        # where TF rounds twice (1.5e-5 off on [0, 255] values); with it the result is TF's to
        # the bit. It only turns an inf step (inf pixels) into nan.
        x = a + jnp.where(jnp.isfinite(step), step, jnp.nan)
    return x


def preprocess(images: jax.Array) -> jax.Array:
    """ADM's network input: uint8 (or float [0, 255]) NHWC of any size -> (N, 299, 299, 3) float32.

    Args:
      images: (N, H, W, 3) uint8, or float with values in [0, 255].

    Returns:
      The legacy-resized images scaled to [-1, 1) by `(x - 128) * 0.0078125`.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = ("; this looks NCHW: transpose it with x.transpose(0, 2, 3, 1)"
                if images.ndim == 4 and images.shape[1] == 3 else "")
        raise ValueError(f"InceptionV3 expects NHWC RGB images (N, H, W, 3), got shape "
                         f"{images.shape}{hint}")
    if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError("InceptionV3 expects uint8 images or float images in [0, 255], "
                         f"got {images.dtype}")
    x = legacy_bilinear_resize(images.astype(jnp.float32), INPUT_SIZE)
    return (x - 128.0) * 0.0078125


# ----------------------------------------------------------------------------- layers

class BatchNorm(nnx.Module):
    """Inference BatchNorm with torch's running statistics.

    `mean` and `var` are Params (not BatchStats) so that the one converter filler fills them: the
    network is frozen and never updates them.
    """

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.var = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x):
        inv = jax.lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...]
        return (x - self.mean[...]) * inv + self.bias[...]


class BasicConv2d(nnx.Module):
    """pytorch-fid's BasicConv2d: conv without bias -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0,
                 rngs: nnx.Rngs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(cin, cout, (kh, kw), strides=stride, padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=_HI, rngs=rngs)
        self.bn = BatchNorm(cout)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x, stride: int, pad: int = 0):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 padding)


def _avg_pool_exclude_pad(x):
    """3x3 / stride 1 / pad 1 average that divides by the in-image count (count_include_pad=False,
    TF's SAME pooling): 6 at the edges, 4 in the corners, 9 inside."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    h, w = x.shape[1:3]
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    counts = np.outer(rows, cols).astype(np.float32)[None, :, :, None]
    return total / counts


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        pool = self.branch_pool(_avg_pool_exclude_pad(x))
        # branch1x1 comes first: channels [:192] of the output are TF's `mixed_N/conv`.
        return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (`pool="avg"`, padding excluded) or FIDInceptionE_2 (`pool="max"`)."""

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' (Mixed_7b) or 'max' (Mixed_7c), got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 1, pad=1)
        return jnp.concatenate(
            [self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
             self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], axis=-1)


# ----------------------------------------------------------------------------- the model

class InceptionV3(nnx.Module):
    """pytorch-fid's `fid_inception_v3()` (torchvision Inception3 with the FID blocks), eval mode.

    Params mirror the torch keys of `pt_inception-2015-12-05-6726825d.pth`: the blocks are
    attributes of the same names (`Conv2d_1a_3x3`, ..., `Mixed_7c.branch_pool`, `fc`), each
    BasicConv2d has `conv.kernel` (torch `conv.weight`, OIHW -> HWIO) and
    `bn.{scale, bias, mean, var}` (torch `bn.{weight, bias, running_mean, running_var}`); `fc` is a
    Linear (kernel = `fc.weight.T`). `fc.bias` is loaded but ADM's softmax does not use it.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, precision=_HI, rngs=rngs)

    def forward(self, x: jax.Array) -> dict[str, jax.Array]:
        """The network on `preprocess`ed (N, 299, 299, 3) inputs; see `__call__` for the outputs."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x, 2)))
        x = _max_pool(x, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d):
            x = block(x)
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # Mixed_6d.branch1x1, (H,W,C)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = jnp.matmul(pool, self.fc.kernel[...], precision=_HI)  # no fc.bias, as ADM
        return {"pool": pool, "spatial": spatial, "softmax": jax.nn.softmax(logits, axis=-1)}

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """ADM's evaluator features of a batch of images.

        Args:
          images: (N, H, W, 3) uint8 (or float in [0, 255]) NHWC images of any size.

        Returns:
          {"pool": (N, 2048) pool_3 (FID), "spatial": (N, 2023) mixed_6/conv[..., :7] flattened
          (sFID), "softmax": (N, 1008) class probabilities without the fc bias (IS)}, float32.
        """
        return self.forward(preprocess(images))
