"""Component distributions against closed forms: densities, CDFs, moments."""

import math

import pytest
import torch

from moekit._core.components import FAMILIES, Normal, Poisson, StudentT

F64 = torch.float64


def _t(*v):
    return torch.tensor(v, dtype=F64)


def test_normal_density_is_the_product_over_outputs():
    y, loc, scale = _t(0.5, -1.0), _t(0.0, 1.0), _t(1.0, 2.0)
    parts = zip(y.tolist(), loc.tolist(), scale.tolist(), strict=True)
    want = sum(-0.5 * math.log(2 * math.pi * s * s) - 0.5 * ((a - m) / s) ** 2 for a, m, s in parts)
    assert Normal.log_prob(y, loc, scale).item() == pytest.approx(want, abs=1e-14)
    assert Normal.cdf(_t(1.0), _t(1.0), _t(3.0)).item() == 0.5
    torch.testing.assert_close(Normal.variance(loc, scale), scale**2)


def test_student_t_density_cdf_and_variance():
    y, loc, scale, df = _t(1.0), _t(0.0), _t(1.0), _t(1.0)  # Cauchy
    assert StudentT.log_prob(y, loc, scale, df).item() == pytest.approx(-math.log(2 * math.pi))
    assert StudentT.cdf(_t(1.0), loc, scale, df).item() == pytest.approx(0.75)
    # (n, K=1, m=1) scales, (n, K=1) degrees of freedom: nu / (nu - 2) s^2, infinite for nu <= 2
    var = StudentT.variance(None, torch.full((2, 1, 1), 2.0, dtype=F64), _t(4.0, 1.5).view(2, 1))
    assert var[0].item() == pytest.approx(4.0 * 4 / 2) and math.isinf(var[1].item())


def test_poisson_density_cdf_and_support():
    rate = _t(2.5)
    want = 3 * math.log(2.5) - 2.5 - math.log(6)
    assert Poisson.log_prob(_t(3.0), rate).item() == pytest.approx(want, abs=1e-14)
    assert Poisson.log_prob(_t(1.5), rate).item() == -math.inf  # not an integer
    assert Poisson.log_prob(_t(-1.0), rate).item() == -math.inf
    assert Poisson.cdf(_t(0.0), rate).item() == pytest.approx(math.exp(-2.5))
    assert Poisson.cdf(_t(-0.5), rate).item() == 0.0


@pytest.mark.parametrize("family", [Normal, StudentT, Poisson])
def test_samples_have_the_family_moments(family):
    gen = torch.Generator().manual_seed(0)
    loc, scale = torch.full((20000, 1), 3.0, dtype=F64), torch.full((20000, 1), 0.5, dtype=F64)
    df = _t(6.0)
    s = family.sample(loc, scale, df.expand(20000), gen)
    var = family.variance(loc, scale, df.expand(20000))[0, 0].item()
    assert s.mean().item() == pytest.approx(3.0, abs=4 * math.sqrt(var / 20000))
    assert s.var().item() == pytest.approx(var, rel=0.1)
    assert FAMILIES[family.name] is family
