"""Upcycling dense Hugging Face models (Llama, Mistral, Qwen2) into moekit MoE models."""

import pytest
import torch
from hf_models import COMMON, build

from moekit.nn import MoE

hf = pytest.importorskip("moekit.nn.hf")
transformers = pytest.importorskip("transformers")

DENSE = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "mistral": ("MistralForCausalLM", "MistralConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
}


def build_dense(family, seed=0):
    model_cls, config_cls = (getattr(transformers, n) for n in DENSE[family])
    torch.manual_seed(seed)
    return model_cls(config_cls(intermediate_size=64, **COMMON)).eval()


@pytest.mark.parametrize("family", DENSE)
@pytest.mark.parametrize(("n_experts", "top_k", "granularity"), [(4, 2, 1), (8, 2, 2)])
def test_upcycled_model_keeps_its_logits(family, n_experts, top_k, granularity):
    model = build_dense(family)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    n = hf.upcycle_model(model, n_experts, top_k, granularity)
    assert n == COMMON["num_hidden_layers"]
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(layers) == n and layers[0].experts.d_hidden == 64 // granularity
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_upcycled_model_trains():
    model = build_dense("llama").train()
    hf.upcycle_model(model, 4, 2, noise=0.01)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    router = layers[0].router.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, labels=ids)
    loss = out.loss + sum(layer.aux_loss for layer in layers)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(layers[0].router.weight, router)


def test_upcycle_model_refuses_an_moe_model():
    with pytest.raises(ValueError, match="takes a dense model"):
        hf.upcycle_model(build("qwen2_moe"), 4, 2)
