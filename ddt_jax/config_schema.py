"""The training config schema: every field, its default, and the checks a config must pass.

`default_config()` is the one place a field is declared; the recipes in configs/ start from it
and change what they need, and `validate_config` derives the allowed fields from it, so a field
cannot be added in one place and forgotten in another. The defaults are the paper's DDT-XL/2
22en6de ImageNet 256 recipe ("official" = MCG-NJU/DDT
`configs/repa_improved_ddt_xlen22de6_256.yaml` and the code it names; "paper" = arXiv 2504.05741).
The model, data and sampler sections are declared by the modules that read them
(`models.ddt.default_model_config`, `input_pipeline.pipeline.default_data_config`,
`sampler.default_sampler_config`).

One convention for "unset": None (an ml_collections placeholder, so the command line can still
set it: `--config.vae.path=/weights/sd-vae-ft-ema`). Counts and weights use 0 for "off"
(`logging.sample_every=0`, `repa.weight=0`); a mesh size of -1 means "the remaining devices".
"""
from __future__ import annotations

import math

import ml_collections
from etils import epath

from ddt_jax import files
from ddt_jax import flow
from ddt_jax import sampler as sampler_lib
from ddt_jax.models import ddt
from input_pipeline import pipeline

_placeholder = ml_collections.config_dict.placeholder


def default_config() -> ml_collections.ConfigDict:
    """Every field of a training config, with the paper's DDT-XL/2 256 values as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0                      # official: seed_everything(true) picks one at random; we fix it
    # Paper: 1.26 FID after 400 ImageNet epochs at batch 256 (1.28M images / 256 = 5005 steps per
    # epoch); the official max_steps (4M) is only a ceiling.
    c.num_train_steps = 2_000_000
    c.global_batch_size = 256       # paper (official: 16 per GPU x 16 GPUs)
    # None trains from scratch. Otherwise weights to start from (params, EMA and, if present, the
    # REPA projector; fresh optimizer, step 0): a workdir of another run, a converted directory
    # (`python -m ddt_jax.convert ddt ...`) or an official .ckpt/.safetensors. A run that already
    # has checkpoints in its own workdir resumes from those instead.
    c.init_from = _placeholder(str)
    # Peak bf16 TFLOP/s of one device for the MFU log; None = look the device kind up (flops.py).
    c.peak_tflops_per_device = _placeholder(float)
    # Persistent XLA compilation cache, so a restarted or resumed run does not recompile (the
    # XL/2 step takes minutes to compile): None = <workdir>/compilation_cache (local or gs://),
    # "" = off. A cache directory set outside (JAX_COMPILATION_CACHE_DIR) is kept.
    c.compilation_cache_dir = _placeholder(str)

    # ---- model: DDT-XL/2 22en6de -----------------------------------------------------------------
    c.model = ddt.default_model_config()
    c.model.arch = "ddt"            # official yaml: decoupled_improved_dit.DDT
    c.model.variant = "XL/2"        # official: hidden 1152, 28 blocks, 16 heads, patch 2
    c.model.num_encoder_blocks = 22  # official: num_encoder_blocks 22 (22en6de)
    c.model.in_channels = 4         # official: SD-VAE latents
    c.model.image_size = 32         # official: latent_shape [4, 32, 32]
    c.model.num_classes = 1000      # official: ImageNet
    c.model.dtype = "bfloat16"      # official: precision bf16-mixed (params stay f32)

    # ---- data: cached SD-VAE moments + the raw image for DINOv2 ----------------------------------
    c.data = pipeline.default_data_config()
    c.data.source = "array_record"
    c.data.kind = "latent"          # official: LatentVAE(precompute=true), latents cached per image
    c.data.image_size = 256         # official: train_image_size 256 (center crop, no flip)
    c.data.channels = 4
    c.data.num_classes = 1000
    c.data.with_image = True        # REPA needs the [0, 1] image (official `raw_images`)

    # ---- vae: latents are sampled from the cached posterior every step ---------------------------
    c.vae = ml_collections.ConfigDict()
    c.vae.scaling_factor = 0.18215  # official: sd-vae-ft-ema config.scaling_factor
    # SD-VAE (diffusers folder or one weight file) used only to decode the sample grids of the
    # logs; None logs no images for latent data.
    c.vae.path = _placeholder(str)

    # ---- optimizer -------------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4               # official: AdamW lr 1e-4, constant (no lr_scheduler)
    c.optim.b1 = 0.9                # official: betas [0.9, 0.95]
    c.optim.b2 = 0.95               # official: the DiT-baseline yamls keep torch's default 0.999
    c.optim.eps = 1e-8              # torch AdamW default (optax's too)
    c.optim.weight_decay = 0.0      # official: weight_decay 0.0
    c.optim.warmup_steps = 0        # official: none
    c.optim.grad_clip_norm = 0.0    # official: none (Lightning gradient_clip_val unset); > 0 clips
    # Microbatches per step: the global batch is split into this many equal parts whose gradients
    # are averaged before one optimizer step (the same update as the whole batch, to rounding),
    # so a batch that does not fit in memory still trains; 1 = off.
    c.optim.grad_accum_steps = 1

    # ---- EMA -------------------------------------------------------------------------------------
    c.ema = ml_collections.ConfigDict()
    # official SimpleEMA: decay 0.9999 after every optimizer step from step 0, starting from a
    # copy of the initial weights
    c.ema.decay = 0.9999

    # ---- flow matching ---------------------------------------------------------------------------
    c.flow = ml_collections.ConfigDict()
    c.flow.t_sampler = "lognormal"  # official: lognorm_t true, t = sigmoid(N(0, 1)); or "uniform"
    c.flow.t_mean = 0.0             # official: randn(...).sigmoid()
    c.flow.t_std = 1.0
    c.flow.label_drop_prob = 0.1    # official BaseTrainer: null_condition_p 0.1 -> null class 1000

    # ---- REPA ------------------------------------------------------------------------------------
    c.repa = ml_collections.ConfigDict()
    c.repa.weight = 0.5             # official: feat_loss_weight 0.5; 0 turns REPA (and DINOv2) off
    c.repa.align_layer = 8          # official: align_layer 8 (1-based encoder block)
    # official: proj_hidden_dim = hidden (1152); None = the model's hidden size
    c.repa.projector_dim = _placeholder(int)
    c.repa.feature_dim = 768        # official: proj_encoder_dim 768 = DINOv2-B/14 width
    # official: torch.hub dinov2_vitb14; here a local dinov2_vitb14_pretrain.pth (or .safetensors)
    c.repa.dinov2_path = _placeholder(str)
    c.repa.dinov2_dtype = "bfloat16"   # official: runs under bf16-mixed autocast
    # None: from the width (B/14: 12); only sizes that were never published need it
    c.repa.dinov2_num_heads = _placeholder(int)

    # ---- mesh and logical-axis rules -------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    # FSDP: XL's f32 params + Adam + EMA are 10.8 GB, too much to replicate on 16 GB TPU chips;
    # on one device it is plain training. data = fsdp = -1 splits the devices between them:
    # fsdp = the largest divisor of the device count that divides every weight width it shards
    # (XL's embed 1152 = 2^7 * 9: all of 8-128 chips, 128 of 256 with data = 2), so no weight
    # falls back to replication. One -1 = the rest of the devices. The batch is always split over
    # data x fsdp (sharding.BATCH_AXES).
    c.mesh.data = -1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # Logical axis (ddt_jax/models/layers.py) -> mesh axes. Weights' `embed` dim is split over
    # fsdp, the wide dims over tensor; a dim that does not divide evenly stays replicated.
    c.mesh.rules = (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("qkv", "tensor"),
        ("heads", "tensor"),
        ("feature", "tensor"),      # REPA projector output (768)
        ("classes", None),          # 1001 rows: not divisible by anything useful
        ("patch", None),            # C*p*p = 16
        ("freq", None),             # 256 timestep channels
        ("norm", None),
    )

    # ---- checkpoints -----------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    # official: every 10k steps; we save twice as often because async saves cost a few seconds and
    # a hard kill (no SIGTERM) loses at most this many steps. SIGTERM always saves the current step.
    c.checkpoint.every_steps = 5_000
    # latest complete checkpoints kept (10.8 GB each for XL); None keeps them all
    c.checkpoint.keep = 3
    # milestones kept forever (official keeps all: save_top_k -1); 0 = none
    c.checkpoint.keep_every_steps = 100_000
    c.checkpoint.async_save = True

    # ---- logging and sample grids ----------------------------------------------------------------
    c.logging = ml_collections.ConfigDict()
    c.logging.log_every = 50        # official: log_every_n_steps 50
    c.logging.sample_every = 25_000  # EMA sample grid (PNG + TensorBoard); 0 = never
    # images per grid (a multiple of the data-parallel size is fastest)
    c.logging.num_samples = 16
    c.logging.sample = sampler_lib.default_sampler_config()
    # FID (and IS) of fid_num_samples EMA samples drawn with logging.sample, every fid_every steps
    # and at the end; logged as fid_<N> / inception_score_<N>, history and best in fid.json.
    # 0 = never. 5,000 samples at the XL/2 256 settings cost ~1/10 of a 50K dump each time.
    c.logging.fid_every = 0
    c.logging.fid_num_samples = 5_000
    c.logging.fid_batch_size = _placeholder(int)   # None: global_batch_size
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its converted .safetensors)
    c.logging.fid_inception = _placeholder(str)
    # an ADM reference batch (mu/sigma, or arr_0 to compute them from), e.g.
    # VIRTUAL_imagenet256_labeled.npz, or `python evaluate.py DATA --make_ref=REF.npz`
    c.logging.fid_reference = _placeholder(str)
    return c


# --------------------------------------------------------------------------------------------------
# Checking: a misspelt or missing field, or an inconsistent pair, fails before any work.

def _check_fields(path: str, config, schema) -> None:
    """Recursively: the same field names as the schema in every section (`path` "" = the top)."""
    where = f"section '{path}'" if path else "top level"
    have, want = set(config.keys()), set(schema.keys())
    unknown, missing = sorted(have - want), sorted(want - have)
    if unknown or missing:
        raise ValueError(f"config {where}: " + "; ".join(
            ([f"unknown fields {unknown}"] if unknown else [])
            + ([f"missing fields {missing}"] if missing else []))
            + f". Expected exactly {sorted(want)}")
    for name in sorted(want):
        if isinstance(schema[name], ml_collections.ConfigDict):
            field = f"{path}.{name}" if path else name
            if not isinstance(config[name], ml_collections.ConfigDict):
                raise ValueError(f"config field {field!r} must be a section (ConfigDict), got "
                                 f"{type(config[name]).__name__}")
            _check_fields(field, config[name], schema[name])


def require(ok: bool, message: str) -> None:
    """A config check: ValueError("config: <message>") unless `ok`."""
    if not ok:
        raise ValueError(f"config: {message}")


def validate_config(config: ml_collections.ConfigDict, *, check_files: bool = True) -> None:
    """Raises ValueError (FileNotFoundError for weights) naming the field for a config the trainer
    cannot run as intended.

    Args:
      config: a training config (`default_config()` and overrides).
      check_files: also require the weight files the run reads (DINOv2); False for compile-only.
    """
    _check_fields("", config, default_config())
    require(config.num_train_steps > 0,
            f"num_train_steps must be positive, got {config.num_train_steps}")
    require(config.global_batch_size > 0,
            f"global_batch_size must be positive, got {config.global_batch_size}")
    require(math.isfinite(config.optim.lr) and config.optim.lr > 0,
            f"optim.lr must be positive and finite, got {config.optim.lr}")
    require(config.optim.grad_accum_steps >= 1 and
            config.global_batch_size % config.optim.grad_accum_steps == 0,
            f"optim.grad_accum_steps={config.optim.grad_accum_steps} must be >= 1 and divide "
            f"global_batch_size={config.global_batch_size} (1 = no accumulation)")
    require(config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    require(config.optim.grad_clip_norm >= 0,
            "optim.grad_clip_norm must be >= 0 (0 = no clipping)")
    require(0.0 <= config.ema.decay < 1.0, f"ema.decay must be in [0, 1), got {config.ema.decay}")
    require(config.flow.t_sampler in flow.T_SAMPLERS,
            f"flow.t_sampler must be one of {flow.T_SAMPLERS}, got {config.flow.t_sampler!r}")
    require(0.0 <= config.flow.label_drop_prob < 1.0,
            f"flow.label_drop_prob must be in [0, 1), got {config.flow.label_drop_prob}")
    require(config.logging.log_every > 0, "logging.log_every must be positive")
    require(config.logging.sample_every >= 0, "logging.sample_every must be >= 0 (0 = never)")
    _check_fid_fields(config, check_files)
    require(config.checkpoint.every_steps > 0,
            f"checkpoint.every_steps must be positive, got {config.checkpoint.every_steps}")
    require(config.checkpoint.keep is None or config.checkpoint.keep > 0,
            f"checkpoint.keep must be positive, or None to keep every checkpoint; got "
            f"{config.checkpoint.keep}")
    require(config.checkpoint.keep_every_steps >= 0,
            "checkpoint.keep_every_steps must be >= 0 (0 = no milestones)")
    require(config.repa.weight >= 0, f"repa.weight must be >= 0, got {config.repa.weight}")
    require(config.repa.dinov2_dtype in ddt.DTYPES,
            f"repa.dinov2_dtype must be one of {sorted(ddt.DTYPES)}, got "
            f"{config.repa.dinov2_dtype!r}")
    for name in ("projector_dim", "dinov2_num_heads"):
        value = config.repa[name]
        require(value is None or value > 0,
                f"repa.{name}={value} must be positive, or None (unset) for the default")
    sampler_lib.read_config(config.logging.sample)   # raises naming the sampler field

    # Model and data must describe the same examples.
    m, d = config.model, config.data
    kw = ddt.model_kwargs(m)   # raises on a bad variant / arch / dtype / size
    require(m.in_channels == d.channels,
            f"model.in_channels={m.in_channels} but data.channels={d.channels}")
    require(m.num_classes == d.num_classes,
            f"model.num_classes={m.num_classes} but data.num_classes={d.num_classes}")
    side = d.image_size // d.latent_downsample if d.kind == "latent" else d.image_size
    require(m.image_size == side and m.image_width in (None, side),
            f"model.image_size={m.image_size} but data.kind={d.kind!r} at "
            f"data.image_size={d.image_size} gives {side}x{side} model inputs")
    require(not d.flips or (d.source == "array_record" and d.kind == "latent"),
            f"data.flips picks between the cached moments of a crop and of its mirror: it needs "
            f"data.source='array_record' and data.kind='latent' (got {d.source!r}, {d.kind!r})")

    if config.repa.weight > 0:
        depth = kw.get("num_encoder_blocks", kw["num_blocks"])
        require(1 <= config.repa.align_layer <= depth,
                f"repa.align_layer={config.repa.align_layer} must be in [1, {depth}] (1-based "
                f"{'encoder ' if m.arch == 'ddt' else ''}block)")
        require(d.with_image, "repa.weight > 0 needs the raw images: set data.with_image=True "
                "(or repa.weight=0 to train without REPA)")
        if check_files:
            check_dinov2_path(config)


def _check_fid_fields(config: ml_collections.ConfigDict, check_files: bool) -> None:
    lg = config.logging
    require(lg.fid_every >= 0, "logging.fid_every must be >= 0 (0 = never)")
    if lg.fid_every == 0:
        return
    require(lg.fid_num_samples >= 2, "logging.fid_num_samples must be >= 2 (FID needs a "
            f"covariance; 2,048+ for a non-singular one), got {lg.fid_num_samples}")
    require(lg.fid_batch_size is None or lg.fid_batch_size > 0,
            f"logging.fid_batch_size={lg.fid_batch_size} must be positive, or None for "
            "global_batch_size")
    for name, what in (("fid_inception", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                        "(from its GitHub releases; `python -m ddt_jax.convert inception` makes "
                        "a .safetensors of it)"),
                       ("fid_reference", "an ADM reference batch such as "
                        "VIRTUAL_imagenet256_labeled.npz, or `python evaluate.py DATA "
                        "--make_ref=REF.npz`")):
        path = lg[name]
        require(bool(path), f"logging.fid_every={lg.fid_every} needs logging.{name}: {what}")
        if check_files and not epath.Path(path).exists():
            raise FileNotFoundError(f"logging.{name}={path!r} does not exist; it should be "
                                    f"{what}. Nothing is downloaded at run time")


def check_dinov2_path(config: ml_collections.ConfigDict) -> None:
    """Raises FileNotFoundError with the fix when REPA is on and its DINOv2 weights are missing."""
    path = config.repa.dinov2_path
    if not path or not files.as_path(path).exists():
        raise FileNotFoundError(
            f"repa.dinov2_path={path!r} does not exist, and repa.weight={config.repa.weight} needs "
            "DINOv2-B/14 weights. Download dinov2_vitb14_pretrain.pth (facebookresearch/dinov2) "
            "once and pass --config.repa.dinov2_path=/path/to/it; nothing is downloaded at run "
            "time. Or set --config.repa.weight=0 to train without REPA.")
