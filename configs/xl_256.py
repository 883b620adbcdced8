"""DDT-XL/2 (22 encoder + 6 decoder blocks) on ImageNet 256x256 latents: the paper's recipe.

    python train.py --config=configs/xl_256.py --workdir=/ckpt/ddt_xl_256 \
        --config.data.path=/data/imagenet256_latents --config.repa.dinov2_path=/weights/dinov2_vitb14_pretrain.pth

    python train.py --config=configs/xl_256.py:dit ...    # the improved-DiT baseline of the paper

Every default says where it comes from. "official" = MCG-NJU/DDT
`configs/repa_improved_ddt_xlen22de6_256.yaml` and the code it names
(`stateful_flow_matching/training_repa.py`, `base/training.py`, `callbacks/simple_ema.py`);
"paper" = arXiv 2504.05741. Any field can be overridden: `--config.optim.lr=2e-4`; a misspelt field
is an error.
"""
import ml_collections

from ddt_jax import sampler as sampler_lib
from ddt_jax.models import ddt
from input_pipeline import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "" for DDT, "dit" for the improved-DiT baseline (same recipe, no encoder/decoder split)."""
    arg = arg or ""
    if arg not in ("", "ddt", "dit"):
        raise ValueError(f"config argument must be '', 'ddt' or 'dit', got {arg!r}")
    c = ml_collections.ConfigDict()

    c.seed = 0                      # official: seed_everything(true) picks one at random; we fix it
    # Paper: 1.26 FID after 400 ImageNet epochs at batch 256 (1.28M images / 256 = 5005 steps per
    # epoch); the official max_steps (4M) is only a ceiling.
    c.num_train_steps = 2_000_000
    c.global_batch_size = 256       # paper (official: 16 per GPU x 16 GPUs)
    # "" trains from scratch. Otherwise weights to start from (params, EMA and, if present, the REPA
    # projector; fresh optimizer, step 0): a workdir of another run, a converted directory
    # (`python -m ddt_jax.convert ddt ...`) or an official .ckpt/.safetensors. A run that already has
    # checkpoints in its own workdir resumes from those instead.
    c.init_from = ""
    # Peak bf16 TFLOP/s of one device for the MFU log; 0 = look the device kind up (ddt_jax/flops.py).
    c.peak_tflops_per_device = 0.0

    # ---- model: DDT-XL/2 22en6de --------------------------------------------------------------------
    c.model = ddt.default_model_config()
    c.model.arch = "dit" if arg == "dit" else "ddt"  # official yaml: decoupled_improved_dit.DDT
    c.model.variant = "XL/2"                         # official: hidden 1152, 28 blocks, 16 heads, patch 2
    c.model.num_encoder_blocks = 22                  # official: num_encoder_blocks 22 (22en6de)
    c.model.in_channels = 4                          # official: SD-VAE latents
    c.model.image_size = 32                          # official: latent_shape [4, 32, 32]
    c.model.num_classes = 1000                       # official: ImageNet
    c.model.dtype = "bfloat16"                       # official: precision bf16-mixed (params stay f32)

    # ---- data: cached SD-VAE moments + the raw image for DINOv2 ---------------------------------------
    c.data = pipeline.default_data_config()
    c.data.source = "array_record"
    c.data.path = ""                # set on the command line: a directory made by the latent-caching tool
    c.data.kind = "latent"          # official: LatentVAE(precompute=true), latents cached per image
    c.data.image_size = 256         # official: train_image_size 256 (center crop, no flip)
    c.data.channels = 4
    c.data.num_classes = 1000
    c.data.with_image = True        # REPA needs the [0, 1] image (official `raw_images`)

    # ---- vae: latents are sampled from the cached posterior every step -------------------------------
    c.vae = ml_collections.ConfigDict()
    c.vae.scaling_factor = 0.18215  # official: sd-vae-ft-ema config.scaling_factor
    # Converted SD-VAE (diffusers folder or one weight file) used only to decode sample grids for the
    # logs; "" logs no images for latent data.
    c.vae.path = ""

    # ---- optimizer ----------------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4               # official: AdamW lr 1e-4, constant (no lr_scheduler)
    c.optim.b1 = 0.9                # official: betas [0.9, 0.95]
    # official: betas [0.9, 0.95] for DDT; the DiT-baseline yamls keep torch's default 0.999
    c.optim.b2 = 0.999 if arg == "dit" else 0.95
    c.optim.eps = 1e-8              # torch AdamW default (optax's too)
    c.optim.weight_decay = 0.0      # official: weight_decay 0.0
    c.optim.warmup_steps = 0        # official: none
    c.optim.grad_clip_norm = 0.0    # official: none (Lightning gradient_clip_val unset); > 0 clips

    # ---- EMA ----------------------------------------------------------------------------------------
    c.ema = ml_collections.ConfigDict()
    # official SimpleEMA: decay 0.9999 after every optimizer step from step 0, starting from a copy
    # of the initial weights
    c.ema.decay = 0.9999

    # ---- flow matching ------------------------------------------------------------------------------
    c.flow = ml_collections.ConfigDict()
    c.flow.t_sampler = "lognormal"  # official: lognorm_t true, t = sigmoid(N(0, 1)); "uniform" otherwise
    c.flow.t_mean = 0.0             # official: randn(...).sigmoid()
    c.flow.t_std = 1.0
    c.flow.label_drop_prob = 0.1    # official BaseTrainer: null_condition_p 0.1 -> null class 1000

    # ---- REPA ---------------------------------------------------------------------------------------
    c.repa = ml_collections.ConfigDict()
    c.repa.weight = 0.5             # official: feat_loss_weight 0.5; 0 turns REPA (and DINOv2) off
    c.repa.align_layer = 8          # official: align_layer 8 (1-based encoder block)
    c.repa.projector_dim = -1       # official: proj_hidden_dim = hidden (1152); -1 = model hidden size
    c.repa.feature_dim = 768        # official: proj_encoder_dim 768 = DINOv2-B/14 width
    # official: torch.hub dinov2_vitb14; here a local dinov2_vitb14_pretrain.pth (or .safetensors)
    c.repa.dinov2_path = ""
    c.repa.dinov2_dtype = "bfloat16"  # official: runs under bf16-mixed autocast
    c.repa.dinov2_num_heads = -1    # -1: from the width (B/14: 12); only non-published sizes need it

    # ---- mesh and logical-axis rules ----------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    # FSDP over every device: XL's f32 params + Adam + EMA are 10.8 GB, too much to replicate on
    # 16 GB TPU chips; on one device it is plain training. Batch is split over data x fsdp.
    c.mesh.data = 1
    c.mesh.fsdp = -1                # -1 = all remaining devices
    c.mesh.tensor = 1
    # Logical axis (ddt_jax/models/layers.py) -> mesh axes. Weights' `embed` dim is split over fsdp, the
    # wide dims over tensor; a dim that does not divide evenly stays replicated.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
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

    # ---- checkpoints --------------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    # official: every 10k steps; we save twice as often because async saves cost a few seconds and a
    # hard kill (no SIGTERM) loses at most this many steps. SIGTERM always saves the current step.
    c.checkpoint.every_steps = 5_000
    c.checkpoint.keep = 3           # latest complete checkpoints kept (10.8 GB each for XL)
    c.checkpoint.keep_every_steps = 100_000  # milestones kept forever (official keeps all: save_top_k -1)
    c.checkpoint.async_save = True

    # ---- logging and sample grids -------------------------------------------------------------------
    c.logging = ml_collections.ConfigDict()
    c.logging.log_every = 50        # official: log_every_n_steps 50
    c.logging.sample_every = 25_000  # EMA sample grid (PNG + TensorBoard); 0 = never
    c.logging.num_samples = 16      # images per grid (a multiple of the data-parallel size is fastest)
    c.logging.sample = sampler_lib.default_sampler_config()
    return c
