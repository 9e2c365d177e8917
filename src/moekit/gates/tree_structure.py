"""The shape of a tree gate: its nodes, the paths to its leaves, and their order.

Pure functions of a full tree of depth D and branching b, on the layout of
:mod:`moekit.gates.tree`: internal nodes numbered level by level from the root
(node 0), node t's children nodes b t + 1, ..., b t + b, and leaf k the k-th node of
level D, so that the leaves below a node are consecutive. The gate's EM steps use
them; its renumbering after a fit (experts in the documented order) asks which leaf
orders a tree can take at all: only those that reorder the children of a node.
"""

from __future__ import annotations

import torch

from moekit.gates.softmax import log_softmax_rows


# ---------------------------------------------------------------------------- weights
def n_internal(depth: int, branching: int) -> int:
    """Internal nodes of a full tree: 1 + b + ... + b^(D-1)."""
    return sum(branching**level for level in range(depth))


def node_log_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax over the children (axis -2) of (..., N, b, c) logits, and the probabilities.

    Elementwise over b rows, as :func:`moekit.gates.softmax.log_softmax_rows`, so that
    a tree of depth 1 computes exactly what the softmax gate computes.
    """
    return log_softmax_rows(logits, dim=-2)


def path_log_probs(logg: torch.Tensor, branching: int) -> list[torch.Tensor]:
    """Log-probabilities of reaching every node, level by level.

    Parameters
    ----------
    logg : Tensor of shape (..., N, b, c)
        log g_{n,c}(x) of every internal node's children (leading axes: S stacked
        starts, say).

    Returns
    -------
    list of Tensor
        Entry l - 1 has shape (..., b^l, c): log P(node j of level l | x), l = 1, ..., D.
    """
    lead = logg.shape[:-3]
    path = logg[..., 0, :, :]  # (..., b, c)
    levels, start = [path], 1
    while start < logg.shape[-3]:
        width = path.shape[-2]  # internal nodes on this level
        path = (path.unsqueeze(-2) + logg[..., start : start + width, :, :]).reshape(
            *lead, width * branching, -1
        )
        levels.append(path)
        start += width
    return levels


def node_posteriors(resp: torch.Tensor, depth: int, branching: int) -> list[torch.Tensor]:
    """R_i(n) for the nodes of every level, from the leaves' responsibilities (..., K, c).

    Returns a list whose entry l has shape (..., b^l, c), l = 0, ..., D (entry 0 is
    the root's, the sum of every row's responsibilities, which is 1). Leading axes
    (S stacked starts) are kept.
    """
    levels = [resp]
    for _ in range(depth):
        r = levels[0]
        nodes = r.reshape(*r.shape[:-2], r.shape[-2] // branching, branching, r.shape[-1])
        levels.insert(0, nodes.sum(-2))
    return levels


# ---------------------------------------------------------------------------- order
def level_orders(perm: torch.Tensor, depth: int, branching: int) -> list[torch.Tensor]:
    """The node order of every level 1..D that a leaf order ``perm`` implies.

    Raises
    ------
    ValueError
        Unless ``perm`` only reorders children within their nodes (every other leaf
        order breaks the tree).
    """
    b, D, K = branching, depth, branching**depth
    perm = perm.to("cpu", torch.long)
    if perm.shape != (K,) or not torch.equal(torch.sort(perm).values, torch.arange(K)):
        raise ValueError(f"a tree's leaves can only be reordered, not {perm.tolist()}")
    orders = []
    for level in range(1, D + 1):
        size = b ** (D - level)  # leaves below a node of this level
        blocks = (perm // size).reshape(b**level, size)
        if not bool((blocks == blocks[:, :1]).all()):
            raise ValueError(
                f"leaf order {perm.tolist()} mixes the subtrees of level {level}: only "
                "the children of a node may be reordered"
            )
        orders.append(blocks[:, 0])
    return orders


def child_rows(perm: torch.Tensor, depth: int, branching: int) -> torch.Tensor:
    """Rows of ``coef.reshape(N b, p)`` in the order a leaf order ``perm`` implies.

    The children's rows of the nodes of level l - 1 are the nodes of level l, and
    node j of level l sits in row (b^l - b) / (b - 1) + j (depth >= 2; see
    :func:`level_orders` for the orders refused).
    """
    b = branching
    orders = level_orders(perm, depth, b)
    return torch.cat([(b**lv - b) // (b - 1) + o for lv, o in enumerate(orders, 1)])


def representable_order(perm: torch.Tensor, depth: int, branching: int) -> torch.Tensor:
    """The leaf order nearest to ``perm`` that only reorders children within nodes.

    Every node's children are sorted by the mean position in ``perm`` of the
    leaves below them; at depth 1 this is ``perm`` itself.
    """
    b, D = branching, depth
    rank = torch.empty(b**D, dtype=torch.float64)
    rank[perm.cpu()] = torch.arange(len(perm), dtype=torch.float64)
    order = [0]  # nodes of the current level, in their new order
    for level in range(1, D + 1):
        score = rank.reshape(b**level, -1).mean(1).tolist()  # mean rank below each node
        by_score = score.__getitem__
        order = [c for n in order for c in sorted(range(n * b, n * b + b), key=by_score)]
    return torch.tensor(order)


def node_names(depth: int, branching: int) -> list[str]:
    """Names of the internal nodes: "root", then their paths ("1", "0.1", ...)."""
    names = ["root"]
    for level in range(1, depth):
        for j in range(branching**level):
            digits = [(j // branching**i) % branching for i in range(level)]
            names.append(".".join(str(d) for d in reversed(digits)))
    return names
