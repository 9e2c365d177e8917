"""moekit layers in Hugging Face MoE models: convert, patch, train, unpatch, save, load.

Every model is a tiny random one built from its config (float32, no downloads).
"""

import importlib
import sys

import pytest
import torch
from hf_models import FAMILIES, build, moe_blocks

from moekit.nn import MoE, update_router_biases

hf = pytest.importorskip("moekit.nn.hf")


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def randomize(block, seed=0):
    """Weights of unit scale, so that outputs and routing are far from trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_block_equals_the_block(family):
    model = build(family)
    for i, block in enumerate(moe_blocks(model)):
        randomize(block, seed=i)
        moe = hf.convert_block(block)
        assert isinstance(moe, MoE)
        x = torch.randn(3, 11, 32)
        with torch.no_grad():
            expected, got = block(x), moe(x)
        assert got.shape == expected.shape
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_model_leaves_the_logits_unchanged(family):
    model = build(family)
    n_blocks = len(moe_blocks(model))
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        expected = model(ids).logits
    assert hf.patch_model(model) == n_blocks
    assert not moe_blocks(model)
    assert sum(isinstance(m, hf.HFMoEBlock) for m in model.modules()) == n_blocks
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_group_limited_routing_equals_deepseek_v3s_choice():
    block = moe_blocks(build("deepseek_v3"))[0]
    randomize(block.gate)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.1)
    moe = hf.convert_block(block).eval()
    assert (moe.router.n_group, moe.router.topk_group) == (4, 2)
    x = torch.randn(500, 32)
    with torch.no_grad():
        _, hf_weights, hf_indices = block.gate(x)
        routing = moe.router(x)
    hf_sorted, order = hf_indices.sort(dim=-1)
    ours_sorted, ours_order = routing.indices.sort(dim=-1)
    assert torch.equal(ours_sorted, hf_sorted)
    scaled = routing.weights.gather(1, ours_order) * moe.config.routed_scaling_factor
    torch.testing.assert_close(scaled, hf_weights.gather(1, order))
    # the groups limit the choice: with them off, some tokens choose differently
    plain = (torch.sigmoid(x @ block.gate.weight.t()) + block.gate.e_score_correction_bias).topk(4)
    assert not torch.equal(plain.indices.sort(-1).values, hf_sorted)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_through_a_patched_model(family):
    torch.manual_seed(0)
    model = build(family).train()
    hf.patch_model(model)
    layers = [m.moe for m in model.modules() if isinstance(m, hf.HFMoEBlock)]
    before = [layer.experts.w_in.detach().clone() for layer in layers]
    router_before = [layer.router.weight.detach().clone() for layer in layers]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(layers)
    assert out.router_logits[0].shape == (32, layers[0].n_experts)
    moekit_aux = sum(layer.aux_loss for layer in layers)
    loss = out.loss + moekit_aux
    assert torch.isfinite(loss)
    if out.aux_loss is not None:  # the model's own balancing loss, from moekit's logits
        assert torch.isfinite(out.aux_loss)
        router = layers[0].router.weight
        (router_grad,) = torch.autograd.grad(out.aux_loss, [router], retain_graph=True)
        assert router_grad.abs().sum() > 0
    loss.backward()
    optimizer.step()
    update_router_biases(model)
    for layer, w, r in zip(layers, before, router_before, strict=True):
        assert not torch.equal(layer.experts.w_in, w)
        assert not torch.equal(layer.router.weight, r)
    model.zero_grad()
    assert torch.isfinite(model(ids, labels=ids).loss)


def perturb_moekit_weights(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, hf.HFMoEBlock):
                for p in module.moe.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
                bias = getattr(module.moe.router, "bias", None)
                if bias is not None:
                    bias.add_(torch.randn_like(bias) * 0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_gives_the_model_moekits_weights(family):
    model = build(family)
    keys = set(model.state_dict())
    ids = torch.randint(0, 128, (2, 13))
    hf.patch_model(model)
    perturb_moekit_weights(model)
    with torch.no_grad():
        patched = model(ids).logits
    adapters = [m for m in model.modules() if isinstance(m, hf.HFMoEBlock)]
    w_in = adapters[0].moe.experts.w_in.detach().clone()
    assert hf.unpatch_model(model) == len(adapters)
    assert set(model.state_dict()) == keys
    block = moe_blocks(model)[0]
    torch.testing.assert_close(block.experts.gate_up_proj, w_in.transpose(1, 2))
    with torch.no_grad():
        unpatched = model(ids).logits
    torch.testing.assert_close(unpatched, patched, rtol=1e-4, atol=1e-4)
    assert not torch.equal(unpatched, build(family)(ids).logits.detach())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_saved_model_loads_and_runs_patched(family, tmp_path):
    model = build(family)
    hf.patch_model(model)
    perturb_moekit_weights(model)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        expected = model(ids).logits
    hf.unpatch_model(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert hf.patch_model(loaded) == len(moe_blocks(build(family)))
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_router_logits_recorded_when_the_model_hooked_before_patching():
    # the model installs its recording hooks on first use; patching afterwards keeps them
    model = build("qwen3_moe")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = model(ids, output_router_logits=True).router_logits
        hf.patch_model(model)
        got = model(ids, output_router_logits=True).router_logits
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_module_list_experts_of_older_versions():
    # transformers 4.x keeps one MLP per expert; the weights land in the same places
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

    block = moe_blocks(build("qwen3_moe"))[0]
    randomize(block)
    x = torch.randn(20, 32)
    with torch.no_grad():
        expected = hf.convert_block(block)(x)
        stacked = block.experts
        experts = torch.nn.ModuleList()
        for e in range(stacked.num_experts):
            mlp = Qwen3MoeMLP(build("qwen3_moe").config, intermediate_size=16)
            gate, up = stacked.gate_up_proj[e].chunk(2, dim=0)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(stacked.down_proj[e])
            experts.append(mlp)
        block.experts = experts
        got = hf.convert_block(block)(x)
    torch.testing.assert_close(got, expected)


def test_bad_blocks_and_options_are_named():
    with pytest.raises(ValueError, match="convert_block knows the blocks MixtralSparseMoeBlock"):
        hf.convert_block(torch.nn.Linear(4, 4))
    block = moe_blocks(build("mixtral"))[0]
    with pytest.raises(ValueError, match="reads top_k from the block"):
        hf.convert_block(block, top_k=1)
    moe = hf.convert_block(block, aux_loss_coef=0.0, z_loss_coef=1e-3)
    assert moe.config.z_loss_coef == 1e-3


def test_clear_import_error_without_transformers(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("moekit.nn.hf")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install moekit\[hf\]"):
        importlib.import_module("moekit.nn.hf")


def test_moekit_nn_does_not_import_transformers():
    code = "import sys, moekit.nn; print('transformers' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_convert_block_keeps_each_weights_dtype(family):
    # a bfloat16 block; DeepSeek-V3 loads its router in float32
    block = moe_blocks(build(family))[0]
    randomize(block)
    block.to(torch.bfloat16)
    router_dtype = torch.float32 if family == "deepseek_v3" else torch.bfloat16
    block.gate.to(router_dtype)
    moe = hf.convert_block(block)
    assert moe.experts.w_in.dtype == moe.shared.w_in.dtype == torch.bfloat16
    assert moe.router.weight.dtype == router_dtype
    x = torch.randn(1, 64, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = moe(x).float(), block(x).float()
    per_token = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(per_token.median()) < 2e-2  # bfloat16 rounding, same routing
