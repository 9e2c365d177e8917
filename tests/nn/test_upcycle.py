"""Sparse upcycling: the MoE layer equals the dense MLP at init, and noise breaks the
symmetry between copies."""

import warnings

import pytest
import torch

from moekit._core.validation import InvalidParameterError
from moekit.nn import FeedForward, MoE, upcycle
from moekit.nn.experts import activate


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def dense(activation="swiglu", d=16, hidden=48, seed=0):
    torch.manual_seed(seed)
    mlp = FeedForward(d, hidden, activation)
    with torch.no_grad():  # unit-scale weights: outputs of order one
        mlp.w_in.normal_(0, d**-0.5)
        mlp.w_out.normal_(0, hidden**-0.5)
    return mlp


CASES = [(4, 2, 1), (8, 2, 2), (8, 4, 2), (6, 3, 3), (4, 4, 4), (12, 6, 3), (4, 1, 1)]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(("n_experts", "top_k", "granularity"), CASES)
def test_upcycled_layer_equals_the_dense_mlp(activation, n_experts, top_k, granularity):
    mlp = dense(activation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # top_k=1 with renormalised weights
        layer = upcycle(mlp, n_experts, top_k, granularity)
    assert isinstance(layer, MoE)
    assert layer.experts.d_hidden == 48 // granularity
    x = torch.randn(200, 16)
    with torch.no_grad():
        assert relative_error(layer(x), mlp(x)) < 1e-5
    # tokens go to different copies: the routing is not one fixed choice
    assert int((layer.stats.tokens_per_expert > 0).sum()) == n_experts


@pytest.mark.parametrize("granularity", [2, 4])
def test_slices_sum_to_the_mlp_and_need_the_scale(granularity):
    # the g slices of one copy add up to the MLP; the routed scale g makes up for the
    # renormalised weights spreading 1 over g experts of a group
    mlp = dense()
    layer = upcycle(mlp, 2 * granularity, granularity, granularity)
    assert layer.config.routed_scaling_factor == granularity
    bank = layer.experts
    x = torch.randn(30, 16)
    with torch.no_grad():
        slices = [activate(x @ bank.w_in[e], "swiglu") @ bank.w_out[e] for e in range(granularity)]
        torch.testing.assert_close(sum(slices), mlp(x), rtol=1e-5, atol=1e-6)
        # the experts of one virtual group share a router row, the groups differ
        rows = layer.router.weight
        assert torch.equal(rows[0], rows[granularity - 1])
        assert not torch.equal(rows[0], rows[granularity])


def router_grad_after_one_step(noise):
    mlp = dense()
    gen = torch.Generator().manual_seed(0)
    layer = upcycle(mlp, 8, 2, noise=noise, generator=gen, aux_loss_coef=0.0)
    x, target = torch.randn(64, 16), torch.randn(64, 16)
    (layer(x) - target).square().mean().backward()
    return float(layer.router.weight.grad.norm()), float(layer.experts.w_in.grad.norm())


def test_noise_breaks_the_symmetry_between_copies():
    # identical copies give the router no gradient from the task; noisy ones do
    router_0, experts_0 = router_grad_after_one_step(0.0)
    router_n, _ = router_grad_after_one_step(0.05)
    assert router_0 < 1e-6 * experts_0
    assert router_n > 1e3 * max(router_0, 1e-12)


def copy_spread(layer):
    w = layer.experts.w_in.detach()  # (E, d, 2H): all experts are copies
    return float((w - w.mean(0, keepdim=True)).norm())


def test_noisy_experts_diverge_in_training():
    torch.manual_seed(1)
    mlp = dense()
    gen = torch.Generator().manual_seed(1)
    layer = upcycle(mlp, 4, 2, noise=0.01, generator=gen)
    x = torch.randn(256, 16)
    target = torch.tanh(x @ torch.randn(16, 16))  # a task the MLP does not solve yet
    with torch.no_grad():
        assert relative_error(layer(x), mlp(x)) < 0.05  # close to the MLP, not equal
    start = copy_spread(layer)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        loss = (layer(x) - target).square().mean() + layer.aux_loss
        loss.backward()
        optimizer.step()
    assert copy_spread(layer) > 3 * start


def test_same_generator_same_layer():
    mlp = dense()
    a = upcycle(mlp, 8, 4, 2, noise=0.1, generator=torch.Generator().manual_seed(3))
    b = upcycle(mlp, 8, 4, 2, noise=0.1, generator=torch.Generator().manual_seed(3))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_upcycle_keeps_dtype():
    mlp = dense().to(torch.float64)
    layer = upcycle(mlp, 4, 2)
    assert layer.experts.w_in.dtype == torch.float64
    x = torch.randn(10, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), mlp(x))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((8, 2, 5), InvalidParameterError, "'granularity' .* divisor of the MLP's hidden width 48"),
        ((6, 2, 4), InvalidParameterError, "'n_experts' .* multiple of granularity=4"),
        ((8, 3, 2), InvalidParameterError, "'top_k' .* multiple of granularity=2"),
        ((8, 0, 1), InvalidParameterError, "'top_k' parameter of upcycle must be an int >= 1"),
        ((4, 2, 1, -0.1), InvalidParameterError, "'noise' .* finite float >= 0"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        upcycle(dense(), *args)


def test_bad_mlps_and_options_are_named():
    with pytest.raises(TypeError, match="takes moekit's FeedForward or an MLP with gate_proj"):
        upcycle(torch.nn.Linear(4, 4), 4, 2)
    with pytest.raises(ValueError, match="sets the router"):
        upcycle(dense(), 4, 2, routed_scaling_factor=2.0)
    with pytest.raises(ValueError, match="sets the router"):
        upcycle(dense(), 4, 2, router="switch")
