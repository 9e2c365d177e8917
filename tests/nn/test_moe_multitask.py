"""Multi-task MoE (MMoE, OMoE, PLE, shared-bottom): shapes, equivalences, gates, training."""

import doctest

import pytest
import torch
from torch import nn

from moekit.nn import MultiGateMoE, SharedBottom, StackedMLP
from moekit.nn import multitask as mt

D = 6

VARIANTS = {
    "mmoe": lambda: MultiGateMoE(D, 4, 3, 5, tower_hidden=(4, 3)),
    "omoe": lambda: MultiGateMoE(D, 4, 3, 5, n_gates=1),
    "ple": lambda: MultiGateMoE(D, 2, 3, (5, 4), tower_hidden=(), n_task_experts=2),
    "ple_no_shared": lambda: MultiGateMoE(D, 0, 2, 5, n_task_experts=2),
    "always_on": lambda: MultiGateMoE(D, 3, 2, 5, n_shared_experts=2, d_out=2),
    "shared_bottom": lambda: SharedBottom(D, 7, 3, tower_hidden=4),
}


def _relu_mlp(stack: StackedMLP, i: int) -> nn.Sequential:
    """Network ``i`` of a stack as a plain nn.Sequential with the same weights."""
    layers = []
    for w, b in zip(stack.weights, stack.biases, strict=True):
        lin = nn.Linear(w.shape[1], w.shape[2])
        with torch.no_grad():
            lin.weight.copy_(w[i].T)
            lin.bias.copy_(b[i, 0])
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*(layers if stack.activate_last else layers[:-1]))


def _loop_reference(model: MultiGateMoE, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's maths written plainly: a loop over tasks and experts."""
    outs = []
    for t in range(model.n_tasks):
        g = 0 if model.n_gates == 1 else t
        seen = list(range(model.n_experts)) + [
            model.n_experts + t * model.n_task_experts + j for j in range(model.n_task_experts)
        ]
        logits = torch.stack([x @ model.gate_weight[g, :, j] for j in range(len(seen))], dim=1)
        gate = torch.softmax(logits, dim=1)
        mixed = sum(gate[:, j : j + 1] * _relu_mlp(model.experts, e)(x) for j, e in enumerate(seen))
        if model.always_on is not None:
            mixed = mixed + sum(_relu_mlp(model.always_on, s)(x) for s in range(model.always_on.n))
        outs.append(_relu_mlp(model.towers, t)(mixed))
    return outs


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_every_parameter_gets_a_gradient(name):
    model = VARIANTS[name]()
    x = torch.randn(2, 5, D)
    ys = model(x)
    assert len(ys) == model.n_tasks
    assert all(y.shape == (2, 5, model.d_out) for y in ys)
    sum(y.pow(2).sum() for y in ys).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["mmoe", "omoe", "ple", "ple_no_shared", "always_on"])
def test_forward_equals_a_plain_loop_over_tasks_and_experts(name):
    model = VARIANTS[name]()
    x = torch.randn(9, D)
    for y, ref in zip(model(x), _loop_reference(model, x), strict=True):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mmoe", "omoe", "ple", "ple_no_shared", "always_on"])
def test_gate_rows_sum_to_one_and_stats_are_their_batch_means(name):
    model = VARIANTS[name]()
    x = torch.randn(11, D)
    gates = model.gate_weights(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:2]))
    model(x)
    use = model.stats.task_expert_weights
    assert use.shape == (model.n_tasks, model.n_gated) and not use.requires_grad
    torch.testing.assert_close(use.sum(1), torch.ones(model.n_tasks))
    for t in range(model.n_tasks):
        g = 0 if model.n_gates == 1 else t
        torch.testing.assert_close(use[t, model.visible[g]], gates[g].mean(0))
        hidden = torch.ones(model.n_gated, dtype=torch.bool)
        hidden[model.visible[g]] = False
        assert (use[t, hidden] == 0).all()  # PLE: other tasks' experts get nothing


def test_one_task_one_expert_is_an_mlp_and_tower():
    model = MultiGateMoE(D, 1, 1, (8, 5), tower_hidden=4)
    mlp = nn.Sequential(_relu_mlp(model.experts, 0), _relu_mlp(model.towers, 0))
    x = torch.randn(13, D)
    (y,) = model(x)
    torch.testing.assert_close(y, mlp(x))
    torch.testing.assert_close(model.stats.task_expert_weights, torch.ones(1, 1))


def test_shared_bottom_is_the_one_expert_multigate_model():
    sb = SharedBottom(D, 7, 3, tower_hidden=(4,))
    moe = MultiGateMoE(D, 1, 3, 7, tower_hidden=(4,))
    moe.experts.load_state_dict(sb.bottom.state_dict())
    moe.towers.load_state_dict(sb.towers.state_dict())
    x = torch.randn(10, D)
    for a, b in zip(sb(x), moe(x), strict=True):
        torch.testing.assert_close(a, b)


def test_omoe_is_mmoe_with_tied_gates():
    # MMoE contains OMoE: copying the one gate to every task gives the same function
    omoe = MultiGateMoE(D, 4, 3, 5, n_gates=1)
    mmoe = MultiGateMoE(D, 4, 3, 5)
    state = omoe.state_dict()
    state["gate_weight"] = state["gate_weight"].expand(3, -1, -1).clone()
    mmoe.load_state_dict(state)
    x = torch.randn(10, D)
    for a, b in zip(omoe(x), mmoe(x), strict=True):
        torch.testing.assert_close(a, b)


def test_same_seed_same_model():
    torch.manual_seed(5)
    a = MultiGateMoE(D, 4, 2, 5, n_task_experts=1)
    torch.manual_seed(5)
    b = MultiGateMoE(D, 4, 2, 5, n_task_experts=1)
    x = torch.randn(4, D)
    for ya, yb in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_vmap_over_stacked_models_matches_each_model():
    # the benchmark trains many seeds at once this way
    models = [MultiGateMoE(D, 3, 2, 5) for _ in range(4)]
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(4, 7, D)

    def run(p, b, xi):
        return tuple(torch.func.functional_call(models[0], (p, b), (xi,)))

    ys = torch.vmap(run)(params, buffers, x)
    for i, m in enumerate(models):
        for t, y in enumerate(m(x[i])):
            torch.testing.assert_close(ys[t][i], y)


def test_short_training_lowers_the_loss(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, D, generator=gen)
    y = torch.stack([torch.sin(2 * x[:, 0]) + x[:, 1], torch.cos(2 * x[:, 0]) - x[:, 2]], 1)
    model = MultiGateMoE(D, 4, 2, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        return sum(nn.functional.mse_loss(p[:, 0], y[:, t]) for t, p in enumerate(model(x)))

    with torch.no_grad():
        start = float(loss_fn())
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(loss_fn()) < 0.2 * start


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: MultiGateMoE(0, 4, 2, 5), "d_in"),
        (lambda: MultiGateMoE(D, -1, 2, 5), "n_experts"),
        (lambda: MultiGateMoE(D, 0, 2, 5), "n_experts"),
        (lambda: MultiGateMoE(D, 4, 0, 5), "n_tasks"),
        (lambda: MultiGateMoE(D, 4, 2.0, 5), "n_tasks"),
        (lambda: MultiGateMoE(D, 4, 2, 0), "expert_hidden"),
        (lambda: MultiGateMoE(D, 4, 2, ()), "expert_hidden"),
        (lambda: MultiGateMoE(D, 4, 2, "16"), "expert_hidden"),
        (lambda: MultiGateMoE(D, 4, 2, 5, tower_hidden=(8, 0)), "tower_hidden"),
        (lambda: MultiGateMoE(D, 4, 2, 5, n_shared_experts=-1), "n_shared_experts"),
        (lambda: MultiGateMoE(D, 4, 2, 5, n_task_experts=True), "n_task_experts"),
        (lambda: MultiGateMoE(D, 4, 3, 5, n_gates=2), "n_gates"),
        (lambda: MultiGateMoE(D, 4, 3, 5, n_task_experts=1, n_gates=1), "n_gates"),
        (lambda: MultiGateMoE(D, 4, 3, 5, d_out=0), "d_out"),
        (lambda: SharedBottom(D, (), 2), "bottom_hidden"),
        (lambda: SharedBottom(D, 8, 0), "n_tasks"),
    ],
)
def test_bad_arguments_are_named(make, name):
    with pytest.raises(ValueError, match=f"'{name}' parameter of"):
        make()


@pytest.mark.parametrize("model", [MultiGateMoE(D, 2, 2, 4), SharedBottom(D, 4, 2)])
def test_bad_input_is_refused(model):
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        model([[0.0] * D])
    with pytest.raises(ValueError, match=f"d_in={D}"):
        model(torch.randn(3, D + 1))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(3, D, dtype=torch.float64))


def test_docstring_examples():
    result = doctest.testmod(mt, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
