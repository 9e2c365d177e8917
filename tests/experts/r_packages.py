"""Whether R and one of its packages are installed, for the tests that compare with R
live (they skip cleanly, saying which package is missing, where it is not)."""

import shutil
import subprocess


def r_has(package: str) -> bool:
    """Whether ``Rscript`` runs and loads ``package``."""
    if shutil.which("Rscript") is None:
        return False
    return (
        subprocess.run(["Rscript", "-e", f"library({package})"], capture_output=True).returncode
        == 0
    )
