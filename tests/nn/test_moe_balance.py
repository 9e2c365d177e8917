"""Sequence-wise and global-batch balancing losses, dead experts and routing entropy."""

import math

import pytest
import torch

from moekit._core.validation import InvalidParameterError
from moekit.nn import MoE, MoEStats, balance, load_balancing_loss


def test_sequence_loss_is_the_mean_of_the_per_sequence_losses():
    torch.manual_seed(0)
    n_seq, seq_len, n_experts = 5, 7, 6
    probs = torch.rand(n_seq * seq_len, n_experts).softmax(-1)
    indices = probs.topk(2, dim=-1).indices
    spans = [slice(b * seq_len, (b + 1) * seq_len) for b in range(n_seq)]
    per_sequence = [load_balancing_loss(probs[s], indices[s], n_experts) for s in spans]
    got = balance.sequence_balance_loss(probs, indices, n_experts, seq_len)
    torch.testing.assert_close(got, torch.stack(per_sequence).mean())
    # one sequence: the batch loss
    one = balance.sequence_balance_loss(probs, indices, n_experts, n_seq * seq_len)
    torch.testing.assert_close(one, load_balancing_loss(probs, indices, n_experts))


def test_sequence_loss_sees_imbalance_the_batch_loss_misses():
    # two sequences, each on its own two experts: the batch is balanced, no sequence is
    probs = torch.full((8, 4), 0.25)
    indices = torch.tensor([[0, 1]] * 4 + [[2, 3]] * 4)
    assert float(load_balancing_loss(probs, indices, 4)) == pytest.approx(1.0)
    seq = balance.sequence_balance_loss(probs, indices, 4, 4)
    probs_seq = torch.tensor([[0.5, 0.5, 0, 0]] * 4 + [[0, 0, 0.5, 0.5]] * 4)
    assert float(seq) == pytest.approx(1.0)  # uniform scores: P = 1/E, loss stays 1
    assert float(balance.sequence_balance_loss(probs_seq, indices, 4, 4)) == pytest.approx(2.0)
    assert float(load_balancing_loss(probs_seq, indices, 4)) == pytest.approx(1.0)


def test_global_loss_counts_the_load_of_every_process(monkeypatch):
    torch.manual_seed(1)
    probs = torch.rand(10, 4).softmax(-1)
    indices = probs.topk(1, dim=-1).indices
    # one process: the batch loss
    torch.testing.assert_close(
        balance.global_balance_loss(probs, indices, 4), load_balancing_loss(probs, indices, 4)
    )
    # another process sent 30 tokens to expert 3: the all-reduce adds its counts
    other = torch.tensor([0, 0, 0, 30])

    def all_reduce(what, fn, counts, n_bytes=0):
        counts += other

    monkeypatch.setattr(balance, "is_initialized", lambda: True)
    monkeypatch.setattr(balance, "collective", all_reduce)
    counts = torch.bincount(indices.reshape(-1), minlength=4) + other
    expected = 4 * (counts.float() / counts.sum() * probs.mean(0)).sum()
    torch.testing.assert_close(balance.global_balance_loss(probs, indices, 4), expected)


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_layer_takes_its_balance_loss_per_sequence(router):
    torch.manual_seed(2)
    layer = MoE(8, 16, 4, top_k=2, router=router, balance_loss="sequence", aux_loss_coef=0.1)
    x = torch.randn(3, 5, 8)
    layer(x)
    routing = layer.router(x.reshape(-1, 8))
    kind = "sigmoid" if router == "sigmoid_bias" else "softmax"
    probs = balance.score_distribution(routing.logits, kind)
    if kind == "sigmoid":
        torch.testing.assert_close(probs.sum(-1), torch.ones(15))
    per_seq = [
        load_balancing_loss(probs[5 * b : 5 * b + 5], routing.indices[5 * b : 5 * b + 5], 4)
        for b in range(3)
    ]
    torch.testing.assert_close(layer.aux_loss, 0.1 * torch.stack(per_seq).mean())
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_dead_experts_and_entropy_in_the_stats():
    layer = MoE(4, 8, 4, top_k=2, aux_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0] * 4, [0.5] * 4, [-5.0] * 4, [-5.0] * 4]))
    layer(torch.rand(20, 4) + 0.1)  # positive inputs: experts 2 and 3 never chosen
    assert layer.stats.dead_fraction == 0.5
    assert layer.stats.tokens_per_expert[2:].sum() == 0
    with torch.no_grad():
        layer.router.weight.zero_()  # no preference: entropy log E
    layer(torch.randn(20, 4))
    assert layer.stats.router_entropy == pytest.approx(math.log(4), rel=1e-6)


def test_router_entropy_equals_the_naive_sum():
    torch.manual_seed(3)
    logits = torch.randn(6, 5) * 3
    stats = MoEStats(torch.ones(5), 0.0, logits, "softmax")
    p = logits.softmax(-1).tolist()
    naive = sum(-sum(q * math.log(q) for q in row) for row in p) / 6
    assert stats.router_entropy == pytest.approx(naive, rel=1e-5)
    assert math.isnan(MoEStats(torch.ones(5)).router_entropy)
    assert MoEStats(torch.tensor([2, 0, 0, 1])).dead_fraction == 0.5


@pytest.mark.parametrize("router", ["noisy_topk", "expert_choice"])
def test_scoped_balance_needs_a_router_without_its_own(router):
    with pytest.raises(InvalidParameterError, match="'balance_loss' parameter of MoE must be"):
        MoE(8, 16, 4, top_k=2, router=router, balance_loss="sequence")
    with pytest.raises(InvalidParameterError, match="'balance_loss'"):
        MoE(8, 16, 4, top_k=2, balance_loss="micro")
