"""The DDT training objective as pure functions: rectified-flow interpolant, t sampling, losses.

Convention (the official code's `LinearScheduler`): t = 0 is noise, t = 1 is data.

    x_t = t * x + (1 - t) * eps          # interpolant
    v   = x - eps                        # velocity target, d x_t / d t
    loss = mean((v_pred - v)^2) + repa_weight * mean(1 - cos(proj(h_k), dino(image)))

The official trainer (`stateful_flow_matching/training_repa.py`) draws t = sigmoid(N(0, 1)) per
example ("lognorm_t"), drops labels to the null class with probability 0.1 (`BaseTrainer`), averages
the squared error over every element (batch, space and channels) and the cosine loss over every
token. Nothing here knows about the network; the trainer wires it together:

    t = flow.sample_t(key_t, batch, "lognormal")
    x_t, v = flow.interpolate(x, eps, t), flow.velocity_target(x, eps)
    loss = flow.flow_matching_loss(model(x_t, t, y)[0], v)

Tests (torch's cosine similarity and bilinear resize are the references):
    .venv/bin/python -m pytest tests/test_flow.py -q
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

T_SAMPLERS = ("lognormal", "uniform")
# torch.nn.functional.cosine_similarity's default eps: the norm product is clamped to it.
COSINE_EPS = 1e-8


def _expand(t, x):
    """(B,) -> (B, 1, 1, ...) so that t broadcasts over x's non-batch axes."""
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x, noise, t):
    """x_t = t x + (1 - t) eps; t (B,) with 0 = noise and 1 = data."""
    t = _expand(t.astype(x.dtype), x)
    return t * x + (1.0 - t) * noise


def velocity_target(x, noise):
    """v = d x_t / dt = x - eps (the same for every t on the straight path)."""
    return x - noise


def sample_t(key, shape=(), sampler: str = "lognormal", *, mean: float = 0.0, std: float = 1.0):
    """Training times in (0, 1), float32 of `shape` (an int is a batch size).

    "lognormal": sigmoid(N(mean, std^2)), the logit-normal density of SD3 that DDT trains with
    (official `lognorm_t: true`, mean 0, std 1): most samples near t = 0.5. "uniform": U[0, 1).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if sampler == "lognormal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    if sampler == "uniform":
        return jax.random.uniform(key, shape, jnp.float32)
    raise ValueError(f"unknown t sampler {sampler!r}; use one of {T_SAMPLERS}")


def drop_labels(key, labels, drop_prob: float, null_class: int):
    """Replaces each label by `null_class` with probability `drop_prob` (classifier-free guidance)."""
    if drop_prob <= 0.0:
        return labels
    drop = jax.random.uniform(key, labels.shape) < drop_prob
    return jnp.where(drop, jnp.asarray(null_class, labels.dtype), labels)


def flow_matching_loss(v_pred, v_target):
    """Mean squared error over every element, in float32 (official: `((out - v_t)**2).mean()`)."""
    return jnp.mean(jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32)))


def cosine_similarity(a, b, axis: int = -1, eps: float = COSINE_EPS):
    """torch's cosine_similarity: a.b / max(|a| |b|, eps), in float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=axis)
    norms = jnp.sqrt(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis))
    return dot / jnp.maximum(norms, eps)


def resize_target_tokens(target, num_tokens: int, height: int, width: int):
    """Bilinearly resamples (B, M, D) target tokens to `num_tokens` on the model's token grid.

    The official code does this only when DINOv2's token count M differs from the model's N (e.g.
    a patch-1 model, or latents whose side is not 16/32): it views the targets as an
    int(sqrt(M) sqrt(h/w)) x int(sqrt(M) sqrt(w/h)) grid (h, w = the model input's height and width)
    and calls torch `interpolate(scale_factor=sqrt(N/M), mode="bilinear", align_corners=False)`.
    torch maps output pixel i to input coordinate (i + 0.5) / scale - 0.5, clamped to the border and
    without antialiasing; `scale_and_translate` with the same scale and linear kernel computes
    exactly that (out-of-range taps are dropped and the remaining weight renormalised, which equals
    torch's clamp for a two-tap kernel).
    """
    b, m, d = target.shape
    if m == num_tokens:
        return target
    scale = (num_tokens / m) ** 0.5
    gh = int(m ** 0.5 * (height / width) ** 0.5)
    gw = int(m ** 0.5 * (width / height) ** 0.5)
    if gh * gw != m:
        raise ValueError(f"cannot view {m} target tokens as a grid for a {height}x{width} input "
                         f"(got {gh}x{gw})")
    oh, ow = int(gh * scale), int(gw * scale)   # torch: floor(input_size * scale_factor)
    if oh * ow != num_tokens:
        raise ValueError(f"resizing the {gh}x{gw} target grid by {scale:g} gives {oh}x{ow} tokens, "
                         f"but the model has {num_tokens}: the official recipe cannot align them")
    grid = target.astype(jnp.float32).reshape(b, gh, gw, d)
    out = jax.image.scale_and_translate(
        grid, (b, oh, ow, d), spatial_dims=(1, 2), scale=jnp.array([scale, scale], jnp.float32),
        translation=jnp.zeros(2, jnp.float32), method="linear", antialias=False)
    return out.reshape(b, oh * ow, d)


def repa_loss(projected, target, *, height: int, width: int):
    """REPA alignment loss mean(1 - cos) over every token; `target` is resized to match if needed.

    projected: (B, N, D) projector output on the model's hidden state; target: (B, M, D) frozen
    DINOv2 patch features; height/width: the model input's spatial size (the official code's
    `x.shape[-2:]`), used only to lay out the target grid.
    """
    target = resize_target_tokens(jax.lax.stop_gradient(target), projected.shape[1], height, width)
    return jnp.mean(1.0 - cosine_similarity(projected, target))
