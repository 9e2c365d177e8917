"""The ``moekit`` command.

::

    moekit demo [--out DIR]                       fit the bundled mcycle data, write a report
    moekit fit DATA.csv --target COL [--experts K] [--out DIR]
    moekit predict MODEL DATA.csv [--out FILE] [--interval 0.9] [--samples N] [--offset EXPR]
    moekit inspect MODEL
    moekit lm train [--corpus FILE] [--config tiny|small] [--steps N] [--out DIR] [--resume]
    moekit lm generate CHECKPOINT --prompt TEXT [--tokens N] [--temperature T] [--top-k K]
    moekit lm upcycle CHECKPOINT [--n-experts E] [--top-k K] [--granularity G] [--out FILE]

One module per part: ``parser`` (the flags), ``tables`` (reading a table, the
design, the held-out rows), ``rows`` (each row's weight, offset and upper bound),
``fit``, ``predict``, ``inspect``, ``lm`` and ``demo``
(the subcommands), ``errors`` (one-line errors and warnings).
"""

from __future__ import annotations

import os
import sys

from moekit.cli.errors import DataError, UsageError, run, show_warning
from moekit.cli.parser import build_parser

__all__ = ["DataError", "UsageError", "build_parser", "command", "main"]

QUICK_EXIT = ("fit",)
"""Subcommands after which the program ends without Python's teardown of the
libraries it loaded: freeing PyTorch, SciPy and the rest module by module takes
0.75 s after a fit, about as long as the fit of a small table itself, and it
serves nothing once the files are written (each is closed before the command
returns) and the output is flushed."""


def main(argv: list[str] | None = None) -> int:
    """Run the ``moekit`` command with the arguments ``argv`` (default: the program's);
    its exit status."""
    return _run(build_parser().parse_args(argv))


def command() -> None:
    """The ``moekit`` program (its console script, and ``python -m moekit.cli``):
    :func:`main` on the program's arguments, then the exit; after the subcommands of
    :data:`QUICK_EXIT` the process ends at once (``os._exit``), its output flushed."""
    args = build_parser().parse_args()
    status = _run(args)
    if args.command not in QUICK_EXIT:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            pass
    os._exit(status)


def _run(args) -> int:
    import warnings

    with warnings.catch_warnings():
        if not args.debug:  # a warning is one line too, without moekit's source line
            warnings.showwarning = show_warning
        return run(args)
