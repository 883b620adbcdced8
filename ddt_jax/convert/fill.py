"""The one torch -> NNX parameter filler that every converter (DDT, DINOv2, SD-VAE) uses.

Each nnx.Param of the target model takes exactly one torch tensor, converted to our layout; any
missing, unexpected or mis-shaped tensor is collected and all of them are reported together in one
ValueError, so a half-loaded model can never run silently wrong.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flax import nnx

# How many keys of one kind a report spells out before it only counts the rest.
REPORT_HEAD = 12

TorchKeyFn = Callable[[tuple], str]
ToOursFn = Callable[[tuple, np.ndarray, tuple], "np.ndarray | None"]


def torch_to_ours(path: tuple, value: np.ndarray, shape: tuple) -> np.ndarray | None:
    """A torch tensor in our layout: `kernel` leaves are transposed (Linear (out, in) -> (in, out),
    conv OIHW -> HWIO), other leaves are kept. None when the result does not have `shape`."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
    return value if tuple(value.shape) == tuple(shape) else None


def ours_to_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    """The inverse of `torch_to_ours`: one of our params in torch layout."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if value.ndim == 2:
            return value.T
    return value


def torch_shape(path: tuple, shape: tuple) -> tuple:
    """The torch shape of the tensor behind our param at `path` with `shape`."""
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _head(items: list[str], n: int = REPORT_HEAD) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def mismatch_report(what: str, missing: list[str], unexpected: list[str], misshaped: list[str],
                    hint: str = "") -> str:
    """One message for all problems: counts, then each kind's keys (truncated), then the fix."""
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    counts = ", ".join(f"{len(keys)} {name}" for name, keys in kinds if keys)
    lines = [f"{what} do not match the model ({counts}):"]
    lines += [f"  {name} keys ({len(keys)}): {_head(keys)}" for name, keys in kinds if keys]
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def fill_params(target: nnx.Module | nnx.State, state_dict: Mapping[str, np.ndarray], *,
                torch_key: TorchKeyFn, to_ours: ToOursFn = torch_to_ours, what: str,
                hint: str = "") -> nnx.State:
    """The Params of `target` filled from a torch state dict, or one ValueError for every problem.

    Args:
      target: a module (concrete or from `nnx.eval_shape`) or its nnx.State of Params; only the
        shapes and dtypes of its Params are used.
      state_dict: {torch key: numpy array}, already stripped of prefixes and renamed to the
        layout `torch_key` speaks.
      torch_key: our param path -> the one torch key that fills it.
      to_ours: (path, torch value, our shape) -> the value in our layout, or None when it cannot
        have that shape (reported as mis-shaped).
      what: the weights being loaded, for the message (e.g. "DDT XL/2 weights").
      hint: the fix, appended to the message.

    Returns:
      An nnx.State of the Params with host (numpy) values in the Params' dtypes; `nnx.merge` or
      `nnx.update` it (after `jax.tree.map(jnp.asarray, ...)` for device arrays).
    """
    state = nnx.state(target, nnx.Param) if isinstance(target, nnx.Module) else target
    flat = nnx.to_flat_state(state)
    owners: dict[str, tuple] = {}
    missing, misshaped, filled = [], [], []
    for path, variable in flat:
        key = torch_key(path)
        if key in owners:
            raise ValueError(f"{what}: params {owners[key]} and {path} both map to the torch key "
                             f"{key!r}; the key mapping is wrong")
        owners[key] = path
        if key not in state_dict:
            missing.append(key)
            continue
        ref = variable.get_value()
        value = np.asarray(state_dict[key])
        converted = to_ours(path, value, tuple(ref.shape))
        if converted is None:
            misshaped.append(f"{key}: got {tuple(value.shape)}, expected "
                             f"{torch_shape(path, tuple(ref.shape))}")
            continue
        filled.append((path, variable.replace(np.asarray(converted, dtype=ref.dtype))))
    missing, misshaped = sorted(missing), sorted(misshaped)
    unexpected = sorted(set(state_dict) - set(owners))
    if missing or unexpected or misshaped:
        raise ValueError(mismatch_report(what, missing, unexpected, misshaped, hint))
    return nnx.from_flat_state(filled)
