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


AUSTEN_BOOKS = ("pride_and_prejudice", "persuasion")
"""The novels :func:`load_austen` can return, in the order it joins them."""


def load_austen(books: tuple[str, ...] | list[str] = AUSTEN_BOOKS) -> str:
    """Jane Austen's *Pride and Prejudice* (1813) and *Persuasion* (1818) as one text.

    Public-domain novels bundled with moekit (about 1.15 MB of plain ASCII
    English), the default corpus of ``moekit lm train``. The books follow one
    another in the order given, separated by a blank line; a held-out slice taken
    from the end of the text therefore comes from the last book. Provenance and
    checksums: ``moekit/datasets/data/README.md``.

    Parameters
    ----------
    books : sequence of {'pride_and_prejudice', 'persuasion'}, default=both
        Which novels, in which order.

    Returns
    -------
    str

    Examples
    --------
    >>> from moekit.datasets import load_austen
    >>> load_austen(["pride_and_prejudice"])[:19]
    'PRIDE AND PREJUDICE'
    """
    import gzip

    books = list(books)
    unknown = [b for b in books if b not in AUSTEN_BOOKS]
    if unknown or not books:
        raise ValueError(
            f"The 'books' parameter of load_austen must be a non-empty list of "
            f"{', '.join(map(repr, AUSTEN_BOOKS))}. Got {books!r} instead."
        )
    folder = resources.files("moekit.datasets").joinpath("data")
    texts = [
        gzip.decompress(folder.joinpath(f"{b}.txt.gz").read_bytes()).decode("ascii") for b in books
    ]
    return "\n".join(texts)


def library_text() -> str:
    """moekit's own documentation: the docstrings of its modules, classes and functions.

    A corpus that ships with the library (tens of kilobytes of English about
    mixtures of experts); ``moekit lm train`` reads :func:`load_austen` by default.
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
