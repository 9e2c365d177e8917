"""Sphinx configuration of moekit's documentation site.

Build with ``make docs`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``).
The build needs no network: intersphinx is off, and the examples of the gallery run
on the CPU in their small settings. Reading needs none either: formulas are typeset
in the browser by MathJax 3, served from the site's own ``_static/mathjax`` (copied
there by the ``sphinx-mathjax-offline`` extension of the docs extra), never from a
CDN. ``MOEKIT_DOCS_MATHJAX`` may name another local copy instead (a path of
``MathJax.js`` (version 2, such as Debian's ``libjs-mathjax``) or ``tex-chtml.js``
(version 3)).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

import moekit
import moekit.nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # docs/_ext

project = "moekit"
author = "the moekit developers"
copyright = "the moekit developers"
release = version = moekit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 in _static: formulas render without a network
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "_ext.moekit_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
# the R script is shown, not built
exclude_patterns = ["_build", "r", "images/*.md", "Thumbs.db", ".DS_Store"]

# -- MyST: the Markdown pages -------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- API reference ---------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"  # the numpydoc docstrings state the types
numpydoc_show_class_members = False  # autosummary lists them; avoids stub warnings
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- The example gallery ---------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # every script runs and shows its figures
    "ignore_pattern": r"__init__\.py",
    "reset_argv": "_ext.moekit_docs.gallery_argv",  # small settings for the build
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    # the page of run times loads jQuery and DataTables from CDNs: no page may need
    # the network, so it is not written
    "write_computation_times": False,
}
# The gallery's scripts run in this process. One torch thread: their networks are
# small, and on a busy machine a second thread mostly waits at every barrier.
torch.set_num_threads(1)
# the examples silence their own warnings where they expect them; the rest is noise here
warnings.filterwarnings("ignore", category=UserWarning, message=".*non-GUI backend.*")

# -- Math --------------------------------------------------------------------------------
_mathjax = os.environ.get("MOEKIT_DOCS_MATHJAX")
if _mathjax:
    if _mathjax.startswith(("http:", "https:", "//")):
        raise ValueError("MOEKIT_DOCS_MATHJAX must name a local copy of MathJax, not a URL")
    # a local copy of one's own replaces the bundled one (whose setup sets mathjax_path)
    extensions.remove("sphinx-mathjax-offline")
    if _mathjax.endswith("MathJax.js"):  # version 2 needs its configuration named
        mathjax_path = _mathjax + "?config=TeX-AMS-MML_HTMLorMML"
        # MyST marks each page's body ignored and its formulas "math" (MathJax 3's way)
        mathjax2_config = {
            "tex2jax": {
                "inlineMath": [["\\(", "\\)"]],
                "processClass": "tex2jax_process|mathjax_process|math|output_area",
                "ignoreClass": "tex2jax_ignore|mathjax_ignore",
            }
        }
    else:
        mathjax_path = _mathjax

# -- HTML ----------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"moekit {release}"
html_static_path = ["_static"]
html_css_files = ["moekit.css"]
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": [], "install": [], "coming_from_r": []}
html_show_sourcelink = False
