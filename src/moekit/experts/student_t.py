"""Robust linear experts: y | x, z = k ~ t_nu(B_k x, diag sigma_k^2).

The Student-t is a scale mixture of normals, y | u ~ N(B x, Sigma / u) with
u ~ Gamma(nu / 2, nu / 2), so EM treats u as one more latent variable (Peel and
McLachlan, 2000). The E-step gives, besides r_ik, the expected precision weight

.. math::  \\hat u_{ik} = \\frac{\\nu_k + m}{\\nu_k + d_{ik}^2}, \\qquad
           d_{ik}^2 = \\sum_j (y_{ij} - B_{kj} x_i)^2 / \\sigma_{kj}^2,

small for outliers; the M-step is weighted least squares with weights r_ik u_ik,
sigma_kj^2 = sum_i r_ik u_ik (y_ij - B_kj x_i)^2 / sum_i r_ik, and, when the degrees
of freedom are fitted, the root in nu of the concave expected log-likelihood,

.. math::  -\\psi(\\nu/2) + \\log(\\nu/2) + 1
           + \\frac{1}{N_k} \\sum_i r_{ik} (\\log \\hat u_{ik} - \\hat u_{ik})
           + \\psi\\Big(\\frac{\\nu^{old} + m}{2}\\Big) - \\log\\frac{\\nu^{old} + m}{2} = 0,

found by bisection within [nu_min, nu_max] (the constrained maximiser). Each step
is a conditional maximisation (ECM), so the likelihood never decreases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData, unpack_grams
from moekit._core.derivatives import LocalDerivatives
from moekit._core.logspace import student_t_logpdf
from moekit._core.reporting import Report, Scaling, coef_from_data
from moekit._core.validation import check_finite
from moekit.experts.gaussian import (
    GaussianExperts,
    GaussianParams,
    _variance,
    linear_means,
    linear_moments,
    log_excess_var,
    scaled_residuals,
    weighted_least_squares,
)

NU_MIN, NU_MAX = 0.5, 1e6
"""Range of fitted degrees of freedom. The upper end is far enough that a t expert
there is a Gaussian expert to within about 1e-7 nats per sample, so a t fit started
from a Gaussian fit (:meth:`StudentTExperts.embed`) starts where the Gaussian ended."""


@dataclass
class StudentTParams:
    """coef (K, m, p), var (K, m) squared scales, df (K,) degrees of freedom."""

    coef: torch.Tensor
    var: torch.Tensor
    df: torch.Tensor


class StudentTExperts:
    """K linear experts with multivariate-t noise of diagonal scale.

    Parameters
    ----------
    n_experts : int
    n_outputs : int
    var_floor : float
        Smallest squared scale, in the units of the standardised target.
    df : float or None
        Fixed degrees of freedom, or None to fit one per expert.
    """

    report_name = "Student-t"
    monotone = True
    needs_resp = False
    params_type = StudentTParams
    predictive_family = "student_t"
    standardize_target = True

    def __init__(self, n_experts: int, n_outputs: int, var_floor: float, df: float | None = None):
        self.n_experts = n_experts
        self.n_outputs = n_outputs
        self.var_floor = var_floor
        self.df = df

    def prepare(self, data: EMData) -> None:
        pass

    def init_params(self, data: EMData) -> StudentTParams:
        K, m, p = self.n_experts, self.n_outputs, data.XeT.shape[0]
        nu = 10.0 if self.df is None else float(self.df)
        z = data.XeT.new_zeros
        return StudentTParams(z((K, m, p)), z((K, m)) + 1.0, z(K) + nu)

    # ------------------------------------------------------------ E-step
    def log_prob(self, params: StudentTParams, chunk: Chunk) -> torch.Tensor:
        xt, y, m = chunk.XeT, chunk.y, self.n_outputs
        d2 = None
        for j in range(m):
            resid = torch.addmm(y[j : j + 1], params.coef[:, j, :], xt, alpha=-1.0)  # (K, c)
            term = resid.square_().div_(params.var[:, j : j + 1])
            d2 = term if d2 is None else d2.add_(term)
        chunk.scratch["t_d2"] = d2
        log_scale = 0.5 * torch.log(params.var).sum(1, keepdim=True)  # (K, 1)
        return student_t_logpdf(d2, log_scale, params.df.unsqueeze(1), m)

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        d2 = chunk.scratch.get("t_d2")
        if d2 is None:
            self.log_prob(params, chunk)
            d2 = chunk.scratch["t_d2"]
        nu = params.df.unsqueeze(1)
        u = (nu + self.n_outputs) / (nu + d2)  # expected precision weights (K, c)
        ru = resp * u
        weighted = chunk.weighted_grams(ru, "e", with_target=True)  # Grams of [x, y]
        nk = resp.sum(1)  # (K,)
        nu_stat = (resp * (torch.log(u) - u)).sum(1)  # (K,)
        return weighted, nk, nu_stat

    def m_step(self, params, stats, data: EMData, resp=None) -> StudentTParams:
        if params is None:
            params = self.init_params(data)
        weighted, nk, nu_stat = stats
        p, m = data.XeT.shape[0], self.n_outputs
        gram, xty, yty = unpack_grams(weighted, p, m)  # (K, p, p), (K, m, p), (K, m)
        coef, var = weighted_least_squares(gram, xty, yty, nk, self.var_floor)
        df = params.df
        if self.df is None:
            df = self._update_df(params.df, nu_stat / nk.clamp(min=1e-300))
        empty = nk <= 1e-12 * max(float(nk.sum()), 1.0)
        if bool(empty.any()):
            coef = torch.where(empty[:, None, None], params.coef, coef)
            var = torch.where(empty[:, None], params.var, var)
            df = torch.where(empty, params.df, df)
        return StudentTParams(coef.contiguous(), var, df)

    def _update_df(self, nu_old: torch.Tensor, mean_stat: torch.Tensor) -> torch.Tensor:
        m = self.n_outputs
        const = 1.0 + mean_stat + torch.digamma((nu_old + m) / 2) - torch.log((nu_old + m) / 2)

        def slope(nu):  # derivative of the concave objective in nu, decreasing
            return -torch.digamma(nu / 2) + torch.log(nu / 2) + const

        lo = torch.full_like(nu_old, NU_MIN)
        hi = torch.full_like(nu_old, NU_MAX)
        for _ in range(60):
            mid = torch.sqrt(lo * hi)  # bisection on log nu: the range spans six decades
            up = slope(mid) > 0
            lo = torch.where(up, mid, lo)
            hi = torch.where(up, hi, mid)
        return 0.5 * (lo + hi)

    def log_prior(self, params) -> float:
        return 0.0

    def n_parameters(self, params: StudentTParams) -> int:
        K, m, p = params.coef.shape
        return K * m * (p + 1) + (K if self.df is None else 0)

    def min_samples(self, params: StudentTParams) -> float:
        return float(params.coef.shape[2])

    def select(self, params: StudentTParams, perm: torch.Tensor) -> StudentTParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return StudentTParams(
            params.coef[perm].contiguous(), params.var[perm].contiguous(), params.df[perm]
        )

    def residuals(self, params: StudentTParams, chunk: Chunk) -> torch.Tensor:
        """Residuals in units of each expert's scale, (y - B_k x) / sigma_k, shape (K, m, c)."""
        return scaled_residuals(params.coef, params.var, chunk)

    # ------------------------------------------------------------ nesting
    def simpler(self) -> GaussianExperts | None:
        """The Gaussian family this one contains as df -> infinity (fitted df only)."""
        if self.df is not None:
            return None
        return GaussianExperts(self.n_experts, self.n_outputs, self.var_floor)

    def embed(self, params: GaussianParams, data: EMData) -> StudentTParams:
        """A fit of :meth:`simpler` as t experts at the largest df: the same likelihood."""
        df = params.var.new_full((params.var.shape[0],), NU_MAX)
        return StudentTParams(params.coef, params.var, df)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: StudentTParams) -> dict[str, torch.Tensor]:
        free = {"coef": params.coef, "log_excess_var": log_excess_var(params.var, self.var_floor)}
        if self.df is None:
            # df = NU_MIN + exp(s): unconstrained above the lower end of the range
            free["log_excess_df"] = torch.log((params.df - NU_MIN).clamp(min=1e-12))
        return free

    def _df(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        if "df" in free:
            return free["df"]
        if "log_excess_df" in free:
            return (NU_MIN + torch.exp(free["log_excess_df"])).clamp(max=NU_MAX)
        return free["coef"].new_full((self.n_experts,), float(self.df))

    def from_free(self, free: dict[str, torch.Tensor]) -> StudentTParams:
        return StudentTParams(free["coef"], _variance(self, free), self._df(free))

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert locations (K, m, n) for a design XT (p, n)."""
        return linear_means(free["coef"], XT)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        var = _variance(self, free)  # (K, m)
        resid = y.reshape(1, self.n_outputs, -1) - self.mean_free(free, XT)
        d2 = (resid * resid / var.unsqueeze(-1)).sum(1)  # (K, n)
        log_scale = 0.5 * torch.log(var).sum(1, keepdim=True)
        return student_t_logpdf(d2, log_scale, self._df(free).unsqueeze(1), self.n_outputs)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return free["coef"].new_zeros(())

    # ------------------------------------------------------------ reporting
    def report(self, params: StudentTParams, scaling: Scaling) -> Report:
        """As the Gaussian experts (sigma is the t's scale), then each fitted df.

        A df fitted at either end of its range is a constrained maximum, where the
        likelihood's curvature says nothing about its uncertainty: it is held fixed
        and not reported as a parameter.
        """
        base = GaussianExperts(self.n_experts, self.n_outputs, self.var_floor)
        out = base.report(GaussianParams(params.coef, params.var), scaling)
        free = (
            torch.zeros_like(params.df, dtype=torch.bool)
            if self.df is not None
            else (params.df > NU_MIN * 1.01) & (params.df < NU_MAX * 0.99)
        )
        out.fixed["t_df"], out.fixed["t_df_free"] = params.df.detach().clone(), free
        idx = free.nonzero().flatten().tolist()
        if idx:
            out.add("df", params.df[idx], [f"expert {k}" for k in idx], ["df"] * len(idx),
                    tested=False)  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        base = GaussianExperts(self.n_experts, self.n_outputs, self.var_floor)
        free = base.from_report(values, scaling, fixed)
        df = fixed["t_df"].to(free["coef"].dtype)
        if "df" in values:
            idx = fixed["t_df_free"].nonzero().flatten()
            df = df.index_put((idx,), values["df"])
        free["df"] = df
        return free

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: StudentTParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k in (mu_1..mu_m, sigma_1..sigma_m, nu), data units.

        With d^2 = sum_j e_j^2 / sigma_j^2 and w = (nu + m) / (2 (nu + d^2)), log p
        is -sum_j log sigma_j - (nu + m) / 2 log(1 + d^2 / nu) + terms of nu alone, so

        .. math::  \\partial_\\theta \\log p = -w\\, \\partial_\\theta d^2
                   - [\\theta = \\sigma_j] / \\sigma_j, \\qquad
                   \\partial^2_{\\theta\\theta'} \\log p = -w\\, \\partial^2 d^2
                   + \\frac{2 w^2}{\\nu + m} \\partial_\\theta d^2 \\partial_{\\theta'} d^2
                   + [\\theta = \\theta' = \\sigma_j] / \\sigma_j^2,

        and in nu, with q = d^2 / nu and f = (nu + m) q / (2 (nu + d^2)),
        d/d nu = (psi((nu + m)/2) - psi(nu/2)) / 2 - m / (2 nu) - log(1 + q) / 2 + f.
        A fixed df is a local parameter too; its reported Jacobian is zero.
        """
        m = self.n_outputs
        ys = scaling.y_scale.view(1, -1, 1)
        e = (chunk.y.reshape(1, m, -1) - linear_means(params.coef, chunk.XeT)) * ys  # (K, m, c)
        sig = params.var.sqrt().unsqueeze(-1) * ys  # (K, m, 1)
        K, _, c = e.shape
        nu = params.df.view(-1, 1)  # (K, 1)
        s2 = sig * sig
        d2 = (e * e / s2).sum(1)  # (K, c)
        w = (nu + m) / (2.0 * (nu + d2))
        dd = torch.cat([-2.0 * e / s2, -2.0 * e * e / (s2 * sig)], 1)  # d(d^2), (K, 2m, c)
        L = 2 * m + 1
        d1 = e.new_empty((K, L, c))
        d1[:, : 2 * m] = -w.unsqueeze(1) * dd
        d1[:, m : 2 * m] -= 1.0 / sig
        out = (2.0 / (nu + m) * w * w).view(K, 1, 1, c) * dd.unsqueeze(2) * dd.unsqueeze(1)
        j = torch.arange(m)
        # d^2 (d^2) is diagonal within each output: 2 / s^2, 4 e / s^3, 6 e^2 / s^4
        hd = torch.stack([2.0 / s2.expand_as(e), 4.0 * e / (s2 * sig), 6.0 * e * e / (s2 * s2)])
        wk = w.unsqueeze(1)
        d2_out = e.new_zeros((K, L, L, c))
        d2_out[:, : 2 * m, : 2 * m] = out
        d2_out[:, j, j] -= wk * hd[0]
        d2_out[:, j, m + j] -= wk * hd[1]
        d2_out[:, m + j, j] -= wk * hd[1]
        d2_out[:, m + j, m + j] -= wk * hd[2] - 1.0 / s2
        # degrees of freedom
        q = d2 / nu
        f = (nu + m) * q / (2.0 * (nu + d2))
        d1[:, -1] = (0.5 * (torch.digamma((nu + m) / 2) - torch.digamma(nu / 2)) - m / (2.0 * nu)
                     - 0.5 * torch.log1p(q) + f)  # fmt: skip
        d2_out[:, -1, -1] = (0.25 * (torch.polygamma(1, (nu + m) / 2) - torch.polygamma(1, nu / 2))
                             + m / (2.0 * nu * nu) + 0.5 * q / (nu + d2)
                             + f * (1.0 / (nu + m) - 1.0 / nu - 1.0 / (nu + d2)))  # fmt: skip
        cross = -((d2 - m) / (2.0 * (nu + d2) ** 2)).unsqueeze(1) * dd  # (K, 2m, c)
        d2_out[:, -1, : 2 * m] = cross
        d2_out[:, : 2 * m, -1] = cross
        return LocalDerivatives(d1, d2_out, m)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The means' coefficients on the standardised design, then sigma_1..sigma_m and nu."""
        free = self.from_report(values, scaling, fixed)
        coef = coef_from_data(values["coef"], scaling)
        return coef, torch.cat([values["sigma"], free["df"].unsqueeze(1)], 1)

    # ------------------------------------------------------------ prediction
    def moments(self, params: StudentTParams, XT: torch.Tensor):
        """Locations and scales, each (n, K, m) (scales, not standard deviations)."""
        return linear_moments(params.coef, params.var, XT)

    def predictive_extra(self, params: StudentTParams) -> dict:
        return {"df": params.df}

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`StudentTParams` fields for a design of p columns."""
        K, m = self.n_experts, self.n_outputs
        return {"coef": (K, m, p), "var": (K, m), "df": (K,)}

    def check_params(self, params: StudentTParams, prefix: str = "") -> None:
        """Refuse values no fit gives: non-finite coefficients, squared scales not
        positive, degrees of freedom outside [NU_MIN, NU_MAX] when fitted (not
        positive when fixed).

        Raises
        ------
        ValueError
            Naming the field (after ``prefix``) and what is wrong with it.
        """
        check_finite(prefix + "coef", params.coef)
        if not bool((torch.isfinite(params.var) & (params.var > 0)).all()):
            raise ValueError(f"{prefix + 'var'!r} holds scales that are not positive and finite")
        df = params.df
        if self.df is None:
            if not bool(((df >= NU_MIN) & (df <= NU_MAX)).all()):
                raise ValueError(
                    f"{prefix + 'df'!r} holds fitted degrees of freedom outside "
                    f"[{NU_MIN}, {NU_MAX}]: {df.tolist()}"
                )
        elif not bool((torch.isfinite(df) & (df > 0)).all()):
            raise ValueError(f"{prefix + 'df'!r} holds degrees of freedom that are not positive")
