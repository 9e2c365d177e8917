"""Small linear algebra against torch.linalg."""

import torch

from moekit._core.linalg import solve_psd, triu_pairs, unpack_triu


def _spd(batch, p, gen):
    a = torch.randn(batch, p, p, generator=gen, dtype=torch.float64)
    return a @ a.transpose(-1, -2) + p * torch.eye(p, dtype=torch.float64)


def test_solve_psd_equals_the_solve_when_well_conditioned():
    gen = torch.Generator().manual_seed(0)
    gram, rhs = _spd(3, 5, gen), torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(solve_psd(gram, rhs), torch.linalg.solve(gram, rhs),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


def test_solve_psd_gives_the_minimum_norm_solution_when_singular():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)  # a repeated column: G is singular
    gram, rhs = x.T @ x, x.T @ torch.randn(20, 1, generator=gen, dtype=torch.float64)
    got = solve_psd(gram, rhs)
    torch.testing.assert_close(got, torch.linalg.pinv(gram, hermitian=True) @ rhs,
                               rtol=1e-8, atol=1e-10)  # fmt: skip
    torch.testing.assert_close(got[0], got[3])  # the weight shared evenly: shortest
    assert torch.isfinite(solve_psd(torch.zeros(2, 2, dtype=torch.float64),
                                    torch.ones(2, 1, dtype=torch.float64))).all()  # fmt: skip


def test_triu_pairs_and_unpack_triu_round_trip():
    p = 4
    rows, cols = triu_pairs(p)
    assert len(rows) == p * (p + 1) // 2 and bool((rows <= cols).all())
    gen = torch.Generator().manual_seed(2)
    sym = _spd(2, p, gen)
    torch.testing.assert_close(unpack_triu(sym[:, rows, cols], p), sym, rtol=0, atol=0)
