"""MoERegressor: the mixture of experts of Jacobs, Jordan, Nowlan and Hinton (1991).

p(y | x) = sum_k g_k(x) N(y; B_k x, diag sigma_k^2), fitted by EM.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import RegressorMixin

from moekit._core.engine import to_numpy
from moekit._core.validation import HasMethods, Interval, ListOf, Options
from moekit.estimators._base import BaseMoE
from moekit.estimators._censoring import CensoringMixin
from moekit.estimators._families import EXPERTS, expert_class, make_experts, one_name
from moekit.estimators._outputs import OutputsMixin
from moekit.estimators._params import EM_DEFAULTS, RUN_DEFAULTS
from moekit.estimators._targets import RealTarget
from moekit.experts.gaussian_cov import COVARIANCE_TYPES
from moekit.io import register_model
from moekit.prediction import MixturePrediction


@register_model
class MoERegressor(OutputsMixin, RegressorMixin, CensoringMixin, BaseMoE):
    """Mixture-of-experts regression fitted by EM.

    The conditional density of the target is a gated mixture of linear-Gaussian
    experts,

    .. math::  p(y \\mid x) = \\sum_{k=1}^K g_k(x)\\, N(y; B_k x + b_k, \\operatorname{diag}
               \\sigma_k^2), \\qquad g(x) = \\operatorname{softmax}(V x + v),

    fitted by maximum likelihood with the EM algorithm: the E-step computes the
    responsibilities r_ik = p(z_i = k | x_i, y_i), the M-step refits each expert by
    weighted least squares with weights r_ik and the gate by a multinomial-logit
    regression on the soft targets r_ik.

    Parameters
    ----------
    n_experts : int, default=3
        Number of experts K.
    gate : {'softmax', 'constant', 'mlp'} or gate object, default='softmax'
        ``'softmax'`` gives input-dependent weights; ``'constant'`` fixed weights
        pi_k (a mixture of regressions, as flexmix without concomitants); ``'mlp'``
        a two-layer gate softmax(V1 tanh(V2 x)) for curved regions (see
        ``gate_options``).
    expert : {'linear', 'student_t', 'poisson', 'mlp', 'binomial', 'gamma', \
'lognormal', 'weibull', 'negative_binomial', 'zero'}, list of them, or regressor, \
default='linear'
        Expert family: linear-Gaussian; linear with Student-t noise (robust to
        outliers, see ``df``); Poisson regression with a log link for counts; a
        small neural network per expert (see ``expert_options``); logistic
        regression of successes out of trials, with y two columns (successes,
        failures: R's ``cbind(s, f)``; ``predict`` gives the probability of
        success); Gamma regression with a log link and a shape per expert,
        lognormal regression (linear on log y), or Weibull regression (R's
        ``survreg`` default: log y = b_k . x + sigma_k W, W extreme value; the
        summary reports survreg's coefficients and ``scale`` sigma_k), for positive
        amounts and survival times; negative
        binomial (NB2) regression with a log link and a dispersion per expert, for
        over-dispersed counts; or a point mass at zero (for zero-inflated models
        with count experts). A list of ``n_experts`` names gives each expert its
        own family, among families of one kind of target: counts (``'poisson'``,
        ``'negative_binomial'``, ``'zero'``; ``['zero', 'poisson']`` is a
        zero-inflated Poisson whose gate models where the zeros come from) or
        positive amounts (``'gamma'``, ``'lognormal'``, ``'weibull'``). Any scikit-learn
        regressor whose ``fit`` accepts ``sample_weight`` (a decision tree, gradient
        boosting...) is cloned per expert and refitted with the responsibilities as
        weights; its Gaussian noise scale comes from the weighted residuals. Such
        models cannot be saved to model files (they would need pickle). Flexible
        experts can lock onto bands of y from a k-means start; ``init='random'``
        with several starts avoids that.
    df : float or None, default=None
        Degrees of freedom of ``'student_t'`` experts; None fits one per expert.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='diag'
        Noise covariance of linear experts over the columns of a y of shape (n, q)
        (scikit-learn's names; mclust's VVV, EEE, VVI, VII): one q x q matrix per
        expert, one for all experts, a diagonal per expert, or sigma_k^2 I per expert.
        Every expert regresses every column. With X of no columns (shape (n, 0)) the
        model is a Gaussian mixture of y (``docs/user_guide/several_responses.md``).
    init : {'auto', 'kmeans', 'random', 'dirichlet', 'residuals', 'sem', 'cem', 'split', \
'ward'}, default='auto'
        Where the starts come from (:mod:`moekit.fitting.starts`). ``'auto'`` mixes
        the strategies below, since one strategy restarted tends to land in one basin;
        the others make every start of one kind: k-means on the standardised rows
        [x, y]; a random expert per row; soft random responsibilities; k-means on the
        residuals of one pooled expert; a few stochastic or classification EM steps
        from a random partition; splits of a fitted model with one expert fewer;
        Ward's agglomerative clustering of the standardised rows [x, y] cut at K
        clusters (deterministic, so one start is enough: ``n_init=1``; the start of
        mclust's Gaussian mixtures, and a good one for several responses with no
        features).
    n_init : int, default=10
        Number of starts. Each runs at most ``init_max_iter`` iterations (on at most
        ``init_sample_size`` rows); the best few distinct ones then run to
        convergence, and the best is kept. ``verbose=1`` says how many distinct
        optima they reached.
    max_iter : int, default=200
        Most EM iterations on all the data. 0 only initialises.
    tol : float, default=1e-6
        Convergence threshold on the change of the mean per-sample log-likelihood.
    init_max_iter : int, default=30
        Most iterations each start runs before the best start is chosen and run to
        convergence (flexmix's short-run strategy).
    init_sample_size : int or None, default=20_000
        Starts run on a random subset of this many rows when there are more, and only
        the best continues on all rows (as flexmix's initFlexmix runs short starts);
        None runs every start on all rows.
    min_share : float, default=0.05
        Experts whose share of the rows (total responsibility / n) falls below this
        are removed during EM, which continues without them, as flexmix's
        ``minprior`` does: an expert on a handful of rows can fit them almost
        exactly, a spurious maximum of the likelihood. A
        ``SmallExpertsRemovedWarning`` says how many went (``n_experts_removed_``);
        the fitted model then has fewer experts than ``n_experts``. 0 keeps every
        expert.
    reg_var : float, default=1e-4
        Variance floor of every expert, relative to the variance of the target: no
        expert's noise scale falls below 1% of the target's standard deviation. It
        keeps the likelihood bounded when an expert sits on a few points: on mcycle's
        rounded accelerations, an expert on four rows of exactly -5.4 g reached a
        standard deviation of 0.047 g (0.1% of the target's) under the former floor of
        1e-6, a spurious maximum that BIC then preferred.
    gate_alpha : float, default=1e-5
        L2 penalty on the gate's slopes (on the summed log-likelihood scale, with the
        features standardised). It only keeps the slopes finite where the experts'
        regions separate perfectly; larger values visibly lower the likelihood of
        sharp gates (0.16 nats on mcycle at 1e-3).
    gate_balance : float, default=0.0
        Strength lambda >= 0 of a penalty towards equal gate weights, (lambda / K)
        sum_i sum_k log g_k(x_i) added to the objective: each row's cross-entropy to
        equal weights. It keeps every expert's gate weight away from zero (on
        average at least lambda / (K (1 + lambda))), so that one expert cannot take
        all the data, and it softens the gate in every row: small values (0.01 to
        0.1) already blur sharp boundaries (``examples/gate_balance.py``). The
        gate's M-step then fits the soft
        targets (r_ik + lambda / K) / (1 + lambda) with row weight 1 + lambda (for the
        constant gate, lambda n / K pseudo-counts per expert: a symmetric Dirichlet
        prior). The log-likelihood no longer climbs alone; the penalised objective
        does. Softmax, constant and tree gates.
    warm_start : bool, default=False
        Continue from the previous fit's parameters (one start, no initialisation).
    random_state : int, RandomState or None, default=None
    verbose : int, default=0
        1: a progress bar and a line per start; 2: also a line every
        ``verbose_interval`` iterations.
    verbose_interval : int, default=10
    device : str, default='cpu'
        Torch device of the computation (float64 throughout).
    expert_features, gate_features : array-like or None, default=None
        Columns of X the experts and the gate see: column indices, names (for a
        DataFrame) or a boolean mask; None uses every column. A gate on other
        variables than the experts is flexmix's concomitant-variable model.
    expert_options, gate_options : dict or None, default=None
        Settings of ``expert='mlp'`` and ``gate='mlp'``: ``hidden`` (units),
        ``steps`` (L-BFGS iterations per M-step), ``weight_decay``.
    fit_method : {'em', 'gradient'}, default='em'
        EM, or direct maximisation by gradient steps jointly over gate and experts
        (:func:`moekit.fitting.gradient.run_gradient`; linear or MLP experts with a
        softmax, constant or MLP gate), as neural mixtures of experts are trained.
    objective : {'competitive', 'cooperative'}, default='competitive'
        With ``fit_method='gradient'``: the negative log-likelihood of the mixture
        (Jacobs et al. 1991; experts specialise) or the squared error of the blended
        output (experts cooperate; variances fitted afterwards). Its loss history is
        ``loss_history_`` (minus half the mean squared error); ``log_likelihood_history_``
        then holds only the final log-likelihood.
    fit_options : dict or None, default=None
        With ``fit_method='gradient'``: ``optimizer`` ('lbfgs' or 'adam'),
        ``learning_rate``, ``batch_size`` (Adam's mini-batches).
    distributed : bool, default=False
        Data-parallel EM inside an initialised :mod:`torch.distributed` process group
        (for instance under ``torchrun``): every process calls ``fit`` with its own
        rows, the E-step runs on them and its sufficient statistics are all-reduced,
        so every process ends with the same model, the fit of all the rows laid end
        to end in rank order. An iteration exchanges O(K p^2) floats for linear
        experts, whatever n; the starts gather at most ``init_sample_size`` rows onto
        every process, once (``docs/user_guide/distributed.md``). Linear, Student-t,
        Poisson, binomial, Gamma, lognormal, Weibull and negative binomial experts with the
        softmax, constant or tree gate; not MLP or scikit-learn experts nor the MLP
        gate, whose M-steps need every row. Queries (``score``, ``log_likelihood``,
        ``summary``...) answer for the rows they are given.

    Notes
    -----
    After a fit the experts are numbered in increasing order of their mean
    prediction over the training inputs, so that refits and restarts are comparable.

    Attributes
    ----------
    n_iter_ : int
        EM iterations on all the data, those run before experts below ``min_share``
        were removed included.
    converged_ : bool
    log_likelihood_ : float
        Mean per-sample log-likelihood of the training data at the fit.
    log_likelihood_history_ : list of float
        The objective after each iteration: the mean log-likelihood plus the gate
        penalty's log-prior divided by n. EM never decreases it. After experts were
        removed (``n_experts_removed_ > 0``) it follows the model returned, from the
        point where the last removal left it.
    expert_sizes_ : ndarray of shape (n_experts,)
        Total responsibility of each expert on the training data (one entry per
        expert of the fitted model).
    n_experts_removed_ : int
        Experts removed during the fit for holding less than ``min_share``.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Only when X had string column names.

    See Also
    --------
    MoEClassifier : the same model with multinomial-logistic experts.

    References
    ----------
    Jacobs, Jordan, Nowlan and Hinton (1991), Adaptive mixtures of local experts.
    Jordan and Jacobs (1994), Hierarchical mixtures of experts and the EM algorithm.

    Examples
    --------
    >>> import numpy as np
    >>> from moekit import MoERegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(-1, 1, (500, 1))
    >>> y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 * X[:, 0]) + 0.05 * rng.normal(size=500)
    >>> m = MoERegressor(n_experts=2, random_state=0).fit(X, y)
    >>> bool(m.score(X, y) > 0.99)
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **BaseMoE._parameter_constraints,
        "expert": [Options(EXPERTS), ListOf(frozenset(EXPERTS)), HasMethods(("fit", "predict"))],
        "reg_var": [Interval(numbers.Real, 0, None, closed="neither")],
        "df": [None, Interval(numbers.Real, 0, None, closed="neither")],
        "covariance_type": [Options(COVARIANCE_TYPES)],
        "fit_method": [Options({"em", "gradient"})],
        "objective": [Options({"competitive", "cooperative"})],
        "fit_options": [None, dict],
    }

    _defaults: ClassVar[dict] = {
        "n_experts": 3,
        "gate": "softmax",
        "expert": "linear",
        **EM_DEFAULTS,
        "min_share": 0.05,
        "reg_var": 1e-4,
        "df": None,
        "covariance_type": "diag",
        "gate_alpha": 1e-5,
        "gate_balance": 0.0,
        **RUN_DEFAULTS,
        "expert_options": None,
        "gate_options": None,
        "fit_method": "em",
        "objective": "competitive",
        "fit_options": None,
        "distributed": False,
    }
    _target_coding = RealTarget
    _order_by_mean = True  # documented order: increasing mean prediction
    _min_features = 0  # no features: a mixture of Gaussians (or of the family) of y

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    # ------------------------------------------------------------------ families
    def _expert_class(self):
        covariance = self._covariance_class()
        return covariance if covariance is not None else expert_class(self)

    def _family(self, coding, seed: int):
        covariance = self._covariance_class()
        if covariance is not None:
            return covariance(self.n_experts, len(coding["_y_mean"]), var_floor=self.reg_var)
        return make_experts(self, len(coding["_y_mean"]), seed)

    # ------------------------------------------------------------------ API
    def fit(self, X, y, *, sample_weight=None, offset=None, y_upper=None, truncation=None,
            start_from=None) -> MoERegressor:  # fmt: skip
        """Fit the mixture of experts by EM.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), optional
            Frequency weights: row i's log-likelihood counts w_i times (an integer
            weight fits as the row repeated; rows of weight zero are dropped).
        offset : array-like of shape (n_samples,), optional
            A known term of every expert's linear predictor, not the gate's (log
            exposure), for Poisson, negative binomial, Gamma, Weibull and binomial
            experts.
            With ``y_upper``, each row's lower bound (-inf: left-censored).
        y_upper : array-like of shape (n_samples,), optional
            Censored responses (``expert='linear'``, ``'lognormal'``, ``'poisson'``,
            ``'negative_binomial'``, ``'binomial'``, ``'gamma'`` or ``'weibull'``): y_i lies in
            [y_i, y_upper_i]; inf is right-censored at y_i, NaN or y_i itself exact.
            Counts: whole numbers, both ends included. Binomial: the bounds of the
            successes (y's first column), y_upper at most the trials s + f.
        truncation : (lower, upper), optional
            Scalars or arrays: a row is observed only when y lies in (lower, upper)
            (for counts [lower, upper]: (1, inf) is zero truncation); each expert is
            renormalised there (:mod:`moekit.experts.censored`,
            :mod:`moekit.experts.censored_glm`).
            ``predict(_distribution)`` then describe the latent, uncensored y.

        start_from : fitted estimator, optional
            A fit of a simpler model on the same X and y: the same model with one
            expert fewer (its experts are split), Gaussian experts for Student-t ones,
            a softmax gate for an MLP gate, or a constant gate for a softmax gate. Its
            fit carries over into extra starts, which run to convergence on all the
            data, so that this fit never ends below it: a richer model never fits
            worse than one it contains. :func:`select_n_experts` passes each K's fit
            to K + 1.

        Returns
        -------
        self
        """
        return self._fit_censored(X, y, y_upper, truncation, parent=start_from,
                                  sample_weight=sample_weight, offset=offset)  # fmt: skip

    def _moments(self, X, offset=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        XeT, XgT = self._designs(X)
        w = torch.exp(self._gate_family.log_weights(self._params.gate, XgT)).T  # (n, K)
        off = self._row_vector(offset, XeT.shape[1], "offset", XeT.device)  # log exposure
        kw = {} if off is None else {"offset": off}
        means, stds = self._expert_family.moments(self._params.expert, XeT, **kw)  # (n, K, m)
        return (w, *RealTarget.decode(means, stds, vars(self)))

    def _shape_y(self, t: torch.Tensor) -> np.ndarray:
        return RealTarget.shape(t, vars(self))

    def predict(self, X, offset=None) -> np.ndarray:
        """Conditional mean E[y | x] = sum_k g_k(x) mu_k(x).

        ``offset`` (n_samples,): each row's known term, as in ``fit`` (exposure times mu_k).

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        w, means, _ = self._moments(X, offset)
        return self._shape_y(torch.einsum("nk,nkm->nm", w, means))

    def predict_distribution(self, X, offset=None) -> MixturePrediction:
        """p(y | x) of every row (:class:`MixturePrediction`); ``offset`` as in :meth:`predict`."""
        w, means, stds = self._moments(X, offset)
        if hasattr(self._expert_family, "covariances"):  # full, tied or spherical
            return self._q_variate(w, means)
        per_expert = getattr(self._expert_family, "predictive_families", None)
        family = self._expert_family.predictive_family if per_expert is None else (
            per_expert(self._params.expert))  # fmt: skip
        extra = {
            k: to_numpy(v)
            for k, v in self._expert_family.predictive_extra(self._params.expert).items()
        }
        if not self._y_2d:
            means, stds = means[..., 0], stds[..., 0]
        return MixturePrediction(
            to_numpy(w), to_numpy(means), to_numpy(stds), family=family, **extra
        )

    def score(self, X, y, sample_weight=None, offset=None) -> float:
        """R^2 of :meth:`predict` (scikit-learn's convention), weighted by ``sample_weight``.

        For binomial experts, whose y is (successes, failures), the R^2 of the
        observed proportions of successes, each row weighted by its trials (times
        ``sample_weight``). ``offset`` as in :meth:`predict`.
        """
        from sklearn.metrics import r2_score

        family = getattr(self._expert_family, "base", self._expert_family)  # censored: its base
        if getattr(family, "target_columns", 1) == 1:  # RegressorMixin's R^2
            return float(r2_score(y, self.predict(X, offset), sample_weight=sample_weight))

        # (s, f); a censored fit's coded rows hold them first
        y = self._target().check(np.asarray(y), vars(self))[:, :2]
        trials = y.sum(1)
        weight = trials if sample_weight is None else trials * np.asarray(sample_weight)
        return float(r2_score(y[:, 0] / trials, self.predict(X, offset), sample_weight=weight))

    # ------------------------------------------------------------------ coefficients
    def _expert_coef(self) -> np.ndarray:
        rows = getattr(self._expert_family, "coef_rows", None)  # a family per expert
        coef = to_numpy(self._params.expert.coef if rows is None else rows(self._params.expert))
        return coef[:, None, :] if coef.ndim == 2 else coef  # (K, m, p)

    @property
    def df_(self) -> np.ndarray:
        """Degrees of freedom of Student-t experts, shape (K,)."""
        if not hasattr(self._params.expert, "df"):
            raise AttributeError("df_ exists for expert='student_t' only.")
        return to_numpy(self._params.expert.df)

    @property
    def coef_(self) -> np.ndarray:
        """Expert slopes in the data's units, shape (K, n_features) or (K, m, n_features).

        Columns the experts do not see (``expert_features``) are zero. For Poisson
        experts these are the slopes of the log rate. With a family per expert
        (``expert=['zero', 'poisson']``), each expert's row is of its own family's
        linear predictor (log mean for counts and Gamma amounts, mean of log y for
        lognormal experts) and NaN for ``'zero'``, which has none.
        """
        coef = self._expert_coef()[..., :-1]  # (K, m, p)
        slopes = self._scatter(coef, self._expert_cols) * self._y_scale[None, :, None]
        return slopes if self._y_2d else slopes[:, 0, :]

    @property
    def intercept_(self) -> np.ndarray:
        """Expert intercepts in the data's units, shape (K,) or (K, m) (log rate for Poisson;
        per expert for a family per expert, as :attr:`coef_`)."""
        coef = self._expert_coef()
        b = coef[..., -1] + self._shift(coef[..., :-1], self._expert_cols)
        out = self._y_mean + self._y_scale * b  # (K, m)
        return out if self._y_2d else out[:, 0]

    @property
    def noise_std_(self) -> np.ndarray:
        """Expert noise scales in the data's units, shape (K,) or (K, m).

        The standard deviation for linear experts; the scale of the t (its standard
        deviation is scale * sqrt(df / (df - 2))) for Student-t experts.
        """
        if not hasattr(self._params.expert, "var") or one_name(self.expert) == "lognormal":
            if one_name(self.expert) == "poisson":
                raise AttributeError(
                    "Poisson experts have no noise scale: their variance equals their rate."
                )
            raise AttributeError(
                f"expert={self.expert!r} has no noise scale in y's units; summary() "
                "reports its shape, dispersion or sigma of log y."
            )
        std = np.sqrt(to_numpy(self._params.expert.var)) * self._y_scale
        return std if self._y_2d else std[:, 0]
