"""Multinomial-logistic experts: p_k(y = c | x) = softmax(W_k x)_c.

The M-step maximises, for every expert at once,

.. math::  Q(W) = \\sum_k \\sum_i r_{ik} \\log \\operatorname{softmax}(W_k x_i)_{y_i}
                 - \\frac{\\alpha}{2} \\sum_k \\lVert W_{k,\\text{slopes}} \\rVert^2,

a concave function, with L-BFGS (strong-Wolfe line search) started from the
current parameters. A few iterations per EM step suffice (generalised EM); a step
that would not increase Q is refused, so the EM objective never decreases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.optim import lbfgs_minimise
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data


@dataclass
class LogisticParams:
    """coef of shape (K, C, p): class scores per expert, last column the intercept."""

    coef: torch.Tensor


class LogisticExperts:
    """K multinomial-logistic experts over C classes.

    Parameters
    ----------
    n_experts : int
    n_classes : int
    alpha : float
        L2 penalty on the slopes, on the scale of the summed log-likelihood (as
        scikit-learn's ``1 / C``).
    max_iter : int
        L-BFGS iterations per M-step (the first M-step uses five times as many).
    """

    report_name = "multinomial logistic"
    monotone = True
    needs_resp = True
    params_type = LogisticParams

    def __init__(self, n_experts: int, n_classes: int, alpha: float = 1.0, max_iter: int = 10):
        self.n_experts = n_experts
        self.n_classes = n_classes
        self.alpha = alpha
        self.max_iter = max_iter

    def prepare(self, data: EMData) -> None:
        pass

    def _log_probs(self, coef: torch.Tensor, XT: torch.Tensor) -> torch.Tensor:
        K, C, p = coef.shape
        logits = (coef.reshape(K * C, p) @ XT).reshape(K, C, -1)  # (K, C, n)
        return torch.log_softmax(logits, dim=1)

    def log_prob(self, params: LogisticParams, chunk: Chunk) -> torch.Tensor:
        logp = self._log_probs(params.coef, chunk.XeT)  # (K, C, c)
        idx = chunk.y.view(1, 1, -1).expand(self.n_experts, 1, -1)
        return logp.gather(1, idx).squeeze(1)  # (K, c)

    def class_probs(self, params: LogisticParams, XT: torch.Tensor) -> torch.Tensor:
        """p_k(y = c | x) of shape (K, C, n)."""
        return torch.exp(self._log_probs(params.coef, XT))

    def chunk_stats(self, params, chunk, resp):
        return None

    def _penalty(self, coef: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.alpha * (coef[..., :-1] ** 2).sum()

    def _objective(self, coef: torch.Tensor, data: EMData, resp: torch.Tensor) -> torch.Tensor:
        # negative Q, divided by n so that L-BFGS's tolerances do not depend on n
        logp = self._log_probs(coef, data.XeT)
        idx = data.y.view(1, 1, -1).expand(self.n_experts, 1, -1)
        ll = (resp * logp.gather(1, idx).squeeze(1)).sum()
        return -(ll - self._penalty(coef)) / data.n

    def m_step(self, params, stats, data: EMData, resp: torch.Tensor) -> LogisticParams:
        p = data.XeT.shape[0]
        if params is None:
            start = data.XeT.new_zeros((self.n_experts, self.n_classes, p))
            iters = 5 * self.max_iter
        else:
            start, iters = params.coef, self.max_iter
        resp = resp.detach()
        (coef,) = lbfgs_minimise((start,), lambda c: self._objective(c, data, resp), iters)
        with torch.no_grad():
            before = float(self._objective(start, data, resp))
            after = float(self._objective(coef, data, resp))
        if not after <= before:  # also refuses NaN
            return LogisticParams(start)
        return LogisticParams(coef)

    def select(self, params: LogisticParams, perm: torch.Tensor) -> LogisticParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return LogisticParams(params.coef[perm].contiguous())

    def residuals(self, params: LogisticParams, chunk: Chunk) -> torch.Tensor:
        """Residuals onehot(y) - p_k(. | x) of the class probabilities, shape (K, C, c)."""
        probs = torch.exp(self._log_probs(params.coef, chunk.XeT))
        onehot = torch.nn.functional.one_hot(chunk.y, self.n_classes).T.to(probs.dtype)
        return onehot.unsqueeze(0) - probs

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: LogisticParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef}

    def from_free(self, free: dict[str, torch.Tensor]) -> LogisticParams:
        return LogisticParams(free["coef"])

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        logp = self._log_probs(free["coef"], XT)  # (K, C, n)
        return logp.gather(1, y.view(1, 1, -1).expand(self.n_experts, 1, -1)).squeeze(1)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return -self._penalty(free["coef"])

    # ------------------------------------------------------------ reporting
    def report(self, params: LogisticParams, scaling: Scaling) -> Report:
        """Per expert, the scores of classes 1..C-1 against class 0 in the data's units."""
        rel = params.coef[:, 1:] - params.coef[:, :1]  # (K, C-1, p)
        labels = coef_labels(scaling)
        names = scaling.output_names
        out = Report()
        out.add("logit", coef_to_data(rel, scaling),
                [f"expert {k}" for k in range(self.n_experts) for _ in names[1:] for _ in labels],
                [f"[{c} vs {names[0]}] {nm}" for _ in range(self.n_experts) for c in names[1:]
                 for nm in labels])  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        rel = coef_from_data(values["logit"], scaling)  # (K, C-1, p)
        return {"coef": torch.cat([torch.zeros_like(rel[:, :1]), rel], 1)}

    def log_prior(self, params: LogisticParams) -> float:
        return -float(self._penalty(params.coef))

    def min_samples(self, params: LogisticParams) -> float:
        """Penalised experts stay defined on few samples; below one, they are unused."""
        return 1.0

    def n_parameters(self, params: LogisticParams) -> int:
        K, C, p = params.coef.shape
        return K * (C - 1) * p

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`LogisticParams` fields for a design of p columns."""
        return {"coef": (self.n_experts, self.n_classes, p)}

    def check_params(self, params: LogisticParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients (ValueError naming the field)."""
        if not bool(torch.isfinite(params.coef).all()):
            raise ValueError(f"{prefix + 'coef'!r} holds NaN or infinite values")
