"""Bad arguments and bad inputs get one clear error naming what was wrong."""

import pytest
import torch

from moekit._core.validation import InvalidParameterError
from moekit.nn import MoE, MoEConfig, TopKRouter

GOOD = dict(d_model=8, d_hidden=16, n_experts=4, top_k=2)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("d_model", 0, r"'d_model' parameter of MoE must be an int in the range \[1, inf\)"),
        ("d_hidden", 2.5, "'d_hidden' parameter of MoE must be an int"),
        ("n_experts", -1, "'n_experts' parameter of MoE"),
        ("top_k", 5, r"'top_k' parameter of MoE must be an int in the range \[1, n_experts=4\]"),
        ("top_k", True, "'top_k' parameter of MoE"),
        ("router", "softmax", "'router' parameter of MoE must be one of 'expert_choice'"),
        ("capacity_factor", 0.0, "'capacity_factor' parameter of MoE"),
        ("capacity_factor", float("inf"), "'capacity_factor' parameter of MoE must be finite"),
        ("capacity_factor", float("nan"), "'capacity_factor' parameter of MoE"),
        ("n_shared_experts", -1, "'n_shared_experts' parameter of MoE"),
        ("activation", "relu", "'activation' parameter of MoE must be one of 'gelu', 'swiglu'"),
        ("aux_loss_coef", -0.1, "'aux_loss_coef' parameter of MoE"),
        ("z_loss_coef", "0.1", "'z_loss_coef' parameter of MoE"),
        ("expert_impl", "cuda", "'expert_impl' parameter of MoE"),
    ],
)
def test_bad_argument_names_itself(name, value, match):
    with pytest.raises(InvalidParameterError, match=match):
        MoE(**{**GOOD, name: value})


def test_switch_needs_top_1():
    with pytest.raises(InvalidParameterError, match="'top_k' parameter of MoE must be 1 with"):
        MoE(**GOOD, router="switch")
    MoE(8, 16, 4, 1, router="switch")


def test_router_module_must_match_the_layer():
    with pytest.raises(InvalidParameterError, match="'router' parameter of MoE must be a router"):
        MoE(**GOOD, router=TopKRouter(8, 5, 2))


def test_config_validates_under_its_own_name():
    with pytest.raises(InvalidParameterError, match="'top_k' parameter of MoEConfig"):
        MoEConfig(8, 16, 4, top_k=0)
    layer = MoE.from_config(MoEConfig(8, 16, 4, router="expert_choice"))
    assert layer(torch.randn(3, 8)).shape == (3, 8)


def test_wrong_input_width_is_named():
    layer = MoE(**GOOD)
    with pytest.raises(
        ValueError, match=r"shape \(\.\.\., d_model\) with d_model=8; got shape \(2, 3, 5\)"
    ):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        layer([[0.0] * 8])


def test_grouped_mm_on_unsupported_input_says_what_it_needs():
    layer = MoE(**GOOD, expert_impl="grouped_mm").double()
    with pytest.raises(ValueError, match="needs float32, bfloat16 or float16 tokens"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    odd = MoE(8, 6, 4, 2, expert_impl="grouped_mm")  # 24-byte hidden rows
    with pytest.raises(ValueError, match="d_hidden=6"):
        odd(torch.randn(3, 8))
