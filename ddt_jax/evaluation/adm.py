"""The ADM evaluator's metrics on given features: FID/sFID, Inception Score, precision/recall.

Each function computes what `Evaluator` / `ManifoldEstimator` / `DistanceBlock` in
openai/guided-diffusion `evaluations/evaluator.py` compute (the evaluator behind the published
ImageNet numbers), from features the caller extracted (pool_3, mixed_6/conv, softmax):

  statistics, frechet_distance   FID / sFID (frechet.py's float64 arithmetic)
  inception_score(_splits)       IS over consecutive splits of 5,000 rows, in float32
  manifold_radii                 squared distance to the k-th nearest neighbour (k = 3)
  precision_recall               improved precision / recall (Kynkaanniemi et al. 2019)
  looks_class_sorted             the warning a class-sorted dump deserves (IS depends on order)

Distances, float16 as ADM computes them. ADM evaluates `max((|u|^2 - 2 u.v) + |v|^2, 0)` in
float16 on TensorFlow-CPU, each operation rounded to float16, and recomputes a whole 10,000 x
10,000 block in float32 when any of its float16 entries is not finite. Here (see the tests):
  * the squared norms repeat TF-CPU's float16 `reduce_sum` bit for bit: Eigen's tree reduction
    (halves split on 8-element packet boundaries while a run is longer than 8 * 200), each leaf
    summed by four 8-lane float16 accumulators, merged in float16, then the 8 lanes added in
    float32 (lanes (i, i+4), then (0, 2) and (1, 3)) and rounded to float16, plus a float16
    scalar tail. A float32-accumulated sum rounded once gives precision/recall 0.750000 /
    0.870455 instead of ADM's 0.751429 / 0.870909 on the dense test features;
  * the product is float16 inputs, float32 accumulation, rounded to float16, as TF-CPU's (oneDNN)
    float16 matmul; its float32 summation order is not reproduced, so where float32 accumulation
    is inexact about 5e-4 of the products land one float16 ulp away (measured on lognormal data);
    exact wherever the float32 sum is exact (the test features);
  * the float32 fallback is decided per block_size x block_size block; with ADM's block_size of
    10,000 the blocks are ADM's. It triggers only when a squared norm, a product or a distance
    overflows float16 (above 65504).
Blocks are jitted JAX: no more than one block_size x block_size distance matrix exists at a time
(10,000 x 10,000 float32 = 400 MB), so 50,000 samples against 10,000 references run on an
accelerator; the last block is padded, and padded rows and columns are masked out.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddt_jax.evaluation import frechet

# ADM's defaults: IS splits, neighbourhood size and the rows/columns per distance block.
SPLIT_SIZE = 5000
NEIGHBOURHOOD = 3
BLOCK_SIZE = 10000
DISTANCE_DTYPES = ("float16", "float32", "float64")
# Eigen on TF-CPU (AVX2 build): 8 float16 lanes per packet, 4 packets unrolled, and runs longer
# than 8 * 200 elements split in two (LeafSize<half>() is 200).
_LANES, _UNROLL, _HALF_LEAF = 8, 4, 200
# looks_class_sorted's threshold on (s - E) / (1 - E): random order reads ~0 give or take
# ~sqrt(E/N)/(1-E) (0.01 for 1,000 samples of 10 classes), class-sorted ~1.
SORTED_EXCESS = 0.5

frechet_distance = frechet.frechet_distance
FrechetDistanceError = frechet.FrechetDistanceError


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of a feature set, as ADM's `compute_statistics`.

    ADM keeps `np.mean` of float32 activations in float32; the mean here is float64 (the covariance
    is float64 in both). On the test features the FID moves by 1.6e-8 (of 23.07) for it.

    Args:
      features: (N, D) activations, N >= 2 (pool_3 for FID, mixed_6/conv for sFID).

    Returns:
      (mu, sigma): (D,) mean and (D, D) unbiased covariance, float64.
    """
    return frechet.feature_statistics(features)


# --------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------
def _check_softmax(softmax) -> np.ndarray:
    p = np.asarray(softmax)
    hint = "pass the softmax, not pool features/logits"
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"softmax must be a non-empty (N, classes) array, got shape {p.shape}: "
                         f"{hint}")
    p = p.astype(np.float32)  # ADM's softmax graph outputs float32
    sums = p.sum(axis=1, dtype=np.float64)
    if not np.isfinite(p).all() or p.min() < 0 or np.abs(sums - 1).max() > 1e-3:
        raise ValueError("softmax rows must be non-negative and sum to 1 (row sums "
                         f"{sums.min():.4g}..{sums.max():.4g}): {hint}")
    return p


def inception_score_splits(softmax, split_size: int = SPLIT_SIZE) -> np.ndarray:
    """Per-split Inception Scores, as ADM's `compute_inception_score` forms them.

    Rows are split in order into consecutive parts of `split_size` (the last, partial one
    included); each scores exp(mean_i KL(p_i || mean p)) in float32. Order matters: shuffle a
    class-sorted dump first (see `looks_class_sorted`).

    Args:
      softmax: (N, classes) class probabilities (ADM: softmax(pool_3 @ W), no bias).
      split_size: rows per split.

    Returns:
      (ceil(N / split_size),) float32 scores.
    """
    p = _check_softmax(softmax)
    if int(split_size) != split_size or split_size < 1:
        raise ValueError(f"split_size must be a positive integer, got {split_size}")
    split_size = int(split_size)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        # A probability of exactly 0 gives ADM 0 * log(0) = nan; its limit 0 is used here.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0)
        scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
    return np.asarray(scores, dtype=np.float32)


def inception_score(softmax, split_size: int = SPLIT_SIZE) -> float:
    """The Inception Score: the mean of `inception_score_splits` (what ADM reports).

    Args:
      softmax: (N, classes) class probabilities.
      split_size: rows per split (ADM: 5,000).

    Returns:
      The score as a python float.
    """
    return float(np.mean(inception_score_splits(softmax, split_size)))


def looks_class_sorted(labels=None, softmax=None) -> str | None:
    """Says whether a dump's order looks class-sorted, which ruins its Inception Score.

    IS averages over consecutive splits of 5,000 samples; a class-sorted 50K ImageNet dump puts
    100 of the 1,000 classes in each split and scores IS ~68 instead of ~300. The statistic is the
    share s of consecutive pairs with equal labels, against its expectation E under a random order
    of the same labels (sum_c n_c (n_c - 1) / (N (N - 1)), 1/classes when balanced): the dump is
    flagged when (s - E) / (1 - E) > SORTED_EXCESS (0.5). A random order reads ~0, sorted ~1;
    batches of one class each count as sorted too, rightly (their splits see few classes too).

    Args:
      labels: (N,) integer labels (a dump's arr_1), or None.
      softmax: (N, classes) probabilities whose argmax stands in for labels, or None.

    Returns:
      A warning message when either looks class-sorted, else None.

    Raises:
      ValueError: neither is given, or one is not 1-D labels / 2-D probabilities.
    """
    if labels is None and softmax is None:
        raise ValueError("pass labels (arr_1) or softmax")
    candidates = []
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        candidates.append(("labels (arr_1)", labels))
    if softmax is not None:
        softmax = np.asarray(softmax)
        if softmax.ndim != 2:
            raise ValueError(f"softmax must be (N, classes), got shape {softmax.shape}")
        candidates.append(("softmax argmax", softmax.argmax(axis=1)))
    for source, classes in candidates:
        n = len(classes)
        if n < 3:
            continue
        share = float(np.mean(classes[1:] == classes[:-1]))
        counts = np.unique(classes, return_counts=True)[1].astype(np.float64)
        expected = float(np.sum(counts * (counts - 1)) / (n * (n - 1)))
        if expected < 1 and (share - expected) / (1 - expected) > SORTED_EXCESS:
            return (f"{source} look class-sorted: {share:.1%} of consecutive samples share a "
                    f"class, {expected:.1%} expected in random order. Inception Score splits "
                    "consecutive rows into parts of 5,000, each then sees few classes (a "
                    "class-sorted 50K ImageNet dump scores ~68 instead of ~300): shuffle the "
                    "samples with one fixed permutation before scoring.")
    return None


# --------------------------------------------------------------------------------------------------
# Distances (jitted blocks)
# --------------------------------------------------------------------------------------------------
def _predux_half(acc):
    # Packet8h -> float: lanes (i, i + 4) added, then (0, 2) and (1, 3), then the two; one rounding.
    a = acc.astype(jnp.float32)
    b = a[:, :4] + a[:, 4:]
    c = b[:, :2] + b[:, 2:]
    return (c[:, 0] + c[:, 1]).astype(jnp.float16)


def _half_leaf_sum(x):
    n = x.shape[1]
    acc = jnp.zeros((x.shape[0], _LANES), jnp.float16)
    start = 0
    step = _LANES * _UNROLL
    if n >= step:
        m = n // step
        chunks = x[:, :m * step].reshape(x.shape[0], m, _UNROLL, _LANES).transpose(1, 0, 2, 3)
        acc4 = jax.lax.fori_loop(0, m, lambda j, a: a + chunks[j],
                                 jnp.zeros((x.shape[0], _UNROLL, _LANES), jnp.float16))
        acc = acc4[:, 0]
        for u in range(1, _UNROLL):
            acc = acc + acc4[:, u]
        start = m * step
    vectorized = n // _LANES * _LANES
    for j in range(start, vectorized, _LANES):  # at most 3 packets after the unrolled part
        acc = acc + x[:, j:j + _LANES]
    tail = jnp.zeros((x.shape[0],), jnp.float16)
    for j in range(max(start, vectorized), n):  # at most 7 scalars
        tail = tail + x[:, j]
    return tail + _predux_half(acc)


def _half_tree_sum(x, first: int):
    """TF-CPU's float16 row sum of x (rows, n) whose rows start at flat index `first` (mod 8)."""
    n = x.shape[1]
    if n <= _LANES * _HALF_LEAF:
        return _half_leaf_sum(x)
    # The split is aligned on a packet boundary of the flat (row-major) tensor.
    split = -(-(first + -(-n // 2)) // _LANES) * _LANES
    left = min(split - first, n)
    total = _half_tree_sum(x[:, :left], first)
    if left < n:
        total = total + _half_tree_sum(x[:, left:], (first + left) % _LANES)
    return total


# Two executables on purpose: fused with the sum, LLVM contracts each square and the add after it
# into one FMA and drops the square's float16 rounding (XLA removes optimization_barrier first).
_half_squares = jax.jit(lambda x16: x16 * x16)
_half_row_sums = jax.jit(_half_tree_sum, static_argnames=("first",))


def _squared_norms(x: jax.Array) -> jax.Array:
    """(N,) squared norms in x's dtype as ADM's graph forms them (float16: TF-CPU's order)."""
    if x.dtype != jnp.float16:
        return jnp.sum(jnp.square(x), axis=1)
    squares = _half_squares(x)
    n, d = x.shape
    # Row i starts at flat index i * d: its alignment class (i * d) % 8 fixes the split points of
    # rows that are split at all. (ADM's 10,000-row batches start at multiples of 8 too.)
    first = (np.arange(n) * d) % _LANES if d > _LANES * _HALF_LEAF else np.zeros(n, int)
    norms = jnp.zeros((n,), jnp.float16)
    for c in np.unique(first):
        norms = jnp.where(jnp.asarray(first == c), _half_row_sums(squares, first=int(c)), norms)
    return norms


def _distances(u, nu, v, nv):
    """max((|u|^2 - 2 u.v) + |v|^2, 0) with every operation in the inputs' dtype."""
    if u.dtype == jnp.float16:
        # Exact float16 products accumulated in float32 (tensor cores on a GPU), one rounding.
        uv = jnp.dot(u, v.T, preferred_element_type=jnp.float32).astype(jnp.float16)
    else:
        uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)  # no TF32 on a GPU
    # uv + uv, not 2 * uv: a multiply would be contracted with the subtraction into one FMA.
    return jnp.maximum((nu[:, None] - (uv + uv)) + nv[None, :], 0)


def _block(u, nu, v, nv, u32, nu32, v32, nv32):
    """One distance block in float32; float16 blocks with a non-finite entry redone in float32."""
    d = _distances(u, nu, v, nv)
    if d.dtype != jnp.float16:
        return d.astype(jnp.float32)  # ADM compares float32 distances with float32 radii
    return jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda: d.astype(jnp.float32),
                        lambda: _distances(u32, nu32, v32, nv32))


@functools.partial(jax.jit, static_argnames=("k",))
def _radii_rows(rows, cols, cols_valid, k: int):
    """(k+1)-th smallest distance of each row (rows: u, nu, u32, nu32) to the column blocks."""
    u, nu, u32, nu32 = rows

    def step(best, block):
        v, nv, v32, nv32, valid = block
        d = _block(u, nu, v, nv, u32, nu32, v32, nv32)
        d = jnp.where(valid[None, :], d, jnp.inf)
        merged = jnp.concatenate([best, d], axis=1)
        return -jax.lax.top_k(-merged, k + 1)[0], None

    best = jnp.full((u.shape[0], k + 1), jnp.inf, jnp.float32)
    best, _ = jax.lax.scan(step, best, (*cols, cols_valid))
    return best[:, k]


@jax.jit
def _inside_rows(rows, rows_radii, cols, cols_radii):
    """Which rows lie inside some column's sphere, and which columns inside some row's."""
    u, nu, u32, nu32 = rows

    def step(rows_in, block):
        v, nv, v32, nv32, radii = block
        d = _block(u, nu, v, nv, u32, nu32, v32, nv32)
        rows_in = rows_in | jnp.any(d <= radii[None, :], axis=1)
        return rows_in, jnp.any(d <= rows_radii[:, None], axis=0)

    rows_in = jnp.zeros((u.shape[0],), bool)
    return jax.lax.scan(step, rows_in, (*cols, cols_radii))


class _Blocks:
    """A feature set padded to whole blocks: (blocks, size, D) features and squared norms in the
    distance dtype and in float32 (the fallback), and which rows are real."""

    def __init__(self, features, dtype: str, block_size: int):
        features = _check_features(features)
        n = len(features)
        self.n, self.size = n, min(block_size, n)
        self.count = -(-n // self.size)
        pad = self.count * self.size - n
        shape = (self.count, self.size)

        def blocked(x):
            return x.reshape(*shape, *x.shape[1:])

        def operands(name):
            x = jnp.asarray(features, name)
            # Norms of the unpadded rows: padding must not move a row's float16 alignment class.
            return (blocked(jnp.pad(x, ((0, pad), (0, 0)))),
                    blocked(jnp.pad(_squared_norms(x), (0, pad))))

        # (features, norms) in the distance dtype, then the float32 pair a float16 block falls
        # back to (the same pair again for the other dtypes, which never fall back).
        main = operands(dtype)
        self.arrays = main + (operands("float32") if dtype == "float16" else main)
        self.valid = blocked(jnp.arange(self.count * self.size) < n)

    def block(self, i):
        return tuple(a[i] for a in self.arrays)

    def blocked(self, values, fill):
        pad = self.count * self.size - self.n
        return jnp.pad(jnp.asarray(values), (0, pad), constant_values=fill).reshape(
            self.count, self.size)


def _check_features(features) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"features must be numeric, got {features.dtype}")
    # ADM feeds float32 placeholders and casts to float16 from there.
    features = features.astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError("features contain inf or nan")
    return features


def _check_options(distance_dtype: str, block_size: int, k: int | None = None):
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, got "
                         f"{distance_dtype!r}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    if k is not None and (int(k) != k or k < 1):
        raise ValueError(f"k must be a positive integer, got {k}")


def _radii(blocks: _Blocks, k: int) -> np.ndarray:
    if k >= blocks.n:
        raise ValueError(f"k = {k} needs more than {k} feature vectors, got {blocks.n}")
    cols = blocks.arrays
    return np.concatenate([np.asarray(_radii_rows(blocks.block(i), cols, blocks.valid, k=k))
                           for i in range(blocks.count)])[:blocks.n]


def manifold_radii(features, k: int = NEIGHBOURHOOD, distance_dtype: str = "float16",
                   block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Radius of each feature's k-NN sphere, as ADM's `ManifoldEstimator.manifold_radii`.

    The squared L2 distance to the k-th nearest other feature: index k of the ascending distances
    to all N features, index 0 being the point itself (whose float16 self-distance need not be 0).

    Args:
      features: (N, D) features, N > k.
      k: neighbourhood size (ADM: 3).
      distance_dtype: "float16" (ADM's arithmetic, module docstring), "float32" or "float64".
      block_size: rows and columns per distance block (ADM: 10,000).

    Returns:
      (N,) float32 squared radii.
    """
    _check_options(distance_dtype, block_size, k)
    with jax.enable_x64(distance_dtype == "float64"):
        return _radii(_Blocks(features, distance_dtype, int(block_size)), int(k))


def precision_recall(ref_features, sample_features, *, k: int = NEIGHBOURHOOD,
                     distance_dtype: str = "float16",
                     block_size: int = BLOCK_SIZE) -> tuple[float, float]:
    """Improved precision and recall, as ADM's `compute_prec_recall`.

    precision: the share of samples within (d <= radius) the k-NN sphere of some reference;
    recall: the share of references within the k-NN sphere of some sample. Distances are those
    between reference rows and sample columns, d(ref, sample), in ADM's operand order.

    Args:
      ref_features: (N_ref, D) reference features (ADM: pool_3 of the 10,000 reference images).
      sample_features: (N_sample, D) sample features.
      k: neighbourhood size (ADM: 3).
      distance_dtype: "float16" (ADM's arithmetic, module docstring), "float32" or "float64".
      block_size: rows and columns per distance block (ADM: 10,000).

    Returns:
      (precision, recall) as python floats.
    """
    _check_options(distance_dtype, block_size, k)
    ref_features, sample_features = np.asarray(ref_features), np.asarray(sample_features)
    if ref_features.ndim == sample_features.ndim == 2 and (
            ref_features.shape[1] != sample_features.shape[1]):
        raise ValueError(f"feature dimensions differ: {ref_features.shape} vs "
                         f"{sample_features.shape}")
    with jax.enable_x64(distance_dtype == "float64"):
        refs = _Blocks(ref_features, distance_dtype, int(block_size))
        samples = _Blocks(sample_features, distance_dtype, int(block_size))
        # Padded entries get radius -inf: no distance (>= 0) lies inside them.
        ref_radii = refs.blocked(_radii(refs, int(k)), -np.inf)
        sample_radii = samples.blocked(_radii(samples, int(k)), -np.inf)
        ref_in, sample_in = [], jnp.zeros((samples.count, samples.size), bool)
        for i in range(refs.count):
            rows_in, cols_in = _inside_rows(refs.block(i), ref_radii[i], samples.arrays,
                                            sample_radii)
            ref_in.append(np.asarray(rows_in))
            sample_in = sample_in | cols_in
        recall = np.concatenate(ref_in)[:refs.n].mean(dtype=np.float64)
        precision = np.asarray(sample_in).reshape(-1)[:samples.n].mean(dtype=np.float64)
    return float(precision), float(recall)
