"""Coefficients in the data's units: the affine maps and the report's bookkeeping."""

import pytest
import torch

from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data

F64 = torch.float64


def _scaling():
    x_mean, x_scale = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 3.0], dtype=F64)
    return Scaling(x_mean, x_scale, torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64),
                   ["a", "b"], ["y"])  # fmt: skip


def test_the_linear_predictor_is_the_same_in_both_units():
    s = _scaling()
    gen = torch.Generator().manual_seed(0)
    coef = torch.randn(3, 3, generator=gen, dtype=F64)  # (K, p): slopes then intercept
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    z = (x - s.x_mean) / s.x_scale
    on_design = z @ coef[:, :2].T + coef[:, 2]  # b^T z + c
    ab = coef_to_data(coef, s)
    on_data = x @ ab[:, 1:].T + ab[:, 0]  # a + beta^T x
    torch.testing.assert_close(on_data, on_design, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coef_from_data(ab, s), coef, rtol=1e-12, atol=1e-12)
    assert coef_labels(s) == ["intercept", "a", "b"]


def test_report_flattens_and_refuses_mismatched_or_repeated_blocks():
    r = Report()
    r.add("w", torch.tensor([[1.0, 2.0]]), ["e0", "e0"], ["x", "y"])
    r.add("s", torch.tensor([3.0]), ["e0"], ["sigma"], tested=False)
    assert r.flat().tolist() == [1.0, 2.0, 3.0] and r.tested == [True, True, False]
    back = r.unflatten(torch.tensor([4.0, 5.0, 6.0]))
    assert back["w"].shape == (1, 2) and back["s"].tolist() == [6.0]
    with pytest.raises(ValueError, match="2 values, 1 labels"):
        r.add("bad", torch.ones(2), ["e"], ["x"])
    other = Report()
    other.add("w", torch.ones(1), ["e"], ["x"])
    with pytest.raises(ValueError, match="'w' appears twice"):
        r.extend(other)
