"""Problems drawn from mixtures of experts with known parameters.

Each generator returns the data and the true model, so that tests and examples can
compare a fit with the truth: the true model's log-likelihood is the ceiling a fit
can reach on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


@dataclass
class MoETruth:
    """A linear-Gaussian mixture of experts with a softmax (or constant) gate.

    p(y | x) = sum_k g_k(x) N(y; x . expert_coef[k] + expert_intercept[k], noise_std[k]^2)
    with g(x) = softmax(gate_coef @ x + gate_intercept), or softmax(gate_intercept)
    alone when ``gate_coef`` is None.

    Attributes
    ----------
    gate_coef : ndarray of shape (K, d) or None
    gate_intercept : ndarray of shape (K,)
    expert_coef : ndarray of shape (K, d)
    expert_intercept : ndarray of shape (K,)
    noise_std : ndarray of shape (K,)
    """

    gate_coef: np.ndarray | None
    gate_intercept: np.ndarray
    expert_coef: np.ndarray
    expert_intercept: np.ndarray
    noise_std: np.ndarray

    @property
    def n_experts(self) -> int:
        return len(self.noise_std)

    def log_gate(self, X: np.ndarray) -> np.ndarray:
        """log g_k(x), shape (n, K)."""
        logits = np.broadcast_to(self.gate_intercept, (len(X), self.n_experts)).copy()
        if self.gate_coef is not None:
            logits += X @ self.gate_coef.T
        return _log_softmax(logits)

    def expert_means(self, X: np.ndarray) -> np.ndarray:
        """Every expert's mean at every row, shape (n, K)."""
        return X @ self.expert_coef.T + self.expert_intercept

    def score_samples(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """log p(y_i | x_i) under the true model, shape (n,)."""
        z = (y[:, None] - self.expert_means(X)) / self.noise_std
        log_n = -0.5 * (np.log(2 * np.pi) + z**2) - np.log(self.noise_std)
        joint = self.log_gate(X) + log_n
        top = joint.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(joint - top).sum(axis=1, keepdims=True)))[:, 0]

    def log_likelihood(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean per-sample log-likelihood under the true model."""
        return float(np.mean(self.score_samples(X, y)))

    def sample(self, n_samples: int, random_state=None) -> tuple[np.ndarray, np.ndarray]:
        """Draw x ~ N(0, I) and y | x from the model; returns X (n, d), y (n,)."""
        rng = check_random_state(random_state)
        d = self.expert_coef.shape[1]
        X = rng.standard_normal((n_samples, d))
        g = np.exp(self.log_gate(X))
        u = rng.random_sample((n_samples, 1))
        z = np.minimum((u > np.cumsum(g, axis=1)).sum(axis=1), self.n_experts - 1)
        means = self.expert_means(X)[np.arange(n_samples), z]
        y = means + self.noise_std[z] * rng.standard_normal(n_samples)
        return X, y


def make_moe_truth(
    n_features: int = 5,
    n_experts: int = 3,
    *,
    gate: str = "softmax",
    gate_scale: float = 3.0,
    coef_scale: float = 2.0,
    noise: float | tuple[float, float] = (0.2, 0.6),
    random_state=None,
) -> MoETruth:
    """A random mixture of experts (see :class:`MoETruth`).

    Parameters
    ----------
    n_features : int, default=5
    n_experts : int, default=3
    gate : {'softmax', 'constant'}, default='softmax'
    gate_scale : float, default=3.0
        Size of the gate's slopes: larger gives sharper regions.
    coef_scale : float, default=2.0
        Spread of the experts' slopes and intercepts.
    noise : float or (low, high), default=(0.2, 0.6)
        Noise standard deviation of every expert, or the range they are drawn from.
    random_state : int, RandomState or None
    """
    rng = check_random_state(random_state)
    K, d = n_experts, n_features
    gate_coef = None
    if gate == "softmax":
        gate_coef = rng.standard_normal((K, d)) * gate_scale / np.sqrt(d)
        gate_intercept = rng.standard_normal(K) * 0.5
    elif gate == "constant":
        gate_intercept = np.log(rng.dirichlet(np.full(K, 5.0)))
    else:
        raise ValueError(f"gate must be 'softmax' or 'constant'; got {gate!r}.")
    low, high = (noise, noise) if np.isscalar(noise) else noise
    return MoETruth(
        gate_coef=gate_coef,
        gate_intercept=gate_intercept,
        expert_coef=rng.standard_normal((K, d)) * coef_scale / np.sqrt(d),
        expert_intercept=rng.standard_normal(K) * coef_scale,
        noise_std=rng.uniform(low, high, K),
    )


def make_moe_regression(
    n_samples: int = 1000,
    n_features: int = 5,
    n_experts: int = 3,
    *,
    gate: str = "softmax",
    random_state=None,
    **truth_kwargs,
) -> tuple[np.ndarray, np.ndarray, MoETruth]:
    """Draw a regression problem from a random mixture of experts.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
    truth : MoETruth
        The generating model; ``truth.sample`` draws more (e.g. held-out) data.

    Examples
    --------
    >>> X, y, truth = make_moe_regression(1000, random_state=0)
    >>> X.shape, y.shape, truth.n_experts
    ((1000, 5), (1000,), 3)
    """
    rng = check_random_state(random_state)
    truth = make_moe_truth(n_features, n_experts, gate=gate, random_state=rng, **truth_kwargs)
    X, y = truth.sample(n_samples, random_state=rng)
    return X, y, truth
