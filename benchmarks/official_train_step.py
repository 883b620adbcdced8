"""The official PyTorch DDT's train step on the shapes of ours: the baseline ours is compared to.

    python benchmarks/official_train_step.py --official_repo=/tmp/DDT              # S/2, CPU
    python benchmarks/official_train_step.py --official_repo=/tmp/DDT --variant=XL/2 \
        --batch_size=64 --dtype=bfloat16 --compile                                   # on a GPU
    python benchmarks/train_step.py --variants=XL/2 --batch_size=64 --official_repo=/tmp/DDT

--official_repo is a checkout of github.com/MCG-NJU/DDT (the user's; nothing of it is part of this
project). Its src/models/denoiser/decoupled_improved_dit.py DDT is built at the sizes ddt_jax
gives --variant (hidden size, depth, heads, encoder blocks, patch; the same function our trainer
uses), and the script times what the official recipe runs per step with REPA off: the model on
x_t = t x + (1 - t) noise at random t, the MSE to the velocity x - noise, backward, AdamW (lr 1e-4,
betas (0.9, 0.95), weight decay 0: the official configs') and the EMA update as its SimpleEMA
callback does it (foreach mul + add). Parts timed: forward (no grad), value_and_grad (forward,
loss, backward) and step (all of it).

--dtype=bfloat16 is torch.autocast(bfloat16) over float32 parameters, i.e. Lightning's
`bf16-mixed`, the official configs' precision; float32 is plain float32. --compile wraps the model
in torch.compile, as the official lightning_model.py does when its `compile` flag is set (its
first steps compile; --warmup should cover them). Times are medians of --steps after --warmup,
each ended by a device synchronisation; peak memory is torch.cuda.max_memory_allocated.

The result prints as one line `OFFICIAL_JSON {...}` (and to --json), which train_step.py reads when
it runs this script in a subprocess before JAX takes the accelerator (JAX_PLATFORMS=cpu there, so
this process never claims GPU memory for JAX).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pathlib
import statistics
import time

from ddt_jax import config_schema
from ddt_jax.models import ddt

PARTS = ("forward", "value_and_grad", "step")
MODEL_FILE = pathlib.Path("src") / "models" / "denoiser" / "decoupled_improved_dit.py"
JSON_PREFIX = "OFFICIAL_JSON "
GIB = 2.0 ** 30


SIZE_FLAGS = ("hidden_size", "num_heads", "num_blocks", "num_encoder_blocks")


def model_sizes(variant: str, image_size: int, **sizes) -> dict:
    """Our model kwargs for `variant` at `image_size` pixels (SD-VAE latents: / 8).

    Args:
      variant: SIZE/PATCH ("XL/2").
      image_size: pixels.
      **sizes: SIZE_FLAGS overriding the variant's (None: the variant's; num_encoder_blocks
        None is the paper's split for the size).
    """
    c = config_schema.default_config().model
    c.variant = variant
    c.image_size = image_size // 8
    c.num_encoder_blocks = None
    for name, value in sizes.items():
        if name not in SIZE_FLAGS:
            raise ValueError(f"unknown model size {name!r}: one of {SIZE_FLAGS}")
        if value is not None:
            c[name] = value
    kw = ddt.model_kwargs(c)
    kw["latent_size"] = c.image_size
    return kw


def load_official_module(repo: str):
    """The official model file as a module, or a clear error when `repo` is not a checkout."""
    path = pathlib.Path(repo) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--official_repo={repo!r} has no {MODEL_FILE}: pass a checkout "
                                "of github.com/MCG-NJU/DDT")
    spec = importlib.util.spec_from_file_location("official_ddt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OfficialStep:
    """The official DDT, its AdamW and EMA, and one random batch on `device`.

    Args:
      repo: a checkout of MCG-NJU/DDT.
      variant, image_size, batch_size: our benchmark's shapes ("XL/2", pixels, global batch).
      device: a torch device string ("cpu", "cuda").
      dtype: "float32", or "bfloat16" for autocast over float32 parameters.
      compile: wrap the model in torch.compile.
      threads: torch's intra-op threads (None: torch's default).
      sizes: model_sizes overrides (hidden_size, ...).
    """

    def __init__(self, repo: str, variant: str, image_size: int, batch_size: int, *,
                 device: str = "cpu", dtype: str = "float32", compile: bool = False,
                 threads: int | None = None, sizes: dict | None = None):
        import torch   # optional: only for the comparison
        if threads:
            torch.set_num_threads(threads)
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        module = load_official_module(repo)
        kw = model_sizes(variant, image_size, **(sizes or {}))
        torch.manual_seed(0)
        self.torch, self.device, self.dtype = torch, torch.device(device), dtype
        model = module.DDT(in_channels=kw["in_channels"], num_groups=kw["num_heads"],
                           hidden_size=kw["hidden_size"], num_blocks=kw["num_blocks"],
                           num_encoder_blocks=kw["num_encoder_blocks"],
                           patch_size=kw["patch_size"], num_classes=kw["num_classes"])
        self.model = model.to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.net_params = list(self.model.parameters())
        self.ema_params = list(self.ema.parameters())
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                     weight_decay=0.0)
        side = kw["latent_size"]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, kw["in_channels"], side, side, generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.rand(batch_size, generator=gen)
        y = torch.randint(0, kw["num_classes"], (batch_size,), generator=gen)
        self.x, self.noise, self.t, self.y = (a.to(self.device) for a in (x, noise, t, y))
        self.last_loss = None

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16,
                                   enabled=self.dtype == "bfloat16")

    def _loss(self):
        t = self.t[:, None, None, None]
        x_t = t * self.x + (1 - t) * self.noise
        with self._autocast():
            v, _ = self.forward(x_t, self.t, self.y)
        return ((v.float() - (self.x - self.noise)) ** 2).mean()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run(self, part: str) -> None:
        """Runs one `part` (one of PARTS) and waits for the device."""
        torch = self.torch
        if part == "forward":
            with torch.no_grad():
                self._loss()
        else:
            loss = self._loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if part == "step":
                self.opt.step()
                with torch.no_grad():
                    torch._foreach_mul_(self.ema_params, 0.9999)
                    torch._foreach_add_(self.ema_params, self.net_params, alpha=1e-4)
                self.last_loss = loss.detach()
        self.synchronize()


def measure(args) -> dict:
    """Builds OfficialStep from `args` and times its parts; the result as a JSON-ready dict."""
    step = OfficialStep(args.official_repo, args.variant, args.image_size, args.batch_size,
                        device=args.device, dtype=args.dtype, compile=args.compile,
                        threads=args.threads, sizes=sizes_from(args))
    torch = step.torch
    t0 = time.perf_counter()
    for part in PARTS:            # the first calls (and torch.compile's traces) are not timed
        for _ in range(args.warmup):
            step.run(part)
    warmup_s = time.perf_counter() - t0
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    times = {part: [] for part in PARTS}
    for _ in range(args.steps):
        for part in PARTS:
            t0 = time.perf_counter()
            step.run(part)
            times[part].append(time.perf_counter() - t0)
    med = {part: statistics.median(v) for part, v in times.items()}
    peak = (torch.cuda.max_memory_allocated(step.device) / GIB
            if step.device.type == "cuda" else None)
    name = "official torch " + ("compile" if args.compile else "eager")
    return dict(
        name=name, model=args.variant, batch_size=args.batch_size, dtype=args.dtype,
        device=(torch.cuda.get_device_name(step.device) if step.device.type == "cuda"
                else "cpu"),
        torch=torch.__version__, num_params=step.num_params, warmup_s=warmup_s,
        forward_s=med["forward"], value_and_grad_s=med["value_and_grad"], step_s=med["step"],
        images_per_s=args.batch_size / med["step"], peak_gib=peak,
        loss=float(step.last_loss))


def sizes_from(args) -> dict:
    return {name: getattr(args, name) for name in SIZE_FLAGS}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_repo", required=True, help="a checkout of MCG-NJU/DDT")
    parser.add_argument("--variant", default="S/2")
    for name in SIZE_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None,
                            help="override the variant's (None: the variant's)")
    parser.add_argument("--image_size", type=int, default=256, help="pixels (latents: / 8)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                        help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each part")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    result = measure(args)
    print(JSON_PREFIX + json.dumps(result), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
