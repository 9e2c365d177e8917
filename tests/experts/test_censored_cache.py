"""A censored family's per-fit cache of its rows gives every pass the same bits as
computing them in the pass, chunk by chunk, windows or not."""

import math

import pytest
import torch

from moekit._core.data import Chunk, EMData
from moekit.experts.censored import CensoredExperts
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.lognormal import LogNormalExperts

N, K = 60, 2


def _data(log: bool, window: str) -> EMData:
    """Rows of point, lower, upper and window ends: a fifth right-censored, some exact,
    a window on no rows, on every row, or only on the second half (one chunk of two)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, generator=g, dtype=torch.float64)
    XeT = torch.stack([x, torch.ones(N, dtype=torch.float64)])
    y = 1.0 + x + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    y = torch.exp(y) if log else y
    cap = torch.quantile(y, 0.8)
    lo = torch.minimum(y, cap)
    hi = torch.where(y > cap, math.inf, lo)
    t_lo = torch.full_like(y, -math.inf if not log else 0.0)
    t_hi = torch.full_like(y, math.inf)
    if window == "all":
        t_hi = torch.full_like(y, float(y.max()) + 1.0)
    elif window == "half":
        t_hi[N // 2 :] = float(y.max()) + 1.0
    return EMData(XeT, XeT, torch.stack([lo, lo, hi, t_lo, t_hi]))


def _params(family):
    coef = torch.tensor([[0.8, 1.1], [1.2, 0.7]], dtype=torch.float64)
    var = torch.tensor([0.5, 1.3], dtype=torch.float64)
    return family.base.with_latent_normal(coef, var)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("window", ["none", "all", "half"])
def test_prepared_rows_give_the_passes_bits(log, window):
    base = LogNormalExperts(K) if log else GaussianExperts(K, 1, 1e-6)
    family = CensoredExperts(base, 0.2, truncated=window != "none")
    params = _params(family)
    resp = torch.softmax(torch.randn(K, N, generator=torch.Generator().manual_seed(4),
                                     dtype=torch.float64), 0)  # fmt: skip
    fresh, prepared = _data(log, window), _data(log, window)
    family.prepare(prepared)
    assert "censored_rows" in prepared.cache and not fresh.cache
    for start, stop in [(0, N), (0, N // 2), (N // 2, N)]:  # all rows, then two chunks
        a, b = Chunk(start, stop, fresh), Chunk(start, stop, prepared)
        assert torch.equal(family.log_prob(params, a), family.log_prob(params, b))
        parts_a, parts_b = a.scratch["censored"][2], b.scratch["censored"][2]
        assert parts_a.keys() == parts_b.keys()  # a window where the chunk has one
        r = resp[:, start:stop]
        for sa, sb in zip(family.chunk_stats(params, a, r), family.chunk_stats(params, b, r),
                          strict=True):  # fmt: skip
            assert torch.equal(sa, sb)
    if window == "half":  # the first chunk has no window, the second has
        first, second = Chunk(0, N // 2, prepared), Chunk(N // 2, N, prepared)
        family.log_prob(params, first), family.log_prob(params, second)
        assert "log_window" not in first.scratch["censored"][2]
        assert "log_window" in second.scratch["censored"][2]
