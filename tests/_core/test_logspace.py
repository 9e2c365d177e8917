"""Log-space maths against closed forms written with the math module."""

import math

import pytest
import torch

from moekit._core.logspace import (
    LOG_2PI,
    gaussian_logpdf,
    normalize_log,
    safe_log,
    student_t_logpdf,
)


def test_normalize_log_gives_log_posteriors_and_the_log_normaliser():
    p = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]], dtype=torch.float64)
    scale = torch.tensor([[3.0], [0.25]], dtype=torch.float64)
    log_norm, lse = normalize_log(torch.log(p * scale))
    torch.testing.assert_close(log_norm, torch.log(p), rtol=0, atol=1e-15)
    torch.testing.assert_close(lse, torch.log(scale[:, 0]), rtol=0, atol=1e-15)


def test_normalize_log_does_not_overflow_or_underflow():
    log_joint = torch.tensor([1000.0, 1000.0 + math.log(3.0), -1000.0], dtype=torch.float64)
    log_norm, lse = normalize_log(log_joint)
    assert lse.item() == pytest.approx(1000.0 + math.log(4.0), abs=1e-12)
    torch.testing.assert_close(log_norm[:2].exp(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.isfinite(log_norm).all()


def test_gaussian_logpdf_is_the_normal_density():
    r = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64)
    var = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    want = [math.log(math.exp(-ri**2 / (2 * v)) / math.sqrt(2 * math.pi * v))
            for ri, v in zip(r.tolist(), var.tolist(), strict=True)]  # fmt: skip
    torch.testing.assert_close(gaussian_logpdf(r, var), torch.tensor(want, dtype=torch.float64))
    assert LOG_2PI == pytest.approx(math.log(2 * math.pi))


def test_gaussian_logpdf_in_place_only_where_autograd_allows():
    r, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.1
    want = gaussian_logpdf(r, var)
    buf = r.clone()
    out = gaussian_logpdf(buf, var, inplace=True)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, want)
    tracked = r.clone().requires_grad_()
    out = gaussian_logpdf(tracked, var, inplace=True)  # refused: a new tensor
    assert torch.equal(tracked.detach(), r) and torch.allclose(out, want)


def test_safe_log_floors_zero():
    out = safe_log(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert out[0].item() == pytest.approx(math.log(1e-300)) and out[1].item() == 0.0


@pytest.mark.parametrize("nu", [1.0, 3.5, 30.0])
def test_student_t_logpdf_is_the_t_density(nu):
    y, mu, sigma = 0.7, -0.2, 1.3
    z2 = ((y - mu) / sigma) ** 2
    want = (math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
            - math.log(sigma) - (nu + 1) / 2 * math.log1p(z2 / nu))  # fmt: skip
    got = student_t_logpdf(torch.tensor(z2, dtype=torch.float64),
                           torch.tensor(math.log(sigma), dtype=torch.float64),
                           torch.tensor(nu, dtype=torch.float64), 1)  # fmt: skip
    assert got.item() == pytest.approx(want, abs=1e-13)


def test_student_t_tends_to_the_gaussian():
    d2 = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)  # two outputs, unit scales
    t = student_t_logpdf(d2, torch.zeros(()), torch.tensor(1e8, dtype=torch.float64), 2)
    gauss = -LOG_2PI - 0.5 * d2  # 2 independent unit normals
    torch.testing.assert_close(t, gauss, rtol=0, atol=1e-6)
