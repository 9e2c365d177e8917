"""BaseMoE: what every EM-fitted mixture-of-experts estimator shares.

A fitted model is p(y | x) = sum_k g_k(x) p_k(y | x). The base class validates
parameters and data, builds the designs (standardised features plus an intercept,
stored feature-major), hands an expert family and a gate to the one EM loop
(:func:`moekit.fitting.em.run_em`), and answers the shared questions: gate
weights, responsibilities, log-likelihood, BIC and AIC, and model files.
Subclasses say which experts and gate to build and how the target is encoded.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit._core.data import Chunk, EMData
from moekit._core.distributed import DataGroup
from moekit._core.engine import EM_DTYPE, em_threads, resolve_device, to_numpy, torch_generator
from moekit._core.validation import (
    HasMethods,
    Interval,
    Options,
    check_options,
    validate_params,
)
from moekit.estimators._columns import resolve_columns
from moekit.estimators._editing import Edit, EditingMixin
from moekit.estimators._files import ModelFileMixin
from moekit.fitting.em import EMModel, FitResult, Params, run_em
from moekit.fitting.starts import STRATEGIES, carry_over
from moekit.gates.constant import ConstantGate
from moekit.gates.mlp import MLPGate
from moekit.gates.softmax import SoftmaxGate

GATES = {"softmax": SoftmaxGate, "constant": ConstantGate, "mlp": MLPGate}
GRADIENT_OPTIONS = {"optimizer": "lbfgs", "learning_rate": None, "batch_size": None}


SCORE_BLOCK_ROWS = 2**17
"""Rows per block when scoring large data (see ``log_likelihood_samples``)."""


def _rows(A, rows: slice):
    """Rows of a DataFrame, Series, array or list, keeping a frame's column names."""
    if hasattr(A, "iloc"):
        return A.iloc[rows]
    return np.asarray(A)[rows]


class CollapsedExpertWarning(UserWarning):
    """An expert ended the fit with fewer effective samples than parameters."""


@dataclass
class _Prepared:
    """What a fit derives from X and y before EM: the data and the state to set."""

    X: np.ndarray
    y: np.ndarray
    state: dict[str, Any]  # fitted attributes that describe the data (scalings, coding)
    data: EMData
    warm: bool


class BaseMoE(EditingMixin, ModelFileMixin, BaseEstimator):
    """Shared machinery of the EM-fitted estimators (not for direct use).

    A fit runs in small steps, :meth:`_prepare` (check and code the data),
    :meth:`_run` (EM or gradient fitting) and :meth:`_fitted_state` (what the result
    means), and sets the fitted attributes once, at the end. A fit that fails at any
    point, KeyboardInterrupt included, leaves the estimator exactly as it was.

    Subclasses say how the target is coded (:meth:`_code_target`, :meth:`_encode_target`)
    and which experts to build (:meth:`_make_expert`); both read the coding from a
    mapping of attribute names (the pending fit's state, or ``vars(self)`` after it).
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
    }
    _order_by_mean = False  # documented expert order: by mean prediction, else by size
    _y_validation: ClassVar[dict] = {}  # validate_data's arguments for y
    _coding_attrs: tuple[str, ...] = ()  # the attributes that code the target

    # ------------------------------------------------------------------ hooks
    def _code_target(self, y) -> tuple[np.ndarray, dict[str, Any]]:  # pragma: no cover
        """Check the training target; return it and the attributes that code it."""
        raise NotImplementedError

    def _check_target(self, y, coding) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode_target(self, y: np.ndarray, device, coding) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _make_expert(self, coding, seed: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _target_log_jacobian(self, coding) -> float:
        """log |d y_encoded / d y| per row: converts likelihoods to the user's units."""
        return 0.0

    def _code_shard(self, y) -> tuple[np.ndarray, dict[str, Any]]:
        """:meth:`_code_target` for one process's shard of a data-parallel fit: the
        checks a shard can make alone (no collective: any may fail on one shard)."""
        return self._code_target(y)

    def _reduce_coding(self, y, coding: dict, comm: DataGroup, n: int) -> dict:
        """The coding of the whole target from the shards' (collectives, same on all)."""
        return coding

    # ------------------------------------------------------------------ data-parallel
    def _data_group(self) -> DataGroup | None:
        """The processes of a data-parallel fit (``distributed=True``), else None."""
        if not getattr(self, "distributed", False):
            return None
        if getattr(self, "fit_method", "em") != "em":
            raise ValueError(
                "distributed=True fits by EM, whose statistics sum over rows; got "
                f"fit_method={self.fit_method!r}."
            )
        return DataGroup.default()

    @staticmethod
    def _check_distributable(model: EMModel) -> None:
        """Refuse families whose M-step needs every row's responsibilities."""
        for family in (model.expert, model.gate):
            if family.needs_resp:
                raise ValueError(
                    f"distributed=True: the {type(family).__name__} family's M-step needs "
                    "every row's responsibilities (needs_resp), not sums over rows that "
                    "processes can all-reduce. Use linear, Student-t or Poisson experts with "
                    "a softmax or constant gate, or fit on one process."
                )

    # ------------------------------------------------------------------ fit
    def _validate_params(self) -> None:
        validate_params(
            type(self).__name__, self.get_params(deep=False), self._parameter_constraints
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

    def _fit(self, X, y, *, parent: BaseMoE | None = None, edit: Edit | None = None) -> BaseMoE:
        """Fit, setting the fitted attributes only once everything has succeeded.

        ``parent`` is a fitted model of the same data whose fit carries over into
        extra starts (one expert fewer: its experts split; a simpler family: embedded).
        ``edit`` continues the current fit from edited parameters (see ``_editing``).
        """
        before = dict(self.__dict__)
        try:
            if edit is not None and edit.n_experts != self.n_experts:
                self.n_experts = edit.n_experts  # restored with the rest if the fit fails
            self._validate_params()
            comm = self._data_group()
            random_state = self.random_state
            if comm is not None:
                if parent is not None or edit is not None:
                    raise ValueError(
                        "distributed=True fits afresh or continues (warm_start); start_from "
                        "and the editing methods (add_expert, remove_expert, refit) run on "
                        "one process's data."
                    )
                # one stream of random draws for every process: process 0's seed
                if not isinstance(random_state, (int, np.integer)) or isinstance(
                    random_state, bool
                ):
                    gen = torch_generator(random_state)
                    random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                random_state = comm.broadcast_int(int(random_state))
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch_generator(random_state)))
            prepared = self._prepare(X, y, warm=True if edit is not None else None, comm=comm)
            coding = {**vars(self), **prepared.state}
            model = EMModel(self._make_expert(coding, seed), self._make_gate(seed))
            if comm is not None:
                self._check_distributable(model)
            model.gate_balance = float(getattr(self, "gate_balance", 0.0))
            if model.gate_balance and not getattr(model.gate, "supports_balance", False):
                raise ValueError(
                    "gate_balance is for the softmax, constant and tree gates; got "
                    f"{type(model.gate).__name__}."
                )
            if edit is not None:
                model.frozen_experts, model.gate_frozen = edit.frozen, edit.gate_frozen
            elif prepared.warm:
                model.frozen_experts = getattr(self, "frozen_experts_", ())
            with em_threads(prepared.data):
                result = self._run(model, prepared, parent, edit, random_state)
            kept = model.frozen_experts if edit is None else edit.kept_frozen
            fitted = self._fitted_state(model, result, prepared, coding, kept)
            state = {**prepared.state, **fitted}
        except BaseException:
            # scikit-learn's validate_data writes n_features_in_ as it checks: undo that too
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        if edit is None and not prepared.warm:
            # a fresh fit is of whatever columns X now holds: a formula (set by
            # moekit.formula.fit_formula after its fit) no longer describes them
            self.__dict__.pop("formula_", None)
        self.__dict__.update(state)
        return self

    def _prepare(self, X, y, warm: bool | None = None, comm: DataGroup | None = None) -> _Prepared:
        """Check X and y and build the EM data; returns the state that describes them.

        A warm fit (``warm_start``, or ``warm=True`` for an edit) keeps the fitted
        scalings and coding, in which the current parameters are expressed.

        With ``comm`` (a data-parallel fit) X and y are this process's shard: each
        process checks its own, and all fail together if any fails; the row count,
        the standardisation and the target's coding are those of all the shards.
        """
        warm = self._warm_fit_possible() if warm is None else warm
        error = None
        try:
            X, y, coding = self._check_shard(X, y, warm, local_n_check=comm is None)
        except Exception as err:
            if comm is None:
                raise
            error = err
        n = X.shape[0] if comm is None else None
        if comm is not None:
            comm.agree(error)
            shapes = comm.gather_objects((X.shape[1], y.shape[1:]))
            if len(set(shapes)) > 1:
                raise ValueError(
                    "distributed=True: the processes' shards differ in shape (features, "
                    f"target columns per process: {shapes}); every shard needs the same columns."
                )
            counts = comm.row_counts(X.shape[0])
            n = sum(counts)
            if n < self.n_experts:
                raise ValueError(
                    f"Expected n_samples >= n_experts but got n_experts = {self.n_experts}, "
                    f"n_samples = {n} over {len(counts)} processes."
                )
        state: dict[str, Any] = {"n_features_in_": self.n_features_in_}
        names = getattr(self, "feature_names_in_", None)
        if names is not None:
            state["feature_names_in_"] = names
        if warm:
            keep = ("_x_mean", "_x_scale", "_expert_cols", "_gate_cols", *self._coding_attrs)
            state.update({k: getattr(self, k) for k in keep})
        else:
            if comm is not None:
                coding = self._reduce_coding(y, coding, comm, n)
            state.update(coding)
            Xt = _shared_tensor(X)
            mean, scale = _moments(Xt, comm, n)
            state["_x_mean"] = mean
            state["_x_scale"] = torch.where(scale > 0, scale, torch.ones_like(scale))
            d, names = X.shape[1], state.get("feature_names_in_")
            state["_expert_cols"] = resolve_columns(self.expert_features, "expert_features", d,
                                                    names)  # fmt: skip
            state["_gate_cols"] = resolve_columns(self.gate_features, "gate_features", d, names)
        device = resolve_device(self.device)
        state["_x_mean"] = state["_x_mean"].to(device)
        state["_x_scale"] = state["_x_scale"].to(device)
        Xt = _shared_tensor(X, device)
        XeT, XgT = _designs(Xt, state)
        data = EMData(XeT, XgT, self._encode_target(y, device, state), comm=comm,
                      n_global=None if comm is None else n)  # fmt: skip
        return _Prepared(X, y, state, data, warm)

    def _check_shard(self, X, y, warm: bool, local_n_check: bool = True):
        """The checks of X and y that need no other process: (X, y, coding or None)."""
        if warm:
            d = np.shape(X)[1] if np.ndim(X) == 2 else None
            if d is not None and d != self.n_features_in_:
                raise ValueError(
                    f"X has {d} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input: warm_start=True continues the "
                    "previous fit, which needs the same features (set warm_start=False to "
                    "fit afresh)."
                )
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2,
                             **self._y_validation)  # fmt: skip
        n = X.shape[0]
        if local_n_check and n < self.n_experts:
            raise ValueError(
                f"Expected n_samples >= n_experts but got n_experts = {self.n_experts}, "
                f"n_samples = {n}."
            )
        if warm:
            keep = ("_x_mean", "_x_scale", "_expert_cols", "_gate_cols", *self._coding_attrs)
            return X, self._check_target(y, {k: getattr(self, k) for k in keep}), None
        y, coding = self._code_target(y) if local_n_check else self._code_shard(y)
        return X, y, coding

    def _warm_fit_possible(self) -> bool:
        if not (self.warm_start and hasattr(self, "_params")):
            return False
        if self._n_experts_fitted != self.n_experts:
            return False  # a different number of experts starts afresh (documented)
        return True

    def _run(self, model: EMModel, prepared: _Prepared, parent, edit=None,
             random_state=None) -> FitResult:  # fmt: skip
        """EM (or gradient fitting) of ``model``; ``random_state`` seeds its draws."""
        if edit is not None:  # from each edited start; the best one kept
            results = [
                run_em(model, prepared.data, n_init=1, max_iter=self.max_iter, tol=self.tol,
                       init_max_iter=self.init_max_iter, init_sample_size=None,
                       generator=torch_generator(random_state), warm_params=start,
                       verbose=int(self.verbose), verbose_interval=self.verbose_interval,
                       loglik_offset=self._target_log_jacobian(prepared.state))
                for start in edit.starts
            ]  # fmt: skip
            return max(results, key=lambda r: r.objective)
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
        if getattr(self, "fit_method", "em") == "gradient":
            from moekit.fitting.gradient import run_gradient

            options = check_options(self.fit_options, GRADIENT_OPTIONS, "fit_options")
            return run_gradient(model, prepared.data, init=self.init, objective=self.objective,
                                **common, **options)  # fmt: skip
        if getattr(self, "fit_options", None):
            raise ValueError("fit_options are for fit_method='gradient'.")
        if getattr(self, "objective", "competitive") != "competitive":
            raise ValueError(
                "EM maximises the likelihood (objective='competitive'); the cooperative "
                "objective needs fit_method='gradient'."
            )
        extra = ()
        if parent is not None and not prepared.warm:
            extra = tuple(self._carried_over(model, parent, prepared))
        return run_em(model, prepared.data, init=self.init, init_max_iter=self.init_max_iter,
                      init_sample_size=self.init_sample_size, extra_starts=extra,
                      verbose_interval=self.verbose_interval,
                      loglik_offset=self._target_log_jacobian(prepared.state),
                      **common)  # fmt: skip

    def _carried_over(self, model: EMModel, parent: BaseMoE, prepared: _Prepared) -> list:
        """Starts from a fitted simpler model of the same data (see ``carry_over``)."""
        check_is_fitted(parent)
        same = type(parent) is type(self) and parent.n_features_in_ == prepared.state[
            "n_features_in_"
        ] and all(
            _same(getattr(parent, k, None), prepared.state.get(k))
            for k in ("_x_mean", "_x_scale", "_expert_cols", "_gate_cols", *self._coding_attrs)
        )  # fmt: skip
        if not same:
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

    def _fitted_state(self, model: EMModel, result: FitResult, prepared: _Prepared, coding,
                      frozen: tuple[int, ...] = ()):  # fmt: skip
        """The fitted attributes of a successful fit: parameters in documented order.

        ``frozen``: the experts (numbered as in the fit) that stay frozen after it.
        """
        expert, gate = model.expert, model.gate
        if self._order_by_mean:  # increasing mean prediction over the training inputs
            means, _ = expert.moments(result.params.expert, prepared.data.XeT)
            data = prepared.data
            mean = data.reduce(means[..., 0].sum(0)) / data.n_total  # over every process
            perm = torch.argsort(mean, stable=True)
        else:
            perm = torch.argsort(-result.nk, stable=True)
        if hasattr(gate, "representable_order"):  # a tree reorders children within nodes only
            perm = gate.representable_order(perm)
        params = Params(expert.select(result.params.expert, perm),
                        gate.select(result.params.gate, perm))  # fmt: skip
        nk = result.nk[perm]
        place = torch.argsort(perm)  # where each expert of the fit ends up
        frozen = tuple(sorted(int(place[k]) for k in frozen))
        jac = self._target_log_jacobian(coding)
        state = {
            "_expert_family": expert,
            "_gate_family": gate,
            "_params": params,
            "_n_experts_fitted": self.n_experts,
            "n_iter_": result.n_iter,
            "converged_": result.converged,
            "log_likelihood_": result.loglik + jac,
            "expert_sizes_": to_numpy(nk),
            "_n_optima": result.n_optima,
            "frozen_experts_": frozen,
            # a reference (not a copy) for summary(); dropped when pickled or saved, and
            # not kept by a data-parallel fit, whose rows are spread over processes
            "_summary_data": None if prepared.data.comm else (prepared.X, prepared.y),
        }
        if getattr(self, "objective", "competitive") == "cooperative":
            # the minimised loss is a squared error, not a log-likelihood: keep it apart
            state["loss_history_"] = list(result.history)
            state["log_likelihood_history_"] = [state["log_likelihood_"]]
        else:
            state["log_likelihood_history_"] = [h + jac for h in result.history]
        self._warn_collapsed(nk, expert.min_samples(result.params.expert))
        return state

    def summary(self, X=None, y=None, *, gate_reference: int = 0,
                information_rows: int | None = None):  # fmt: skip
        """Coefficients with standard errors, z-values and p-values.

        Standard errors come from the observed information, the negative Hessian
        of the log-likelihood at the fitted parameters (by torch autograd), as R's
        flexmix ``refit()`` gives them; see :mod:`moekit.estimators.inference` for
        the parametrisation (data units; gate relative to expert 0).

        Parameters
        ----------
        X, y : array-like, optional
            The data to compute the information on; by default the data of the last
            ``fit`` (not kept in pickles or model files).
        gate_reference : int, default=0
            The expert the gate's coefficients are relative to.
        information_rows : int, optional
            Estimate the observed information from this many random rows, scaled by
            n / m, where X has more (the note says so). The exact sum costs about as
            much as one pass over the data per parameter; for millions of rows an
            estimate from a few hundred thousand has a small Monte-Carlo error.
            Default: every row.

        Returns
        -------
        Summary
            ``.table`` is a pandas DataFrame; ``print(summary)`` shows the text form.
        """
        from moekit.estimators.inference import observed_information_summary

        check_is_fitted(self)
        if X is None or y is None:
            if getattr(self, "_summary_data", None) is None:
                raise ValueError(
                    "summary() needs X and y: the training data is not kept after pickling "
                    "or loading a model file, nor by a data-parallel fit (distributed=True), "
                    "whose standard errors summary(X, y) computes on the rows it is given."
                )
            X, y = self._held_rows()
        if information_rows is not None and (
            not isinstance(information_rows, int) or information_rows < 1
        ):
            raise ValueError(f"information_rows must be a positive int; got {information_rows!r}")
        return observed_information_summary(self, X, y, gate_reference, information_rows)

    def _held_rows(self):
        """The rows the model was fitted on, as the fit validated them, under their names.

        The fit keeps a reference to its validated X (no copy); a frame's column names
        are given back (again without a copy) so that its own checks see the frame
        it was fitted on.
        """
        X, y = self._summary_data
        names = getattr(self, "feature_names_in_", None)
        if names is not None and not hasattr(X, "columns"):
            import pandas as pd

            X = pd.DataFrame(X, columns=names, copy=False)
        return X, y

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_summary_data", None)
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

    # ------------------------------------------------------------------ design
    def _designs(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        Xt = _shared_tensor(X, self._x_mean.device)
        return _designs(Xt, vars(self))

    def _em_data(self, X, y) -> EMData:
        XeT, XgT = self._designs(X)
        y = self._check_target(
            np.asarray(y) if not hasattr(y, "iloc") else y.to_numpy(), vars(self)
        )
        if y.shape[0] != XeT.shape[1]:
            raise ValueError(
                f"X and y have inconsistent numbers of samples: {XeT.shape[1]} and {y.shape[0]}."
            )
        return EMData(XeT, XgT, self._encode_target(y, XeT.device, vars(self)))

    # ------------------------------------------------------------------ coefficients
    def _scatter(self, coef: np.ndarray, cols) -> np.ndarray:
        # slopes on selected, standardised columns -> one column per feature of X
        d = self.n_features_in_
        cols = np.arange(d) if cols is None else cols
        out = np.zeros((*coef.shape[:-1], d))
        out[..., cols] = coef / to_numpy(self._x_scale)[cols]
        return out

    def _shift(self, coef: np.ndarray, cols) -> np.ndarray:
        # what the centring of x adds to the intercept: -sum_j b_j mean_j / scale_j
        cols = np.arange(self.n_features_in_) if cols is None else cols
        ratio = to_numpy(self._x_mean / self._x_scale)[cols]
        return -(coef * ratio).sum(-1)

    @property
    def gate_coef_(self) -> np.ndarray:
        """Gate slopes V in g(x) = softmax(V x + v), shape (K, n_features).

        The softmax is unchanged by adding one vector to every row; the gate's
        penalty makes the slopes sum to zero over experts. Columns the gate does not
        see (``gate_features``) are zero, and so is everything for a constant gate.
        """
        gate = self._params.gate
        if not hasattr(gate, "coef"):
            return np.zeros((self._n_experts_fitted, self.n_features_in_))
        return self._scatter(to_numpy(gate.coef)[:, :-1], self._gate_cols)

    @property
    def gate_intercept_(self) -> np.ndarray:
        """Gate intercepts v, shape (K,), centred to sum to zero; log pi_k for a constant gate."""
        gate = self._params.gate
        if not hasattr(gate, "coef"):
            return to_numpy(gate.log_pi)
        coef = to_numpy(gate.coef)
        v = coef[:, -1] + self._shift(coef[:, :-1], self._gate_cols)
        return v - v.mean()

    # ------------------------------------------------------------------ queries
    def gate_weights(self, X) -> np.ndarray:
        """Gate weights g_k(x) of shape (n_samples, n_experts); rows sum to 1."""
        _, XgT = self._designs(X)
        return to_numpy(torch.exp(self._gate_family.log_weights(self._params.gate, XgT)).T)

    def _log_joint(self, X, y) -> torch.Tensor:
        data = self._em_data(X, y)
        chunk = Chunk(0, data.n, data)
        logp = self._expert_family.log_prob(self._params.expert, chunk)
        return logp + self._gate_family.log_weights(self._params.gate, data.XgT)  # (K, n)

    def responsibilities(self, X, y) -> np.ndarray:
        """Posterior p(z = k | x, y) of shape (n_samples, n_experts); rows sum to 1."""
        return to_numpy(torch.softmax(self._log_joint(X, y), dim=0).T)

    def log_likelihood_samples(self, X, y) -> np.ndarray:
        """Log-likelihood log p(y_i | x_i) of every row, shape (n_samples,).

        Rows go through in blocks of ``SCORE_BLOCK_ROWS``, so that the designs built
        for them never take more memory than a block's.
        """
        n = len(X) if hasattr(X, "__len__") else np.shape(X)[0]
        if n > SCORE_BLOCK_ROWS and np.ndim(X) == 2:
            return np.concatenate([
                self.log_likelihood_samples(_rows(X, slice(i, i + SCORE_BLOCK_ROWS)),
                                            _rows(y, slice(i, i + SCORE_BLOCK_ROWS)))
                for i in range(0, n, SCORE_BLOCK_ROWS)
            ])  # fmt: skip
        lse = torch.logsumexp(self._log_joint(X, y), dim=0)
        return to_numpy(lse) + self._target_log_jacobian(vars(self))

    def log_likelihood(self, X, y) -> float:
        """Mean per-sample log-likelihood, (1/n) sum_i log p(y_i | x_i)."""
        return float(np.mean(self.log_likelihood_samples(X, y)))

    def n_parameters(self) -> int:
        """Free parameters of the fitted model (experts and gate)."""
        check_is_fitted(self)
        return int(
            self._expert_family.n_parameters(self._params.expert)
            + self._gate_family.n_parameters(self._params.gate)
        )

    def bic(self, X, y) -> float:
        """Bayesian information criterion, -2 log L + n_parameters log n (lower is better)."""
        n = len(X)
        return -2.0 * n * self.log_likelihood(X, y) + self.n_parameters() * math.log(n)

    def aic(self, X, y) -> float:
        """Akaike information criterion, -2 log L + 2 n_parameters (lower is better)."""
        n = len(X)
        return -2.0 * n * self.log_likelihood(X, y) + 2.0 * self.n_parameters()


def _moments(Xt: torch.Tensor, comm: DataGroup | None, n: int):
    """Column means and standard deviations (n in the denominator) of all the rows.

    Data-parallel: two all-reduces, the sums and then the centred sums of squares,
    which round as one process's two-pass formula does.
    """
    if comm is None:
        return Xt.mean(0), Xt.std(0, correction=0)
    Xt = Xt.to(comm.device)
    mean = comm.sum(Xt.sum(0)) / n
    return mean.cpu(), torch.sqrt(comm.sum(((Xt - mean) ** 2).sum(0)) / n).cpu()


def _shared_tensor(X: np.ndarray, device=None) -> torch.Tensor:
    """X as an EM_DTYPE tensor that shares X's memory where it can, read-only or not.

    A pandas frame's values are a read-only view (copy-on-write), and the designs only
    read X: copying it to make it writable would add the whole data to a fit's peak.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.as_tensor(X, dtype=EM_DTYPE, device=device)


def _designs(Xt: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert and gate designs (p + 1, n): standardised selected columns, then ones.

    Each design is written in place into its one (p + 1, n) tensor, so that building
    it takes no more memory than the design itself (no standardised copy of X, no
    concatenation, no transposed copy): at a million rows that is hundreds of MB.
    """
    n, d = Xt.shape
    mean, scale = state["_x_mean"], state["_x_scale"]

    def design(cols):
        idx = torch.arange(d, device=Xt.device) if cols is None else torch.as_tensor(
            cols, device=Xt.device)  # fmt: skip
        out = torch.empty((len(idx) + 1, n), dtype=Xt.dtype, device=Xt.device)
        for row, j in enumerate(idx.tolist()):  # column by column: X may be C-ordered
            torch.sub(Xt[:, j], mean[j], out=out[row]).div_(scale[j])
        out[-1] = 1.0
        return out

    e, g = state["_expert_cols"], state["_gate_cols"]
    XeT = design(e)
    same = (e is None and g is None) or (e is not None and g is not None and np.array_equal(e, g))
    return XeT, XeT if same else design(g)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a.cpu(), torch.as_tensor(b).cpu()))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))
