"""Modes of one-dimensional mixture densities found on a grid: the integers for
count mixtures, a fine grid refined by golden-section search for continuous ones
whose components have no mean-shift fixed point (Gamma, lognormal).

Both take ``log_density``, a function of points (n, S, 1) -> log p (n, S) of each
row's mixture, and return per row a pair (modes, densities), highest first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moekit._core.engine import EM_DTYPE, to_numpy

LogDensity = Callable[[torch.Tensor], torch.Tensor]


def _peaks(logp: torch.Tensor) -> torch.Tensor:
    """Local maxima along the last axis (plateaus counted once, at their left end)."""
    left = torch.cat([logp.new_full((logp.shape[0], 1), -torch.inf), logp[:, :-1]], 1)
    right = torch.cat([logp[:, 1:], logp.new_full((logp.shape[0], 1), -torch.inf)], 1)
    return (logp > left) & (logp >= right) & torch.isfinite(logp)


def _rows(points: torch.Tensor, logp: torch.Tensor, peak: torch.Tensor) -> list:
    out = []
    for i in range(points.shape[0]):
        ks = torch.nonzero(peak[i]).flatten()
        ks = ks[torch.argsort(logp[i, ks], descending=True)]
        out.append((to_numpy(points[i, ks]), to_numpy(torch.exp(logp[i, ks]))))
    return out


def integer_modes(log_density: LogDensity, top: int, n: int) -> list:
    """Modes of count mixtures: the local maxima of the pmf on 0, 1, ..., top + 1."""
    grid = torch.arange(top + 2, dtype=EM_DTYPE)
    logp = log_density(grid.view(1, -1, 1).expand(n, -1, 1))  # (n, G)
    # not below the left neighbour and above the right one (a plateau at its right end)
    left = torch.cat([logp.new_full((n, 1), -torch.inf), logp[:, :-1]], 1)
    peak = (logp >= left) & (logp > torch.cat([logp[:, 1:], logp[:, -1:]], 1))
    return _rows(grid.expand(n, -1), logp, peak)


def grid_modes(log_density: LogDensity, lo: torch.Tensor, hi: torch.Tensor,
               points: int = 2049, refine: int = 60) -> list:  # fmt: skip
    """Modes of continuous mixtures on [lo, hi] (per row, shapes (n,)).

    The density is evaluated on ``points`` equally spaced points; every grid point
    above its left and not below its right neighbour brackets a mode between those
    neighbours, which ``refine`` golden-section steps then narrow (each shrinks the
    bracket by 0.618). A mode at the edge of the range (a Gamma of shape below 1
    peaks at 0) is reported at the edge.
    """
    n = lo.shape[0]
    t = torch.linspace(0.0, 1.0, points, dtype=EM_DTYPE)
    grid = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * t  # (n, G)
    logp = log_density(grid.unsqueeze(-1))
    peak = _peaks(logp)
    n_peaks = int(peak.sum(1).max()) if n else 0
    if n_peaks == 0:
        return [(to_numpy(grid[i, :0]), to_numpy(grid[i, :0])) for i in range(n)]
    # every row's peaks, padded with its first one: (n, P) grid indices
    order = torch.argsort(peak.to(torch.int8), dim=1, descending=True, stable=True)[:, :n_peaks]
    valid = torch.gather(peak, 1, order)
    idx = torch.where(valid, order, order[:, :1])
    a = torch.gather(grid, 1, (idx - 1).clamp(min=0))
    b = torch.gather(grid, 1, (idx + 1).clamp(max=points - 1))
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(refine):
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        fc, fd = log_density(c.unsqueeze(-1)), log_density(d.unsqueeze(-1))
        left = fc >= fd  # the maximum lies in [a, d]
        b = torch.where(left, d, b)
        a = torch.where(left, a, c)
    x = 0.5 * (a + b)
    fx = log_density(x.unsqueeze(-1))
    # keep the better of the refined point and the grid point (edges, flat tops)
    g = torch.gather(grid, 1, idx)
    fg = torch.gather(logp, 1, idx)
    better = fx >= fg
    x, fx = torch.where(better, x, g), torch.where(better, fx, fg)
    return _rows(x, fx, valid)
