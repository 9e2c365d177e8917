"""Tiny random Hugging Face models of each MoE family moekit converts (no downloads)."""

import torch

transformers = __import__("pytest").importorskip("transformers")

COMMON = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    # wider than the default 0.02, so that the routers' choices are far from ties
    "initializer_range": 0.2,
}


def configs():
    """Family name -> (model class, config)."""
    t = transformers
    return {
        "mixtral": (
            t.MixtralForCausalLM,
            t.MixtralConfig(
                intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON
            ),
        ),
        "qwen2_moe": (
            t.Qwen2MoeForCausalLM,
            t.Qwen2MoeConfig(
                intermediate_size=64,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=48,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                **COMMON,
            ),
        ),
        "qwen3_moe": (
            t.Qwen3MoeForCausalLM,
            t.Qwen3MoeConfig(
                intermediate_size=64,
                moe_intermediate_size=16,
                num_experts=8,
                num_experts_per_tok=2,
                head_dim=8,
                norm_topk_prob=True,
                **COMMON,
            ),
        ),
        "olmoe": (
            t.OlmoeForCausalLM,
            t.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2, **COMMON),
        ),
        "deepseek_v3": (
            t.DeepseekV3ForCausalLM,
            t.DeepseekV3Config(
                intermediate_size=64,
                moe_intermediate_size=16,
                n_routed_experts=16,
                num_experts_per_tok=4,
                n_group=4,
                topk_group=2,
                n_shared_experts=1,
                routed_scaling_factor=2.5,
                first_k_dense_replace=1,
                kv_lora_rank=16,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                **{**COMMON, "num_key_value_heads": 4},
            ),
        ),
    }


FAMILIES = tuple(configs())


def build(family, seed=0):
    """A tiny float32 model of ``family`` in eval mode, its DeepSeek-V3 correction biases
    random (they start at zero, which would leave them untested)."""
    cls, config = configs()[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    for module in model.modules():
        bias = getattr(getattr(module, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn_like(bias) * 0.05)
    return model


def moe_blocks(model):
    from moekit.nn.hf.families import family_of

    return [m for m in model.modules() if family_of(m) is not None]
