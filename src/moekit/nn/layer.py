"""The sparse Mixture-of-Experts layer: router + dispatch + expert bank (+ shared experts)."""

from __future__ import annotations

import dataclasses

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from moekit.nn import balance
from moekit.nn import functional as MF
from moekit.nn._checks import _under_vmap, check_features
from moekit.nn.config import MoEConfig, validate_moe_params
from moekit.nn.dispatch import dense_gates, plan_dispatch, run_experts
from moekit.nn.experts import ExpertBank, FeedForward
from moekit.nn.parallel import ExpertShard, expert_parallel_experts, make_shard, shard_bank
from moekit.nn.routers import (
    ExpertChoiceRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SwitchRouter,
    TopKRouter,
)
from moekit.nn.sigmoid_router import SigmoidBiasRouter
from moekit.nn.stats import MoEStats

__all__ = ["MoE", "MoEStats", "make_router", "update_router_biases"]

PATHS = ("fused", "compiled", "sorted", "masked")
"""How :class:`MoE` runs its experts; see :meth:`MoE.execution_path`."""


def make_router(config: MoEConfig) -> Router:
    """The router named in ``config`` (or the module it holds)."""
    if isinstance(config.router, Router):
        return config.router
    d, e, k = config.d_model, config.n_experts, config.top_k
    normalize = config.normalize_weights
    groups = {"n_group": config.n_group, "topk_group": config.topk_group}
    factories = {
        "topk": lambda: TopKRouter(d, e, k, normalize=normalize, **groups),
        "noisy_topk": lambda: NoisyTopKRouter(d, e, k, normalize=normalize),
        "switch": lambda: SwitchRouter(d, e, k),
        "expert_choice": lambda: ExpertChoiceRouter(d, e, k, config.capacity_factor),
        "sigmoid_bias": lambda: SigmoidBiasRouter(
            d,
            e,
            k,
            bias_update_rate=config.bias_update_rate,
            center_bias=config.center_bias,
            normalize=normalize,
            **groups,
        ),
    }
    return factories[config.router]()


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    Each token ``x_t`` goes to a few of ``E`` experts chosen by the router, and the
    layer returns

    .. math::

        y_t = \\rho \\sum_{e \\in \\mathcal{E}(t)} w_{te} \\, f_e(x_t)
              + \\gamma(x_t) \\sum_{s=1}^{S} g_s(x_t),

    where :math:`\\mathcal{E}(t)` and :math:`w_{te}` come from the router, :math:`f_e`
    are the routed experts and :math:`g_s` the ``S = n_shared_experts`` shared ones,
    :math:`\\rho` is ``routed_scaling_factor`` and :math:`\\gamma(x_t)` is 1, or
    :math:`\\sigma(x_t w_s)` with ``shared_expert_gate=True``.
    Assignments past an expert's capacity are dropped (their term is zero; the
    caller's residual connection carries the token).

    Parameters
    ----------
    d_model : int
        Token width; ``x`` has shape (..., d_model).
    d_hidden : int
        Hidden width of each expert.
    n_experts : int
        Routed experts ``E``.
    top_k : int, default=2
        Experts per token (1 for ``router='switch'``).
    router : {'topk', 'noisy_topk', 'switch', 'expert_choice', 'sigmoid_bias'} or Router
        See :mod:`moekit.nn.routers`.
    capacity_factor : float or None, default=None
        None: dropless. Otherwise each expert takes at most
        :math:`\\lceil f\\, T k / E \\rceil` of the ``T`` tokens of a forward pass.
    n_shared_experts : int, default=0
        Always-on experts (DeepSeek-MoE), each of width ``d_hidden``.
    activation : {'swiglu', 'gelu'}, default='swiglu'
    aux_loss_coef : float, default=0.01
        Weight of the router's balancing loss.
    z_loss_coef : float, default=0.0
        Weight of the router z-loss.
    bias_update_rate : float, default=1e-3
        Step of the bias update of the 'sigmoid_bias' router (see :meth:`update_bias`).
    expert_impl : {'auto', 'fused', 'grouped_mm', 'bmm', 'mm'}, default='auto'
        Expert matmul implementation (see :class:`~moekit.nn.experts.ExpertBank`), and
        :meth:`execution_path` for where the layer falls back from it.
    capacity_priority : {'choice', 'weight'}, default='choice'
        Which assignments an expert over capacity keeps: every first choice before any
        second choice (GShard), within one choice rank in token order ('choice') or by
        decreasing weight ('weight'). See :func:`~moekit.nn.functional.capacity_keep`.
    normalize_weights : bool or None, default=None
        Renormalise each token's kept weights to sum to one. None: for ``top_k > 1``
        only, since with one expert the weight would always be 1 and the router would
        learn nothing from the task loss (the Switch Transformer keeps the raw
        probability for the same reason). See :mod:`moekit.nn.routers`.
    center_bias : bool, default=False
        Keep the biases of the 'sigmoid_bias' router at mean zero (torchtitan does;
        the DeepSeek-V3 paper does not). It changes no routing decision.
    n_group, topk_group : int or None, default=None
        Group-limited routing for 'topk' and 'sigmoid_bias' (DeepSeek-V3): each token
        chooses inside its best ``topk_group`` of ``n_group`` contiguous expert groups.
    routed_scaling_factor : float, default=1.0
        :math:`\\rho`, multiplies the routed experts' combine weights.
    d_shared : int or None, default=None
        Hidden width of the shared experts together (None: ``n_shared_experts *
        d_hidden``).
    shared_expert_gate : bool, default=False
        Gate the shared experts by :math:`\\sigma(x_t w_s)` (Qwen2-MoE).
    balance_loss : {'batch', 'sequence', 'global'}, default='batch'
        Where the balancing loss counts the load (token-choice routers 'topk',
        'switch', 'sigmoid_bias'): over the forward pass (the router's own loss), per
        sequence (DeepSeek-V3; the input's second-last axis) or over every process
        (Qwen's global batch). See :mod:`moekit.nn.balance`.
    expert_parallel_group : torch.distributed.ProcessGroup, optional
        Expert parallelism over this group of ``W`` processes: each holds
        ``n_experts / W`` experts (``W`` must divide ``n_experts``) and tokens travel to
        their experts by all-to-all (:mod:`moekit.nn.parallel`). The weights are made
        in full from the seed and sliced, so one seed gives the same model at any
        ``W``. The forward equals the single-process layer on each process's tokens;
        with a capacity factor, capacity is counted per process (over its own
        tokens). Not under ``vmap`` or ``torch.compile``. Every process of the group
        must run each forward and backward.

    Attributes
    ----------
    aux_loss : Tensor
        Scalar from the last forward: ``aux_loss_coef * balance_loss + z_loss_coef *
        z_loss``; add it to the training loss. A constant zero when both coefficients
        are zero (or the router balances without a loss and ``z_loss_coef`` is zero).
    stats : MoEStats or None
        Routing statistics of the last forward; None after a forward under ``vmap``
        (whose ``aux_loss`` must also be read inside the vmapped function). Under
        expert parallelism, those of this process's tokens.
    expert_parallel : ExpertShard or None
        Which experts this process holds; None when it holds all of them.

    Notes
    -----
    The 'sigmoid_bias' router moves its bias only when :meth:`update_bias` is called:
    call it once per optimiser step, after ``optimizer.step()``, or call
    :func:`update_router_biases` on the whole model.

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import MoE
    >>> layer = MoE(d_model=16, d_hidden=32, n_experts=4, top_k=2)
    >>> y = layer(torch.randn(2, 5, 16))
    >>> y.shape
    torch.Size([2, 5, 16])
    >>> int(layer.stats.tokens_per_expert.sum())
    20
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        top_k: int = 2,
        *,
        router: str | Router = "topk",
        capacity_factor: float | None = None,
        n_shared_experts: int = 0,
        activation: str = "swiglu",
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        bias_update_rate: float = 1e-3,
        expert_impl: str = "auto",
        capacity_priority: str = "choice",
        normalize_weights: bool | None = None,
        center_bias: bool = False,
        n_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
        d_shared: int | None = None,
        shared_expert_gate: bool = False,
        balance_loss: str = "batch",
        expert_parallel_group: object = None,
    ) -> None:
        super().__init__()
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        del params["expert_parallel_group"]  # a runtime setting, not part of the model
        validate_moe_params(type(self).__name__, params)
        self._setup(MoEConfig(**params), expert_parallel_group)

    @classmethod
    def from_config(cls, config: MoEConfig, expert_parallel_group: object = None) -> MoE:
        """Build the layer from a :class:`MoEConfig` (and optionally a group, as in ``MoE``)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(config, expert_parallel_group)
        return layer

    def _setup(self, config: MoEConfig, group: object = None) -> None:
        # checked before anything is built, so that a bad group leaves nothing behind
        shard = None if group is None else make_shard(group, config.n_experts, "MoE")
        self.config = config
        self.d_model, self.n_experts, self.top_k = config.d_model, config.n_experts, config.top_k
        self.router = make_router(config)
        self.experts = ExpertBank(
            config.n_experts,
            config.d_model,
            config.d_hidden,
            config.activation,
            impl=config.expert_impl,
        )
        # all E experts are drawn first, then sliced: the same seed gives the same model
        # at every parallel degree (the generator advances alike)
        self.expert_parallel: ExpertShard | None = shard
        if shard is not None:
            shard_bank(self.experts, shard)
        n_shared = config.n_shared_experts
        # S shared experts of width H are one FFN of width S*H: the sum splits by columns
        d_shared = config.d_shared or n_shared * config.d_hidden
        self.shared = (
            FeedForward(config.d_model, d_shared, config.activation) if n_shared > 0 else None
        )
        self.shared_gate = (
            nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None
        )
        self.aux_loss: Tensor = torch.zeros(())
        self.stats: MoEStats | None = None

    def execution_path(self, x: Tensor, scale: Tensor | None = None) -> str:
        """How the layer runs its experts on tokens ``x``; one of :data:`PATHS`.

        - ``'fused'``: the fused dispatch of :mod:`moekit.nn.fused`, when the expert
          implementation is 'fused' or 'grouped_mm' (the CPU default) and nothing below
          applies. Its hand-written backward cannot itself be differentiated, so a
          backward with ``create_graph=True`` recomputes the gradient in plain autograd
          ops instead (double backward works on every path).
        - ``'compiled'``: the same computation as one opaque operator, under
          ``torch.compile``, whose tracer cannot run the fused loop (its split sizes
          are data); the operator recomputes each expert's hidden activation in the
          backward instead of keeping it. Dropless layers compile to one graph; with a
          capacity, how many assignments are kept is data, and the graph breaks there.
        - ``'sorted'``: the sorted dispatch through plain autograd, with the bank's
          implementation ('mm' or 'bmm'); also the fallback of the fused choices
          under ``torch.func`` transforms (grad, jacrev, jvp, ...) and forward-mode
          AD, which an autograd Function with a hand-written backward does not serve
          (then with 'mm', the one whose every operation has forward-mode and
          batching rules; grouped_mm has no forward-mode rule).
        - ``'masked'``: every expert on every token, multiplied by dense gates (zero
          where unused), ``E / k`` times the work; under ``vmap``, which cannot batch
          the data-dependent split of the sorted paths.

        Parameters
        ----------
        x : Tensor of shape (T, d_model)
        scale : Tensor, optional
            The combine weights; a forward-mode tangent on them also rules out the
            fused dispatch.

        Returns
        -------
        str
        """
        if _under_vmap():
            return "masked"
        if self.experts.resolve_impl(x) not in ("fused", "grouped_mm"):
            return "sorted"
        if torch.compiler.is_compiling():
            return "compiled"
        if torch._C._are_functorch_transforms_active():
            return "sorted"
        tensors = (x, self.experts.w_in, self.experts.w_out, scale)
        if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
            return "sorted"
        return "fused"

    def forward(self, x: Tensor) -> Tensor:
        """Route, run the experts, combine.

        Parameters
        ----------
        x : Tensor of shape (..., d_model)

        Returns
        -------
        Tensor of the same shape as ``x``
        """
        check_features(type(self).__name__, x, self.d_model, "d_model")
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (T, d)
        n_tokens = x.shape[0]
        routing = self.router(x)  # weights, indices (T, k) or (E, C); logits (T, E)
        cfg = self.config
        if cfg.routed_scaling_factor != 1.0:
            routing = dataclasses.replace(
                routing, weights=routing.weights * cfg.routed_scaling_factor
            )
        capacity = MF.expert_capacity(n_tokens, self.n_experts, self.top_k, cfg.capacity_factor)
        bank = self.experts
        path = self.execution_path(x, routing.weights)
        if self.expert_parallel is not None and path in ("masked", "compiled"):
            raise RuntimeError(
                "An expert-parallel MoE layer runs eagerly only: its all-to-all has "
                "data-dependent sizes, which vmap and torch.compile cannot trace."
            )
        if path == "masked":
            gates, routed, dropped = dense_gates(
                routing, n_tokens, self.n_experts, capacity, cfg.capacity_priority
            )  # (T, E)
            y = bank.masked(x, gates)  # (T, d)
        else:
            plan = plan_dispatch(routing, n_tokens, self.n_experts, capacity, cfg.capacity_priority)
            routed, dropped = plan.routed, plan.dropped
            if self.expert_parallel is None:
                y = run_experts(x, plan, bank, path)  # (T, d)
            else:
                y = expert_parallel_experts(x, plan, bank, self.expert_parallel, path)  # (T, d)
        if self.shared is not None:
            shared = self.shared(x)  # (T, d)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared  # (T, 1) * (T, d)
            y = y + shared
        self.aux_loss = self._aux_loss(routing, shape)
        # under vmap the counts differ per sample and could not be read outside it
        self.stats = (
            None
            if path == "masked"
            else MoEStats(routed.detach(), dropped, routing.logits.detach(), self.router.scores)
        )
        return y.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the router's load statistics gathered since the last call, then clear them.

        For the 'sigmoid_bias' router: one step of the DeepSeek-V3 bias rule from the
        tokens each expert got in the training forwards since the last call (summed
        over the default process group when :mod:`torch.distributed` is initialised;
        every process must then call it). A no-op for routers without a bias. Call it
        once per optimiser step, after ``optimizer.step()``.
        """
        self.router.update_bias()

    def _aux_loss(self, routing: Routing, shape: torch.Size) -> Tensor:
        cfg = self.config
        loss = routing.logits.new_zeros(())
        if cfg.aux_loss_coef > 0:
            loss = loss + cfg.aux_loss_coef * self._balance_loss(routing, shape)
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * MF.router_z_loss(routing.logits)
        return loss

    def _balance_loss(self, routing: Routing, shape: torch.Size) -> Tensor:
        scope = self.config.balance_loss
        if scope == "batch":
            return routing.balance_loss
        probs = balance.score_distribution(routing.logits, self.router.scores)  # (T, E)
        if scope == "global":
            return balance.global_balance_loss(probs, routing.indices, self.n_experts)
        # a sequence is the second-last axis of the input; (T, d) is one sequence
        seq_len = shape[-2] if len(shape) >= 3 else max(1, shape[0])
        return balance.sequence_balance_loss(probs, routing.indices, self.n_experts, seq_len)

    def extra_repr(self) -> str:
        cfg = self.config
        shard = self.expert_parallel
        parallel = (
            ""
            if shard is None
            else f", expert_parallel=experts {shard.first}-{shard.first + shard.n_local - 1} "
            f"of {shard.n_experts} on rank {shard.rank}/{shard.world_size}"
        )
        return (
            f"capacity_factor={cfg.capacity_factor}, aux_loss_coef={cfg.aux_loss_coef}, "
            f"z_loss_coef={cfg.z_loss_coef}{parallel}"
        )


def update_router_biases(model: nn.Module) -> None:
    """Call :meth:`MoE.update_bias` on every :class:`MoE` inside ``model``.

    Call it once per optimiser step, after ``optimizer.step()``: the 'sigmoid_bias'
    routers then take one bias step from the loads of all the micro-batches of the
    step. Under :mod:`torch.distributed` every process must call it (it all-reduces).

    Parameters
    ----------
    model : torch.nn.Module
        Any module; ``MoE`` layers are found with ``model.modules()``.
    """
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias()
