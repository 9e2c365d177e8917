"""Small Sphinx helpers of moekit's documentation (no network, no state between builds)."""

from __future__ import annotations

import doctest
import io
import os
from pathlib import Path

from sphinx.errors import ExtensionError

DOCS = Path(__file__).resolve().parent.parent

# The gallery runs every script of examples/ as a plain script would run; these are
# the command-line arguments each gets in the build: figures go to the build folder,
# and the long runs take their small settings (the full ones are the scripts' defaults).
_OUT = DOCS / "_build" / "example_output"
_SMALL = {"vision_moe_digits.py": ["--seeds", "1", "--epochs", "15"]}
_WITH_OUT = ("gate_balance.py", "inverse_bishop.py", "inverse_robot_arm.py", "vision_moe_digits.py")


def gallery_argv(_gallery_conf: dict, script_vars: dict) -> list[str]:
    """sys.argv[1:] of one gallery script (sphinx-gallery's ``reset_argv``).

    The output folder is given relative to the script's folder, where sphinx-gallery
    runs it, so that the path the script prints on its page names no machine.
    """
    script = Path(script_vars["src_file"])
    args = list(_SMALL.get(script.name, []))
    if script.name in _WITH_OUT:
        args = ["--out", os.path.relpath(_OUT, script.parent), *args]
    return args


def page_examples(text: str, name: str) -> doctest.DocTest:
    """The ``>>>`` examples of a Markdown page as one doctest.

    A code fence's closing line would otherwise read as part of the expected output
    of the example above it, so fence lines count as blank lines.
    """
    lines = ["" if line.lstrip().startswith("```") else line for line in text.splitlines()]
    return doctest.DocTestParser().get_doctest("\n".join(lines), {}, name, name, 0)


def run_page_examples(text: str, name: str) -> tuple[int, int, str]:
    """Run a page's examples: (failed, attempted, the failure report)."""
    out = io.StringIO()
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    runner = doctest.DocTestRunner(optionflags=flags)
    runner.run(page_examples(text, name), out=out.write)
    failed, attempted = runner.summarize(verbose=False)
    return failed, attempted, out.getvalue()


def _run_examples(app, docname: str, source: list[str]) -> None:
    """Execute the ``>>>`` examples of every Markdown page as it is read.

    The outputs printed on the page are the doctests' expected outputs, so a page
    whose numbers no longer match what moekit computes fails the build.
    """
    if ">>> " not in source[0] or not app.env.doc2path(docname).suffix == ".md":
        return
    failed, attempted, report = run_page_examples(source[0], docname)
    if failed:
        raise ExtensionError(f"{failed} of {attempted} examples of {docname} failed:\n{report}")


def _skip_member(app, what, name, obj, skip, options):
    """Leave out scikit-learn's generated metadata-routing setters (set_fit_request...)."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("source-read", _run_examples)
    app.connect("autodoc-skip-member", _skip_member)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
