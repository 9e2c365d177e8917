"""Each router's decision against its paper's definition."""

import pytest
import torch

from moekit.nn import (
    ExpertChoiceRouter,
    NoisyTopKRouter,
    SigmoidBiasRouter,
    SwitchRouter,
    TopKRouter,
)

D, E, T = 8, 6, 20


@pytest.fixture
def x():
    return torch.randn(T, D, dtype=torch.float64)


def test_topk_router(x):
    router = TopKRouter(D, E, 3).double()
    r = router(x)
    probs = (x @ router.weight.T).softmax(-1)
    assert r.weights.shape == r.indices.shape == (T, 3)
    top = probs.topk(3, -1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(r.logits, x @ router.weight.T)
    assert r.balance_loss.requires_grad


def test_switch_router_is_top_1_with_the_raw_probability(x):
    router = SwitchRouter(D, E).double()
    r = router(x)
    probs = router.logits(x).softmax(-1)
    assert torch.equal(r.indices[:, 0], probs.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], probs.max(-1).values)


def test_noisy_router_adds_noise_only_in_training(x):
    router = NoisyTopKRouter(D, E, 2).double()
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.indices, b.indices)
    top = router.logits(x).topk(2, -1)
    torch.testing.assert_close(a.weights, top.values.softmax(-1))
    router.train()
    draws = [router(x).indices for _ in range(5)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    loss = router(x).balance_loss
    loss.backward()
    assert router.noise_weight.grad.abs().sum() > 0  # the load loss trains the noise


def test_expert_choice_router_gives_each_expert_its_capacity(x):
    router = ExpertChoiceRouter(D, E, 2, capacity_factor=1.5).double()
    r = router(x)
    capacity = -(-int(1.5 * T * 2) // E)  # ceil(f T k / E) = 10
    assert r.expert_choice and r.indices.shape == (E, capacity)
    probs = router.logits(x).softmax(-1)
    for e in range(E):
        assert len(set(r.indices[e].tolist())) == capacity
        torch.testing.assert_close(r.weights[e], probs[r.indices[e], e])


def test_sigmoid_bias_router_selects_with_bias_and_weights_without(x):
    router = SigmoidBiasRouter(D, E, 2).double().eval()
    router.bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0]))  # forces experts 0 and 1
    r = router(x)
    assert sorted(r.indices.unique().tolist()) == [0, 1]
    scores = router.logits(x).sigmoid()[:, :2]
    torch.testing.assert_close(
        r.weights.sort(-1).values, (scores / scores.sum(-1, True)).sort(-1).values
    )


def test_sigmoid_bias_update_rule():
    router = SigmoidBiasRouter(D, 4, 1, bias_update_rate=0.5)
    router.record_load(torch.tensor([[0], [0], [0], [1], [2], [2]]))  # loads 3, 1, 2, 0
    router.update_bias()  # mean 1.5: down for experts 0 and 2, up for 1 and 3
    torch.testing.assert_close(router.bias, torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    assert router.pending_load.sum() == 0  # the update clears what it applied
    router.update_bias()  # nothing recorded since: no step
    torch.testing.assert_close(router.bias, torch.tensor([-0.5, 0.5, -0.5, 0.5]))


def test_sigmoid_bias_moves_only_in_update_bias_never_in_forward():
    router = SigmoidBiasRouter(D, 4, 2, bias_update_rate=0.5)
    before = router.bias.clone()
    router.eval()
    router(torch.randn(T, D))
    assert router.pending_load.sum() == 0  # evaluation forwards are not counted
    router.train()
    indices = [router(torch.randn(T, D)).indices for _ in range(3)]
    assert torch.equal(router.bias, before)  # three training forwards: bias unchanged
    load = torch.bincount(torch.cat(indices).flatten(), minlength=4)
    assert torch.equal(router.pending_load, load)
    router.update_bias()
    expected = 0.5 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(router.bias, before + expected)


def test_center_bias_keeps_the_mean_at_zero_and_the_ranking_of_the_plain_rule():
    plain = SigmoidBiasRouter(D, 4, 1, bias_update_rate=0.25)
    centred = SigmoidBiasRouter(D, 4, 1, bias_update_rate=0.25, center_bias=True)
    for router in (plain, centred):
        for _ in range(3):  # one expert takes everything: three experts move up, one down
            router.record_load(torch.zeros(6, 1, dtype=torch.long))
            router.update_bias()
    torch.testing.assert_close(plain.bias, torch.tensor([-0.75, 0.75, 0.75, 0.75]))
    torch.testing.assert_close(centred.bias.mean(), torch.tensor(0.0))
    # the same biases up to one common shift: no top-k choice differs
    torch.testing.assert_close(centred.bias, plain.bias - plain.bias.mean())


def test_router_instance_can_be_passed_to_the_layer():
    from moekit.nn import MoE

    router = TopKRouter(D, E, 2, normalize=False)
    layer = MoE(D, 16, E, 2, router=router)
    assert layer.router is router
    layer(torch.randn(5, D))
    assert not torch.allclose(router(torch.randn(5, D)).weights.sum(-1), torch.ones(5))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: TopKRouter(D, E, 7),
            r"'top_k' parameter of TopKRouter must be an int in the range \[1, n_experts=6\]",
        ),
        (lambda: NoisyTopKRouter(0, E, 2), "'d_model' parameter of NoisyTopKRouter"),
        (lambda: SwitchRouter(D, E, 2), "'top_k' parameter of SwitchRouter must be 1"),
        (lambda: ExpertChoiceRouter(D, 2.0, 1), "'n_experts' parameter of ExpertChoiceRouter"),
    ],
)
def test_router_arguments_are_checked(make, match):
    from moekit._core.validation import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=match):
        make()


LAYER_ROUTERS = [  # (router, top_k): every router with one expert per token and with two
    ("topk", 1),
    ("topk", 2),
    ("noisy_topk", 1),
    ("noisy_topk", 2),
    ("switch", 1),
    ("expert_choice", 1),
    ("expert_choice", 2),
    ("sigmoid_bias", 1),
    ("sigmoid_bias", 2),
]


@pytest.mark.parametrize("router, top_k", LAYER_ROUTERS)
def test_every_router_learns_from_the_task_loss(router, top_k):
    # no auxiliary loss: the router's gradient can only come through the combine weights.
    # Renormalising a single kept weight makes it exactly 1 and this gradient zero (up to
    # rounding: measured 1e-8 of the expert gradient, against 0.4 for 'switch')
    from moekit.nn import MoE

    torch.manual_seed(0)
    layer = MoE(D, 16, E, top_k, router=router, aux_loss_coef=0.0).double()
    x = torch.randn(64, D, dtype=torch.float64)
    target = torch.randn(64, D, dtype=torch.float64)
    (layer(x) - target).square().mean().backward()
    router_grad = layer.router.weight.grad.norm()
    expert_grad = layer.experts.w_in.grad.norm()
    assert router_grad > 1e-3 * expert_grad, float(router_grad / expert_grad)


@pytest.mark.parametrize("make", [TopKRouter, NoisyTopKRouter, SigmoidBiasRouter])
def test_top_1_keeps_the_raw_weight_unless_told_otherwise(make, x):
    router = make(D, E, 1).double().eval()
    assert not router.normalize and make(D, E, 2).normalize
    r = router(x)
    assert (r.weights < 1).all()  # the raw probability (score), not 1
    with pytest.warns(UserWarning, match="no gradient"):
        told = make(D, E, 1, normalize=True).double()
    assert told.normalize
    told.load_state_dict(router.state_dict())
    torch.testing.assert_close(told.eval()(x).weights, torch.ones(T, 1, dtype=torch.float64))


def test_noisy_router_without_renormalising_weights_by_the_softmax_over_all_experts(x):
    router = NoisyTopKRouter(D, E, 2, normalize=False).double().eval()
    r = router(x)
    probs = router.logits(x).softmax(-1)
    torch.testing.assert_close(r.weights, probs.gather(1, r.indices))
