"""Language-model checkpoints: resuming reproduces the run; what is loaded is checked."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moekit.nn.checkpoint as ckpt_module
import moekit.nn.train as train_module
from moekit import load
from moekit.nn import MoETransformer, TrainConfig, train_lm
from moekit.nn.checkpoint import load_checkpoint, load_lm
from moekit.nn.train import resume_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "It is a truth universally acknowledged, that a single man in possession. " * 40
SMALL = dict(block_size=16, n_layer=2, n_head=2, d_model=16, d_hidden=16, n_experts=4)
CFG = TrainConfig(steps=12, batch_size=4, eval_every=5, checkpoint_every=4, warmup=2)


def _train(path, cfg=CFG, **model_kw):
    torch.manual_seed(0)
    model = MoETransformer(**{**SMALL, **model_kw})
    return model, train_lm(model, TEXT, cfg, verbose=0, checkpoint=path)


def _rewrite(path, change):
    """Write the checkpoint again with ``change(tensors, metadata)`` applied."""
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # built before the one-thread fixture: the same thread count makes the same sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("ck") / "checkpoint.safetensors"
    model, log = _train(path)
    torch.set_num_threads(threads)
    return path, model, log


def test_a_run_stopped_after_a_checkpoint_and_resumed_equals_one_never_stopped(
    trained, tmp_path, monkeypatch
):
    _, model, log = trained
    saves = []

    def save_then_stop(path, ck):  # stop the run right after its second checkpoint
        ckpt_module.save_checkpoint(path, ck)
        saves.append(ck.step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b.safetensors")
    monkeypatch.undo()
    assert saves == [3, 7]
    torch.manual_seed(123)  # resuming must restore the RNG state, not rely on this one
    back, resumed = resume_lm(tmp_path / "b.safetensors", TEXT, verbose=0)
    assert resumed.as_dict() == log.as_dict()  # every loss and load, bit for bit
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert load_checkpoint(tmp_path / "b.safetensors").step == 11


def test_resuming_can_extend_the_run_and_refuses_another_corpus(trained, tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(trained[0].read_bytes())
    _, log = resume_lm(path, TEXT, steps=14, verbose=0)
    assert log.step[-1] == 13 and log.eval_step[-1] == 13
    with pytest.raises(ValueError, match="trained on another corpus"):
        resume_lm(path, TEXT.upper(), verbose=0)
    with pytest.raises(ValueError, match="'steps' parameter of resume_lm must be more than"):
        resume_lm(path, TEXT, steps=5, verbose=0)


def test_the_checkpoint_holds_no_pickle_and_loads_as_a_model(trained):
    path, model, _ = trained
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])  # a safetensors file: JSON header, then raw numbers
    assert header["__metadata__"]["moekit_checkpoint"] == "1"
    assert {"optim.wte.weight.exp_avg_sq", "rng.torch", "model.wte.weight"} <= set(header)
    assert b"\x80\x04" not in raw[: 8 + n]  # no pickle protocol opcode in the header
    back = load_lm(path)
    idx = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(back(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)


def _nan(tensors, _):
    tensors["model.blocks.0.ffn.router.weight"][0, 0] = float("nan")


def _shape(tensors, _):
    tensors["model.blocks.1.attn.qkv.weight"] = torch.zeros(3, 16)


def _dtype(tensors, _):
    tensors["model.wte.weight"] = tensors["model.wte.weight"].double()


def _optim_dtype(tensors, _):
    tensors["optim.ln_f.weight.exp_avg"] = tensors["optim.ln_f.weight.exp_avg"].half()


def _negative_moment(tensors, _):
    tensors["optim.wpe.weight.exp_avg_sq"][0, 0] = -1.0


def _extra(tensors, _):
    tensors["model.evil"] = torch.zeros(1)


def _huge_config(_, metadata):  # settings implying ~10^20 bytes of experts
    config = json.loads(metadata["model"])
    metadata["model"] = json.dumps({**config, "d_model": 2**20, "d_hidden": 2**24})


def _no_log(_, metadata):
    del metadata["log"]


def _bad_config(_, metadata):
    metadata["model"] = json.dumps({**json.loads(metadata["model"]), "n_head": 0})


@pytest.mark.parametrize(
    "change, match",
    [
        (_nan, r"'model.blocks.0.ffn.router.weight' holds NaN or infinite values"),
        (_shape, r"'model.blocks.1.attn.qkv.weight' has shape \(3, 16\); the stored settings"),
        (_dtype, r"'model.wte.weight' has dtype 'F64'; the model needs torch.float32"),
        (_optim_dtype, r"'optim.ln_f.weight.exp_avg' has dtype 'F16'"),
        (_negative_moment, r"'optim.wpe.weight.exp_avg_sq' holds negative values"),
        (_extra, r"unexpected \['model.evil'\]"),
        (_huge_config, r"has shape .* the stored settings imply"),
        (_bad_config, r"'n_head' parameter of TransformerConfig"),
        (_no_log, r"its metadata lacks \['log'\]"),
    ],
)
def test_damaged_checkpoints_are_refused_naming_the_problem(trained, tmp_path, change, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(trained[0].read_bytes())
    _rewrite(path, change)
    with pytest.raises(ValueError, match="is not a valid language-model checkpoint: .*" + match):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="is not a valid language model: .*" + match):
        load_lm(path)


def test_size_limit_is_checked_before_anything_is_read(trained, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read")

    monkeypatch.setattr("safetensors.safe_open", no_reading)
    with pytest.raises(ValueError, match="more than the limit of 1,000"):
        load_checkpoint(trained[0], max_bytes=1000)


def test_model_files_are_checked_as_they_load(trained, tmp_path):
    path = tmp_path / "lm.moe"
    trained[1].save(path)
    assert isinstance(load_lm(path), MoETransformer)
    _rewrite(path, lambda t, _: t["blocks.0.ln_1.weight"].fill_(float("inf")))
    with pytest.raises(ValueError, match=r"'blocks\.0\.ln_1\.weight' holds NaN or infinite"):
        load_lm(path)
    with pytest.raises(ValueError, match=r"'blocks\.0\.ln_1\.weight' holds NaN or infinite"):
        load(path)  # moekit.load checks the same through MoETransformer._from_state
    with pytest.raises(ValueError, match="without training state"):
        load_checkpoint(path)


def test_foreign_and_truncated_files_are_refused(trained, tmp_path):
    import numpy as np

    from moekit import MoERegressor

    X = np.random.default_rng(0).normal(size=(40, 1))
    MoERegressor(2, random_state=0).fit(X, X[:, 0]).save(tmp_path / "r.moe")
    with pytest.raises(ValueError, match="neither a language-model checkpoint nor"):
        load_lm(tmp_path / "r.moe")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(trained[0].read_bytes()[:5000])
    with pytest.raises(ValueError, match="is not a valid language"):
        load_checkpoint(cut)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.safetensors")
