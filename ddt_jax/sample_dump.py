"""Sample dumps for FID: N class-conditional samples -> the ADM evaluator's `samples.npz` + a grid.

A 50K dump is hours of accelerator time, so it is built to survive anything: batch i depends only
on (seed, i), every finished batch is a part file written atomically, and a restart recomputes only
the missing parts and assembles the identical file. Every process samples its share of a batch; the
rows are gathered to process 0, which alone reads and writes the output (local or gs://: the hosts
of a TPU pod share no disk) and streams the parts into samples.npz (a 50K x 512px dump is 39 GB:
never held in memory). `manifest.json` records every setting that changes the samples, and a
restart with other settings is refused. The README's "Sampling for FID" section has the usage.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from PIL import Image

from ddt_jax import checkpoint as checkpoint_lib
from ddt_jax import console
from ddt_jax import convert
from ddt_jax import files
from ddt_jax import rng
from ddt_jax import sampler as sampler_lib
from ddt_jax import sharding
from ddt_jax import weights
from ddt_jax.evaluation import images as images_lib
from ddt_jax.models import ddt

SAMPLES_FILE = "samples.npz"
GRID_FILE = "samples.png"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
MANIFEST_VERSION = 1
GRID_SAMPLES = 64
GRID_MAX_CLASS_ROWS = 32        # up to this many classes, the grid shows one row per class


@dataclasses.dataclass
class DumpArgs:
    """Everything sample.py takes besides the sampler config (the flags, one to one)."""
    output: str = ""                # a local directory or gs://bucket/dir (process 0 writes it)
    workdir: str = ""               # a training run: its config.json + checkpoints/
    checkpoint: str = ""            # or a converted model dir (python -m ddt_jax.convert ddt ...)
    vae: str | None = None          # SD-VAE (diffusers folder or one file); "none": pixel space
    raw: bool = False               # workdir only: the raw params instead of the EMA
    step: int | None = None         # workdir only: checkpoint step; None = the latest
    dtype: str | None = None        # compute dtype ("float32", "bfloat16"); None = the config's
    image_size: int | None = None   # model-input (latent) side; None = the model config's
    num_samples: int = 50_000
    batch_size: int = 256           # global, over all devices of all processes
    seed: int = 0
    balanced: bool = False
    schedule: str = ""              # recompute schedule json (written by --calibrate)
    calibrate: bool = False         # solve a schedule, write it to `schedule`; sample nothing
    num_recompute: int = 0          # --calibrate: encoder recomputes in the schedule
    calibrate_samples: int = 8      # --calibrate: batch size of the statistics (official: 8)
    keep_parts: bool = False        # keep parts/ after samples.npz is written


@dataclasses.dataclass
class Source:
    """A loaded model, ready to sample on the mesh (params replicated)."""
    model: nnx.Module
    vae: nnx.Module | None          # None: the model generates pixels
    latent_shape: tuple[int, int, int]
    description: dict[str, Any]     # what the manifest records about the weights

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


# ----------------------------------------------------------------------------------------------
# Checking the arguments (before any weights are read)
# ----------------------------------------------------------------------------------------------

def check_args(args: DumpArgs, num_devices: int) -> None:
    if bool(args.workdir) == bool(args.checkpoint):
        raise ValueError("pass exactly one of --workdir (a training run) or --checkpoint "
                         "(a converted model directory from `python -m ddt_jax.convert ddt`)")
    if args.checkpoint and (args.raw or args.step is not None):
        raise ValueError("--raw and --step select weights inside a training --workdir; "
                         "a converted --checkpoint holds one set of weights")
    if args.dtype and args.dtype not in ddt.DTYPES:
        raise ValueError(f"--dtype={args.dtype!r}: use one of {sorted(ddt.DTYPES)} "
                         "(or leave it empty for the model config's)")
    if args.checkpoint and not args.vae and not args.calibrate:
        raise ValueError("a converted checkpoint needs --vae=PATH (the SD-VAE diffusers folder "
                         "or weight file its latents decode with), or --vae=none for a "
                         "pixel-space model")
    if args.calibrate:
        if not args.schedule:
            raise ValueError(
                "--calibrate writes the solved schedule to --schedule=PATH.json: pass it")
        if args.num_recompute < 1:
            raise ValueError("--calibrate needs --num_recompute=K (how many of the num_steps "
                             "steps run the encoder, e.g. num_steps // 2)")
        if args.calibrate_samples < 1:
            raise ValueError(f"--calibrate_samples must be >= 1, got {args.calibrate_samples}")
        return
    if not args.output:
        raise ValueError(
            "pass --output=DIR (samples.npz, samples.png and the resumable parts go there)")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.batch_size < 1 or args.batch_size % num_devices:
        good = max(num_devices, args.batch_size // num_devices * num_devices)
        raise ValueError(f"--batch_size={args.batch_size} is not divisible by the {num_devices} "
                         "devices (jax.device_count()): every device samples an equal share; "
                         f"use a multiple of {num_devices}, e.g. --batch_size={good}")


def resolve_sampler_config(config, schedule: str = "") -> dict:
    """The validated sampler settings (read_config), with the --schedule file's recompute steps."""
    c = sampler_lib.read_config(config)
    if schedule:
        if c["recompute_steps"] is not None:
            raise ValueError("both --schedule and --config.recompute_steps are set: pass one")
        if not files.as_path(schedule).exists():
            raise FileNotFoundError(f"--schedule={schedule} does not exist; write one with "
                                    f"--calibrate --num_recompute=K --schedule={schedule}")
        steps = sampler_lib.load_schedule(schedule)
        # --calibrate also records the step count it solved for (other writers may not).
        solved_for = json.loads(files.as_path(schedule).read_text()).get("num_steps",
                                                                          c["num_steps"])
        if solved_for != c["num_steps"]:
            raise ValueError(f"--schedule={schedule} was solved for num_steps={solved_for} but "
                             f"num_steps is {c['num_steps']}; calibrate again with this num_steps")
        if steps[-1] >= c["num_steps"]:
            raise ValueError(f"--schedule={schedule} recomputes at step {steps[-1]} but num_steps "
                             f"is {c['num_steps']}: it was solved for more steps; calibrate again")
        c = sampler_lib.read_config({**c, "recompute_steps": steps})
    return c


def _read_run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
    config_path = workdir / weights.RUN_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"--workdir={workdir} has no config.json: is it a training run "
                                "directory (python train.py --workdir=...)? For converted "
                                "weights use --checkpoint")
    return ml_collections.ConfigDict(json.loads(config_path.read_text()))


def sampler_config_for(args: DumpArgs, overrides: Mapping[str, Any]
                       ) -> tuple[dict[str, Any], dict[str, str]]:
    """sample.py's sampler settings: the --config flags given over the run's `logging.sample`.

    A run's `logging.sample` is the sampler its grids and FID-during-training used (the 512px
    recipe's guidance 3.0, where the defaults are the 256px settings), so a dump of the run starts
    from it; a converted --checkpoint starts from `sampler.default_sampler_config()`.

    Args:
      args: the dump's flags; `workdir` (its config.json) or `checkpoint` picks the base.
      overrides: the sampler fields given explicitly on the command line, e.g.
        config_flags.get_override_values(FLAGS["config"]): they win even where they equal the
        default.

    Returns:
      (the settings for `run`, where each field came from: "--config", "the run's
      logging.sample" or "default"). Both are logged.
    """
    config = sampler_lib.default_sampler_config().to_dict()
    origins = dict.fromkeys(config, "default")
    if args.workdir:
        run_sample = _read_run_config(files.as_path(args.workdir)).get("logging", {}).get(
            "sample", {})
        run_sample = (run_sample.to_dict() if isinstance(run_sample, ml_collections.ConfigDict)
                      else dict(run_sample))
        config.update(run_sample)   # unknown fields are refused by read_config, naming them
        origins.update(dict.fromkeys(run_sample, "the run's logging.sample"))
    config.update(overrides)
    origins.update(dict.fromkeys(overrides, "--config"))
    for origin in ("--config", "the run's logging.sample", "default"):
        fields = [f"{k}={config[k]!r}" for k in sorted(config) if origins[k] == origin]
        if fields:
            logging.info("sampler settings from %s: %s", origin, ", ".join(fields))
    return config, origins


# ----------------------------------------------------------------------------------------------
# Mesh and weights
# ----------------------------------------------------------------------------------------------

def make_mesh(devices=None) -> jax.sharding.Mesh:
    """The dump's mesh: every device of every process data-parallel (the test passes a subset)."""
    return sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                                devices)


def _module_on_mesh(module: nnx.Module, mesh) -> nnx.Module:
    """The module with its state replicated over the mesh (each device copies from its host)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, sharding.host_to_replicated(state, mesh))


def _load_vae(path: str, mesh, scaling_factor: float | None):
    vae = convert.load_vae(path)
    if scaling_factor is not None and not math.isclose(vae.scaling_factor, scaling_factor,
                                                       rel_tol=1e-6):
        raise ValueError(f"the VAE at {path} has scaling_factor {vae.scaling_factor} but the run "
                         f"trained on latents scaled by vae.scaling_factor={scaling_factor}: "
                         "decode with the run's VAE")
    return _module_on_mesh(vae, mesh)


def _latent_shape(model_config, image_size: int | None) -> tuple[int, int, int]:
    h = image_size if image_size is not None else model_config.image_size
    w = (h if image_size is not None or model_config.get("image_width") is None
         else model_config.image_width)
    return int(h), int(w), int(model_config.in_channels)


def load_source(args: DumpArgs, mesh, *, decode: bool = True) -> Source:
    """The model (EMA or raw params of a run, or a converted checkpoint) and its VAE, on the mesh.

    Args:
      args: the dump's flags; `workdir` (with `step`, `raw`) or `checkpoint` names the weights,
        `vae` the VAE (a run defaults to its config's `vae.path`), `dtype` and `image_size`
        override the model config's.
      mesh: the mesh the params (and the VAE) are replicated over.
      decode: False (--calibrate) skips loading the VAE; the manifest still names it.

    Returns:
      A Source: the model, the VAE (None for a pixel-space model or decode=False), the latent
      shape (H, W, C) to sample, and the description the manifest records.
    """
    if args.checkpoint:
        path = files.as_path(args.checkpoint)
        if not weights.is_converted_dir(path):
            raise FileNotFoundError(
                f"--checkpoint={path} is not a converted model (no {weights.CONVERTED_CONFIG}). "
                f"Create one with {weights.HOW_TO_CONVERT}; for a training run use --workdir")
        model_config = weights.read_model_config(path)
        if args.dtype:
            model_config.dtype = args.dtype
        model = _restore_model(path, model_config, mesh, which="ema", step=None)
        vae_path = None if args.vae in (None, "", "none") else files.as_str(args.vae)
        vae = None if vae_path is None or not decode else _load_vae(vae_path, mesh, None)
        description = dict(kind="converted", path=str(path))
    else:
        workdir = files.as_path(args.workdir)
        run_config = _read_run_config(workdir)
        model_config = run_config.model
        if args.dtype:
            model_config.dtype = args.dtype
        steps = weights.run_steps(workdir)
        if not steps:
            raise FileNotFoundError(
                f"--workdir={workdir} has no complete checkpoint under checkpoints/ yet")
        step = steps[-1] if args.step is None else args.step
        if step not in steps:
            raise ValueError(
                f"--step={args.step}: no checkpoint for that step in {workdir} (have {steps})")
        model = _restore_model(workdir, model_config, mesh, which="raw" if args.raw else "ema",
                               step=step)
        pixel = run_config.data.kind == "pixel"
        if pixel:
            if args.vae and args.vae != "none":
                raise ValueError(f"{workdir} trained on pixels (data.kind='pixel'): it has no VAE; "
                                 "drop --vae")
            vae_path = vae = None
        else:
            vae_path = args.vae or run_config.vae.path
            if not vae_path or vae_path == "none":
                raise ValueError(f"{workdir} trained on latents but its config has no vae.path: "
                                 "pass --vae=PATH (the SD-VAE diffusers folder or weight file)")
            vae_path = files.as_str(vae_path)
            vae = _load_vae(vae_path, mesh, run_config.vae.scaling_factor) if decode else None
        description = dict(kind="workdir", path=str(workdir), step=int(step),
                           weights="raw" if args.raw else "ema")

    if vae is not None and vae.config.latent_channels != model.in_channels:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the model "
                         f"generates {model.in_channels}: pass the VAE the model was trained with")
    ddt.model_kwargs(model_config)   # raises on a malformed config
    description.update(model=model_config.to_dict(), vae=vae_path)
    return Source(model=model, vae=vae, latent_shape=_latent_shape(model_config, args.image_size),
                  description=description)


def _restore_model(path: epath.Path, model_config, mesh, *, which: str, step: int | None
                   ) -> nnx.Module:
    """The model's params from a run or a converted directory, restored replicated on the mesh."""
    graphdef, abstract = weights.abstract_params(
        lambda: ddt.build_model(model_config, rngs=nnx.Rngs(0)), sharding.replicated(mesh))
    params = weights.load_model_params(path, abstract, which=which, step=step)
    check_finite_params(params, f"the {which} weights in {path}"
                        + (f" at step {step}" if step is not None else ""))
    return weights.merge_params(graphdef, params)


def check_finite_params(params, what: str) -> None:
    """Raises ValueError when `params` hold NaN or Inf: their samples would be NaN (all-zero
    images once cast to uint8), a dump that looks valid.

    Args:
      params: a pytree of arrays.
      what: names the weights in the message, e.g. "the ema weights in /runs/x at step 5".
    """
    bad = [key for key, d in checkpoint_lib.digests(params).items() if not d["finite"]]
    if bad:
        raise ValueError(f"{what} hold NaN or Inf ({len(bad)} arrays, e.g. {', '.join(bad[:3])}):"
                         " refusing to sample them. Sample another --step of the run, or "
                         "convert the weights again")


# ----------------------------------------------------------------------------------------------
# Labels, noise and the per-batch computation
# ----------------------------------------------------------------------------------------------

def sample_labels(num_samples: int, num_classes: int, seed: int,
                  balanced: bool = False) -> np.ndarray:
    """(N,) int64 labels in random order: uniform draws, or exactly N / num_classes of each."""
    rng = np.random.default_rng(seed)
    if not balanced:
        return rng.integers(0, num_classes, num_samples, dtype=np.int64)
    if num_samples % num_classes:
        raise ValueError(f"--balanced needs --num_samples divisible by the {num_classes} classes, "
                         f"got {num_samples}; e.g. "
                         f"--num_samples={num_samples // num_classes * num_classes or num_classes}")
    return rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64),
                                     num_samples // num_classes))


def batch_noise(seed: int, index, shape) -> jax.Array:
    """The starting noise of batch `index`, float32 (B, H, W, C).

    Drawn as normal(fold_in(key(seed), index)).
    """
    return jax.random.normal(rng.stream(seed, index), shape, jnp.float32)


def batch_step_key(seed: int, index) -> jax.Array:
    """The per-step noise key of the SDE solvers for batch `index` (rng.DUMP_SDE stream)."""
    return jax.random.fold_in(rng.stream(seed, rng.DUMP_SDE), index)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _sharded_noise(seed, index, shape):
    # Sharded where it is drawn: threefry gives the same numbers whatever the sharding.
    return jax.lax.with_sharding_constraint(batch_noise(seed, index, shape),
                                            P(sharding.BATCH_AXES))


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(vae_graphdef, vae_state, x):
    images = x if vae_graphdef is None else nnx.merge(vae_graphdef, vae_state).decode(x)
    return jax.lax.with_sharding_constraint(images_lib.to_uint8(images), P(sharding.BATCH_AXES))


class BatchSampler:
    """Samples and decodes batch i of the dump: uint8, sharded over the mesh's `data` axis."""

    def __init__(self, source: Source, sampler_config: dict, *, batch_size: int, seed: int, mesh):
        self.source, self.config, self.seed, self.mesh = source, sampler_config, seed, mesh
        self.shape = (batch_size, *source.latent_shape)
        self.rows = sharding.batch_sharding(mesh, 1)
        self.vae_graphdef = self.vae_state = None
        if source.vae is not None:
            self.vae_graphdef, self.vae_state = nnx.split(source.vae)

    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the decoded samples."""
        x = jax.ShapeDtypeStruct(self.shape, jnp.float32)
        with jax.set_mesh(self.mesh):
            return tuple(jax.eval_shape(_decode, self.vae_graphdef, self.vae_state, x).shape[1:])

    def sample(self, index: int, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Dispatches batch `index` with its (batch_size,) labels; returns without waiting.

        Returns:
          (uint8 images sharded over `data`, a replicated bool: every sampled value is finite).
        """
        labels = np.asarray(labels, np.int32)
        labels = jax.make_array_from_callback(labels.shape, self.rows, lambda idx: labels[idx])
        with jax.set_mesh(self.mesh):
            noise = _sharded_noise(self.seed, jnp.int32(index), self.shape)
            x = sampler_lib.sample(self.source.model, noise, labels, self.config,
                                   key=batch_step_key(self.seed, index))
            return _decode(self.vae_graphdef, self.vae_state, x), _all_finite(x)

    def __call__(self, index: int, labels: np.ndarray) -> jax.Array:
        """The uint8 images of `sample` (benchmarks; the dump checks the finiteness too)."""
        return self.sample(index, labels)[0]


# ----------------------------------------------------------------------------------------------
# Process 0 owns the output
# ----------------------------------------------------------------------------------------------

# Errors process 0 relays keep their type on the other processes (sample.py prints these as one
# line); any other becomes a RuntimeError there.
_RELAYED_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError, FileExistsError,
                                           FloatingPointError, RuntimeError)}
_BROADCAST_CHUNK = 1024   # payloads padded to a multiple: one compiled broadcast for most of them


def _broadcast_bytes(data: bytes) -> bytes:
    """Process 0's `data` on every process (the others pass b"")."""
    padded = -(-max(len(data), 1) // _BROADCAST_CHUNK) * _BROADCAST_CHUNK
    size = int(multihost_utils.broadcast_one_to_all(np.int32(padded)))
    buffer = np.zeros(size, np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(buffer)).rstrip(b"\0")


def on_process_0(fn: Callable[[], Any]) -> Any:
    """Runs fn() on process 0 alone, and gives every process its result or its error.

    The other processes wait in the broadcast, so a refusal (another dump's manifest) or a failed
    write ends every process with the same message instead of leaving them in the next collective.

    Args:
      fn: called on process 0; returns a JSON-serialisable value.

    Returns:
      fn()'s value (on the other processes, through JSON: tuples become lists).
    """
    if jax.process_count() == 1:
        return fn()
    error = None
    payload = b""
    if jax.process_index() == 0:
        try:
            payload = json.dumps({"result": fn()}).encode()
        except Exception as e:  # noqa: BLE001 - relayed, then raised again just below
            error = e
            payload = json.dumps({"error": type(e).__name__, "message": str(e)}).encode()
    message = json.loads(_broadcast_bytes(payload))
    if error is not None:
        raise error
    if "error" in message:
        raise _RELAYED_ERRORS.get(message["error"], RuntimeError)(
            f"(on process 0) {message['message']}")
    return message["result"]


def _identity(x):
    return x


def gather_to_process_0(images: jax.Array) -> jax.Array:
    """Starts moving a batch sharded over processes to process 0; returns without waiting.

    A jit to a replicated sharding all-gathers the batch to every device: an SPMD program cannot
    send to one host alone. A 512px batch of 256 is 200 MB of uint8 per device, milliseconds on
    ICI against the minutes that sampling it takes; only process 0 then copies a replica to its
    host (`rows_on_process_0`; process_allgather would copy it to every host's memory). Dispatched
    right after the batch, before the next one, so its rows are ready while the next one samples.

    Args:
      images: uint8 (B, H, W, C) sharded over the batch axis.

    Returns:
      The batch, replicated (unchanged when one process holds every shard).
    """
    if images.is_fully_addressable:
        return images
    return jax.jit(_identity, out_shardings=images.sharding.update(spec=P()))(images)


def rows_on_process_0(images: jax.Array) -> np.ndarray | None:
    """The (B, H, W, C) numpy batch of `gather_to_process_0` on process 0; None elsewhere."""
    if images.is_fully_addressable:
        return np.asarray(images)
    return np.asarray(images.addressable_data(0)) if jax.process_index() == 0 else None


# ----------------------------------------------------------------------------------------------
# Part files, manifest and the final npz (process 0)
# ----------------------------------------------------------------------------------------------

# A part is batch b's rows, named by their CRC-32: the one listing that tells which batches are
# done also gives samples.npz its CRC before any row is read (a zip member's header precedes its
# data, and an upload to GCS cannot seek back to patch it).
_PART_NAME = re.compile(r"^(\d{7})\.([0-9a-f]{8})\.npz$")


def _part_path(output: epath.Path, batch: int, crc: int) -> epath.Path:
    return output / PARTS_DIR / f"{batch:07d}.{crc:08x}.npz"


def list_parts(output: epath.Path) -> dict[int, tuple[epath.Path, int]]:
    """{batch: (part file, CRC-32 of its rows)} of the finished parts in output/parts/.

    Args:
      output: the dump's directory (local or gs://).

    Returns:
      The parts by batch index; files of other names (temporaries, parts of the earlier
      per-process layout) are not parts.
    """
    directory = output / PARTS_DIR
    parts: dict[int, tuple[epath.Path, int]] = {}
    if not directory.exists():
        return parts
    for path in directory.iterdir():
        match = _PART_NAME.match(path.name)
        if not match:
            continue
        batch = int(match[1])
        if batch in parts:
            raise ValueError(f"{directory} holds two parts of batch {batch} "
                             f"({parts[batch][0].name}, {path.name}): did two dumps write into "
                             "it? Delete both and rerun (that batch is sampled again)")
        parts[batch] = (path, int(match[2], 16))
    return parts


TMP_PREFIX = files.TMP_PREFIX


_atomic_write = files.atomic_write   # temporaries named files.TMP_PREFIX<pid>.<name>


def remove_stale_temps(output: epath.Path) -> list[epath.Path]:
    """Deletes the temporary files of killed writes in `output` and its parts/ (process 0, before
    it writes). Returns the deleted paths."""
    output = files.as_path(output)
    stale = [p for d in (output, output / PARTS_DIR) if d.is_dir()
             for p in d.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
        logging.info("removed %s, left by an interrupted write", path)
    return stale


def _write_part(output: epath.Path, batch: int, images: np.ndarray, labels: np.ndarray) -> None:
    images = np.ascontiguousarray(images, np.uint8)
    _atomic_write(_part_path(output, batch, zlib.crc32(images)),
                  lambda f: np.savez(f, images=images, labels=labels))


def _read_part(path: epath.Path, batch: int, crc: int, labels: np.ndarray, image_shape
               ) -> np.ndarray:
    """The rows of a part, checked against the labels these settings draw and its CRC-32."""
    fix = f"delete {path} and rerun (only batch {batch} is sampled again)"
    try:
        with np.load(io.BytesIO(path.read_bytes())) as part:
            images, part_labels = part["images"], part["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable part ({type(e).__name__}: {e}); "
                         f"{fix}") from e
    if (images.dtype != np.uint8 or images.shape != (len(labels), *image_shape)
            or not np.array_equal(part_labels, labels)):
        raise ValueError(f"{path} does not hold the samples of batch {batch} that these "
                         f"settings draw; {fix}")
    if zlib.crc32(images) != crc:
        raise ValueError(f"{path} is corrupt: its rows' CRC-32 is {zlib.crc32(images):08x}, "
                         f"its name records {crc:08x}; {fix}")
    return images


def manifest_for(args: DumpArgs, source: Source, sampler_config: dict, image_shape) -> dict:
    return dict(version=MANIFEST_VERSION, source=source.description, sampler=sampler_config,
                num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                balanced=args.balanced, latent_shape=list(source.latent_shape),
                image_shape=list(image_shape))


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_manifest(output: epath.Path, manifest: dict) -> None:
    """Raises if `output` holds a dump made with other settings; writes the manifest if fresh.

    Process 0 only (it alone reads and writes the output).
    """
    output = files.as_path(output)
    path = output / MANIFEST_FILE
    # The JSON view (tuples -> lists) compares like the file.
    new = json.loads(json.dumps(manifest))
    if path.exists():
        old = json.loads(path.read_text())
        diff = _differences(old, new)
        if diff:
            raise ValueError(
                f"{output} holds a dump made with other settings ({'; '.join(diff)}). "
                f"Rerun with the settings in {path}, choose another --output, or delete {output} "
                "to start over.")
    else:
        files.atomic_write_text(path, json.dumps(new, indent=2) + "\n")


# ---- samples.npz, streamed from the parts -----------------------------------------------------

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # fixed: the same samples give the same bytes


def _write_npz_streaming(path: epath.Path, shape: tuple[int, ...], blocks,
                         labels: np.ndarray) -> None:
    """An np.savez-compatible file (arr_0 uint8 `shape`, arr_1 labels) from row blocks in order,
    without holding arr_0 in memory (local, or staged locally for gs://: files.atomic_write)."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            info = zipfile.ZipInfo("arr_0.npy", date_time=_ZIP_DATE)
            with zf.open(info, "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                          "fortran_order": False, "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(member, header)   # what np.save writes
                rows = 0
                for block in blocks:
                    member.write(np.ascontiguousarray(block, np.uint8).tobytes())
                    rows += block.shape[0]
                if rows != shape[0]:
                    raise RuntimeError(f"assembled {rows} samples, expected {shape[0]}")
            info = zipfile.ZipInfo("arr_1.npy", date_time=_ZIP_DATE)
            with zf.open(info, "w") as member:
                np.lib.format.write_array(member, np.asarray(labels))

    _atomic_write(path, write)


class _Grid:
    """Collects the grid's samples while the dump streams by: the first 64, or for few classes the
    first `cols` samples of each class (one row per class)."""

    def __init__(self, num_classes: int, cols: int = 8):
        self.per_class = num_classes <= GRID_MAX_CLASS_ROWS
        self.num_classes, self.cols = num_classes, cols
        self.cells: dict[tuple[int, int], np.ndarray] = {}
        self.count = np.zeros(num_classes, np.int64)
        self.seen = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        for image, label in zip(images, labels):
            if self.per_class:
                if self.count[label] < self.cols:
                    self.cells[(int(label), int(self.count[label]))] = image
                    self.count[label] += 1
            elif self.seen < GRID_SAMPLES:
                self.cells[divmod(self.seen, self.cols)] = image
            self.seen += 1

    def write(self, path: epath.Path, image_shape) -> None:
        rows = (self.num_classes if self.per_class
                else math.ceil(min(self.seen, GRID_SAMPLES) / self.cols))
        # Black where a class has fewer samples than a row holds.
        cells = np.zeros((rows * self.cols, *image_shape), np.uint8)
        for (r, col), image in self.cells.items():
            cells[r * self.cols + col] = image
        grid = images_lib.image_grid(cells, cols=self.cols)
        image = Image.fromarray(grid[..., 0] if image_shape[-1] == 1 else grid)
        _atomic_write(path, lambda f: image.save(f, format="PNG"))


def _batch_rows(batch: int, batch_size: int, num_samples: int) -> slice:
    return slice(batch * batch_size, min((batch + 1) * batch_size, num_samples))


def assemble(output: epath.Path, *, num_samples: int, batch_size: int, image_shape,
             labels: np.ndarray, num_classes: int) -> None:
    """Process 0: parts -> samples.npz + grid; checks every part holds its batch's samples.

    Args:
      output: the dump's directory (local or gs://) with a part for every batch.
      num_samples, batch_size: the dump's settings (batch b is rows b * batch_size onwards).
      image_shape: (H, W, C) of the samples.
      labels: the (num_samples,) labels the settings draw (`sample_labels`).
      num_classes: picks the grid's layout.
    """
    output = files.as_path(output)
    num_batches = math.ceil(num_samples / batch_size)
    parts = list_parts(output)
    missing = [b for b in range(num_batches) if b not in parts]
    if missing:
        raise RuntimeError(f"{output / PARTS_DIR} has no part for batches {missing[:8]}: rerun to "
                           "sample them")
    grid = _Grid(num_classes)

    def blocks():
        for b in range(num_batches):
            rows = _batch_rows(b, batch_size, num_samples)
            path, crc = parts[b]
            block = _read_part(path, b, crc, labels[rows], image_shape)
            grid.add(block, labels[rows])
            yield block

    _write_npz_streaming(output / SAMPLES_FILE, (num_samples, *image_shape), blocks(), labels)
    grid.write(output / GRID_FILE, image_shape)


# ----------------------------------------------------------------------------------------------
# The dump
# ----------------------------------------------------------------------------------------------


def _prepare_output(output: epath.Path, manifest: dict, num_batches: int) -> dict:
    """Process 0: creates the output, checks the manifest; which batches are already done."""
    (output / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output)
    check_manifest(output, manifest)
    if (output / SAMPLES_FILE).exists():
        return dict(complete=True, done=[])
    return dict(complete=False, done=sorted(b for b in list_parts(output) if b < num_batches))


def _finish(output: epath.Path, args: DumpArgs, labels: np.ndarray, image_shape,
            num_classes: int) -> None:
    """Process 0: assembles samples.npz and the grid, then deletes the parts."""
    assemble(output, num_samples=args.num_samples, batch_size=args.batch_size,
             image_shape=image_shape, labels=labels, num_classes=num_classes)
    if not args.keep_parts:
        (output / PARTS_DIR).rmtree()
    logging.info("wrote %s (%d samples, %s) and %s", output / SAMPLES_FILE, args.num_samples,
                 image_shape, output / GRID_FILE)


def dump(args: DumpArgs, source: Source, sampler_config: dict, mesh, *,
         max_batches: int | None = None) -> epath.Path | None:
    """Samples every missing batch into parts/, then assembles samples.npz; returns its path.

    Every process samples its rows of each batch; process 0 gathers them and alone touches the
    output (the others never read or write under it): it lists the finished parts once and
    broadcasts which batches are missing, so all processes run the same batches.

    Args:
      args: the dump's flags (`output`: local or gs://, `num_samples`, `batch_size`, `seed`,
        `balanced`, `keep_parts`); they and the sampler settings must match the manifest of a dump
        already in `output`.
      source: the model and VAE to sample, from `load_source`.
      sampler_config: the resolved sampler settings, from `resolve_sampler_config`.
      mesh: the data-parallel mesh of `make_mesh`; every process calls `dump` with it.
      max_batches: for tests: stop after sampling this many new batches, as if killed.

    Returns:
      The path of samples.npz (also when it was already complete), or None when `max_batches`
      stopped the dump before every batch was sampled.
    """
    output = files.as_path(args.output)
    is_0 = jax.process_index() == 0
    labels = sample_labels(args.num_samples, source.num_classes, args.seed, args.balanced)
    batcher = BatchSampler(source, sampler_config, batch_size=args.batch_size, seed=args.seed,
                           mesh=mesh)
    image_shape = batcher.image_shape()
    num_batches = math.ceil(args.num_samples / args.batch_size)
    manifest = manifest_for(args, source, sampler_config, image_shape)
    state = on_process_0(lambda: _prepare_output(output, manifest, num_batches))
    final = output / SAMPLES_FILE
    if state["complete"]:
        logging.info("%s is complete; nothing to do", final)
        return final

    done = set(state["done"])
    todo = [b for b in range(num_batches) if b not in done]
    left = len(todo)
    if max_batches is not None:
        todo = todo[:max_batches]
    finished = sum(min(args.batch_size, args.num_samples - b * args.batch_size) for b in done)
    logging.info("%d of %d batches of %d already in %s; sampling %d", len(done), num_batches,
                 args.batch_size, output / PARTS_DIR, len(todo))

    def batch_labels(b):
        chunk = labels[_batch_rows(b, args.batch_size, args.num_samples)]
        # The last batch is padded (label 0) to keep one compiled shape; its extra rows are dropped.
        return np.pad(chunk, (0, args.batch_size - len(chunk)))

    progress = console.Progress(args.num_samples, initial=finished, enabled=is_0, verb="sampled")
    def start(b):
        images, finite = batcher.sample(b, batch_labels(b))
        return b, gather_to_process_0(images), finite

    # One batch in flight while the previous one is written: the devices never wait for the disk.
    # Each batch's finiteness check also syncs the processes (multi-process CPU deadlocks after
    # ~30 unsynced cross-process steps, DESIGN.md).
    pending = None
    for b in todo + [None]:
        current = None if b is None else start(b)
        if pending is not None:
            pb, images, finite = pending
            if not bool(np.asarray(finite.addressable_data(0))):
                raise FloatingPointError(
                    f"batch {pb} of the dump in {output}: the sampler produced NaN or Inf from "
                    f"finite weights ({source.description['path']}); no part or samples.npz is "
                    "written for it. Check the sampler settings (--config.*) and the weights")
            rows = _batch_rows(pb, args.batch_size, args.num_samples)
            block = rows_on_process_0(images)
            on_process_0(lambda: _write_part(output, pb, block[:rows.stop - rows.start],
                                             labels[rows]))
            progress.update(rows.stop - rows.start)
        pending = current
    progress.close()
    if len(todo) < left:
        return None

    on_process_0(lambda: _finish(output, args, labels, image_shape, source.num_classes))
    return final


def calibrate(args: DumpArgs, source: Source, sampler_config: dict) -> list[int]:
    """Solves a DP recompute schedule on a small batch and writes it to args.schedule.

    Args:
      args: the flags; `schedule` (the JSON written by process 0), `num_recompute` (encoder
        recomputes to place), `calibrate_samples` (the batch size) and `seed` are used.
      source: a DDT (the DiT baseline has no encoder state to reuse), from `load_source`.
      sampler_config: the resolved sampler settings; their `recompute_steps` are ignored (the
        statistics need every step's state).

    Returns:
      The `num_recompute` solved recompute steps, increasing and starting at 0.
    """
    if not source.model.is_decoupled:
        raise ValueError("--calibrate needs a DDT: the DiT baseline has no encoder state to reuse")
    n = sampler_config["num_steps"]
    if args.num_recompute > n:
        raise ValueError(f"--num_recompute={args.num_recompute} exceeds num_steps={n}")
    config = {**sampler_config, "recompute_steps": None}   # the statistics need every step's state
    # Noise, step noise and labels of their own: the calibration batch is none of the dump's
    # batches.
    root = rng.stream(args.seed, rng.DUMP_CALIBRATE)
    noise = jax.random.normal(jax.random.fold_in(root, 0),
                              (args.calibrate_samples, *source.latent_shape))
    labels = np.random.default_rng([args.seed, rng.DUMP_CALIBRATE]).integers(0, source.num_classes,
                                                                           args.calibrate_samples)
    states = sampler_lib.calibrate(source.model, noise, jnp.asarray(labels, jnp.int32), config,
                                   key=jax.random.fold_in(root, 1))
    steps = sampler_lib.solve_recompute_steps(np.asarray(jax.device_get(states)),
                                              args.num_recompute)
    sampler_lib.read_config({**config, "recompute_steps": steps})   # raises for a bad schedule
    if jax.process_index() == 0:
        # What sampler.load_schedule reads, and what the schedule was solved for; through
        # files.atomic_write (sampler.save_schedule writes local paths only).
        record = {"recompute_steps": steps, "num_steps": n, "num_recompute": args.num_recompute,
                  "calibrate_samples": args.calibrate_samples, "seed": args.seed,
                  "source": source.description, "sampler": config}
        files.atomic_write_text(args.schedule, json.dumps(record, indent=2) + "\n")
        logging.info("wrote %s: %d recomputes over %d steps: %s", args.schedule, len(steps), n,
                     steps)
    return steps


def run(args: DumpArgs, sampler_config, *, devices=None, max_batches: int | None = None):
    """What sample.py runs: checks, loads, then dumps or calibrates.

    Args:
      args: sample.py's flags.
      sampler_config: the sampler settings (a ConfigDict or mapping for `sampler.read_config`);
        `args.schedule`'s recompute steps are added unless calibrating.
      devices: the devices of the mesh; None: every device of every process.
      max_batches: passed to `dump` (for tests).

    Returns:
      With `args.calibrate`, the solved recompute steps (`calibrate`); otherwise the path of
      samples.npz, or None if `max_batches` stopped the dump early (`dump`).
    """
    mesh = make_mesh(devices)
    check_args(args, mesh.size)
    config = resolve_sampler_config(sampler_config, "" if args.calibrate else args.schedule)
    source = load_source(args, mesh, decode=not args.calibrate)
    if args.calibrate:
        return calibrate(args, source, config)
    return dump(args, source, config, mesh, max_batches=max_batches)
