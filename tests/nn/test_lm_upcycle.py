"""Upcycling moekit's own language model: ``upcycle_lm`` and ``moekit lm upcycle``."""

import pytest
import torch

from moekit.cli import main
from moekit.nn import MoE, MoETransformer
from moekit.nn.checkpoint import load_lm
from moekit.nn.upcycle import upcycle_lm

SMALL = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "d_model": 32, "d_hidden": 32}


def dense_lm(seed=0):
    torch.manual_seed(seed)
    model = MoETransformer(**SMALL, top_k=2, moe_every=3).eval()  # no block is sparse
    assert not model.moe_layers()
    with torch.no_grad():  # unit-scale feed-forward weights: their part of the logits shows
        for block in model.blocks:
            block.ffn.w_in.normal_(0, 32**-0.5)
            block.ffn.w_out.normal_(0, 64**-0.5)
    return model


@pytest.mark.parametrize(("n_experts", "top_k", "granularity"), [(4, 2, 1), (8, 2, 2), (8, 4, 4)])
def test_upcycled_lm_predicts_as_the_dense_one(n_experts, top_k, granularity):
    dense = dense_lm()
    model = upcycle_lm(dense, n_experts, top_k, granularity)
    assert len(model.moe_layers()) == 2 and all(isinstance(b.ffn, MoE) for b in model.blocks)
    assert model.config.d_hidden == 64 // granularity  # the dense width is top_k * d_hidden
    assert model.config.routed_scaling_factor == granularity
    idx = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)
    assert isinstance(dense.blocks[0].ffn, torch.nn.Module) and not dense.moe_layers()


def test_moekit_lm_upcycle_writes_a_model_that_loads(tmp_path, capsys):
    dense = dense_lm()
    dense.save(tmp_path / "dense.moe")
    out = tmp_path / "moe.moe"
    argv = ["lm", "upcycle", str(tmp_path / "dense.moe"), "--n-experts", "8", "--top-k", "2",
            "--granularity", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Upcycled 2 blocks into 8 experts of width 32" in printed and str(out) in printed
    model = load_lm(out)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)


def test_moekit_lm_upcycle_refuses_what_it_cannot_do(tmp_path, capsys):
    MoETransformer(**SMALL, n_experts=4).save(tmp_path / "moe.moe")
    assert main(["lm", "upcycle", str(tmp_path / "moe.moe")]) == 2
    assert "takes a dense model" in capsys.readouterr().err
    dense_lm().save(tmp_path / "dense.moe")
    assert main(["lm", "upcycle", str(tmp_path / "dense.moe"), "--top-k", "1"]) == 2
    assert "'top_k' parameter of upcycle must be an int >= 2" in capsys.readouterr().err
