"""DDT training, read top to bottom: `train_and_evaluate(config, workdir)`, and `compile_only`.

Sections of `train_and_evaluate`: config and resume checks (nothing written before they pass)
-> mesh -> data -> state (model, REPA projector, AdamW, EMA; sharded by logical axes) -> resume
from the newest verified checkpoint / init_from -> config.json -> AOT-compiled train step (memory
logged) -> loop (metrics, sample grids, checkpoints, preemption; the step's state is checked finite
before any save or grid). The method itself (inputs and loss) is `flow.training_loss`; the step
here is grad -> optimizer -> EMA.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import config_schema
from ddt_jax import convert
from ddt_jax import files
from ddt_jax import flops as flops_lib
from ddt_jax import flow
from ddt_jax import rng
from ddt_jax import sharding
from ddt_jax import tpu_topology
from ddt_jax import weights
from ddt_jax.evaluation import fid_monitor
from ddt_jax.evaluation import grids
from ddt_jax.models import ddt
from ddt_jax.models import dinov2 as dinov2_lib
from input_pipeline import pipeline

GIB = 2.0 ** 30


# -------------------------------------------------------------------------------------------------
# Building blocks (module-level so tests can drive them; train_and_evaluate wires them in order).

def make_optimizer(optim_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (torch semantics: decoupled decay, eps outside the sqrt), optional warm-up/clipping."""
    c = optim_config
    if c.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    else:
        schedule = optax.constant_schedule(c.lr)
    tx = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    if c.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
    return tx, schedule


def repa_enabled(config) -> bool:
    return config.repa.weight > 0


def build_modules(config, rngs: nnx.Rngs):
    """(model, REPA projector or None): the trainable modules, unsharded."""
    model = ddt.build_model(config.model, rngs=rngs)
    projector = None
    if repa_enabled(config):
        hidden = model.hidden_size
        dim = config.repa.projector_dim if config.repa.projector_dim is not None else hidden
        projector = ddt.REPAProjector(hidden, dim, config.repa.feature_dim,
                                      dtype=ddt.DTYPES[config.model.dtype], rngs=rngs)
    return model, projector


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """The run's mesh over `devices` (default: all). With mesh.data = mesh.fsdp = -1 (the
    default) fsdp is the largest divisor of the device count that divides every FSDP-sharded
    width of the model, and data the rest (sharding.mesh_shape)."""
    model, projector = nnx.eval_shape(lambda: build_modules(config, nnx.Rngs(0)))
    states = [nnx.state(m, nnx.Param) for m in (model, projector) if m is not None]
    widths = sharding.fsdp_widths(states, config.mesh.rules)
    return sharding.create_mesh(config.mesh, devices, fsdp_widths=widths)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Static facts about the train state: graphdefs, shardings, the abstract (shape-only) state."""
    model_graphdef: Any
    projector_graphdef: Any             # None without REPA
    shardings: weights.TrainState       # of NamedShardings
    abstract: weights.TrainState        # of ShapeDtypeStructs carrying those shardings


def state_layout(config, mesh, tx) -> StateLayout:
    """Shapes and NamedShardings of the whole TrainState, without allocating it."""
    model, projector = nnx.eval_shape(lambda: build_modules(config, nnx.Rngs(0)))
    rules = sharding.rules_dict(config.mesh.rules)
    model_graphdef, model_params = weights.split_params(model)
    params = {weights.MODEL: model_params}
    projector_graphdef = None
    if projector is not None:
        projector_graphdef, params[weights.PROJECTOR] = weights.split_params(projector)
    sharding.check_replication_fallbacks(list(params.values()), mesh, rules)
    param_shardings = {k: sharding.logical_to_named(v, mesh, rules).to_pure_dict()
                       for k, v in params.items()}
    abstract_params = {k: v.to_pure_dict() for k, v in params.items()}
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = weights.TrainState(step=replicated, params=param_shardings,
                                   opt_state=opt_shardings,
                                   ema_params=param_shardings[weights.MODEL])
    abstract = weights.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                                  params=abstract_params, opt_state=abstract_opt,
                                  ema_params=abstract_params[weights.MODEL])
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return StateLayout(model_graphdef=model_graphdef, projector_graphdef=projector_graphdef,
                       shardings=shardings, abstract=abstract)


def init_train_state(config, layout: StateLayout, tx, key) -> weights.TrainState:
    """Random init, computed directly into the sharded layout (no host copy of the full model)."""

    def init(key):
        model, projector = build_modules(config, nnx.Rngs(key))
        params = {weights.MODEL: nnx.state(model, nnx.Param).to_pure_dict()}
        if projector is not None:
            params[weights.PROJECTOR] = nnx.state(projector, nnx.Param).to_pure_dict()
        # EMA starts as a copy of the initial weights (official SimpleEMA copies the denoiser).
        ema = jax.tree.map(jnp.copy, params[weights.MODEL])
        return weights.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params), ema_params=ema)

    return jax.jit(init, out_shardings=layout.shardings)(key)


def example_positions(local_batch_size: int, mesh) -> jax.Array:
    """Each example's index in the run's data order, as a global (B,) int32 array beside the batch.

    The pipeline gives process p the contiguous block [p*b, (p+1)*b) of each global batch
    (pipeline._ProcessBlocks, b = B/P), so row r of process p is example p*b + r whatever P is:
    the per-example keys do not depend on the number of processes either.
    """
    local = (jax.process_index() * local_batch_size
             + np.arange(local_batch_size)).astype(np.int32)
    return sharding.host_to_global({"position": local}, mesh)["position"]


def check_grad_accum(global_batch_size: int, accum_steps: int, data_parallel: int) -> None:
    """Raises ValueError unless every microbatch splits evenly over the data-parallel devices."""
    if global_batch_size % (accum_steps * data_parallel):
        raise ValueError(
            f"optim.grad_accum_steps={accum_steps} microbatches of global_batch_size="
            f"{global_batch_size} do not split over the {data_parallel} data-parallel devices: "
            f"use a batch that is a multiple of {accum_steps * data_parallel}, or another "
            "grad_accum_steps")


def split_microbatches(tree, accum_steps: int, data_parallel: int):
    """(B, ...) leaves -> (accum_steps, B / accum_steps, ...), microbatch m taking rows m*L/n ..
    (m+1)*L/n - 1 of every device's L = B/D rows: each microbatch stays spread over all D devices
    and no row moves between devices (splitting the global batch into contiguous thirds would
    put each microbatch on a third of the devices)."""
    def split(x):
        rows = x.shape[0] // data_parallel
        x = x.reshape((data_parallel, accum_steps, rows // accum_steps) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((accum_steps, x.shape[1] * x.shape[2]) + x.shape[3:])
    return jax.tree.map(split, tree)


def make_loss_fn(config, layout: StateLayout, dinov2_graphdef=None):
    """loss_fn(params, batch, positions, step, dinov2_params) -> (loss, {"fm_loss", "repa_loss"}):
    `flow.training_loss` on the modules merged from the param trees."""

    def loss_fn(params, batch, positions, step, dinov2_params):
        model = nnx.merge(layout.model_graphdef, params[weights.MODEL])
        projector = dino = None
        if repa_enabled(config):
            projector = nnx.merge(layout.projector_graphdef, params[weights.PROJECTOR])
            # Frozen target: DINOv2 does not depend on params, so no gradient flows through it.
            dino = nnx.merge(dinov2_graphdef, dinov2_params)
        keys = flow.example_keys(config.seed, step, positions)
        return flow.training_loss(model, projector, dino, batch, keys, config)

    return loss_fn


STATE_FINITE = "state_finite"   # the step's metric: loss, grads, new params, Adam state, EMA


def all_finite(*trees) -> jax.Array:
    """A bool scalar: every floating-point value of `trees` is finite (no NaN, no Inf)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(config, layout: StateLayout, tx, lr_schedule, dinov2_graphdef=None, *,
                    data_parallel: int = 1):
    """The pure train step: (state, batch, positions, dinov2_params) -> (state, metrics).

    With optim.grad_accum_steps = n > 1 the batch is split into n microbatches (see
    `split_microbatches`; `data_parallel` is the mesh's data x fsdp size) whose loss and
    gradients are summed in float32 over a lax.scan and divided by n: the mean over the whole
    batch, as without accumulation (equal-size microbatches), with one microbatch's activations
    in memory at a time.
    """
    loss_fn = make_loss_fn(config, layout, dinov2_graphdef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    decay = config.ema.decay
    accum = config.optim.grad_accum_steps
    check_grad_accum(config.global_batch_size, accum, data_parallel)

    def loss_and_grads(params, batch, positions, step, dinov2_params):
        if accum == 1:
            return grad_fn(params, batch, positions, step, dinov2_params)
        micro = split_microbatches((batch, positions), accum, data_parallel)
        batch_spec = P(None, sharding.BATCH_AXES)
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, P(*batch_spec, *([None] * (x.ndim - 2)))), micro)

        def accumulate(total, inputs):
            out = grad_fn(params, *inputs, step, dinov2_params)
            return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

        shapes = jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro), step,
                                dinov2_params)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype,
                                                                            jnp.float32)), shapes)
        # The gradient sums keep the params' shardings (reduce-scattered per microbatch).
        zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], layout.shardings.params))
        total, _ = jax.lax.scan(accumulate, zeros, micro)
        return jax.tree.map(lambda t: t / accum, total)

    def train_step(state: weights.TrainState, batch, positions, dinov2_params):
        (loss, parts), grads = loss_and_grads(state.params, batch, positions, state.step,
                                              dinov2_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA after every optimizer step, from step 0 (official SimpleEMA, every_n_steps=1).
        ema = optax.incremental_update(params[weights.MODEL], state.ema_params,
                                       step_size=1.0 - decay)
        grad_norm = optax.global_norm(grads)
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
                   # The state after the update, checked here on device (one more read of it)
                   # and by the host before any save: a diverged state is never saved.
                   STATE_FINITE: all_finite(loss, grad_norm, params, opt_state, ema)}
        new_state = weights.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                                       ema_params=ema)
        return new_state, metrics

    return train_step


def batch_abstract(config, mesh, *, need_data: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and shardings of one batch, from the pipeline's element spec.

    need_data=False (compile-only): without the shards on this machine, the shapes come from the
    config (those the synthetic source, and the latent cache, yield).
    """
    if need_data or config.data.source != "array_record" or (
            config.data.path and files.as_path(config.data.path).exists()):
        spec = pipeline.element_spec(config.data)
    else:
        synthetic = config.data.copy_and_resolve_references()
        synthetic.source = "synthetic"
        spec = pipeline.element_spec(synthetic)
    return {k: jax.ShapeDtypeStruct((config.global_batch_size,) + v.shape, v.dtype,
                                    sharding=sharding.batch_sharding(mesh, 1 + len(v.shape)))
            for k, v in spec.items()}


def load_dinov2(config, mesh):
    """(graphdef, replicated params) of the frozen DINOv2, or (None, None) without REPA."""
    if not repa_enabled(config):
        return None, None
    # The frozen encoder uses the DDT's attention kernel (model.attention): on a TPU slice its
    # 257-token attention runs in the same splash kernel, on a GPU in cuDNN's.
    dino = convert.load_dinov2(config.repa.dinov2_path, num_heads=config.repa.dinov2_num_heads,
                               dtype=ddt.DTYPES[config.repa.dinov2_dtype],
                               attention=config.model.attention)
    if dino.embed_dim != config.repa.feature_dim:
        raise ValueError(f"repa.feature_dim={config.repa.feature_dim} but the DINOv2 at "
                         f"{config.repa.dinov2_path} has width {dino.embed_dim}")
    graphdef, state = nnx.split(dino)
    # 86M params (344 MB f32) for B/14: replicated, every device embeds its own images.
    return graphdef, sharding.host_to_replicated(state.to_pure_dict(), mesh)


def abstract_dinov2(config, mesh):
    """(graphdef, abstract replicated params) of the config's DINOv2 without reading its weights
    when they are absent (compile-only): the published size of width repa.feature_dim."""
    if not repa_enabled(config):
        return None, None
    if config.repa.dinov2_path and files.as_path(config.repa.dinov2_path).exists():
        kwargs = convert.dinov2_config_from_state_dict(
            convert.read_state_dict(config.repa.dinov2_path),
            num_heads=config.repa.dinov2_num_heads)
    else:
        by_width = {v["embed_dim"]: v for v in dinov2_lib.DINOV2_VARIANTS.values()}
        if config.repa.feature_dim not in by_width:
            raise ValueError(f"repa.feature_dim={config.repa.feature_dim} is not a published "
                             f"DINOv2 width {sorted(by_width)}: set repa.dinov2_path")
        kwargs = by_width[config.repa.feature_dim]
    dtype = ddt.DTYPES[config.repa.dinov2_dtype]
    dino = nnx.eval_shape(lambda: dinov2_lib.DINOv2(**kwargs, dtype=dtype,
                                                     attention=config.model.attention,
                                                     rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(dino)
    replicated = sharding.replicated(mesh)
    return graphdef, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        state.to_pure_dict())


def jit_step(step_fn, layout: StateLayout, abstract_batch, abstract_positions, abstract_dino,
             mesh):
    """The step jitted with explicit shardings and the state donated, lowered for `mesh`."""
    replicated = sharding.replicated(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(layout.shardings, jax.tree.map(lambda a: a.sharding, abstract_batch),
                      abstract_positions.sharding,
                      jax.tree.map(lambda _: replicated, abstract_dino)),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,))
    with jax.set_mesh(mesh):
        return jitted.lower(layout.abstract, abstract_batch, abstract_positions, abstract_dino)


def compile_step(lowered):
    """AOT-compiles a lowered step and logs its memory per device."""
    t0 = time.time()
    compiled = lowered.compile()
    logging.info("compiled the train step in %.1f s", time.time() - t0)
    memory = compiled.memory_analysis()
    if memory is not None:
        logging.info("train step memory per device: arguments %.2f GiB (%.2f GiB donated), "
                     "outputs %.2f GiB, temporaries %.2f GiB, code %.2f GiB",
                     memory.argument_size_in_bytes / GIB, memory.alias_size_in_bytes / GIB,
                     memory.output_size_in_bytes / GIB, memory.temp_size_in_bytes / GIB,
                     memory.generated_code_size_in_bytes / GIB)
    return compiled


def model_forward_flops(model_config, tokens: int) -> float:
    """Analytic FLOPs of one example's forward pass of the configured model on `tokens` tokens."""
    kw = ddt.model_kwargs(model_config)
    return flops_lib.model_forward_flops(
        tokens=tokens, hidden_size=kw["hidden_size"], num_blocks=kw["num_blocks"],
        patch_features=kw["in_channels"] * kw["patch_size"] ** 2, mlp_ratio=kw["mlp_ratio"],
        num_encoder_blocks=kw.get("num_encoder_blocks"))


def step_flops(config, abstract_batch, dinov2_depth: int = 12) -> float:
    """Analytic FLOPs of one global train step (see ddt_jax/flops.py)."""
    kw = ddt.model_kwargs(config.model)
    x = abstract_batch["moments" if "moments" in abstract_batch else "pixels"]
    tokens = (x.shape[1] // kw["patch_size"]) * (x.shape[2] // kw["patch_size"])
    forward = model_forward_flops(config.model, tokens)
    projector = dino = 0.0
    if repa_enabled(config):
        dim = (config.repa.projector_dim if config.repa.projector_dim is not None
               else kw["hidden_size"])
        # The projector's backward stops at block `align_layer`; counting it as 3x is close enough.
        projector = flops_lib.projector_flops(tokens, kw["hidden_size"], dim,
                                              config.repa.feature_dim)
        image = abstract_batch["image"]
        dino = flops_lib.dinov2_flops(image_height=image.shape[1], image_width=image.shape[2],
                                      embed_dim=config.repa.feature_dim, depth=dinov2_depth)
    return flops_lib.train_step_flops(batch=config.global_batch_size, model_forward=forward,
                                      projector_forward=projector, dinov2_forward=dino)


def restore_init_from(config, path: str, layout: StateLayout,
                      state: weights.TrainState) -> weights.TrainState:
    """Replaces the model weights, the EMA and (when the source has one) the REPA projector.

    Args:
      config: the run config.
      path: another run's workdir (or its checkpoints/ or checkpoints/<step>), a directory
        written by `python -m ddt_jax.convert ddt`, or an official .ckpt / .pt / .safetensors.
      layout: this run's state layout (the targets' shapes and shardings).
      state: the freshly initialised state; its optimizer state and step stay fresh.

    Returns:
      `state` with params, EMA and (if found) projector from `path`.
    """
    if not files.as_path(path).exists():
        raise FileNotFoundError(f"init_from={path!r} is neither a run directory, a converted "
                                "model directory nor a checkpoint file")
    depth = config.model.num_encoder_blocks if config.model.arch == "ddt" else None
    abstract_projector = layout.abstract.params.get(weights.PROJECTOR)
    init = weights.load_init_weights(path, layout.abstract.params[weights.MODEL],
                                     abstract_projector, num_encoder_blocks=depth)
    params = {**state.params, weights.MODEL: init.params}
    projector = init.projector
    if projector is not None:
        params[weights.PROJECTOR] = projector
    elif abstract_projector is not None:
        logging.warning("init_from %s: no usable REPA projector; it starts from scratch", path)
    logging.info("initialised the model and EMA%s from %s",
                 " and REPA projector" if projector is not None else "", path)
    return state.replace(params=params, ema_params=init.ema)


# -------------------------------------------------------------------------------------------------
# Everything a step needs, abstractly: shared by training and compile-only.

@dataclasses.dataclass(frozen=True)
class StepSetup:
    mesh: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    layout: StateLayout
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    abstract_positions: jax.ShapeDtypeStruct
    dinov2_graphdef: Any
    abstract_dinov2: Any
    lowered: Any


def setup_step(config, mesh, dinov2_graphdef, abstract_dino, *, need_data: bool = True
               ) -> StepSetup:
    """Layout, abstract inputs and the lowered train step for `mesh` (nothing allocated)."""
    sharding.check_batch_size(config.global_batch_size, mesh)
    tx, lr_schedule = make_optimizer(config.optim)
    layout = state_layout(config, mesh, tx)
    abstract_batch = batch_abstract(config, mesh, need_data=need_data)
    abstract_positions = jax.ShapeDtypeStruct((config.global_batch_size,), jnp.int32,
                                              sharding=sharding.batch_sharding(mesh, 1))
    step_fn = make_train_step(config, layout, tx, lr_schedule, dinov2_graphdef,
                              data_parallel=sharding.data_parallel_size(mesh))
    lowered = jit_step(step_fn, layout, abstract_batch, abstract_positions, abstract_dino, mesh)
    return StepSetup(mesh=mesh, tx=tx, lr_schedule=lr_schedule, layout=layout,
                     abstract_batch=abstract_batch, abstract_positions=abstract_positions,
                     dinov2_graphdef=dinov2_graphdef, abstract_dinov2=abstract_dino,
                     lowered=lowered)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What `compile_only` measured: bytes are per device, FLOPs per global step."""
    title: str                          # e.g. "ddt XL/2 (22 encoder blocks), batch 256"
    setup: StepSetup
    compiled: Any                       # None when only lowered
    bytes_per_device: dict[str, int]    # params, optimizer state, EMA, DINOv2, batch; XLA's
    analytic_flops: float
    xla_flops: float | None             # cost_analysis of the compiled (or lowered) step
    memory_per_device: int | None = None   # HBM (TPU table, GPU bytes_limit); None on CPU

    @property
    def total_bytes(self) -> int | None:
        """What the step holds at its peak on one device: arguments + outputs not aliased to
        them + temporaries + code (None when only lowered)."""
        b = self.bytes_per_device
        if "XLA arguments" not in b:
            return None
        return (b["XLA arguments"] + b["XLA outputs"] - b["XLA donated (aliased)"]
                + b["XLA temporaries"] + b["XLA generated code"])

    @property
    def fits(self) -> bool | None:
        if self.total_bytes is None or self.memory_per_device is None:
            return None
        return self.total_bytes <= self.memory_per_device

    def table(self) -> str:
        lines = [f"train step of {self.title} on mesh "
                 f"{dict(self.setup.mesh.shape)} ({self.setup.mesh.size} devices, "
                 f"{self.setup.mesh.devices.flat[0].device_kind}); per device:"]
        for name, value in self.bytes_per_device.items():
            lines.append(f"  {name:<24} {value / 2**20:12,.2f} MiB")
        if self.total_bytes is not None:
            lines.append(f"  {'total (peak estimate)':<24} {self.total_bytes / 2**20:12,.2f} MiB")
        if self.fits is not None:
            lines.append(f"  {'device memory':<24} {self.memory_per_device / 2**20:12,.2f} MiB: "
                         + (f"fits ({self.total_bytes / self.memory_per_device:.0%} used)"
                            if self.fits else "DOES NOT FIT"))
        lines.append(f"  {'FLOPs (analytic)':<24} {self.analytic_flops / 1e9:12,.2f} GFLOP "
                     "per global step")
        if self.xla_flops is not None:
            lines.append(f"  {'FLOPs (XLA cost)':<24} {self.xla_flops / 1e9:12,.2f} GFLOP "
                         "per device per step")
        return "\n".join(lines)


def _xla_flops(program) -> float | None:
    try:
        cost = program.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def compile_only(config: ml_collections.ConfigDict, *, devices=None, compile: bool = True
                 ) -> CompileReport:
    """Sizes a run before it starts: the train step AOT-compiled for the devices at hand, with
    its memory per device and FLOPs, without allocating the model or reading the data.

    Args:
      config: a training config.
      devices: the devices of the mesh (default: all); e.g. abstract TPU devices from
        `jax.experimental.topologies` to size a pod from this host.
      compile: False stops after lowering (XLA memory figures then stay unmeasured).

    Returns:
      A CompileReport; `report.table()` is what `train.py --compile_only` prints.
    """
    config_schema.validate_config(config, check_files=False)
    mesh = make_mesh(config, devices)
    dinov2_graphdef, abstract_dino = abstract_dinov2(config, mesh)
    setup = setup_step(config, mesh, dinov2_graphdef, abstract_dino, need_data=False)
    layout = setup.layout
    sizes = {"parameters": sharding.bytes_per_device(layout.abstract.params),
             "optimizer state": sharding.bytes_per_device(layout.abstract.opt_state),
             "EMA": sharding.bytes_per_device(layout.abstract.ema_params)}
    if abstract_dino is not None:
        sizes["DINOv2 (frozen)"] = sharding.bytes_per_device(abstract_dino)
    sizes["batch"] = sharding.bytes_per_device(setup.abstract_batch)
    try:
        compiled = compile_step(setup.lowered) if compile else None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA refuses a program larger than the device (a TPU slice's HBM): say so with the fix.
        # remat "full" first: "dots_saveable" can keep more than no remat at all (XL/2 512 on a
        # v5e-16, batch 256: 45.0 GiB of temporaries, 36.5 without remat, 5.7 with full + scan).
        device = mesh.devices.flat[0]
        raise ValueError(
            f"the train step does not fit on {mesh.size} x {device.device_kind} (mesh "
            f"{dict(mesh.shape)}): {str(e).split('RESOURCE_EXHAUSTED: ')[-1].strip()} Use less "
            "activation memory per chip: --config.model.remat=full with "
            "--config.model.scan_blocks=True (keeps only each block's input), "
            "--config.optim.grad_accum_steps=N, a smaller global_batch_size, or more "
            "chips") from None
    memory = compiled.memory_analysis() if compiled is not None else None
    if memory is not None:
        sizes.update({"XLA arguments": memory.argument_size_in_bytes,
                      "XLA outputs": memory.output_size_in_bytes,
                      "XLA donated (aliased)": memory.alias_size_in_bytes,
                      "XLA temporaries": memory.temp_size_in_bytes,
                      "XLA generated code": memory.generated_code_size_in_bytes})
    depth = 0 if abstract_dino is None else len(abstract_dino["blocks"])
    kw = ddt.model_kwargs(config.model)
    title = (f"{config.model.arch.upper()} {config.model.variant}"
             + (f" ({kw['num_encoder_blocks']}en{kw['num_blocks'] - kw['num_encoder_blocks']}de)"
                if "num_encoder_blocks" in kw else "")
             + f", {sum(x.size for x in jax.tree.leaves(layout.abstract.params[weights.MODEL])):,}"
             f" params, global batch {config.global_batch_size}"
             + (", REPA" if repa_enabled(config) else ""))
    return CompileReport(title=title, setup=setup, compiled=compiled, bytes_per_device=sizes,
                         analytic_flops=step_flops(config, setup.abstract_batch, depth),
                         xla_flops=_xla_flops(compiled if compiled is not None else setup.lowered),
                         memory_per_device=tpu_topology.hbm_per_device(mesh.devices.flat[0]))


# -------------------------------------------------------------------------------------------------
# Start-up checks: a start that fails leaves the workdir as it was.

# Fields a resumed run must share with the run in its workdir: they change the model or the train
# state's layout (REPA's projector, the clipping chain of the optimizer state), the batch, the seed
# or the data. Everything else (num_train_steps, optim.lr, logging.*, checkpoint.*, mesh.*, ...)
# may change on resume.
RESUME_FIELDS = ("model", "data", "seed", "global_batch_size", "repa", "flow",
                 "vae.scaling_factor", "optim.grad_clip_norm")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _covered(field: str, names) -> bool:
    return any(field == n or field.startswith(n + ".") for n in names)


def config_changes(saved: dict, config: ml_collections.ConfigDict,
                   allow: tuple[str, ...] = ()) -> list[str]:
    """The RESUME_FIELDS that differ between a run's saved config.json and `config`.

    Args:
      saved: the parsed config.json of the run being resumed.
      config: the new config.
      allow: fields (or sections, e.g. "model") allowed to change anyway.

    Returns:
      One "field: old -> new" string per differing field, sorted; empty if the run may resume.
    """
    old = _flatten(saved)
    new = _flatten(json.loads(config.to_json_best_effort()))
    # A field added to the schema after the run started is unchanged at its default (a new field
    # defaults to the old behaviour); a field since removed is no longer compared.
    defaults = _flatten(json.loads(config_schema.default_config().to_json_best_effort()))
    old = {f: old.get(f, defaults.get(f)) for f in new}
    fields = sorted(f for f in new if _covered(f, RESUME_FIELDS) and not _covered(f, allow))
    return [f"{f}: {old[f]!r} -> {new[f]!r}" for f in fields if old[f] != new[f]]


def check_workdir(workdir: str) -> None:
    """Raises NotADirectoryError for a --workdir that exists but is not a directory."""
    path = files.as_path(workdir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory: pass a "
                                 "directory (it is created if missing)")


def check_resume_config(workdir: str, config: ml_collections.ConfigDict,
                        allow: tuple[str, ...] = ()) -> None:
    """Raises ValueError when `config` would resume the run in `workdir` with another model,
    batch, seed or data (the RESUME_FIELDS); a workdir without checkpoints is not checked.

    Args:
      workdir: the run directory.
      config: the new config.
      allow: fields or sections allowed to change (train.py's --allow_config_change).
    """
    flat = set(_flatten(json.loads(config.to_json_best_effort())))
    sections = {f.rsplit(".", i)[0] for f in flat for i in range(f.count(".") + 1)}
    unknown = sorted(a for a in allow if a not in sections)
    if unknown:
        raise ValueError(f"--allow_config_change names no config field: {unknown}")
    path = files.as_path(workdir) / weights.RUN_CONFIG
    if not weights.run_steps(workdir) or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}): restore it from a copy of the run, or "
                         "delete it to resume with the new config unchecked") from e
    changes = config_changes(saved, config, allow)
    if changes:
        fields = ",".join(c.split(":")[0] for c in changes)
        raise ValueError(
            f"{workdir} holds a run with other settings than this config: {'; '.join(changes)}. "
            f"Resume with the run's settings (in {path}), train in a new --workdir, or, to "
            f"change them on purpose, pass --allow_config_change={fields}")


COMPILATION_CACHE_DIR = "compilation_cache"   # in the workdir, unless config says elsewhere
_cache_dir_set_here: list[str] = []            # the cache directory this module chose last


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Points JAX's persistent compilation cache at config.compilation_cache_dir (None:
    <workdir>/compilation_cache; "": off), so a restart loads the compiled step instead of
    compiling it again. A directory set outside this module (JAX_COMPILATION_CACHE_DIR, or
    jax.config by the caller) is kept. Returns the directory in use (None: no cache)."""
    current = jax.config.jax_compilation_cache_dir
    if current and current not in _cache_dir_set_here:
        logging.info("compilation cache: %s (set outside the config)", current)
        return current
    wanted = config.compilation_cache_dir
    if wanted is None:
        wanted = os.fspath(files.as_path(workdir) / COMPILATION_CACHE_DIR)
    elif wanted:
        wanted = files.as_str(wanted)
    if wanted != current:
        jax.config.update("jax_compilation_cache_dir", wanted or None)
        compilation_cache.reset_cache()   # JAX reads the directory once, at its first compile
        _cache_dir_set_here.append(wanted)
    logging.info("compilation cache: %s", wanted or "off (compilation_cache_dir='')")
    return wanted or None


def nonfinite_message(step: int, metrics: dict, ckpt: checkpoint_lib.Checkpointer) -> str:
    """The error of a diverged run: the step, its loss and grad norm, the last checkpoint (finite:
    every save is of a state checked finite)."""
    last = ckpt.latest_step()
    resume = (f"Last finite checkpoint: step {last} in {ckpt.directory}; a restart resumes from "
              "it and diverges again unless something changes (e.g. a lower --config.optim.lr)"
              if last is not None else
              "No checkpoint was saved before it: a restart starts from scratch")
    return (f"the train state after step {step} is not finite (NaN or Inf; loss "
            f"{float(metrics['loss']):.4g}, grad norm {float(metrics['grad_norm']):.4g}): stopping "
            f"without saving it. {resume}")


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes <workdir>/config.json atomically (temp file + rename): never half a file."""
    files.atomic_write_text(files.as_path(workdir) / weights.RUN_CONFIG,
                            config.to_json_best_effort(indent=2))


# -------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: tuple[str, ...] = ()) -> weights.TrainState | None:
    """Trains (or resumes) the run in `workdir` until config.num_train_steps or preemption.

    Args:
      config: a training config (configs/*.py; checked by `config_schema.validate_config`).
      workdir: the run directory: config.json, checkpoints/, TensorBoard events, samples/.
      allow_config_change: RESUME_FIELDS (or sections) that may differ from the run's saved
        config.json when resuming.

    Returns:
      The final TrainState (on device); None if a SIGTERM came before the state existed.
    """
    # First of all: from here on a SIGTERM stops the run cleanly (exit 0), also during start-up.
    guard = checkpoint_lib.PreemptionGuard()
    try:
        return _train_and_evaluate(config, workdir, guard, tuple(allow_config_change))
    finally:
        guard.close()


def _train_and_evaluate(config, workdir: str, guard, allow_config_change: tuple[str, ...]):
    # Every check that can refuse the start runs before anything is written to the workdir.
    workdir = files.as_str(workdir)   # absolute when local; gs://... as it is
    config_schema.validate_config(config)
    check_workdir(workdir)
    check_resume_config(workdir, config, allow_config_change)
    is_main = jax.process_index() == 0
    # clu's writers and periodic actions import TensorFlow (~5 s): after the quick checks.
    from clu import metric_writers, periodic_actions

    # ---- Mesh -----------------------------------------------------------------------------------
    mesh = make_mesh(config)
    local_batch = sharding.check_batch_size(config.global_batch_size, mesh)
    logging.info("mesh %s over %d devices (%d processes); global batch %d, %d per process",
                 dict(mesh.shape), mesh.size, jax.process_count(), config.global_batch_size,
                 local_batch)

    # ---- Data (checked here; the iterator starts at the resumed step, below) ---------------------
    pipeline.check_latent_scaling(config.data, config.vae.scaling_factor)
    positions = example_positions(local_batch, mesh)

    # ---- Model, REPA projector, AdamW and EMA: shardings from the params' logical axes ----------
    dinov2_graphdef, dinov2_params = load_dinov2(config, mesh)
    abstract_dino = (None if dinov2_params is None else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), dinov2_params))
    setup = setup_step(config, mesh, dinov2_graphdef, abstract_dino)
    layout = setup.layout
    # Every program from here on (init, train step, grids, FID) is cached for the next start.
    use_compilation_cache(config, workdir)
    n_params = sum(x.size for x in jax.tree.leaves(layout.abstract.params[weights.MODEL]))
    logging.info("model: %s %s, %.1fM params; train state %.2f GiB per device",
                 config.model.arch, config.model.variant, n_params / 1e6,
                 sharding.bytes_per_device(layout.abstract) / GIB)

    # ---- Resume, or start (from scratch or init_from) -------------------------------------------
    ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    # The newest step that verifies (checksums, finite); bad newer ones are set aside, warned.
    latest, restored = ckpt.restore_latest(layout.abstract.to_dict())
    if latest is not None:
        logging.info("resuming from the checkpoint at step %d in %s%s", latest, ckpt.directory,
                     f" (init_from={config.init_from!r} applies to fresh runs only)"
                     if config.init_from else "")
        state = weights.TrainState.from_dict(restored)
    else:
        state = init_train_state(config, layout, setup.tx, rng.stream(config.seed, rng.INIT))
        if config.init_from:
            state = restore_init_from(config, config.init_from, layout, state)
    step = int(jax.device_get(state.step))
    # The data position is a function of the step (pipeline._ProcessBlocks): a run resumes with
    # the batch an uninterrupted one would see next, on any number of processes.
    data_iter = pipeline.create_train_iterator(
        config.data, global_batch_size=config.global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
        start_step=step)
    if is_main:
        write_run_config(workdir, config)
    if guard.requested():
        logging.warning("SIGTERM during start-up: stopping before step %d; nothing to save (a "
                        "restart resumes from %s)", step + 1,
                        f"step {latest}" if latest is not None else "scratch")
        ckpt.close()
        return state
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                  asynchronous=True)

    # ---- Train step: compiled once, ahead of time -----------------------------------------------
    compiled_step = compile_step(setup.lowered)
    depth = 0 if dinov2_params is None else len(dinov2_params["blocks"])
    flops_per_step = step_flops(config, setup.abstract_batch, dinov2_depth=depth)
    peak = flops_lib.peak_flops_per_device(jax.devices()[0], config.peak_tflops_per_device)
    logging.info("%.2f TFLOP per step (analytic); device %s, peak %s TFLOP/s",
                 flops_per_step / 1e12, jax.devices()[0].device_kind,
                 "unknown" if peak is None else peak / 1e12)
    grid_sampler = grids.make_grid_sampler(config, layout.model_graphdef, mesh)
    fid = fid_monitor.make_fid_monitor(config, layout.model_graphdef, mesh)

    # ---- Loop -----------------------------------------------------------------------------------
    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             writer=writer, every_steps=config.logging.log_every)
    # Multi-process CPU (gloo) collectives deadlock when many steps are in flight: wait for each.
    sync_every_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
    pending: list[tuple[int, dict]] = []
    last_log_time, last_log_step = time.time(), step

    def check_finite():
        """Raises if a step since the last check left a non-finite state (never saved)."""
        for s, m in pending:
            if not bool(jax.device_get(m[STATE_FINITE])):
                raise FloatingPointError(nonfinite_message(s, jax.device_get(m), ckpt))

    def write_metrics():
        nonlocal pending, last_log_time, last_log_step
        check_finite()
        values = jax.device_get([m for _, m in pending])
        scalars = {k: float(np.mean([v[k] for v in values])) for k in values[0]
                   if k != STATE_FINITE}
        scalars["lr"] = float(values[-1]["lr"])
        elapsed = time.time() - last_log_time
        steps_done = step - last_log_step
        if steps_done > 0 and elapsed > 0:
            scalars["images_per_sec"] = steps_done * config.global_batch_size / elapsed
            tflops = flops_per_step * steps_done / elapsed / jax.device_count() / 1e12
            scalars["tflops_per_device"] = tflops
            if peak is not None:
                scalars["mfu"] = tflops * 1e12 / peak
        writer.write_scalars(step, scalars)
        pending, last_log_time, last_log_step = [], time.time(), step

    if jax.process_count() > 1:
        # Start the loop together: a host that compiled from a cold cache can be minutes behind
        # the others, longer than a collective in the first step should wait.
        ocp.multihost.sync_global_processes("ddt_train_loop_start")
    logging.info("training from step %d to %d", step, config.num_train_steps)
    try:
        while step < config.num_train_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.host_to_global(next(data_iter), mesh)
                state, metrics = compiled_step(state, batch, positions, dinov2_params)
            step += 1
            pending.append((step, metrics))
            if sync_every_step:
                jax.block_until_ready(metrics)
            report(step)
            preempted = guard.reached(step)
            done = step == config.num_train_steps
            if step % config.logging.log_every == 0 or done or preempted:
                write_metrics()
            if grid_sampler is not None and (step % config.logging.sample_every == 0 or done):
                check_finite()   # never sample a diverged state
                with report.timed("sample"):
                    grid = grid_sampler(state.ema_params)
                grids.write_grid(workdir, step, grid)
                writer.write_images(step, {"ema_samples": grid[None]})
            if fid is not None and (step % config.logging.fid_every == 0 or done):
                check_finite()
                with report.timed("fid"):
                    scores = fid(state.ema_params)
                best = fid_monitor.record(workdir, step, scores)
                writer.write_scalars(step, {**scores, **{f"{k}_best": v for k, v in best.items()
                                                         if k != "step"}})
            if done or preempted or ckpt.should_save(step):
                check_finite()   # never save a state that has already diverged
                with report.timed("checkpoint"):
                    if ckpt.save(step, state.to_dict(), force=done or preempted):
                        logging.info("saving checkpoint at step %d", step)
            if preempted:
                logging.warning("preempted: saved step %d, stopping", step)
                break
    finally:
        ckpt.close()   # waits for the last async save
        writer.flush()
    return state
