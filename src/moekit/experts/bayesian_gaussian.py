"""Bayesian linear-Gaussian experts, fitted by variational EM.

Expert k models output j as y_j | x, z = k ~ N(w_kj^T x, 1 / beta_kj) with a
Gaussian prior w_kj ~ N(w0_kj, A_kj). Mean-field variational EM keeps a Gaussian
posterior q(w_kj) = N(m_kj, B_kj); the noise precisions beta and the prior's
(A, w0) are point estimates chosen to maximise the evidence lower bound (ELBO,
type-II maximum likelihood). Bishop and Svensen (2003); Waterhouse, MacKay and
Robinson (1996); Ueda and Ghahramani (2002).

The family fits the one EM loop unchanged by defining its three terms as follows.

* **E-step** ("log_prob"): the expected log-density under q(w),

  .. math::  E_q \\log N(y \\mid w^T x, \\beta^{-1}) = \\tfrac12 \\log \\beta
             - \\tfrac12 \\log 2\\pi - \\tfrac{\\beta}{2}\\big((y - m^T x)^2
             + x^T B x\\big).

  With the gate's E log pi_k(x) added, its log-sum-exp over experts is the optimum
  of the ELBO over q(Z), and its softmax the optimal q(z_i = k) = r_ik.
* **log_prior**: -sum KL(q(w) || p(w)), so that the loop's objective is exactly the
  ELBO.
* **M-step**, given r and the weighted Grams G_k = sum_i r_ik x_i x_i^T,
  X^T R_k y and y^T R_k y of the pass, three coordinate maximisations of the ELBO,
  each exact, so the ELBO never decreases (checked by the tests):

  1. q(w): :math:`B = (A^{-1} + \\beta G)^{-1}`, :math:`m = B (A^{-1} w_0 + \\beta X^T R y)`;
  2. beta, with the expected residuals under the new q(w),
     :math:`S = \\sum_i r_{ik} E_q (y_i - w^T x_i)^2 = y^T R y - 2 m^T X^T R y
     + m^T G m + \\operatorname{tr}(G B)`: beta_k = N_k / S_k per expert, or
     sum_k N_k / sum_k S_k shared, at most 1 / var_floor (the maximiser under that
     bound: the ELBO is concave in log beta);
  3. the prior: w0 (zero, or shared by the experts: the A^{-1}-weighted mean of the
     m_k), then A from the second moment E_q (w - w0)(w - w0)^T = B + (m - w0)(m -
     w0)^T of the slopes: its diagonal (ARD, one precision per feature), its mean
     diagonal (isotropic) or itself (full), with precisions at most
     ``MAX_PRECISION`` (a bounded maximiser again: ARD drives the precision of an
     irrelevant feature to infinity, and the bound stops it at a prior that pins
     its weight to zero).

The intercept keeps a broad fixed prior N(0, ``intercept_var``) on the
standardised target. ARD would shrink it to zero, i.e. pull every expert's level
towards the overall mean of y, which is no statement about relevance; and a
learned intercept variance collapses onto its one posterior draw.

Per-expert prior means w0_k are not offered: maximised with A_k they sit on the
posterior (w0 = m, A = B), the KL term vanishes and q(w) shrinks to a point, which
is maximum likelihood again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.batch import batched_grams, flat_grams, times_design
from moekit._core.data import Chunk, EMData, packed, unpack_grams
from moekit._core.logspace import LOG_2PI
from moekit._core.validation import check_finite
from moekit.experts._bayesian_linalg import (
    even_size,
    gaussian_kl,
    inverse_pd,
    logdet_pd,
    quad_forms,
)

__all__ = ["BayesianGaussianExperts", "BayesianGaussianParams", "gaussian_kl", "inverse_pd",
           "logdet_pd", "quad_forms"]  # fmt: skip

MAX_PRECISION = 1e8
"""Largest prior precision of a slope (standardised units): a prior sd of 1e-4."""

PRIOR_KINDS = ("ard", "isotropic", "full")
NOISE_KINDS = ("shared", "per_expert")
PRIOR_MEANS = ("zero", "shared")


@dataclass
class BayesianGaussianParams:
    """The variational posterior and the hyper-parameters of K experts, m outputs, p columns.

    coef (K, m, p): posterior means m_kj (last column the intercept); cov (K, m, p, p):
    posterior covariances B_kj; beta (K, m): noise precisions; prior_mean (K, m, p):
    w0_kj; prior_prec (K, m, p, p): A_kj^{-1}.
    """

    coef: torch.Tensor
    cov: torch.Tensor
    beta: torch.Tensor
    prior_mean: torch.Tensor
    prior_prec: torch.Tensor


# ---------------------------------------------------------------------- M-step pieces
# Each takes S stacked fits on a leading axis too (shapes (S, K, ...), ``stacked``)
def posterior_update(gram, xty, beta, prior_mean, prior_prec, stacked: bool = False):
    """q(w) given beta and the prior: B = (A^{-1} + beta G)^{-1}, m = B (A^{-1} w0 + beta X^T R y).

    Shapes: gram (K, p, p), xty (K, m, p), beta (K, m), prior_mean (K, m, p),
    prior_prec (K, m, p, p); returns coef (K, m, p) and cov (K, m, p, p).
    """
    P = prior_prec + beta[..., None, None] * gram.unsqueeze(-3)
    rhs = (prior_prec @ prior_mean.unsqueeze(-1))[..., 0] + beta.unsqueeze(-1) * xty
    cov = inverse_pd(P, stacked)
    coef = (cov @ rhs.unsqueeze(-1))[..., 0]
    return coef, cov


def expected_rss(gram, xty, yty, coef, cov) -> torch.Tensor:
    """S = sum_i r_ik E_q (y_ij - w_kj^T x_i)^2, shape (K, m).

    Equal to y^T R y - 2 m^T X^T R y + m^T G m + tr(G B): the residuals of the
    posterior mean plus the spread of q(w).
    """
    G = gram.unsqueeze(-3)  # (K, 1, p, p)
    fit = (coef.unsqueeze(-2) @ G @ coef.unsqueeze(-1))[..., 0, 0]
    spread = (G * cov).sum((-2, -1))
    return (yty - 2.0 * (coef * xty).sum(-1) + fit + spread).clamp(min=0.0)


def noise_update(rss, nk, old_beta, shared: bool, max_beta: float) -> torch.Tensor:
    """Maximiser of the ELBO over beta: N_k / S_k, or sum_k N_k / sum_k S_k when shared."""
    tiny = torch.finfo(rss.dtype).tiny
    if shared:  # over the experts, axis -2 of rss (K, m)
        total = nk.sum(-1, keepdim=True) / rss.sum(-2).clamp(min=tiny)
        beta = total.unsqueeze(-2).expand_as(rss)
    else:
        beta = nk.unsqueeze(-1) / rss.clamp(min=tiny)
        # an expert without any weight has no evidence about its noise: keep it
        beta = torch.where((nk > 0).unsqueeze(-1), beta, old_beta)
    return beta.clamp(max=max_beta).contiguous()


def prior_mean_update(coef, prior_prec, stacked: bool = False) -> torch.Tensor:
    """The w0 shared by the experts: (sum_k A_k^{-1})^{-1} sum_k A_k^{-1} m_k, (K, m, p)."""
    total = prior_prec.sum(-4)  # (m, p, p)
    rhs = (prior_prec @ coef.unsqueeze(-1)).sum(-4)  # (m, p, 1)
    w0 = (inverse_pd(total, stacked) @ rhs)[..., 0]
    return w0.unsqueeze(-3).expand_as(coef).contiguous()


def prior_prec_update(
    coef, cov, prior_mean, kind: str, intercept_prec: float, stacked: bool = False
) -> torch.Tensor:
    """Maximiser of the ELBO over A^{-1} (slopes; the intercept's precision stays fixed).

    With S = B + (m - w0)(m - w0)^T over the slopes: ARD 1 / diag(S), isotropic
    q / tr(S), full S^{-1} with eigenvalues of S at least 1 / MAX_PRECISION.
    """
    p = coef.shape[-1]
    q = p - 1
    out = torch.zeros_like(cov)
    out[..., q, q] = intercept_prec
    if q == 0:
        return out
    diff = (coef - prior_mean)[..., :q]
    S = cov[..., :q, :q] + diff.unsqueeze(-1) * diff.unsqueeze(-2)
    floor = 1.0 / MAX_PRECISION
    if kind == "ard":
        s = S.diagonal(dim1=-2, dim2=-1).clamp(min=floor)
        out[..., :q, :q] = torch.diag_embed(1.0 / s)
    elif kind == "isotropic":
        s = (S.diagonal(dim1=-2, dim2=-1).sum(-1) / q).clamp(min=floor)
        eye = torch.eye(q, dtype=cov.dtype, device=cov.device)
        out[..., :q, :q] = eye / s[..., None, None]
    else:
        # the Gaussian likelihood of one draw under a floor on the eigenvalues is
        # maximised by clamping the eigenvalues of S (it separates along them)
        S = 0.5 * (S + S.transpose(-1, -2))
        # stacked: of even size, the new direction apart (eigenvalue 1), then dropped
        evals, evecs = torch.linalg.eigh(even_size(S) if stacked else S)
        inv = 1.0 / evals.clamp(min=floor)
        prec = (evecs @ (inv.unsqueeze(-1) * evecs.transpose(-1, -2)))[..., :q, :q]
        out[..., :q, :q] = 0.5 * (prec + prec.transpose(-1, -2))
    return out


# ---------------------------------------------------------------------- the family
class BayesianGaussianExperts:
    """K Bayesian linear-Gaussian experts over m outputs (see the module docstring).

    Parameters
    ----------
    n_experts : int
    n_outputs : int
    prior : {'ard', 'isotropic', 'full'}
        Form of the slopes' prior covariance A_kj.
    noise : {'shared', 'per_expert'}
        One noise precision per output shared by the experts, or one per expert.
    prior_mean : {'zero', 'shared'}
        w0 fixed at zero, or one w0 per output shared by the experts and fitted.
    var_floor : float
        Smallest noise variance (1 / largest beta), on the standardised target.
    intercept_var : float
        Variance of the intercept's fixed prior, on the standardised target.
    """

    report_name = "Bayesian linear-Gaussian"
    monotone = True
    needs_resp = False
    params_type = BayesianGaussianParams
    predictive_family = "normal"
    standardize_target = True

    def __init__(
        self,
        n_experts: int,
        n_outputs: int,
        *,
        prior: str = "ard",
        noise: str = "shared",
        prior_mean: str = "zero",
        var_floor: float = 1e-6,
        intercept_var: float = 100.0,
    ) -> None:
        self.n_experts = n_experts
        self.n_outputs = n_outputs
        self.prior = prior
        self.noise = noise
        self.prior_mean = prior_mean
        self.var_floor = var_floor
        self.intercept_var = intercept_var

    def init_params(self, data: EMData) -> BayesianGaussianParams:
        """The prior as posterior: unit precisions on the slopes, beta = 1 (var(y))."""
        K, m, p = self.n_experts, self.n_outputs, data.XeT.shape[0]
        like = data.XeT
        prec = torch.eye(p, dtype=like.dtype, device=like.device)
        prec[-1, -1] = 1.0 / self.intercept_var
        prec = prec.expand(K, m, p, p).contiguous()
        zeros = like.new_zeros((K, m, p))
        return BayesianGaussianParams(zeros, inverse_pd(prec), like.new_ones((K, m)),
                                      zeros.clone(), prec)  # fmt: skip

    # ------------------------------------------------------------ E-step
    def prepare(self, data: EMData) -> None:
        pass

    def log_prob(self, params: BayesianGaussianParams, chunk: Chunk) -> torch.Tensor:
        xt, y = chunk.XeT, chunk.y  # (p, c), (m, c)
        K, m, p = params.coef.shape
        prods = chunk.products("e") if packed(p) else None
        quad = quad_forms(params.cov.reshape(K * m, p, p), xt, prods).reshape(K, m, -1)
        out = None
        for j in range(m):
            resid = torch.addmm(y[j : j + 1], params.coef[:, j, :], xt, alpha=-1.0)  # (K, c)
            b = params.beta[:, j : j + 1]
            term = resid.square_().add_(quad[:, j]).mul_(-0.5 * b)
            term.add_(0.5 * (torch.log(b) - LOG_2PI))
            out = term if out is None else out.add_(term)
        return out

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        return chunk.weighted_grams(resp, "e", with_target=True)

    def m_step(
        self, params, stats, data: EMData, resp=None, *, stacked: bool = False
    ) -> BayesianGaussianParams:
        """The three coordinate steps (module docstring); ``stacked``: of S starts at
        once, parameters (S, K, ...) and statistics as :meth:`chunk_stats_many` sums them."""
        if params is None:
            params = self.init_params(data)
        p, m = data.XeT.shape[0], self.n_outputs
        if stacked:
            S = params.coef.shape[0]
            gram, xty, yty = unpack_grams(flat_grams(stats), p, m)
            gram, xty, yty = (gram.reshape(S, -1, p, p), xty.reshape(S, -1, m, p),
                              yty.reshape(S, -1, m))  # fmt: skip
        else:
            gram, xty, yty = unpack_grams(stats, p, m)  # (K, p, p), (K, m, p), (K, m)
        nk = gram[..., -1, -1]
        # 1. q(w) at the current beta and prior
        coef, cov = posterior_update(gram, xty, params.beta, params.prior_mean,
                                     params.prior_prec, stacked)  # fmt: skip
        # 2. beta at the new q(w)
        rss = expected_rss(gram, xty, yty, coef, cov)
        beta = noise_update(rss, nk, params.beta, self.noise == "shared", 1.0 / self.var_floor)
        # 3. the prior at the new q(w): its mean at the current precisions, then those
        w0 = params.prior_mean
        if self.prior_mean == "shared":
            w0 = prior_mean_update(coef, params.prior_prec, stacked)
        prec = prior_prec_update(coef, cov, w0, self.prior, 1.0 / self.intercept_var, stacked)
        return BayesianGaussianParams(coef.contiguous(), cov.contiguous(), beta, w0, prec)

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, m, p), ...;
    # the experts of a start are coupled (a shared beta or w0), so the steps keep S apart
    batchable = True

    def log_prob_many(self, params: BayesianGaussianParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        xt, y = chunk.XeT, chunk.y
        S, K, m, p = params.coef.shape
        if packed(p):  # one product per start with the shared pair products
            rows, cols = torch.triu_indices(p, p, device=xt.device)
            w = params.cov[..., rows, cols] * torch.where(rows == cols, 1.0, 2.0).to(xt)
            prods = chunk.products("e")
            quad = times_design(w.view(S, K * m, -1), prods).clamp_(min=0.0)
        else:  # a copy per start: its products round as the start's own tensor would
            quad = torch.stack([quad_forms(c.clone().view(K * m, p, p), xt) for c in params.cov])
        quad = quad.reshape(S, K, m, -1)
        out = None
        for j in range(m):
            resid = times_design(params.coef[:, :, j], xt, y[j : j + 1], alpha=-1.0)
            b = params.beta[:, :, j : j + 1]
            term = resid.square_().add_(quad[:, :, j]).mul_(-0.5 * b)
            term.add_(0.5 * (torch.log(b) - LOG_2PI))
            out = term if out is None else out.add_(term)
        return out

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), stacked."""
        return batched_grams(chunk, resp, "e", with_target=True)

    def log_prior_many(self, params: BayesianGaussianParams) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts, shape (S,)."""
        p = params
        return -gaussian_kl(p.coef, p.cov, p.prior_mean, p.prior_prec, stacked=True).sum((1, 2))

    def m_step_many(self, params: BayesianGaussianParams, stats, data: EMData):
        """:meth:`m_step` of S stacked starts."""
        return self.m_step(params, stats, data, stacked=True)

    def log_prior(self, params: BayesianGaussianParams) -> float:
        """-sum_kj KL(q(w_kj) || p(w_kj)): with it the loop's objective is the ELBO."""
        kl = gaussian_kl(params.coef, params.cov, params.prior_mean, params.prior_prec)
        return -float(kl.sum())

    def select(self, params: BayesianGaussianParams, perm: torch.Tensor) -> BayesianGaussianParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return BayesianGaussianParams(
            *(getattr(params, f)[perm].contiguous() for f in self.param_shapes(1))
        )

    def residuals(self, params: BayesianGaussianParams, chunk: Chunk) -> torch.Tensor:
        """Residuals of the posterior means in noise units, sqrt(beta) (y - m^T x), (K, m, c)."""
        mean = torch.einsum("kmp,pc->kmc", params.coef, chunk.XeT)
        return (chunk.y.unsqueeze(0) - mean) * params.beta.sqrt().unsqueeze(-1)

    def min_samples(self, params: BayesianGaussianParams) -> float:
        # the prior keeps an expert with few or no rows well defined: it does not collapse
        return 0.0

    def n_parameters(self, params: BayesianGaussianParams) -> int:
        K, m, p = params.coef.shape
        return K * m * (p + 1)

    # ------------------------------------------------------------ prediction
    def moments(
        self, params: BayesianGaussianParams, XT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive means m^T x and sds sqrt(1 / beta + x^T B x), each (n, K, m).

        The posterior predictive of expert k, integrating w over q(w).
        """
        K, m, p = params.coef.shape
        means = torch.einsum("kmp,pn->nkm", params.coef, XT)
        quad = quad_forms(params.cov.reshape(K * m, p, p), XT).reshape(K, m, -1)
        var = 1.0 / params.beta.unsqueeze(-1) + quad  # (K, m, n)
        return means, var.sqrt().permute(2, 0, 1)

    def predictive_extra(self, params: BayesianGaussianParams) -> dict:
        return {}

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`BayesianGaussianParams` fields for a design of p columns."""
        K, m = self.n_experts, self.n_outputs
        return {"coef": (K, m, p), "cov": (K, m, p, p), "beta": (K, m),
                "prior_mean": (K, m, p), "prior_prec": (K, m, p, p)}  # fmt: skip

    def check_params(self, params: BayesianGaussianParams, prefix: str = "") -> None:
        """Refuse values no fit gives: non-finite entries, beta not positive, covariances
        or precisions not symmetric positive definite.

        Raises
        ------
        ValueError
            Naming the field (after ``prefix``) and what is wrong with it.
        """
        for name in self.param_shapes(1):
            check_finite(prefix + name, getattr(params, name))
        if not bool((params.beta > 0).all()):
            raise ValueError(f"{prefix + 'beta'!r} holds noise precisions that are not positive")
        for name in ("cov", "prior_prec"):
            M = getattr(params, name)
            if not (torch.equal(M, M.transpose(-1, -2)) and _positive_definite(M)):
                raise ValueError(
                    f"{prefix + name!r} holds matrices that are not symmetric positive definite"
                )


def _positive_definite(M: torch.Tensor) -> bool:
    """Whether every matrix of M (..., p, p) has a Cholesky factor after Jacobi scaling."""
    diag = M.diagonal(dim1=-2, dim2=-1)
    if not bool((diag > 0).all()):
        return False
    d = diag.rsqrt()
    return bool((torch.linalg.cholesky_ex(M * d.unsqueeze(-1) * d.unsqueeze(-2))[1] == 0).all())
