"""The small MoE language model: shapes, causality, loss, training, sampling, errors."""

import math

import pytest
import torch

from moekit._core.validation import InvalidParameterError
from moekit.nn import MoE, MoETransformer, TransformerConfig

# tiny matrices: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(
    vocab_size=16, block_size=12, n_layer=2, n_head=2, d_model=16, d_hidden=16, n_experts=4, top_k=2
)


def test_shapes_and_initial_loss_is_near_uniform_prediction():
    model = MoETransformer(**SMALL)
    idx = torch.randint(0, 16, (3, 12))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 12, 16)
    assert loss.item() == pytest.approx(math.log(16), abs=0.3)
    assert len(model.moe_layers()) == 2
    total_aux = sum(m.aux_loss for m in model.moe_layers())
    torch.testing.assert_close(model.aux_loss, total_aux)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    torch.testing.assert_close(loss, ce + model.aux_loss)


@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid_bias", "noisy_topk"])
def test_causal_later_tokens_do_not_change_earlier_logits(router):
    top_k = 1 if router == "switch" else 2
    model = MoETransformer(**{**SMALL, "router": router, "top_k": top_k}).eval()
    idx = torch.randint(0, 16, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 16, (2, 5))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_training_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = MoETransformer(**SMALL)
    data = torch.arange(13) % 16  # the sequence 0, 1, ..., 12 repeated from any offset
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        start = torch.randint(0, 4, (8,))
        seq = torch.stack([(torch.arange(13) + s) % 16 for s in start])
        _, loss = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model.generate(data[None, :3], max_new_tokens=8, temperature=0)
    assert out[0].tolist() == list(range(11))
    assert loss.item() < 0.3


def test_generate_is_reproducible_with_a_generator():
    model = MoETransformer(**SMALL).eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(1), top_k=5)
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(1), top_k=5)
    assert a.shape == (2, 21) and torch.equal(a, b)


def test_moe_every_mixes_dense_and_sparse_blocks():
    model = MoETransformer(**{**SMALL, "n_layer": 4, "moe_every": 2})
    kinds = [isinstance(b.ffn, MoE) for b in model.blocks]
    assert kinds == [False, True, False, True]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"router": "expert_choice"}, "'router' parameter of TransformerConfig"),
        ({"n_head": 3}, "'n_head' parameter of TransformerConfig must divide d_model=16"),
        ({"dropout": 1.0}, "'dropout' parameter of TransformerConfig"),
        ({"top_k": 9}, "'top_k' parameter of MoE"),
    ],
)
def test_bad_config_names_the_argument(overrides, match):
    with pytest.raises(InvalidParameterError, match=match):
        MoETransformer(TransformerConfig(**{**SMALL, **overrides}))


def test_bad_token_ids_are_named():
    model = MoETransformer(**SMALL)
    with pytest.raises(ValueError, match=r"block_size=12; got shape \(1, 13\)"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size=16\); got values in \[0, 16\]"):
        model(torch.tensor([[0, 16]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
