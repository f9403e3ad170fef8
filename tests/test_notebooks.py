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
    ("10_suite", dict(suite="hub:toy-org/x", hub_revision="ckpt-{tok}"), "hub_revision='ckpt-{tok}' does not format"),
    ("11_sae_track", dict(site_layer=99), "site_layer=99 is out of range"),
    ("11_sae_track", dict(chain_steps=[0, 3]), "chain_steps [3] are not checkpoints of the suite"),
    ("11_sae_track", dict(cold_steps=[7]), "cold_steps [7]"),
    ("13_topk_lm", dict(site_layer=99), "site_layer=99 is out of range"),
    ("13_topk_lm", dict(hub_tokens_per_step=1000), "unknown parameter(s) ['hub_tokens_per_step']"),  # opens no hub suite
    ("13_topk_lm", dict(sim_tokens=99), "unknown parameter(s) ['sim_tokens']"),  # measures no activation similarity
    ("11_sae_track", dict(n_pairs=10), "unknown parameter(s) ['n_pairs']"),  # 10_suite's evaluation size
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


# --- parameters cells against their dataclasses: each name documented once, in the part that defines it -----------

def _parameters_cell(path: Path) -> str:
    return next(c.source for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))


def field_comments(cls) -> dict[str, str]:
    "Fields of dataclass `cls` (not composed) mapped to their trailing comment in its source."
    import dataclasses, inspect, textwrap
    from dyntrack.reproduce.run import parameter_comments
    lines = inspect.getsource(cls).splitlines(keepends=True)
    body = textwrap.dedent("".join(lines[next(i for i, l in enumerate(lines) if l.lstrip().startswith("class ")) + 1:]))
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: comment for name, comment in parameter_comments(body).items() if name in names}


def composed_comments(cls) -> dict[str, str]:
    "Fields of parameter set `cls` mapped to their comment in the part that defines them (`FIXED` fields are not its)."
    out = {}
    for part in getattr(cls, "PARTS", ()) or (cls,):
        out |= {k: v for k, v in field_comments(part).items() if k not in getattr(cls, "FIXED", {})}
    return out


def parameter_mismatches(cell_source: str, cls) -> list[str]:
    "How the parameters cell `cell_source` and parameter set `cls` disagree: names missing on either side, comments that differ."
    from dyntrack.core import NOTEBOOK_PARAMS
    from dyntrack.reproduce.run import parameter_comments
    cell = {k: v for k, v in parameter_comments(cell_source).items() if k not in NOTEBOOK_PARAMS}
    fields = composed_comments(cls)
    out = [f"{n}: in the parameters cell, not a field of {cls.__name__}" for n in sorted(set(cell) - set(fields))]
    out += [f"{n}: a field of {cls.__name__}, not in the parameters cell" for n in sorted(set(fields) - set(cell))]
    out += [f"{n}: cell says {cell[n]!r}, the field says {fields[n]!r}" for n in sorted(set(cell) & set(fields))
            if cell[n] != fields[n]]
    return out


def profile_row_mismatches(cls) -> list[str]:
    "Profile rows of the parts of `cls` that name a field their part does not have, or a profile core does not list."
    import dataclasses
    from dyntrack.core import PROFILES
    out = []
    for part in getattr(cls, "PARTS", ()) or (cls,):
        names = {f.name for f in dataclasses.fields(part)}
        for profile, row in vars(part).get("PROFILES", {}).items():
            if profile not in PROFILES: out.append(f"{part.__name__}.PROFILES[{profile!r}]: not a profile of core.PROFILES")
            out += [f"{part.__name__}.PROFILES[{profile!r}] names {n!r}, not a field" for n in sorted(set(row) - names)]
    return out


EXPERIMENTS = [p for p in sorted(NBS.glob("[!_.]*.ipynb")) if not _is_library(p)]


@pytest.mark.parametrize("nb", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_parameters_cell_matches_its_dataclass(nb):
    from dyntrack.reproduce.run import parameter_class
    cls = parameter_class(nb)
    assert cls is not None, f"{nb.name}: no notebook_params(CLASS, ...) call"
    assert parameter_mismatches(_parameters_cell(nb), cls) == []
    assert profile_row_mismatches(cls) == []


def test_parameter_mismatches_are_found():
    "The checks above fail on a cell or a profile row that disagrees with the dataclass (constructed inputs)."
    import dataclasses
    from dyntrack.core import compose

    @dataclasses.dataclass
    class _Part:
        lr: float = 1e-3          # peak learning rate
        steps: int = 10           # optimizer steps
        PROFILES = {"smoke": dict(steps=5)}

    @dataclasses.dataclass
    class _Typo:
        seed: int = 0             # seed
        PROFILES = {"smoke": dict(sede=1), "tiny": {}}

    good = 'profile = "smoke"  # run profile\nlr = None  # peak learning rate\nsteps = None  # optimizer steps\n'
    assert parameter_mismatches(good, _Part) == [] and profile_row_mismatches(_Part) == []
    assert parameter_mismatches(good.replace("# optimizer steps", "# steps"), _Part) == [
        "steps: cell says 'steps', the field says 'optimizer steps'"]
    assert parameter_mismatches(good + "sim_tokens = None  # ignored\n", _Part) == [
        "sim_tokens: in the parameters cell, not a field of _Part"]
    assert parameter_mismatches(good, compose("_Both", _Part, _Typo)) == ["seed: a field of _Both, not in the parameters cell"]
    assert profile_row_mismatches(compose("_Both", _Part, _Typo)) == [
        "_Typo.PROFILES['smoke'] names 'sede', not a field", "_Typo.PROFILES['tiny']: not a profile of core.PROFILES"]
    assert parameter_mismatches("lr = None  # peak learning rate\n", compose("_Fixed", _Part, fixed=dict(steps=3))) == []
