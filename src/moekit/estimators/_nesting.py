"""How a fit relates to smaller models: starting from one, and shrinking to one.

A fit may start from a fitted simpler model of the same data (``start_from``: one
expert fewer, or a family it contains), so that it never ends below it; and it may
end with fewer experts than it began with, when some hold less than ``min_share``
of the rows (:mod:`moekit.fitting.pruning`).
"""

from __future__ import annotations

import warnings

from sklearn.utils.validation import check_is_fitted

from moekit._core.engine import torch_generator
from moekit.estimators._design import Prepared, same_data
from moekit.estimators._editing import Edit
from moekit.fitting.em import EMModel, FitResult, Params, run_em
from moekit.fitting.pruning import prune_small_experts
from moekit.fitting.starts import carry_over


class SmallExpertsRemovedWarning(UserWarning):
    """Experts below ``min_share`` of the rows were removed during the fit."""


class NestingMixin:
    """Starts from a simpler model, and the removal of small experts (mixed into
    :class:`~moekit.estimators._base.BaseMoE`)."""

    def _drop_small_experts(self, model: EMModel, prepared: Prepared, result: FitResult,
                            edit: Edit | None) -> tuple[EMModel, FitResult, int, int]:  # fmt: skip
        """Remove the experts below ``min_share`` of the rows and continue EM without
        them (:func:`~moekit.fitting.pruning.prune_small_experts`); edits and fits with
        frozen experts keep every expert. Returns the model, its fit, how many went,
        and the EM iterations on all the data that ran before the returned fit's own
        (those of the larger models it continues: 0 when nothing was removed)."""
        if edit is not None or model.frozen_experts or self.fit_method != "em":
            return model, result, 0, 0
        if model.n_experts == 1:  # the largest expert always stays: nothing to check
            return model, result, 0, 0
        K, jac = model.n_experts, self._target().log_jacobian(prepared.state)
        earlier = [result.n_iter]  # the iterations of each fit a removal continues

        def rerun(small: EMModel, start: Params) -> FitResult:
            out = run_em(small, prepared.data, n_init=1, max_iter=self.max_iter, tol=self.tol,
                         init_max_iter=0, init_sample_size=None, warm_params=start,
                         generator=torch_generator(self.random_state),
                         loglik_offset=jac)  # fmt: skip
            earlier.append(out.n_iter)
            return out

        model, result, removed = prune_small_experts(model, prepared.data, result,
                                                     self.min_share, rerun)  # fmt: skip
        before = sum(earlier[:-1])
        if removed:
            warnings.warn(
                f"{removed} of {K} experts held less than min_share={self.min_share:g} of the "
                f"rows and were removed during EM; the model has {model.n_experts} "
                f"expert{'s' * (model.n_experts != 1)}.",
                SmallExpertsRemovedWarning,
                stacklevel=3,
            )
        return model, result, removed, before

    def _carried_over(self, model: EMModel, parent, prepared: Prepared) -> list:
        """Starts from a fitted simpler model of the same data (see ``carry_over``)."""
        check_is_fitted(parent)
        same = type(parent) is type(self)
        if not (same and same_data(parent, prepared.state, self._data_attrs())):
            raise ValueError(
                f"start_from: expected a {type(self).__name__} fitted on the same X and y "
                "(and the same expert and gate columns)."
            )
        small = EMModel(parent._expert_family, parent._gate_family)
        small.prepare(prepared.data)
        model.prepare(prepared.data)
        starts = carry_over(model, small, parent._params, prepared.data)
        if not starts:
            raise ValueError(
                f"start_from: a model with {small.n_experts} experts "
                f"({type(small.expert).__name__}, {type(small.gate).__name__}) is not a "
                f"simpler model that this one ({model.n_experts} experts, "
                f"{type(model.expert).__name__}, {type(model.gate).__name__}) contains."
            )
        return starts
