"""Frechet distance between two feature sets, computed as the ADM evaluator computes it.

Same arithmetic as `FIDStatistics.frechet_distance` in openai/guided-diffusion
`evaluations/evaluator.py` (the evaluator behind the published ImageNet FIDs), so the number is
comparable whatever network produced the features (Inception pool_3 for ImageNet FID, the small
digit classifier for the MNIST demo):

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

# ADM's defaults: the diagonal offset for a singular product, and the largest imaginary part on the
# diagonal of sqrtm(sigma1 @ sigma2) that is still treated as rounding noise.
SINGULAR_EPS = 1e-6
IMAG_ATOL = 1e-3


class FrechetDistanceError(ValueError):
    """sqrtm(sigma1 @ sigma2) has a large imaginary part: the inputs are not covariances."""


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, as ADM's `compute_statistics` computes them.

    Args:
      features: (N, D) feature vectors, N >= 2, any float dtype.

    Returns:
      (mu, sigma): the (D,) mean and the (D, D) unbiased covariance (`np.cov(rowvar=False)`), both
      float64.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance, "
                         f"got {features.shape[0]}")
    # float64 throughout: np.cov promotes to float64 anyway (as in ADM), and the mean should match
    # it.
    features = features.astype(np.float64)
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # ADM passes disp=False only to also get the error estimate, which it discards; SciPy 1.16
    # deprecated `disp` (removed in 1.18) and the matrix returned is the same either way.
    return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): d^2 of the module docstring.

    Args:
      mu1: (D,) mean of the first feature set.
      sigma1: (D, D) covariance of the first feature set.
      mu2: (D,) mean of the second feature set.
      sigma2: (D, D) covariance of the second feature set.
      eps: added to both diagonals (with a RuntimeWarning) when sqrtm(sigma1 @ sigma2) is not
        finite, as ADM does for a singular product.

    Returns:
      The distance as a python float (what FID reports).

    Raises:
      ValueError: the shapes do not match.
      FrechetDistanceError: sqrtm(sigma1 @ sigma2) has an imaginary part above IMAG_ATOL on its
        diagonal (an input is not a covariance).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and "
                         f"{mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} "
                         f"and {sigma2.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than feature dimensions, dead features) can make sqrtm
        # return inf/nan; ADM then retries with eps on both diagonals.
        warnings.warn("Frechet distance: sqrtm(sigma1 @ sigma2) is not finite (singular "
                      f"product); adding {eps} to the diagonal of both covariances",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    # The product of two PSD matrices has real, non-negative eigenvalues; rounding can still leave a
    # small imaginary part. A large one means an input was not a covariance matrix.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise FrechetDistanceError(
                "sqrtm(sigma1 @ sigma2) has an imaginary component of up to "
                f"{np.max(np.abs(covmean.imag)):.3g} (tolerance {IMAG_ATOL} on the diagonal): "
                "sigma1 and sigma2 must be symmetric positive semi-definite covariance matrices")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
