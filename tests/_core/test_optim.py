"""L-BFGS partial M-steps reach the closed-form minimiser of a quadratic."""

import torch

from moekit._core.optim import lbfgs_minimise


def test_lbfgs_reaches_the_least_squares_solution_and_keeps_the_start():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(50, generator=gen, dtype=torch.float64)
    start = [torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.float64)]

    def loss(b, c):
        return ((X @ b + c - y) ** 2).mean()

    b, c = lbfgs_minimise(start, loss, max_iter=100)
    design = torch.cat([X, torch.ones(50, 1, dtype=torch.float64)], 1)
    want = torch.linalg.lstsq(design, y.unsqueeze(1)).solution[:, 0]
    torch.testing.assert_close(torch.cat([b, c.view(1)]), want, rtol=1e-7, atol=1e-8)
    assert not b.requires_grad and torch.equal(start[0], torch.zeros(3, dtype=torch.float64))
