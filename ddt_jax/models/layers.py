"""Building blocks shared by DDT and the DiT baseline, in Flax NNX with exact official numerics.

Every parameter carries logical axis names (see `sharding.py` for the rules that map them to the
`data` / `fsdp` / `tensor` mesh axes):
  embed    the model width (hidden_size)          mlp      SwiGLU hidden, adaLN outputs (6h, 2h)
  qkv      fused q/k/v outputs (3h)               heads    attention features entering `proj`
  patch    C*p*p patch features                   freq     the 256 sinusoid timestep channels
  classes  label-table rows                       norm     norm scales (always replicated)
  feature  REPA target width (768 for DINOv2-B)    batch    the batch dim of activations and inputs

Variables are created without eager sharding: shardings are applied by the caller from the logical
names (jit out_shardings / device_put), so a model can also be built with no mesh at all. A
`BlockStack` (model.scan_blocks) stacks its blocks' params on a leading axis whose logical name is
None: replicated, so FSDP still splits every layer's `embed` dim and no mesh rule is needed.

Activations: when the step is traced under a mesh (`jax.set_mesh`, as the trainer lowers it), the
hidden states' batch axis is constrained to the data-parallel axes (`constrain_batch`), so FSDP
gathers weights rather than activations; without a mesh it is a no-op.

Memory and speed knobs (model config): `attention` picks the attention kernel (XLA, cuDNN flash
on GPU, the Pallas splash kernel on TPU), `remat` a jax.checkpoint policy applied per block,
`matmul_layout` how the dense layers' and XLA attention's matmuls are written for the compiler
("row_major": custom VJPs whose matmuls XLA:CPU runs in YNNPACK; the CPU default).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

try:   # pure Python, importable on every backend; guarded in case a jax release moves it
    from jax.experimental.pallas.ops.tpu import splash_attention
except ImportError:  # pragma: no cover
    splash_attention = None

# The timestep sinusoid uses max_period 10 (not DiT's 10000) because t lives in [0, 1].
TIMESTEP_FREQ_CHANNELS = 256
TIMESTEP_MAX_PERIOD = 10.0
NORM_EPS = 1e-6
ROPE_THETA = 10000.0
ROPE_SCALE = 16.0  # positions span linspace(0, 16, side): resolution-normalised, not integer
# The data-parallel mesh axes that split the batch: sharding.BATCH_AXES (models sit below sharding).
BATCH_AXES = ("data", "fsdp")

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "tpu_flash")
# How the matmuls of the dense layers and of XLA attention are written ("matmul layouts" below):
# "xla" as jax's autodiff emits them, "row_major" with custom VJPs whose every matmul is a
# row-major (M, K) x (K, N) product, "auto" row_major when compiling for CPU, else xla.
MATMUL_LAYOUTS = ("auto", "xla", "row_major")
FLASH_DTYPES = (jnp.bfloat16, jnp.float16)   # what cuDNN's fused attention accepts
# jax.checkpoint policy per block. "full" and "nothing_saveable" both keep only each block's
# inputs; "dots_saveable" keeps every matmul output (with XLA attention that includes the f32
# scores); "dots_with_no_batch_dims_saveable" keeps the weight matmuls' outputs but recomputes
# attention (its matmuls have batch dims).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The splash kernel tiles the sequence in blocks of 128 tokens (the TPU lane width) or more.
SPLASH_MIN_BLOCK = 128
SPLASH_BLOCKS = (512, 256, 128)   # the largest that divides the (padded) sequence is used


def partitioned(init, axes: Sequence[str | None]):
    """An initializer that records logical axis names without sharding eagerly."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def torch_linear_kernel_init():
    """torch.nn.Linear's default weight init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ----------------------------------------------------------------------------- matmul layouts
#
# XLA:CPU (jax 0.10) runs a dot in YNNPACK only when it is a row-major (M, K) x (K, N) product;
# any other dot goes to a slower Eigen kernel, usually behind a transposing copy of an operand.
# Autodiff's weight gradient of a dense layer, dW = x^T dy, contracts the leading (token) dim of
# both operands, so all 78 of DDT-S/2's took that path: in a profiled value_and_grad (batch 8,
# one thread) 2.5 s of Eigen dots and 0.9 s of copies out of 8.0 s of ops. "row_major" computes
# dW from an explicitly transposed operand (the narrower one) behind an optimization barrier, so
# XLA cannot fold the transpose back into the dot; attention gets the same treatment (below).
# The S/2 train step: 5.56 -> 3.26 s of CPU time (1.71x; the official PyTorch eager step takes
# 4.61 s on the same thread), benchmarks/cpu_train_step.py. Elsewhere "auto" keeps autodiff's.

def check_matmul_layout(layout: str) -> str:
    if layout not in MATMUL_LAYOUTS:
        raise ValueError(f"matmul_layout must be one of {MATMUL_LAYOUTS}, got {layout!r}")
    return layout


def resolve_matmul_layout(layout: str) -> str:
    """"xla" or "row_major": what `layout` means on the platform being compiled for."""
    if check_matmul_layout(layout) == "auto":
        return "row_major" if _platform() == "cpu" else "xla"
    return layout


def _matmul(a, b, precision=None):
    """a (M, K) @ b (K, N)."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision)


def _transposed(a):
    """a.T (2-D) as an array of its own: the barrier keeps XLA from folding it into a dot."""
    return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _row_major_dense(x, kernel, precision):
    """x (..., K) @ kernel (K, N), as nnx.Linear's dot_general computes it."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _row_major_dense_fwd(x, kernel, precision):
    return _row_major_dense(x, kernel, precision), (x, kernel)


def _row_major_dense_bwd(precision, residuals, dy):
    x, kernel = residuals
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x2.shape[1] <= dy2.shape[1]:
        dkernel = _matmul(_transposed(x2), dy2, precision)
    else:   # (dy^T x)^T: the barrier stops XLA from turning it back into x^T dy
        dkernel = jax.lax.optimization_barrier(_matmul(_transposed(dy2), x2, precision)).T
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_row_major_dense.defvjp(_row_major_dense_fwd, _row_major_dense_bwd)


def _is_dense(lhs, rhs, dimension_numbers) -> bool:
    return rhs.ndim == 2 and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))


def row_major_dot_general(lhs, rhs, dimension_numbers, precision=None,
                          preferred_element_type=None, out_sharding=None):
    """jax.lax.dot_general whose dense-layer case (contract lhs's last dim with the 2-D rhs's
    first) has the row-major VJP; any other contraction is jax.lax.dot_general itself."""
    if (_is_dense(lhs, rhs, dimension_numbers) and preferred_element_type is None
            and out_sharding is None):
        return _row_major_dense(lhs, rhs, precision)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


def auto_dot_general(lhs, rhs, dimension_numbers, **kwargs):
    """`row_major_dot_general` when compiling for CPU, else jax.lax.dot_general (trace time)."""
    row_major = resolve_matmul_layout("auto") == "row_major"
    fn = row_major_dot_general if row_major else jax.lax.dot_general
    return fn(lhs, rhs, dimension_numbers, **kwargs)


# nnx.Linear's dot_general per matmul layout (module-level functions: stable graphdefs).
DENSE_DOT_GENERALS = {"xla": jax.lax.dot_general, "row_major": row_major_dot_general,
                      "auto": auto_dot_general}


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           use_bias: bool = True, kernel_init=None, bias_init=None, dtype=jnp.float32,
           param_dtype=jnp.float32, matmul_layout: str = "auto", rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear with torch-default init unless told otherwise, and logical axes on its params.

    The kernel is (in, out): the transpose of torch's (out, in) weight. `matmul_layout` (one of
    MATMUL_LAYOUTS) picks its dot_general: same forward, same params, a different backward.
    """
    kernel_init = kernel_init or torch_linear_kernel_init()
    bias_init = bias_init or torch_linear_bias_init(in_features)
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, axes), bias_init=partitioned(bias_init, (axes[1],)),
        dot_general=DENSE_DOT_GENERALS[check_matmul_layout(matmul_layout)], rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm with a learnable scale; statistics in float32, scale applied after the cast back."""

    def __init__(self, dim: int, *, eps: float = NORM_EPS, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(
            partitioned(nnx.initializers.ones, ("norm",))(None, (dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # Cast back first, then scale (as the official RMSNorm); keep the input dtype in bf16 mode.
        return (self.weight[...] * x32.astype(x.dtype)).astype(x.dtype)


def layer_norm_no_affine(x, eps: float = NORM_EPS):
    """LayerNorm without scale/bias (the final layer's), statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- activation sharding

def _batch_mesh_axes(batch: int) -> tuple[str, ...]:
    """The active mesh's data-parallel axes that split `batch` evenly; () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axes = tuple(a for a in BATCH_AXES if a in types and mesh.shape[a] > 1
                 and types[a] != jax.sharding.AxisType.Manual)
    size = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and batch % size == 0 else ()


def constrain_batch(x):
    """Pins x's leading (batch) axis to the data-parallel mesh axes, the rest replicated.

    Only under a mesh context (the trainer traces its step inside `jax.set_mesh`); a no-op
    otherwise, and for a batch the axes do not divide (e.g. one sample grid row per device).
    """
    axes = _batch_mesh_axes(x.shape[0])
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


# ----------------------------------------------------------------------------- attention

_INTERPRET_TPU_KERNELS = contextvars.ContextVar("interpret_tpu_kernels", default=False)


@contextlib.contextmanager
def interpret_tpu_kernels():
    """Runs `tpu_flash` attention traced inside this context in Pallas interpret mode.

    For tests of the TPU kernel on CPU (slow: a few seconds per small call); on a TPU it would
    only slow things down.
    """
    token = _INTERPRET_TPU_KERNELS.set(True)
    try:
        yield
    finally:
        _INTERPRET_TPU_KERNELS.reset(token)


def check_attention(implementation: str) -> str:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    return implementation


def _platform() -> str:
    """The platform being compiled for: the mesh's devices' (an AOT compile for abstract TPU
    devices runs on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_attention(implementation: str, dtype) -> str:
    """The kernel `implementation` runs as for inputs of `dtype` on the platform at hand.

    "auto" is cuDNN flash attention on GPU for bf16/fp16, the Pallas splash kernel on TPU and
    XLA otherwise (CPU, or float32 on GPU); decided at trace time. Explicit choices that cannot
    run here are errors that name the fix.
    """
    check_attention(implementation)
    backend = _platform()
    dtype = jnp.dtype(dtype)
    if implementation == "auto":
        if backend == "gpu" and dtype in FLASH_DTYPES:
            return "cudnn"
        return "tpu_flash" if backend == "tpu" else "xla"
    if implementation == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention='cudnn' (cuDNN flash attention) needs a GPU, but JAX's "
                             f"backend is {backend!r}: use 'xla', or 'auto' (which picks by "
                             "backend)")
        if dtype not in FLASH_DTYPES:
            raise ValueError(f"attention='cudnn' needs bfloat16 or float16 inputs, got {dtype}: "
                             "set model.dtype='bfloat16', or use 'xla' / 'auto' for float32")
    if implementation == "tpu_flash" and splash_attention is None:
        raise ValueError(f"attention='tpu_flash' needs jax.experimental.pallas.ops.tpu."
                         f"splash_attention, which jax {jax.__version__} does not have: use "
                         "'xla' or 'auto'")
    if implementation == "tpu_flash" and backend != "tpu" and not _INTERPRET_TPU_KERNELS.get():
        raise ValueError(f"attention='tpu_flash' (the Pallas TPU splash kernel) needs a TPU, but "
                         f"JAX's backend is {backend!r}: use 'xla', or 'auto' (which picks by "
                         "backend); tests run it on CPU inside layers.interpret_tpu_kernels()")
    return implementation


def _splash_block_sizes(seq_len: int) -> splash_attention.BlockSizes:
    block = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
    return splash_attention.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def _splash_local(q, k, v, *, interpret: bool):
    """Splash attention on (B, N, H, D) q/k/v of one device: padded to whole 128-token blocks.

    Padding keys are masked with segment ids (real tokens 1, padding 0); padded query rows only
    see padding and are cut off. The kernel does not scale: q is scaled by 1/sqrt(D) first.
    """
    b, n, h, d = q.shape
    n_pad = -(-n // SPLASH_MIN_BLOCK) * SPLASH_MIN_BLOCK
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    q, k, v = (jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, n_pad - n), (0, 0)))
               for a in (q, k, v))   # B, H, N_pad, D
    mask = splash_attention.MultiHeadMask([splash_attention.FullMask((n_pad, n_pad))] * h)
    kernel = splash_attention.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=_splash_block_sizes(n_pad),
        interpret=interpret)
    if n_pad == n:
        out = jax.vmap(kernel)(q, k, v)
    else:
        ids = jnp.broadcast_to((jnp.arange(n_pad) < n).astype(jnp.int32), (b, n_pad))
        out = jax.vmap(kernel)(q, k, v, splash_attention.SegmentIds(q=ids, kv=ids))
    return out[:, :, :n].transpose(0, 2, 1, 3)


def _splash_attention(q, k, v):
    """Splash attention, under a mesh as a shard_map over the batch (and heads over `tensor`):
    the partitioner cannot split a Pallas kernel itself and would gather the activations."""
    local = lambda q, k, v: _splash_local(q, k, v, interpret=_INTERPRET_TPU_KERNELS.get())
    batch_axes = _batch_mesh_axes(q.shape[0])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    heads = ("tensor",) if (types.get("tensor") == jax.sharding.AxisType.Auto
                            and mesh.shape["tensor"] > 1
                            and q.shape[2] % mesh.shape["tensor"] == 0) else ()
    if not batch_axes and not heads:
        return local(q, k, v)
    spec = P(batch_axes or None, None, heads or None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _heads_first(a):
    """(B, N, H, D) <-> (B, H, N, D)."""
    return a.transpose(0, 2, 1, 3)


def _bmm(a, b, contract_a: int, contract_b: int):
    """Batched (over the two leading dims) matmul contracting a's and b's given dims (2 or 3)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))))


@jax.custom_vjp
def _row_major_attention(q, k, v):
    """float32 softmax attention of (B, N, H, D) q/k/v, heads-first (B, H, N, D) inside.

    The forward computes what jax.nn.dot_product_attention's XLA path computes (scores scaled
    after q k^T, jax.nn.softmax); the VJP keeps the probabilities, as jax's does, and uses
    sum(P * dP) = rowsum(dO * O) for the softmax gradient. On one CPU thread at DDT-S/2's
    shapes (8 x 256 tokens, 6 heads of 64) forward + backward take 70 ms against jax's 112 ms,
    the forward 21 ms against 40 ms (jax's path, a vmap over (B, N, H, D) einsums, makes more
    full passes over the N x N scores: copies, broadcasts and divides).
    """
    return _row_major_attention_fwd(q, k, v)[0]


def _row_major_attention_fwd(q, k, v):
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), jnp.float32)
    qt, kt, vt = _heads_first(q), _heads_first(k), _heads_first(v)   # B, H, N, D
    probs = jax.nn.softmax(_bmm(qt, kt, 3, 3) * scale, axis=-1)    # B, H, N, N
    out = _bmm(probs, vt, 3, 2)
    return _heads_first(out), (qt, kt, vt, probs, out)


def _row_major_attention_bwd(residuals, d_out):
    qt, kt, vt, probs, out = residuals
    scale = jnp.asarray(1.0 / math.sqrt(qt.shape[-1]), jnp.float32)
    d_out = _heads_first(d_out)
    dv = _bmm(probs, d_out, 2, 2)                                   # P^T dO
    dp = _bmm(d_out, vt, 3, 3)                                      # dO V^T
    ds = probs * (dp - jnp.sum(d_out * out, axis=-1, keepdims=True)) * scale
    dq = _bmm(ds, kt, 3, 2)
    # dv and dk contract the leading token dim (Eigen dots); computing them from transposed
    # operands instead measured no faster (the copies cost what the dots save).
    dk = _bmm(ds, qt, 2, 2)                                         # dS^T Q
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)


_row_major_attention.defvjp(_row_major_attention_fwd, _row_major_attention_bwd)


def dot_product_attention(q, k, v, implementation: str = "xla", matmul_layout: str = "xla"):
    """Softmax attention of (B, N, H, D) q/k/v, scale 1/sqrt(D), no mask, float32 softmax.

    Args:
      q, k, v: queries, keys and values of one dtype.
      implementation: one of ATTENTION_IMPLEMENTATIONS (see `resolve_attention`).
      matmul_layout: one of MATMUL_LAYOUTS ("xla" here, "auto" in the models); "row_major"
        computes float32 XLA attention heads-first with its own VJP: the same values to float32
        rounding, a faster CPU forward and backward.

    Returns:
      (B, N, H, D) in q's dtype.
    """
    impl = resolve_attention(implementation, q.dtype)
    if impl == "tpu_flash":
        return _splash_attention(q, k, v)
    if (impl == "xla" and q.dtype == jnp.float32
            and resolve_matmul_layout(matmul_layout) == "row_major"):
        return _row_major_attention(q, k, v)
    # jax's "xla" keeps the f32 scores for the backward pass; "cudnn" is the fused flash kernel.
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def timestep_frequencies(t, dim: int = TIMESTEP_FREQ_CHANNELS,
                         max_period: float = TIMESTEP_MAX_PERIOD):
    """Sinusoidal features of t in [cos, sin] order, float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    """t -> 256 sinusoid channels -> Linear -> SiLU -> Linear.

    Kept in float32: it conditions every block.
    """

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32, matmul_layout: str = "auto",
                 rngs: nnx.Rngs):
        kw = dict(kernel_init=nnx.initializers.normal(0.02), param_dtype=param_dtype,
                  matmul_layout=matmul_layout, rngs=rngs)
        self.mlp_in = linear(TIMESTEP_FREQ_CHANNELS, hidden_size, ("freq", "embed"), **kw)
        self.mlp_out = linear(hidden_size, hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, t):
        return self.mlp_out(jax.nn.silu(self.mlp_in(timestep_frequencies(t))))


class LabelEmbedder(nnx.Module):
    """Label table with num_classes + 1 rows; the last row is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.embedding_table = nnx.Embed(
            num_classes + 1, hidden_size, param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("classes", "embed")),
            rngs=rngs)

    def __call__(self, y):
        return self.embedding_table(y)


class PatchEmbed(nnx.Module):
    """Linear patch embedding over (C, p, p)-ordered patch features (xavier-uniform, zero bias)."""

    def __init__(self, patch_features: int, hidden_size: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_layout: str = "auto", rngs: nnx.Rngs):
        self.proj = linear(patch_features, hidden_size, ("patch", "embed"),
                           kernel_init=nnx.initializers.xavier_uniform(),
                           bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
                           matmul_layout=matmul_layout, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def patchify(x, p: int):
    """(B, H, W, C) -> (B, H/p * W/p, C*p*p), features in torch `unfold` order (C, p, p)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # B, H/p, W/p, C, p, p
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x, p: int, h: int, w: int, c: int):
    """Inverse of `patchify`: (B, N, C*p*p) -> (B, H, W, C)."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, c, p, p)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # B, H/p, p, W/p, p, C
    return x.reshape(b, h, w, c)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace rounded exactly as torch's CPU kernel does (symmetric from both ends)."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((end - start) / (steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    out = np.where(idx < half, np.float32(start) + step * idx.astype(np.float32),
                   np.float32(end) - step * (steps - idx - 1).astype(np.float32))
    return out.astype(np.float32)


def rope_2d_angles(head_dim: int, height: int, width: int, theta: float = ROPE_THETA,
                   scale: float = ROPE_SCALE) -> np.ndarray:
    """Rotation angles (N, head_dim/2) of the 2-D RoPE, one per adjacent element pair.

    Pair 2m rotates with the x position and pair 2m+1 with the y position, both at frequency
    1/theta^(4m/head_dim); positions are linspace(0, 16, side) so any resolution spans the same
    range.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim} "
                         "(hidden_size / num_heads); pick a width/head count that gives it")
    x_pos = _torch_linspace_f32(0.0, scale, width)
    y_pos = _torch_linspace_f32(0.0, scale, height)
    y_grid, x_grid = np.meshgrid(y_pos, x_pos, indexing="ij")
    exponents = np.arange(0, head_dim, 4)[: head_dim // 4].astype(np.float32) / np.float32(head_dim)
    freqs = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    x_ang = np.outer(x_grid.reshape(-1), freqs).astype(np.float32)
    y_ang = np.outer(y_grid.reshape(-1), freqs).astype(np.float32)
    return np.stack([x_ang, y_ang], axis=-1).reshape(height * width, head_dim // 2)


def apply_rope(x, angles):
    """Rotates adjacent pairs of x (B, N, H, D) by angles (N, D/2) in float32 (complex multiply)."""
    b, n, h, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(b, n, h, d).astype(x.dtype)


class RoPEAttention(nnx.Module):
    """Multi-head self-attention: qkv without bias, per-head q/k RMSNorm, 2-D RoPE.

    The output projection `proj` has a bias.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, attention: str = "xla",
                 dtype=jnp.float32, param_dtype=jnp.float32, matmul_layout: str = "auto",
                 rngs: nnx.Rngs):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dtype = dtype
        self.attention = check_attention(attention)
        self.matmul_layout = check_matmul_layout(matmul_layout)
        kw = dict(dtype=dtype, param_dtype=param_dtype, matmul_layout=matmul_layout, rngs=rngs)
        self.qkv = linear(hidden_size, 3 * hidden_size, ("embed", "qkv"), use_bias=False, **kw)
        self.q_norm = RMSNorm(self.head_dim, param_dtype=param_dtype)
        self.k_norm = RMSNorm(self.head_dim, param_dtype=param_dtype)
        self.proj = linear(hidden_size, hidden_size, ("heads", "embed"), **kw)

    def __call__(self, x, rope_angles):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # B, N, H, D
        q = apply_rope(self.q_norm(q), rope_angles)
        k = apply_rope(self.k_norm(k), rope_angles)
        out = dot_product_attention(q, k, v.astype(q.dtype), self.attention, self.matmul_layout)
        return self.proj(out.reshape(b, n, c))


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x) without biases.

    Hidden width int(2 * 4h / 3), as in the official FeedForward.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_layout: str = "auto", rngs: nnx.Rngs):
        inner = int(2 * int(hidden_size * mlp_ratio) / 3)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  matmul_layout=matmul_layout, rngs=rngs)
        self.w1 = linear(hidden_size, inner, ("embed", "mlp"), **kw)
        self.w3 = linear(hidden_size, inner, ("embed", "mlp"), **kw)
        self.w2 = linear(inner, hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
    """adaLN transformer block: RMSNorm, RoPE attention, SwiGLU, 6-way modulation from `c`.

    `c` is (B, 1, h) for the encoder (silu(t + y)) and per-token (B, N, h) for the decoder (s);
    adaLN is a single Linear: the caller has already applied the SiLU.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 attention: str = "xla", dtype=jnp.float32, param_dtype=jnp.float32,
                 matmul_layout: str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, matmul_layout=matmul_layout, rngs=rngs)
        self.norm1 = RMSNorm(hidden_size, param_dtype=param_dtype)
        self.attn = RoPEAttention(hidden_size, num_heads, attention=attention, **kw)
        self.norm2 = RMSNorm(hidden_size, param_dtype=param_dtype)
        self.mlp = SwiGLU(hidden_size, mlp_ratio, **kw)
        self.adaLN_modulation = linear(hidden_size, 6 * hidden_size, ("embed", "mlp"), **kw)

    def __call__(self, x, c, rope_angles):
        x = constrain_batch(x)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.adaLN_modulation(c), 6, axis=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_angles)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return constrain_batch(x)


def check_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {policy!r}")
    return policy


def _block_fn(graphdef, remat: str, *, prevent_cse: bool = True):
    """(params, x, c, rope) -> block output, rematerialised per `remat` (a REMAT_POLICIES key)."""
    def apply(params, x, c, rope_angles):
        return nnx.merge(graphdef, params)(x, c, rope_angles)

    if check_remat(remat) == "none":
        return apply
    return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def apply_block(block: Block, x, c, rope_angles, remat: str = "none"):
    """`block(x, c, rope_angles)`, as one jax.checkpoint unit unless remat is "none"."""
    if remat == "none":
        return block(x, c, rope_angles)
    graphdef, params = nnx.split(block)
    return _block_fn(graphdef, remat)(params, x, c, rope_angles)


class BlockStack(nnx.Module):
    """Identical Blocks run as one `jax.lax.scan` over their stacked params (model.scan_blocks).

    Compile time no longer grows with depth. Built from unrolled Blocks, so the params (and
    their random init) equal theirs: `layers` is one Block whose every param has a leading layer
    axis (logical name None: replicated; each layer's own dims keep their names and shardings).
    """

    def __init__(self, blocks: Sequence[Block], *, remat: str = "none"):
        if not blocks:
            raise ValueError("a BlockStack needs at least one block")
        self.num_layers = len(blocks)
        self.remat = check_remat(remat)
        graphdef, _ = nnx.split(blocks[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
        stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: None})
        self.layers = nnx.merge(graphdef, stacked)

    def __call__(self, x, c, rope_angles, *, start: int = 0, stop: int | None = None):
        """Blocks [start, stop) of the stack applied to x (all of them by default)."""
        stop = self.num_layers if stop is None else stop
        if not 0 <= start < stop <= self.num_layers:
            raise ValueError(f"block range [{start}, {stop}) is outside the {self.num_layers} "
                             "stacked blocks")
        graphdef, params = nnx.split(self.layers)
        if (start, stop) != (0, self.num_layers):
            params = jax.tree.map(lambda a: a[start:stop], params)
        # Inside a scan CSE cannot merge the recomputation into the forward: no barrier needed.
        block = _block_fn(graphdef, self.remat, prevent_cse=False)

        def body(x, layer_params):
            return block(layer_params, x, c, rope_angles), None

        return jax.lax.scan(body, x, params)[0]


class FinalLayer(nnx.Module):
    """LayerNorm (no affine) + 2-way adaLN + Linear to C*p*p.

    Zero-initialised like the official model.
    """

    def __init__(self, hidden_size: int, patch_features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, matmul_layout: str = "auto", rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros
        kw = dict(kernel_init=zeros, bias_init=zeros, dtype=dtype, param_dtype=param_dtype,
                  matmul_layout=matmul_layout, rngs=rngs)
        self.adaLN_modulation = linear(hidden_size, 2 * hidden_size, ("embed", "mlp"), **kw)
        self.linear = linear(hidden_size, patch_features, ("embed", "patch"), **kw)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
        return self.linear(modulate(layer_norm_no_affine(x), shift, scale))
