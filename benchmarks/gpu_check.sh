#!/usr/bin/env bash
# Every GPU measurement BENCHMARKS.md records, as one prepared run for a short lease on a CUDA
# machine (written for one H200; any NVIDIA GPU works) whose image already has jax with its CUDA
# plugin and torch, but no network.
#
#   benchmarks/gpu_check.sh prepare OFFICIAL_CHECKOUT   # here, with a package registry: the
#       # wheels such an image lacks -> .whl/, the official model's .py file -> .official/
#       # (both git-ignored via .git/info/exclude; carry them beside the working tree)
#   benchmarks/gpu_check.sh run [STAGE ...]             # there; output under $OUT (or ./gpu_out)
#
# Stages (default: all, in this order: the most wanted numbers first), each under its own time
# limit and all under one DEADLINE, so that one 10-minute call leaves room in a 15-minute lease to
# rerun; a stage the deadline cuts keeps the rows it wrote (JSON rewritten after every variant):
#   env      nvidia-smi, package versions, the devices JAX sees
#   smoke    S/2 64px bf16 train step, cudnn attention, 1 step: imports, the kernel, shapes
#   train    XL/2 256 bf16 train step, batch $BATCH, REPA off: cudnn scanned (the likely
#            fastest, first in case compiles are slow), the baseline (xla, remat none, unrolled),
#            xla scanned, cudnn scanned with full remat                       -> train.json
#   sample   the XL/2 256 sampler at the official settings (Euler, CFG on 0.3 < t < 1), bf16,
#            cudnn attention, batch $BATCH: 10 steps run, 250 projected, K = 1, 2, 4 -> sample.json
#   official the official PyTorch DDT on the same shapes in bf16 autocast, eager and
#            torch.compile (benchmarks/official_train_step.py), beside our cudnn scanned
#            step                                                             -> official.json
#   repa     our cudnn scanned step with REPA on (random DINOv2-B/14)          -> repa.json
#   more     the rest of the grid: dots_saveable (both kernels), xla full remat, cudnn unrolled,
#            beside the baseline again                                         -> train_more.json
# The JAX compilation cache (/tmp/jax_cache) lets a variant compiled in an earlier stage (or an
# earlier call on a warm machine) load instead of compiling again.
#
# Knobs (environment): DEADLINE (570 s for the whole run), BATCH (64), TRAIN_STEPS (5),
# OFFICIAL (.official), PYTHON (python3), VARIANT (XL/2) and IMAGE_SIZE (256; a dry run on a
# CPU: VARIANT=S/2 IMAGE_SIZE=64), PINNED=1 to use constraints.txt's flax/optax/orbax instead of
# the image's (also chosen by itself when ddt_jax does not import with the image's), and each
# stage's own limit in seconds: LIMIT_SMOKE (90), LIMIT_TRAIN (300), LIMIT_SAMPLE (200),
# LIMIT_OFFICIAL (200), LIMIT_REPA (100), LIMIT_MORE (300).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
BATCH=${BATCH:-64}
DEADLINE=${DEADLINE:-570}
VARIANT=${VARIANT:-XL/2}
IMAGE_SIZE=${IMAGE_SIZE:-256}
TRAIN_STEPS=${TRAIN_STEPS:-5}
OFFICIAL=${OFFICIAL:-$REPO/.official}
PY=${PYTHON:-python3}
SITE=/tmp/gpu_site
MODEL_FILE=src/models/denoiser/decoupled_improved_dit.py
# What the benchmarks import that such an image lacks, at constraints.txt's versions. jax and
# jaxlib stay the image's own (its CUDA plugin must match them), as do torch, flax, optax, orbax.
WHEELS="grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0"
PINNED_WHEELS="flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8"

prepare() {
    local official=${1:?usage: benchmarks/gpu_check.sh prepare OFFICIAL_CHECKOUT}
    if [[ ! -f $official/$MODEL_FILE ]]; then
        echo "$official has no $MODEL_FILE: pass a checkout of github.com/MCG-NJU/DDT" >&2
        exit 2
    fi
    for ignored in /.whl/ /.official/ /gpu_out/; do
        grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
    done
    rm -rf .whl .official
    mkdir -p .whl/pinned ".official/$(dirname "$MODEL_FILE")"
    cp "$official/$MODEL_FILE" ".official/$MODEL_FILE"
    # cp312 manylinux wheels for the image's Python 3.12 (grain and array_record are compiled).
    local where=(--quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
                 --platform manylinux2014_x86_64)
    python3 -m pip download "${where[@]}" -d .whl $WHEELS
    python3 -m pip download "${where[@]}" -d .whl/pinned $PINNED_WHEELS
    du -sh .whl .official
    echo "carry: .whl .official"
}

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

# stage NAME LIMIT PROGRAM ARGS...: PROGRAM under `timeout`, at most LIMIT seconds and what is
# left of DEADLINE, its output into the log; skipped when less than 20 s is left.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then
        log "== $name: skipped ($left s left of DEADLINE=$DEADLINE)"
        return
    fi
    log "== $name (limit $limit s): $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" env PYTHONUNBUFFERED=1 "$@" 2>&1 \
        | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    log "== $name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ' (its limit)')"
}

# The versions of what matters here and the devices JAX sees.
env_report() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c '
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "grain", "array_record", "ml_collections", "torch", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "(not installed)")
import jax
print("devices:", jax.devices(), "backend:", jax.default_backend())
'
}

install() {
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$@" 2>&1 | tee -a "$OUT/log.txt"
    if [[ ${PIPESTATUS[0]} == 0 ]]; then
        log "installed to $SITE: $(basename -a "$@" | tr '\n' ' ')"
    else
        log "pip could not install $(basename -a "$@" | tr '\n' ' ')"
    fi
}

# Whether the trainer imports and one tiny DDT forward runs on the default backend.
imports_work() {
    "$PY" -c '
import jax, jax.numpy as jnp
from flax import nnx
from ddt_jax import trainer
from ddt_jax.models import ddt
c = ddt.default_model_config()
c.update(hidden_size=64, num_heads=4, num_blocks=2, num_encoder_blocks=1, image_size=8)
m = ddt.build_model(c, rngs=nnx.Rngs(0))
out = m(jnp.zeros((2, 8, 8, 4)), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32))
print("ddt_jax imports and runs on", jax.default_backend())
' 2>&1 | tail -3 | tee -a "$OUT/log.txt"
    return "${PIPESTATUS[0]}"
}

run() {
    mkdir -p "$OUT"
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
    local stages=("$@")
    [[ ${#stages[@]} == 0 ]] && stages=(env smoke train sample official repa more)
    if [[ -d .whl ]]; then
        install .whl/*.whl
        if [[ ${PINNED:-0} == 1 ]] || ! imports_work; then
            log "using constraints.txt's flax/optax/orbax: $(ls .whl/pinned | tr '\n' ' ')"
            install .whl/pinned/*.whl
            imports_work || log "ddt_jax still does not import: the stages below will fail"
        fi
    else
        log "no .whl/ (run 'benchmarks/gpu_check.sh prepare' where pip works): the image's only"
    fi
    local ts=("$PY" benchmarks/train_step.py)
    local xl=(--variants="$VARIANT" --image_size="$IMAGE_SIZE" --batch_size="$BATCH"
              --dtype=bfloat16 --steps="$TRAIN_STEPS" --warmup=2)
    for s in "${stages[@]}"; do
        case $s in
            env) env_report 2>&1 | tee -a "$OUT/log.txt" ;;
            smoke) stage smoke "${LIMIT_SMOKE:-90}" "${ts[@]}" --variants=S/2 --image_size=64 \
                --batch_size=8 --dtype=bfloat16 --attention=cudnn --remat=none --scan=1 \
                --steps=1 --json="$OUT/smoke.json" ;;
            train) stage train "${LIMIT_TRAIN:-300}" "${ts[@]}" "${xl[@]}" \
                --only=cudnn:none:1:1,xla:none:0:1,xla:none:1:1,cudnn:full:1:1 \
                --json="$OUT/train.json" ;;
            sample) stage sample "${LIMIT_SAMPLE:-200}" "$PY" benchmarks/sample_throughput.py \
                --variant="$VARIANT" --image_size=$((IMAGE_SIZE / 8)) --batch_size="$BATCH" \
                --dtype=bfloat16 --attention=auto --num_steps=10 --target_steps=250 \
                --rates=1,2,4 --repeats=2 --json="$OUT/sample.json" ;;
            official) stage official "${LIMIT_OFFICIAL:-200}" "${ts[@]}" "${xl[@]}" \
                --only=cudnn:none:1:1 --official_repo="$OFFICIAL" \
                --official_modes=eager,compile --official_timeout=120 \
                --json="$OUT/official.json" ;;
            repa) stage repa "${LIMIT_REPA:-100}" "${ts[@]}" "${xl[@]}" --repa \
                --only=cudnn:none:1:1 --json="$OUT/repa.json" ;;
            more) local rest=cudnn:dots_saveable:1:1,xla:full:1:1,xla:dots_saveable:1:1
                stage more "${LIMIT_MORE:-300}" "${ts[@]}" "${xl[@]}" \
                --only=xla:none:0:1,$rest,cudnn:none:0:1 --json="$OUT/train_more.json" ;;
            *) log "unknown stage $s (env smoke train sample official repa more)"; exit 2 ;;
        esac
    done
    log "done: $(ls "$OUT" | tr '\n' ' ')"
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,35p' "$0"; exit 2 ;;
esac
