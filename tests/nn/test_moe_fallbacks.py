"""Where the fused dispatch cannot serve, the layer falls back and gives the same numbers.

The fused dispatch is one autograd Function with a hand-written backward: autograd
cannot differentiate that backward again, torch.func transforms and forward-mode AD
need rules it does not have, and torch.compile cannot trace its loop over experts.
Each case is compared with the same layer on the plain per-expert path ('mm').
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from moekit.nn import MoE

D, H, E = 8, 16, 4
FUSED = ["fused", "grouped_mm"]  # the two forms of the fused dispatch
ROUTERS = [("topk", 2), ("switch", 1), ("expert_choice", 2), ("sigmoid_bias", 2)]


def pair(impl, router="topk", top_k=2, dtype=torch.float64, **kwargs):
    """A layer on ``impl`` and the same layer (same weights) on the plain 'mm' path."""
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k, router=router, expert_impl=impl, n_shared_experts=1, **kwargs)
    ref = MoE(D, H, E, top_k, router=router, expert_impl="mm", n_shared_experts=1, **kwargs)
    ref.load_state_dict(layer.state_dict())
    # eval: no router noise; the bias router's counts are not under test here
    return layer.to(dtype).eval(), ref.to(dtype).eval()


def dtype_of(impl):
    return torch.float32 if impl == "grouped_mm" else torch.float64


def close(a, b, dtype):
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("router, top_k", ROUTERS)
def test_double_backward_matches_the_plain_path(impl, router, top_k):
    dtype = dtype_of(impl)
    layer, ref = pair(impl, router, top_k, dtype)
    x = torch.randn(12, D, dtype=dtype)
    assert layer.execution_path(x) == "fused"
    results = []
    for m in (layer, ref):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(xi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()  # a gradient penalty: differentiates the backward
        results.append([gx.detach(), xi.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*results, strict=True):
        zero = torch.zeros((), dtype=dtype)  # unused parameters have no gradient
        close(zero if a is None else a, zero if b is None else b, dtype)


def test_only_a_backward_with_create_graph_leaves_the_hand_written_backward(monkeypatch):
    from moekit.nn import fused

    def refuse(*args):
        raise AssertionError("the differentiable backward ran")

    monkeypatch.setattr(fused, "_differentiable_backward", refuse)
    layer, _ = pair("fused")
    x = torch.randn(12, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert "_FusedMoEBackward" in graph_nodes(y.grad_fn)
    y.sum().backward(retain_graph=True)  # a plain backward: the hand-written one
    assert torch.isfinite(x.grad).all()
    with pytest.raises(AssertionError, match="differentiable backward ran"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def graph_nodes(fn, seen=None):
    """Names of the autograd nodes reachable from ``fn``."""
    seen = set() if seen is None else seen
    if fn is not None and fn not in seen:
        seen.add(fn)
        for child, _ in fn.next_functions:
            graph_nodes(child, seen)
    return {type(f).__name__ for f in seen}


def functional(m):
    names = [n for n, _ in m.named_parameters()]

    def f(params, x):
        out = torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,))
        return out.square().sum()

    return f, tuple(p.detach() for p in m.parameters())


@pytest.mark.parametrize("impl", FUSED)
def test_torch_func_grad_and_jacrev(impl):
    dtype = dtype_of(impl)
    layer, ref = pair(impl, dtype=dtype)
    x = torch.randn(6, D, dtype=dtype)
    (f, params), (f_ref, params_ref) = functional(layer), functional(ref)
    grads, grads_ref = torch.func.grad(f)(params, x), torch.func.grad(f_ref)(params_ref, x)
    for a, b in zip(grads, grads_ref, strict=True):
        close(a, b, dtype)
    close(torch.func.jacrev(layer)(x), torch.func.jacrev(ref)(x), dtype)


@pytest.mark.parametrize("impl", FUSED)
def test_forward_mode_jvp_and_dual_tensors(impl):
    dtype = dtype_of(impl)
    layer, ref = pair(impl, dtype=dtype)
    x, v = torch.randn(6, D, dtype=dtype), torch.randn(6, D, dtype=dtype)
    out, tangent = torch.func.jvp(layer, (x,), (v,))
    out_ref, tangent_ref = torch.func.jvp(ref, (x,), (v,))
    close(out, out_ref, dtype)
    close(tangent, tangent_ref, dtype)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        assert layer.execution_path(dual) == "sorted"
        close(fwAD.unpack_dual(layer(dual)).tangent, tangent_ref, dtype)


@pytest.mark.parametrize("impl", [*FUSED, "mm", "bmm"])
@pytest.mark.parametrize("router, top_k", ROUTERS)
def test_vmap_runs_each_sample_as_the_layer_would(impl, router, top_k):
    dtype = dtype_of(impl)
    layer, _ = pair(impl, router, top_k, dtype)
    x = torch.randn(3, 5, D, dtype=dtype)  # 3 samples of 5 tokens, routed per sample
    batched = torch.vmap(layer)(x)
    assert layer.stats is None  # one routing per sample: no statistics to keep
    close(batched, torch.stack([layer(sample) for sample in x]), dtype)


@pytest.mark.parametrize("priority", ["choice", "weight"])
def test_vmap_drops_for_capacity_like_the_sorted_dispatch(priority):
    layer, _ = pair("fused", capacity_factor=0.5, capacity_priority=priority)
    x = torch.randn(3, 10, D, dtype=torch.float64) + 0.5  # skewed: experts overflow
    expected = torch.stack([layer(sample) for sample in x])
    assert layer.stats.dropped_fraction > 0
    torch.testing.assert_close(torch.vmap(layer)(x), expected)


def test_per_sample_gradients_with_vmap_of_grad():
    layer, _ = pair("fused")
    f, params = functional(layer)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    per_sample = torch.vmap(torch.func.grad(f), in_dims=(None, 0))(params, x)
    for i in range(3):
        for a, b in zip(per_sample, torch.func.grad(f)(params, x[i]), strict=True):
            torch.testing.assert_close(a[i], b)


def test_execution_path_names_the_fallback():
    layer, ref = pair("fused")
    x = torch.randn(4, D, dtype=torch.float64)
    assert layer.execution_path(x) == "fused" and ref.execution_path(x) == "sorted"
    seen = []
    torch.func.grad(lambda x: seen.append(layer.execution_path(x)) or x.sum())(x)
    torch.vmap(lambda x: seen.append(layer.execution_path(x)) or x)(x)
    assert seen == ["sorted", "masked"]


@pytest.mark.parametrize("router, top_k", ROUTERS)
def test_dropless_layer_compiles_without_a_graph_break(router, top_k):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k, router=router, n_shared_experts=1)  # training mode
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 6, D))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # the experts run as the one fused operator, not a trace of per-expert pieces
    assert "moekit.fused_moe" in str(explanation.graphs[0].graph)


@pytest.mark.parametrize("router, top_k", [("topk", 2), ("sigmoid_bias", 2)])
def test_compiled_layer_matches_eager_forward_and_backward(router, top_k):
    # aot_eager traces forward and backward as torch.compile does, without generating
    # code (fast); the inductor test below is marked slow
    _compiled_matches_eager(router, top_k, backend="aot_eager")


@pytest.mark.slow
def test_inductor_compiled_layer_matches_eager_forward_and_backward():
    _compiled_matches_eager("topk", 2, backend="inductor")


def _compiled_matches_eager(router, top_k, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(D, H, E, top_k, router=router, bias_update_rate=0.1)
    eager = MoE(D, H, E, top_k, router=router, bias_update_rate=0.1)
    eager.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 6, D)
        xc = x.clone().requires_grad_()
        xe = x.clone().requires_grad_()
        yc, ye = compiled(xc), eager(xe)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
        (yc.square().sum() + layer.aux_loss).backward()
        (ye.square().sum() + eager.aux_loss).backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
        for a, b in zip(layer.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.stats.tokens_per_expert, eager.stats.tokens_per_expert)
        if router == "sigmoid_bias":  # the compiled graph updates the count buffer too
            assert torch.equal(layer.router.pending_load, eager.router.pending_load)
            layer.update_bias()
            eager.update_bias()
            assert layer.router.bias.abs().sum() > 0
