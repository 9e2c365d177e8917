"""How the ``moekit`` command fails: one line on stderr and an exit status.

A problem with the data (a bad cell, an empty file, a constant target) ends with
status 1, a problem with the command line (an unknown column, a flag that
contradicts another) with status 2, like argparse's own errors. ``--debug`` shows
the whole traceback instead of the line.
"""

from __future__ import annotations

import sys


class DataError(SystemExit):
    """A problem with the data: one line, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message


class UsageError(SystemExit):
    """A problem with the command line: one line, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


FLAG_NAMES = {"max_iter or tol": "--max-iter", "max_iter": "--max-iter", "(n_init)": "(--n-init)",
              "(n_experts)": "(--experts)"}  # fmt: skip
"""Estimator parameters that a warning's advice names, and the command's flags for them."""


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the command: one line, without moekit's source line,
    its advice in the command's flags (``--max-iter`` where the estimator says max_iter)."""
    text = str(message)
    for name, flag in FLAG_NAMES.items():
        text = text.replace(name, flag)
    print(f"moekit: warning: {text}", file=sys.stderr)


def run(args) -> int:
    """Run the parsed command ``args.func(args)``; its exit status.

    Foreseen errors (:class:`DataError`, :class:`UsageError`, ``ValueError``,
    ``FileNotFoundError``) become one line; so does an unforeseen one, with a hint at
    ``--debug``. A closed pipe (``moekit predict ... | head``) ends quietly.
    """
    try:
        return int(args.func(args) or 0)
    except (DataError, UsageError, ValueError, FileNotFoundError):
        if args.debug:
            import traceback

            traceback.print_exc()
        return one_line(sys.exc_info()[1])
    except BrokenPipeError:  # the reader left (`moekit predict ... | head`): end quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a failure moekit did not foresee: still one line
        if args.debug:
            raise
        print(f"moekit: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback)", file=sys.stderr)  # fmt: skip
        return 1


def one_line(exc: BaseException) -> int:
    """Print an error as one line on stderr; its exit status (1: data, 2: usage)."""
    if isinstance(exc, (DataError, UsageError)):
        print(exc.message, file=sys.stderr)
        return exc.code
    print(f"moekit: error: {exc}", file=sys.stderr)
    return 2
