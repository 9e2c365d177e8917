"""The ``moekit`` command.

::

    moekit demo [--out DIR]                       fit the bundled mcycle data, write a report
    moekit fit DATA.csv --target COL [--experts K] [--out DIR]
    moekit predict MODEL DATA.csv [--out FILE] [--interval 0.9] [--samples N]
    moekit inspect MODEL
    moekit lm train [--corpus FILE] [--config tiny|small] [--steps N] [--out DIR] [--resume]
    moekit lm generate CHECKPOINT --prompt TEXT [--tokens N] [--temperature T] [--top-k K]
    moekit lm upcycle CHECKPOINT [--n-experts E] [--top-k K] [--granularity G] [--out FILE]

One module per part: ``parser`` (the flags), ``tables`` (reading a table, the
design, the held-out rows), ``fit``, ``predict``, ``inspect``, ``lm`` and ``demo``
(the subcommands), ``errors`` (one-line errors and warnings).
"""

from __future__ import annotations

from moekit.cli.errors import DataError, UsageError, run, show_warning
from moekit.cli.parser import build_parser

__all__ = ["DataError", "UsageError", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moekit`` command; its exit status."""
    import warnings

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:  # a warning is one line too, without moekit's source line
            warnings.showwarning = show_warning
        return run(args)
