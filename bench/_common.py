"""What several benchmarks share: R with its packages, load lines and side-by-side timing.

Each benchmark stays one command (``python bench/<name>.py``); Python puts ``bench/``
on the path of a script it runs, so they import this module as ``_common``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
import warnings

import numpy as np

R_PACKAGES = ["r-base-core", "r-cran-flexmix", "r-cran-mixtools", "r-cran-mass"]
"""Debian's packages of R and the R packages the benchmarks compare with."""

R_LIBRARIES = ("flexmix", "mixtools", "MASS")


def load_line() -> str:
    """The 1, 5 and 15 minute load averages, as ``a / b / c``."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def vm_hwm_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux's VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def r_available(libraries=R_LIBRARIES) -> bool:
    """Whether ``Rscript`` runs and loads ``libraries``."""
    if shutil.which("Rscript") is None:
        return False
    code = "suppressMessages({" + "; ".join(f"library({lib})" for lib in libraries) + "})"
    return subprocess.run(["Rscript", "-e", code], capture_output=True).returncode == 0


def ensure_r(libraries=R_LIBRARIES, packages=()) -> bool:
    """R with ``libraries``, installing Debian's packages (apt-get) where they are missing.

    ``packages`` are Debian's packages a benchmark needs beyond :data:`R_PACKAGES`.
    Returns whether R is usable; a benchmark skips its R rows, saying so, when not.
    """
    if r_available(libraries):
        return True
    wanted = [*R_PACKAGES, *packages]
    print(f"R's {'/'.join(libraries)} not found: installing {' '.join(wanted)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *wanted]):
        res = subprocess.run(sudo + cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"  apt-get failed ({res.stderr.strip()[-300:]}); R rows will be skipped.")
            return False
    ok = r_available(libraries)
    print("  installed." if ok else "  R still unavailable; R rows will be skipped.")
    return ok


def median_times(fn, repeats: int = 7) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of ``fn()`` after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def em_iteration_vs_gram(X: np.ndarray, y: np.ndarray, n_experts: int, **options) -> dict:
    """One EM iteration (E-step pass + M-step) at a fit's parameters vs one weighted Gram.

    The Gram X^T diag(w) X is the least work an iteration can do (every expert's
    weighted least squares needs one); it is timed before and after the iteration
    and the faster kept. ``options`` go to ``MoERegressor`` (``expert=``, say).
    Returns wall-clock and CPU seconds of both.
    """
    import torch

    from moekit import MoERegressor
    from moekit.fitting.em import EMModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(n_experts, random_state=0, max_iter=5, **options).fit(X, y)
    data = m._em_data(X, y)
    model = EMModel(m._expert_family, m._gate_family)
    model.prepare(data)
    params = m._params

    def iteration():
        model.m_step(params, model.e_pass(params, data), data)

    Xt = torch.as_tensor(X)
    w = torch.rand(len(X), dtype=torch.float64)
    gram = median_times(lambda: (Xt * w[:, None]).T @ Xt)
    it = median_times(iteration)
    gram2 = median_times(lambda: (Xt * w[:, None]).T @ Xt)
    return {
        "gram": min(gram[0], gram2[0]),
        "iteration": it[0],
        "gram_cpu": min(gram[1], gram2[1]),
        "iteration_cpu": it[1],
        "threads": torch.get_num_threads(),
    }
