"""The DDT training method: rectified-flow interpolant, t sampling, per-example inputs, the loss.

Convention (the official `LinearScheduler`): t = 0 is noise, t = 1 is data.

    x_t = t * x + (1 - t) * eps          # interpolant
    v   = x - eps                        # velocity target, d x_t / d t
    loss = mean((v_pred - v)^2) + repa_weight * mean(1 - cos(proj(h_k), dino(image)))

As the official trainer (`stateful_flow_matching/training_repa.py`): t = sigmoid(N(0, 1)) per
example ("lognorm_t"), labels dropped to the null class with probability 0.1, the squared error
averaged over every element and the cosine loss over every token. `training_loss` is the whole
objective of one batch; the trainer only differentiates it and applies the optimizer and the EMA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddt_jax import rng
from ddt_jax.models import vae as vae_lib

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
    """Replaces each label by `null_class` with probability `drop_prob` (for classifier-free
    guidance)."""
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


# ---------------------------------------------------------------------------------------------
# One train step's inputs and loss. Each example draws from its own key, a function of (seed,
# step, the example's position in the global batch): the loss does not depend on the mesh or on
# the number of processes, and no two devices draw the same noise.

def example_keys(seed: int, step, positions) -> jax.Array:
    """One key per example from (seed, step, position in the global batch).

    Args:
      seed: the run seed (`config.seed`).
      step: the optimizer step (an int32 scalar, traced in the train step).
      positions: (B,) int32 positions of the batch's examples in the run's data order.

    Returns:
      (B,) PRNG keys.
    """
    base = jax.random.fold_in(rng.stream(seed, rng.TRAIN_EXAMPLES), step)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(positions)


def choose_flips(batch, keys):
    """data.flips: each example trains on its crop or on its horizontal mirror, by its own key.

    A dataset cached with `prepare_imagenet --flips` holds the VAE moments of both crops
    ("moments", "moments_flip"): the VAE is not flip-equivariant, so the mirrored latent must be
    encoded, not mirrored. Each example picks one with probability 1/2 from its key (stream
    EXAMPLE_FLIP), and its REPA image is mirrored to match. A batch without "moments_flip" is
    returned unchanged.

    Args:
      batch: {"moments" (B, h, w, 2C), "moments_flip" (B, h, w, 2C), ["image" (B, H, W, 3)], ...}.
      keys: (B,) keys from `example_keys`.

    Returns:
      The batch with "moments" (and "image") replaced by the chosen crop and no "moments_flip".
    """
    if "moments_flip" not in batch:
        return batch
    batch = dict(batch)
    flipped = batch.pop("moments_flip")
    flip = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, rng.EXAMPLE_FLIP)))(keys)
    batch["moments"] = jnp.where(flip[:, None, None, None], flipped, batch["moments"])
    if "image" in batch:
        batch["image"] = jnp.where(flip[:, None, None, None], batch["image"][:, :, ::-1],
                                   batch["image"])
    return batch


def training_inputs(batch, keys, config):
    """(x, t, noise, labels) of one batch: latents sampled from the cached moments (or the
    pixels), logit-normal t, Gaussian noise and dropped labels, each example from its own key.

    Args:
      batch: {"moments" (B, H, W, 2C) or "pixels" (B, H, W, C), "label" (B,), ...}.
      keys: (B,) keys from `example_keys`.
      config: the run config (reads flow.*, vae.scaling_factor, model.num_classes).

    Returns:
      x (B, H, W, C) float32, t (B,) float32, noise like x, labels (B,) int32.
    """
    def branch(name):
        return jax.vmap(lambda k: jax.random.fold_in(k, name))(keys)

    k_latent, k_t, k_noise, k_label = (branch(name) for name in (
        rng.EXAMPLE_LATENT, rng.EXAMPLE_T, rng.EXAMPLE_NOISE, rng.EXAMPLE_LABEL))
    if "moments" in batch:
        x = jax.vmap(lambda m, k: vae_lib.sample_latents(m, k, config.vae.scaling_factor))(
            batch["moments"], k_latent)
    else:
        x = batch["pixels"].astype(jnp.float32)
    t = jax.vmap(lambda k: sample_t(k, (), config.flow.t_sampler, mean=config.flow.t_mean,
                                    std=config.flow.t_std))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(k_noise)
    labels = jax.vmap(lambda k, y: drop_labels(k, y, config.flow.label_drop_prob,
                                               config.model.num_classes))(k_label, batch["label"])
    return x, t, noise, labels


def training_loss(model: nnx.Module, projector: nnx.Module | None, dino: nnx.Module | None,
                  batch, keys, config):
    """The DDT objective of one batch: flow matching + repa.weight * REPA.

    Args:
      model: the DDT / DiT being trained.
      projector: the REPA projector, or None to train without REPA (then `dino` is unused).
      dino: the frozen DINOv2 that embeds batch["image"] (no gradient flows into it).
      batch: as for `training_inputs`, with "image" (B, H, W, 3) uint8 when REPA is on, and
        "moments_flip" when data.flips is on (`choose_flips`).
      keys: (B,) keys from `example_keys`.
      config: the run config (flow.*, repa.*, vae.scaling_factor, model.num_classes).

    Returns:
      (loss, {"fm_loss", "repa_loss"}), float32 scalars.
    """
    batch = choose_flips(batch, keys)
    x, t, noise, labels = training_inputs(batch, keys, config)
    x_t = interpolate(x, noise, t)
    if projector is not None:
        v_pred, _, hidden = model(x_t, t, labels, feature_layer=config.repa.align_layer)
        target = dino(batch["image"])
        repa = repa_loss(projector(hidden), target, height=x.shape[1], width=x.shape[2])
    else:
        v_pred = model(x_t, t, labels)[0]
        repa = jnp.zeros((), jnp.float32)
    fm = flow_matching_loss(v_pred, velocity_target(x, noise))
    return fm + config.repa.weight * repa, {"fm_loss": fm, "repa_loss": repa}
