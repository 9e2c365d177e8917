"""MDNRegressor: the mixture density network of Bishop (1994).

A neural network maps x to the parameters of a Gaussian mixture over y,

.. math::  p(y \\mid x) = \\sum_{k=1}^K \\pi_k(x) \\prod_{j=1}^m
           N\\big(y_j; \\mu_{kj}(x), \\sigma_{kj}(x)^2\\big),

with pi(x) = softmax(a(x)), mu(x) linear outputs and sigma(x) = softplus(s(x)) + a
floor, and is trained by minimising the negative log-likelihood with Adam on
mini-batches. Unlike the EM-fitted MoE, gate and experts here are one network.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit._core.engine import resolve_device, to_numpy, torch_generator
from moekit._core.validation import Interval, Options, validate_params
from moekit.estimators._files import (
    bool_setting,
    check_values,
    feature_names,
    int_setting,
    real_setting,
    reals_setting,
)
from moekit.estimators._params import DeclaredParams
from moekit.fitting.mdn import (
    ACTIVATIONS,
    TRAIN_SETTINGS,
    _init_weights,
    _MDNNet,
    _standardiser,
    mdn_log_prob,
    mdn_param_shapes,
    mdn_split,
    train_mdn,
)
from moekit.io import register_model
from moekit.prediction import MixturePrediction

__all__ = ["MDNRegressor", "mdn_log_prob"]

# fitted attributes stored as JSON in model files (all plain numbers and lists)
_FITTED = ("n_features_in_", "n_iter_", "converged_", "log_likelihood_",
           "log_likelihood_history_", "validation_scores_", "best_validation_score_")  # fmt: skip
TRAIN_DTYPE = torch.float32
PREDICT_DTYPE = torch.float64


class _LayerSizes:
    """Constraint: a non-empty tuple or list of positive ints."""

    def is_satisfied_by(self, value) -> bool:
        ok = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1  # noqa: E731
        return isinstance(value, (tuple, list)) and len(value) > 0 and all(map(ok, value))

    def __str__(self) -> str:
        return "a non-empty tuple of positive ints"


@register_model
class MDNRegressor(RegressorMixin, DeclaredParams, BaseEstimator):
    """Mixture density network (Bishop 1994) for multimodal regression.

    A multilayer perceptron outputs, for every x, the weights pi_k(x), means
    mu_k(x) and diagonal scales sigma_k(x) of a K-component Gaussian mixture over
    y, trained by minimising the mean negative log-likelihood

    .. math::  L = -\\frac{1}{n} \\sum_i \\log \\sum_k \\pi_k(x_i)
               N(y_i; \\mu_k(x_i), \\operatorname{diag} \\sigma_k(x_i)^2)

    with Adam on mini-batches. Inputs and targets are standardised inside; every
    output (predictions, densities, log-likelihoods) is in the user's units. Use it
    where one x admits several y (inverse problems): the mixture keeps every branch
    where a mean regressor would average them.

    Parameters
    ----------
    n_components : int, default=5
        Number of mixture components K.
    hidden_layer_sizes : tuple of int, default=(64, 64)
        Width of each hidden layer.
    activation : {'tanh', 'relu'}, default='tanh'
    learning_rate : float, default=1e-3
        Adam's step size.
    batch_size : int, default=128
        Rows per mini-batch (capped at the training rows).
    max_iter : int, default=1000
        Most epochs (passes over the training rows).
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the rows, stop when their negative
        log-likelihood has not improved by ``tol`` for ``n_iter_no_change`` epochs,
        and keep the weights of the best epoch. If False, the same rule is applied
        to the training loss and every row is used for training.
    validation_fraction : float, default=0.1
    n_iter_no_change : int, default=30
    tol : float, default=1e-4
        Smallest improvement of the mean negative log-likelihood that counts.
    weight_decay : float, default=0.0
        L2 penalty (Adam's weight decay) on the network's weights.
    min_std : float, default=1e-3
        Floor of every component's standard deviation, as a fraction of the
        target's standard deviation.
    random_state : int, RandomState or None, default=None
        Seeds the weights, the validation split and the batch order: the same seed
        gives the same model on the CPU.
    verbose : int, default=0
        1 or more: a progress bar over epochs with the current losses.
    device : str, default='cpu'

    Attributes
    ----------
    n_iter_ : int
        Epochs run.
    converged_ : bool
        Whether training stopped on the ``n_iter_no_change`` rule, not ``max_iter``.
    log_likelihood_ : float
        Mean log-likelihood of the training data (user's units) at the kept weights.
    log_likelihood_history_ : list of float
        Mean training log-likelihood of every epoch, averaged over its batches.
    validation_scores_ : list of float or None
        Mean held-out log-likelihood after every epoch (early stopping only).
    best_validation_score_ : float or None
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Only when X had string column names.

    Notes
    -----
    Training runs in float32, the usual precision of neural networks: with
    standardised data, log-sum-exp and a floor on the scales the loss is well
    conditioned, mini-batch noise dwarfs float32 rounding, and float32 is the fast
    path on GPUs and for wide layers on CPUs. The trained weights are then cast to
    float64 (exactly), so that predictions and likelihoods have the precision of the
    rest of moekit and do not depend on how rows are batched.

    References
    ----------
    Bishop (1994), Mixture density networks, Aston University NCRG/94/004.

    Examples
    --------
    >>> from moekit import MDNRegressor
    >>> from moekit.datasets import make_bishop_inverse
    >>> prob = make_bishop_inverse(500, random_state=0)
    >>> mdn = MDNRegressor(3, hidden_layer_sizes=(16,), max_iter=30, random_state=0)
    >>> d = mdn.fit(prob.X, prob.y).predict_distribution([[0.5]])
    >>> d.weights.shape
    (1, 3)
    """

    _parameter_constraints: ClassVar[dict] = {
        "n_components": [Interval(numbers.Integral, 1, None, closed="left")],
        "hidden_layer_sizes": [_LayerSizes()],
        "activation": [Options(ACTIVATIONS)],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
        "min_std": [Interval(numbers.Real, 0, None, closed="neither")],
        "random_state": ["random_state"],
        "verbose": [Interval(numbers.Integral, 0, None, closed="left"), "boolean"],
        "device": [str, torch.device],
    }

    _defaults: ClassVar[dict] = {
        "n_components": 5,
        "hidden_layer_sizes": (64, 64),
        "activation": "tanh",
        "learning_rate": 1e-3,
        "batch_size": 128,
        "max_iter": 1000,
        "early_stopping": True,
        "validation_fraction": 0.1,
        "n_iter_no_change": 30,
        "tol": 1e-4,
        "weight_decay": 0.0,
        "min_std": 1e-3,
        "random_state": None,
        "verbose": 0,
        "device": "cpu",
    }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, X, y) -> MDNRegressor:
        """Train the network on (X, y).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self
        """
        validate_params(
            type(self).__name__, self.get_params(deep=False), self._parameter_constraints
        )
        X, y = validate_data(
            self, X, y, dtype=np.float64, multi_output=True, y_numeric=True, ensure_min_samples=2
        )
        device = resolve_device(self.device)
        y_2d = np.ndim(y) == 2
        y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        n, m, K = X.shape[0], y2.shape[1], self.n_components
        x_mean, x_scale = _standardiser(X)
        y_mean, y_scale = _standardiser(y2)
        gen = torch_generator(self.random_state)
        Z = torch.as_tensor((X - x_mean) / x_scale, dtype=TRAIN_DTYPE)
        T = torch.as_tensor((y2 - y_mean) / y_scale, dtype=TRAIN_DTYPE)
        perm = torch.randperm(n, generator=gen)
        n_val = (
            min(max(1, round(self.validation_fraction * n)), n - 1) if self.early_stopping else 0
        )
        val, train = perm[:n_val], perm[n_val:]
        net = _MDNNet(X.shape[1], tuple(self.hidden_layer_sizes), self.activation, K * (1 + 2 * m))
        _init_weights(net, T[train], K, m, self.min_std, gen)
        net = net.to(device=device, dtype=TRAIN_DTYPE)
        Z, T = Z.to(device), T.to(device)
        settings = {k: getattr(self, k) for k in TRAIN_SETTINGS}
        history, val_scores, n_iter, converged = train_mdn(
            net, Z, T, train, val, K, m, gen, **settings
        )

        # fitted state: only now, so that a failed fit leaves nothing half-set
        self._net = net.to(dtype=PREDICT_DTYPE).eval()
        self._x_mean, self._x_scale = x_mean, x_scale
        self._y_mean, self._y_scale, self._y_2d = y_mean, y_scale, y_2d
        self._n_outputs = m
        jac = -float(np.log(y_scale).sum())
        self.n_iter_, self.converged_ = n_iter, converged
        self.log_likelihood_history_ = [h + jac for h in history]
        self.validation_scores_ = [v + jac for v in val_scores] if val_scores else None
        self.best_validation_score_ = max(self.validation_scores_) if val_scores else None
        # on the validated arrays: no second validation, no feature-name warning
        self.log_likelihood_ = float(np.mean(self._log_density(*self._mixture_of_array(X), y2)))
        return self

    # ------------------------------------------------------------------ queries
    def _mixture(self, X) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log pi (n, K), mu and sigma (n, K, m), in standardised units, float64."""
        check_is_fitted(self)
        return self._mixture_of_array(validate_data(self, X, reset=False, dtype=np.float64))

    def _mixture_of_array(self, X: np.ndarray):
        dev = next(self._net.parameters()).device
        Z = torch.as_tensor((X - self._x_mean) / self._x_scale, dtype=PREDICT_DTYPE, device=dev)
        with torch.no_grad():
            return mdn_split(self._net(Z), self.n_components, self._n_outputs, self.min_std)

    def predict_distribution(self, X) -> MixturePrediction:
        """The predictive mixture p(y | x) of every row, in the user's units."""
        log_pi, mu, sigma = self._mixture(X)
        w = to_numpy(torch.exp(log_pi))
        means = to_numpy(mu) * self._y_scale + self._y_mean
        stds = to_numpy(sigma) * self._y_scale
        if not self._y_2d:
            means, stds = means[..., 0], stds[..., 0]
        return MixturePrediction(w / w.sum(1, keepdims=True), means, stds)

    def predict(self, X) -> np.ndarray:
        """Conditional mean E[y | x] = sum_k pi_k(x) mu_k(x).

        For a multimodal p(y | x) this average may be no valid answer; see
        :meth:`predict_distribution` and its ``modes`` and ``sample``.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        return self.predict_distribution(X).mean()

    def log_likelihood_samples(self, X, y) -> np.ndarray:
        """log p(y_i | x_i) of every row in the user's units, shape (n_samples,)."""
        log_pi, mu, sigma = self._mixture(X)
        return self._log_density(log_pi, mu, sigma, self._check_target(y, mu.shape[0]))

    def _log_density(self, log_pi, mu, sigma, y2: np.ndarray) -> np.ndarray:
        T = torch.as_tensor((y2 - self._y_mean) / self._y_scale, dtype=mu.dtype, device=mu.device)
        # the density of y = y_mean + y_scale * t is that of t divided by prod(y_scale)
        return to_numpy(mdn_log_prob(log_pi, mu, sigma, T)) - float(np.log(self._y_scale).sum())

    def log_likelihood(self, X, y) -> float:
        """Mean per-sample log-likelihood, (1/n) sum_i log p(y_i | x_i), in the user's units."""
        return float(np.mean(self.log_likelihood_samples(X, y)))

    def _check_target(self, y, n: int) -> np.ndarray:
        y = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y, dtype=np.float64)
        m = self._n_outputs
        if y.ndim == 1 and m == 1:
            y = y.reshape(-1, 1)
        if y.ndim != 2 or y.shape != (n, m):
            raise ValueError(
                f"y must have shape ({n},{' ' + str(m) if m > 1 else ''}) for {n} rows of X "
                f"and {m} output(s); got an array of shape {y.shape}."
            )
        if not np.isfinite(y).all():
            raise ValueError("Input y contains NaN or infinity.")
        return y

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the fitted model to ``path`` (safetensors + JSON, no pickle)."""
        from moekit.io import save_model

        check_is_fitted(self)
        save_model(self, path)

    def _to_state(self) -> tuple[dict, dict, dict]:
        params = self.get_params(deep=False)
        params["hidden_layer_sizes"] = [int(h) for h in params["hidden_layer_sizes"]]
        if not isinstance(params["random_state"], (int, type(None))):
            params["random_state"] = None
        params["device"] = str(params["device"])
        state = {name: getattr(self, name) for name in _FITTED}
        state.update(n_outputs=int(self._n_outputs), y_2d=bool(self._y_2d))
        if hasattr(self, "feature_names_in_"):
            state["feature_names_in_"] = [str(v) for v in self.feature_names_in_]
        tensors = {f"net.{k}": v for k, v in self._net.state_dict().items()}
        for name in ("x_mean", "x_scale", "y_mean", "y_scale"):
            tensors[name] = torch.as_tensor(getattr(self, "_" + name))
        return params, state, tensors

    @classmethod
    def _from_state(cls, params: dict, state: dict, tensors) -> MDNRegressor:
        if isinstance(params.get("hidden_layer_sizes"), list):
            params = {**params, "hidden_layer_sizes": tuple(params["hidden_layer_sizes"])}
        model = cls(**params)
        validate_params(cls.__name__, model.get_params(deep=False), cls._parameter_constraints)
        # settings first: every expected shape follows from them
        d = model.n_features_in_ = int_setting(state, "n_features_in_", 1)
        m = int_setting(state, "n_outputs", 1)
        y_2d = bool_setting(state, "y_2d")
        if not y_2d and m != 1:
            raise ValueError(f"setting 'y_2d' is false (a 1-d target), but n_outputs={m}")
        names = feature_names(state, d)
        if names is not None:
            model.feature_names_in_ = names
        model.n_iter_ = int_setting(state, "n_iter_")
        model.converged_ = bool_setting(state, "converged_")
        model.log_likelihood_ = real_setting(state, "log_likelihood_")
        model.log_likelihood_history_ = reals_setting(state, "log_likelihood_history_")
        model.validation_scores_ = reals_setting(state, "validation_scores_", optional=True)
        model.best_validation_score_ = real_setting(state, "best_validation_score_", optional=True)

        # every tensor's dtype and shape, before any is read or a layer allocated
        K, hidden = model.n_components, model.hidden_layer_sizes
        shapes = {"x_mean": (d,), "x_scale": (d,), "y_mean": (m,), "y_scale": (m,)}
        net_shapes = mdn_param_shapes(d, hidden, K * (1 + 2 * m))
        shapes.update({f"net.{k}": s for k, s in net_shapes.items()})
        tensors.check_names(shapes)
        why = f"n_features_in_={d}, n_outputs={m}, n_components={K}, hidden_layer_sizes={hidden}"
        for name, shape in shapes.items():
            tensors.check(name, shape, why=why)
        values = {name: tensors[name] for name in shapes}
        for name, t in values.items():
            check_values(name, t, positive=name in ("x_scale", "y_scale"))
        for name in ("x_mean", "x_scale", "y_mean", "y_scale"):
            setattr(model, "_" + name, to_numpy(values[name]))
        with torch.device("meta"):  # no weights drawn: the file's are assigned
            net = _MDNNet(d, hidden, model.activation, K * (1 + 2 * m))
        net.load_state_dict({k: values[f"net.{k}"] for k in net_shapes}, assign=True)
        device = resolve_device(model.device if torch.cuda.is_available() else "cpu")
        model._net = net.to(device=device, dtype=PREDICT_DTYPE).eval()
        model._n_outputs, model._y_2d = m, y_2d
        return model
