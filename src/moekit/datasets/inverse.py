"""Inverse problems: a many-to-one forward map whose inverse has several answers.

A forward map f sends causes y to observations x = f(y) + noise. Learning y from x
is the *inverse* problem; where f folds back on itself, one x has several valid y
and the conditional density p(y | x) is multimodal. A regressor that predicts the
conditional mean averages the valid answers into an invalid one; a mixture density
network or a gated mixture of experts can represent every branch (Bishop 1994;
Murphy 2012, section 11.2.4).

Each generator returns an :class:`InverseProblem`: the data, the noise-free forward
map and the exact inverse, so that tests and examples can push predictions back
through f and check them against the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

__all__ = [
    "ArmForward",
    "BishopForward",
    "InverseProblem",
    "make_bishop_inverse",
    "make_robot_arm",
]


@dataclass
class InverseProblem:
    """Data of an inverse problem with its forward map.

    Attributes
    ----------
    X : ndarray of shape (n_samples, n_features)
        Observations, the forward map's noisy outputs: what the inverse model sees.
    y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        Causes, the forward map's inputs: what the inverse model predicts.
    forward : callable
        ``forward(y) -> x``, the noise-free forward map, for y of the shape of one
        or many targets; returns shape (n, n_features).
    inverse : callable
        ``inverse(X) -> list``: for every row of X, an array with every exact
        solution y of f(y) = x inside the range the data were drawn from.
    noise : float
        Size of the noise added to f(y) (see the generator for its distribution).
    """

    X: np.ndarray
    y: np.ndarray
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], list]
    noise: float


# ---------------------------------------------------------------- Bishop (1994)
class BishopForward:
    """x = t + 0.3 sin(2 pi t): Bishop's (1994) curve, which folds back over (0.3, 0.7)."""

    amplitude = 0.3

    def __call__(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        return (t + self.amplitude * np.sin(2.0 * np.pi * t)).reshape(-1, 1)

    def inverse(self, X: np.ndarray, n_grid: int = 2001) -> list[np.ndarray]:
        """Every t in [0, 1] with f(t) = x, per row of X of shape (n, 1).

        f is smooth with two turning points, so sign changes of f(t) - x on a fine
        grid bracket every root; 60 bisection steps then refine each bracket.
        """
        x = np.asarray(X, dtype=np.float64).reshape(-1)
        grid = np.linspace(0.0, 1.0, n_grid)
        g = self(grid)[:, 0][None, :] - x[:, None]  # (n, G)
        g[np.abs(g) < 1e-12] = 0.0  # a root on a grid point, e.g. x = f(1) = 1
        rows, j = np.nonzero(np.sign(g[:, :-1]) * np.sign(g[:, 1:]) <= 0)
        lo, hi, xr = grid[j], grid[j + 1], x[rows]
        g_lo = self(lo)[:, 0] - xr
        for _ in range(60):  # every bracket at once
            mid = 0.5 * (lo + hi)
            left = (self(mid)[:, 0] - xr) * g_lo <= 0
            hi, lo = np.where(left, mid, hi), np.where(left, lo, mid)
            g_lo = np.where(left, g_lo, self(lo)[:, 0] - xr)
        root = 0.5 * (lo + hi)
        out = []
        for i in range(len(x)):
            r = root[rows == i]
            # a root on a grid point is bracketed twice: keep one
            keep = np.concatenate([[True], np.diff(r) > 1e-6]) if len(r) else r.astype(bool)
            out.append(r[keep])
        return out


def make_bishop_inverse(
    n_samples: int = 1000, *, noise: float = 0.1, random_state=None
) -> InverseProblem:
    """Bishop's (1994) toy inverse problem: learn t from x = t + 0.3 sin(2 pi t) + e.

    t ~ U(0, 1) and e ~ U(-noise, noise), as in the paper. For x in about
    (0.35, 0.65) three values of t give the same x (three branches of the inverse);
    elsewhere one does.

    Parameters
    ----------
    n_samples : int, default=1000
    noise : float, default=0.1
        Half-width of the uniform noise on x.
    random_state : int, RandomState or None

    Returns
    -------
    InverseProblem
        ``X`` of shape (n_samples, 1), ``y`` = t of shape (n_samples,).

    References
    ----------
    Bishop (1994), Mixture density networks, Aston University NCRG/94/004.

    Examples
    --------
    >>> prob = make_bishop_inverse(500, random_state=0)
    >>> prob.X.shape, prob.y.shape
    ((500, 1), (500,))
    >>> [len(r) for r in prob.inverse([[0.1], [0.5], [0.9]])]
    [1, 3, 1]
    """
    _check_common(n_samples, noise)
    rng = check_random_state(random_state)
    t = rng.uniform(0.0, 1.0, n_samples)
    f = BishopForward()
    X = f(t) + rng.uniform(-noise, noise, (n_samples, 1))
    return InverseProblem(X=X, y=t, forward=f, inverse=f.inverse, noise=float(noise))


# ------------------------------------------------------------ two-link robot arm
class ArmForward:
    """Hand position of a planar two-link arm from its joint angles.

    .. math::  h = (l_1 \\cos\\theta_1 + l_2 \\cos(\\theta_1 + \\theta_2),\\;
                    l_1 \\sin\\theta_1 + l_2 \\sin(\\theta_1 + \\theta_2))

    theta_1 is the shoulder angle from the x axis, theta_2 the elbow angle relative
    to the upper arm; theta_2 > 0 and theta_2 < 0 are the two elbow configurations.
    """

    def __init__(self, l1: float, l2: float, theta1_range, theta2_max: float) -> None:
        self.l1, self.l2 = float(l1), float(l2)
        self.theta1_range = (float(theta1_range[0]), float(theta1_range[1]))
        self.theta2_max = float(theta2_max)

    def __call__(self, angles: np.ndarray) -> np.ndarray:
        a = np.asarray(angles, dtype=np.float64).reshape(-1, 2)
        t1, t12 = a[:, 0], a[:, 0] + a[:, 1]
        return np.stack(
            [
                self.l1 * np.cos(t1) + self.l2 * np.cos(t12),
                self.l1 * np.sin(t1) + self.l2 * np.sin(t12),
            ],
            axis=1,
        )

    def solutions(self, X: np.ndarray) -> np.ndarray:
        """Both analytic inverses, elbow up (theta_2 > 0) first: shape (n, 2, 2).

        By the law of cosines cos theta_2 = (r^2 - l1^2 - l2^2) / (2 l1 l2); then
        theta_1 = atan2(h_2, h_1) - atan2(l2 sin theta_2, l1 + l2 cos theta_2).
        Unreachable points (|cos theta_2| > 1) are projected onto the workspace.
        """
        h = np.asarray(X, dtype=np.float64).reshape(-1, 2)
        r2 = (h**2).sum(1)
        c2 = np.clip((r2 - self.l1**2 - self.l2**2) / (2 * self.l1 * self.l2), -1.0, 1.0)
        phi = np.arctan2(h[:, 1], h[:, 0])
        out = np.empty((len(h), 2, 2))
        for s, sign in enumerate((1.0, -1.0)):
            t2 = sign * np.arccos(c2)
            t1 = phi - np.arctan2(self.l2 * np.sin(t2), self.l1 + self.l2 * np.cos(t2))
            # put theta_1 in the sampled range's 2 pi window, centred on the range
            centre = 0.5 * sum(self.theta1_range)
            t1 = centre + np.mod(t1 - centre + np.pi, 2 * np.pi) - np.pi
            out[:, s] = np.stack([t1, t2], axis=1)
        return out

    def inverse(self, X: np.ndarray) -> list[np.ndarray]:
        """The analytic solutions of each row that lie in the sampled angle ranges."""
        sols = self.solutions(X)
        lo, hi = self.theta1_range
        ok = (sols[..., 0] >= lo) & (sols[..., 0] <= hi) & (np.abs(sols[..., 1]) <= self.theta2_max)
        return [sols[i][ok[i]] for i in range(len(sols))]


def make_robot_arm(
    n_samples: int = 2000,
    *,
    link_lengths: tuple[float, float] = (0.8, 0.6),
    theta1_range: tuple[float, float] = (0.0, np.pi),
    theta2_max: float = 0.9 * np.pi,
    noise: float = 0.01,
    random_state=None,
) -> InverseProblem:
    """Two-link robot arm: learn the joint angles from the hand position.

    theta_1 ~ U(theta1_range), theta_2 ~ U(-theta2_max, theta2_max) and the hand
    position is f(theta) plus isotropic Gaussian noise. Most reachable points have
    two solutions, elbow up (theta_2 > 0) and elbow down (theta_2 < 0), so p(theta |
    h) is bimodal and its mean is usually no solution at all.

    Parameters
    ----------
    n_samples : int, default=2000
    link_lengths : (float, float), default=(0.8, 0.6)
        Upper arm l1 and forearm l2.
    theta1_range : (float, float), default=(0, pi)
        Range of the shoulder angle (radians); it must be shorter than 2 pi.
    theta2_max : float, default=0.9 pi
        Largest elbow bend (radians), below pi so that the arm never folds flat.
    noise : float, default=0.01
        Standard deviation of the noise on each hand coordinate.
    random_state : int, RandomState or None

    Returns
    -------
    InverseProblem
        ``X`` the hand positions (n_samples, 2), ``y`` the angles (n_samples, 2).

    Examples
    --------
    >>> prob = make_robot_arm(100, random_state=0)
    >>> prob.X.shape, prob.y.shape
    ((100, 2), (100, 2))
    >>> bool(np.abs(prob.forward(prob.y) - prob.X).max() < 0.1)
    True
    """
    _check_common(n_samples, noise)
    l1, l2 = link_lengths
    if not (l1 > 0 and l2 > 0):
        raise ValueError(f"link_lengths must be two positive lengths; got {link_lengths!r}.")
    lo, hi = theta1_range
    if not (hi > lo and hi - lo < 2 * np.pi):
        raise ValueError(
            f"theta1_range must be (low, high) with 0 < high - low < 2 pi; got {theta1_range!r}."
        )
    if not 0.0 < theta2_max < np.pi:
        raise ValueError(f"theta2_max must be in (0, pi); got {theta2_max!r}.")
    rng = check_random_state(random_state)
    angles = np.stack(
        [rng.uniform(lo, hi, n_samples), rng.uniform(-theta2_max, theta2_max, n_samples)],
        axis=1,
    )
    f = ArmForward(l1, l2, theta1_range, theta2_max)
    X = f(angles) + noise * rng.standard_normal((n_samples, 2))
    return InverseProblem(X=X, y=angles, forward=f, inverse=f.inverse, noise=float(noise))


def _check_common(n_samples, noise) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int; got {n_samples!r}.")
    if not (np.isscalar(noise) and np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite float >= 0; got {noise!r}.")
