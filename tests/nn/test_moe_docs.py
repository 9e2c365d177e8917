"""The examples in the docstrings of moekit.nn run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["moekit.nn.layer", "moekit.nn.transformer", "moekit.nn.upcycle"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_listed_name_is_exported():
    import moekit.nn as nn

    assert len(nn.__all__) == len(set(nn.__all__))
    missing = [name for name in nn.__all__ if not hasattr(nn, name)]
    assert not missing
