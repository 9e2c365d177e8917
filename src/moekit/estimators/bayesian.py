"""BayesianMoERegressor: the mixture of experts with posteriors over the experts' weights.

Fitted by variational EM through the one EM loop: the Bayesian expert family
(:mod:`moekit.experts.bayesian_gaussian`) and the Dirichlet gate
(:mod:`moekit.gates.dirichlet`) define the loop's E-step terms, M-steps and
log-priors so that its objective is the evidence lower bound.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from sklearn.utils.validation import check_is_fitted

from moekit._core.data import EMData
from moekit._core.engine import to_numpy
from moekit._core.validation import Interval, Options
from moekit.estimators._params import EM_DEFAULTS, RUN_DEFAULTS
from moekit.estimators.regressor import MoERegressor
from moekit.experts.bayesian_gaussian import (
    NOISE_KINDS,
    PRIOR_KINDS,
    PRIOR_MEANS,
    BayesianGaussianExperts,
)
from moekit.gates.dirichlet import DirichletGate
from moekit.io import register_model


def predictive_log_joint(expert, gate, params, data: EMData) -> torch.Tensor:
    """log E_q pi_k(x_i) + log N(y_i; m_k^T x_i, 1 / beta_k + x_i^T B_k x_i), shape (K, n).

    The log-sum-exp over experts is the posterior predictive log-density of y_i (on
    the standardised target), under the variational posterior.
    """
    out = data.XeT.new_empty((expert.n_experts, data.n))
    # chunk by chunk, so that the temporaries stay O(chunk K m) at any n
    for chunk in data.chunks():
        means, stds = expert.moments(params.expert, chunk.XeT)  # (c, K, m)
        z = (chunk.y.T.unsqueeze(1) - means) / stds
        logn = (-0.5 * (np.log(2.0 * np.pi) + z**2) - torch.log(stds)).sum(-1)  # (c, K)
        out[:, chunk.start : chunk.stop] = logn.T + gate.log_weights(params.gate, chunk.XgT)
    return out


@register_model
class BayesianMoERegressor(MoERegressor):
    """Bayesian mixture-of-experts regression fitted by variational EM.

    Expert k predicts output j of y as N(w_kj^T x, 1 / beta_kj) with a Gaussian
    prior w_kj ~ N(w0_j, A_kj) on its coefficients; a gate mixes the experts:
    constant weights pi with a Dirichlet prior Dir(mu, ..., mu) (``gate='constant'``),
    a softmax gate softmax(V x) or a two-layer gate softmax(V_1 tanh(V_2 x))
    (``'softmax'``, ``'mlp'``). Mean-field variational EM fits q(Z) q(W) [q(pi)]:

    * E-step: r_ik = q(z_i = k) proportional to exp(E log pi_k(x_i) + 1/2 log beta_k
      - beta_k / 2 ((y_i - m_k^T x_i)^2 + x_i^T B_k x_i));
    * q(w_k) = N(m_k, B_k), B_k = (A_k^{-1} + beta_k sum_i r_ik x_i x_i^T)^{-1},
      m_k = B_k (A_k^{-1} w0 + beta_k sum_i r_ik x_i y_i); q(pi) = Dir(mu + gamma),
      gamma_k = sum_i r_ik;
    * point estimates maximising the ELBO: beta, the prior's A_k (and w0), and the
      gate's V (with a small ridge penalty, its log-prior).

    The objective EM climbs is the ELBO itself, and it never decreases.

    Predictions integrate the weights over their posterior: each expert's
    predictive is N(m_k^T x, 1 / beta_k + x^T B_k x), so its spread grows where the
    data say little about the weights (few rows, far from the training inputs), and
    the experts are mixed by the predictive gate weights (E_q pi_k for the
    Dirichlet gate, g_k(x) for the others). ``predict_distribution`` returns that
    mixture, ``log_likelihood`` its log-density (the posterior predictive), and
    ``responsibilities`` the posterior of z under it.

    Parameters
    ----------
    n_experts : int, default=3
        Number of experts K. With ``gate='constant'`` and a small
        ``dirichlet_concentration``, surplus experts empty out: K is an upper bound
        and ``n_effective_experts_`` says how many are used.
    gate : {'softmax', 'constant', 'mlp'} or gate object, default='softmax'
        ``'constant'`` is the Dirichlet gate (constant weights with a posterior);
        ``'softmax'`` and ``'mlp'`` are point-estimated input-dependent gates, as in
        :class:`MoERegressor`.
    prior : {'ard', 'isotropic', 'full'}, default='ard'
        Prior covariance A_k of each expert's slopes: diagonal with one precision
        per feature (automatic relevance determination: irrelevant features get
        large precisions, and their weights shrink to zero), one precision for all
        slopes, or a full matrix. Fitted per expert and output. The intercept keeps
        a broad fixed prior (sd 10 in units of the target's sd), since ARD would
        pull every expert's level towards the mean of y.
    noise : {'shared', 'per_expert'}, default='shared'
        One noise precision beta (per output) shared by all experts, as in Bishop and
        Svensen (2003), or one per expert.
    prior_mean : {'zero', 'shared'}, default='zero'
        Prior mean w0 of the coefficients (on standardised features and target): zero,
        or one vector shared by the experts and fitted. (Per-expert means would sit on
        each expert's posterior and undo the prior.)
    dirichlet_concentration : float or None, default=None
        mu of the Dirichlet gate's prior; None means 1 / n_experts. Below 1 it
        favours few experts.
    effective_threshold : float, default=0.01
        An expert counts in ``n_effective_experts_`` when its expected weight
        exceeds this.
    init, n_init, max_iter, tol, init_max_iter, init_sample_size, warm_start, \
random_state, verbose, verbose_interval, device, expert_features, gate_features, \
gate_options
        As in :class:`MoERegressor`; ``tol`` bounds the change of the mean per-sample
        ELBO, and ``max_iter`` defaults to 500 since experts empty out slowly.
    distributed : bool, default=False
        Data-parallel EM over a :mod:`torch.distributed` process group, as in
        :class:`MoERegressor`.
    reg_var : float, default=1e-6
        Smallest noise variance 1 / beta, relative to the target's variance.
    gate_alpha : float, default=1.0
        Precision of the Gaussian prior N(0, 1 / gate_alpha) on a softmax or MLP
        gate's slopes (standardised features), whose log-density the ELBO includes:
        the gate is its MAP estimate. The default is the unit prior the experts'
        slopes start from; :class:`MoERegressor`'s 1e-5 is nearly flat, which on
        small data lets the gate turn sharp and the predictive overconfident (90%
        intervals covered 88% against 90.5% with the unit prior, n = 60, in
        ``bench/bayes.py``).

    Attributes
    ----------
    elbo_history_ : list of float
        The ELBO after 0, 1, ... iterations, per sample and in the data's units (the
        log-Jacobian of the target's standardisation added), plus the gate's
        log-prior / n for the softmax and MLP gates. Never decreases.
        ``log_likelihood_history_`` is the same list (the objective EM tracked).
    elbo_ : float
        Its last value.
    log_likelihood_ : float
        Mean posterior predictive log-density of the training data.
    coef_, intercept_ : ndarray
        Posterior means of the slopes (K, n_features) and intercepts (K,) in the
        data's units; (K, m, n_features) and (K, m) for m outputs.
    coef_covariance_ : ndarray of shape (K, n_features + 1, n_features + 1)
        Posterior covariance B_k in the data's units, over [intercept, x_1, ...,
        x_d] ((K, m, d + 1, d + 1) for m outputs); zero for columns the experts do
        not see.
    noise_std_ : ndarray of shape (K,) or (K, m)
        1 / sqrt(beta) in the data's units.
    expected_weights_ : ndarray of shape (K,)
        E_q pi_k for the Dirichlet gate; the mean responsibility for the others.
    n_effective_experts_ : int
        Experts whose expected weight exceeds ``effective_threshold``.
    expert_sizes_, n_iter_, converged_, n_features_in_, feature_names_in_
        As in :class:`MoERegressor`.

    Notes
    -----
    Experts are numbered by decreasing size (total responsibility), so the
    surplus experts of an over-sized fit come last.

    References
    ----------
    Waterhouse, MacKay and Robinson (1996), Bayesian methods for mixtures of experts.
    Bishop and Svensen (2003), Bayesian hierarchical mixtures of experts.
    Ueda and Ghahramani (2002), Bayesian model search for mixture models based on
    optimizing variational bounds.

    Examples
    --------
    >>> import numpy as np
    >>> from moekit import BayesianMoERegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(-1, 1, (500, 1))
    >>> y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 * X[:, 0]) + 0.05 * rng.normal(size=500)
    >>> m = BayesianMoERegressor(n_experts=2, random_state=0).fit(X, y)
    >>> bool(m.score(X, y) > 0.99)
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **MoERegressor._parameter_constraints,
        "prior": [Options(PRIOR_KINDS)],
        "noise": [Options(NOISE_KINDS)],
        "prior_mean": [Options(PRIOR_MEANS)],
        "dirichlet_concentration": [None, Interval(numbers.Real, 0, None, closed="neither")],
        "effective_threshold": [Interval(numbers.Real, 0, 1, closed="neither")],
    }
    _order_by_mean = False  # by size: surplus experts last
    _min_features = 1  # MoERegressor fits X of no columns as a mixture of y; not this one

    _defaults: ClassVar[dict] = {
        "n_experts": 3,
        "gate": "softmax",
        "prior": "ard",
        "noise": "shared",
        "prior_mean": "zero",
        "dirichlet_concentration": None,
        "effective_threshold": 0.01,
        **EM_DEFAULTS,
        "max_iter": 500,
        "reg_var": 1e-6,
        "gate_alpha": 1.0,
        **RUN_DEFAULTS,
        "gate_options": None,
        "distributed": False,
    }

    # ------------------------------------------------------------------ families
    def _expert_class(self):
        return BayesianGaussianExperts

    def _make_expert(self, coding, seed: int) -> BayesianGaussianExperts:
        return BayesianGaussianExperts(self.n_experts, len(coding["_y_mean"]), prior=self.prior,
                                       noise=self.noise, prior_mean=self.prior_mean,
                                       var_floor=self.reg_var)  # fmt: skip

    def _make_gate(self, seed: int):
        if isinstance(self.gate, str) and self.gate == "constant":
            if self.gate_options:
                raise ValueError("gate_options are for gate='mlp'; got gate='constant'.")
            mu = self.dirichlet_concentration
            return DirichletGate(self.n_experts, 1.0 / self.n_experts if mu is None else mu)
        return super()._make_gate(seed)

    def freeze_experts(self, experts) -> BayesianMoERegressor:
        """Keep ``experts`` fixed in later refits: only where nothing ties them to the rest.

        With ``noise='shared'`` or ``prior_mean='shared'`` the experts share
        hyper-parameters, and an expert held apart from their update would leave a
        step that is no coordinate maximiser of the ELBO; such models refuse.
        ``refit(part='gate')`` (every expert held) is always offered.
        """
        if self.noise == "shared" or self.prior_mean == "shared":
            raise ValueError(
                "freeze_experts: these experts share hyper-parameters (noise="
                f"{self.noise!r}, prior_mean={self.prior_mean!r}), so one cannot be held "
                "apart; fit with noise='per_expert' and prior_mean='zero' to freeze some."
            )
        return super().freeze_experts(experts)

    def _fitted_state(self, model, result, prepared, frozen=()):
        state = super()._fitted_state(model, result, prepared, frozen)
        # log_likelihood_: the posterior predictive density of the training rows, not
        # the E-step's expected log-density the ELBO is built from
        data = prepared.data
        joint = predictive_log_joint(model.expert, model.gate, state["_params"], data)
        rows = torch.logsumexp(joint, 0)
        if data.weight is not None:  # frequency weights
            rows = rows * data.weight
        total = data.reduce(rows.sum())  # over every process's rows
        jac = self._target().log_jacobian(prepared.state)
        state["log_likelihood_"] = float(total) / data.w_total + jac
        return state

    # ------------------------------------------------------------------ queries
    def _log_joint(self, X, y, offset=None) -> torch.Tensor:
        data = self._em_data(X, y, offset)
        return predictive_log_joint(self._expert_family, self._gate_family, self._params, data)

    @property
    def elbo_history_(self) -> list[float]:
        check_is_fitted(self)
        return self.log_likelihood_history_

    @property
    def elbo_(self) -> float:
        return float(self.elbo_history_[-1])

    @property
    def noise_std_(self) -> np.ndarray:
        std = 1.0 / np.sqrt(to_numpy(self._params.expert.beta)) * self._y_scale
        return std if self._y_2d else std[:, 0]

    @property
    def expected_weights_(self) -> np.ndarray:
        check_is_fitted(self)
        if isinstance(self._gate_family, DirichletGate):
            return to_numpy(self._gate_family.expected_weights(self._params.gate))
        return self.expert_sizes_ / self.expert_sizes_.sum()

    @property
    def n_effective_experts_(self) -> int:
        return int((self.expected_weights_ > self.effective_threshold).sum())

    def _data_map(self) -> tuple[np.ndarray, np.ndarray]:
        """T (m, d + 1, p) and offset (m, d + 1) with data-unit [intercept, x_1..x_d] =
        T w + offset for standardised-design coefficients w (slopes, then intercept)."""
        d, cols = self.n_features_in_, self._expert_cols
        cols = np.arange(d) if cols is None else np.asarray(cols)
        mean, scale = to_numpy(self._x_mean)[cols], to_numpy(self._x_scale)[cols]
        q = len(cols)
        T = np.zeros((d + 1, q + 1))
        T[0, :q] = -mean / scale
        T[0, q] = 1.0
        T[1 + cols, np.arange(q)] = 1.0 / scale
        T = T[None] * self._y_scale[:, None, None]  # (m, d + 1, p)
        offset = np.zeros((len(self._y_scale), d + 1))
        offset[:, 0] = self._y_mean
        return T, offset

    @property
    def coef_covariance_(self) -> np.ndarray:
        """Posterior covariance of [intercept, x_1, ..., x_d] per expert, in the data's units."""
        check_is_fitted(self)
        T, _ = self._data_map()
        B = to_numpy(self._params.expert.cov)  # (K, m, p, p)
        cov = np.einsum("mab,kmbc,mdc->kmad", T, B, T)
        return cov if self._y_2d else cov[:, 0]

    # ------------------------------------------------------------------ summary
    def summary(self, X=None, y=None, *, gate_reference: int = 0,
                information_rows: int | None = None):  # fmt: skip
        """Posterior means and standard deviations of the coefficients, in the data's units.

        A variational Bayesian fit has a posterior q(w) = N(m, B) instead of an
        observed information: the table gives its means (``estimate``) and standard
        deviations (``std_error``), with ``z_value`` = mean / sd; there are no p-values.
        For the Dirichlet gate it adds the posterior mean and sd of each weight pi_k;
        a softmax or MLP gate is a point estimate and is not tabulated.

        Parameters
        ----------
        X, y : ignored
            Accepted for the signature of :meth:`MoERegressor.summary`: the posterior
            needs no data.
        gate_reference : int, default=0
            Ignored (the Dirichlet weights are reported directly).
        information_rows : int, optional
            Ignored (there is no observed information to estimate).

        Returns
        -------
        Summary
        """
        from moekit.estimators.inference import Summary

        check_is_fitted(self)
        T, offset = self._data_map()
        params = self._params.expert
        m_std, B = to_numpy(params.coef), to_numpy(params.cov)  # (K, m, p), (K, m, p, p)
        mean = np.einsum("mab,kmb->kma", T, m_std) + offset[None]
        sd = np.sqrt(np.einsum("mab,kmbc,mac->kma", T, B, T))
        names = getattr(self, "feature_names_in_", None)
        names = [str(v) for v in names] if names is not None else [
            f"x{j}" for j in range(self.n_features_in_)]  # fmt: skip
        labels = ["intercept", *names]
        K, m = mean.shape[:2]
        tag = [""] if m == 1 else [f"[y{j}] " for j in range(m)]
        seen = [0, *(1 + np.arange(self.n_features_in_) if self._expert_cols is None
                     else 1 + np.sort(self._expert_cols))]  # fmt: skip
        rows = [
            {"block": f"expert {k}", "parameter": tag[j] + labels[a],
             "estimate": mean[k, j, a], "std_error": sd[k, j, a]}
            for k in range(K) for j in range(m) for a in seen
        ]  # fmt: skip
        if isinstance(self._gate_family, DirichletGate):
            w = to_numpy(self._gate_family.expected_weights(self._params.gate))
            s = to_numpy(self._gate_family.weight_stds(self._params.gate))
            rows += [{"block": "gate", "parameter": f"pi_{k}", "estimate": w[k],
                      "std_error": s[k]} for k in range(K)]  # fmt: skip
        table = pd.DataFrame(rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            table["z_value"] = table["estimate"] / table["std_error"]
        table["p_value"] = np.nan
        n = round(float(self.expert_sizes_.sum()))
        note = (
            "estimate and std_error are the mean and sd of the variational posterior; "
            "z_value = mean / sd; a Bayesian fit gives no p-values."
        )
        if not isinstance(self._gate_family, DirichletGate):
            note += " The gate is a point estimate and is not tabulated."
        title = f"{type(self).__name__}: {K} experts ({self.n_effective_experts_} effective)"
        return Summary(table, self.log_likelihood_ * n, n, title, note)
