"""Neural experts: y | x, z = k ~ N(f_k(x), diag sigma_k^2), f_k a one-hidden-layer MLP.

The K networks are one batched bank, f_k(x) = W2_k^T tanh(W1_k^T x + b1_k) + b2_k,
evaluated together. Their M-step cannot be solved in closed form: it takes a few
L-BFGS steps (strong-Wolfe line search) on each expert's weighted squared error,
then sets sigma_k^2 to the weighted mean squared residual (exact given f_k). This is
a generalised EM step; an expert whose expected log-likelihood

.. math::  Q_k = \\sum_i r_{ik} \\log N(y_i; f_k(x_i), \\sigma_k^2) - \\frac{\\lambda}{2}
                 \\lVert W_k \\rVert^2

did not increase keeps its old parameters, so the likelihood never decreases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.logspace import gaussian_logpdf
from moekit._core.optim import lbfgs_minimise
from moekit._core.validation import check_finite, check_options
from moekit.experts.gaussian import log_excess_var

DEFAULTS = {"hidden": 16, "steps": 20, "weight_decay": 1e-4}


@dataclass
class MLPParams:
    """w1 (K, p, h), b1 (K, h), w2 (K, h, m), b2 (K, m), var (K, m)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    var: torch.Tensor


def mlp_forward(w1, b1, w2, b2, XT: torch.Tensor) -> torch.Tensor:
    """Outputs of the K networks for a design XT (p, c): shape (K, m, c)."""
    hidden = torch.tanh(torch.einsum("kph,pc->khc", w1, XT) + b1.unsqueeze(-1))  # (K, h, c)
    return torch.einsum("khm,khc->kmc", w2, hidden) + b2.unsqueeze(-1)


class MLPExperts:
    """K one-hidden-layer networks with Gaussian noise.

    Parameters
    ----------
    n_experts : int
    n_outputs : int
    var_floor : float
    seed : int
        Seeds the initial weights.
    options : dict, optional
        ``hidden`` (units, default 16), ``steps`` (L-BFGS iterations per M-step,
        default 20) and ``weight_decay`` (L2 penalty on the weights, default 1e-4, on
        the summed log-likelihood scale).
    """

    monotone = True  # each expert's step is kept only if it increased Q_k
    needs_resp = True
    params_type = MLPParams
    predictive_family = "normal"
    standardize_target = True

    def __init__(
        self,
        n_experts: int,
        n_outputs: int,
        var_floor: float,
        seed: int = 0,
        options: dict | None = None,
    ) -> None:
        self.n_experts = n_experts
        self.n_outputs = n_outputs
        self.var_floor = var_floor
        self.seed = seed
        self.options = check_options(options, DEFAULTS, "expert_options for expert='mlp'")

    def prepare(self, data: EMData) -> None:
        pass

    def init_params(self, data: EMData) -> MLPParams:
        K, m, p, h = self.n_experts, self.n_outputs, data.XeT.shape[0], self.options["hidden"]
        gen = torch.Generator().manual_seed(self.seed)
        kw = {"generator": gen, "dtype": data.XeT.dtype}
        w1 = torch.randn((K, p, h), **kw) * (1.0 / math.sqrt(p))
        w2 = torch.randn((K, h, m), **kw) * (0.1 / math.sqrt(h))
        z = data.XeT.new_zeros
        dev = data.XeT.device
        return MLPParams(w1.to(dev), z((K, h)), w2.to(dev), z((K, m)), z((K, m)) + 1.0)

    def _log_prob(self, params: MLPParams, XT, y) -> torch.Tensor:
        f = mlp_forward(params.w1, params.b1, params.w2, params.b2, XT)  # (K, m, c)
        return gaussian_logpdf(y.unsqueeze(0) - f, params.var.unsqueeze(-1)).sum(1)

    def log_prob(self, params: MLPParams, chunk: Chunk) -> torch.Tensor:
        return self._log_prob(params, chunk.XeT, chunk.y)

    def chunk_stats(self, params, chunk, resp):
        return None

    def _q(self, p: MLPParams, data: EMData, resp: torch.Tensor) -> torch.Tensor:
        """Per-expert Q_k (K,), penalties included."""
        lp = self._log_prob(p, data.XeT, data.y)  # (K, n)
        return (resp * lp).sum(1) - 0.5 * self.options["weight_decay"] * self._sq(p)

    @staticmethod
    def _sq(p: MLPParams) -> torch.Tensor:
        return (p.w1**2).sum((1, 2)) + (p.w2**2).sum((1, 2))

    def m_step(self, params, stats, data: EMData, resp: torch.Tensor) -> MLPParams:
        first = params is None
        old = self.init_params(data) if first else params
        resp = resp.detach()
        nk = resp.sum(1).clamp(min=1e-12)  # (K,)
        var = old.var.detach()
        lam = self.options["weight_decay"]

        def loss(w1, b1, w2, b2):
            f = mlp_forward(w1, b1, w2, b2, data.XeT)  # (K, m, n)
            sq = ((data.y.unsqueeze(0) - f) ** 2 / var.unsqueeze(-1)).sum(1)  # (K, n)
            decay = (w1**2).sum() + (w2**2).sum()
            return (0.5 * (resp * sq).sum() + 0.5 * lam * decay) / data.n

        steps = self.options["steps"] * (5 if first else 1)
        w1, b1, w2, b2 = lbfgs_minimise((old.w1, old.b1, old.w2, old.b2), loss, steps)
        with torch.no_grad():
            f = mlp_forward(w1, b1, w2, b2, data.XeT)
            rss = torch.einsum("kn,kmn->km", resp, (data.y.unsqueeze(0) - f) ** 2)
            new_var = torch.clamp(rss / nk.unsqueeze(1), min=self.var_floor)
            new = MLPParams(w1, b1, w2, b2, new_var)
            if first:
                return new
            better = self._q(new, data, resp) >= self._q(old, data, resp)  # (K,)
            pick = lambda a, b: torch.where(  # noqa: E731
                better.view(-1, *([1] * (a.ndim - 1))), a, b
            )
            return MLPParams(
                *(pick(getattr(new, f), getattr(old, f)) for f in ("w1", "b1", "w2", "b2", "var"))
            )

    def log_prior(self, params: MLPParams) -> float:
        return -0.5 * self.options["weight_decay"] * float(self._sq(params).sum())

    def n_parameters(self, params: MLPParams) -> int:
        return int(sum(t.numel() for t in (params.w1, params.b1, params.w2, params.b2, params.var)))

    def min_samples(self, params: MLPParams) -> float:
        return 2.0

    def select(self, params: MLPParams, perm: torch.Tensor) -> MLPParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return MLPParams(
            *(getattr(params, f)[perm].contiguous() for f in ("w1", "b1", "w2", "b2", "var"))
        )

    def residuals(self, params: MLPParams, chunk: Chunk) -> torch.Tensor:
        """Standardised residuals (y - f_k(x)) / sigma_k, shape (K, m, c)."""
        f = mlp_forward(params.w1, params.b1, params.w2, params.b2, chunk.XeT)
        return (chunk.y.unsqueeze(0) - f) / params.var.sqrt().unsqueeze(-1)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: MLPParams) -> dict[str, torch.Tensor]:
        free = {f: getattr(params, f) for f in ("w1", "b1", "w2", "b2")}
        free["log_excess_var"] = log_excess_var(params.var, self.var_floor)
        return free

    def from_free(self, free: dict[str, torch.Tensor]) -> MLPParams:
        var = self.var_floor + torch.exp(free["log_excess_var"])
        return MLPParams(free["w1"], free["b1"], free["w2"], free["b2"], var)

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Network outputs (K, m, n) for a design XT (p, n)."""
        return mlp_forward(free["w1"], free["b1"], free["w2"], free["b2"], XT)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        return self._log_prob(self.from_free(free), XT, y)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return (
            -0.5
            * self.options["weight_decay"]
            * ((free["w1"] ** 2).sum() + (free["w2"] ** 2).sum())
        )

    def moments(self, params: MLPParams, XT: torch.Tensor):
        """Network outputs and noise standard deviations, each (n, K, m)."""
        f = mlp_forward(params.w1, params.b1, params.w2, params.b2, XT).permute(2, 0, 1)
        return f, torch.sqrt(params.var).unsqueeze(0).expand_as(f)

    def predictive_extra(self, params: MLPParams) -> dict:
        return {}

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`MLPParams` fields for a design of p columns."""
        K, m, h = self.n_experts, self.n_outputs, self.options["hidden"]
        return {"w1": (K, p, h), "b1": (K, h), "w2": (K, h, m), "b2": (K, m), "var": (K, m)}

    def check_params(self, params: MLPParams, prefix: str = "") -> None:
        """Refuse values no fit gives: non-finite weights, variances not positive.

        Raises
        ------
        ValueError
            Naming the field (after ``prefix``) and what is wrong with it.
        """
        for name in ("w1", "b1", "w2", "b2"):
            check_finite(prefix + name, getattr(params, name))
        if not bool((torch.isfinite(params.var) & (params.var > 0)).all()):
            raise ValueError(f"{prefix + 'var'!r} holds variances that are not positive and finite")
