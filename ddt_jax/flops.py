"""Analytic FLOP count of a DDT train step and peak FLOP/s per device, for the TFLOP/s and MFU logs.

Counts matmul FLOPs (2 per multiply-add), like MaxText and the PaLM MFU definition; norms,
activations and the optimizer update are noise next to them. A train step is

    3 x forward(model + REPA projector)      (backward = 2 x forward)
  + 1 x forward(DINOv2)                      (frozen: no backward)
"""
from __future__ import annotations

TIMESTEP_FREQ_CHANNELS = 256

# Dense bf16 peak TFLOP/s per device (chip for TPUs), from the vendors' spec sheets. Matched as
# substrings of `device.device_kind`, first match wins (so the more specific names come first).
PEAK_TFLOPS = (
    ("TPU v6 lite", 918.0),   # v6e (Trillium)
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),   # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),          # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
)


def block_flops(tokens: int, hidden: int, mlp_hidden: int, cond_tokens: int) -> float:
    """One transformer block on one example: attention, SwiGLU and the adaLN on `cond_tokens`."""
    n, h = tokens, hidden
    attention = 2 * n * h * 3 * h + 2 * 2 * n * n * h + 2 * n * h * h   # qkv, QK^T and AV, proj
    swiglu = 2 * n * 3 * h * mlp_hidden                               # w1, w3, w2
    adaln = 2 * cond_tokens * h * 6 * h
    return attention + swiglu + adaln


def model_forward_flops(*, tokens: int, hidden_size: int, num_blocks: int, patch_features: int,
                        mlp_ratio: float = 4.0, num_encoder_blocks: int | None = None) -> float:
    """Forward FLOPs of DDT (num_encoder_blocks set) or the DiT baseline (None) on one example.

    DDT encoder blocks are conditioned on one vector per example, decoder blocks and the final layer
    on the per-token state s; DiT conditions everything on one vector.
    """
    n, h = tokens, hidden_size
    mlp = int(2 * mlp_ratio * h / 3)
    decoupled = num_encoder_blocks is not None
    flops = 2 * (TIMESTEP_FREQ_CHANNELS * h + h * h)                   # timestep MLP
    flops += 2 * n * patch_features * h * (2 if decoupled else 1)      # x (and s) embedders
    if decoupled:
        flops += num_encoder_blocks * block_flops(n, h, mlp, 1)
        flops += (num_blocks - num_encoder_blocks) * block_flops(n, h, mlp, n)
        final_cond = n
    else:
        flops += num_blocks * block_flops(n, h, mlp, 1)
        final_cond = 1
    flops += 2 * final_cond * h * 2 * h + 2 * n * h * patch_features   # final adaLN and linear
    return float(flops)


def projector_flops(tokens: int, hidden_size: int, projector_dim: int, feature_dim: int) -> float:
    return float(2 * tokens * (hidden_size * projector_dim + projector_dim * projector_dim
                               + projector_dim * feature_dim))


def dinov2_flops(*, image_height: int, image_width: int, embed_dim: int, depth: int,
                 patch_size: int = 14, mlp_ratio: float = 4.0, extra_tokens: int = 1) -> float:
    """DINOv2 forward on one image resized to 224/256 of its size (the REPA input)."""
    h, w = int(224 * image_height / 256) // patch_size, int(224 * image_width / 256) // patch_size
    n, d = h * w + extra_tokens, embed_dim
    per_block = (2 * n * 3 * d * d + 2 * 2 * n * n * d + 2 * n * d * d
                 + 2 * n * 2 * d * int(mlp_ratio * d))
    return float(2 * h * w * 3 * patch_size * patch_size * d + depth * per_block)


def train_step_flops(*, batch: int, model_forward: float, projector_forward: float = 0.0,
                     dinov2_forward: float = 0.0) -> float:
    """Global FLOPs of one train step (all devices together)."""
    return float(batch * (3 * (model_forward + projector_forward) + dinov2_forward))


def peak_flops_per_device(device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of `device` (override first), or None when the kind is not in the table."""
    if override_tflops is not None and override_tflops > 0:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None
