"""The documentation's maths renders without a network: no MathJax from a CDN.

Read statically (conf.py is not run: it sets torch's threads for the build), so the
check runs everywhere, with or without the docs extra; ``test_docs.py`` checks the
built pages where Sphinx is installed.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"(https?:)?//[^\s\"']*mathjax", re.IGNORECASE)


def _assigned(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name
                                                for t in node.targets):  # fmt: skip
            return ast.literal_eval(node.value)
    raise AssertionError(f"conf.py assigns no {name}")


def test_conf_serves_mathjax_from_the_site_itself():
    source = (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    extensions = _assigned(tree, "extensions")
    assert "sphinx.ext.mathjax" in extensions and "sphinx-mathjax-offline" in extensions
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)]  # fmt: skip
    assert not [s for s in strings if URL.search(s)], "a MathJax URL in docs/conf.py"
    assert "mathjax_path" not in {getattr(t, "id", None) for n in tree.body
                                  if isinstance(n, ast.Assign) for t in n.targets}  # fmt: skip


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_the_docs_extra_installs_the_offline_mathjax():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    docs = project["project"]["optional-dependencies"]["docs"]
    assert any(req.startswith("sphinx-mathjax-offline") for req in docs)
