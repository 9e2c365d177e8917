"""What the tests of the GLM expert families share: data from two known experts under a
logistic gate, the comparison of a fit's summary() with the truth, and the
objective Q of a family's M-step under fixed responsibilities.

Imported by name: pytest puts this folder on the path (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from moekit._core.data import Chunk, EMData

GATE = (0.3, 2.5)
"""Truth of the gate: P(expert 1 | x) = sigmoid(0.3 + 2.5 x)."""


def two_experts(n: int, coef: np.ndarray, seed: int):
    """x ~ U(-1, 1), the expert z of each row and its linear predictor a_z + b_z x.

    ``coef`` is (2, 2): [intercept, slope] per expert, expert 1 the one with the
    larger mean over x, so that the fit's documented order matches.
    """
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 1))
    z = (rng.random(n) < 1 / (1 + np.exp(-(GATE[0] + GATE[1] * X[:, 0])))).astype(int)
    eta = coef[z, 0] + coef[z, 1] * X[:, 0]
    return X, z, eta, rng


def z_scores(model, coef: np.ndarray, extra: dict[str, np.ndarray]) -> dict[str, float]:
    """(estimate - truth) / standard error of every parameter of a K = 2 fit's summary()."""
    table = model.summary().table
    out = {}
    for k in range(2):
        truth = {"intercept": coef[k, 0], "x0": coef[k, 1]}
        truth.update({name: value[k] for name, value in extra.items()})
        for name, value in truth.items():
            row = table[(table.block == f"expert {k}") & (table.parameter == name)].iloc[0]
            out[f"expert {k} {name}"] = (row.estimate - value) / row.std_error
    gate = table[table.block == "gate: expert 1 vs 0"]
    for name, value in zip(("intercept", "x0"), GATE, strict=True):
        row = gate[gate.parameter == name].iloc[0]
        out[f"gate {name}"] = (row.estimate - value) / row.std_error
    return out


def coverage(model, X: np.ndarray, y: np.ndarray, alpha: float = 0.9) -> float:
    """Share of the rows y whose value lies in the central ``alpha`` predictive interval."""
    lo, hi = model.predict_distribution(X).interval(alpha)
    return float(np.mean((y >= lo) & (y <= hi)))


def objective(family, params, data: EMData, resp: torch.Tensor) -> float:
    """Q = sum_i sum_k r_ik log p_k(y_i | x_i) + log prior, for fixed responsibilities."""
    logp = family.log_prob(params, Chunk(0, data.n, data))
    return float((resp * logp).sum()) + family.log_prior(params)


def m_step_objectives(family, data: EMData, steps: int = 8, seed: int = 0) -> list[float]:
    """Q after each of ``steps`` M-steps from the family's start, with random
    responsibilities held fixed (the M-step alone, without the EM loop's checks)."""
    family.prepare(data)
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(family.n_experts, data.n, generator=g, dtype=torch.float64))
    resp = e / e.sum(0)
    if hasattr(family, "init_params"):
        params = family.init_params(data)
    else:  # a family without a start takes its first step from the responsibilities
        stats = family.chunk_stats(None, Chunk(0, data.n, data), resp)
        params = family.m_step(None, stats, data, None)
    history = [objective(family, params, data, resp)]
    for _ in range(steps):
        stats = family.chunk_stats(params, Chunk(0, data.n, data), resp)
        params = family.m_step(params, stats, data, None)
        history.append(objective(family, params, data, resp))
    return history


def never_falls(q: list[float]) -> bool:
    """Whether every value is at least the one before (to rounding)."""
    return all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(q))


def design(X: np.ndarray) -> torch.Tensor:
    """A feature-major design with the intercept row last, as EM builds it (unscaled)."""
    Xt = torch.as_tensor(X.T, dtype=torch.float64)
    return torch.cat([Xt, torch.ones(1, Xt.shape[1], dtype=torch.float64)])
