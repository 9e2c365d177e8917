"""Hierarchical mixtures of experts (Jordan and Jacobs, 1994): a tree of softmax gates.

The estimators here are :class:`MoERegressor` and :class:`MoEClassifier` with the
tree gate of :mod:`moekit.gates.tree` over K = branching**depth leaf experts; the
one EM loop fits them unchanged. What the tree adds is its shape: the number of
experts follows from ``depth`` and ``branching``, a deeper tree starts from a fitted
shallower one with every leaf split in two (or b), and the gate can be read node
by node (:meth:`node_weights`, :func:`moekit.plotting.plot_hme_tree`).
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from moekit._core.engine import to_numpy
from moekit._core.validation import Interval, Options
from moekit.estimators._design import same_data
from moekit.estimators.classifier import MoEClassifier
from moekit.estimators.regressor import MoERegressor
from moekit.fitting.em import EMModel, Params
from moekit.fitting.model import resized_family
from moekit.fitting.starts import carry_over
from moekit.gates.tree import TreeGate, TreeGateParams
from moekit.io import register_model

_TREE_CONSTRAINTS = {
    "depth": [Interval(numbers.Integral, 1, None, closed="left")],
    "branching": [Interval(numbers.Integral, 2, None, closed="left")],
    "gate": [Options({"softmax"})],
}


# the flat estimators' parameters a tree has not: K follows from its shape, its nodes
# are softmax gates whose leaves stay (no min_share), and its classifier's experts take no
# options
_NOT_TREE_REGRESSOR = {"n_experts", "min_share", "gate_options", "fit_method", "objective",
                       "fit_options", "covariance_type"}  # fmt: skip
_NOT_TREE_CLASSIFIER = {"n_experts", "min_share", "expert_options", "gate_options"}


class _TreeMixin:
    """What a tree gate adds to an EM-fitted estimator (not for direct use)."""

    _flat_class: ClassVar[type]  # the estimator a tree of depth 1 equals

    @property
    def n_experts(self) -> int:
        """Leaf experts K = branching**depth."""
        return self.branching**self.depth

    def _make_gate(self, seed: int) -> TreeGate:
        return TreeGate(self.depth, self.branching, alpha=self.gate_alpha)

    def _warm_fit_possible(self) -> bool:
        # the same number of leaves from another shape is another model: start afresh
        return super()._warm_fit_possible() and (
            self._gate_family.depth,
            self._gate_family.branching,
        ) == (self.depth, self.branching)

    def _carried_over(self, model: EMModel, parent, prepared) -> list[Params]:
        """Starts from a fitted shallower tree (or the flat model with ``branching`` experts).

        The parent is embedded level by level up to depth - 1 (each new node uniform,
        each leaf's expert copied to its children), then carried over by
        :func:`moekit.fitting.starts.carry_over`: every leaf split along its
        residuals, and the exact embedding, so the fit never ends below the parent.
        """
        b, D = self.branching, self.depth
        name = type(self).__name__
        if type(parent) is type(self):
            if parent.branching != b or parent.depth > D:
                raise ValueError(
                    f"start_from: expected a {name} of branching={b} and depth <= {D}; got "
                    f"branching={parent.branching}, depth={parent.depth}."
                )
            depth0 = parent.depth
        elif type(parent) is self._flat_class:
            flat = self._flat_class.__name__
            if parent.n_experts != b or parent.gate != "softmax":
                raise ValueError(
                    f"start_from: a {flat} starts a {name} when it has n_experts=branching="
                    f"{b} and the softmax gate; got n_experts={parent.n_experts}, "
                    f"gate={parent.gate!r}."
                )
            depth0 = 1
        else:
            raise ValueError(
                f"start_from: expected a fitted {name} or {self._flat_class.__name__}; got "
                f"{type(parent).__name__}."
            )
        check_is_fitted(parent)
        params = parent._params
        if depth0 == 1 and type(parent) is self._flat_class:  # the flat gate as a tree's root
            params = Params(params.expert, TreeGateParams(params.gate.coef[None]))
        same = type(parent._expert_family) is type(model.expert) and same_data(
            parent, prepared.state, self._data_attrs()
        )
        if not same:
            raise ValueError(
                f"start_from: expected a model fitted on the same X and y, with the same "
                f"experts ({type(model.expert).__name__}) and expert and gate columns."
            )
        data = prepared.data
        model.prepare(data)
        if depth0 == D:  # the same model: its fit is a start as it stands
            return [params]
        for depth in range(depth0 + 1, D):
            gate = TreeGate(depth, b, self.gate_alpha)
            params = Params(model.expert.select(params.expert, gate.expert_origin()),
                            gate.embed(params.gate, data))  # fmt: skip
        small = EMModel(resized_family(model.expert, b ** (D - 1)),
                        TreeGate(D - 1, b, self.gate_alpha))  # fmt: skip
        small.prepare(data)
        starts = carry_over(model, small, params, data)
        model.prepare(data)
        return starts

    # ------------------------------------------------------------------ the tree
    def node_weights(self, X) -> list[np.ndarray]:
        """Probability of reaching every node of the tree, level by level.

        P(n | x) is the product of the gate probabilities along the path from the
        root to node n; the nodes of one level partition the input's weight.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        list of ndarray
            ``depth`` arrays; entry l - 1 has shape (n_samples, branching**l) and rows
            that sum to 1. The last one is :meth:`gate_weights`. Node j of level l is
            child j % branching of node j // branching of level l - 1.
        """
        _, XgT = self._designs(X)
        levels = self._gate_family.node_log_weights(self._params.gate, XgT)
        return [to_numpy(torch.exp(lw).T) for lw in levels]

    @property
    def gate_coef_(self) -> np.ndarray:
        """Slopes of every internal node's softmax over its children, shape
        (n_nodes, branching, n_features), nodes level by level from the root.

        Each node's softmax is unchanged by adding one vector to all its rows; the
        penalty centres them. Columns the gate does not see are zero.
        """
        coef = to_numpy(self._params.gate.coef)
        return self._scatter(coef[..., :-1], self._gate_cols)

    @property
    def gate_intercept_(self) -> np.ndarray:
        """Intercepts of every node's softmax, shape (n_nodes, branching), centred per node."""
        coef = to_numpy(self._params.gate.coef)
        v = coef[..., -1] + self._shift(coef[..., :-1], self._gate_cols)
        return v - v.mean(-1, keepdims=True)


@register_model
class HierarchicalMoERegressor(_TreeMixin, MoERegressor):
    """Hierarchical mixture of experts for regression, fitted by EM.

    A tree of softmax gates routes every input to the leaves, whose weight is the
    product of the gate probabilities along their path,

    .. math::  p(y \\mid x) = \\sum_{k=1}^{b^D} \\Big(\\prod_{l=0}^{D-1}
               g_{n_l(k), n_{l+1}(k)}(x)\\Big)\\, p_k(y \\mid x),

    so the input space is split recursively: the root's gate cuts it into b regions,
    each of which its node cuts again. EM (Jordan and Jacobs, 1994) computes the
    leaves' posterior path probabilities in the E-step; in the M-step every leaf
    expert takes its family's weighted step and every gate node a weighted softmax
    regression on its children's posteriors (:mod:`moekit.gates.tree`).

    Parameters
    ----------
    depth : int, default=2
        Levels of gates D >= 1. ``depth=1`` is ``MoERegressor(n_experts=branching)``,
        computed identically.
    branching : int, default=2
        Children b >= 2 of every gate node; there are K = b^D leaf experts.
    gate : {'softmax'}, default='softmax'
        The nodes' gate: a softmax over the children, linear in x.
    expert : {'linear', 'student_t', 'poisson', 'mlp', 'binomial', 'gamma', 'lognormal', \
'weibull', 'negative_binomial'} or regressor, default='linear'
        The leaves' family, as in :class:`MoERegressor`.
    init, n_init, max_iter, tol, init_max_iter, init_sample_size, reg_var, df, \
gate_alpha, gate_balance, warm_start, random_state, verbose, verbose_interval, device, \
expert_features, gate_features, expert_options, distributed
        As in :class:`MoERegressor`; ``gate_alpha`` penalises every node's slopes,
        ``gate_balance`` pulls the leaves' weights towards equal ones.
        With ``init='auto'`` some starts split the leaves of a fitted tree one level
        shallower (and one is that tree itself, exactly embedded).

    Attributes
    ----------
    n_experts : int
        Leaves, branching**depth (derived; not a parameter).
    n_iter_, converged_, log_likelihood_, log_likelihood_history_, expert_sizes_, \
n_features_in_, feature_names_in_
        As in :class:`MoERegressor`; experts are the leaves, numbered along the tree
        (leaf k is child k % b of node k // b), with every node's children in
        increasing order of their mean prediction.
    gate_coef_ : ndarray of shape (n_nodes, branching, n_features)
    gate_intercept_ : ndarray of shape (n_nodes, branching)

    See Also
    --------
    MoERegressor : the flat model (depth 1).
    moekit.plotting.plot_hme_tree : which region of x every node handles.

    References
    ----------
    Jordan and Jacobs (1994), Hierarchical mixtures of experts and the EM algorithm,
    Neural Computation 6(2), 181-214.

    Examples
    --------
    >>> import numpy as np
    >>> from moekit import HierarchicalMoERegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(-1, 1, (800, 1))
    >>> y = np.select([X[:, 0] < -0.5, X[:, 0] < 0, X[:, 0] < 0.5],
    ...               [2 * X[:, 0], -X[:, 0], 3 * X[:, 0]], -X[:, 0]) + 0.05 * rng.normal(size=800)
    >>> m = HierarchicalMoERegressor(depth=2, branching=2, random_state=0).fit(X, y)
    >>> m.gate_weights(X).shape
    (800, 4)
    """

    _parameter_constraints: ClassVar[dict] = {
        **{k: v for k, v in MoERegressor._parameter_constraints.items() if k != "n_experts"},
        **_TREE_CONSTRAINTS,
    }
    _flat_class = MoERegressor
    _min_features = 1  # MoERegressor fits X of no columns as a mixture of y; a tree does not

    _defaults: ClassVar[dict] = {
        "depth": 2,
        "branching": 2,
        **{k: v for k, v in MoERegressor._defaults.items() if k not in _NOT_TREE_REGRESSOR},
    }

    def fit(self, X, y, *, sample_weight=None, offset=None,
            start_from=None) -> HierarchicalMoERegressor:  # fmt: skip
        """Fit the hierarchical mixture of experts by EM.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight, offset : array-like of shape (n_samples,), optional
            Frequency weights and the experts' known term, as in :meth:`MoERegressor.fit`.
        start_from : fitted estimator, optional
            A fit on the same X and y of a shallower tree of the same branching, or
            of ``MoERegressor(n_experts=branching)`` with the softmax gate (a tree of
            depth 1). It is embedded in this tree, which then starts from every leaf
            split along its residuals and from the embedding itself, run to
            convergence on all the data: this fit never ends below it.

        Returns
        -------
        self
        """
        return self._fit(X, y, parent=start_from, sample_weight=sample_weight, offset=offset)


@register_model
class HierarchicalMoEClassifier(_TreeMixin, MoEClassifier):
    """Hierarchical mixture of multinomial-logistic experts, fitted by EM.

    :class:`MoEClassifier` with the tree gate of :class:`HierarchicalMoERegressor`:
    p(y = c | x) = sum_k g_k(x) softmax(W_k x)_c, where g_k(x) is the product of the
    gate probabilities along leaf k's path.

    Parameters
    ----------
    depth : int, default=2
        Levels of gates; ``depth=1`` is ``MoEClassifier(n_experts=branching)``.
    branching : int, default=2
        Children of every gate node; K = branching**depth leaf experts.
    gate : {'softmax'}, default='softmax'
    expert : {'logistic'} or classifier, default='logistic'
    init, n_init, max_iter, tol, init_max_iter, init_sample_size, alpha, gate_alpha, \
gate_balance, warm_start, random_state, verbose, verbose_interval, device, expert_features, \
gate_features, distributed
        As in :class:`MoEClassifier` (``alpha=None`` is 1 on every leaf).

    Attributes
    ----------
    classes_, n_experts, n_iter_, converged_, log_likelihood_, log_likelihood_history_, \
expert_sizes_, gate_coef_, gate_intercept_
        As in :class:`HierarchicalMoERegressor` and :class:`MoEClassifier`; every
        node's children are ordered by size.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from moekit import HierarchicalMoEClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = HierarchicalMoEClassifier(depth=2, n_init=2, random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape
    (2, 3)
    """

    _parameter_constraints: ClassVar[dict] = {
        **{k: v for k, v in MoEClassifier._parameter_constraints.items() if k != "n_experts"},
        **_TREE_CONSTRAINTS,
    }
    _flat_class = MoEClassifier

    _defaults: ClassVar[dict] = {
        "depth": 2,
        "branching": 2,
        **{k: v for k, v in MoEClassifier._defaults.items() if k not in _NOT_TREE_CLASSIFIER},
    }

    def fit(self, X, y, *, sample_weight=None, start_from=None) -> HierarchicalMoEClassifier:
        """Fit by EM; ``sample_weight`` and ``start_from`` as in
        :meth:`HierarchicalMoERegressor.fit` (with ``MoEClassifier`` as the flat model).

        Returns
        -------
        self
        """
        return self._fit(X, y, parent=start_from, sample_weight=sample_weight)
