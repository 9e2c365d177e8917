"""The MoE layer against plain references: dense FFN, dense mixture, per-token loop."""

import pytest
import torch
from moe_reference import expert_ffn, reference_moe

from moekit.nn import MoE
from moekit.nn.experts import FeedForward

D, H, E = 8, 16, 4
ROUTERS = [  # (router, top_k)
    ("topk", 2),
    ("noisy_topk", 2),
    ("switch", 1),
    ("expert_choice", 2),
    ("sigmoid_bias", 2),
]
TOKEN_CHOICE = [r for r in ROUTERS if r[0] != "expert_choice"]


def make_layer(router="topk", top_k=2, dtype=torch.float64, **kwargs):
    layer = MoE(D, H, E, top_k, router=router, **kwargs).to(dtype)
    return layer.eval()  # eval: no router noise, no bias updates, deterministic routing


def test_one_expert_top_1_equals_dense_ffn():
    layer = MoE(D, H, 1, 1).double()
    dense = FeedForward(D, H).double()
    with torch.no_grad():
        dense.w_in.copy_(layer.experts.w_in[0])
        dense.w_out.copy_(layer.experts.w_out[0])
    x = torch.randn(3, 7, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_top_k_equal_to_n_experts_is_the_dense_softmax_mixture(activation):
    layer = make_layer("topk", E, activation=activation)
    x = torch.randn(10, D, dtype=torch.float64)
    gates = layer.router.logits(x).softmax(-1)  # (T, E)
    experts = torch.stack(
        [FeedForward.forward(_expert(layer, e), x) for e in range(E)], dim=1
    )  # (T, E, D)
    expected = (gates[..., None] * experts).sum(1)
    torch.testing.assert_close(layer(x), expected)


def _expert(layer, e):
    ffn = FeedForward(D, H, layer.config.activation).double()
    with torch.no_grad():
        ffn.w_in.copy_(layer.experts.w_in[e])
        ffn.w_out.copy_(layer.experts.w_out[e])
    return ffn


# mm, bmm: plain autograd; fused, grouped_mm: the fused dispatch (per expert / grouped).
# float64 where the implementation supports it; grouped_mm runs float32/bf16 only
IMPLS = [
    ("mm", torch.float64),
    ("bmm", torch.float64),
    ("fused", torch.float64),
    ("grouped_mm", torch.float32),
]


def tolerances(dtype):
    return {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("impl, dtype", IMPLS)
@pytest.mark.parametrize("router, top_k", ROUTERS)
def test_dispatch_equals_per_token_loop(router, top_k, impl, dtype):
    layer = make_layer(router, top_k, dtype, expert_impl=impl, n_shared_experts=1)
    x = torch.randn(2, 9, D, dtype=dtype, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    routing = layer.router(x_ref.reshape(-1, D))
    y_ref = reference_moe(layer, x_ref.reshape(-1, D), routing).reshape(x.shape)
    torch.testing.assert_close(y, y_ref, **tolerances(dtype))
    # gradients through the dispatch and combine agree as well
    g = torch.randn_like(y)
    wrt = [x, *layer.parameters()]
    grads = torch.autograd.grad(y, wrt, g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *wrt[1:]], g, allow_unused=True)
    for p, a, b in zip(wrt, grads, grads_ref, strict=True):
        zero = torch.zeros_like(p)  # unused parameters (eval-mode noise weights)
        torch.testing.assert_close(
            zero if a is None else a, zero if b is None else b, **tolerances(dtype)
        )


@pytest.mark.parametrize("impl, dtype", IMPLS)
@pytest.mark.parametrize("router, top_k", TOKEN_CHOICE)
@pytest.mark.parametrize("factor, priority", [(0.5, "choice"), (0.5, "weight"), (1.0, "choice")])
def test_capacity_drops_the_overflow_like_the_loop(router, top_k, factor, priority, impl, dtype):
    layer = make_layer(
        router, top_k, dtype, capacity_factor=factor, expert_impl=impl, capacity_priority=priority
    )
    x = torch.randn(20, D, dtype=dtype) + 0.5  # skewed routing: some experts overflow
    y = layer(x)
    capacity = -(-int(factor * 20 * top_k) // E)
    routing = layer.router(x)
    expected = reference_moe(layer, x, routing, capacity, priority)
    torch.testing.assert_close(y, expected, **tolerances(dtype))
    routed = torch.bincount(routing.indices.flatten(), minlength=E)
    dropped = int((routed - capacity).clamp(min=0).sum())
    assert layer.stats.dropped_fraction == pytest.approx(dropped / (20 * top_k))
    assert torch.equal(layer.stats.tokens_per_expert, routed)
    assert dropped > 0 or factor == 1.0  # factor 0.5 must drop something


def test_dispatch_keeps_a_first_choice_over_another_tokens_second_choice():
    from moekit.nn import Routing
    from moekit.nn.dispatch import plan_dispatch

    # token 0: expert 0 (0.9), then expert 1 (0.1); token 1: expert 1 (0.8), then expert
    # 0 (0.2); one place per expert. Kept in token order, expert 1 would serve token 0's
    # spare choice and drop token 1's main one.
    indices = torch.tensor([[0, 1], [1, 0]])
    weights = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    routing = Routing(weights, indices, torch.zeros(2, 2), torch.zeros(()))
    plan = plan_dispatch(routing, 2, 2, capacity=1)
    assert plan.token.tolist() == [0, 1]  # expert 0 serves token 0, expert 1 token 1
    assert plan.weight.tolist() == pytest.approx([0.9, 0.8])
    assert plan.counts == [1, 1] and plan.dropped_fraction == 0.5


def test_fully_dropped_tokens_get_zero_output():
    layer = make_layer("switch", 1, capacity_factor=0.25)
    x = torch.randn(16, D, dtype=torch.float64)
    y = layer(x)
    # 1 token per expert at most: 4 tokens kept, 12 dropped, their rows are exactly zero
    assert int((y.abs().sum(-1) == 0).sum()) >= 12
    assert layer.stats.dropped_fraction >= 0.75


@pytest.mark.parametrize("router, top_k", TOKEN_CHOICE)
def test_equivariant_to_token_permutation_and_independent_of_batch(router, top_k):
    layer = make_layer(router, top_k)
    x = torch.randn(15, D, dtype=torch.float64)
    y = layer(x)
    perm = torch.randperm(15)
    torch.testing.assert_close(layer(x[perm]), y[perm])
    torch.testing.assert_close(layer(x[:4]), y[:4])
    torch.testing.assert_close(layer(x[7:8]), y[7:8])


def test_expert_choice_depends_on_the_batch_as_documented():
    layer = make_layer("expert_choice", 2)
    x = torch.randn(16, D, dtype=torch.float64)
    perm = torch.randperm(16)
    torch.testing.assert_close(layer(x[perm]), layer(x)[perm])  # still equivariant
    assert torch.equal(layer.stats.tokens_per_expert, torch.full((E,), 8))


@pytest.mark.parametrize("impl", ["mm", "fused"])  # fused: the hand-written backward
@pytest.mark.parametrize("router, top_k", ROUTERS)
def test_gradcheck(router, top_k, impl):
    layer = make_layer(
        router, top_k, n_shared_experts=1, z_loss_coef=0.1, aux_loss_coef=0.1, expert_impl=impl
    )
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x, *ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))
        return out, layer.aux_loss

    # fast mode checks a random directional derivative over every input and parameter;
    # these tolerances catch a gradient that is off by 1%
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    # and the full Jacobian with respect to the input
    assert torch.autograd.gradcheck(lambda x: f(x, *params), (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["grouped_mm", "fused", "bmm"])
def test_float32_paths_match_float64_loop(impl):
    layer = make_layer("topk", 2, dtype=torch.float32, expert_impl=impl)
    ref = make_layer("topk", 2, expert_impl="mm")
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x = torch.randn(40, D, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn(40, D)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g, retain_graph=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *ref.parameters()], g.double())
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    # a second backward through the retained graph gives the same gradients: the fused
    # backward does not overwrite what it saved
    again = torch.autograd.grad(y, [x, *layer.parameters()], g)
    for a, b in zip(grads, again, strict=True):
        torch.testing.assert_close(a, b)
    # a stride-0 gradient (from y.sum()) works on the grouped_mm paths
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_auto_is_the_fused_dispatch_on_the_cpu():
    bank = MoE(16, 32, 4, 2).experts
    assert bank.resolve_impl(torch.randn(5, 16)) == "fused"
    assert bank.resolve_impl(torch.randn(5, 16, dtype=torch.float64)) == "fused"
    assert MoE(16, 32, 4, 2, expert_impl="bmm").experts.resolve_impl(torch.randn(5, 16)) == "bmm"


@pytest.mark.parametrize("impl, dtype", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_bank_on_sorted_rows_matches_row_loop(impl, dtype, activation):
    bank = MoE(D, H, E, 2, activation=activation, expert_impl=impl).experts.to(dtype)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, D, dtype=dtype)
    scale = torch.rand(10, dtype=dtype)
    expert = [e for e, c in enumerate(counts) for _ in range(c)]
    expected = torch.stack([scale[a] * expert_ffn(bank, e, x[a]) for a, e in enumerate(expert)])
    torch.testing.assert_close(bank(x, counts, scale), expected, **tolerances(dtype))


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_paths_with_many_experts_some_empty(activation, impl):
    # 16 experts for 6 tokens: most experts get nothing and must get zero gradients
    layer = MoE(D, H, 16, 2, activation=activation, expert_impl=impl).eval()
    x = torch.randn(6, D, requires_grad=True)
    y = layer(x)
    assert (layer.stats.tokens_per_expert == 0).any()
    ref = reference_moe(layer, x.detach(), layer.router(x.detach()))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    y.backward(torch.ones_like(y))
    empty = layer.stats.tokens_per_expert == 0
    assert (layer.experts.w_in.grad[empty] == 0).all()
    assert (layer.experts.w_out.grad[empty] == 0).all()


def test_aux_loss_is_weighted_sum_of_balance_and_z_losses():
    from moekit.nn import functional as MF

    layer = make_layer("topk", 2, aux_loss_coef=0.3, z_loss_coef=0.2)
    x = torch.randn(10, D, dtype=torch.float64)
    layer(x)
    logits = layer.router.logits(x)
    probs = logits.softmax(-1)
    _, idx = probs.topk(2, -1)
    expected = 0.3 * MF.load_balancing_loss(probs, idx, E) + 0.2 * MF.router_z_loss(logits)
    torch.testing.assert_close(layer.aux_loss, expected)
    assert layer.aux_loss.requires_grad
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router, top_k", ROUTERS)
def test_aux_loss_is_zero_when_coefficients_are_zero(router, top_k):
    layer = make_layer(router, top_k, aux_loss_coef=0.0, z_loss_coef=0.0)
    layer(torch.randn(10, D, dtype=torch.float64))
    assert layer.aux_loss.shape == () and float(layer.aux_loss) == 0.0


def test_aux_loss_is_recomputed_each_forward_not_accumulated():
    layer = make_layer("topk", 2)
    x = torch.randn(10, D, dtype=torch.float64)
    layer(x)
    first = layer.aux_loss.item()
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(first)


def test_stats_after_forward():
    layer = make_layer("topk", 2)
    layer(torch.randn(3, 5, D, dtype=torch.float64))
    stats = layer.stats
    assert stats.tokens_per_expert.shape == (E,)
    assert int(stats.tokens_per_expert.sum()) == 30
    assert stats.dropped_fraction == 0.0
    counts = stats.tokens_per_expert.double()
    assert stats.balance == pytest.approx(float(counts.max() / counts.mean()))


@pytest.mark.parametrize("shape", [(D,), (0, D), (2, 3, 4, D)])
def test_any_leading_shape(shape):
    layer = make_layer("topk", 2)
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape


def test_shared_experts_are_added_to_the_routed_output():
    layer = make_layer("topk", 2, n_shared_experts=2)
    x = torch.randn(7, D, dtype=torch.float64)
    with_shared = layer(x)
    shared = layer.shared(x)
    layer.shared = None
    torch.testing.assert_close(with_shared, layer(x) + shared)
    assert tuple(shared.shape) == (7, D)


def test_router_maths_stays_float32_under_bfloat16_autocast():
    layer = MoE(16, 32, 4, 2)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(x)
        y = layer(x)
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.02)  # bf16 accuracy
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.experts.w_in.grad.dtype == torch.float32
    y_bf16 = MoE(16, 32, 4, 2).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16
