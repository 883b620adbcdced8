"""Every random stream of the project, named once: `stream(seed, NAME)` instead of a bare fold_in.

A run's randomness is a tree of `jax.random.fold_in` from `key(seed)`. The numbers below are that
tree's first branches; they are part of every result (changing one changes the samples, the
losses and the checkpoints of a seed), so each is written here and nowhere else.
"""
from __future__ import annotations

import jax

# ---- branches of key(config.seed) in training ----------------------------------------------------
INIT = 0                # parameter initialisation (model and REPA projector)
TRAIN_EXAMPLES = 1      # the per-example keys of every train step: fold_in(step), fold_in(position)
GRID_NOISE = 2          # the starting noise of the EMA sample grids (the same for every grid)
GRID_SAMPLER = 3        # the SDE solvers' step noise of the sample grids
FID_NOISE = 4           # logging.fid_every: the starting noise of batch b: fold_in(b)
FID_LABELS = 5          # ... its labels
FID_SAMPLER = 6         # ... its SDE step noise

# ---- branches of one example's key in a train step (flow.training_inputs) ------------------------
EXAMPLE_LATENT = 0      # the latent drawn from the cached VAE moments
EXAMPLE_T = 1           # its time t
EXAMPLE_NOISE = 2       # its noise eps
EXAMPLE_LABEL = 3       # whether its label is dropped to the null class
EXAMPLE_FLIP = 4        # data.flips: whether it trains on its horizontally flipped crop

# ---- branches of key(--seed) in a sample dump ----------------------------------------------------
# Batch b of a dump starts from fold_in(key(seed), b) for b = 0, 1, 2, ...; these two streams sit
# at the top of the int32 range so that no batch index reaches them.
DUMP_SDE = 2**31 - 1    # per-batch keys of the SDE solvers' step noise: fold_in(batch)
DUMP_CALIBRATE = 2**31 - 2   # the --calibrate batch (noise, then its step noise)


def stream(seed_or_key, name: int) -> jax.Array:
    """The key of stream `name` under `seed_or_key` (an int seed or a key)."""
    key = jax.random.key(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
    return jax.random.fold_in(key, name)
