"""DDT training, read top to bottom: `train_and_evaluate(config, workdir)`.

    python train.py --config=configs/xl_256.py --workdir=/ckpt/ddt_xl_256      # see configs/xl_256.py
    .venv/bin/python -m pytest tests/test_trainer.py -q                         # tiny runs on 8 CPU devices

Sections of `train_and_evaluate`: config check -> mesh -> data -> state (model, REPA projector,
AdamW, EMA; sharded by logical axes) -> resume / init_from -> AOT-compiled train step (memory
logged) -> loop (metrics, sample grids, checkpoints, preemption).

The train step is one pure jitted function of (TrainState, batch, example positions, DINOv2
params). Its randomness (latent sample, t, noise, label dropout) comes from a key folded with the
step and each example's position in the global batch, so it differs across devices and hosts, and
it does not depend on the mesh or the number of processes: the same run on 8 devices as (8, 1) or
(2, 4), or on 2 hosts x 4, computes the same loss.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import flops as flops_lib
from ddt_jax import flow
from ddt_jax import sharding
from ddt_jax.models import ddt
from ddt_jax.models import vae as vae_lib
from input_pipeline import pipeline


@flax.struct.dataclass
class TrainState:
    """Everything a step updates. Param trees are plain nested dicts of arrays (nnx pure dicts)."""
    step: jax.Array                 # int32 scalar: optimizer steps taken
    params: dict[str, Any]          # {"model": ..., "projector": ...}; no "projector" without REPA
    opt_state: Any                  # AdamW state over `params`
    ema_params: dict[str, Any]      # EMA of params["model"] (what samples and evaluation use)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "ema_params": self.ema_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], ema_params=d["ema_params"])


# ---------------------------------------------------------------------------------------------------
# Config checking: a misspelt or missing field, or an inconsistent pair, fails before any work.

_SECTIONS = {
    "vae": ("scaling_factor", "path"),
    "optim": ("lr", "b1", "b2", "eps", "weight_decay", "warmup_steps", "grad_clip_norm"),
    "ema": ("decay",),
    "flow": ("t_sampler", "t_mean", "t_std", "label_drop_prob"),
    "repa": ("weight", "align_layer", "projector_dim", "feature_dim", "dinov2_path", "dinov2_dtype",
             "dinov2_num_heads"),
    "mesh": ("data", "fsdp", "tensor", "rules"),
    "checkpoint": ("every_steps", "keep", "keep_every_steps", "async_save"),
    "logging": ("log_every", "sample_every", "num_samples", "sample"),
}
_TOP_LEVEL = ("seed", "num_train_steps", "global_batch_size", "init_from", "peak_tflops_per_device",
              "model", "data", *_SECTIONS)


def _check_keys(what: str, have, want) -> None:
    have, want = set(have), set(want)
    unknown, missing = sorted(have - want), sorted(want - have)
    if unknown or missing:
        raise ValueError(f"config {what}: " + "; ".join(
            ([f"unknown fields {unknown}"] if unknown else []) + ([f"missing fields {missing}"] if missing else []))
            + f". Expected exactly {sorted(want)}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for a config this trainer cannot run as intended."""
    from ddt_jax import sampler as sampler_lib

    _check_keys("top level", config.keys(), _TOP_LEVEL)
    for name, fields in _SECTIONS.items():
        _check_keys(f"section '{name}'", config[name].keys(), fields)
    _check_keys("section 'model'", config.model.keys(), ddt.default_model_config().keys())
    _check_keys("section 'data'", config.data.keys(), pipeline.default_data_config().keys())
    _check_keys("section 'logging.sample'", config.logging.sample.keys(),
                sampler_lib.default_sampler_config().keys())

    def require(ok: bool, message: str):
        if not ok:
            raise ValueError(f"config: {message}")

    require(config.num_train_steps > 0, f"num_train_steps must be positive, got {config.num_train_steps}")
    require(config.global_batch_size > 0, f"global_batch_size must be positive, got {config.global_batch_size}")
    require(config.optim.lr > 0, f"optim.lr must be positive, got {config.optim.lr}")
    require(config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    require(config.optim.grad_clip_norm >= 0, "optim.grad_clip_norm must be >= 0 (0 = no clipping)")
    require(0.0 <= config.ema.decay < 1.0, f"ema.decay must be in [0, 1), got {config.ema.decay}")
    require(config.flow.t_sampler in flow.T_SAMPLERS,
            f"flow.t_sampler must be one of {flow.T_SAMPLERS}, got {config.flow.t_sampler!r}")
    require(0.0 <= config.flow.label_drop_prob < 1.0,
            f"flow.label_drop_prob must be in [0, 1), got {config.flow.label_drop_prob}")
    require(config.logging.log_every > 0, "logging.log_every must be positive")
    require(config.logging.sample_every >= 0, "logging.sample_every must be >= 0 (0 = never)")
    require(config.repa.weight >= 0, f"repa.weight must be >= 0, got {config.repa.weight}")
    require(config.repa.dinov2_dtype in ddt.DTYPES,
            f"repa.dinov2_dtype must be one of {sorted(ddt.DTYPES)}, got {config.repa.dinov2_dtype!r}")

    # Model and data must describe the same examples.
    m, d = config.model, config.data
    kw = ddt.model_kwargs(m)   # raises on a bad variant / arch / dtype
    require(m.in_channels == d.channels,
            f"model.in_channels={m.in_channels} but data.channels={d.channels}")
    require(m.num_classes == d.num_classes,
            f"model.num_classes={m.num_classes} but data.num_classes={d.num_classes}")
    side = d.image_size // d.latent_downsample if d.kind == "latent" else d.image_size
    require(m.image_size == side and m.image_width in (-1, side),
            f"model.image_size={m.image_size} but data.kind={d.kind!r} at data.image_size={d.image_size} "
            f"gives {side}x{side} model inputs")

    if config.repa.weight > 0:
        depth = kw.get("num_encoder_blocks", kw["num_blocks"])
        require(1 <= config.repa.align_layer <= depth,
                f"repa.align_layer={config.repa.align_layer} must be in [1, {depth}] (1-based "
                f"{'encoder ' if m.arch == 'ddt' else ''}block)")
        require(d.with_image, "repa.weight > 0 needs the raw images: set data.with_image=True "
                "(or repa.weight=0 to train without REPA)")
        path = config.repa.dinov2_path
        if not path or not os.path.exists(path):
            raise FileNotFoundError(
                f"repa.dinov2_path={path!r} does not exist, and repa.weight={config.repa.weight} needs "
                "DINOv2-B/14 weights. Download dinov2_vitb14_pretrain.pth (facebookresearch/dinov2) once "
                "and pass --config.repa.dinov2_path=/path/to/it; nothing is downloaded at run time. "
                "Or set --config.repa.weight=0 to train without REPA.")


# ---------------------------------------------------------------------------------------------------
# Building blocks (module-level so tests can drive them; train_and_evaluate wires them in order).

def make_optimizer(optim_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (torch semantics: decoupled decay, eps outside the sqrt) with optional warm-up/clipping."""
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
        dim = config.repa.projector_dim if config.repa.projector_dim > 0 else hidden
        projector = ddt.REPAProjector(hidden, dim, config.repa.feature_dim,
                                      dtype=ddt.DTYPES[config.model.dtype], rngs=rngs)
    return model, projector


def _split_params(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(module).__name__} has non-Param state {rest}; the trainer only carries Params")
    return graphdef, params


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Static facts about the train state: graphdefs, shardings and the abstract (shape-only) state."""
    model_graphdef: Any
    projector_graphdef: Any             # None without REPA
    shardings: TrainState               # of NamedShardings
    abstract: TrainState                # of ShapeDtypeStructs carrying those shardings


def state_layout(config, mesh, tx) -> StateLayout:
    """Shapes and NamedShardings of the whole TrainState, without allocating it."""
    model, projector = nnx.eval_shape(lambda: build_modules(config, nnx.Rngs(0)))
    rules = sharding.rules_dict(config.mesh.rules)
    model_graphdef, model_params = _split_params(model)
    params = {"model": model_params}
    projector_graphdef = None
    if projector is not None:
        projector_graphdef, params["projector"] = _split_params(projector)
    param_shardings = {k: sharding.logical_to_named(v, mesh, rules).to_pure_dict() for k, v in params.items()}
    abstract_params = {k: v.to_pure_dict() for k, v in params.items()}
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                           ema_params=param_shardings["model"])
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, ema_params=abstract_params["model"])
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateLayout(model_graphdef=model_graphdef, projector_graphdef=projector_graphdef,
                       shardings=shardings, abstract=abstract)


def init_train_state(config, layout: StateLayout, tx, key) -> TrainState:
    """Random init, computed directly into the sharded layout (no host copy of the full model)."""

    def init(key):
        model, projector = build_modules(config, nnx.Rngs(key))
        params = {"model": nnx.state(model, nnx.Param).to_pure_dict()}
        if projector is not None:
            params["projector"] = nnx.state(projector, nnx.Param).to_pure_dict()
        # EMA starts as a copy of the initial weights (official SimpleEMA copies the denoiser).
        ema = jax.tree.map(jnp.copy, params["model"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=ema)

    return jax.jit(init, out_shardings=layout.shardings)(key)


def example_positions(local_batch_size: int, mesh) -> jax.Array:
    """Each example's index in the run's data order, as a global (B,) int32 array beside the batch.

    The pipeline gives process p the examples p, p + P, p + 2P, ... of each global batch (a slice
    `[p::P]` of one shuffled order), so row r of process p is example p + P*r whatever P is.
    """
    p, n = jax.process_index(), jax.process_count()
    local = (p + n * np.arange(local_batch_size)).astype(np.int32)
    return sharding.host_to_global({"position": local}, mesh)["position"]


def example_keys(seed: int, step, positions):
    """One PRNG key per example from (seed, step, position): distinct across devices and hosts."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), step)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(positions)


def make_inputs(config, batch, keys):
    """Latents (or pixels), t, noise and dropped labels of one batch; each example from its own key."""
    k_latent, k_t, k_noise, k_label = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(4))
    if "moments" in batch:
        x = jax.vmap(lambda m, k: vae_lib.sample_latents(m, k, config.vae.scaling_factor))(batch["moments"], k_latent)
    else:
        x = batch["pixels"].astype(jnp.float32)
    t = jax.vmap(lambda k: flow.sample_t(k, (), config.flow.t_sampler, mean=config.flow.t_mean,
                                         std=config.flow.t_std))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(k_noise)
    labels = jax.vmap(lambda k, y: flow.drop_labels(k, y, config.flow.label_drop_prob, config.model.num_classes))(
        k_label, batch["label"])
    return x, t, noise, labels


def make_loss_fn(config, layout: StateLayout, dinov2_graphdef=None):
    """loss_fn(params, batch, positions, step, dinov2_params) -> (loss, {"fm_loss", "repa_loss"}).

    loss = mean((v_pred - (x - eps))^2) + repa.weight * mean(1 - cos(projector(h_k), DINOv2(image))).
    """
    repa = repa_enabled(config)
    align_layer, repa_weight = config.repa.align_layer, config.repa.weight

    def loss_fn(params, batch, positions, step, dinov2_params):
        x, t, noise, labels = make_inputs(config, batch, example_keys(config.seed, step, positions))
        x_t = flow.interpolate(x, noise, t)
        model = nnx.merge(layout.model_graphdef, params["model"])
        if repa:
            v_pred, _, hidden = model(x_t, t, labels, feature_layer=align_layer)
            projected = nnx.merge(layout.projector_graphdef, params["projector"])(hidden)
            # Frozen target: DINOv2 does not depend on params, so no gradient is computed through it.
            target = nnx.merge(dinov2_graphdef, dinov2_params)(batch["image"])
            repa_loss = flow.repa_loss(projected, target, height=x.shape[1], width=x.shape[2])
        else:
            v_pred = model(x_t, t, labels)[0]
            repa_loss = jnp.zeros((), jnp.float32)
        fm_loss = flow.flow_matching_loss(v_pred, flow.velocity_target(x, noise))
        return fm_loss + repa_weight * repa_loss, {"fm_loss": fm_loss, "repa_loss": repa_loss}

    return loss_fn


def make_train_step(config, layout: StateLayout, tx, lr_schedule, dinov2_graphdef=None):
    """The pure train step: (state, batch, positions, dinov2_params) -> (state, metrics)."""
    loss_fn = make_loss_fn(config, layout, dinov2_graphdef)
    decay = config.ema.decay

    def train_step(state: TrainState, batch, positions, dinov2_params):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, positions, state.step, dinov2_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA after every optimizer step, from step 0 (official SimpleEMA, every_n_steps=1).
        ema = optax.incremental_update(params["model"], state.ema_params, step_size=1.0 - decay)
        metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    return train_step


def batch_abstract(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and shardings of one batch, from the pipeline's element spec."""
    spec = pipeline.element_spec(config.data)
    return {k: jax.ShapeDtypeStruct((config.global_batch_size,) + v.shape, v.dtype,
                                    sharding=sharding.batch_sharding(mesh, 1 + len(v.shape)))
            for k, v in spec.items()}


def load_dinov2(config, mesh):
    """(graphdef, replicated params) of the frozen DINOv2, or (None, None) without REPA."""
    if not repa_enabled(config):
        return None, None
    from ddt_jax import convert

    heads = config.repa.dinov2_num_heads if config.repa.dinov2_num_heads > 0 else None
    dino = convert.load_dinov2(config.repa.dinov2_path, num_heads=heads, dtype=ddt.DTYPES[config.repa.dinov2_dtype])
    if dino.embed_dim != config.repa.feature_dim:
        raise ValueError(f"repa.feature_dim={config.repa.feature_dim} but the DINOv2 at "
                         f"{config.repa.dinov2_path} has width {dino.embed_dim}")
    graphdef, state = nnx.split(dino)
    params = jax.tree.map(np.asarray, state.to_pure_dict())
    # 86M params (344 MB f32) for B/14: replicated, every device embeds its own images.
    return graphdef, jax.device_put(params, sharding.replicated(mesh))


def compile_step(step_fn, layout: StateLayout, abstract_batch, abstract_positions, abstract_dinov2, mesh):
    """jit + AOT-compile once with explicit shardings and the state donated; logs memory per device."""
    replicated = sharding.replicated(mesh)
    dinov2_shardings = jax.tree.map(lambda _: replicated, abstract_dinov2)
    jitted = jax.jit(
        step_fn,
        in_shardings=(layout.shardings, jax.tree.map(lambda a: a.sharding, abstract_batch),
                      abstract_positions.sharding, dinov2_shardings),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,))
    t0 = time.time()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(layout.abstract, abstract_batch, abstract_positions, abstract_dinov2).compile()
    logging.info("compiled the train step in %.1f s", time.time() - t0)
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2.0 ** -30
        logging.info("train step memory per device: arguments %.2f GiB (%.2f GiB donated), outputs %.2f GiB, "
                     "temporaries %.2f GiB, code %.2f GiB",
                     memory.argument_size_in_bytes * gib, memory.alias_size_in_bytes * gib,
                     memory.output_size_in_bytes * gib, memory.temp_size_in_bytes * gib,
                     memory.generated_code_size_in_bytes * gib)
    return compiled


def step_flops(config, abstract_batch, dinov2_depth: int = 12) -> float:
    """Analytic FLOPs of one global train step (see ddt_jax/flops.py)."""
    kw = ddt.model_kwargs(config.model)
    x = abstract_batch["moments" if "moments" in abstract_batch else "pixels"]
    tokens = (x.shape[1] // kw["patch_size"]) * (x.shape[2] // kw["patch_size"])
    forward = flops_lib.model_forward_flops(
        tokens=tokens, hidden_size=kw["hidden_size"], num_blocks=kw["num_blocks"],
        patch_features=kw["in_channels"] * kw["patch_size"] ** 2, mlp_ratio=kw["mlp_ratio"],
        num_encoder_blocks=kw.get("num_encoder_blocks"))
    projector = dino = 0.0
    if repa_enabled(config):
        dim = config.repa.projector_dim if config.repa.projector_dim > 0 else kw["hidden_size"]
        # The projector's backward stops at block `align_layer`; counting it as 3x is close enough.
        projector = flops_lib.projector_flops(tokens, kw["hidden_size"], dim, config.repa.feature_dim)
        image = abstract_batch["image"]
        dino = flops_lib.dinov2_flops(image_height=image.shape[1], image_width=image.shape[2],
                                      embed_dim=config.repa.feature_dim, depth=dinov2_depth)
    return flops_lib.train_step_flops(batch=config.global_batch_size, model_forward=forward,
                                      projector_forward=projector, dinov2_forward=dino)


def restore_init_from(config, path: str, layout: StateLayout, state: TrainState) -> TrainState:
    """Replaces the model weights, the EMA and (when the source has one) the REPA projector.

    `path`: another run's workdir (or its checkpoints/ or checkpoints/<step>), a directory written by
    `python -m ddt_jax.convert ddt`, or an official .ckpt / .pt / .safetensors file. The optimizer
    state and the step stay fresh: this starts a new run from pretrained weights.
    """
    import orbax.checkpoint as ocp
    from ddt_jax import convert

    src = os.path.abspath(path)
    want_projector = "projector" in state.params
    projector = None
    if os.path.isdir(src) and os.path.exists(os.path.join(src, convert.CONVERTED_CONFIG)):
        # Restored straight into this run's shardings (without targets orbax would use the saving
        # topology, which fails on several processes). convert.save_converted wrote nnx.State trees.
        model, projector_module = nnx.eval_shape(lambda: build_modules(config, nnx.Rngs(0)))

        def read(name, module, abstract):
            target = nnx.state(module, nnx.Param)
            nnx.replace_by_pure_dict(target, abstract)
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(os.path.join(src, name), target).to_pure_dict()

        weights = ema = read("params", model, layout.abstract.params["model"])
        if want_projector and os.path.isdir(os.path.join(src, "repa_projector")):
            projector = read("repa_projector", projector_module, layout.abstract.params["projector"])
    elif os.path.isdir(src):   # another training run
        wanted = {"params": {"model": layout.abstract.params["model"]}, "ema_params": layout.abstract.ema_params}
        restored = checkpoint_lib.restore_params(src, wanted)
        weights, ema = restored["params"]["model"], restored["ema_params"]
        if want_projector:
            try:
                projector = checkpoint_lib.restore_params(
                    src, {"params": {"projector": layout.abstract.params["projector"]}})["params"]["projector"]
            except Exception as e:  # noqa: BLE001 - a run without REPA (or another width) has none to give
                logging.warning("init_from %s: no usable REPA projector (%s); it starts from scratch", src, e)
    elif os.path.isfile(src):   # an official checkpoint
        depth = config.model.num_encoder_blocks if config.model.arch == "ddt" else None
        try:
            raw = convert.load_ddt(src, depth, use_ema=False)
            ema_model = convert.load_ddt(src, depth, use_ema=True)
        except ValueError:   # a plain state dict: one copy serves as both
            raw = ema_model = convert.load_ddt(src, depth)
        weights = nnx.state(raw, nnx.Param).to_pure_dict()
        ema = nnx.state(ema_model, nnx.Param).to_pure_dict()
        if want_projector:
            module = convert.load_repa_projector(src)
            projector = None if module is None else nnx.state(module, nnx.Param).to_pure_dict()
    else:
        raise FileNotFoundError(f"init_from={path!r} is neither a run directory, a converted model directory "
                                "nor a checkpoint file")

    def place(tree, abstract, what):
        treedef = jax.tree.structure(abstract)
        if jax.tree.structure(tree) != treedef:
            raise ValueError(f"init_from={path!r}: its {what} have another structure than this config's model")
        leaves = []
        for a, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)):
            if tuple(a.shape) != ref.shape:
                raise ValueError(f"init_from={path!r}: {what} have shape {tuple(a.shape)} where this config "
                                 f"has {ref.shape}")
            if not isinstance(a, jax.Array):   # host weights from a torch/safetensors file
                a = np.asarray(a)
            leaves.append(jax.device_put(a.astype(ref.dtype), ref.sharding))
        return jax.tree.unflatten(treedef, leaves)

    params = dict(state.params)
    params["model"] = place(weights, layout.abstract.params["model"], "model weights")
    ema_params = place(ema, layout.abstract.ema_params, "EMA weights")
    if projector is not None:
        params["projector"] = place(projector, layout.abstract.params["projector"], "REPA projector")
    logging.info("initialised the model and EMA%s from %s", " and REPA projector" if projector is not None else "", path)
    return state.replace(params=params, ema_params=ema_params)


# ---------------------------------------------------------------------------------------------------
# Sample grids of the EMA model for the logs.

def make_sample_fn(config, layout: StateLayout, mesh):
    """Returns `sample(ema_params) -> uint8 (N, H, W, 3)` numpy images (on every process), or None."""
    from ddt_jax import sampler as sampler_lib
    from ddt_jax import convert

    n, m = config.logging.num_samples, config.model
    vae = vae_graphdef = vae_params = None
    if config.data.kind == "latent":
        if not config.vae.path:
            logging.warning("logging.sample_every > 0 but vae.path is empty: no sample grids for latent data")
            return None
        vae = convert.load_vae(config.vae.path)
        vae_graphdef, vae_params = nnx.split(vae)
        vae_params = jax.device_put(jax.tree.map(np.asarray, vae_params.to_pure_dict()), sharding.replicated(mesh))
    side = (m.image_size, m.image_width if m.image_width > 0 else m.image_size)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)   # the same noise for every grid
    noise = jax.random.normal(key, (n, *side, m.in_channels), jnp.float32)
    labels = jnp.asarray((np.arange(n) * max(1, m.num_classes // n)) % m.num_classes, jnp.int32)
    dp = sharding.data_parallel_size(mesh)
    batch_sh = sharding.batch_sharding(mesh, 4) if n % dp == 0 else sharding.replicated(mesh)
    noise = jax.device_put(noise, batch_sh)
    labels = jax.device_put(labels, sharding.batch_sharding(mesh, 1) if n % dp == 0 else sharding.replicated(mesh))

    def to_images(x, vae_params):
        if vae is not None:
            x = nnx.merge(vae_graphdef, vae_params).decode(x)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        return jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(jnp.uint8)

    to_images = jax.jit(to_images, out_shardings=sharding.replicated(mesh))
    sample_key = jax.random.fold_in(jax.random.key(config.seed), 3)   # for the SDE solvers

    def run(ema_params):
        with jax.set_mesh(mesh):
            # The sampler jits its own loop (compiled on the first grid, cached after).
            model = nnx.merge(layout.model_graphdef, ema_params)
            x = sampler_lib.sample(model, noise, labels, config.logging.sample, key=sample_key)
            images = to_images(x, vae_params)
        return np.asarray(multihost_utils.process_allgather(images, tiled=True))

    return run


def image_grid(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid, as square as N allows."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


# ---------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the run in `workdir` until config.num_train_steps or preemption."""
    from clu import metric_writers, periodic_actions

    workdir = os.path.abspath(workdir)
    validate_config(config)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)

    # ---- Mesh ---------------------------------------------------------------------------------------
    mesh = sharding.create_mesh(config.mesh)
    local_batch = sharding.check_batch_size(config.global_batch_size, mesh)
    logging.info("mesh %s over %d devices (%d processes); global batch %d, %d per process",
                 dict(mesh.shape), mesh.size, jax.process_count(), config.global_batch_size, local_batch)

    # ---- Data ---------------------------------------------------------------------------------------
    data_iter = pipeline.create_train_iterator(
        config.data, global_batch_size=config.global_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed)
    abstract_batch = batch_abstract(config, mesh)
    positions = example_positions(local_batch, mesh)

    # ---- Model, REPA projector, AdamW and EMA: shardings from the params' logical axes --------------
    tx, lr_schedule = make_optimizer(config.optim)
    layout = state_layout(config, mesh, tx)
    n_params = sum(x.size for x in jax.tree.leaves(layout.abstract.params["model"]))
    state_bytes = sharding.bytes_per_device(layout.abstract)
    logging.info("model: %s %s, %.1fM params; train state %.2f GiB per device",
                 config.model.arch, config.model.variant, n_params / 1e6, state_bytes / 2 ** 30)
    dinov2_graphdef, dinov2_params = load_dinov2(config, mesh)

    # ---- Resume, or start (from scratch or init_from) -----------------------------------------------
    ckpt = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        logging.info("resuming from the checkpoint at step %d in %s%s", latest, ckpt.directory,
                     f" (init_from={config.init_from!r} applies to fresh runs only)" if config.init_from else "")
        state = TrainState.from_dict(ckpt.restore(latest, layout.abstract.to_dict(), data_iter))
    else:
        state = init_train_state(config, layout, tx, jax.random.fold_in(jax.random.key(config.seed), 0))
        if config.init_from:
            state = restore_init_from(config, config.init_from, layout, state)
    step = int(jax.device_get(state.step))

    # ---- Train step: compiled once, ahead of time -------------------------------------------------
    train_step = make_train_step(config, layout, tx, lr_schedule, dinov2_graphdef)
    abstract_dinov2 = (None if dinov2_params is None else
                       jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                    dinov2_params))
    compiled_step = compile_step(train_step, layout, abstract_batch,
                                 jax.ShapeDtypeStruct(positions.shape, positions.dtype, sharding=positions.sharding),
                                 abstract_dinov2, mesh)
    flops_per_step = step_flops(config, abstract_batch,
                                dinov2_depth=0 if dinov2_params is None else len(dinov2_params["blocks"]))
    peak = flops_lib.peak_flops_per_device(jax.devices()[0], config.peak_tflops_per_device)
    logging.info("%.2f TFLOP per step (analytic); device %s, peak %s TFLOP/s",
                 flops_per_step / 1e12, jax.devices()[0].device_kind, "unknown" if peak is None else peak / 1e12)
    sample_fn = make_sample_fn(config, layout, mesh) if config.logging.sample_every > 0 else None

    # ---- Loop ---------------------------------------------------------------------------------------
    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                             every_steps=config.logging.log_every)
    guard = checkpoint_lib.PreemptionGuard()
    # Multi-process CPU (gloo) collectives deadlock when many steps are in flight: wait for each.
    sync_every_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
    pending: list[tuple[int, dict]] = []
    last_log_time, last_log_step = time.time(), step

    def check_finite():
        for s, m in pending:
            loss = float(jax.device_get(m["loss"]))
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {s}; stopping. Last good checkpoint: step "
                    f"{ckpt.latest_step()} in {ckpt.directory} (the run resumes from it when restarted)")

    def write_metrics():
        nonlocal pending, last_log_time, last_log_step
        check_finite()
        values = jax.device_get([m for _, m in pending])
        scalars = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
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
        # Start the loop together: a host that compiled from a cold cache can be minutes behind the
        # others, longer than a collective in the first step should wait.
        import orbax.checkpoint as ocp
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
            if sample_fn is not None and (step % config.logging.sample_every == 0 or done):
                with report.timed("sample"):
                    grid = image_grid(sample_fn(state.ema_params))
                if is_main:
                    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                    Image.fromarray(grid).save(os.path.join(workdir, "samples", f"step_{step:08d}.png"))
                writer.write_images(step, {"ema_samples": grid[None]})
            if done or preempted or ckpt.should_save(step):
                check_finite()   # never save a state that has already diverged
                with report.timed("checkpoint"):
                    if ckpt.save(step, state.to_dict(), data_iter, force=done or preempted):
                        logging.info("saving checkpoint at step %d", step)
            if preempted:
                logging.warning("preempted: saved step %d, stopping", step)
                break
    finally:
        guard.close()
        ckpt.close()   # waits for the last async save
        writer.flush()
    return state
