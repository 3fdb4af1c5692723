"""A partly whitening metric for latents: the weights behind `training/latent_metric.py` (the flow-matching loss
measured in a whitened basis of the per-token latent covariance) and `evals/latent_signal.py` (how much of that
metric an attribute swap moves). Pure numpy."""
from __future__ import annotations

import numpy as np


def covariance_weights(covariance: np.ndarray, alpha: float, cap: float) -> np.ndarray:
    """(C, C) matrix W with W W^T the metric: eigenvector weights (lambda / mean lambda)^-alpha clipped to
    [1 / cap, cap] (no direction is amplified or silenced by more than `cap`), normalised so their mean is 1."""
    eigvals, eigvecs = np.linalg.eigh(np.asarray(covariance, np.float64))
    eigvals = np.maximum(eigvals, 1e-12)
    weights = np.clip((eigvals / eigvals.mean()) ** (-float(alpha)), 1.0 / float(cap), float(cap))
    weights = weights / weights.mean()
    return (eigvecs * np.sqrt(weights)[None, :]) @ eigvecs.T
