"""The documentation site builds with warnings as errors and documents every public name.

Slow: the build runs every example of the gallery and the examples of the pages.
Skipped where Sphinx and its extensions (the ``docs`` extra) are not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
import moekit.nn

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXTENSIONS = ("sphinx", "numpydoc", "sphinx_gallery", "myst_parser", "pydata_sphinx_theme")
MISSING = [name for name in EXTENSIONS if importlib.util.find_spec(name) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the docs extra is not installed (missing: {', '.join(MISSING)})"
)


def _public_names() -> list[str]:
    return [f"moekit.{n}" for n in moekit.__all__] + [f"moekit.nn.{n}" for n in moekit.nn.__all__]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(out / ".doctrees"), str(DOCS), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    log = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"sphinx-build failed:\n{log}"
    assert "WARNING" not in proc.stderr, proc.stderr[-8000:]
    return out


@pytest.mark.slow
def test_every_public_name_has_its_api_page(site):
    api = (site / "api.html").read_text(encoding="utf-8")
    missing = []
    for name in _public_names():
        page = site / "generated" / f"{name}.html"
        if not page.is_file() or f'id="{name}"' not in page.read_text(encoding="utf-8"):
            missing.append(name)
        elif f"generated/{name}.html" not in api:
            missing.append(f"{name} (not linked from api.html)")
    assert not missing, f"public names without an API page: {missing}"


@pytest.mark.slow
def test_gallery_pages_show_their_figures(site):
    scripts = sorted((DOCS.parent / "examples").glob("*.py"))
    pages = [site / "auto_examples" / f"{script.stem}.html" for script in scripts]
    assert scripts and all(page.is_file() for page in pages)
    for page in pages:
        if page.stem.startswith("nn_"):  # the two training scripts print, they draw nothing
            continue
        html = page.read_text(encoding="utf-8")
        assert re.search(r'<img[^>]+src="[^"]*images/sphx_glr_[^"]+\.png"', html), page.name


@pytest.mark.slow
def test_pages_are_built(site):
    pages = ("index", "install", "coming_from_r", "user_guide/statistical_moe",
             "user_guide/sparse_layers", "inverse_problems", "user_guide/distributed")  # fmt: skip
    for page in pages:
        assert (site / f"{page}.html").is_file(), page
    r_page = (site / "coming_from_r.html").read_text(encoding="utf-8")
    assert "-580.5261" in r_page and "-578.133" in r_page  # R's and moekit's fits side by side


@pytest.mark.slow
def test_maths_is_typeset_from_the_site_itself(site):
    """No page loads MathJax (or anything) from a CDN: the site reads offline."""
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    remote = re.compile(r'<script[^>]+src="(?:https?:)?//', re.IGNORECASE)
    pages = sorted(site.rglob("*.html"))
    assert pages
    offenders = [p.name for p in pages if remote.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"pages loading scripts from the network: {offenders[:5]}"
    maths = (site / "user_guide" / "statistical_moe.html").read_text(encoding="utf-8")
    assert '_static/mathjax/tex-chtml.js"' in maths
