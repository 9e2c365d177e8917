"""The bias of the auxiliary-loss-free router moves once per optimiser step, not in forward."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from moekit.nn import MoE, update_router_biases

D, H, E = 8, 16, 4


def bias_layer(rate=0.5, **kwargs):
    # a large rate: one update is sure to change some token's experts
    torch.manual_seed(0)
    return MoE(D, H, E, 2, router="sigmoid_bias", bias_update_rate=rate, **kwargs).double()


def rule(load, rate):
    """One step of the DeepSeek-V3 rule for the counts ``load`` of shape (E,)."""
    load = load.double()
    return rate * torch.sign(load.mean() - load)


def test_activation_checkpointing_recomputes_the_same_routing():
    layer = bias_layer()
    plain = bias_layer()
    for _ in range(3):  # three steps, the bias moving in between
        x = torch.randn(32, D, dtype=torch.float64, requires_grad=True)
        layer.zero_grad()
        plain.zero_grad()
        y = checkpoint(layer, x, use_reentrant=False)
        y.square().sum().backward()
        plain(x).square().sum().backward()
        for a, b in zip(layer.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
        # the recomputation counted the tokens again: every count doubled, same step
        assert torch.equal(layer.router.pending_load, 2 * plain.router.pending_load)
        update_router_biases(layer)
        update_router_biases(plain)
        torch.testing.assert_close(layer.router.bias, plain.router.bias)
    assert layer.router.bias.abs().sum() > 0


def test_gradient_accumulation_moves_the_bias_once_per_step():
    layer = bias_layer()
    before = layer.router.bias.clone()
    micro = [torch.randn(16, D, dtype=torch.float64) for _ in range(3)]
    loads = []
    for x in micro:
        layer(x).square().mean().backward()
        assert torch.equal(layer.router.bias, before)  # routing fixed within the step
        loads.append(layer.stats.tokens_per_expert)
    layer.update_bias()
    torch.testing.assert_close(layer.router.bias, before + rule(sum(loads), 0.5))


def test_update_router_biases_reaches_every_layer_and_skips_the_others():
    model = torch.nn.Sequential(
        bias_layer(), MoE(D, H, E, 2, router="topk").double(), bias_layer(center_bias=True)
    )
    model(torch.randn(16, D, dtype=torch.float64))
    loads = [model[i].router.pending_load.clone() for i in (0, 2)]
    update_router_biases(model)
    torch.testing.assert_close(model[0].router.bias, rule(loads[0], 0.5))
    step = rule(loads[1], 0.5)
    torch.testing.assert_close(model[2].router.bias, step - step.mean())
    assert all(model[i].router.pending_load.sum() == 0 for i in (0, 2))


def test_evaluation_and_a_zero_rate_record_nothing():
    layer = bias_layer().eval()
    layer(torch.randn(16, D, dtype=torch.float64))
    frozen = bias_layer(rate=0.0)
    frozen(torch.randn(16, D, dtype=torch.float64))
    for m in (layer, frozen):
        assert m.router.pending_load.sum() == 0
        m.update_bias()
        assert m.router.bias.abs().sum() == 0


def test_the_load_buffer_is_not_saved_and_keeps_its_integer_type():
    layer = bias_layer().to(torch.bfloat16)
    assert layer.router.pending_load.dtype == torch.long
    assert "router.pending_load" not in layer.state_dict()
    assert "router.bias" in layer.state_dict()


def _two_ranks(rank, world, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same layer on both ranks, different tokens
        layer = MoE(D, H, E, 2, router="sigmoid_bias", bias_update_rate=0.5)
        torch.manual_seed(1 + rank)
        layer(torch.randn(8 + 8 * rank, D))
        torch.save(
            {"load": layer.router.pending_load.clone(), "init": layer.router.bias.clone()},
            f"{out}.{rank}.before",
        )
        layer.update_bias()
        torch.save(layer.router.bias, f"{out}.{rank}.after")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_bias_update_all_reduces_the_loads_over_processes(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_two_ranks, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    before = [torch.load(f"{out}.{r}.before") for r in range(2)]
    after = [torch.load(f"{out}.{r}.after") for r in range(2)]
    total = before[0]["load"] + before[1]["load"]
    assert not torch.equal(rule(before[0]["load"], 0.5), rule(total, 0.5))  # the sum matters
    for r in range(2):
        torch.testing.assert_close(after[r], before[r]["init"] + rule(total, 0.5).float())
