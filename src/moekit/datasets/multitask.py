"""Two regression tasks whose relatedness is set by one number (Ma et al., 2018, section 4).

The generator of the MMoE paper's synthetic experiment. Two orthogonal unit vectors
:math:`u_1, u_2 \\in \\mathbb{R}^d` and a cosine :math:`p \\in [-1, 1]` give the weight
vectors

.. math::

    w_1 = c\\, u_1, \\qquad w_2 = c\\,\\big(p\\, u_1 + \\sqrt{1 - p^2}\\, u_2\\big),

so that :math:`\\cos(w_1, w_2) = p`, and for :math:`x \\sim N(0, I_d)` the labels are

.. math::

    y_t = w_t^\\top x + \\sum_{i=1}^{m} \\sin(\\alpha_i\\, w_t^\\top x + \\beta_i) + \\varepsilon_t,
    \\qquad \\varepsilon_t \\sim N(0, \\sigma^2),

with the same :math:`\\alpha_i, \\beta_i \\sim N(0, 1)` for both tasks. The paper sets
``d = 100``, ``c = 1``, ``m = 10`` and writes the noise as N(0, 0.01), read here as a
variance: ``noise_std = 0.1``.

What ``p`` controls is the cosine of the weight vectors, not the labels' Pearson
correlation; the paper reports the latter. With :math:`z_t = w_t^\\top x`, the pair
:math:`(z_1, z_2)` is Gaussian with variances :math:`c^2` and covariance :math:`c^2 p`,
and both labels are the same function ``g`` of their :math:`z_t`, so the label
correlation has a closed form (:meth:`MultiTaskTruth.label_correlation`). By Mehler's
expansion, :math:`\\mathrm{Cov}(g(z_1), g(z_2)) = \\sum_{n \\ge 1} a_n^2 (c^2 p)^n / n!`
with :math:`a_n = E[g^{(n)}(z)]`, which is nondecreasing in ``p`` on [0, 1]; it is 0
at ``p = 0`` and, at ``p = 1``, :math:`\\mathrm{Var}(g)/(\\mathrm{Var}(g) + \\sigma^2)`, just
below 1.

References
----------
Ma, Zhao, Yi, Chen, Hong and Chi (2018), Modeling task relationships in multi-task
learning with multi-gate mixture-of-experts, KDD, section 4.2.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

from moekit._core.validation import Interval, InvalidParameterError, validate_params

__all__ = ["MultiTaskTruth", "make_multitask_regression", "make_multitask_truth"]

_CONSTRAINTS = {
    "n_samples": [Interval(numbers.Integral, 1, None, closed="left")],
    "n_features": [Interval(numbers.Integral, 2, None, closed="left")],
    "correlation": [Interval(numbers.Real, -1, 1, closed="both")],
    "scale": [Interval(numbers.Real, 0, None, closed="neither")],
    "n_sines": [Interval(numbers.Integral, 0, None, closed="left")],
    "noise_std": [Interval(numbers.Real, 0, None, closed="left")],
    "random_state": ["random_state"],
}


@dataclass
class MultiTaskTruth:
    """The two tasks of the MMoE paper's synthetic experiment (see the module).

    Attributes
    ----------
    weights : ndarray of shape (2, n_features)
        :math:`w_1, w_2`, each of norm ``scale``, with cosine ``correlation``.
    alpha, beta : ndarray of shape (n_sines,)
        Frequencies and phases of the sine terms, shared by both tasks.
    noise_std : float
        Standard deviation of the label noise.
    correlation : float
        ``p``, the cosine of the two weight vectors.
    """

    weights: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    noise_std: float
    correlation: float

    @property
    def n_features(self) -> int:
        return self.weights.shape[1]

    def mean(self, X: np.ndarray) -> np.ndarray:
        """The noise-free labels :math:`g(w_t^\\top x)`, shape (n, 2)."""
        z = np.asarray(X, dtype=np.float64) @ self.weights.T  # (n, 2)
        return z + np.sin(z[..., None] * self.alpha + self.beta).sum(axis=-1)  # (n, 2)

    def sample(self, n_samples: int, random_state=None) -> tuple[np.ndarray, np.ndarray]:
        """Draw x ~ N(0, I) and both labels; returns X (n, n_features), y (n, 2)."""
        validate_params("MultiTaskTruth.sample", {"n_samples": n_samples}, _CONSTRAINTS)
        rng = check_random_state(random_state)
        X = rng.standard_normal((n_samples, self.n_features))
        y = self.mean(X) + self.noise_std * rng.standard_normal((n_samples, 2))
        return X, y

    def label_covariance(self) -> np.ndarray:
        """The exact covariance matrix of the two labels, shape (2, 2).

        With :math:`s = c^2` and :math:`r = c^2 p`, Gaussian identities give every
        term: :math:`E\\cos(U + \\phi) = \\cos\\phi\\, e^{-\\mathrm{Var}(U)/2}` for
        Gaussian ``U``, :math:`\\sin A \\sin B = \\tfrac12[\\cos(A - B) - \\cos(A + B)]`,
        and Stein's lemma :math:`E[z_1 h(z_2)] = r\\, E[h'(z_2)]`.
        """
        s = float(self.weights[0] @ self.weights[0])  # c^2, both norms are c
        r = float(self.weights[0] @ self.weights[1])  # c^2 p
        var = _g_covariance(s, s, self.alpha, self.beta) + self.noise_std**2
        cov = _g_covariance(s, r, self.alpha, self.beta)
        return np.array([[var, cov], [cov, var]])

    def label_correlation(self) -> float:
        """The exact Pearson correlation of the two labels (see :meth:`label_covariance`)."""
        cov = self.label_covariance()
        return float(cov[0, 1] / cov[0, 0])


def _g_covariance(s: float, r: float, alpha: np.ndarray, beta: np.ndarray) -> float:
    """Cov(g(z1), g(z2)) for g(z) = z + sum_i sin(alpha_i z + beta_i), Var z_t = s, Cov = r."""
    damp = np.exp(-0.5 * alpha**2 * s)  # E e^{i alpha z} = e^{-alpha^2 s / 2}
    # z1 against the sines of z2 and the reverse, by Stein's lemma: r alpha E cos(.)
    linear_sine = 2.0 * r * float(np.sum(alpha * np.cos(beta) * damp))
    a_i, a_j = alpha[:, None], alpha[None, :]
    b_i, b_j = beta[:, None], beta[None, :]
    spread = 0.5 * (a_i**2 + a_j**2) * s
    # E sin(a z1 + b) sin(a' z2 + b') = (E cos(a z1 - a' z2 + b - b') - E cos(... + ...)) / 2
    joint = 0.5 * (
        np.cos(b_i - b_j) * np.exp(-spread + a_i * a_j * r)
        - np.cos(b_i + b_j) * np.exp(-spread - a_i * a_j * r)
    )
    means = np.sin(beta) * damp  # E sin(alpha z + beta)
    sines = float(np.sum(joint) - np.sum(means) ** 2)
    return r + linear_sine + sines


def _check_params(owner: str, params: dict) -> None:
    validate_params(owner, params, _CONSTRAINTS)
    for name in ("scale", "noise_std"):
        if not math.isfinite(params[name]):
            raise InvalidParameterError(
                f"The {name!r} parameter of {owner} must be finite. Got {params[name]!r} instead."
            )


def make_multitask_truth(
    n_features: int = 100,
    correlation: float = 0.5,
    *,
    scale: float = 1.0,
    n_sines: int = 10,
    noise_std: float = 0.1,
    random_state=None,
) -> MultiTaskTruth:
    """Draw the two tasks: orthogonal directions, sine frequencies and phases.

    Parameters
    ----------
    n_features : int, default=100
        ``d``, at least 2.
    correlation : float, default=0.5
        ``p``, the cosine of the two weight vectors, in [-1, 1].
    scale : float, default=1.0
        ``c``, the norm of each weight vector.
    n_sines : int, default=10
        ``m``, sine terms in each label.
    noise_std : float, default=0.1
        Standard deviation of the label noise (the paper's N(0, 0.01)).
    random_state : int, RandomState or None
        The same seed with a different ``correlation`` gives the same directions,
        sines and (through :meth:`MultiTaskTruth.sample`) inputs.

    Returns
    -------
    MultiTaskTruth
    """
    _check_params("make_multitask_truth", dict(locals()))
    rng = check_random_state(random_state)
    u, _ = np.linalg.qr(rng.standard_normal((n_features, 2)))  # (d, 2) orthonormal columns
    p = float(correlation)
    w1 = scale * u[:, 0]
    w2 = scale * (p * u[:, 0] + math.sqrt(max(0.0, 1.0 - p * p)) * u[:, 1])
    return MultiTaskTruth(
        weights=np.stack([w1, w2]),
        alpha=rng.standard_normal(n_sines),
        beta=rng.standard_normal(n_sines),
        noise_std=float(noise_std),
        correlation=p,
    )


def make_multitask_regression(
    n_samples: int = 1000,
    n_features: int = 100,
    correlation: float = 0.5,
    *,
    scale: float = 1.0,
    n_sines: int = 10,
    noise_std: float = 0.1,
    random_state=None,
) -> tuple[np.ndarray, np.ndarray, MultiTaskTruth]:
    """Draw a two-task regression problem of the MMoE paper (section 4.2).

    Parameters
    ----------
    n_samples : int, default=1000
    n_features, correlation, scale, n_sines, noise_std, random_state
        See :func:`make_multitask_truth`.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples, 2)
        Column ``t`` is task ``t``'s label.
    truth : MultiTaskTruth
        The generating tasks; ``truth.sample`` draws more (e.g. held-out) data and
        ``truth.label_correlation()`` is the labels' exact Pearson correlation.

    Examples
    --------
    >>> X, y, truth = make_multitask_regression(500, correlation=0.9, random_state=0)
    >>> X.shape, y.shape
    ((500, 100), (500, 2))
    >>> round(float(truth.weights[0] @ truth.weights[1]), 6)
    0.9
    """
    _check_params("make_multitask_regression", dict(locals()))
    rng = check_random_state(random_state)
    truth = make_multitask_truth(
        n_features,
        correlation,
        scale=scale,
        n_sines=n_sines,
        noise_std=noise_std,
        random_state=rng,
    )
    X, y = truth.sample(n_samples, random_state=rng)
    return X, y, truth
