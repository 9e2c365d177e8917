"""Training, saving and sampling the small MoE language model, and `moekit lm`."""

import pytest
import torch

from moekit import load
from moekit.cli import main
from moekit.nn import MoETransformer, TrainConfig, train_lm
from moekit.nn.train import byte_tokens, decode_bytes

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
SMALL = dict(
    vocab_size=256,
    block_size=32,
    n_layer=1,
    n_head=2,
    d_model=32,
    d_hidden=32,
    n_experts=4,
    top_k=2,
)


def test_training_lowers_the_held_out_loss():
    torch.manual_seed(0)
    model = MoETransformer(**SMALL)
    log = train_lm(model, TEXT, TrainConfig(steps=80, eval_every=40, batch_size=8), verbose=0)
    assert log.val_loss[0] > 5.0  # about log(256) before training
    assert log.val_loss[-1] < log.val_loss[0] - 2.5
    assert len(log.train_loss) == 80 and len(log.tokens_per_expert[-1]) == 4


def test_model_files_round_trip_and_sampling_is_reproducible(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(**SMALL)
    train_lm(model, TEXT, TrainConfig(steps=20, eval_every=10, batch_size=4), verbose=0)
    model.save(tmp_path / "lm.moe")
    back = load(tmp_path / "lm.moe")
    assert isinstance(back, MoETransformer) and back.config == model.config
    idx = byte_tokens("the quick").unsqueeze(0)
    torch.testing.assert_close(back(idx)[0], model.eval()(idx)[0])
    assert back.lm_head.weight is back.wte.weight  # still tied after loading
    a = back.generate(idx, 12, temperature=0.7, generator=torch.Generator().manual_seed(1))
    b = back.generate(idx, 12, temperature=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, idx.shape[1] + 12)
    assert back.training_log["step"][-1] == 19


def test_bad_corpus_and_vocabulary_are_clear_errors():
    with pytest.raises(ValueError, match="corpus is too short"):
        train_lm(MoETransformer(**SMALL), "tiny", TrainConfig(steps=1), verbose=0)
    with pytest.raises(ValueError, match="needs vocab_size=256"):
        train_lm(MoETransformer(**{**SMALL, "vocab_size": 64}), TEXT, verbose=0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainConfig(steps=0)


def test_command_line_train_and_generate(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    args = [
        "lm",
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "30",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--n-layer",
        "1",
        "--d-model",
        "32",
        "--d-hidden",
        "32",
        "--n-experts",
        "4",
    ]
    assert main(args) == 0
    assert (tmp_path / "out" / "lm.moe").exists()
    assert (tmp_path / "out" / "lm_training.png").stat().st_size > 1000
    capsys.readouterr()
    assert (
        main(
            [
                "lm",
                "generate",
                str(tmp_path / "out" / "lm.moe"),
                "--prompt",
                "the qu",
                "--max-new-tokens",
                "10",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("the qu") and len(out.rstrip("\n").encode()) >= len("the qu")
    assert decode_bytes(byte_tokens("é")) == "é"


def test_generate_refuses_a_model_that_is_not_a_language_model(tmp_path, capsys):
    import numpy as np

    from moekit import MoERegressor

    X = np.random.default_rng(0).normal(size=(40, 1))
    MoERegressor(2, random_state=0).fit(X, X[:, 0]).save(tmp_path / "r.moe")
    assert main(["lm", "generate", str(tmp_path / "r.moe"), "--prompt", "a"]) == 2
    assert "not a language model" in capsys.readouterr().err
