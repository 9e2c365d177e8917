"""What an expert family provides: to the EM loop, the starts, prediction, model
files, gradient fitting and standard errors.

An expert family holds K experts p_k(y | x; theta_k) of one kind, vectorised over
k. The EM loop (:mod:`moekit.fitting.em`, :class:`moekit.fitting.model.EMModel`)
streams the data in chunks and calls, per chunk, :meth:`ExpertFamily.log_prob` for
the E-step and :meth:`ExpertFamily.chunk_stats` to sum the M-step's sufficient
statistics in the same pass; after the pass it calls :meth:`ExpertFamily.m_step`.

Every family implements :class:`ExpertFamily`. The other protocols below are
capabilities: a family has all the members of one or none of them, and the callers
ask for them with ``hasattr``/``getattr`` and say what they do without (each
protocol's docstring says what). Families are duck-typed: nothing subclasses these
protocols; ``tests/experts/test_expert_contract.py`` checks every family of the package
against them.

Conventions
-----------
Parameters
    One dataclass of tensors per family (``params_type``), every field indexed by
    expert first, shape (K, ...), or a list of K objects: the loop takes steps
    between two of them field by field (:func:`moekit._core.batch.lerp_params`),
    keeps frozen experts' rows (:func:`moekit.fitting.model.keep_experts`),
    broadcasts them in a data-parallel fit and stores every field in model files.
Chunks
    Per-chunk arrays are expert-major, shape (K, c), and designs feature-major,
    ``chunk.XeT`` of shape (p, c) with the intercept as the last row; ``chunk.y``
    is (m, c) (standardised where ``standardize_target``), counts, or int64 class
    codes (c,). See :mod:`moekit._core.data` for why, and for the weighted Gram
    matrices (``chunk.weighted_grams``) most M-steps are built from.
Statistics
    What ``chunk_stats`` returns is summed over chunks (``+``) and, in a
    data-parallel fit, over processes (all-reduce): a tensor, a tuple of them or
    None, each entry a sum over rows. A family whose M-step needs each row's
    responsibility instead sets ``needs_resp`` (and cannot be fitted data-parallel).

The M-step must not decrease the expected complete-data log-likelihood

.. math::  Q(\\theta) = \\sum_i \\sum_k r_{ik} \\log p_k(y_i \\mid x_i; \\theta_k)
                       + \\log \\text{prior}(\\theta),

so that the log-likelihood never decreases (generalised EM). Families whose
M-step is guaranteed not to decrease Q (an exact maximiser, or a minorise-maximise
step) set ``monotone = True``; for the others (a Newton step, say) the loop checks
the likelihood after the step and shortens the step along the line from the old
parameters (:func:`moekit._core.batch.lerp_params`) until it does not decrease.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.reporting import Report, Scaling

__all__ = [
    "AnalyticExperts", "ClassifierExperts", "DifferentiableExperts", "ExpertFamily",
    "InitialisedExperts", "MeanExperts", "NestedExperts", "RegressionExperts", "ReportedExperts",
    "ResizableExperts", "StoredExperts", "TargetExperts",
]  # fmt: skip


class ExpertFamily(Protocol):
    """What every expert family implements (see the module docstring).

    Attributes
    ----------
    n_experts : int
        K. The loop's nested starts copy a family and set another K
        (:func:`moekit.fitting.model.resized_family`): anything else that depends
        on K is built in :meth:`prepare` or from the parameters.
    monotone : bool
        Whether :meth:`m_step` never decreases Q (otherwise the loop checks it).
    needs_resp : bool
        Whether :meth:`m_step` needs the full (K, n) responsibilities rather than
        summed statistics; such a family refuses ``distributed=True``.
    params_type : type
        The dataclass of the parameters.
    report_name : str, optional
        How summaries name the family (default: the class name).
    single_optimum : bool, optional
        Whether one expert alone has one maximum of its likelihood (a GLM, least
        squares), so that a fit of K = 1 needs one start, not ``n_init`` (default
        False: every start runs).
    """

    n_experts: int
    monotone: bool
    needs_resp: bool
    params_type: type

    def prepare(self, data: EMData) -> None:
        """Per-fit precomputation (cached arrays in ``data.cache``, constants).

        Called before every fit and whenever the loop moves to other rows (a subset
        for the starts, then all rows), so that it may depend on the design's width.
        """

    def log_prob(self, params: Any, chunk: Chunk) -> torch.Tensor:
        """log p_k(y_i | x_i; theta_k) of every expert and row of the chunk, shape (K, c).

        The loop adds the gate's log g_k(x_i) to it in place: return a fresh tensor.
        Intermediates that :meth:`chunk_stats` reuses go in ``chunk.scratch``.
        """

    def chunk_stats(self, params: Any, chunk: Chunk, resp: torch.Tensor) -> Any:
        """The M-step's sufficient statistics of the chunk, summed over its rows.

        Parameters
        ----------
        params : dataclass or None
            The parameters the E-step ran at; None before the first M-step of a
            family without :class:`InitialisedExperts` (then :meth:`log_prob` was
            not called on the chunk either).
        chunk : Chunk
        resp : Tensor of shape (K, c)
            r_ik, the posterior probability of expert k for row i.

        Returns
        -------
        Tensor, tuple of Tensors or None
            Sums over rows (see the module docstring); None where ``needs_resp``.
        """

    def m_step(self, params: Any, stats: Any, data: EMData, resp: torch.Tensor | None) -> Any:
        """New parameters that do not decrease Q, from the summed statistics.

        ``params`` is the current fit (None on the first M-step of a family without
        :meth:`InitialisedExperts.init_params`); ``resp`` is the (K, n)
        responsibilities where ``needs_resp``, else None. An expert without any
        weight is not determined by the data: keep its parameters as they were.
        """

    def log_prior(self, params: Any) -> float:
        """log prior(theta) (a penalty), on the scale of the log-likelihood summed over rows.

        The loop's objective is the mean log-likelihood plus this over n.
        """

    def n_parameters(self, params: Any) -> int:
        """Number of free parameters, for BIC and AIC."""

    def min_samples(self, params: Any) -> float:
        """Total responsibility below which an expert counts as collapsed (a warning)."""

    def select(self, params: Any, perm: torch.Tensor) -> Any:
        """The parameters of experts ``perm`` (len(perm) experts; indices may repeat).

        Expert j of the result is expert perm[j]: the fit's experts are put in the
        documented order, split (one duplicated) for a start with one expert more,
        or kept without one (``remove_expert``). ``select(params, arange(K))`` is
        the same parameters.
        """

    def residuals(self, params: Any, chunk: Chunk) -> torch.Tensor:
        """Every expert's residuals of the chunk's rows, shape (K, r, c).

        Standardised (y - mu_k(x)) / sigma_k for continuous targets, Pearson
        residuals for counts, onehot(y) - p_k(. | x) for classes: the starts split an
        expert along them and cluster a pooled expert's.
        """


class InitialisedExperts(Protocol):
    """Starting parameters (optional).

    Without it the first M-step gets ``params=None`` and must start from nothing
    (:meth:`moekit.fitting.model.EMModel.init_from_resp`).
    """

    def init_params(self, data: EMData) -> Any:
        """Parameters before the first M-step (zeros, a unit variance, ...)."""


class RegressionExperts(Protocol):
    """Predictions of a continuous or count target (needed by ``MoERegressor``).

    Attributes
    ----------
    predictive_family : {'normal', 'student_t', 'poisson'}
        The component family of :class:`moekit.prediction.MixturePrediction`. A
        family whose experts differ (:class:`moekit.experts.mixed.MixedExperts`)
        also has ``predictive_families(params)``, the component family of each.
    standardize_target : bool
        Whether the estimator standardises y before the fit (not for counts).
    """

    predictive_family: str
    standardize_target: bool

    def moments(self, params: Any, XT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's location mu_k(x) and scale for a design XT (p, n): two (n, K, m).

        The scale is the standard deviation (the t's scale; sqrt(rate) for counts).
        The estimator orders the experts by the mean location over the training rows.
        """

    def predictive_extra(self, params: Any) -> dict[str, torch.Tensor]:
        """Further arguments of the predictive mixture (``{"df": (K,)}`` for t experts)."""


class TargetExperts(Protocol):
    """The targets a regression family can model, checked before the fit (optional).

    The estimator's target coding (``RealTarget``) calls :meth:`check_target` on the
    training target and on every later one; without it any real target of any
    number of columns is accepted.

    Attributes
    ----------
    target_columns : int
        Columns of y. A family of one output reads 1; binomial experts read 2
        (successes and failures, R's ``cbind(s, f)``) and predict one output, the
        probability of success.
    """

    target_columns: int

    def check_target(self, y2: Any) -> Any:
        """y of shape (n, columns) as an array, or a one-line ValueError naming the
        option and what is wrong (``expert='gamma' needs y > 0``)."""


class ClassifierExperts(Protocol):
    """Class probabilities (needed by ``MoEClassifier``).

    Attributes
    ----------
    n_classes : int or None
        C; the targets are class codes 0..C-1. None for a family that can hold
        either kind of expert and holds regressors (a wrapped scikit-learn regressor).
    """

    n_classes: int | None

    def class_probs(self, params: Any, XT: torch.Tensor) -> torch.Tensor:
        """p_k(y = c | x) of shape (K, C, n) for a design XT (p, n)."""


class StoredExperts(Protocol):
    """What model files need to read the parameters back (needed to ``load``).

    Families given by name are saved field by field (``expert.<field>``); a file is
    read only after every tensor's shape matches :meth:`param_shapes` and its values
    pass :meth:`check_params`. Families given as objects are never saved. A family
    may also have ``n_outputs`` (int), the length of the estimator's per-output
    vectors (target scalings) that a file holds; without it they are not checked.
    """

    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """The shape of every field of ``params_type`` for a design of p columns."""

    def check_params(self, params: Any, prefix: str = "") -> None:
        """Refuse values no fit gives (NaN, variances not positive, ...).

        Raises
        ------
        ValueError
            Naming the field after ``prefix`` (``'expert.coef' holds NaN or infinite
            values``; see :func:`moekit._core.validation.check_finite`).
        """


class DifferentiableExperts(Protocol):
    """A differentiable view of the family in free (unconstrained) tensors.

    Gradient fitting (:mod:`moekit.fitting.gradient`) optimises these tensors with
    autograd, and EM's SQUAREM acceleration extrapolates in them, so every point is
    a valid model: a variance is ``var_floor + exp(log_excess_var)``, say. Without
    it ``fit_method="gradient"`` is a ValueError naming the family, EM runs without
    acceleration, and ``summary()`` has no log-density to differentiate.
    """

    def to_free(self, params: Any) -> dict[str, torch.Tensor]:
        """The parameters as named free tensors."""

    def from_free(self, free: dict[str, torch.Tensor]) -> Any:
        """The parameters of free tensors (``from_free(to_free(p))`` equals p)."""

    def log_prob_free(
        self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """log p_k(y_i | x_i) of shape (K, n), out of place and differentiable in ``free``.

        It also accepts what :meth:`ReportedExperts.from_report` returns (which may
        hold constrained tensors, such as ``var``, instead of free ones).
        """

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`ExpertFamily.log_prior` as a differentiable scalar."""


class MeanExperts(Protocol):
    """Expert means in free tensors, for the cooperative objective of gradient fitting.

    Without it ``objective="cooperative"`` is a ValueError naming the family.
    """

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """E_k[y | x] of shape (K, m, n) for a design XT (p, n), differentiable."""


class ReportedExperts(Protocol):
    """The reporting parametrisation, in the data's units (needed by ``summary()``).

    Standard errors are taken in the reported coordinates, from
    :class:`AnalyticExperts` where the family has it, else by autograd:
    theta -> :meth:`from_report` -> :meth:`DifferentiableExperts.log_prob_free`.
    Without it ``summary()`` is a ValueError naming the family.
    """

    def report(self, params: Any, scaling: Scaling) -> Report:
        """Named blocks of parameters in the data's units, with their labels."""

    def from_report(
        self, values: dict[str, torch.Tensor], scaling: Scaling, fixed: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Free tensors for :meth:`DifferentiableExperts.log_prob_free` from reported values.

        Differentiable in ``values``; ``fixed`` holds what :meth:`report` kept out of
        theta (``Report.fixed``).
        """


class AnalyticExperts(Protocol):
    """Analytic scores and Hessian blocks of the log-density (optional, with
    :class:`ReportedExperts`).

    log p_k(y_i | x_i) depends on expert k's reported parameters only through a few
    local parameters per row: linear predictors eta_ikl = beta_kl^T z_i on the
    standardised design z_i (the mean in the data's units, a log rate, a log odds),
    then scalars (sigma, a shape, a dispersion, degrees of freedom). ``summary()``
    builds the observed information from their first and second derivatives as
    weighted Gram matrices of the design, in one pass over the rows
    (:mod:`moekit.estimators._information`); without this capability it takes the
    Hessian of :meth:`DifferentiableExperts.log_prob_free` by autograd.
    """

    def local_derivatives(self, params: Any, chunk: Chunk, scaling: Scaling) -> LocalDerivatives:
        """d log p_k / d(local parameters) and the second derivatives, per row of the chunk.

        The local parameters are those :meth:`local_parameters` returns, in the same
        order, evaluated at ``params``: L of them, the first ``n_linear`` linear
        predictors, the rest scalars.
        """

    def local_parameters(
        self, values: dict[str, torch.Tensor], scaling: Scaling, fixed: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local parameters as an affine, differentiable map of reported values.

        Returns
        -------
        coef : Tensor of shape (K, n_linear, p)
            Coefficients of the linear predictors on the standardised design
            (:func:`moekit._core.reporting.coef_from_data` of reported ones).
        scalars : Tensor of shape (K, L - n_linear)
        """


class NestedExperts(Protocol):
    """A simpler family this one contains, for the nested starts (optional).

    The starts fit the simpler family first and start from its fit, so that a richer
    model never ends below the one it contains
    (:func:`moekit.fitting.starts.simpler_models`). Without it there is no such start.
    """

    def simpler(self) -> ExpertFamily | None:
        """The family this one contains (Gaussian experts for t experts), or None."""

    def embed(self, params: Any, data: EMData) -> Any:
        """A fit of :meth:`simpler` as this family's parameters, at the same likelihood."""


class ResizableExperts(Protocol):
    """A family whose settings depend on K beyond ``n_experts`` (optional).

    Without it the loop copies the family and sets ``n_experts``.
    """

    def resized(self, n_experts: int) -> ExpertFamily:
        """This family with ``n_experts`` experts."""
