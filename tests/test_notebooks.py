"""Run every library notebook's own asserts (every nbs/*.ipynb without a papermill `parameters` cell) with nbdev_test.

Experiment notebooks (those with a `parameters` cell) are exercised by `dyntrack-reproduce --profile smoke` instead.
"""
import subprocess, sys
from pathlib import Path

import nbformat
import pytest

NBS = Path(__file__).resolve().parent.parent / "nbs"


def _is_library(path: Path) -> bool:
    cells = nbformat.read(path, as_version=4).cells
    return not any("parameters" in c.metadata.get("tags", []) for c in cells)


# nbdev neither exports nor tests notebooks whose names start with "_" or "."
LIBRARY_NOTEBOOKS = [p for p in sorted(NBS.glob("[!_.]*.ipynb")) if _is_library(p)]


# nbdev_test run by this interpreter (not whichever `nbdev_test` script is on PATH); `__wrapped__` skips fastcore's
# argv parsing, which `python -c` would not trigger (it would then test every notebook).
RUN_NBDEV_TEST = "import sys; from nbdev.test import nbdev_test; nbdev_test.__wrapped__(path=sys.argv[1])"


@pytest.mark.parametrize("nb", LIBRARY_NOTEBOOKS, ids=[p.stem for p in LIBRARY_NOTEBOOKS])
def test_library_notebook(nb):
    res = subprocess.run([sys.executable, "-c", RUN_NBDEV_TEST, str(nb)], capture_output=True, text=True, timeout=900)
    if res.returncode != 0 or "Success" not in res.stdout:
        pytest.fail(f"nbdev_test {nb.name} failed (exit {res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}",
                    pytrace=False)
