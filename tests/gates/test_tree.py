"""The tree gate: path products, its M-step against autograd, renumbering and nesting."""

import itertools

import pytest
import torch

from moekit._core.data import Chunk, EMData
from moekit._core.reporting import Scaling
from moekit.gates import tree as tree_module
from moekit.gates.constant import ConstantGateParams
from moekit.gates.softmax import SoftmaxGate, SoftmaxGateParams
from moekit.gates.tree import TreeGate, TreeGateParams

SHAPES = [(1, 3), (2, 2), (2, 3), (3, 2)]


def _data(n=300, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn((p - 1, n), generator=gen, dtype=torch.float64)
    XT = torch.cat([X, torch.ones((1, n), dtype=torch.float64)])
    return EMData(XT, XT, torch.zeros(n, dtype=torch.float64))


def _random_params(gate, p, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (gate.n_nodes, gate.branching, p)
    return TreeGateParams(torch.randn(shape, generator=gen, dtype=torch.float64))


def _soft_targets(K, n, seed=2):
    gen = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand((K, n), generator=gen, dtype=torch.float64))
    return e / e.sum(0)


def _naive_leaf_log_weights(gate, params, XT):
    """log g_k(x) by walking every leaf's path from the root, one node at a time."""
    b, D = gate.branching, gate.depth
    logg = torch.log_softmax(torch.einsum("tbp,pn->tbn", params.coef, XT), dim=1)
    out = []
    for digits in itertools.product(range(b), repeat=D):  # leaf k's path, root first
        node, total = 0, 0.0
        for c in digits:
            total = total + logg[node, c]
            node = node * b + c + 1  # children of internal node t are b t + 1, ..., b t + b
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize(("depth", "branching"), SHAPES)
def test_leaf_weights_are_products_along_paths(depth, branching):
    data, gate = _data(), TreeGate(depth, branching)
    params = _random_params(gate, 3)
    logw = gate.log_weights(params, data.XgT)
    assert logw.shape == (branching**depth, data.n)
    torch.testing.assert_close(logw, _naive_leaf_log_weights(gate, params, data.XgT))
    torch.testing.assert_close(logw.exp().sum(0), torch.ones(data.n, dtype=torch.float64))
    torch.testing.assert_close(gate.log_weights_free({"coef": params.coef}, data.XgT), logw)
    levels = gate.node_log_weights(params, data.XgT)
    for lower, upper in zip(levels[1:], levels[:-1], strict=True):  # a node's children add up
        torch.testing.assert_close(
            lower.exp().reshape(upper.shape[0], branching, -1).sum(1), upper.exp()
        )


def _q_gate(gate, coef, XT, resp):
    """The gate's part of the EM objective, sum_ik r_ik log g_k(x_i) + log-prior."""
    free = {"coef": coef}
    return (resp * gate.log_weights_free(free, XT)).sum() + gate.log_prior_free(free)


@pytest.mark.parametrize(("depth", "branching"), SHAPES)
def test_newton_step_is_the_exact_newton_step_of_the_gate_objective(depth, branching):
    """The per-node gradients and Hessian blocks equal autograd's on sum_ik r_ik log g_k."""
    data = _data()
    gate = TreeGate(depth, branching, alpha=0.1, solver="newton")
    gate.prepare(data)
    params = _random_params(gate, 3)
    resp = _soft_targets(gate.n_experts, data.n)
    chunk = Chunk(0, data.n, data)
    gate.log_prob(params, chunk)
    new = gate.m_step(params, gate.chunk_stats(params, chunk, resp), data)

    coef = params.coef.clone()
    grad = torch.func.grad(lambda c: _q_gate(gate, c, data.XgT, resp))(coef)
    hess = torch.func.hessian(lambda c: _q_gate(gate, c, data.XgT, resp))(coef)
    N, q = gate.n_nodes, branching * 3
    blocks = hess.reshape(N, q, N, q)
    for s, t in itertools.product(range(N), repeat=2):  # block diagonal over nodes
        if s != t:
            assert float(blocks[s, :, t].abs().max()) == 0.0
    # each node's Hessian is singular along the common shift of its intercepts: the
    # minimum-norm step (pseudo-inverse)
    step = torch.stack(
        [
            torch.linalg.pinv(-blocks[t, :, t], hermitian=True, rtol=1e-10) @ grad[t].reshape(q)
            for t in range(N)
        ]
    )
    torch.testing.assert_close(new.coef - coef, step.reshape(coef.shape))


@pytest.mark.parametrize(("depth", "branching"), SHAPES)
def test_bohning_step_never_lowers_the_gate_objective(depth, branching):
    data = _data()
    gate = TreeGate(depth, branching, alpha=1e-3, solver="bohning")
    gate.prepare(data)
    assert gate.monotone
    params = _random_params(gate, 3)
    resp = _soft_targets(gate.n_experts, data.n)
    before = float(_q_gate(gate, params.coef, data.XgT, resp))
    for _ in range(5):
        chunk = Chunk(0, data.n, data)
        gate.log_prob(params, chunk)
        params = gate.m_step(params, gate.chunk_stats(params, chunk, resp), data)
        after = float(_q_gate(gate, params.coef, data.XgT, resp))
        assert after >= before - 1e-9
        before = after


def test_depth_one_does_the_softmax_gates_arithmetic():
    data = _data(400, 4)
    soft, tree = SoftmaxGate(3, alpha=1e-3), TreeGate(1, 3, alpha=1e-3)
    coef = _random_params(tree, 4).coef
    resp = _soft_targets(3, data.n)
    outs = []
    for gate, params in ((soft, SoftmaxGateParams(coef[0])), (tree, TreeGateParams(coef))):
        gate.prepare(data)
        chunk = Chunk(0, data.n, data)
        logg = gate.log_prob(params, chunk)
        new = gate.m_step(params, gate.chunk_stats(params, chunk, resp), data)
        outs.append((logg, new.coef.reshape(3, 4)))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-12)


def test_large_weight_sets_are_gathered_in_groups(monkeypatch):
    data = _data(500, 3)
    gate = TreeGate(3, 2, solver="newton")
    gate.prepare(data)
    params, resp = _random_params(gate, 3), _soft_targets(8, data.n)
    chunk = Chunk(0, data.n, data)
    gate.log_prob(params, chunk)
    whole = gate.chunk_stats(params, chunk, resp)
    monkeypatch.setattr(tree_module, "CHUNK_SCRATCH_BYTES", 8 * data.n * 4)  # 4 rows a group
    chunk = Chunk(0, data.n, data)
    gate.log_prob(params, chunk)
    grouped = gate.chunk_stats(params, chunk, resp)
    torch.testing.assert_close(grouped[1], whole[1])


def test_children_reorder_within_nodes_only():
    data, gate = _data(), TreeGate(2, 2)
    params = _random_params(gate, 3)
    logw = gate.log_weights(params, data.XgT)
    perm = torch.tensor([3, 2, 0, 1])  # root's children swapped, then node 1's
    moved = gate.select(params, perm)
    torch.testing.assert_close(gate.log_weights(moved, data.XgT), logw[perm])
    with pytest.raises(ValueError, match="only the children of a node may be reordered"):
        gate.select(params, torch.tensor([0, 2, 1, 3]))
    # the nearest order a tree can take: every node's children by the mean rank below them
    assert gate.representable_order(torch.tensor([2, 0, 3, 1])).tolist() == [2, 3, 0, 1]
    flat = TreeGate(1, 4)
    assert flat.representable_order(torch.tensor([2, 0, 3, 1])).tolist() == [2, 0, 3, 1]


@pytest.mark.parametrize("branching", [2, 3])
def test_embedding_splits_every_leaf_into_equal_children(branching):
    data = _data()
    shallow, deep = TreeGate(1, branching), TreeGate(2, branching)
    params = _random_params(shallow, 3)
    grown = deep.embed(params, data)
    log_small = shallow.log_weights(params, data.XgT)
    origin = deep.expert_origin()
    torch.testing.assert_close(
        deep.log_weights(grown, data.XgT),
        log_small[origin] - torch.log(torch.tensor(float(branching), dtype=torch.float64)),
    )
    assert shallow.simpler().n_experts == branching and deep.simpler().depth == 1
    const = ConstantGateParams(torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)))
    torch.testing.assert_close(
        TreeGate(1, 3).log_weights(TreeGate(1, 3).embed(const, data), data.XgT)[:, 0],
        const.log_pi,
    )


def test_report_round_trip_and_reference_check():
    gate = TreeGate(2, 3)
    p = 3
    params = _random_params(gate, p)
    params.coef -= params.coef.mean(1, keepdim=True)
    scaling = Scaling(
        torch.tensor([0.5, -1.0], dtype=torch.float64),
        torch.tensor([2.0, 0.5], dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        ["a", "b"],
        ["y"],
    )
    rep = gate.report(params, scaling, reference=1)
    assert len(rep.labels) == gate.n_nodes * 2 * p
    assert rep.blocks[0] == "gate root: child 0 vs 1" and rep.blocks[-1] == "gate 2: child 2 vs 1"
    back = gate.from_report(rep.unflatten(rep.flat()), scaling, rep.fixed)["coef"]
    torch.testing.assert_close(back - back.mean(1, keepdim=True), params.coef)
    with pytest.raises(ValueError, match=r"gate_reference .* in \[0, 3\)"):
        gate.report(params, scaling, reference=3)


def test_a_deep_tree_has_only_its_own_number_of_leaves():
    gate = TreeGate(2, 3)
    assert gate.n_experts == 9 and gate.n_nodes == 4 and not gate.resizable
    assert gate.resized(1).n_experts == 1 and gate.resized(9).depth == 2
    with pytest.raises(ValueError, match="has 9 leaves; it cannot have 8"):
        gate.resized(8)
    assert TreeGate(1, 3).resized(2).n_experts == 2
