"""Multi-task mixtures of experts: MMoE, its two baselines, and PLE's task experts.

``T`` tasks share one input ``x`` of width ``d_in``; task ``t`` has its own output
``y_t`` from its own *tower* ``h_t`` (a small MLP). The models differ in what the
towers read:

.. math::

    \\text{shared-bottom:}\\quad & y_t = h_t\\big(f(x)\\big) \\\\
    \\text{one-gate MoE (OMoE):}\\quad & y_t = h_t\\Big(\\sum_{e=1}^{E} g_e(x)\\, f_e(x)\\Big),
        \\quad g(x) = \\mathrm{softmax}(W x) \\\\
    \\text{multi-gate MoE (MMoE):}\\quad & y_t = h_t\\Big(\\sum_{e=1}^{E} g^t_e(x)\\, f_e(x)\\Big),
        \\quad g^t(x) = \\mathrm{softmax}(W_t x)

Shared-bottom (Caruana, 1997) forces every task through one representation ``f``;
OMoE splits it into ``E`` experts ``f_e`` mixed by one input-dependent gate; MMoE
(Ma et al., 2018, equations 6-8) gives each task a gate of its own, so that tasks that
disagree can lean on different experts and tasks that agree can share them. The gates
are dense (every expert, weighted by a softmax over all of them), as in the paper; no
top-k, since with a handful of small experts there is no compute to save.

PLE (Tang et al., 2020) adds ``P`` experts per task that only that task's gate sees:
task ``t`` mixes the ``E`` shared experts and its own ``P``,
:math:`y_t = h_t\\big(\\sum_{e \\in \\mathcal{S} \\cup \\mathcal{P}_t} g^t_e(x) f_e(x)\\big)`
with a softmax over those ``E + P`` experts. This is PLE's customised gate control
(CGC), one extraction layer; the progressive stacking of several such layers (with a
gate over all experts feeding the next layer's shared experts) is not built here.

Every expert is an MLP with ReLU after every layer (the paper's experts are one ReLU
layer); towers are MLPs with ReLU between layers and a linear output. Experts and
towers are stored stacked, ``(n, width_in, width_out)`` per layer, and run as one
batched matmul per layer, as the expert bank of :mod:`moekit.nn.experts` does.

References
----------
Caruana (1997), Multitask learning, Machine Learning 28, 41-75.
Ma, Zhao, Yi, Chen, Hong and Chi (2018), Modeling task relationships in multi-task
learning with multi-gate mixture-of-experts, KDD.
Tang, Liu, Zhao and Gong (2020), Progressive layered extraction (PLE): a novel
multi-task learning model for personalized recommendations, RecSys.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit._core.validation import validate_params
from moekit.nn._checks import NON_NEGATIVE_INT, POSITIVE_INT, _under_vmap, check_features, reject

__all__ = ["MultiGateMoE", "MultiTaskStats", "SharedBottom", "StackedMLP", "mix_experts"]


_CONSTRAINTS: dict[str, list] = {
    "d_in": [POSITIVE_INT],
    "n_experts": [NON_NEGATIVE_INT],
    "n_tasks": [POSITIVE_INT],
    "d_out": [POSITIVE_INT],
    "n_shared_experts": [NON_NEGATIVE_INT],
    "n_task_experts": [NON_NEGATIVE_INT],
    "n_gates": [None, POSITIVE_INT],
}


def _widths(owner: str, name: str, value: Any, *, allow_empty: bool) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints, each >= 1) as a tuple of hidden widths."""
    must = "a positive int or a sequence of positive ints" + ("" if allow_empty else " (not empty)")
    items = (value,) if isinstance(value, numbers.Integral) else value
    if isinstance(value, (str, bytes)) or not isinstance(items, Sequence):
        reject(owner, name, must, value)
    if not items and not allow_empty:
        reject(owner, name, must, value)
    for w in items:
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
            reject(owner, name, must, value)
    return tuple(int(w) for w in items)


class StackedMLP(nn.Module):
    """``n`` independent MLPs of the same widths, run as one batched matmul per layer.

    Network ``i`` computes :math:`a_{l+1} = \\mathrm{relu}(a_l W^{(l)}_i + b^{(l)}_i)`,
    the ReLU being left out after the last layer unless ``activate_last``.

    Parameters
    ----------
    n : int
        Number of networks.
    widths : sequence of int
        ``(width_in, hidden_1, ..., width_out)``, at least two entries.
    activate_last : bool, default=False
        ReLU after the last layer too (experts, whose output is a representation).

    Attributes
    ----------
    weights : ParameterList of Tensor of shape (n, widths[l], widths[l + 1])
    biases : ParameterList of Tensor of shape (n, 1, widths[l + 1])
        Initialised as :class:`torch.nn.Linear` is, from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    def __init__(self, n: int, widths: Sequence[int], *, activate_last: bool = False) -> None:
        super().__init__()
        self.n, self.widths, self.activate_last = n, tuple(widths), activate_last
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for w_in, w_out in zip(self.widths[:-1], self.widths[1:], strict=True):
            bound = 1.0 / math.sqrt(w_in)
            self.weights.append(nn.Parameter(torch.empty(n, w_in, w_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, w_out).uniform_(-bound, bound)))

    def extra_repr(self) -> str:
        return f"n={self.n}, widths={self.widths}, activate_last={self.activate_last}"

    def forward(self, x: Tensor) -> Tensor:
        """Run every network.

        Parameters
        ----------
        x : Tensor of shape (B, widths[0]) or (n, B, widths[0])
            One input for all networks, or one per network.

        Returns
        -------
        Tensor of shape (n, B, widths[-1])
        """
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w) if x.dim() == 3 else torch.matmul(x, w) + b  # (n, B, w)
            if layer < last or self.activate_last:
                x = F.relu(x)
        return x


def mix_experts(gates: Tensor, experts: Tensor, visible: Tensor | None = None) -> Tensor:
    """Each gate's mixture of the experts it sees, :math:`\\sum_j G_{gbj} F_{v_{gj}, b}`.

    Parameters
    ----------
    gates : Tensor of shape (G, B, J)
        Gate weights of each of ``G`` gates over the ``J`` experts it sees.
    experts : Tensor of shape (E, B, h)
        Output of every expert.
    visible : LongTensor of shape (G, J) or None
        Which experts gate ``g`` sees, in the order of its weights; None: all of them,
        in order (``J = E``).

    Returns
    -------
    Tensor of shape (G, B, h)
    """
    if visible is None:
        return torch.einsum("gbe,ebh->gbh", gates, experts)
    return torch.einsum("gbj,gjbh->gbh", gates, experts[visible])  # experts[...]: (G, J, B, h)


@dataclass
class MultiTaskStats:
    """Expert use of the last forward pass.

    Attributes
    ----------
    task_expert_weights : Tensor of shape (n_tasks, n_gated)
        Mean over the batch of the weight task ``t``'s gate gave expert ``e``, detached;
        each row sums to 1. Columns follow the model's expert order: the
        ``n_experts`` shared ones, then ``n_task_experts`` for each task in turn (zero
        for a task whose gate does not see them). With one gate all rows are equal.
    """

    task_expert_weights: Tensor


class MultiGateMoE(nn.Module):
    """Multi-gate mixture of experts (MMoE) for ``n_tasks`` tasks; OMoE and PLE as options.

    Task ``t``'s output is :math:`y_t = h_t\\big(\\sum_e g^t_e(x)\\, f_e(x)
    + \\sum_{s=1}^{S} a_s(x)\\big)` with :math:`g^t(x) = \\mathrm{softmax}(W_t x)` over
    the experts task ``t`` sees (see :mod:`moekit.nn.multitask`): the ``n_experts``
    shared experts, plus its own ``n_task_experts`` (PLE). The ``S =
    n_shared_experts`` always-on experts :math:`a_s` are added ungated to every task's
    mixture, as in :class:`~moekit.nn.MoE`. The gates have no bias, as in the paper
    (equation 8).

    Parameters
    ----------
    d_in : int
        Input width; ``x`` has shape (..., d_in).
    n_experts : int
        Gated experts every task's gate mixes (PLE's "shared experts"). May be 0 only
        with ``n_task_experts > 0`` (then no expert is shared).
    n_tasks : int
        Tasks, one tower each.
    expert_hidden : int or sequence of int
        Widths of each expert's layers (ReLU after each); the last is the width ``h``
        of the representation the towers read. ``16`` is one layer of 16 units.
    tower_hidden : int or sequence of int, default=8
        Hidden widths of each tower; ``()`` makes the towers linear.
    n_shared_experts : int, default=0
        Always-on experts, ungated, added to every task's mixture.
    n_task_experts : int, default=0
        Experts of each task that only its own gate sees (PLE's task-specific experts,
        one extraction layer). Needs one gate per task.
    n_gates : int or None, default=None
        ``n_tasks`` (None means the same): one gate per task, MMoE. ``1``: one gate
        whose mixture every tower reads, the one-gate MoE baseline (OMoE).
    d_out : int, default=1
        Output width of each task.

    Attributes
    ----------
    experts : StackedMLP
        The ``n_experts + n_tasks * n_task_experts`` gated experts, shared ones first.
    always_on : StackedMLP or None
        The ``n_shared_experts`` ungated experts.
    gate_weight : Parameter of shape (n_gates, d_in, n_experts + n_task_experts)
        :math:`W_t^\\top` for each gate.
    towers : StackedMLP
        ``n_tasks`` towers of widths ``(h, *tower_hidden, d_out)``.
    visible : LongTensor of shape (n_gates, n_experts + n_task_experts)
        The experts each gate sees (a buffer).
    stats : MultiTaskStats or None
        Expert use of the last forward (None before the first, and under ``vmap``).

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import MultiGateMoE
    >>> model = MultiGateMoE(d_in=10, n_experts=4, n_tasks=2, expert_hidden=16)
    >>> y1, y2 = model(torch.randn(32, 10))
    >>> y1.shape, y2.shape
    (torch.Size([32, 1]), torch.Size([32, 1]))
    >>> model.stats.task_expert_weights.shape
    torch.Size([2, 4])
    >>> ple = MultiGateMoE(10, 2, n_tasks=2, expert_hidden=16, n_task_experts=1)
    >>> _ = ple(torch.randn(32, 10))
    >>> (ple.stats.task_expert_weights > 0).int()  # shared, task 0's, task 1's
    tensor([[1, 1, 1, 0],
            [1, 1, 0, 1]], dtype=torch.int32)
    """

    def __init__(
        self,
        d_in: int,
        n_experts: int,
        n_tasks: int,
        expert_hidden: int | Sequence[int],
        tower_hidden: int | Sequence[int] = 8,
        n_shared_experts: int = 0,
        n_task_experts: int = 0,
        *,
        n_gates: int | None = None,
        d_out: int = 1,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__", "owner")}
        validate_params(owner, params, _CONSTRAINTS)
        expert_widths = _widths(owner, "expert_hidden", expert_hidden, allow_empty=False)
        tower_widths = _widths(owner, "tower_hidden", tower_hidden, allow_empty=True)
        if n_experts + n_task_experts < 1:
            reject(owner, "n_experts", "at least 1 when n_task_experts=0", n_experts)
        n_gates = n_tasks if n_gates is None else n_gates
        if n_gates not in (1, n_tasks):
            reject(owner, "n_gates", f"None, 1 (OMoE) or n_tasks={n_tasks} (MMoE)", n_gates)
        if n_task_experts > 0 and n_gates != n_tasks:
            must = f"n_tasks={n_tasks} (or None) with n_task_experts > 0"
            reject(owner, "n_gates", must, n_gates)

        self.d_in, self.n_tasks, self.n_gates, self.d_out = d_in, n_tasks, n_gates, d_out
        self.n_experts, self.n_shared_experts = n_experts, n_shared_experts
        self.n_task_experts = n_task_experts
        self.n_gated = n_experts + n_tasks * n_task_experts
        widths = (d_in, *expert_widths)
        self.experts = StackedMLP(self.n_gated, widths, activate_last=True)
        self.always_on = (
            StackedMLP(n_shared_experts, widths, activate_last=True) if n_shared_experts else None
        )
        n_seen = n_experts + n_task_experts
        # nn.Linear's initialisation: U(-1/sqrt(d_in), 1/sqrt(d_in))
        bound = 1.0 / math.sqrt(d_in)
        self.gate_weight = nn.Parameter(torch.empty(n_gates, d_in, n_seen).uniform_(-bound, bound))
        shared = torch.arange(n_experts).expand(n_gates, n_experts)  # (G, E)
        own = n_experts + torch.arange(n_gates * n_task_experts).view(n_gates, n_task_experts)
        self.register_buffer("visible", torch.cat([shared, own], dim=1), persistent=False)
        self.towers = StackedMLP(n_tasks, (expert_widths[-1], *tower_widths, d_out))
        self.stats: MultiTaskStats | None = None

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, n_tasks={self.n_tasks}, n_gates={self.n_gates}, "
            f"n_experts={self.n_experts}, n_task_experts={self.n_task_experts}, "
            f"n_shared_experts={self.n_shared_experts}"
        )

    def gate_weights(self, x: Tensor) -> Tensor:
        """Each gate's softmax over the experts it sees.

        Parameters
        ----------
        x : Tensor of shape (B, d_in)

        Returns
        -------
        Tensor of shape (n_gates, B, n_experts + n_task_experts)
            Rows sum to 1; column ``j`` of gate ``g`` is expert ``visible[g, j]``.
        """
        return torch.softmax(torch.matmul(x, self.gate_weight), dim=-1)  # (G, B, J)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every task's prediction.

        Parameters
        ----------
        x : Tensor of shape (..., d_in)

        Returns
        -------
        list of n_tasks Tensors of shape (..., d_out)
        """
        check_features(type(self).__name__, x, self.d_in, "d_in", self.gate_weight.dtype)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in)  # (B, d_in)
        gates = self.gate_weights(x)  # (G, B, J)
        visible = None if self.n_task_experts == 0 else self.visible
        mixed = mix_experts(gates, self.experts(x), visible)  # (G, B, h)
        if self.always_on is not None:
            mixed = mixed + self.always_on(x).sum(0)  # (G, B, h)
        if self.n_gates == 1:
            mixed = mixed.expand(self.n_tasks, -1, -1)  # (T, B, h): one mixture, every tower
        out = self.towers(mixed)  # (T, B, d_out)
        self.stats = None if _under_vmap() else self._stats(gates.detach())
        return [y.reshape(*lead, self.d_out) for y in out.unbind(0)]

    def _stats(self, gates: Tensor) -> MultiTaskStats:
        mean = gates.float().mean(dim=1)  # (G, J)
        use = mean.new_zeros(self.n_gates, self.n_gated).scatter_(1, self.visible, mean)
        return MultiTaskStats(use.expand(self.n_tasks, -1).clone())  # (T, n_gated)


class SharedBottom(nn.Module):
    """Shared-bottom multi-task network: :math:`y_t = h_t(f(x))`.

    One ReLU MLP ``f`` that every task reads, one tower per task: the classical
    multi-task baseline (Caruana, 1997), and :class:`MultiGateMoE` with a single
    expert (whose softmax gate is identically 1).

    Parameters
    ----------
    d_in : int
        Input width; ``x`` has shape (..., d_in).
    bottom_hidden : int or sequence of int
        Widths of the shared network's layers (ReLU after each).
    n_tasks : int
        Tasks, one tower each.
    tower_hidden : int or sequence of int, default=8
        Hidden widths of each tower; ``()`` makes the towers linear.
    d_out : int, default=1
        Output width of each task.

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import SharedBottom
    >>> ys = SharedBottom(d_in=10, bottom_hidden=32, n_tasks=3)(torch.randn(5, 10))
    >>> [tuple(y.shape) for y in ys]
    [(5, 1), (5, 1), (5, 1)]
    """

    def __init__(
        self,
        d_in: int,
        bottom_hidden: int | Sequence[int],
        n_tasks: int,
        tower_hidden: int | Sequence[int] = 8,
        *,
        d_out: int = 1,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        validate_params(owner, {"d_in": d_in, "n_tasks": n_tasks, "d_out": d_out}, _CONSTRAINTS)
        bottom_widths = _widths(owner, "bottom_hidden", bottom_hidden, allow_empty=False)
        tower_widths = _widths(owner, "tower_hidden", tower_hidden, allow_empty=True)
        self.d_in, self.n_tasks, self.d_out = d_in, n_tasks, d_out
        self.bottom = StackedMLP(1, (d_in, *bottom_widths), activate_last=True)
        self.towers = StackedMLP(n_tasks, (bottom_widths[-1], *tower_widths, d_out))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every task's prediction.

        Parameters
        ----------
        x : Tensor of shape (..., d_in)

        Returns
        -------
        list of n_tasks Tensors of shape (..., d_out)
        """
        check_features(type(self).__name__, x, self.d_in, "d_in", self.towers.weights[0].dtype)
        lead = x.shape[:-1]
        shared = self.bottom(x.reshape(-1, self.d_in))  # (1, B, h)
        out = self.towers(shared.expand(self.n_tasks, -1, -1))  # (T, B, d_out)
        return [y.reshape(*lead, self.d_out) for y in out.unbind(0)]
