"""``python -m moekit.cli``: the ``moekit`` command (as ``torchrun -m`` needs it)."""

from moekit.cli import command

if __name__ == "__main__":  # pragma: no cover - imported too, when the package is walked
    command()
