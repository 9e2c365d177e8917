"""Editing a fitted mixture: add, remove and freeze experts, refit parts of it.

Modularity is much of what makes a mixture of experts attractive: a fitted model is
a set of experts and a gate, and a user who finds one regime missing, one expert
superfluous, or one expert already right wants to change that part and keep the
rest. Each edit here starts EM from the edited parameters of the current fit, in
the current fit's scalings, and keeps the best of its starts:

- ``add_expert`` starts a new expert on the rows the model explains worst (lowest
  log p(y|x)), and, as a floor, a copy of the worst-fitting expert with its gate
  weight halved between the two (the same density, so the refit never ends below
  the current likelihood);
- ``remove_expert`` drops one expert and its gate weight, then refits;
- ``freeze_experts`` marks experts whose parameters the M-step keeps; the other
  experts and the gate then take their maximising steps as usual, which is still a
  generalised EM step, so the likelihood keeps increasing;
- ``refit(part=...)`` continues EM on the gate only, the (unfrozen) experts only,
  or everything.

An edit is a fit like any other: it validates its input, leaves the estimator as it
was if it fails, numbers the experts as a fit does (frozen marks follow their
experts), and round-trips through ``save``/``load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sklearn.utils.validation import check_is_fitted

from moekit.fitting.model import EMModel, Params, keep_experts
from moekit.fitting.starts import duplicate_expert, expert_fit_order

PARTS = ("all", "gate", "experts")


@dataclass
class Edit:
    """Edited starting points of a refit, and what the refit holds fixed."""

    starts: list[Params]
    n_experts: int
    frozen: tuple[int, ...] = ()
    gate_frozen: bool = False
    keep: tuple[int, ...] | None = None  # frozen after the refit (default: ``frozen``)
    expert: list[str] | None = None  # a family per expert: the list after the edit

    @property
    def kept_frozen(self) -> tuple[int, ...]:
        return self.frozen if self.keep is None else self.keep


def _expert_indices(experts: Any, K: int, name: str) -> tuple[int, ...]:
    """Distinct expert indices in [0, K) from an int or an iterable of ints."""
    items = [experts] if hasattr(experts, "__index__") else experts
    try:
        items = list(items)
    except TypeError:
        msg = f"{name} must be an expert index or a list of them; got {experts!r}."
        raise ValueError(msg) from None
    out = []
    for k in items:
        if isinstance(k, bool) or not hasattr(k, "__index__"):
            raise ValueError(f"{name} must hold integer expert indices; got {k!r}.")
        k = int(k)
        if not -K <= k < K:
            raise ValueError(f"{name}: expert {k} does not exist; the model has {K} experts.")
        out.append(k % K)
    return tuple(sorted(set(out)))


class EditingMixin:
    """Edits of a fitted mixture (see the module docstring)."""

    def freeze_experts(self, experts) -> Any:
        """Keep the parameters of ``experts`` fixed in later refits.

        Parameters
        ----------
        experts : int or list of int
            Expert indices (as numbered by the fit: ``coef_[k]``...).

        Returns
        -------
        self
        """
        check_is_fitted(self)
        ks = _expert_indices(experts, self._n_experts_fitted, "experts")
        self.frozen_experts_ = tuple(sorted(set(self.frozen_experts_) | set(ks)))
        return self

    def unfreeze_experts(self, experts=None) -> Any:
        """Let ``experts`` (default: all) move again in later refits; returns self."""
        check_is_fitted(self)
        if experts is None:
            self.frozen_experts_ = ()
        else:
            ks = set(_expert_indices(experts, self._n_experts_fitted, "experts"))
            self.frozen_experts_ = tuple(k for k in self.frozen_experts_ if k not in ks)
        return self

    def refit(self, X, y, part: str = "all") -> Any:
        """Continue EM from the current fit on (X, y), moving only ``part``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        part : {'all', 'gate', 'experts'}, default='all'
            'gate': every expert stays as it is and the gate is refitted (the
            likelihood never decreases); 'experts': the gate stays and the experts
            not frozen are refitted; 'all': everything not frozen.

        Returns
        -------
        self
        """
        check_is_fitted(self)
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}; got {part!r}.")
        K = self._n_experts_fitted
        frozen = tuple(range(K)) if part == "gate" else tuple(self.frozen_experts_)
        if part == "experts" and len(frozen) == K:
            raise ValueError(
                "refit(part='experts'): every expert is frozen, so nothing would move; "
                "unfreeze_experts() first, or refit part='gate'."
            )
        edit = Edit([self._params], K, frozen, gate_frozen=part == "experts",
                    keep=tuple(self.frozen_experts_))  # fmt: skip
        return self._fit(X, y, edit=edit)

    def add_expert(self, X, y) -> Any:
        """Add one expert, started on the rows the model explains worst, and refit.

        Two starts run to convergence and the better is kept: the new expert fitted
        to the rows with the lowest log p(y|x) (1/(K+1) of them), the other experts
        to the rest as they share it now; and a copy of the worst-fitting expert
        (lowest responsibility-weighted mean log-density) with its gate weight
        halved between the two, which has the current likelihood, so the result
        never ends below it (up to the change of the small penalties EM maximises
        with the likelihood: the copy's coefficients are penalised twice). Frozen
        experts stay frozen; the new expert is free.

        Returns
        -------
        self
        """
        check_is_fitted(self)
        if hasattr(self._expert_family, "names_of"):
            raise ValueError(
                f"add_expert: with a family per expert (expert={self.expert!r}) the new "
                "expert's family is not known; fit with a longer expert list instead."
            )
        K = self._n_experts_fitted
        model, data = self._edit_model(X, y, "add_expert")
        params = self._params
        res = model.e_pass(params, data, stats=False, keep_resp=True)
        loglik = torch.cat([self._row_loglik(model, params, c) for c in data.chunks()])
        worst = torch.argsort(loglik)[: max(1, data.n // (K + 1))]
        resp = torch.cat([res.resp, res.resp.new_zeros((1, data.n))])
        resp[:, worst] = 0.0
        resp[K, worst] = 1.0
        big = model.resized(K + 1)
        big.prepare(data)
        fresh = big.init_from_resp(data, resp)
        _, order = expert_fit_order(model, params, data)  # worst fit first
        frozen = set(self.frozen_experts_)
        worst = next((k for k in order if k not in frozen), order[0])
        copy = duplicate_expert(big, params, worst)
        if self.frozen_experts_:  # frozen experts start, and stay, where they are
            fresh = Params(keep_experts(copy.expert, fresh.expert, self.frozen_experts_),
                           fresh.gate)  # fmt: skip
        edit = Edit([fresh, copy], K + 1, tuple(self.frozen_experts_))
        return self._fit(X, y, edit=edit)

    def remove_expert(self, k: int, X=None, y=None) -> Any:
        """Remove expert ``k`` and its gate weight, then refit the rest.

        Parameters
        ----------
        k : int
            The expert to remove; the experts after it move up one place.
        X, y : array-like, optional
            The data to refit on; by default the data of the last fit, while the
            estimator still holds it (not after ``load``).

        Returns
        -------
        self
        """
        check_is_fitted(self)
        K = self._n_experts_fitted
        (k,) = _expert_indices(k, K, "k")
        if K == 1:
            raise ValueError("remove_expert: the model has one expert; there is none to spare.")
        if X is None or y is None:
            held = getattr(self, "_summary_data", None)
            if held is None:
                raise ValueError(
                    "remove_expert: pass X and y to refit on; this model no longer holds "
                    "the data it was fitted on (it was loaded from a file)."
                )
        rows = {}
        if X is None or y is None:
            X, y = self._held_rows()
            w, offset = getattr(self, "_summary_rows", (None, None))  # the fit's own
            rows = {"sample_weight": w, "offset": offset}
        model, _ = self._edit_model(None, None, "remove_expert")
        keep = torch.tensor([j for j in range(K) if j != k])
        gate = model.gate.select(self._params.gate, keep)
        # renormalise: log sum_k g_k is 0 for a softmax gate, the mass removed otherwise
        lse = torch.logsumexp(model.gate.log_weights(gate, self._one_gate_row()), 0)
        gate = model.gate.shift(gate, -lse.reshape(1).expand(K - 1))
        start = Params(model.expert.select(self._params.expert, keep), gate)
        frozen = tuple(j - (j > k) for j in self.frozen_experts_ if j != k)
        names = getattr(model.expert, "names_of", None)  # a family per expert: drop its name
        expert = None if names is None else names(start.expert)
        return self._fit(X, y, edit=Edit([start], K - 1, frozen, expert=expert), **rows)

    # ------------------------------------------------------------------ helpers
    def _edit_model(self, X, y, what: str) -> tuple[EMModel, Any]:
        gate = self._gate_family
        if not getattr(gate, "resizable", True):
            raise ValueError(
                f"{what}: the number of leaves of {type(gate).__name__} is set by its shape "
                "(depth and branching); change the shape and fit again instead."
            )
        model = EMModel(self._expert_family, gate)
        if X is None:
            return model, None
        data = self._em_data(X, y)
        model.prepare(data)
        return model, data

    def _one_gate_row(self) -> torch.Tensor:
        # a gate design of one row at the centre of the data (standardised x = 0)
        p = (self.n_features_in_ if self._gate_cols is None else len(self._gate_cols)) + 1
        row = torch.zeros((p, 1), dtype=self._x_mean.dtype, device=self._x_mean.device)
        row[-1] = 1.0
        return row

    @staticmethod
    def _row_loglik(model: EMModel, params: Params, chunk) -> torch.Tensor:
        logp = model.expert.log_prob(params.expert, chunk) + model.gate.log_prob(params.gate, chunk)
        return torch.logsumexp(logp, 0)
