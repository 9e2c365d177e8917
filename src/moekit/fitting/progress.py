"""Progress reporting for long fits: ``verbose=1`` a progress bar and one line per
start; ``verbose=2`` adds a line every ``verbose_interval`` iterations with timings.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Reports EM progress on stderr; silent when ``verbose == 0``."""

    def __init__(self, verbose: int = 0, verbose_interval: int = 10, offset: float = 0.0) -> None:
        self.verbose = int(verbose)
        self.offset = offset  # added to every value shown: the target's units, not EM's
        self.interval = max(int(verbose_interval), 1)
        self._bar = None
        self._t = time.perf_counter()
        self._phase = ""

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _open_bar(self, total: int, desc: str) -> None:
        self._close_bar()
        if self.verbose >= 1:
            self._bar = tqdm(
                total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True
            )

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def start_init(self, index: int, n_init: int, max_iter: int, on_subset: bool) -> None:
        self._t = time.perf_counter()
        self._phase = f"start {index + 1}/{n_init}"
        if self.verbose >= 1:
            where = " on a subset" if on_subset else ""
            self._open_bar(max_iter, f"EM {self._phase}{where}")

    def end_init(self, index: int, objective: float, converged: bool, label: str = "") -> None:
        if self.verbose >= 1:
            state = "converged" if converged else "stopped"
            self._close_bar()
            origin = f" ({label})" if label else ""
            self._write(
                f"{self._phase}{origin}: {state}, mean log-likelihood "
                f"{objective + self.offset:.6f}, "
                f"{time.perf_counter() - self._t:.2f} s"
            )

    def start_final(self, max_iter: int, phase: str = "final") -> None:
        self._t = time.perf_counter()
        self._phase = phase
        if self.verbose >= 1:
            self._open_bar(max_iter, f"EM, {phase}")

    def summary(self, n_starts: int, n_short: int, n_final: int, n_optima: int, best: str):
        """How far the starts spread: the distinct values after the short runs, and the
        distinct optima of the runs taken to convergence."""
        if self.verbose >= 1:
            self._close_bar()
            self._write(
                f"{n_starts} starts ended their short runs at {n_short} distinct values; "
                f"the {n_final} run to convergence reached {n_optima} distinct "
                f"optim{'um' if n_optima == 1 else 'a'}; the best started from {best}."
            )

    def iteration(self, it: int, objective: float, change: float) -> None:
        if self.verbose < 1:
            return
        if self._bar is not None:
            self._bar.update(1)
            shown = f"{objective + self.offset:.6f}"
            self._bar.set_postfix(loglik=shown, change=f"{change:.2e}", refresh=False)
        if self.verbose >= 2 and it % self.interval == 0:
            self._write(
                f"  {self._phase} iteration {it}: mean log-likelihood "
                f"{objective + self.offset:.8f}, "
                f"change {change:.3e}, {time.perf_counter() - self._t:.2f} s"
            )

    def close(self, n_iter: int, objective: float, converged: bool, seconds: float) -> None:
        self._close_bar()
        if self.verbose >= 1:
            state = "converged" if converged else "did not converge"
            self._write(
                f"EM {state} after {n_iter} iterations: mean log-likelihood "
                f"{objective + self.offset:.6f}, "
                f"{seconds:.2f} s in all"
            )
