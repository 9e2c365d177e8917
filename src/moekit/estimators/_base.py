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
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit._core.data import Chunk, EMData
from moekit._core.engine import EM_DTYPE, resolve_device, to_numpy, torch_generator
from moekit._core.validation import (
    HasMethods,
    Interval,
    Options,
    check_options,
    validate_params,
)
from moekit.estimators._columns import resolve_columns
from moekit.estimators._files import ModelFileMixin
from moekit.fitting.em import EMModel, Params, run_em
from moekit.fitting.init import kmeans_resp, random_resp
from moekit.gates.constant import ConstantGate
from moekit.gates.mlp import MLPGate
from moekit.gates.softmax import SoftmaxGate

GATES = {"softmax": SoftmaxGate, "constant": ConstantGate, "mlp": MLPGate}
GRADIENT_OPTIONS = {"optimizer": "lbfgs", "learning_rate": None, "batch_size": None}


class CollapsedExpertWarning(UserWarning):
    """An expert ended the fit with fewer effective samples than parameters."""


class BaseMoE(ModelFileMixin, BaseEstimator):
    """Shared machinery of the EM-fitted estimators (not for direct use)."""

    _parameter_constraints: ClassVar[dict] = {
        "n_experts": [Interval(numbers.Integral, 1, None, closed="left")],
        "gate": [Options(GATES), HasMethods(("log_prob", "m_step", "log_weights"))],
        "init": [Options({"kmeans", "random"})],
        "n_init": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "init_max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "init_sample_size": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "gate_alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "random_state": ["random_state"],
        "verbose": [Interval(numbers.Integral, 0, None, closed="left"), "boolean"],
        "verbose_interval": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "expert_features": [None, "array-like"],
        "gate_features": [None, "array-like"],
        "expert_options": [None, dict],
        "gate_options": [None, dict],
    }

    # ------------------------------------------------------------------ hooks
    def _validate_xy(self, X, y) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _check_target(self, y) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode_target(self, y: np.ndarray, device, fitted: bool = False) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _make_expert(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _target_log_jacobian(self) -> float:
        """log |d y_encoded / d y| per row: converts likelihoods to the user's units."""
        return 0.0

    def _kmeans_target(self, data: EMData) -> torch.Tensor | None:
        return None

    # ------------------------------------------------------------------ fit
    def _validate_params(self) -> None:
        validate_params(
            type(self).__name__, self.get_params(deep=False), self._parameter_constraints
        )

    def _make_gate(self):
        if not isinstance(self.gate, str):
            return self.gate
        if self.gate == "mlp":
            return MLPGate(self.n_experts, seed=self._seed, options=self.gate_options)
        if self.gate_options:
            raise ValueError(f"gate_options are for gate='mlp'; got gate={self.gate!r}.")
        if self.gate == "softmax":
            return SoftmaxGate(self.n_experts, alpha=self.gate_alpha)
        return GATES[self.gate](self.n_experts)

    def _fit(self, X, y) -> BaseMoE:
        self._validate_params()
        X, y = self._validate_xy(X, y)
        self._summary_data = None
        # seeds the random initial weights of neural experts and gates
        self._seed = int(
            torch.randint(0, 2**31 - 1, (1,), generator=torch_generator(self.random_state))
        )
        n = X.shape[0]
        if n < self.n_experts:
            raise ValueError(
                f"Expected n_samples >= n_experts but got n_experts = {self.n_experts}, "
                f"n_samples = {n}."
            )
        device = resolve_device(self.device)
        warm = (
            self.warm_start
            and hasattr(self, "_params")
            and self._params.gate is not None
            and self._n_experts_fitted == self.n_experts
        )
        Xt = torch.as_tensor(np.require(X, requirements="W"), dtype=EM_DTYPE, device=device)
        if not warm:
            mean = Xt.mean(0)
            scale = Xt.std(0, correction=0)
            self._x_mean = mean
            self._x_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if not warm:
            self._expert_cols = self._resolve_columns(self.expert_features, "expert_features")
            self._gate_cols = self._resolve_columns(self.gate_features, "gate_features")
        XeT, XgT = self._designs_from_tensor(Xt)
        data = EMData(XeT, XgT, self._encode_target(y, device))
        expert = self._make_expert()
        gate = self._make_gate()
        model = EMModel(expert, gate)
        K = self.n_experts
        generator = torch_generator(self.random_state)

        def init_resp(d: EMData, gen: torch.Generator) -> torch.Tensor:
            if self.init == "random":
                return random_resp(d, K, gen)
            return kmeans_resp(d, K, gen, target=self._kmeans_target(d))

        common = {
            "init_resp": init_resp,
            "n_init": 1 if warm else self.n_init,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "generator": generator,
            "warm_params": self._params if warm else None,
            "verbose": int(self.verbose),
        }
        if getattr(self, "fit_method", "em") == "gradient":
            from moekit.fitting.gradient import EXPERT_VIEWS, GATE_VIEWS, run_gradient

            if not (
                isinstance(expert, tuple(EXPERT_VIEWS)) and isinstance(gate, tuple(GATE_VIEWS))
            ):
                names = lambda table: ", ".join(k.__name__ for k in table)  # noqa: E731
                raise ValueError(
                    f"fit_method='gradient' has no differentiable form of expert={self.expert!r} "
                    f"or gate={self.gate!r}; it fits {names(EXPERT_VIEWS)} experts with "
                    f"{names(GATE_VIEWS)} gates."
                )

            options = check_options(self.fit_options, GRADIENT_OPTIONS, "fit_options")
            result = run_gradient(model, data, objective=self.objective, **common, **options)
        else:
            if getattr(self, "fit_options", None):
                raise ValueError("fit_options are for fit_method='gradient'.")
            if getattr(self, "objective", "competitive") != "competitive":
                raise ValueError(
                    "EM maximises the likelihood (objective='competitive'); the cooperative "
                    "objective needs fit_method='gradient'."
                )
            result = run_em(
                model,
                data,
                init_max_iter=self.init_max_iter,
                init_sample_size=self.init_sample_size,
                verbose_interval=self.verbose_interval,
                **common,
            )
        self._expert_family, self._gate_family = expert, gate
        perm = self._expert_order(result.params, data, result.nk)
        self._params = Params(
            expert.permute(result.params.expert, perm), gate.permute(result.params.gate, perm)
        )
        result.nk = result.nk[perm]
        self._n_experts_fitted = K
        jac = self._target_log_jacobian()
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        self.log_likelihood_ = result.loglik + jac
        if getattr(self, "objective", "competitive") == "cooperative":
            # the minimised loss is a squared error, not a log-likelihood: keep it apart
            self.loss_history_ = list(result.history)
            self.log_likelihood_history_ = [self.log_likelihood_]
        else:
            self.log_likelihood_history_ = [h + jac for h in result.history]
        self.expert_sizes_ = to_numpy(result.nk)
        self._warn_collapsed(result.nk, expert.min_samples(result.params.expert))
        # a reference (not a copy) for summary(); dropped when pickled or saved
        self._summary_data = (X, y)
        return self

    def summary(self, X=None, y=None, *, gate_reference: int = 0):
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
                    "or loading a model file."
                )
            X, y = self._summary_data
        return observed_information_summary(self, X, y, gate_reference)

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

    def _expert_order(self, params: Params, data: EMData, nk: torch.Tensor) -> torch.Tensor:
        """Permutation that numbers the experts in their documented order."""
        return torch.argsort(-nk, stable=True)

    # ------------------------------------------------------------------ design
    def _resolve_columns(self, spec, name: str) -> np.ndarray | None:
        return resolve_columns(spec, name, self.n_features_in_,
                               getattr(self, "feature_names_in_", None))  # fmt: skip

    def _designs_from_tensor(self, Xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert and gate designs (p + 1, n): standardised selected columns, then ones."""
        Z = (Xt - self._x_mean) / self._x_scale
        ones = torch.ones((Z.shape[0], 1), dtype=Z.dtype, device=Z.device)

        def design(cols):
            sel = Z if cols is None else Z[:, torch.as_tensor(cols, device=Z.device)]
            return torch.cat([sel, ones], 1).T.contiguous()

        e, g = self._expert_cols, self._gate_cols
        XeT = design(e)
        same = (e is None and g is None) or (
            e is not None and g is not None and np.array_equal(e, g)
        )
        return XeT, XeT if same else design(g)

    def _designs(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._designs_from_tensor(
            torch.as_tensor(
                np.require(X, requirements="W"), dtype=EM_DTYPE, device=self._x_mean.device
            )
        )

    def _em_data(self, X, y) -> EMData:
        XeT, XgT = self._designs(X)
        y = self._check_target(np.asarray(y) if not hasattr(y, "iloc") else y.to_numpy())
        if y.shape[0] != XeT.shape[1]:
            raise ValueError(
                f"X and y have inconsistent numbers of samples: {XeT.shape[1]} and {y.shape[0]}."
            )
        return EMData(XeT, XgT, self._encode_target(y, XeT.device, fitted=True))

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
        """Log-likelihood log p(y_i | x_i) of every row, shape (n_samples,)."""
        lse = torch.logsumexp(self._log_joint(X, y), dim=0)
        return to_numpy(lse) + self._target_log_jacobian()

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
