"""Point masses at zero: p_k(y | x) = 1 if y = 0, else 0.

An expert of this family has no parameters of its own; its gate weight g_k(x) is
the probability that a row's zero comes from it. Beside count experts it makes a
zero-inflated model whose gate says where the excess zeros come from:
``MoERegressor(2, expert=["zero", "poisson"])`` is a zero-inflated Poisson
regression with a logistic model of the zeros (Lambert 1992).

The E-step gives the zero expert the posterior share of every zero, and none of
the other rows; its M-step has nothing to fit (it is exact, trivially).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moekit._core.data import Chunk, EMData
from moekit._core.reporting import Report, Scaling
from moekit.experts._glm import check_columns


@dataclass
class ZeroParams:
    """No parameters: a point mass at zero is the same whatever the data."""


class ZeroExperts:
    """K point masses at zero (see the module docstring).

    Parameters
    ----------
    n_experts : int
    """

    report_name = "point mass at 0"
    monotone = True
    needs_resp = False
    params_type = ZeroParams
    predictive_family = "zero"
    standardize_target = False
    target_columns = 1

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    @staticmethod
    def check_target(y2: np.ndarray) -> np.ndarray:
        """One column (any value: the other experts' checks say which they model)."""
        check_columns(y2, "zero", 1, "one target")
        return y2

    def prepare(self, data: EMData) -> None:
        pass

    def init_params(self, data: EMData) -> ZeroParams:
        return ZeroParams()

    def log_prob(self, params: ZeroParams, chunk: Chunk) -> torch.Tensor:
        """0 where y = 0 and -inf elsewhere, for every expert, shape (K, c)."""
        zero = chunk.y[0] == 0
        out = chunk.y.new_zeros((self.n_experts, zero.shape[0]))
        return out.masked_fill_(~zero.unsqueeze(0), -torch.inf)

    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        return None

    def m_step(self, params, stats, data: EMData, resp=None) -> ZeroParams:
        return ZeroParams()

    def log_prior(self, params: ZeroParams) -> float:
        return 0.0

    def n_parameters(self, params: ZeroParams) -> int:
        return 0

    def min_samples(self, params: ZeroParams) -> float:
        return 0.0

    def select(self, params: ZeroParams, perm: torch.Tensor) -> ZeroParams:
        return params

    def residuals(self, params: ZeroParams, chunk: Chunk) -> torch.Tensor:
        """y - 0 for every expert, shape (K, 1, c)."""
        return chunk.y[:1].unsqueeze(0).expand(self.n_experts, 1, -1).clone()

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: ZeroParams) -> dict[str, torch.Tensor]:
        return {}

    def from_free(self, free: dict[str, torch.Tensor]) -> ZeroParams:
        return ZeroParams()

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """0 where y = 0 and -inf elsewhere, shape (K, n)."""
        y = y.reshape(-1)
        out = y.new_zeros((self.n_experts, y.shape[0]))
        return out.masked_fill(y.unsqueeze(0) != 0, -torch.inf)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64)

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert means, 0, shape (K, 1, n)."""
        return XT.new_zeros((self.n_experts, 1, XT.shape[1]))

    # ------------------------------------------------------------ reporting
    def report(self, params: ZeroParams, scaling: Scaling) -> Report:
        """Nothing to report: the gate says how much weight each point mass has."""
        return Report()

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {}

    # ------------------------------------------------------------ prediction
    def moments(self, params: ZeroParams, XT: torch.Tensor):
        """Means and standard deviations, both 0, each (n, K, 1)."""
        out = XT.new_zeros((XT.shape[1], self.n_experts, 1))
        return out, out.clone()

    def predictive_extra(self, params: ZeroParams) -> dict:
        return {}

    # ------------------------------------------------------------ model files
    @property
    def n_outputs(self) -> int:
        """One target."""
        return 1

    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """No fields."""
        return {}

    def check_params(self, params: ZeroParams, prefix: str = "") -> None:
        """Nothing to check."""
