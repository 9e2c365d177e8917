"""Training the small MoE language model: losses, accumulation, the bias-update hook."""

import math

import pytest
import torch
import torch.nn.functional as F

import moekit.nn
from moekit import load
from moekit.nn import MoETransformer, TrainConfig, train_lm
from moekit.nn.train import byte_tokens, decode_bytes, evaluate_lm, plot_training

# tiny matrices: a second thread only adds synchronisation (and noise when the machine is busy)
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
SMALL = dict(
    vocab_size=256,
    block_size=32,
    n_layer=2,
    n_head=2,
    d_model=32,
    d_hidden=32,
    n_experts=4,
    top_k=2,
)


def test_training_lowers_the_held_out_loss_and_logs_aux_and_loads_apart():
    torch.manual_seed(0)
    model = MoETransformer(**SMALL)
    cfg = TrainConfig(steps=80, eval_every=40, batch_size=8, warmup=10)
    log = train_lm(model, TEXT, cfg, verbose=0)
    assert log.val_loss[0] == pytest.approx(math.log(256), abs=0.1)  # uniform before training
    assert log.val_loss[-1] < log.val_loss[0] - 2.5
    assert log.eval_step == [0, 40, 79] and len(log.train_loss) == len(log.aux_loss) == 80
    assert all(0 < a < 0.1 for a in log.aux_loss)  # 0.01 * balance loss + 1e-3 * z-loss
    # loads: per evaluation, per MoE layer, per expert; all T * k assignments counted
    assert [len(x) for x in log.tokens_per_expert[-1]] == [4, 4]
    steps_since = 79 - 40
    assert sum(log.tokens_per_expert[-1][0]) == steps_since * 8 * 32 * 2


def test_held_out_loss_is_the_plain_cross_entropy():
    torch.manual_seed(0)
    model = MoETransformer(**SMALL).eval()
    tokens = byte_tokens(TEXT[:400])
    rows = torch.stack([tokens[s : s + 33] for s in range(0, 400 - 33, 32)])
    with torch.no_grad():
        logits, loss = model(rows[:, :-1], rows[:, 1:])
    ce = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    assert evaluate_lm(model, tokens, batch_size=5) == pytest.approx(float(ce), rel=1e-5)
    assert float(loss) > float(ce)  # the model's own loss adds the auxiliary losses


def test_accumulated_micro_batches_make_the_same_step_as_one_batch():
    # without auxiliary losses (which look at one micro-batch's tokens at a time) two
    # micro-batches of 4 are one batch of 8: the same windows, the same mean gradient
    kw = {**SMALL, "aux_loss_coef": 0.0, "z_loss_coef": 0.0}
    models = []
    for batch, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = MoETransformer(**kw)
        cfg = TrainConfig(steps=3, batch_size=batch, grad_accum=accum, eval_every=100)
        train_lm(model, TEXT, cfg, verbose=0)
        models.append(model)
    accumulated = models[1].state_dict()
    for name, a in models[0].state_dict().items():
        torch.testing.assert_close(a, accumulated[name], rtol=1e-4, atol=1e-6, msg=name)


def test_router_biases_are_updated_once_per_optimiser_step(monkeypatch):
    calls = []
    monkeypatch.setattr(moekit.nn.layer, "update_router_biases", calls.append)
    torch.manual_seed(0)
    model = MoETransformer(**SMALL)
    train_lm(model, TEXT, TrainConfig(steps=3, batch_size=2, grad_accum=3), verbose=0)
    assert calls == [model] * 3


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
    assert decode_bytes(byte_tokens("é")) == "é"


def test_the_figure_shows_losses_and_every_moe_layer(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(**SMALL)
    log = train_lm(model, TEXT, TrainConfig(steps=6, eval_every=2, batch_size=2), verbose=0)
    fig = plot_training(log)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "MoE layer 0" in labels and "MoE layer 1" in labels and "auxiliary loss" in labels
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_bad_corpus_settings_and_vocabulary_are_clear_errors():
    with pytest.raises(ValueError, match="corpus is too short"):
        train_lm(MoETransformer(**SMALL), "tiny", TrainConfig(steps=1), verbose=0)
    with pytest.raises(ValueError, match="needs vocab_size=256"):
        train_lm(MoETransformer(**{**SMALL, "vocab_size": 64}), TEXT, verbose=0)
    with pytest.raises(ValueError, match=r"The 'steps' parameter of TrainConfig must be an int"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="'learning_rate' parameter of TrainConfig must be finite"):
        TrainConfig(learning_rate=float("inf"))
    with pytest.raises(ValueError, match="evaluate_lm needs more than block_size"):
        evaluate_lm(MoETransformer(**SMALL), byte_tokens("short"))


def test_a_checkpoint_folder_that_does_not_exist_is_named_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_lm(MoETransformer(**SMALL), TEXT, checkpoint=tmp_path / "no" / "c.safetensors")
