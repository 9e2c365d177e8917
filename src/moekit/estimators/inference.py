"""Standard errors from the observed information, as flexmix's refit() gives them.

At the fitted parameters theta_hat the observed information is the negative Hessian
of the log-likelihood,

.. math::  I(\\hat\\theta) = -\\nabla^2_\\theta \\sum_i \\log p(y_i \\mid x_i; \\theta)
           \\Big|_{\\theta = \\hat\\theta},

and the standard errors are the square roots of the diagonal of its inverse. The
small penalties of the fit (the gate's ridge, say) are left out: they shape the
estimate, not the information the data carry about it. Where the information is
singular, the parameters it does not determine get no standard error and the
summary says so.

Each family states its reporting parametrisation in its own module (``report``,
in the data's units) and maps it back to its log-density (``from_report``). Where the
expert and gate families also give analytic derivatives (``local_derivatives``), the
Hessian is built from them in one pass of weighted Gram matrices
(:mod:`moekit.estimators._information`); otherwise it is taken by torch autograd
(reverse over reverse) directly in the reported coordinates, summed over chunks of
rows. The parameters:

* expert k: intercept and slopes (per output), then its noise scale ``sigma`` (and
  ``df`` for fitted Student-t degrees of freedom); Poisson experts on the log rate;
  classifier experts per class c = 1..C-1 relative to class 0;
* gate: for experts k other than the reference (expert 0 by default), intercept and
  slopes relative to it (as flexmix and nnet's multinom report them); log(pi_k / pi_0)
  for a constant gate.

z-values are estimate / standard error and p-values two-sided normal, for the
coefficients only: a test of a scale or of degrees of freedom against zero, a point
on the boundary of their range, means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moekit._core.engine import EM_DTYPE, em_threads, to_numpy
from moekit._core.reporting import Scaling
from moekit.estimators._information import analytic_hessian, has_analytic_information


@dataclass
class Summary:
    """Coefficient table of a fitted mixture of experts.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per parameter: ``block`` (expert k or gate), ``parameter``,
        ``estimate``, ``std_error``, ``z_value``, ``p_value``.
    log_likelihood : float
        Total log-likelihood of the data the summary was computed on.
    n_samples : int
    title : str
    note : str
        What the table cannot say: parameters the data do not determine, say.
    """

    table: pd.DataFrame
    log_likelihood: float
    n_samples: int
    title: str
    note: str = ""

    def __str__(self) -> str:
        lines = [
            self.title,
            f"n = {self.n_samples}, log-likelihood = {self.log_likelihood:.4f}",
            "",
        ]
        for block, part in self.table.groupby("block", sort=False):
            lines.append(f"{block}:")
            shown = part.drop(columns="block").set_index("parameter")
            stars = shown["p_value"].map(_stars)
            text = shown.assign(**{" ": stars}).to_string(
                float_format=lambda v: f"{v:.4g}", na_rep="NA"
            )
            lines += ["  " + row for row in text.splitlines()] + [""]
        lines.append("Signif. codes: 0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1")
        if self.note:
            lines += ["", f"Note: {self.note}"]
        return "\n".join(lines)

    def _repr_html_(self) -> str:  # notebooks
        return f"<p>{self.title}</p>" + self.table.to_html(index=False)


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "." if p < 0.1 else ""


HESSIAN_BUDGET = 2**24
"""Rows per chunk of the observed information are chosen so that one chunk's autograd
graph holds about this many numbers per tensor of the graph (rows x experts x width)."""


class ReportedLikelihood:
    """The log-likelihood of a fitted model as a function of its reported parameters.

    Attributes
    ----------
    theta : Tensor of shape (P,)
        The fitted parameters in the reporting parametrisation.
    report : Report
        Their blocks, labels and which of them a z-test applies to.
    n : int
        Rows of the data.
    """

    def __init__(self, model, X, y, gate_reference: int = 0, sample_weight=None,
                 offset=None) -> None:  # fmt: skip
        expert, gate = model._expert_family, model._gate_family
        missing = [
            f"{what} {type(fam).__name__}"
            for what, fam in (("expert", expert), ("gate", gate))
            if not hasattr(fam, "report")
        ]
        if missing:
            raise ValueError(
                "summary() reports the coefficients of linear, Student-t, Poisson and "
                "logistic experts under softmax or constant gates; this model's "
                f"{' and '.join(missing)} has no coefficients to report. Compare such models "
                "by their held-out log-likelihood, BIC or AIC instead."
            )
        K = model._n_experts_fitted
        if not 0 <= gate_reference < K:
            raise ValueError(f"gate_reference must be an expert in [0, {K}); got {gate_reference}.")
        self.model, self.K = model, K
        # frequency weights; the offset is a known term of the experts' linear predictors
        self.data = model._em_data(X, y, offset=offset, sample_weight=sample_weight)
        self.n = self.data.n
        self._escale = _scaling(model, model._expert_cols)
        self._gscale = _scaling(model, model._gate_cols)
        self.report = expert.report(model._params.expert, self._escale)
        if K > 1:
            self.report.extend(gate.report(model._params.gate, self._gscale, gate_reference))
        self.theta = self.report.flat()
        self._jacobian = model._log_jacobian()

    def _chunk_loglik(self, theta, XeT, XgT, y, w=None, offset=None) -> torch.Tensor:
        expert, gate = self.model._expert_family, self.model._gate_family
        values = self.report.unflatten(theta)
        known = {} if offset is None else {"offset": offset}  # the experts' known term
        logp = expert.log_prob_free(expert.from_report(values, self._escale, self.report.fixed),
                                    XeT, y, **known)  # (K, c)  # fmt: skip
        if self.K > 1:
            free = gate.from_report(values, self._gscale, self.report.fixed)
            logp = logp + gate.log_weights_free(free, XgT)
        rows = torch.logsumexp(logp, 0)
        if w is not None:  # frequency weights: row i counts w_i times
            return (rows * w).sum() + self._jacobian * w.sum()
        return rows.sum() + self._jacobian * y.shape[-1]

    def chunk_rows(self) -> int:
        """Rows per chunk, so that one chunk's autograd graph holds about HESSIAN_BUDGET numbers."""
        width = max(self.data.XeT.shape[0], self.data.XgT.shape[0])
        return max(64, HESSIAN_BUDGET // max(self.K * width, 1))

    def loglik(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Total log-likelihood in the data's units at ``theta`` (default: the fit)."""
        theta = self.theta if theta is None else theta
        total = theta.new_zeros(())
        for chunk in self.data.chunks(self.chunk_rows()):
            total = total + self._chunk_loglik(
                theta, chunk.XeT, chunk.XgT, chunk.y, chunk.weight, chunk.offset
            )
        return total

    @property
    def analytic(self) -> bool:
        """Whether both families give analytic derivatives (:mod:`._information`)."""
        return has_analytic_information(self.model._expert_family, self.model._gate_family,
                                        self.K)  # fmt: skip

    def observed_hessian(self, method: str = "auto") -> tuple[torch.Tensor, float]:
        """Hessian (P, P) of the total log-likelihood at the fit, and the log-likelihood.

        ``method``: "analytic" (from the families' derivatives, one pass of weighted
        Grams), "autograd" (:meth:`hessian`) or "auto", the first where both families
        have it.
        """
        if method not in ("auto", "analytic", "autograd"):
            raise ValueError(f"method must be 'auto', 'analytic' or 'autograd'; got {method!r}")
        if method == "analytic" or (method == "auto" and self.analytic):
            return analytic_hessian(self, self.data.weight)
        hess = self.hessian()
        with torch.no_grad():
            return hess, float(self.loglik())

    def hessian(self) -> torch.Tensor:
        """Hessian (P, P) of the total log-likelihood at the fit by autograd, summed over
        row chunks."""
        P = self.theta.numel()
        hess = self.theta.new_zeros((P, P))
        # its passes are as small as EM's, and run on as many threads (see em_threads)
        with em_threads(self.data):
            for chunk in self.data.chunks(self.chunk_rows()):
                self._add_chunk_hessian(hess, chunk)
        return (hess + hess.T) / 2

    def _add_chunk_hessian(self, hess: torch.Tensor, chunk) -> None:
        """Add the chunk's Hessian to ``hess``: reverse over reverse, one row at a time.

        P second backward passes (P is small), not a forward-mode transform nor a batch
        of output gradients: the first use of either imports torch's compiler stack,
        over a second and tens of MB for a summary that otherwise takes milliseconds.
        """
        P = hess.shape[0]
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self._chunk_loglik(
                theta, chunk.XeT, chunk.XgT, chunk.y, chunk.weight, chunk.offset
            )
            (grad,) = torch.autograd.grad(value, theta, create_graph=True)
            for i in range(P):
                if not grad[i].requires_grad:  # constant in theta: its row is zero
                    continue
                (row,) = torch.autograd.grad(grad[i], theta, retain_graph=True,
                                             allow_unused=True, materialize_grads=True)  # fmt: skip
                hess[i] += row


def observed_information_summary(
    model,
    X,
    y,
    gate_reference: int = 0,
    information_rows: int | None = None,
    sample_weight=None,
    offset=None,
) -> Summary:
    """Build the :class:`Summary` of a fitted MoERegressor or MoEClassifier.

    The observed information is the negative Hessian of the log-likelihood alone:
    the small penalties that keep the fit finite shape the estimate, not its
    uncertainty. It is summed over chunks of rows, so its memory does not grow with n.

    With ``information_rows = m < n`` it is estimated as n / m times the sum over m
    rows drawn at random without replacement (seed 0): an unbiased estimate of the
    sum over all rows at m / n of the cost (the exact sum costs about as much as P
    passes over the data, P parameters, by autograd; about one EM iteration's
    Grams per pair of linear predictors analytically). The note says so.
    """
    n = len(y)
    if sample_weight is not None or offset is not None:
        # frequency weights: the information of the repeated rows
        lik = ReportedLikelihood(model, X, y, gate_reference, sample_weight, offset)
        hess, total = lik.observed_hessian()
        se, note = _standard_errors(-hess)
        n = lik.data.w_total if sample_weight is not None else n
        n = int(n) if float(n).is_integer() else n
    elif information_rows is not None and n > information_rows:
        rows = np.sort(np.random.default_rng(0).choice(n, information_rows, replace=False))
        X_rows = X.iloc[rows] if hasattr(X, "iloc") else np.asarray(X)[rows]
        y_rows = y.iloc[rows] if hasattr(y, "iloc") else np.asarray(y)[rows]
        lik = ReportedLikelihood(model, X_rows, y_rows, gate_reference)
        se, note = _standard_errors(-lik.observed_hessian()[0] * (n / information_rows))
        note = (f"The observed information is estimated from {information_rows:,} random rows "
                f"of {n:,}, scaled by n / m. " + note).strip()  # fmt: skip
        # the total over every row, without building the designs of all of them at once
        total = float(np.sum(model.log_likelihood_samples(X, y)))
    else:
        lik = ReportedLikelihood(model, X, y, gate_reference)
        hess, total = lik.observed_hessian()
        se, note = _standard_errors(-hess)
    report = lik.report
    est = to_numpy(lik.theta)
    tested = np.asarray(report.tested)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(tested, est / se, np.nan)
    from scipy.special import ndtr

    p = np.where(tested, 2.0 * ndtr(-np.abs(z)), np.nan)
    table = pd.DataFrame({"block": report.blocks, "parameter": report.labels, "estimate": est,
                          "std_error": se, "z_value": z, "p_value": p})  # fmt: skip
    expert, gate = model._expert_family, model._gate_family
    title = (
        f"{type(model).__name__}: {lik.K} expert{'s' * (lik.K != 1)} ({_kind(expert)} "
        f"expert{'s' * (lik.K != 1)}, {_kind(gate) if lik.K > 1 else 'no'} gate)"
    )
    return Summary(table, total, n, title, note)


def _standard_errors(info: torch.Tensor) -> tuple[np.ndarray, str]:
    """Square roots of the diagonal of the inverse information, and a note on its rank.

    Where the information is singular (a direction the data do not determine, such
    as an expert with no rows or a gate that separates its regions perfectly), the
    parameters along it get no standard error (NaN), and the note says so; no
    penalty is slipped in to invert it. Where it is not positive definite, the
    estimate is not a maximum of the likelihood, and the note says that too.
    """
    # judged on the information scaled to a unit diagonal (D^-1/2 I D^-1/2, as R's QR
    # judges a design's rank column by column): a feature in dollars or in millions
    # changes its parameters' units, not what the data determine
    diag = torch.diagonal(info).abs()
    d = torch.where(diag > 0, diag.sqrt(), torch.ones_like(diag))
    evals, evecs = torch.linalg.eigh(info / d[:, None] / d[None, :])
    scale = evals.abs().max().clamp(min=1e-300)
    ok = evals > 1e-10 * scale
    cov = evecs @ torch.diag(torch.where(ok, 1.0 / evals, torch.zeros_like(evals))) @ evecs.T
    var = torch.diag(cov) / diag.where(diag > 0, torch.ones_like(diag))
    undetermined = (evecs[:, ~ok] ** 2).sum(1) > 1e-8
    se = torch.where(undetermined | (var <= 0), torch.full_like(var, float("nan")), var.sqrt())
    notes = []
    n_flat = int((evals.abs() <= 1e-10 * scale).sum())
    n_neg = int((evals < -1e-10 * scale).sum())
    if n_flat:
        notes.append(
            f"The observed information is singular along {n_flat} direction(s): the data do "
            "not determine the parameters involved, which have no standard error (NaN)."
        )
    if n_neg:
        notes.append(
            f"The log-likelihood curves upwards along {n_neg} direction(s) at the estimate, "
            "which is not a maximum of the likelihood there (a saddle, or a penalised "
            "optimum away from the unpenalised one); the parameters involved have no "
            "standard error (NaN)."
        )
    return to_numpy(se), " ".join(notes)


def _kind(family) -> str:
    return getattr(family, "report_name", type(family).__name__)


def _scaling(model, cols) -> Scaling:
    """How the model's standardised design over ``cols`` maps to the data's units."""
    d = model.n_features_in_
    cols = np.arange(d) if cols is None else np.asarray(cols)
    idx = torch.as_tensor(cols, device=model._x_mean.device)
    names = getattr(model, "feature_names_in_", None)
    fnames = [str(v) for v in names] if names is not None else [f"x{j}" for j in range(d)]
    if hasattr(model, "classes_"):
        outputs = [str(c) for c in model.classes_]
        y_mean, y_scale = torch.zeros(1), torch.ones(1)
    else:
        m = len(model._y_mean)
        outputs = ["y"] if m == 1 else [f"y{j}" for j in range(m)]
        y_mean = torch.as_tensor(model._y_mean, dtype=EM_DTYPE)
        y_scale = torch.as_tensor(model._y_scale, dtype=EM_DTYPE)
    dev = model._x_mean.device
    return Scaling(model._x_mean[idx], model._x_scale[idx], y_mean.to(dev), y_scale.to(dev),
                   [fnames[j] for j in cols], outputs)  # fmt: skip
