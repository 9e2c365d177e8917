"""BaseMoE: what every EM-fitted mixture-of-experts estimator shares.

A fitted model is p(y | x) = sum_k g_k(x) p_k(y | x). The base class validates
parameters and data, builds the designs (standardised features plus an intercept,
stored feature-major), hands an expert family and a gate to the one EM loop
(:func:`moekit.fitting.em.run_em`), and answers the shared questions: gate
weights, responsibilities, log-likelihood, BIC and AIC, and model files.
Subclasses declare their parameters (``_defaults``), their target coding
(``_target_coding``, see ``_targets``) and which experts to build.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator

from moekit._core.data import EMData
from moekit._core.distributed import DataGroup
from moekit._core.engine import em_threads, resolve_device, to_numpy, torch_generator
from moekit._core.validation import HasMethods, Interval, Options, check_options, validate_params
from moekit.estimators._columns import resolve_columns
from moekit.estimators._design import DESIGN_ATTRS, Prepared, build_designs, shared_tensor
from moekit.estimators._editing import Edit, EditingMixin
from moekit.estimators._files import ModelFileMixin
from moekit.estimators._inputs import check_fit_data
from moekit.estimators._nesting import NestingMixin, SmallExpertsRemovedWarning
from moekit.estimators._params import DeclaredParams
from moekit.estimators._scoring import SCORE_BLOCK_ROWS, CoefficientsMixin, ScoringMixin
from moekit.estimators._summary import SummaryMixin
from moekit.estimators._targets import TargetCoding
from moekit.estimators._weights import (
    as_row_tensor,
    check_offset,
    check_offset_family,
    check_sample_weight,
    weighted_moments,
)
from moekit.fitting.em import EMModel, FitResult, Params, run_em
from moekit.fitting.starts import STRATEGIES
from moekit.gates.constant import ConstantGate
from moekit.gates.mlp import MLPGate
from moekit.gates.softmax import SoftmaxGate

__all__ = ["SCORE_BLOCK_ROWS", "BaseMoE", "CollapsedExpertWarning", "SmallExpertsRemovedWarning"]

GATES = {"softmax": SoftmaxGate, "constant": ConstantGate, "mlp": MLPGate}
_COLUMN_SETTINGS = {"_expert_cols": "expert_features", "_gate_cols": "gate_features"}
GRADIENT_OPTIONS = {"optimizer": "lbfgs", "learning_rate": None, "batch_size": None}


class CollapsedExpertWarning(UserWarning):
    """An expert ended the fit with fewer effective samples than parameters."""


class BaseMoE(ScoringMixin, CoefficientsMixin, SummaryMixin, NestingMixin, EditingMixin,
              ModelFileMixin, DeclaredParams, BaseEstimator):  # fmt: skip
    """Shared machinery of the EM-fitted estimators (not for direct use).

    A fit is four steps: validate the parameters; build the data (check X and y,
    code the target, standardise, build the designs: :meth:`_prepare`); fit (EM or
    gradient fitting: :meth:`_run`); and set the fitted state, once, at the end
    (:meth:`_fitted_state`). A fit that fails at any point, KeyboardInterrupt
    included, leaves the estimator exactly as it was.

    A subclass declares its parameters and their defaults (``_defaults``), how its
    target is coded (``_target_coding``, a :class:`~moekit.estimators._targets.
    TargetCoding` class built from the expert family's class, :meth:`_expert_class`)
    and which experts to build (:meth:`_make_expert`).
    """

    _parameter_constraints: ClassVar[dict] = {
        "n_experts": [Interval(numbers.Integral, 1, None, closed="left")],
        "gate": [Options(GATES), HasMethods(("log_prob", "m_step", "log_weights"))],
        "init": [Options(STRATEGIES)],
        "n_init": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "init_max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "init_sample_size": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "gate_alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "gate_balance": [Interval(numbers.Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "random_state": ["random_state"],
        "verbose": [Interval(numbers.Integral, 0, None, closed="left"), "boolean"],
        "verbose_interval": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "expert_features": [None, "array-like"],
        "gate_features": [None, "array-like"],
        "expert_options": [None, dict],
        "gate_options": [None, dict],
        "distributed": ["boolean"],
        "min_share": [Interval(numbers.Real, 0, 1, closed="left")],
    }
    _target_coding: ClassVar[type[TargetCoding]] = TargetCoding
    _order_by_mean = False  # documented expert order: by mean prediction, else by size
    _min_features = 1  # 0 where a model of y alone means something (a Gaussian mixture)

    # The settings of estimators that have them; the others fit as these say.
    fit_method = "em"
    objective = "competitive"
    fit_options = None
    expert_options = None
    gate_options = None
    gate_balance = 0.0
    distributed = False
    min_share = 0.0

    # ------------------------------------------------------------------ declarations
    def _expert_class(self) -> type | None:
        """The expert family's class, which the target coding may depend on."""
        return None

    def _make_expert(self, coding, seed: int):  # pragma: no cover - abstract
        """The expert family, for a target coded as ``coding`` says."""
        raise NotImplementedError

    def _target(self) -> TargetCoding:
        """This estimator's target coding (see ``_targets``)."""
        return self._target_coding(self._expert_class())

    def _data_attrs(self) -> tuple[str, ...]:
        """The fitted attributes that say how X and y are coded (a warm fit keeps them)."""
        return (*DESIGN_ATTRS, *self._target_coding.attrs)

    def _validate_params(self) -> None:
        validate_params(
            type(self).__name__, self.get_params(deep=False), self._parameter_constraints
        )
        if self.min_share * self.n_experts > 1:
            raise ValueError(
                f"n_experts={self.n_experts} with min_share={self.min_share:g}: at most "
                f"{int(1 / self.min_share)} experts can each hold that share of the rows; "
                "ask for fewer experts or a smaller min_share."
            )

    def _make_gate(self, seed: int):
        if not isinstance(self.gate, str):
            return self.gate
        if self.gate == "mlp":
            return MLPGate(self.n_experts, alpha=self.gate_alpha, seed=seed,
                           options=self.gate_options)  # fmt: skip
        if self.gate_options:
            raise ValueError(f"gate_options are for gate='mlp'; got gate={self.gate!r}.")
        if self.gate == "softmax":
            return SoftmaxGate(self.n_experts, alpha=self.gate_alpha)
        return GATES[self.gate](self.n_experts)

    # ------------------------------------------------------------------ fit
    def _fit(self, X, y, *, parent: BaseMoE | None = None, edit: Edit | None = None,
             sample_weight=None, offset=None) -> BaseMoE:  # fmt: skip
        """Fit, setting the fitted attributes only once everything has succeeded.

        ``parent`` is a fitted model of the same data whose fit carries over into
        extra starts (one expert fewer: its experts split; a simpler family: embedded).
        ``edit`` continues the current fit from edited parameters (see ``_editing``).
        """
        before = dict(self.__dict__)
        try:
            if edit is not None and edit.n_experts != self.n_experts:
                self.n_experts = edit.n_experts  # restored with the rest if the fit fails
            if edit is not None and edit.expert is not None:
                self.expert = edit.expert
            self._validate_params()
            comm = self._data_group(fresh=parent is None and edit is None)
            seed = self.random_state if comm is None else comm.shared_seed(self.random_state)
            prepared = self._prepare(X, y, warm=True if edit is not None else None, comm=comm,
                                     rows=(sample_weight, offset))  # fmt: skip
            model = self._em_model(prepared, seed, edit)
            with em_threads(prepared.data):  # the state too (2 threads, CPU loaded: up to 14 ms)
                result = self._run(model, prepared, parent, edit, seed)
                model, result, removed, before = self._drop_small_experts(model, prepared,
                                                                          result, edit)  # fmt: skip
                kept = model.frozen_experts if edit is None else edit.kept_frozen
                fitted = self._fitted_state(model, result, prepared, kept)
            state = {**prepared.state, **fitted, "n_experts_removed_": removed}
            if before:  # every EM iteration of the fit, those before experts were removed too
                state["n_iter_"] += before
        except BaseException:
            # scikit-learn's validate_data writes n_features_in_ as it checks: undo that too
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        if edit is None and not prepared.warm:
            # a fresh fit is of whatever columns X now holds: a formula (set by
            # moekit.formula.fit_formula after its fit) no longer describes them
            for name in ("formula_", "offset_term_", "target_names_"):  # the command's too
                self.__dict__.pop(name, None)
        self.__dict__.update(state)
        return self

    def _data_group(self, fresh: bool = True) -> DataGroup | None:
        """The processes of a data-parallel fit (``distributed=True``), else None."""
        if not self.distributed:
            return None
        if self.fit_method != "em":
            raise ValueError(
                "distributed=True fits by EM, whose statistics sum over rows; got "
                f"fit_method={self.fit_method!r}."
            )
        if not fresh:
            raise ValueError(
                "distributed=True fits afresh or continues (warm_start); start_from "
                "and the editing methods (add_expert, remove_expert, refit) run on "
                "one process's data."
            )
        return DataGroup.default()

    def _em_model(self, prepared: Prepared, random_state, edit: Edit | None) -> EMModel:
        """The expert family and gate for the prepared data, with the fit's settings."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch_generator(random_state)))
        model = EMModel(self._make_expert(prepared.state, seed), self._make_gate(seed))
        if prepared.data.comm is not None:
            for family in (model.expert, model.gate):
                if family.needs_resp:  # its M-step needs every row, not sums over rows
                    raise ValueError(
                        f"distributed=True: the {type(family).__name__} family's M-step needs "
                        "every row's responsibilities (needs_resp), not sums over rows that "
                        "processes can all-reduce. Use linear, Student-t or Poisson experts "
                        "with a softmax or constant gate, or fit on one process."
                    )
        model.gate_balance = float(self.gate_balance)
        if model.gate_balance and not getattr(model.gate, "supports_balance", False):
            raise ValueError(
                "gate_balance is for the softmax, constant and tree gates; got "
                f"{type(model.gate).__name__}."
            )
        if edit is not None:
            model.frozen_experts, model.gate_frozen = edit.frozen, edit.gate_frozen
        elif prepared.warm:
            model.frozen_experts = getattr(self, "frozen_experts_", ())
        return model

    def _prepare(self, X, y, warm: bool | None = None, comm: DataGroup | None = None,
                 rows: tuple = (None, None)) -> Prepared:  # fmt: skip
        """Check X and y and build the EM data; returns the state that describes them.

        ``rows`` holds the rows' ``sample_weight`` and ``offset`` (each None or one
        value per row): rows of weight zero are dropped, and the standardisations are
        weighted (see ``_weights``).

        A warm fit (``warm_start``, or ``warm=True`` for an edit) keeps the fitted
        scalings and coding, in which the current parameters are expressed.

        With ``comm`` (a data-parallel fit) X and y are this process's shard: each
        process checks its own, and all fail together if any fails; the row count,
        the standardisation and the target's coding are those of all the shards.
        """
        warm = self._warm_fit_possible() if warm is None else warm
        coder = self._target()
        error = None
        try:
            X, y, coding, w, off = self._check_shard(X, y, warm, coder, comm is None, rows)
        except Exception as err:
            if comm is None:
                raise
            error = err
        if comm is None:
            n = X.shape[0]
        else:
            comm.agree(error)
            n = comm.total_rows(X.shape[0], (X.shape[1], y.shape[1:]), self.n_experts)
            given = comm.sum(torch.tensor([w is not None, off is not None], dtype=torch.float64,
                                          device=comm.device))  # fmt: skip
            for name, count in zip(("sample_weight", "offset"), given.tolist(), strict=True):
                if 0 < count < comm.size:  # every process decides alike: all raise
                    raise ValueError(f"distributed=True: {name} is given on {count:g} of "
                                     f"{comm.size} processes; give it on all or none.")  # fmt: skip
        state: dict[str, Any] = {"n_features_in_": self.n_features_in_}
        if getattr(self, "feature_names_in_", None) is not None:
            state["feature_names_in_"] = self.feature_names_in_
        if warm:
            state.update({k: getattr(self, k) for k in self._data_attrs()})
        else:
            state.update(coding if comm is None else coder.reduce(y, coding, comm, n, w))
            Xt = shared_tensor(X)
            wt = as_row_tensor(w, None)
            mean, scale = weighted_moments(Xt, wt) if comm is None else comm.moments(Xt, n, wt)
            state["_x_mean"] = mean
            state["_x_scale"] = torch.where(scale > 0, scale, torch.ones_like(scale))
            d, names = X.shape[1], state.get("feature_names_in_")
            for attr, name in _COLUMN_SETTINGS.items():
                state[attr] = resolve_columns(getattr(self, name), name, d, names)
        device = resolve_device(self.device)
        state["_x_mean"] = state["_x_mean"].to(device)
        state["_x_scale"] = state["_x_scale"].to(device)
        on_device = Xt if not warm and Xt.device == device else shared_tensor(X, device)
        XeT, XgT = build_designs(on_device, state)
        data = EMData(XeT, XgT, coder.encode(y, state, device), comm=comm,
                      n_global=None if comm is None else n, weight=as_row_tensor(w, device),
                      offset=as_row_tensor(off, device))  # fmt: skip
        return Prepared(X, y, state, data, warm, w, off)

    def _check_shard(self, X, y, warm: bool, coder: TargetCoding, local: bool = True,
                     rows: tuple = (None, None)):  # fmt: skip
        """The checks that need no other process: (X, y, coding or None, weight, offset).

        Rows of zero weight are dropped here, before the target is coded (a class
        seen only with weight zero is not a class of the fit).
        """
        if warm:
            d = np.shape(X)[1] if np.ndim(X) == 2 else None
            if d is not None and d != self.n_features_in_:
                raise ValueError(
                    f"X has {d} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input: warm_start=True continues the "
                    "previous fit, which needs the same features (set warm_start=False to "
                    "fit afresh)."
                )
        X, y = check_fit_data(self, X, y, min_features=self._min_features,
                              validation=coder.validation)  # fmt: skip
        w = check_sample_weight(rows[0], X.shape[0])
        off = check_offset(rows[1], X.shape[0])
        check_offset_family(self._expert_class(), getattr(self, "expert", None), off)
        if w is not None and not (w > 0).all():
            keep = w > 0
            X, y, w = X[keep], np.asarray(y)[keep], w[keep]
            off = None if off is None else off[keep]
        if local and X.shape[0] < self.n_experts:
            raise ValueError(
                f"Expected n_samples >= n_experts but got n_experts = {self.n_experts}, "
                f"n_samples = {X.shape[0]}."
            )
        if warm:
            return X, coder.check(y, vars(self)), None, w, off
        y, coding = coder.fit(y, w) if local else coder.fit_shard(y)
        return X, y, coding, w, off

    def _warm_fit_possible(self) -> bool:
        if not (self.warm_start and hasattr(self, "_params")):
            return False
        # a different number of experts starts afresh (documented)
        return self._n_experts_fitted == self.n_experts

    def _run(self, model: EMModel, prepared: Prepared, parent, edit=None,
             random_state=None) -> FitResult:  # fmt: skip
        """EM (or gradient fitting) of ``model``; ``random_state`` seeds its draws."""
        comm = prepared.data.comm
        common = {
            "n_init": 1 if prepared.warm else self.n_init,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "generator": torch_generator(random_state),
            "warm_params": self._params if prepared.warm else None,
            # one process reports a data-parallel fit: the others would print the same
            "verbose": 0 if comm is not None and comm.rank != 0 else int(self.verbose),
        }
        em = {
            **common,
            "init": self.init,
            "init_max_iter": self.init_max_iter,
            "init_sample_size": self.init_sample_size,
            "verbose_interval": self.verbose_interval,
            "loglik_offset": self._target().log_jacobian(prepared.state),
        }
        if edit is not None:  # from each edited start; the best one kept
            results = [
                run_em(model, prepared.data, **{**em, "n_init": 1, "init_sample_size": None,
                       "generator": torch_generator(random_state), "warm_params": start})
                for start in edit.starts
            ]  # fmt: skip
            return max(results, key=lambda r: r.objective)
        if self.fit_method == "gradient":
            from moekit.fitting.gradient import run_gradient

            if prepared.data.weight is not None or prepared.data.offset is not None:
                raise ValueError("sample_weight and offset are for fit_method='em'.")

            options = check_options(self.fit_options, GRADIENT_OPTIONS, "fit_options")
            return run_gradient(model, prepared.data, init=self.init, objective=self.objective,
                                **common, **options)  # fmt: skip
        if self.fit_options:
            raise ValueError("fit_options are for fit_method='gradient'.")
        if self.objective != "competitive":
            raise ValueError(
                "EM maximises the likelihood (objective='competitive'); the cooperative "
                "objective needs fit_method='gradient'."
            )
        extra = ()
        if parent is not None and not prepared.warm:
            extra = tuple(self._carried_over(model, parent, prepared))
        return run_em(model, prepared.data, extra_starts=extra, **em)

    def _fitted_state(self, model: EMModel, result: FitResult, prepared: Prepared,
                      frozen: tuple[int, ...] = ()):  # fmt: skip
        """The fitted attributes of a successful fit: parameters in documented order.

        ``frozen``: the experts (numbered as in the fit) that stay frozen after it.
        """
        expert, gate = model.expert, model.gate
        if result.nk.shape[0] == 1:  # one expert: the one order, without computing a key
            perm = torch.zeros(1, dtype=torch.long, device=result.nk.device)
        elif self._order_by_mean:  # increasing mean prediction over the training inputs
            means, _ = expert.moments(result.params.expert, prepared.data.XeT)
            data = prepared.data
            m0 = means[..., 0] if data.weight is None else means[..., 0] * data.weight[:, None]
            mean = data.reduce(m0.sum(0)) / data.w_total  # over every process
            perm = torch.argsort(mean, stable=True)
        else:
            perm = torch.argsort(-result.nk, stable=True)
        if hasattr(gate, "representable_order"):  # a tree reorders children within nodes only
            perm = gate.representable_order(perm)
        params = Params(expert.select(result.params.expert, perm),
                        gate.select(result.params.gate, perm))  # fmt: skip
        if hasattr(expert, "named"):  # a family per expert: the names in the new order
            expert = expert.named(params.expert)
        nk = result.nk[perm]
        place = torch.argsort(perm)  # where each expert of the fit ends up
        frozen = tuple(sorted(int(place[k]) for k in frozen))
        jac = self._target().log_jacobian(prepared.state)
        state = {
            "_expert_family": expert,
            "_gate_family": gate,
            "_params": params,
            "_n_experts_fitted": model.n_experts,
            "n_iter_": result.n_iter,
            "converged_": result.converged,
            "log_likelihood_": result.loglik + jac,
            "expert_sizes_": to_numpy(nk),
            "_n_optima": result.n_optima,
            "frozen_experts_": frozen,
            # a reference (not a copy) for summary(); dropped when pickled or saved, and
            # not kept by a data-parallel fit, whose rows are spread over processes
            "_summary_data": None if prepared.data.comm else (prepared.X, prepared.y),
            "_summary_rows": (prepared.weight, prepared.offset),
        }
        if self.objective == "cooperative":
            # the minimised loss is a squared error, not a log-likelihood: keep it apart
            state["loss_history_"] = list(result.history)
            state["log_likelihood_history_"] = [state["log_likelihood_"]]
        else:
            state["log_likelihood_history_"] = [h + jac for h in result.history]
        self._warn_collapsed(nk, expert.min_samples(result.params.expert))
        return state

    def _warn_collapsed(self, nk: torch.Tensor, min_samples: float) -> None:
        small = torch.nonzero(nk < min_samples).flatten().tolist()
        if small:
            sizes = ", ".join(f"expert {k}: {float(nk[k]):.3g}" for k in small)
            warnings.warn(
                f"Some experts collapsed: their total responsibility is below the "
                f"{min_samples:g} samples they need ({sizes}); their fits are degenerate. "
                "Consider fewer experts (n_experts) or more starts (n_init).",
                CollapsedExpertWarning,
                stacklevel=3,
            )
