"""Routing options of today's MoE models against plain per-token references.

Group-limited choice (DeepSeek-V3), the routed scaling factor, raw top-k weights
(OLMoE's ``norm_topk_prob=False``) and the gated shared expert (Qwen2-MoE).
"""

import math

import pytest
import torch

from moekit._core.validation import InvalidParameterError
from moekit.nn import MoE, SigmoidBiasRouter, TopKRouter
from moekit.nn import functional as MF
from moekit.nn.experts import activate


def naive_group_choice(row, n_group, topk_group, top_k):
    """Experts one token chooses: the best ``top_k`` inside its best ``topk_group`` groups,
    a group scored by the sum of its two largest scores."""
    row = [float(v) for v in row]
    size = len(row) // n_group
    group_score = [
        sum(sorted(row[g * size : (g + 1) * size], reverse=True)[: min(2, size)])
        for g in range(n_group)
    ]
    kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    allowed = [e for e in range(len(row)) if e // size in kept]
    return sorted(sorted(allowed, key=lambda e: -row[e])[:top_k])


def naive_layer(layer, x, bias=None, sigmoid=False):
    """The layer's output token by token: routing, experts, scale and gated shared expert."""
    cfg = layer.config
    bank = layer.experts
    out = []
    for t in range(x.shape[0]):
        logits = [float(v) for v in layer.router.weight.detach() @ x[t]]
        if sigmoid:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            z = sum(math.exp(v) for v in logits)
            scores = [math.exp(v) / z for v in logits]
        choice = [s + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(scores)]
        if cfg.n_group is None:
            chosen = sorted(range(len(choice)), key=lambda e: -choice[e])[: cfg.top_k]
        else:
            chosen = naive_group_choice(choice, cfg.n_group, cfg.topk_group, cfg.top_k)
        weights = [scores[e] for e in chosen]
        if layer.router.normalize:
            weights = [w / sum(weights) for w in weights]
        y = torch.zeros(x.shape[1])
        for e, w in zip(chosen, weights, strict=True):
            h = activate(x[t] @ bank.w_in[e], bank.activation) @ bank.w_out[e]
            y = y + cfg.routed_scaling_factor * w * h
        if layer.shared is not None:
            shared = layer.shared(x[t])
            if layer.shared_gate is not None:
                shared = torch.sigmoid(layer.shared_gate.weight[0] @ x[t]) * shared
            y = y + shared
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize(("n_group", "topk_group", "top_k"), [(4, 2, 3), (8, 3, 2), (2, 1, 2)])
def test_group_limited_scores_equal_the_per_token_choice(n_group, topk_group, top_k):
    torch.manual_seed(0)
    scores = torch.rand(40, 16)
    limited = MF.group_limited_scores(scores, n_group, topk_group)
    chosen = limited.topk(top_k, dim=-1).indices.sort(dim=-1).values
    for t in range(scores.shape[0]):
        assert chosen[t].tolist() == naive_group_choice(scores[t], n_group, topk_group, top_k)
    # the kept entries are the scores themselves, the others -inf
    kept = torch.isfinite(limited)
    assert torch.equal(limited[kept], scores[kept])
    assert int(kept.sum()) == scores.shape[0] * topk_group * (16 // n_group)


def test_group_limited_scores_pass_gradients_to_the_kept_scores():
    scores = torch.rand(5, 8, requires_grad=True)
    limited = MF.group_limited_scores(scores, 4, 1)
    limited.masked_fill(~torch.isfinite(limited), 0.0).sum().backward()
    assert torch.equal(scores.grad, torch.isfinite(limited).float())


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_grouped_layer_equals_the_naive_layer(router):
    torch.manual_seed(1)
    layer = MoE(16, 8, 8, top_k=2, router=router, n_group=4, topk_group=2, aux_loss_coef=0.0)
    bias = None
    if router == "sigmoid_bias":
        layer.router.bias.copy_(torch.randn(8) * 0.1)
        bias = layer.router.bias
    x = torch.randn(30, 16)
    expected = naive_layer(layer, x, bias=bias, sigmoid=router == "sigmoid_bias")
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_groups_change_the_choice():
    # with one group of four kept out of four, the choice is the plain top-k; with one of
    # four groups kept, every token's experts share one group
    torch.manual_seed(2)
    router = TopKRouter(8, 8, 2, n_group=4, topk_group=1)
    plain = TopKRouter(8, 8, 2)
    plain.weight.data.copy_(router.weight.data)
    x = torch.randn(200, 8)
    grouped = router(x).indices
    assert torch.equal(grouped[:, 0] // 2, grouped[:, 1] // 2)
    assert not torch.equal(grouped.sort(-1).values, plain(x).indices.sort(-1).values)


def test_deepseek_v3_routing_with_scale_and_bias():
    # sigmoid scores, choice on scores + bias inside the groups, weights from the scores
    # renormalised then scaled by 2.5
    torch.manual_seed(3)
    layer = MoE(
        16, 8, 16, top_k=4, router="sigmoid_bias", n_group=4, topk_group=2,
        routed_scaling_factor=2.5, normalize_weights=True, n_shared_experts=1,
        aux_loss_coef=0.0,
    )  # fmt: skip
    layer.router.bias.copy_(torch.randn(16) * 0.2)
    x = torch.randn(25, 16)
    expected = naive_layer(layer, x, bias=layer.router.bias, sigmoid=True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.5, 2.5])
def test_routed_scaling_factor_scales_the_routed_experts_only(scale):
    torch.manual_seed(4)
    scaled = MoE(8, 16, 4, top_k=2, n_shared_experts=1, routed_scaling_factor=scale)
    plain = MoE(8, 16, 4, top_k=2, n_shared_experts=1)
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(20, 8)
    shared = plain.shared(x)
    torch.testing.assert_close(scaled(x) - shared, scale * (plain(x) - shared))


def test_raw_top_k_weights_of_olmoe():
    torch.manual_seed(5)
    layer = MoE(8, 16, 8, top_k=2, normalize_weights=False, aux_loss_coef=0.0)
    x = torch.randn(20, 8)
    routing = layer.router(x)
    probs = routing.logits.softmax(-1)
    torch.testing.assert_close(routing.weights, probs.gather(1, routing.indices))
    assert bool((routing.weights.sum(-1) < 1).all())
    torch.testing.assert_close(layer(x), naive_layer(layer, x), rtol=1e-5, atol=1e-6)


def test_gated_shared_expert_of_qwen2_moe():
    torch.manual_seed(6)
    layer = MoE(8, 16, 4, top_k=2, n_shared_experts=1, d_shared=24, shared_expert_gate=True)
    assert layer.shared.w_out.shape == (24, 8)
    x = torch.randn(20, 8)
    torch.testing.assert_close(layer(x), naive_layer(layer, x), rtol=1e-5, atol=1e-6)
    layer(x).sum().backward()
    assert layer.shared_gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_group": 3, "topk_group": 1}, "'n_group' parameter of MoE must be a divisor"),
        ({"n_group": 4}, "'topk_group' parameter of MoE must be set together"),
        ({"n_group": 4, "topk_group": 5}, r"'topk_group' .* range \[1, n_group=4\]"),
        ({"n_group": 8, "topk_group": 1}, "large enough to hold top_k=2"),
        ({"n_group": 2, "topk_group": 1, "router": "noisy_topk"}, "'n_group' .* None with"),
        ({"routed_scaling_factor": 0.0}, "'routed_scaling_factor' parameter of MoE"),
        ({"routed_scaling_factor": math.inf}, "'routed_scaling_factor' .* finite"),
        ({"d_shared": 16}, "'d_shared' .* n_shared_experts=0"),
        ({"shared_expert_gate": True}, "'shared_expert_gate' .* n_shared_experts=0"),
    ],
)
def test_bad_routing_options_are_named(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        MoE(8, 16, 8, top_k=2, **kwargs)


def test_router_module_checks_its_groups():
    with pytest.raises(InvalidParameterError, match="'n_group' parameter of SigmoidBiasRouter"):
        SigmoidBiasRouter(8, 6, 2, n_group=4, topk_group=1)
