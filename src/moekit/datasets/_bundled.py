"""Real data bundled with moekit."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd


def load_mcycle(*, as_frame: bool = False):
    """Motorcycle crash data: head acceleration against time after impact.

    133 measurements from simulated motorcycle crashes (Silverman, 1985; the
    ``mcycle`` data of R's MASS package). The noise level changes sharply along
    time and the curve has distinct regimes, a classic test of mixtures of experts.

    Parameters
    ----------
    as_frame : bool, default=False
        Return a pandas DataFrame with columns ``times`` (ms) and ``accel`` (g).

    Returns
    -------
    (X, y) : ndarray of shape (133, 1) and ndarray of shape (133,)
        Or the DataFrame when ``as_frame`` is True.

    References
    ----------
    Silverman, B. W. (1985). Some aspects of the spline smoothing approach to
    non-parametric curve fitting. JRSS B 47, 1-52.
    """
    with resources.files("moekit.datasets").joinpath("data/mcycle.csv").open("r") as fh:
        frame = pd.read_csv(fh)
    if as_frame:
        return frame
    return frame[["times"]].to_numpy(dtype=np.float64), frame["accel"].to_numpy(dtype=np.float64)


def mcycle_path() -> str:
    """Path of the bundled ``mcycle.csv`` (for the command line and benchmarks)."""
    return str(resources.files("moekit.datasets").joinpath("data/mcycle.csv"))


def library_text() -> str:
    """moekit's own documentation: the docstrings of its modules, classes and functions.

    A corpus that ships with the library (tens of kilobytes of English about
    mixtures of experts), the default of ``moekit lm train``.
    """
    import importlib
    import inspect
    import pkgutil

    import moekit

    parts = []
    names = sorted(m.name for m in pkgutil.walk_packages(moekit.__path__, "moekit."))
    for name in ["moekit", *names]:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - an optional room missing
            continue
        docs = [inspect.getdoc(module)]
        for _, obj in inspect.getmembers(
            module, lambda o: inspect.isclass(o) or inspect.isfunction(o)
        ):
            if getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj))
        parts += [d for d in docs if d]
    return "\n\n".join(parts) + "\n"
