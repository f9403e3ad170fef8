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


# --- experiment notebooks: every check that needs no training runs in the parameter cell ------------------------

EARLY_FAILURES = [  # (notebook, parameters, words of the error)
    ("10_suite", dict(site_layer=99), "site_layer=99 is out of range; the suite has blocks [0, 1]"),
    ("10_suite", dict(device="gpu"), "device='gpu'"),
    ("10_suite", dict(lr=float("inf")), "lr=inf is not a finite number"),
    ("10_suite", dict(suite="run:/no/such/run"), "/no/such/run/manifest.json"),
    ("10_suite", dict(hub_steps=[0, 8]), "hub_steps=(0, 8) is not used here"),
    ("10_suite", dict(suite="hub:toy-org/x", hub_revision="ckpt-{tokens}"), "hub_revision='ckpt-{tokens}' does not format"),
    ("11_sae_track", dict(site_layer=99), "site_layer=99 is out of range"),
    ("11_sae_track", dict(chain_steps=[0, 3]), "chain_steps [3] are not checkpoints of the suite"),
    ("11_sae_track", dict(cold_steps=[7]), "cold_steps [7]"),
    ("13_topk_lm", dict(site_layer=99), "site_layer=99 is out of range"),
    ("13_topk_lm", dict(hub_tokens_per_step=1000), "hub_tokens_per_step=1000 is not used here"),
]


@pytest.mark.parametrize("name, params, words", EARLY_FAILURES, ids=[f"{n}-{'-'.join(p)}" for n, p, _ in EARLY_FAILURES])
def test_experiment_fails_in_its_parameter_cell(name, params, words, tmp_path, monkeypatch):
    import papermill as pm
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("DYNTRACK_CACHE", str(cache))  # the kernel inherits it
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")
    with pytest.raises(pm.PapermillExecutionError) as failure:
        pm.execute_notebook(str(NBS / f"{name}.ipynb"), str(tmp_path / "executed.ipynb"), cwd=str(NBS),
                            kernel_name="python3", progress_bar=False,
                            parameters=dict(profile="smoke", out_dir=str(tmp_path / "out"), **params))
    assert words in failure.value.evalue, failure.value.evalue
    assert "notebook_params(" in failure.value.source  # the cell right after the parameters
    assert list(cache.iterdir()) == []  # no corpus generated, no suite trained, not even a cache folder named
