"""What the generalised-linear expert families share: target checks, the Newton
(IRLS) step on the coefficients, a guarded 1-d Newton step on a positive shape
parameter, and the report of their coefficients.

Each family of this kind models a response through a linear predictor
eta_k(x) = b_k . x and a link (log for counts, amounts and positive responses,
logit for proportions). The coefficient step of every one of them is

.. math::  b_k \\leftarrow b_k + (H_k + \\alpha D)^{-1} (g_k - \\alpha D b_k),

with g_k = sum_i r_ik s_i x_i the gradient of the expert's part of Q and
H_k = sum_i r_ik w_i x_i x_i^T its (observed or expected) information, D the
identity on the slopes: a weighted Gram matrix with weights r_ik w_i, so that the
statistics are sums over rows (data-parallel EM all-reduces them).

The ``*_many`` helpers serve the families' batched methods, which compute S EM
starts at once (:mod:`moekit.fitting.batched`): products batched with one start's
shape, systems solved at an even size, and an expert's emptiness judged within its
own start, so that a start's numbers do not depend on its batch mates.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from moekit._core.batch import design_sums, empty_experts, times_design
from moekit._core.data import unpack_grams
from moekit._core.linalg import even_system, solve_psd
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite

MAX_ETA_STEP = 5.0
"""Largest change of any coefficient in one Newton step, on the standardised design.

A first step from a poor start can overshoot by orders of magnitude on a log scale
(exp(eta) then overflows); a step this long changes a fitted mean by a factor of
e^5 per standard deviation of a feature, more than any step of a converging fit.
"""


# ---------------------------------------------------------------------- target checks
def check_columns(y2: np.ndarray, option: str, columns: int, what: str) -> None:
    if y2.shape[1] != columns:
        raise ValueError(f"expert={option!r} models {what}; y has {y2.shape[1]} columns.")


def check_counts(y2: np.ndarray, option: str) -> np.ndarray:
    """One column of non-negative integer counts, else a ValueError naming ``option``."""
    check_columns(y2, option, 1, "one count target")
    if (y2 < 0).any() or (y2 != np.round(y2)).any():
        raise ValueError(f"expert={option!r} needs y of non-negative integer counts.")
    return y2


def check_positive(y2: np.ndarray, option: str) -> np.ndarray:
    """One column of positive values, else a ValueError naming ``option``."""
    check_columns(y2, option, 1, "one positive target")
    if (y2 <= 0).any():
        raise ValueError(
            f"expert={option!r} needs y > 0; got {int((y2 <= 0).sum())} value(s) <= 0 "
            f"(smallest {float(y2.min())!r})."
        )
    return y2


# ---------------------------------------------------------------------- steps
def newton_step(
    coef: torch.Tensor, grad: torch.Tensor, H: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The penalised Newton step of every expert's coefficients, shape (K, p).

    Parameters
    ----------
    coef : Tensor of shape (K, p)
        Current coefficients, the intercept last.
    grad : Tensor of shape (K, p)
        sum_i r_ik s_i x_i, the gradient of the expert's part of Q.
    H : Tensor of shape (K, p, p)
        sum_i r_ik w_i x_i x_i^T (summed weighted Grams, :func:`unpack_grams`).
    alpha : float
        Ridge on the slopes (not the intercept), on the summed log-likelihood scale.

    Returns
    -------
    Tensor of shape (K, p)
        The step, shortened so that no coefficient moves more than ``MAX_ETA_STEP``.
    """
    return _ridge_newton(coef, grad, H, alpha, even=False)


def newton_step_many(
    coef: torch.Tensor, grad: torch.Tensor, H: torch.Tensor, alpha: float
) -> torch.Tensor:
    """:func:`newton_step` of the experts of several fits laid end to end, (S K, p).

    The systems are solved at an even size (:func:`moekit._core.linalg.even_system`,
    a zero appended), so that a fit's step does not depend on its place in the batch.
    """
    return _ridge_newton(coef, grad, H, alpha, even=True)


def _ridge_newton(coef, grad, H, alpha: float, even: bool) -> torch.Tensor:
    step = psd_step(*ridged(coef, grad, H, alpha), even)
    longest = step.abs().amax(1, keepdim=True)
    return step * (MAX_ETA_STEP / longest.clamp(min=MAX_ETA_STEP))


def ridged(coef: torch.Tensor, grad: torch.Tensor, H: torch.Tensor,
           alpha: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The ridge's information and gradient added: H + alpha D and g - alpha D b,
    D the identity on the slopes (not the intercept, the last coefficient)."""
    pen, ridge = _ridge(coef.shape[1], alpha, coef.dtype, coef.device)
    return H + ridge, grad - alpha * coef * pen


@functools.lru_cache(maxsize=64)
def _ridge(p: int, alpha: float, dtype: torch.dtype, device: torch.device):
    """D's diagonal (p,) and alpha D (p, p), made once per width (read, never written)."""
    pen = torch.ones(p, dtype=dtype, device=device)
    pen[-1] = 0.0
    return pen, alpha * torch.diag(pen)


def psd_step(H: torch.Tensor, g: torch.Tensor, even: bool = False) -> torch.Tensor:
    """H_k^{-1} g_k of every expert (minimum-norm, :func:`solve_psd`), shape (K, p).

    ``even``: systems of odd size p are solved grown to p + 1, as for a batch of fits.
    """
    if not even:
        return solve_psd(H, g.unsqueeze(-1)).squeeze(-1)
    return solve_psd(*even_system(H, g.unsqueeze(-1), 0.0))[:, : g.shape[1], 0]


def guarded_newton_1d(
    x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, lo: float, hi: float, cap: float = 2.0
) -> torch.Tensor:
    """One Newton step on a scalar per expert (a log shape), guarded, shape (K,).

    Where the objective is concave there (d2 < 0) the step is -d1 / d2; elsewhere a
    step of length ``cap`` uphill. Steps are at most ``cap`` long and stay in
    [lo, hi]: the EM loop checks the likelihood after the step and shortens it.
    """
    newton = torch.where(d2 < 0, -d1 / d2.clamp(max=-1e-300), torch.sign(d1) * cap)
    return (x + newton.clamp(-cap, cap)).clamp(lo, hi)


def linear_predictor(coef: torch.Tensor, XT: torch.Tensor,
                     offset: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """eta_ik = b_k . x_i + o_i of shape (K, n): the offset o (n,), a known term such as
    a log exposure, enters every expert's linear predictor with coefficient 1."""
    eta = coef @ XT
    return eta if offset is None else eta.add_(offset)


def chunk_eta(coef: torch.Tensor, chunk) -> torch.Tensor:
    """:func:`linear_predictor` of a chunk's rows, with the data's offset."""
    return linear_predictor(coef, chunk.XeT, chunk.offset)


def has_weight(nk: torch.Tensor) -> torch.Tensor:
    """Whether each expert holds any weight at all (K,); an empty one keeps its parameters."""
    return nk > 1e-12 * max(float(nk.sum()), 1.0)


def has_weight_many(nk: torch.Tensor) -> torch.Tensor:
    """:func:`has_weight` of S fits' experts nk (S, K), each fit on its own, flat (S K,)."""
    return ~empty_experts(nk.reshape(-1), nk.shape[1])


# ---------------------------------------------------------------------- many starts
# S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p). Products
# are batched ones of one start's shape, so that a start's numbers do not depend on
# its batch mates.
def chunk_eta_many(coef: torch.Tensor, chunk) -> torch.Tensor:
    """:func:`chunk_eta` of S stacked starts' coefficients (S, K, p), shape (S, K, c)."""
    eta = times_design(coef, chunk.XeT)
    return eta if chunk.offset is None else eta.add_(chunk.offset)


def row_sums_many(w: torch.Tensor, chunk) -> torch.Tensor:
    """sum_i w_ski x_i of weights (S, K, c) on the chunk's design, shape (S, K, p)."""
    return design_sums(w, chunk.XeT)


def grams(stats: torch.Tensor, p: int) -> torch.Tensor:
    """Summed weighted Grams (either layout) as matrices (K, p, p)."""
    return unpack_grams(stats, p)[0]


# ---------------------------------------------------------------------- reporting
def report_coef(coef: torch.Tensor, scaling: Scaling, extra: dict | None = None) -> Report:
    """Every expert's intercept and slopes in the data's units, then its positive
    parameters ``extra`` (name -> (K,) values; reported, not tested against 0)."""
    K = coef.shape[0]
    labels = coef_labels(scaling)
    out = Report()
    out.add("coef", coef_to_data(coef, scaling),
            [f"expert {k}" for k in range(K) for _ in labels], labels * K)  # fmt: skip
    for name, value in (extra or {}).items():
        out.add(name, value, [f"expert {k}" for k in range(K)], [name] * K, tested=False)
    return out


def coef_of_report(values: dict, scaling: Scaling) -> torch.Tensor:
    """The standardised-design coefficients of reported ones (differentiable)."""
    return coef_from_data(values["coef"], scaling)


# ---------------------------------------------------------------------- shared members
class RidgeGLM:
    """Members every GLM family of one target shares (not a protocol: a base to
    inherit): K experts of coefficients ``coef`` (K, p) with a ridge ``alpha`` on
    the slopes, fitted on the target's own scale.

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes, on the summed log-likelihood scale.
    """

    needs_resp = False
    single_optimum = True  # alone, a concave (or closed-form) fit: K = 1 needs one start
    standardize_target = False
    target_columns = 1

    #: an offset (``fit(..., offset=)``) enters the linear predictor of these families
    takes_offset = True

    def __init__(self, n_experts: int, alpha: float = 1e-6) -> None:
        self.n_experts = n_experts
        self.alpha = alpha

    def start_coef(self, XeT: torch.Tensor, intercept: float) -> torch.Tensor:
        """Coefficients (K, p) of every expert at a constant linear predictor."""
        coef = XeT.new_zeros((self.n_experts, XeT.shape[0]))
        coef[:, -1] = intercept
        return coef

    def log_prior(self, params) -> float:
        return -0.5 * self.alpha * float((params.coef[:, :-1] ** 2).sum())

    def log_prior_many(self, params) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts (coef (S, K, p)), shape (S,)."""
        return -0.5 * self.alpha * (params.coef[..., :-1] ** 2).sum((1, 2))

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return -0.5 * self.alpha * (free["coef"][:, :-1] ** 2).sum()

    def predictive_extra(self, params) -> dict:
        return {}

    @property
    def n_outputs(self) -> int:
        """One output (a count, an amount, a probability of success)."""
        return 1


class ShapedAmountGLM(RidgeGLM):
    """Members the GLM families of positive amounts with a shape per expert share
    (Gamma, Weibull): parameters ``params_type(coef, shape)``, coef (K, p) and shape
    (K,), a target of one column of amounts > 0 whose logs every pass reads, and the
    shape's log as its free tensor. ``predictive_family`` names the family in errors.
    Censored, their 1-d search (:mod:`moekit.experts.censored_glm`) is in the shape,
    within each family's ``shape_bounds``.
    """

    #: the parameter a censored fit maximises in one dimension (no torch derivative)
    shape_field = "shape"
    #: what y and y_upper of a censored fit hold: amounts >= 0
    interval_support = "positive"

    @classmethod
    def check_target(cls, y2: np.ndarray) -> np.ndarray:
        """One column of positive amounts (ValueError naming the option otherwise)."""
        return check_positive(y2, cls.predictive_family)

    def prepare(self, data) -> None:
        data.cache["log_y"] = torch.log(data.y[0])

    def n_parameters(self, params) -> int:
        return int(params.coef.numel() + params.shape.numel())

    def min_samples(self, params) -> float:
        return float(params.coef.shape[1] + 1)

    def select(self, params, perm: torch.Tensor):
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return self.params_type(params.coef[perm].contiguous(), params.shape[perm].contiguous())

    def to_free(self, params) -> dict[str, torch.Tensor]:
        return {"coef": params.coef, "log_shape": torch.log(params.shape)}

    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters' fields for a design of p columns."""
        return {"coef": (self.n_experts, p), "shape": (self.n_experts,)}

    def check_params(self, params, prefix: str = "") -> None:
        """Refuse non-finite coefficients and shapes that are not positive and finite."""
        check_finite(prefix + "coef", params.coef)
        if not bool((torch.isfinite(params.shape) & (params.shape > 0)).all()):
            raise ValueError(f"{prefix + 'shape'!r} holds shapes that are not positive and finite")
