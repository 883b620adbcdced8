"""Speed-up from reusing DDT's encoder state: images/s at state_refresh_rate K vs K = 1, next to
the FLOP model's prediction.

All K are timed in the same process on the same random model, round-robin (warm-up calls
excluded, median of --repeats calls per K). On a shared machine the ratios move by tens of percent
from run to run: raise --repeats or use a quiet machine. The prediction counts matmul FLOPs per
image from the block and token counts:

    encoder block   6Nh^2 (qkv) + 2Nh^2 (proj) + 6Nhm (SwiGLU) + 4N^2h (attention)
                    + 12h^2 (adaLN on c)
    decoder block   the same, but adaLN reads the per-token state s: 12Nh^2 instead of 12h^2
    embedders       2NPh each (s_embedder only when the encoder runs), final layer 4Nh^2 + 2NPh,
                    timestep MLP 2*256h + 2h^2 (also on decoder-only steps)

(N tokens, h width, m = SwiGLU hidden, P = C*p*p), summed over the steps of the sampler's own plan
(encoder on recompute steps only; 2x batch where CFG is applied, 1x where the sampler skips the
unconditional half). The ratio is cost(K = 1) / cost(K); it ignores elementwise work (norms,
RoPE, softmax) and the per-step overheads that matter at small widths.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ddt_jax import sampler as sampler_lib
from ddt_jax.models import ddt


def step_flops(model, mlp_ratio: float, height: int, width: int) -> tuple[float, float]:
    """(encoder FLOPs, decoder-only FLOPs) of one forward for one image."""
    h, p = model.hidden_size, model.patch_size
    n = model.num_tokens(height, width)
    m = int(2 * int(h * mlp_ratio) / 3)
    patch = model.in_channels * p * p
    core = 6 * n * h * h + 2 * n * h * h + 6 * n * h * m + 4 * n * n * h
    encoder_blocks = model.num_encoder_blocks
    decoder_blocks = model.num_blocks - encoder_blocks
    encoder = 2 * n * patch * h + encoder_blocks * (core + 12 * h * h)
    decoder = (2 * n * patch * h + decoder_blocks * (core + 12 * n * h * h) + 4 * n * h * h
               + 2 * n * h * patch + 2 * 256 * h + 2 * h * h)
    return float(encoder), float(decoder)


def predicted_cost(model, config, encoder: float, decoder: float) -> float:
    """FLOPs of one sampling run per image, from the sampler's per-step plan."""
    program, tables = sampler_lib._make_plan(model, sampler_lib.read_config(config),
                                             skip_unused=True)
    total = 0.0
    for branch in tables["branch"]:
        mode = program.modes[branch]
        batch = 2 if mode in (sampler_lib.FULL_CFG, sampler_lib.DEC_CFG) else 1
        encoder_runs = mode in (sampler_lib.FULL_CFG, sampler_lib.FULL_COND)
        total += batch * (decoder + (encoder if encoder_runs else 0.0))
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="S/2")
    parser.add_argument("--num_encoder_blocks", type=int, default=None,
                        help="unset: the paper's split for the size")
    parser.add_argument("--image_size", type=int, default=16, help="latent side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num_steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--rates", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model_config = ddt.default_model_config()
    model_config.update(variant=args.variant, num_encoder_blocks=args.num_encoder_blocks,
                        image_size=args.image_size)
    model = ddt.build_model(model_config, rngs=nnx.Rngs(0))
    noise = jax.random.normal(jax.random.key(0),
                              (args.batch, args.image_size, args.image_size, model.in_channels))
    labels = jnp.arange(args.batch, dtype=jnp.int32) % model.num_classes
    encoder, decoder = step_flops(model, model_config.mlp_ratio, args.image_size, args.image_size)
    print(f"{args.variant} ({model.num_encoder_blocks} encoder + "
          f"{model.num_blocks - model.num_encoder_blocks} decoder blocks), "
          f"{model.num_tokens(args.image_size, args.image_size)} tokens, batch {args.batch}, "
          f"{args.num_steps} steps, CFG {args.guidance} in (0.3, 1), {jax.devices()[0].platform}")
    print(f"per image and forward: encoder {encoder / 1e9:.3f} GFLOP, "
          f"decoder {decoder / 1e9:.3f} GFLOP")

    rates = [int(r) for r in args.rates.split(",")]
    configs = {}
    for rate in rates:
        config = sampler_lib.default_sampler_config()
        config.update(num_steps=args.num_steps, guidance=args.guidance, last_step=None,
                      state_refresh_rate=rate)
        sampler_lib.sample(model, noise, labels, config).block_until_ready()  # compile + warm-up
        configs[rate] = config
    # Round-robin over K, so a change in machine load hits every K alike.
    times = {rate: [] for rate in rates}
    for _ in range(args.repeats):
        for rate in rates:
            start = time.perf_counter()
            sampler_lib.sample(model, noise, labels, configs[rate]).block_until_ready()
            times[rate].append(time.perf_counter() - start)
    rows = [(rate, args.batch / statistics.median(times[rate]),
             predicted_cost(model, configs[rate], encoder, decoder))
            for rate in rates]

    base_speed, base_cost = rows[0][1], rows[0][2]
    print(f"{'K':>3} {'images/s':>10} {'measured':>9} {'predicted':>10}")
    for rate, speed, cost in rows:
        print(f"{rate:>3} {speed:>10.3f} {speed / base_speed:>8.2f}x {base_cost / cost:>9.2f}x")


if __name__ == "__main__":
    main()
