"""Partial M-steps by L-BFGS, shared by the experts and gates without closed forms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def lbfgs_minimise(
    start: Sequence[torch.Tensor],
    loss: Callable[..., torch.Tensor],
    max_iter: int,
) -> list[torch.Tensor]:
    """Run up to ``max_iter`` L-BFGS iterations on ``loss(*tensors)`` from ``start``.

    A strong-Wolfe line search makes every accepted step decrease the loss; the
    caller still compares the result with the start, since a generalised EM step
    must not lower its objective even where the line search gives up.

    Parameters
    ----------
    start : sequence of Tensor
        Starting values; they are not modified.
    loss : callable
        ``loss(*tensors) -> scalar Tensor``; scale it to O(1) (divide a sum over
        rows by n) so that the tolerances below do not depend on n.
    max_iter : int

    Returns
    -------
    list of Tensor
        The final values, detached.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in start]
    opt = torch.optim.LBFGS(
        leaves,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        history_size=10,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )

    def closure():
        opt.zero_grad()
        value = loss(*leaves)
        value.backward()
        return value

    opt.step(closure)
    return [t.detach() for t in leaves]
