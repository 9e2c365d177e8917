"""The pure routing and loss functions against loops and closed forms."""

import math

import pytest
import torch

from moekit.nn import functional as MF

T, E = 12, 5


@pytest.fixture
def probs():
    return torch.randn(T, E, dtype=torch.float64).softmax(-1)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, E])
def test_top_k_routing_matches_sorting_each_row(probs, k, normalize):
    weights, indices = MF.top_k_routing(probs, k, normalize=normalize)
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(probs[t, e]))[:k]
        assert indices[t].tolist() == order
        kept = probs[t, order]
        expected = kept / kept.sum() if normalize else kept
        torch.testing.assert_close(weights[t], expected)


@pytest.mark.parametrize(
    "n_tokens, n_experts, k, factor, expected",
    [(100, 8, 2, None, None), (100, 8, 2, 1.0, 25), (100, 8, 2, 1.25, 32), (10, 2, 2, 4.0, 10)],
)
def test_expert_capacity(n_tokens, n_experts, k, factor, expected):
    assert MF.expert_capacity(n_tokens, n_experts, k, factor) == expected


def test_expert_choice_takes_each_experts_best_tokens(probs):
    weights, tokens = MF.expert_choice(probs, 4)
    assert weights.shape == tokens.shape == (E, 4)
    for e in range(E):
        best = sorted(range(T), key=lambda t: -float(probs[t, e]))[:4]
        assert tokens[e].tolist() == best
        torch.testing.assert_close(weights[e], probs[best, e])


def test_load_balancing_loss_matches_its_formula(probs):
    _, indices = MF.top_k_routing(probs, 2)
    f = [sum(int(e == i) for e in indices.flatten().tolist()) / (2 * T) for i in range(E)]
    p = probs.mean(0)
    expected = E * sum(f[i] * float(p[i]) for i in range(E))
    assert float(MF.load_balancing_loss(probs, indices, E)) == pytest.approx(expected)


def test_load_balancing_loss_is_one_under_uniform_routing():
    # uniform probabilities and every expert chosen equally often: f_e = P_e = 1/E
    probs = torch.full((E, E), 1.0 / E, dtype=torch.float64)
    balanced = torch.arange(E * 2).reshape(E, 2) % E  # 2 assignments per expert
    assert float(MF.load_balancing_loss(probs, balanced, E)) == pytest.approx(1.0)
    # uniform probabilities give 1 whatever the counts; balanced counts, whatever P
    skewed = torch.zeros(E, 2, dtype=torch.long)
    assert float(MF.load_balancing_loss(probs, skewed, E)) == pytest.approx(1.0)
    random_probs = torch.randn(E, E, dtype=torch.float64).softmax(-1)
    assert float(MF.load_balancing_loss(random_probs, balanced, E)) == pytest.approx(1.0)


def test_load_balancing_loss_punishes_collapse_and_pushes_towards_balance():
    # all tokens to expert 0 with certainty: f = P = e_0, loss = E (its maximum)
    probs = torch.zeros(T, E, dtype=torch.float64)
    probs[:, 0] = 1.0
    indices = torch.zeros(T, 1, dtype=torch.long)
    assert float(MF.load_balancing_loss(probs, indices, E)) == pytest.approx(E)
    # the gradient lowers the logit of the overloaded expert
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    p = logits.softmax(-1)
    MF.load_balancing_loss(p, torch.zeros(T, 1, dtype=torch.long), E).backward()
    assert (logits.grad[:, 0] > 0).all()


def test_router_z_loss_matches_loop():
    logits = torch.randn(T, E, dtype=torch.float64)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    assert float(MF.router_z_loss(logits)) == pytest.approx(expected)


def test_importance_loss_is_squared_coefficient_of_variation():
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    importance = [1.5, 0.5, 0.0]
    mean = sum(importance) / 3
    var = sum((v - mean) ** 2 for v in importance) / 3
    assert float(MF.importance_loss(gates)) == pytest.approx(var / mean**2)
    assert float(MF.importance_loss(torch.ones(4, 3))) == pytest.approx(0.0)


def test_noisy_top_k_load_matches_per_entry_probabilities():
    torch.manual_seed(1)
    clean = torch.randn(T, E, dtype=torch.float64)
    std = torch.rand(T, E, dtype=torch.float64) + 0.5
    noisy = clean + torch.randn(T, E, dtype=torch.float64) * std
    k = 2
    normal = torch.distributions.Normal(0.0, 1.0)
    load = [0.0] * E
    for t in range(T):
        for e in range(E):
            others = [float(noisy[t, i]) for i in range(E) if i != e]
            kth_other = sorted(others, reverse=True)[k - 1]
            z = (float(clean[t, e]) - kth_other) / float(std[t, e])
            load[e] += float(normal.cdf(torch.tensor(z)))
    load_t = torch.tensor(load, dtype=torch.float64)
    expected = load_t.var(unbiased=False) / load_t.mean() ** 2
    assert float(MF.noisy_top_k_load(clean, noisy, std, k)) == pytest.approx(float(expected))


def test_losses_of_an_empty_batch_are_zero():
    empty = torch.zeros(0, E)
    assert float(MF.router_z_loss(empty)) == 0.0
    assert float(MF.load_balancing_loss(empty, torch.zeros(0, 2, dtype=torch.long), E)) == 0.0


def test_expert_counts_match_bincount():
    indices = torch.randint(0, E, (T, 3))
    expected = torch.bincount(indices.flatten(), minlength=E)
    assert torch.equal(MF.expert_counts(indices, E), expected)
    empty = torch.zeros(0, 2, dtype=torch.long)
    assert torch.equal(MF.expert_counts(empty, E), torch.zeros(E, dtype=torch.long))


# Two experts with room for one assignment each. Token 0 wants expert 0 first (0.9) and
# expert 1 second (0.1); token 1 wants expert 1 first (0.8) and expert 0 second (0.2).
# In token order expert 1 would take token 0's spare choice and turn away token 1's
# main one.
HAND_INDICES = torch.tensor([[0, 1], [1, 0]])
HAND_WEIGHTS = torch.tensor([[0.9, 0.1], [0.8, 0.2]])


@pytest.mark.parametrize("priority", ["choice", "weight"])
def test_capacity_keeps_first_choices_before_second_choices(priority):
    keep = MF.capacity_keep(HAND_INDICES, HAND_WEIGHTS, 2, 1, priority)
    assert keep.tolist() == [[True, False], [True, False]]


def test_capacity_priority_by_weight_within_one_choice_rank():
    # four tokens all put expert 0 first; with room for two, 'choice' keeps the first two
    # tokens and 'weight' the two with the largest weights; the second choices (expert 1,
    # room for two) fit either way
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2]])
    weights = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.9, 0.05], [0.7, 0.2]])
    by_choice = MF.capacity_keep(indices, weights, 3, 2, "choice")
    by_weight = MF.capacity_keep(indices, weights, 3, 2, "weight")
    assert by_choice[:, 0].tolist() == [True, True, False, False]
    assert by_weight[:, 0].tolist() == [False, False, True, True]
    # expert 1 gets three second choices and keeps two: the two heaviest with 'weight'
    assert by_choice[:, 1].tolist() == [True, True, False, True]
    assert by_weight[:, 1].tolist() == [True, True, False, True]


def test_capacity_keep_against_a_queue_per_expert():
    torch.manual_seed(3)
    probs = torch.randn(40, E).softmax(-1)
    weights, indices = MF.top_k_routing(probs, 3)
    for priority in ("choice", "weight"):
        keep = MF.capacity_keep(indices, weights, E, 5, priority)
        used, expected = [0] * E, torch.zeros(40, 3, dtype=torch.bool)
        for j in range(3):
            tokens = sorted(range(40), key=lambda t: -float(weights[t, j]))
            for t in tokens if priority == "weight" else range(40):
                e = int(indices[t, j])
                if used[e] < 5:
                    used[e] += 1
                    expected[t, j] = True
        assert torch.equal(keep, expected), priority
