"""Linear-Gaussian experts of several outputs with a full, tied or spherical covariance.

Expert k regresses every column of y on the same design,
y | x, z = k ~ N(B_k x, Sigma_k), with B_k of shape (q, p) and Sigma_k of shape
(q, q) constrained as scikit-learn's ``GaussianMixture`` and mclust name it:

===========  ======  =====================================  ==================
type         mclust  Sigma_k                                free parameters
===========  ======  =====================================  ==================
full         VVV     any covariance per expert              K q (q + 1) / 2
tied         EEE     one covariance Sigma for all experts   q (q + 1) / 2
diag         VVI     diagonal per expert (:mod:`.gaussian`) K q
spherical    VII     sigma_k^2 I per expert                 K
===========  ======  =====================================  ==================

The M-step is exact. Whatever Sigma_k, the coefficients are the weighted least
squares of every column (with one design for all outputs, generalised least squares
equals least squares column by column: Zellner 1962),

.. math::  B_k = Y^T R_k X (X^T R_k X)^{-1}, \\qquad
           S_k = \\sum_i r_{ik} (y_i - B_k x_i)(y_i - B_k x_i)^T,

and the covariance maximises -(n_k / 2)(log|Sigma_k| + tr(Sigma_k^{-1} S_k / n_k))
under its constraint and under a floor on its eigenvalues, lambda_min >= c:
Sigma_k = U max(Lambda, c) U^T for S_k / n_k = U Lambda U^T (full), the same of
sum_k S_k / sum_k n_k (tied), and max(tr S_k / (q n_k), c) I (spherical); clipping
the eigenvalues is the constrained maximiser (Ingrassia 2004), so every step is
exact and the likelihood stays bounded when an expert collapses onto a few points.
scikit-learn's ``reg_covar`` instead adds its value to every eigenvalue (a
data-dependent penalty, not a constraint); both keep the smallest eigenvalue above
the value given. The statistics are the weighted Grams of [x, y] plus the q (q + 1)
/ 2 weighted products y_a y_b, sums over rows, so a data-parallel fit all-reduces
them as for diagonal experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moekit._core.batch import (
    aligned_rows,
    batched_grams,
    empty_experts,
    flat_grams,
    times_design,
)
from moekit._core.data import Chunk, EMData, unpack_grams
from moekit._core.linalg import even_system, solve_psd, triu_pairs, unpack_triu
from moekit._core.logspace import LOG_2PI, mvn_logpdf_chol
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite
from moekit.experts.gaussian import GaussianExperts, GaussianParams, linear_means, linear_moments

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
MCLUST_NAMES = {"full": "VVV", "tied": "EEE", "diag": "VVI", "spherical": "VII"}


# ------------------------------------------------------------------ M-step estimators
def residual_scatter(gram, xty, yy, coef) -> torch.Tensor:
    """S_k = Y^T R_k Y - B_k X^T R_k Y - (B_k X^T R_k Y)^T + B_k X^T R_k X B_k^T.

    Parameters
    ----------
    gram, xty, yy, coef : Tensor of shapes (K, p, p), (K, q, p), (K, q, q), (K, q, p)

    Returns
    -------
    Tensor of shape (K, q, q), symmetric
    """
    cross = coef @ xty.transpose(1, 2)  # (K, q, q)
    s = yy - cross - cross.transpose(1, 2) + coef @ gram @ coef.transpose(1, 2)
    return 0.5 * (s + s.transpose(1, 2))


def floor_eigenvalues(cov: torch.Tensor, floor: float, even: bool = False) -> torch.Tensor:
    """U max(Lambda, floor) U^T for cov = U Lambda U^T: the nearest maximiser above the floor.

    ``even``: decompose systems of even size (:func:`~moekit._core.linalg.even_system`,
    a unit eigenvalue appended on its own axis and dropped after), as for a batch of
    several fits.
    """
    q = cov.shape[-1]
    if even:
        cov = even_system(cov, cov[..., :0], 1.0)[0]
    evals, evecs = torch.linalg.eigh(cov)
    out = (evecs * evals.clamp(min=floor).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    if even:
        out = out[..., :q, :q]
    return 0.5 * (out + out.transpose(-1, -2))


def _full_covariance(scatter, nk, floor):
    return floor_eigenvalues(scatter / nk.clamp(min=1e-300).view(-1, 1, 1), floor)


def _tied_covariance(scatter, nk, floor):
    pooled = floor_eigenvalues(scatter.sum(0) / nk.sum().clamp(min=1e-300), floor)
    return pooled.expand_as(scatter).contiguous()


def _spherical_covariance(scatter, nk, floor):
    q = scatter.shape[-1]
    trace = torch.diagonal(scatter, dim1=1, dim2=2).sum(-1)
    var = (trace / (q * nk.clamp(min=1e-300))).clamp(min=floor)  # (K,)
    return var.view(-1, 1, 1) * torch.eye(q, dtype=scatter.dtype, device=scatter.device)


COVARIANCE_ESTIMATORS = {
    "full": _full_covariance,
    "tied": _tied_covariance,
    "spherical": _spherical_covariance,
}


# The same for S fits at once: scatter (S, K, q, q), nk (S, K), every fit on its own
def _full_covariance_many(scatter, nk, floor):
    return floor_eigenvalues(scatter / nk.clamp(min=1e-300)[..., None, None], floor, even=True)


def _tied_covariance_many(scatter, nk, floor):
    # pooled over the experts of each fit, expert after expert: elementwise sums,
    # whose rounding cannot depend on how many fits share the batch
    total, count = scatter[:, 0], nk[:, 0]
    for k in range(1, scatter.shape[1]):
        total, count = total + scatter[:, k], count + nk[:, k]
    pooled = floor_eigenvalues(total / count.clamp(min=1e-300)[:, None, None], floor, even=True)
    return pooled.unsqueeze(1).expand_as(scatter).contiguous()


def _spherical_covariance_many(scatter, nk, floor):
    q = scatter.shape[-1]
    trace = torch.diagonal(scatter, dim1=-2, dim2=-1).sum(-1)
    var = (trace / (q * nk.clamp(min=1e-300))).clamp(min=floor)  # (S, K)
    return var[..., None, None] * torch.eye(q, dtype=scatter.dtype, device=scatter.device)


COVARIANCE_ESTIMATORS_MANY = {
    "full": _full_covariance_many,
    "tied": _tied_covariance_many,
    "spherical": _spherical_covariance_many,
}


def _aligned_pairs(chunk: Chunk, q: int) -> torch.Tensor:
    """The products y_a y_b (a <= b) of the chunk's rows, continued with zeros to the
    alignment, (q (q + 1) / 2, c'): they depend on the data alone, so they are made
    once per fit and chunk, not in every pass."""
    key = ("output_pairs", chunk.start, chunk.stop)
    pairs = chunk.data.cache.get(key)
    if pairs is None:
        rows, cols = triu_pairs(q, device=chunk.y.device)
        pairs = chunk.data.cache[key] = aligned_rows(chunk.y[rows] * chunk.y[cols])
    return pairs


def excess_cholesky(cov: torch.Tensor, floor: float) -> torch.Tensor:
    """L with cov = floor I + L L^T: the free form of a covariance above its floor.

    A covariance sitting on the floor (an eigenvalue equal to it) gets 1e-6 of the
    floor back on that eigenvalue, as ``log_excess_var`` does for variances.
    """
    evals, evecs = torch.linalg.eigh(cov)
    excess = (evals - floor).clamp(min=1e-6 * floor + 1e-300)
    return torch.linalg.cholesky((evecs * excess.unsqueeze(-2)) @ evecs.transpose(-1, -2))


@dataclass
class CovGaussianParams:
    """coef of shape (K, q, p), the last column the intercept; cov of shape (K, q, q)."""

    coef: torch.Tensor
    cov: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        """The marginal variances, the covariances' diagonals, shape (K, q)."""
        return torch.diagonal(self.cov, dim1=1, dim2=2)


class CovarianceGaussianExperts(GaussianExperts):
    """K linear-Gaussian experts of q outputs with a constrained covariance (see module).

    What does not depend on the covariance (the means, the prior, the collapse
    threshold) is :class:`GaussianExperts`'.

    Parameters
    ----------
    n_experts : int
    n_outputs : int
    var_floor : float
        Smallest eigenvalue a covariance may take, in the units of the
        (standardised) target the family is fitted on.
    """

    covariance_type: ClassVar[str] = "full"

    # GaussianExperts' analytic derivatives are those of independent outputs: with a
    # covariance the observed information comes from autograd (hasattr is False)
    @property
    def local_derivatives(self):
        raise AttributeError("local_derivatives")

    @property
    def local_parameters(self):
        raise AttributeError("local_parameters")

    params_type = CovGaussianParams

    # ------------------------------------------------------------ E-step
    def log_prob(self, params: CovGaussianParams, chunk: Chunk) -> torch.Tensor:
        resid = chunk.y.unsqueeze(0) - linear_means(params.coef, chunk.XeT)  # (K, q, c)
        return mvn_logpdf_chol(resid, torch.linalg.cholesky(params.cov))

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        # the Grams of [x, y] and every weighted product y_a y_b (a <= b), sums over rows
        rows, cols = triu_pairs(self.n_outputs, device=chunk.y.device)
        pairs = chunk.y[rows] * chunk.y[cols]  # (f, c)
        return chunk.weighted_grams(resp, "e", with_target=True), pairs @ resp.T

    def m_step(self, params, stats, data: EMData, resp=None) -> CovGaussianParams:
        grams, yy = stats
        p, q = data.XeT.shape[0], self.n_outputs
        gram, xty, _ = unpack_grams(grams, p, q)  # (K, p, p), (K, q, p)
        nk = gram[:, -1, -1]  # the intercept's product with itself: sum_i r_ik
        coef = solve_psd(gram, xty.transpose(1, 2)).transpose(1, 2)  # (K, q, p)
        scatter = residual_scatter(gram, xty, unpack_triu(yy.T, q), coef)
        cov = COVARIANCE_ESTIMATORS[self.covariance_type](scatter, nk, self.var_floor)
        # an expert with no weight at all is not determined by the data: keep it as it was
        empty = nk <= 1e-12 * max(float(nk.sum()), 1.0)
        if bool(empty.any()):
            old = torch.eye(q, dtype=cov.dtype).expand_as(cov) if params is None else params.cov
            cov = torch.where(empty[:, None, None], old, cov)
            if params is not None:
                coef = torch.where(empty[:, None, None], params.coef, coef)
        return CovGaussianParams(coef.contiguous(), cov.contiguous())

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, q, p), cov
    # (S, K, q, q). Products are batched with one start's shapes, and every
    # factorisation (Cholesky, eigendecomposition) runs on systems of even size
    # (even_system), so that each start's matrices sit alike in memory wherever it
    # is in the batch. The tied covariance pools the experts of each start alone.
    # Each concrete class declares ``batchable`` itself (see moekit.fitting.batched).
    def log_prob_many(self, params: CovGaussianParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        S, K, q, p = params.coef.shape
        mean = times_design(params.coef.reshape(S, K * q, p), chunk.XeT).reshape(S, K, q, -1)
        # q odd: a unit variance and a zero residual appended, which add a standard
        # normal's log density at 0, -log(2 pi) / 2, taken back after
        cov, resid = even_system(params.cov, chunk.y - mean, 1.0)  # (S, K, q', q'), (S, K, q', c)
        out = mvn_logpdf_chol(resid, torch.linalg.cholesky(cov))
        return out.add_(0.5 * LOG_2PI) if q % 2 else out

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        resp_rows = aligned_rows(resp)  # each start's rows alike (see moekit._core.batch)
        pairs = _aligned_pairs(chunk, self.n_outputs).expand(resp.shape[0], -1, -1)
        yy = torch.bmm(pairs, resp_rows.transpose(1, 2))  # (S, f, K)
        return batched_grams(chunk, resp, "e", with_target=True), yy

    def m_step_many(self, params: CovGaussianParams, stats, data: EMData) -> CovGaussianParams:
        """:meth:`m_step` of S stacked starts, on the experts of all S at once."""
        grams, yy = stats
        S, K, q, p = params.coef.shape
        gram, xty, _ = unpack_grams(flat_grams(grams), p, q)  # (S K, p, p), (S K, q, p)
        nk = gram[:, -1, -1]
        coef = solve_psd(*even_system(gram, xty.transpose(1, 2), 0.0))[:, :p].transpose(1, 2)
        scatter = residual_scatter(gram, xty, unpack_triu(flat_grams(yy).T, q), coef)
        estimate = COVARIANCE_ESTIMATORS_MANY[self.covariance_type]
        cov = estimate(scatter.view(S, K, q, q), nk.view(S, K), self.var_floor).reshape(S * K, q, q)
        # an expert with no weight at all is not determined by the data: keep it as it was
        empty = empty_experts(nk, K)
        if bool(empty.any()):
            cov = torch.where(empty[:, None, None], params.cov.reshape(S * K, q, q), cov)
            coef = torch.where(empty[:, None, None], params.coef.reshape(S * K, q, p), coef)
        return CovGaussianParams(coef.reshape(S, K, q, p).contiguous(), cov.reshape(S, K, q, q))

    def select(self, params: CovGaussianParams, perm: torch.Tensor) -> CovGaussianParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return CovGaussianParams(params.coef[perm].contiguous(), params.cov[perm].contiguous())

    def residuals(self, params: CovGaussianParams, chunk: Chunk) -> torch.Tensor:
        """Whitened residuals L_k^{-1} (y - B_k x) of every expert, shape (K, q, c)."""
        resid = chunk.y.unsqueeze(0) - linear_means(params.coef, chunk.XeT)
        return torch.linalg.solve_triangular(torch.linalg.cholesky(params.cov), resid, upper=False)

    def n_parameters(self, params: CovGaussianParams) -> int:
        K, q, p = params.coef.shape
        per_cov = {"full": K * q * (q + 1) // 2, "tied": q * (q + 1) // 2, "spherical": K}
        return K * q * p + per_cov[self.covariance_type]

    # ------------------------------------------------------------ differentiable view
    # Free tensors: Sigma = floor I + L L^T (L lower triangular, one for all experts
    # when tied), or sigma^2 = floor + exp(s) when spherical; every point is valid.
    def to_free(self, params: CovGaussianParams) -> dict[str, torch.Tensor]:
        if self.covariance_type == "spherical":
            excess = (params.cov[:, 0, 0] - self.var_floor).clamp(min=1e-6 * self.var_floor)
            return {"coef": params.coef, "log_excess_var": torch.log(excess)}
        cov = params.cov[:1] if self.covariance_type == "tied" else params.cov
        return {"coef": params.coef, "chol": excess_cholesky(cov, self.var_floor)}

    def from_free(self, free: dict[str, torch.Tensor]) -> CovGaussianParams:
        return CovGaussianParams(free["coef"], self._covariance(free))

    def _covariance(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        """Covariances (K, q, q) from free tensors, or ``cov`` itself where given."""
        if "cov" in free:
            return free["cov"]
        K, q = free["coef"].shape[:2]
        eye = torch.eye(q, dtype=free["coef"].dtype, device=free["coef"].device)
        if "log_excess_var" in free:
            return (self.var_floor + torch.exp(free["log_excess_var"])).view(-1, 1, 1) * eye
        chol = torch.tril(free["chol"])
        return (self.var_floor * eye + chol @ chol.transpose(-1, -2)).expand(K, q, q)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        resid = y.reshape(1, self.n_outputs, -1) - self.mean_free(free, XT)
        return mvn_logpdf_chol(resid, torch.linalg.cholesky(self._covariance(free)))

    # ------------------------------------------------------------ reporting
    def report(self, params: CovGaussianParams, scaling: Scaling) -> Report:
        """Intercept and slopes per expert and output in the data's units, then the
        covariance's upper triangle (one for all experts when tied, a variance when
        spherical)."""
        K, q, _ = params.coef.shape
        ys = scaling.y_scale.view(1, q, 1)
        ab = coef_to_data(params.coef, scaling) * ys  # (K, q, p)
        ab[..., 0] += scaling.y_mean
        names, labels = scaling.output_names, coef_labels(scaling)
        out = Report()
        out.add("coef", ab, [f"expert {k}" for k in range(K) for _ in range(q * len(labels))],
                [f"[{names[j]}] {nm}" for _ in range(K) for j in range(q)
                 for nm in labels])  # fmt: skip
        cov = params.cov * ys * ys.transpose(1, 2)  # D Sigma D: in y's units
        if self.covariance_type == "spherical":
            out.add("cov", cov[:, 0, 0], [f"expert {k}" for k in range(K)], ["var"] * K,
                    tested=False)  # fmt: skip
            return out
        rows, cols = triu_pairs(q)
        tags = [f"var[{names[a]}]" if a == b else f"cov[{names[a]}, {names[b]}]"
                for a, b in zip(rows.tolist(), cols.tolist(), strict=True)]  # fmt: skip
        tied = self.covariance_type == "tied"
        blocks = ["all experts"] if tied else [f"expert {k}" for k in range(K)]
        upper = cov[: len(blocks), rows, cols]  # (K or 1, f)
        out.add("cov", upper, [b for b in blocks for _ in tags], tags * len(blocks), tested=False)
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        q = self.n_outputs
        ys = scaling.y_scale.view(1, q, 1)
        ab = values["coef"]
        ab = torch.cat([(ab[..., :1] - scaling.y_mean.view(1, q, 1)), ab[..., 1:]], -1) / ys
        coef = coef_from_data(ab, scaling)
        K = coef.shape[0]
        if self.covariance_type == "spherical":
            eye = torch.eye(q, dtype=coef.dtype, device=coef.device)
            cov = (values["cov"] / scaling.y_scale[0] ** 2).view(-1, 1, 1) * eye
        else:
            cov = unpack_triu(values["cov"], q) / (ys * ys.transpose(1, 2))
            cov = cov.expand(K, q, q)
        return {"coef": coef, "cov": cov}

    # ------------------------------------------------------------ prediction
    def moments(self, params: CovGaussianParams, XT: torch.Tensor):
        """Per-expert means and marginal standard deviations, each (n, K, q)."""
        return linear_moments(params.coef, torch.diagonal(params.cov, dim1=1, dim2=2), XT)

    def covariances(self, params: CovGaussianParams) -> torch.Tensor:
        """The experts' noise covariances (K, q, q) of the standardised target."""
        return params.cov

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`CovGaussianParams` fields for a design of p columns."""
        K, q = self.n_experts, self.n_outputs
        return {"coef": (K, q, p), "cov": (K, q, q)}

    def check_params(self, params: CovGaussianParams, prefix: str = "") -> None:
        """Refuse values no fit gives: non-finite coefficients, covariances that are not
        symmetric positive definite.

        Raises
        ------
        ValueError
            Naming the field (after ``prefix``) and what is wrong with it.
        """
        check_finite(prefix + "coef", params.coef)
        check_finite(prefix + "cov", params.cov)
        cov = params.cov
        symmetric = torch.allclose(cov, cov.transpose(1, 2), rtol=1e-10, atol=0.0)
        if not symmetric or bool((torch.linalg.cholesky_ex(cov).info != 0).any()):
            raise ValueError(
                f"{prefix + 'cov'!r} holds matrices that are not symmetric positive definite"
            )


class FullGaussianExperts(CovarianceGaussianExperts):
    """One covariance per expert (mclust's VVV); it contains diagonal experts."""

    covariance_type = "full"
    batchable = True

    def simpler(self) -> GaussianExperts:
        """Diagonal experts (VVI): their fit starts this one, which never ends below it."""
        return GaussianExperts(self.n_experts, self.n_outputs, self.var_floor)

    def embed(self, params: GaussianParams, data: EMData) -> CovGaussianParams:
        """A fit of diagonal experts as full covariances, at the same likelihood."""
        return CovGaussianParams(params.coef, torch.diag_embed(params.var))


class TiedGaussianExperts(CovarianceGaussianExperts):
    """One covariance for all experts (mclust's EEE)."""

    covariance_type = "tied"
    batchable = True


class SphericalGaussianExperts(CovarianceGaussianExperts):
    """sigma_k^2 I per expert (mclust's VII).

    Spherical in y's units only if every output has the same scale: the target is
    standardised by one scale for all its columns (``common_target_scale``).
    """

    covariance_type = "spherical"
    common_target_scale = True
    batchable = True


COVARIANCE_EXPERTS = {
    "full": FullGaussianExperts,
    "tied": TiedGaussianExperts,
    "diag": GaussianExperts,
    "spherical": SphericalGaussianExperts,
}
"""The family of linear experts for each ``covariance_type`` (diag: the default)."""
