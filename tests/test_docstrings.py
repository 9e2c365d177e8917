"""Every example in moekit's docstrings runs and prints what it shows.

Each module of the package is collected (private ones too, since public classes
live in them, e.g. ``moekit.estimators._base``) and its doctests run with
``NORMALIZE_WHITESPACE`` and ``ELLIPSIS``; one test per module, so that a failure
names its module. The examples of the documentation pages run in ``test_docs.py``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import moekit

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _modules() -> list[str]:
    names = ["moekit"]
    for info in pkgutil.walk_packages(moekit.__path__, "moekit."):
        names.append(info.name)
    return sorted(names)


def _tests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, name) if t.examples]


MODULES = _modules()
WITH_EXAMPLES = [name for name in MODULES if _tests(name)]


def test_every_module_is_collected():
    # the walk reaches both rooms and the private modules that hold public classes
    for name in ("moekit.estimators._base", "moekit.nn.layer", "moekit.prediction"):
        assert name in MODULES
    for name in ("moekit.estimators.regressor", "moekit.nn.layer", "moekit.nn.functional"):
        assert name in WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    tests = _tests(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        for test in tests:
            runner.run(test)
    finally:
        torch.set_num_threads(threads)  # an example may set it
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
