"""`python -m ddt_jax.convert ddt|dinov2|vae|inception ...`: official weights -> checked files.

Each subcommand converts once, offline, from a file already on disk (nothing is downloaded), and
first checks that every tensor fits our model, so what it writes always loads.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from ddt_jax import weights
from ddt_jax.convert import ddt as ddt_convert
from ddt_jax.convert import dinov2 as dinov2_convert
from ddt_jax.convert import inception as inception_convert
from ddt_jax.convert import vae as vae_convert
from ddt_jax.convert.state_dict import read_state_dict
from ddt_jax.models import ddt


def _run_ddt(args: argparse.Namespace) -> None:
    state_dict = read_state_dict(args.input)
    model_weights, _ = ddt_convert.split_ddt_checkpoint(state_dict, use_ema=not args.raw)
    config = ddt_convert.infer_ddt_config(
        model_weights, num_encoder_blocks=args.num_encoder_blocks, in_channels=args.in_channels,
        patch_size=args.patch_size, image_size=args.image_size, name_hint=str(args.input))
    model = ddt_convert.ddt_from_state_dict(model_weights, config)
    projector = ddt_convert.repa_projector_from_state_dict(state_dict)
    out = weights.save_converted(model, args.output, config, repa_projector=projector)
    split = (f" {config.num_encoder_blocks}en{config.num_blocks - config.num_encoder_blocks}de"
             if config.arch == "ddt" else "")
    print(f"converted {args.input} ({'raw' if args.raw else 'EMA'} weights, "
          f"{config.arch.upper()} {config.variant}{split}, {ddt.count_params(model):,} params"
          f"{', + REPA projector' if projector else ''}) -> {out}")


def _run_dinov2(args: argparse.Namespace) -> None:
    out = dinov2_convert.convert_dinov2(args.input, args.output, num_heads=args.num_heads)
    print(f"converted {args.input} -> {out}")


def _run_inception(args: argparse.Namespace) -> None:
    out = inception_convert.convert_inception(args.input, args.output)
    print(f"converted {args.input} -> {out}")


def _run_vae(args: argparse.Namespace) -> None:
    config = json.loads(pathlib.Path(args.config).read_text()) if args.config else None
    out = vae_convert.convert_vae(args.input, args.output, config=config)
    print(f"converted {args.input} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddt_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ddt", help="DDT / DiT weights -> converted directory "
                       "(DIR/model_config.json + DIR/params [+ DIR/repa_projector])")
    p.add_argument("--input", required=True, help=".ckpt (Lightning), .pt/.pth or .safetensors")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-encoder-blocks", type=int, default=None,
                   help="encoder depth (22 for DDT-XL/2 22en6de); parsed from names like "
                   "'22en6de' if omitted")
    p.add_argument("--raw", action="store_true",
                   help="take the raw `denoiser.` weights instead of the EMA copy")
    p.add_argument("--in-channels", type=int, default=None,
                   help="latent channels if not 4 (shapes tell only C*p*p)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch size, when the channel count is unknown")
    p.add_argument("--image-size", type=int, default=None,
                   help="latent side to sample at (64 for 512px); default from a name like "
                   "'R512', else 32")
    p.set_defaults(run=_run_ddt)

    p = sub.add_parser("dinov2", help="DINOv2 .pth -> checked .safetensors (same keys, no torch "
                       "needed to load)")
    p.add_argument("--input", required=True, help="dinov2_vit*14_pretrain.pth (or .safetensors)")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads, for a width not in DINOV2_VARIANTS")
    p.set_defaults(run=_run_dinov2)

    p = sub.add_parser("inception", help="ADM's FID Inception-v3 (pytorch-fid .pth) -> checked "
                       ".safetensors (same keys, no torch needed to load)")
    p.add_argument("--input", required=True,
                   help="pt_inception-2015-12-05-6726825d.pth (or .safetensors)")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.set_defaults(run=_run_inception)

    p = sub.add_parser("vae", help="SD-VAE (diffusers folder or file, LDM file) -> checked "
                       "diffusers folder (config.json + float32 safetensors)")
    p.add_argument("--input", required=True,
                   help="a diffusers VAE (or pipeline) folder, or one weight file with diffusers "
                   "or original LDM keys")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--config", default=None,
                   help="a diffusers config.json, for a single weight file that is not the SD-VAE "
                   "architecture (norm groups and scaling_factor are not in the shapes)")
    p.set_defaults(run=_run_vae)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` (default: the command line) and runs the subcommand."""
    args = build_parser().parse_args(argv)
    args.run(args)
