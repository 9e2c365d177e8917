"""The tree gate of the hierarchical mixture of experts (Jordan and Jacobs, 1994).

A tree of depth D whose every internal node is a softmax over its b children; its
K = b^D leaves are the experts. A leaf's weight is the product of the gate
probabilities along its path from the root,

.. math::  g_k(x) = \\prod_{l=0}^{D-1} g_{n_l(k),\\, n_{l+1}(k)}(x), \\qquad
           g_{n, \\cdot}(x) = \\operatorname{softmax}(V_n x),

so log g_k(x) is the sum of the log gate probabilities along the path.

The EM loop hands the gate the leaves' responsibilities r_ik, the posterior path
probabilities; they are all the M-step needs. The posterior of a node n is the sum
of r_ik over the leaves below it, R_i(n), and the gate's part of the EM objective
decomposes exactly into one weighted softmax regression per internal node:

.. math::  \\sum_i \\sum_k r_{ik} \\log g_k(x_i)
           = \\sum_{n} \\sum_i \\sum_{c \\in \\text{children}(n)} R_i(c) \\log g_{n,c}(x_i).

Node n's regression has soft targets R_i(c), which sum to R_i(n) over its children;
with theta_n = vec(V_n), its gradient is sum_i (R_i(c) - R_i(n) g_{n,c}(x_i)) x_i and
its negative Hessian

.. math::  A_n = \\sum_i R_i(n) (\\operatorname{diag} g_{n,i} - g_{n,i} g_{n,i}^T)
                 \\otimes x_i x_i^T + \\alpha P,

block diagonal over nodes. Both are gathered in the E-step's pass with
:meth:`~moekit._core.data.Chunk.weighted_grams`, and each node takes the softmax
gate's step (:mod:`moekit.gates.softmax`): Newton (symmetric parametrisation,
minimum-norm solve, the loop's safeguard), or for large b p Bohning's bound
B_n = 1/2 (I - 11^T / b) (x) sum_i R_i(n) x_i x_i^T + alpha P, a minorise-maximise
step. The root's R_i(root) is exactly 1, so a tree of depth 1 does the softmax
gate's arithmetic, operation for operation.

Layout: internal nodes are numbered level by level from the root (node 0); node t's
children are nodes b t + 1, ..., b t + b, the coefficients ``coef[t]`` of shape
(b, p) give their logits, and leaf k is the k-th node of level D. The leaves below a
node are consecutive, so leaf k's parent-leaf in the tree one level shallower is
k // b. The pure functions of that shape (paths, node posteriors, the leaf orders a
tree can take) are in :mod:`moekit.gates.tree_structure`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from moekit._core.batch import batched_grams, design_sums, flat_grams, times_design
from moekit._core.data import CHUNK_SCRATCH_BYTES, Chunk, EMData, packed, unpack_grams
from moekit._core.linalg import even_system, solve_psd
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite
from moekit.gates.constant import ConstantGate, ConstantGateParams
from moekit.gates.softmax import NEWTON_MAX_PARAMS, bohning_bound, bound_step
from moekit.gates.tree_structure import (
    child_rows,
    n_internal,
    node_log_softmax,
    node_names,
    node_posteriors,
    path_log_probs,
    representable_order,
)


@dataclass
class TreeGateParams:
    """coef of shape (N, b, p): the logits of the b children of each of the N internal
    nodes (level by level from the root); the last column is the intercept."""

    coef: torch.Tensor


# ---------------------------------------------------------------------------- the family
class TreeGate:
    """Hierarchical softmax gate over branching**depth leaves (see the module docstring).

    Parameters
    ----------
    depth : int
        Levels of gates, D >= 1; depth 1 is the softmax gate over ``branching`` experts.
    branching : int
        Children of every internal node, b >= 1.
    alpha : float
        L2 penalty on every node's slopes (not its intercepts), on the scale of the
        summed log-likelihood.
    solver : {'auto', 'newton', 'bohning'}
        The nodes' step; ``'auto'`` uses Newton while b p is small.
    """

    supports_balance = True  # its statistics are linear in the soft targets (EMModel)

    report_name = "tree of softmax"
    needs_resp = False
    params_type = TreeGateParams

    def __init__(
        self, depth: int, branching: int, alpha: float = 1e-3, solver: str = "auto"
    ) -> None:
        self.depth = depth
        self.branching = branching
        self.alpha = alpha
        self.solver = solver
        self._use_newton = solver == "newton"
        self._pen = None

    @property
    def n_experts(self) -> int:
        return self.branching**self.depth

    @property
    def n_nodes(self) -> int:
        """Internal nodes N (each with a softmax over its children)."""
        return n_internal(self.depth, self.branching)

    @property
    def monotone(self) -> bool:
        return not self._use_newton

    @property
    def resizable(self) -> bool:
        """Whether any number of experts can be had (only a flat, depth-1 tree)."""
        return self.depth == 1

    def resized(self, n_experts: int):
        """This gate over ``n_experts`` leaves: a flat tree for depth 1 or one expert.

        A deeper tree has b^D leaves and nothing in between; it grows by levels
        (:meth:`simpler`), not by one expert.
        """
        if n_experts == self.n_experts:
            return copy.copy(self)
        if self.depth == 1 or n_experts == 1:
            return TreeGate(1, n_experts, self.alpha, self.solver)
        raise ValueError(
            f"a tree gate of depth {self.depth} and branching {self.branching} has "
            f"{self.n_experts} leaves; it cannot have {n_experts}."
        )

    def prepare(self, data: EMData) -> None:
        p, b = data.XgT.shape[0], self.branching
        self._use_newton = self.solver == "newton" or (
            self.solver == "auto" and b * p <= NEWTON_MAX_PARAMS
        )
        self._pen = data.XgT.new_ones(p)
        self._pen[-1] = 0.0  # no penalty on the intercept
        if not self._use_newton and b > 1:
            # the root's bound is fixed for the whole fit (R_i(root) = 1), as the softmax's
            xw = data.XgT if data.weight is None else data.XgT * data.weight  # row weights
            self._root_gram = data.reduce(xw @ data.XgT.T)  # (p, p), every process's rows
            self._bound_evals, self._bound_evecs = torch.linalg.eigh(self._bound(self._root_gram))

    def _bound(self, gram: torch.Tensor) -> torch.Tensor:
        """Bohning's bound of every node, batched over their grams (..., p, p)."""
        return bohning_bound(gram, self.alpha, self._pen, self.branching)

    def init_params(self, data: EMData) -> TreeGateParams:
        p = data.XgT.shape[0]
        return TreeGateParams(data.XgT.new_zeros((self.n_nodes, self.branching, p)))

    # ------------------------------------------------------------ E-step
    def _node_log_probs(self, coef: torch.Tensor, XgT: torch.Tensor):
        N, b, p = coef.shape
        return node_log_softmax((coef.reshape(N * b, p) @ XgT).reshape(N, b, -1))

    def log_prob(self, params: TreeGateParams, chunk: Chunk) -> torch.Tensor:
        logg, g = self._node_log_probs(params.coef, chunk.XgT)  # (N, b, c)
        chunk.scratch["tree_gate_prob"] = g
        return path_log_probs(logg, self.branching)[-1]  # (K, c)

    def log_weights(self, params: TreeGateParams, XgT: torch.Tensor) -> torch.Tensor:
        return self.node_log_weights(params, XgT)[-1]

    def node_log_weights(self, params: TreeGateParams, XgT: torch.Tensor) -> list[torch.Tensor]:
        """log P(node | x) for every level l = 1..D, each of shape (b^l, n)."""
        return path_log_probs(self._node_log_probs(params.coef, XgT)[0], self.branching)

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        g = chunk.scratch["tree_gate_prob"]  # (N, b, c)
        N, b, c = g.shape
        xt = chunk.XgT
        post = node_posteriors(resp, self.depth, b)
        targets = torch.cat([r.reshape(-1, b, c) for r in post[1:]])  # (N, b, c): R_i(child)
        parent = torch.cat(post[1:-1]) if N > 1 else None  # (N - 1, c): R_i(n), n below the root
        # the root's posterior is the row's weight (1 without weights); below, R_i(n)
        root = g[:1] if chunk.weight is None else g[:1] * chunk.weight
        wg = root if parent is None else torch.cat([root, g[1:] * parent.unsqueeze(1)])
        grad = ((targets - wg).reshape(N * b, c) @ xt.T).reshape(N, b, -1)  # (N, b, p)
        if not self._use_newton:
            return grad, None if parent is None else self._grams(chunk, parent)
        # per node, the weights R_i(n) g_k (delta_kl - g_l) for the pairs k <= l
        T = b * (b + 1) // 2
        w = chunk.data.workspace("tree_hess_w", N * T, c)[: N * T, :c].view(N, T, c)
        t = 0
        for k in range(b):
            torch.mul(g[:, k : k + 1], g[:, k:], out=w[:, t : t + b - k]).neg_()
            w[:, t].add_(g[:, k])
            t += b - k
        if parent is not None:
            w[1:] *= parent.unsqueeze(1)
        if chunk.weight is not None:
            w[0] *= chunk.weight
        return grad, self._grams(chunk, w.view(N * T, c))

    @staticmethod
    def _grams(chunk: Chunk, w: torch.Tensor) -> torch.Tensor:
        """chunk.weighted_grams(w), in groups of weights whose scratch stays bounded."""
        rows = max(1, CHUNK_SCRATCH_BYTES // (w.shape[1] * w.element_size()))
        if w.shape[0] <= rows:
            return chunk.weighted_grams(w, "g")
        parts = [chunk.weighted_grams(w[s : s + rows], "g") for s in range(0, w.shape[0], rows)]
        return torch.cat(parts, dim=1 if parts[0].ndim == 2 else 0)

    def m_step(self, params, stats, data: EMData, resp=None) -> TreeGateParams:
        if params is None:
            params = self.init_params(data)
        b = self.branching
        if b == 1:
            return params
        grad, curv = stats
        V = params.coef  # (N, b, p)
        N, _, p = V.shape
        pen = self._pen
        g = (grad - self.alpha * V * pen).reshape(N, b * p)  # gradient of Q_g per node
        if self._use_newton:
            blocks = unpack_grams(curv, p)[0].reshape(N, -1, p, p)  # (N, T, p, p)
            A = V.new_zeros((N, b, p, b, p))
            rows, cols = torch.triu_indices(b, b)
            for t, (k, l) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
                A[:, k, :, l, :] = blocks[:, t]
                A[:, l, :, k, :] = blocks[:, t]
            A = A.reshape(N, b * p, b * p) + self.alpha * torch.diag(pen.repeat(b))
            step = solve_psd(A, g.unsqueeze(2)).squeeze(2)
        else:
            step = torch.empty_like(g)
            step[0] = bound_step(self._bound_evals, self._bound_evecs, g[0])
            if N > 1:
                evals, evecs = torch.linalg.eigh(self._bound(unpack_grams(curv, p)[0]))
                step[1:] = bound_step(evals, evecs, g[1:])
        return TreeGateParams(V + step.reshape(N, b, p))

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, N, b, p)
    batchable = True

    def log_prob_many(self, params: TreeGateParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        S, N, b, p = params.coef.shape
        logits = times_design(params.coef.reshape(S, N * b, p), chunk.XgT)
        logg, g = node_log_softmax(logits.reshape(S, N, b, -1))  # (S, N, b, c)
        chunk.scratch["tree_gate_prob_many"] = g
        return path_log_probs(logg, b)[-1]

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        g = chunk.scratch["tree_gate_prob_many"]  # (S, N, b, c)
        S, N, b, c = g.shape
        xt = chunk.XgT
        post = node_posteriors(resp, self.depth, b)  # entry l: (S, b^l, c)
        targets = torch.cat([r.reshape(S, -1, b, c) for r in post[1:]], 1)  # R_i(child)
        parent = torch.cat(post[1:-1], 1) if N > 1 else None  # (S, N - 1, c): R_i(n)
        root = g[:, :1] if chunk.weight is None else g[:, :1] * chunk.weight
        wg = root if parent is None else torch.cat([root, g[:, 1:] * parent.unsqueeze(2)], 1)
        grad = design_sums((targets - wg).reshape(S, N * b, c), xt)
        grad = grad.view(S, N, b, -1)  # (S, N, b, p)
        if not self._use_newton:
            return grad, None if parent is None else self._grams_many(chunk, parent)
        T = b * (b + 1) // 2
        w = g.new_empty((S, N, T, c))  # R_i(n) g_k (delta_kl - g_l), pairs k <= l
        t = 0
        for k in range(b):
            torch.mul(g[:, :, k : k + 1], g[:, :, k:], out=w[:, :, t : t + b - k]).neg_()
            w[:, :, t].add_(g[:, :, k])
            t += b - k
        if parent is not None:
            w[:, 1:] *= parent.unsqueeze(2)
        if chunk.weight is not None:
            w[:, 0] *= chunk.weight
        return grad, self._grams_many(chunk, w.view(S, N * T, c))

    @classmethod
    def _grams_many(cls, chunk: Chunk, w: torch.Tensor) -> torch.Tensor:
        """:meth:`_grams` of S weight sets (S, W, c), stacked. Wide designs: per start, on
        a copy of its weights (a product may round by its operand's address, see
        :mod:`moekit._core.batch`; a copy starts where an allocation starts)."""
        if packed(chunk.XgT.shape[0]):
            return batched_grams(chunk, w, "g")
        return torch.stack([cls._grams(chunk, ws.clone()) for ws in w])

    def log_prior_many(self, params: TreeGateParams) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts, shape (S,)."""
        return -0.5 * self.alpha * ((params.coef * self._pen) ** 2).sum((1, 2, 3))

    def m_step_many(self, params: TreeGateParams, stats, data: EMData) -> TreeGateParams:
        """:meth:`m_step` of S stacked starts: every node's system batched over starts.

        Systems of odd size b p are grown to even ones (:func:`even_system`, zero
        fill: the pseudo-inverse gives the new direction no weight), so that a
        start's factorisation does not depend on its place in the batch.
        """
        V = params.coef  # (S, N, b, p)
        S, N, b, p = V.shape
        if b == 1:
            return params
        grad, curv = stats
        q = b * p
        g = (grad - self.alpha * V * self._pen).reshape(S, N, q)
        if self._use_newton:
            blocks = unpack_grams(flat_grams(curv), p)[0].view(S, N, -1, p, p)  # (S, N, T, p, p)
            A = V.new_zeros((S, N, b, p, b, p))
            rows, cols = torch.triu_indices(b, b)
            for t, (k, l) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
                A[:, :, k, :, l, :] = blocks[:, :, t]
                A[:, :, l, :, k, :] = blocks[:, :, t]
            A = A.reshape(S, N, q, q) + self.alpha * torch.diag(self._pen.repeat(b))
            step = solve_psd(*even_system(A, g.unsqueeze(-1), 0.0))[..., :q, 0]
        else:
            step = torch.empty_like(g)
            root = self._bound_evecs.expand(S, -1, -1)  # the fixed bound, one start's shape each
            step[:, 0] = bound_step(self._bound_evals, root, g[:, 0])
            if N > 1:
                bound = self._bound(unpack_grams(flat_grams(curv), p)[0]).view(S, N - 1, q, q)
                Be, ge = even_system(bound, g[:, 1:].unsqueeze(-1), 0.0)
                evals, evecs = torch.linalg.eigh(Be)
                step[:, 1:] = bound_step(evals, evecs, ge[..., 0])[..., :q]
        return TreeGateParams(V + step.view(S, N, b, p))

    def log_prior(self, params: TreeGateParams) -> float:
        V = params.coef
        return -0.5 * self.alpha * float((V[..., :-1] ** 2).sum())

    def n_parameters(self, params: TreeGateParams) -> int:
        return self.n_nodes * (self.branching - 1) * params.coef.shape[2]

    # ------------------------------------------------------------ renumbering
    def select(self, params: TreeGateParams, perm: torch.Tensor) -> TreeGateParams:
        """The gate with its leaves in the order ``perm``.

        At depth 1 any indices (repeated too: add :meth:`shift` to renormalise), as
        the softmax gate; deeper, ``perm`` may only reorder children within nodes
        (see :meth:`representable_order`).
        """
        coef = params.coef
        if self.depth == 1:
            return TreeGateParams(coef[:, perm.to(coef.device)].contiguous())
        N, b, p = coef.shape
        rows = child_rows(perm, self.depth, b).to(coef.device)
        return TreeGateParams(coef.reshape(N * b, p)[rows].reshape(N, b, p))

    def representable_order(self, perm: torch.Tensor) -> torch.Tensor:
        """The leaf order nearest to ``perm`` that only reorders children within nodes
        (see :func:`~moekit.gates.tree_structure.representable_order`)."""
        return representable_order(perm, self.depth, self.branching)

    def shift(self, params: TreeGateParams, delta: torch.Tensor) -> TreeGateParams:
        """Depth 1: the gate with log g_k(x) + delta_k, when the shifted weights sum to one."""
        if self.depth != 1:
            raise ValueError("only a tree of depth 1 shifts its leaves' weights one by one")
        coef = params.coef.clone()
        coef[0, :, -1] += delta.to(coef)
        return TreeGateParams(coef)

    # ------------------------------------------------------------ nesting
    def simpler(self):
        """The gate this one contains: the tree one level shallower (constant at depth 1)."""
        if self.depth == 1:
            return ConstantGate(self.branching)
        return TreeGate(self.depth - 1, self.branching, self.alpha, self.solver)

    def expert_origin(self) -> torch.Tensor | None:
        """Leaf of :meth:`simpler`'s tree each leaf descends from, shape (K,); None at
        depth 1, whose simpler (constant) gate has the same experts."""
        if self.depth == 1:
            return None
        return torch.arange(self.n_experts) // self.branching

    def embed(self, params, data: EMData) -> TreeGateParams:
        """A fit of :meth:`simpler` as this gate, at the same mixture density.

        Depth 1: the constant weights' log pi as intercepts. Deeper: the shallower
        tree's nodes as they are, and every new node (a former leaf, now split into b
        leaves) uniform, so each new leaf weighs its parent's weight over b; with the
        experts copied from the parent (:meth:`expert_origin`), p(y | x) is unchanged.
        """
        p = data.XgT.shape[0]
        coef = data.XgT.new_zeros((self.n_nodes, self.branching, p))
        if isinstance(params, ConstantGateParams):
            coef[0, :, -1] = params.log_pi
        else:
            coef[: params.coef.shape[0]] = params.coef
        return TreeGateParams(coef)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: TreeGateParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef}

    def from_free(self, free: dict[str, torch.Tensor]) -> TreeGateParams:
        return TreeGateParams(free["coef"])

    def log_weights_free(self, free: dict[str, torch.Tensor], XgT: torch.Tensor) -> torch.Tensor:
        V = free["coef"]
        N, b, p = V.shape
        logg = torch.log_softmax((V.reshape(N * b, p) @ XgT).reshape(N, b, -1), dim=1)
        return path_log_probs(logg, b)[-1]

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return -0.5 * self.alpha * (free["coef"][..., :-1] ** 2).sum()

    # ------------------------------------------------------------ reporting
    def node_names(self) -> list[str]:
        """Names of the internal nodes: "root", then their paths ("1", "0.1", ...)."""
        return node_names(self.depth, self.branching)

    def report(self, params: TreeGateParams, scaling: Scaling, reference: int = 0) -> Report:
        """Per node, intercept and slopes of its children c != reference against child
        ``reference`` (a node's softmax depends only on differences of its rows)."""
        b = self.branching
        if not 0 <= reference < b:
            raise ValueError(
                f"gate_reference is the child every node's other children are compared "
                f"with, in [0, {b}) for a tree of branching {b}; got {reference}."
            )
        others = [c for c in range(b) if c != reference]
        V = params.coef
        rel = V[:, others] - V[:, reference : reference + 1]  # (N, b - 1, p)
        labels = coef_labels(scaling)
        blocks = [f"gate {name}: child {c} vs {reference}"
                  for name in self.node_names() for c in others for _ in labels]  # fmt: skip
        out = Report(fixed={"gate_reference": torch.tensor(reference)})
        out.add("gate", coef_to_data(rel, scaling), blocks, labels * (len(blocks) // len(labels)))
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        ref = int(fixed["gate_reference"])
        rel = coef_from_data(values["gate"], scaling)  # (N, b - 1, p)
        zero = torch.zeros_like(rel[:, :1])
        return {"coef": torch.cat([rel[:, :ref], zero, rel[:, ref:]], 1)}

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`TreeGateParams` fields for a gate design of p columns."""
        return {"coef": (self.n_nodes, self.branching, p)}

    def check_params(self, params: TreeGateParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients (ValueError naming the field)."""
        check_finite(prefix + "coef", params.coef)
