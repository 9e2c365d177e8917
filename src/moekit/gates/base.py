"""What a gate family provides: to the EM loop, the starts, prediction, model files,
gradient fitting and standard errors.

A gate gives every row a distribution over the K experts, g_k(x) with
sum_k g_k(x) = 1. In the M-step it is fitted to the responsibilities r_ik as soft
targets, i.e. it maximises

.. math::  Q_g(V) = \\sum_i \\sum_k r_{ik} \\log g_k(x_i; V) + \\log \\text{prior}(V).

The protocol mirrors :class:`moekit.experts.base.ExpertFamily`, whose module
docstring states the conventions both follow (parameters a dataclass of tensors,
chunks expert-major, statistics sums over rows): per-chunk ``log_prob`` (log g,
shape (K, c)) and ``chunk_stats``, then ``m_step``; and ``log_weights`` for
prediction. Every gate implements :class:`GateFamily`; the other protocols are
capabilities, all of whose members a gate has or none, and whose docstrings say
what the callers do without them. Unlike an expert's, a gate's parameters need not
be indexed by expert first (a tree's are indexed by node); the loop only
interpolates them field by field. ``tests/gates/test_gate_contract.py`` checks every
gate of the package against these protocols.

A gate object given to an estimator (``gate=``) must implement :class:`GateFamily`
(the estimators check for ``log_prob``, ``m_step`` and ``log_weights`` up front).
Family-specific members that one estimator asks of its own gate are not part of the
contract: the tree's ``node_log_weights`` (``HierarchicalMoERegressor``), the
Dirichlet gate's ``expected_weights`` and ``weight_stds`` (``BayesianMoERegressor``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.reporting import Report, Scaling

__all__ = [
    "AnalyticGate", "DifferentiableGate", "Gate", "GateFamily", "NestedGate", "ReportedGate",
    "ShapedGate", "StoredGate",
]  # fmt: skip


class GateFamily(Protocol):
    """What every gate implements (see the module docstring).

    Attributes
    ----------
    n_experts : int
        K, the number of weights g_k(x).
    monotone : bool
        Whether :meth:`m_step` never decreases Q_g (otherwise the loop checks it).
        With ``gate_balance`` the loop checks every gate's step.
    needs_resp : bool
        Whether :meth:`m_step` needs the full (K, n) responsibilities.
    params_type : type
        The dataclass of the parameters.
    supports_balance : bool, optional
        Whether the statistics are linear in the soft targets, so that the balance
        penalty (``gate_balance``, which scales them by 1 + lambda) keeps the
        M-step exact. Without it (or False) ``gate_balance`` is a ValueError.
    report_name : str, optional
        How summaries name the gate (default: the class name).
    """

    n_experts: int
    monotone: bool
    needs_resp: bool
    params_type: type

    def prepare(self, data: EMData) -> None:
        """Per-fit precomputation (a fixed curvature bound, constants of the M-step).

        Sums over rows formed here go through ``data.reduce``, so that every process
        of a data-parallel fit gets the same.
        """

    def init_params(self, data: EMData) -> Any:
        """Parameters before the first M-step (usually the uniform gate)."""

    def log_prob(self, params: Any, chunk: Chunk) -> torch.Tensor:
        """log g_k(x_i) of every expert and row of the chunk, shape (K, c).

        May be a view (the loop adds it to the experts' terms, not in place);
        intermediates that :meth:`chunk_stats` reuses go in ``chunk.scratch``.
        """

    def chunk_stats(self, params: Any, chunk: Chunk, resp: torch.Tensor) -> Any:
        """The M-step's statistics of the chunk, summed over its rows.

        Called right after :meth:`log_prob` on the same chunk and parameters, with the
        soft targets ``resp`` (K, c): r_ik, or (r_ik + lambda / K) / (1 + lambda) under
        ``gate_balance``. Returns a tensor, a tuple of them or None (``needs_resp``).
        """

    def m_step(self, params: Any, stats: Any, data: EMData, resp: torch.Tensor | None) -> Any:
        """New parameters that do not decrease Q_g (or a step the loop checks).

        ``resp`` is the (K, n) responsibilities where ``needs_resp``, else None.
        """

    def log_prior(self, params: Any) -> float:
        """log prior(V) (a penalty), on the scale of the log-likelihood summed over rows."""

    def n_parameters(self, params: Any) -> int:
        """Number of free parameters, for BIC and AIC."""

    def log_weights(self, params: Any, XgT: torch.Tensor) -> torch.Tensor:
        """log g_k(x) of shape (K, n) for a gate design XgT (p_g, n): for prediction."""

    def select(self, params: Any, perm: torch.Tensor) -> Any:
        """The gate over experts ``perm`` (expert j of the result is expert perm[j]).

        Indices may repeat (a split expert), and then the weights no longer sum to
        one until :meth:`shift` corrects them. ``select(params, arange(K))`` is the
        same gate.
        """

    def shift(self, params: Any, delta: torch.Tensor) -> Any:
        """The gate with log g_k(x) + delta_k for every x, delta of shape (K,).

        Used where the shifted weights sum to one again: an expert duplicated into
        two halves (delta = -log 2 on both), or the weights renormalised after an
        expert is removed.
        """


class StoredGate(Protocol):
    """What model files need to read the parameters back (see
    :class:`moekit.experts.base.StoredExperts`); gate objects are never saved."""

    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """The shape of every field of ``params_type`` for a gate design of p columns."""

    def check_params(self, params: Any, prefix: str = "") -> None:
        """Refuse values no fit gives; a ValueError naming the field after ``prefix``."""


class DifferentiableGate(Protocol):
    """A differentiable view of the gate in free (unconstrained) tensors.

    As :class:`moekit.experts.base.DifferentiableExperts`: without it
    ``fit_method="gradient"`` is a ValueError naming the gate, EM runs without
    SQUAREM acceleration, and ``summary()`` cannot differentiate the gate.
    """

    def to_free(self, params: Any) -> dict[str, torch.Tensor]:
        """The parameters as named free tensors."""

    def from_free(self, free: dict[str, torch.Tensor]) -> Any:
        """The parameters of free tensors (normalised as EM keeps them)."""

    def log_weights_free(self, free: dict[str, torch.Tensor], XgT: torch.Tensor) -> torch.Tensor:
        """log g_k(x) of shape (K, n), out of place and differentiable in ``free``.

        It also accepts what :meth:`ReportedGate.from_report` returns.
        """

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`GateFamily.log_prior` as a differentiable scalar."""


class ReportedGate(Protocol):
    """The gate's reporting parametrisation in the data's units (needed by ``summary()``).

    Softmax weights depend only on differences of rows, so the identified
    parameters are relative to a reference expert (or child). Without it
    ``summary()`` is a ValueError naming the gate.
    """

    def report(self, params: Any, scaling: Scaling, reference: int = 0) -> Report:
        """Named blocks of parameters relative to expert ``reference``, in the data's units.

        ``Report.fixed["gate_reference"]`` records the reference for :meth:`from_report`.
        """

    def from_report(
        self, values: dict[str, torch.Tensor], scaling: Scaling, fixed: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Free tensors for :meth:`DifferentiableGate.log_weights_free`, differentiably."""


class AnalyticGate(Protocol):
    """Analytic scores and Hessian blocks of log g_k(x) (optional, with :class:`ReportedGate`).

    As :class:`moekit.experts.base.AnalyticExperts`: log g_k(x_i) depends on the
    reported parameters through local parameters per row (the softmax's logits of
    the experts other than the reference; the constant gate's log odds), whose
    derivatives ``summary()`` turns into the observed information without autograd.
    Without it ``summary()`` differentiates :meth:`DifferentiableGate.log_weights_free`.
    """

    def local_derivatives(self, params: Any, chunk: Chunk, reference: int = 0) -> LocalDerivatives:
        """d log g_k / d(local parameters) (K, L, c) and the second derivatives (K or 1,
        L, L, c), relative to expert ``reference``, as :meth:`local_parameters` orders them."""

    def local_parameters(
        self, values: dict[str, torch.Tensor], scaling: Scaling, fixed: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local parameters as an affine, differentiable map of reported values:
        coefficients (1, n_linear, p) on the standardised gate design, scalars (1, L - n_linear)."""


class NestedGate(Protocol):
    """A simpler gate this one contains, for the nested starts (optional).

    Without it there is no start from a simpler gate's fit. Where the simpler gate
    has fewer experts (a tree one level shallower), the gate is also a
    :class:`ShapedGate`, whose ``expert_origin`` says which expert each copies.
    """

    def simpler(self) -> GateFamily | None:
        """The gate this one contains (constant for softmax, softmax for MLP), or None."""

    def embed(self, params: Any, data: EMData) -> Any:
        """A fit of :meth:`simpler` as this gate's parameters, at the same mixture density."""


class ShapedGate(Protocol):
    """A gate whose experts are tied to its shape, as a tree's leaves (optional).

    Attributes
    ----------
    resizable : bool
        Whether any number of experts can be had; when False the starts offer no
        model with one expert fewer and ``add_expert``/``remove_expert`` refuse.
        Without the attribute a gate counts as resizable.
    """

    resizable: bool

    def resized(self, n_experts: int) -> GateFamily:
        """This gate with ``n_experts`` experts (without it: a copy with ``n_experts`` set)."""

    def expert_origin(self) -> torch.Tensor | None:
        """Expert of :meth:`NestedGate.simpler`'s gate each expert descends from, (K,).

        None where the simpler gate has the same experts.
        """

    def representable_order(self, perm: torch.Tensor) -> torch.Tensor:
        """The order nearest to ``perm`` that :meth:`GateFamily.select` can take.

        The estimators put the fitted experts in this order (without it: ``perm``).
        """


Gate = GateFamily
"""The name the protocol had before its capabilities were written down."""
