"""Standard errors from the observed information, as flexmix's refit() gives them.

At the fitted parameters theta_hat the observed information is the negative
Hessian of the fitted objective (the log-likelihood plus the log-prior of the
penalties, which are tiny for the regressor's gate),

.. math::  I(\\hat\\theta) = -\\nabla^2_\\theta \\Big[\\sum_i \\log p(y_i \\mid x_i; \\theta)
                              + \\log \\text{prior}(\\theta)\\Big]_{\\theta = \\hat\\theta},

and the standard errors are the square roots of the diagonal of its inverse. The
Hessian is taken by torch autograd (``torch.func.hessian``) of the log-likelihood
written out in the reporting parametrisation, in the data's units:

* expert k: intercept and slopes (per output), then its noise scale ``sigma``
  (and ``df`` for fitted Student-t degrees of freedom); Poisson experts on the log
  rate; classifier experts per class c = 1..C-1 relative to class 0;
* gate: for experts k = 1..K-1, intercept and slopes relative to expert 0 (the
  reference, as in flexmix and nnet's multinom); log(pi_k / pi_0) for a constant gate.

z-values are estimate / standard error and p-values two-sided normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moekit._core.components import Normal, StudentT
from moekit._core.engine import EM_DTYPE, to_numpy


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
    """

    table: pd.DataFrame
    log_likelihood: float
    n_samples: int
    title: str

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
        return "\n".join(lines)

    def _repr_html_(self) -> str:  # notebooks
        return f"<p>{self.title}</p>" + self.table.to_html(index=False)


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "." if p < 0.1 else ""


def _centred_penalty(r: torch.Tensor) -> torch.Tensor:
    """sum_k ||r_k||^2 - ||sum_k r_k||^2 / K for rows r_1..r_{K-1} relative to row 0.

    This is min_s sum_k ||V_k + s||^2 over a common shift: the symmetric penalty
    written in the reference parametrisation.
    """
    K = r.shape[0] + 1
    return (r**2).sum() - (r.sum(0) ** 2).sum() / K


def observed_information_summary(model, X, y, gate_reference: int = 0) -> Summary:
    """Build the :class:`Summary` of a fitted MoERegressor or MoEClassifier."""
    spec = _Spec(model, X, y, gate_reference)
    theta = spec.theta0.clone()
    objective = spec.objective
    with torch.no_grad():
        loglik = float(spec.loglik(theta))
    hess = torch.func.hessian(objective)(theta)
    info = -(hess + hess.T) / 2
    evals, evecs = torch.linalg.eigh(info)
    ok = evals > 1e-10 * evals.abs().max()
    cov = evecs @ torch.diag(torch.where(ok, 1.0 / evals, torch.zeros_like(evals))) @ evecs.T
    var = torch.diag(cov)
    # directions the data do not determine leave their parameters without a standard error
    undetermined = (evecs[:, ~ok] ** 2).sum(1) > 1e-8
    se = torch.where(undetermined | (var <= 0), torch.full_like(var, float("nan")), var.sqrt())
    est = to_numpy(theta)
    se_np = to_numpy(se)
    z = est / se_np
    from scipy.special import ndtr

    p = 2.0 * ndtr(-np.abs(z))
    table = pd.DataFrame(
        {
            "block": spec.blocks,
            "parameter": spec.names,
            "estimate": est,
            "std_error": se_np,
            "z_value": z,
            "p_value": p,
        }
    )
    title = (
        f"{type(model).__name__}: {model.n_experts} experts "
        f"({spec.expert_kind} experts, {spec.gate_kind} gate)"
    )
    return Summary(table, loglik, spec.n, title)


class _Spec:
    """The log-likelihood as a function of the flat reporting parameter vector."""

    def __init__(self, model, X, y, gate_reference: int = 0) -> None:
        from sklearn.utils.validation import validate_data

        self.model = model
        K = model._n_experts_fitted
        if not 0 <= gate_reference < K:
            raise ValueError(f"gate_reference must be an expert in [0, {K}); got {gate_reference}.")
        # the reference expert goes first: the gate's rows are the others relative to it
        self.order = [gate_reference] + [k for k in range(K) if k != gate_reference]
        Xn = validate_data(model, X, reset=False, dtype=np.float64)
        data = model._em_data(X, y)
        self.n = data.n
        dev = model._x_mean.device
        self.X = torch.as_tensor(np.require(Xn, requirements="W"), dtype=EM_DTYPE, device=dev)
        d = Xn.shape[1]
        self.ecols = np.arange(d) if model._expert_cols is None else model._expert_cols
        self.gcols = np.arange(d) if model._gate_cols is None else model._gate_cols
        self.Xe = self.X[:, torch.as_tensor(self.ecols)]
        self.Xg = self.X[:, torch.as_tensor(self.gcols)]
        names = getattr(model, "feature_names_in_", None)
        self.fnames = [str(v) for v in names] if names is not None else [f"x{j}" for j in range(d)]
        self.K = model._n_experts_fitted
        self.parts: list[tuple[str, tuple]] = []  # (name, shape) in theta order
        self.blocks: list[str] = []
        self.names: list[str] = []
        values: list[np.ndarray] = []
        self._set_expert(values, data)
        self._set_gate(values)
        self.theta0 = torch.as_tensor(np.concatenate([v.ravel() for v in values]), dtype=EM_DTYPE)

    # ---------------------------------------------------------------- bookkeeping
    def _add(self, values, name, value, blocks, labels):
        value = np.asarray(value, dtype=np.float64)
        self.parts.append((name, value.shape))
        values.append(value)
        self.blocks += blocks
        self.names += labels

    def _unpack(self, theta):
        out, i = {}, 0
        for name, shape in self.parts:
            size = int(np.prod(shape))
            out[name] = theta[i : i + size].reshape(shape)
            i += size
        return out

    # ---------------------------------------------------------------- experts
    def _set_expert(self, values, data) -> None:
        m, K = self.model, self.K
        self.fixed_df = None
        fam = type(m._expert_family).__name__
        enames = [self.fnames[j] for j in self.ecols]
        if fam == "LogisticExperts":
            self.expert_kind = "multinomial logistic"
            W = to_numpy(m._params.expert.coef)  # (K, C, p) on standardised design
            W = W[:, 1:] - W[:, :1]  # classes 1..C-1 against class 0
            slopes = W[..., :-1] / to_numpy(m._x_scale)[self.ecols]
            inter = W[..., -1] - (W[..., :-1] * to_numpy(m._x_mean / m._x_scale)[self.ecols]).sum(
                -1
            )
            coef = np.concatenate([inter[..., None], slopes], -1)  # (K, C-1, 1 + d_e)
            classes = [str(c) for c in m.classes_]
            blocks, labels = [], []
            for k in range(K):
                for c in range(1, len(classes)):
                    for nm in ["intercept", *enames]:
                        blocks.append(f"expert {k}")
                        labels.append(f"[{classes[c]} vs {classes[0]}] {nm}")
            self._add(values, "logit", coef, blocks, labels)
            self.y_codes = data.y
            return
        inter = np.atleast_2d(m.intercept_.T).T.reshape(K, -1)  # (K, m)
        slopes = m.coef_.reshape(K, inter.shape[1], -1)[..., self.ecols]  # (K, m, d_e)
        outs = inter.shape[1]
        self.y = torch.as_tensor(
            np.asarray(y_to_2d(data, m)), dtype=EM_DTYPE
        )  # (n, m) in the data's units
        coef = np.concatenate([inter[..., None], slopes], -1)  # (K, m, 1 + d_e)
        tag = (lambda j: "") if outs == 1 else (lambda j: f"[y{j}] ")
        blocks = [
            f"expert {k}" for k in range(K) for j in range(outs) for _ in range(1 + len(enames))
        ]
        labels = [
            f"{tag(j)}{nm}" for k in range(K) for j in range(outs) for nm in ["intercept", *enames]
        ]
        if fam == "PoissonExperts":
            self.expert_kind = "Poisson (log link)"
            self._add(values, "coef", coef, blocks, labels)
            return
        self.expert_kind = "Student-t" if fam == "StudentTExperts" else "linear-Gaussian"
        self._add(values, "coef", coef, blocks, labels)
        sigma = np.asarray(m.noise_std_).reshape(K, outs)
        self._add(
            values,
            "sigma",
            sigma,
            [f"expert {k}" for k in range(K) for _ in range(outs)],
            [f"{tag(j)}sigma" for k in range(K) for j in range(outs)],
        )
        self.fixed_df = None
        if fam == "StudentTExperts":
            from moekit.experts.student_t import NU_MAX, NU_MIN

            df = np.asarray(m.df_, dtype=float)
            # a df fitted at the edge of its range is a constrained maximum: hold it fixed
            free = (
                np.zeros(K, bool)
                if m.df is not None
                else ((df > NU_MIN * 1.01) & (df < NU_MAX * 0.99))
            )
            self.fixed_df, self.free_df = torch.as_tensor(df, dtype=EM_DTYPE), free
            if free.any():
                self._add(
                    values,
                    "df",
                    df[free],
                    [f"expert {k}" for k in range(K) if free[k]],
                    ["df"] * int(free.sum()),
                )

    # ---------------------------------------------------------------- gate
    def _set_gate(self, values) -> None:
        m, K = self.model, self.K
        fam = type(m._gate_family).__name__
        if K == 1:
            self.gate_kind = "no"
            return
        ref, others = self.order[0], self.order[1:]
        if fam == "ConstantGate":
            self.gate_kind = "constant"
            lp = to_numpy(m._params.gate.log_pi)
            self._add(
                values,
                "log_odds",
                lp[others] - lp[ref],
                ["gate"] * (K - 1),
                [f"log(pi_{k} / pi_{ref})" for k in others],
            )
            return
        self.gate_kind = "softmax"
        V = to_numpy(m._params.gate.coef)  # (K, p_g) symmetric, standardised design
        R = V[others] - V[ref]
        scale = to_numpy(m._x_scale)[self.gcols]
        slopes = R[:, :-1] / scale
        inter = R[:, -1] - (R[:, :-1] * to_numpy(m._x_mean)[self.gcols] / scale).sum(-1)
        gnames = [self.fnames[j] for j in self.gcols]
        self._add(
            values,
            "gate",
            np.concatenate([inter[:, None], slopes], 1),
            [f"gate: expert {k} vs {ref}" for k in others for _ in range(1 + len(gnames))],
            [nm for k in others for nm in ["intercept", *gnames]],
        )

    # ---------------------------------------------------------------- likelihood
    def _log_gate(self, P) -> torch.Tensor:
        n, K = self.n, self.K
        if K == 1:
            return torch.zeros((n, 1), dtype=EM_DTYPE)
        if "log_odds" in P:
            logits = torch.cat([P["log_odds"].new_zeros(1), P["log_odds"]]).expand(n, K)
        else:
            G = P["gate"]
            rel = G[:, :1].T + self.Xg @ G[:, 1:].T  # (n, K-1)
            logits = torch.cat([rel.new_zeros((n, 1)), rel], 1)
        return torch.log_softmax(logits, dim=1)

    def _log_experts(self, P) -> torch.Tensor:
        if "logit" in P:
            W = P["logit"]  # (K, C-1, 1 + d_e)
            logits = W[..., 0].unsqueeze(-1) + torch.einsum("kcd,nd->kcn", W[..., 1:], self.Xe)
            logits = torch.cat([logits.new_zeros((self.K, 1, self.n)), logits], 1)
            logp = torch.log_softmax(logits, dim=1)  # (K, C, n)
            idx = self.y_codes.view(1, 1, -1).expand(self.K, 1, -1)
            return logp.gather(1, idx).squeeze(1).T  # (n, K)
        B = P["coef"]  # (K, m, 1 + d_e)
        mean = B[..., 0].unsqueeze(0) + torch.einsum("kmd,nd->nkm", B[..., 1:], self.Xe)
        y = self.y.unsqueeze(1)  # (n, 1, m)
        if "sigma" not in P:  # Poisson on the log scale
            eta = mean
            return (y * eta - torch.exp(eta) - torch.lgamma(y + 1)).sum(-1)
        sigma = P["sigma"].unsqueeze(0)  # (1, K, m)
        if self.fixed_df is None:
            return Normal.log_prob(y, mean, sigma)
        nu = self.fixed_df
        if "df" in P:  # free entries from theta, the others fixed
            free = iter(P["df"])
            nu = torch.stack(
                [next(free) if f else nu[k] for k, f in enumerate(self.free_df.tolist())]
            )
        return StudentT.log_prob(y, mean, sigma, nu.unsqueeze(0))

    def loglik(self, theta) -> torch.Tensor:
        P = self._unpack(theta)
        experts = self._log_experts(P)[:, self.order]  # gate columns follow self.order
        return torch.logsumexp(self._log_gate(P) + experts, dim=1).sum()

    def log_prior(self, theta) -> torch.Tensor:
        m, P = self.model, self._unpack(theta)
        out = theta.new_zeros(())
        if "gate" in P and hasattr(m._gate_family, "alpha"):
            std = P["gate"][:, 1:] * m._x_scale[torch.as_tensor(self.gcols)]
            out = out - 0.5 * m._gate_family.alpha * _centred_penalty(std)
        if "logit" in P:
            std = P["logit"][..., 1:] * m._x_scale[torch.as_tensor(self.ecols)]
            for k in range(self.K):
                out = out - 0.5 * m._expert_family.alpha * _centred_penalty(std[k])
        if "coef" in P and "sigma" not in P and hasattr(m._expert_family, "alpha"):
            std = P["coef"][..., 1:] * m._x_scale[torch.as_tensor(self.ecols)]
            out = out - 0.5 * m._expert_family.alpha * (std**2).sum()
        return out

    def objective(self, theta) -> torch.Tensor:
        return self.loglik(theta) + self.log_prior(theta)


def y_to_2d(data, model) -> np.ndarray:
    """The target in the data's units, (n, m), from the family's encoded (m, n) target."""
    y = to_numpy(data.y).T
    return y * model._y_scale + model._y_mean
