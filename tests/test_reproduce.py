"""dyntrack.reproduce end to end on two tiny experiment notebooks (one papermill kernel per notebook run)."""
import platform, shutil, subprocess, sys

import nbformat
import pytest

from dyntrack.core import ParamError, read_json
from dyntrack.reproduce import (INSTALL_SH, MANYLINUX_X86_64, OFFLINE_PACKAGES, find_experiments, is_complete, main,
                                parse_value, pip_download_command, plan_overrides, reproduce, source_digest)

ALPHA_PARAMS = 'profile = "smoke"  # run profile\nout_dir = "../runs/alpha"  # outputs\nx = 1  # a number'
ALPHA_BODY = """\
import time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dyntrack.core import device_name, save_figure, write_metrics
t0 = time.time()
fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1], [0, x])
save_figure(fig, out_dir, "fig1_alpha")
write_metrics(out_dir, "10_alpha", profile, device_name("cpu"), time.time() - t0,
              {"x": x, "loss": {"final": 0.5, "curve": [float(i) for i in range(20)]}})"""
BETA_PARAMS = 'profile = "smoke"\nout_dir = "../runs/beta"\nlr: float = 0.01'
BETA_BODY = """\
assert lr > 0, f"lr must be > 0, got {lr}"
import json, pathlib  # plain json here: importing dyntrack (torch) in every kernel would slow the tests
record = dict(notebook="11_beta", profile=profile, device="cpu", wall_s=0.0, metrics={"lr": lr})
(pathlib.Path(out_dir) / "metrics.json").write_text(json.dumps(record))"""


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nb.cells = cells
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def nbs(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbs")
    code = nbformat.v4.new_code_cell
    _notebook(d / "00_lib.ipynb", [code("#| default_exp lib\n1 + 1")])  # a library notebook: not an experiment
    _notebook(d / "10_alpha.ipynb", [nbformat.v4.new_markdown_cell("# alpha"),
                                     code(ALPHA_PARAMS, metadata={"tags": ["parameters"]}), code(ALPHA_BODY)])
    _notebook(d / "11_beta.ipynb", [code(BETA_PARAMS, metadata={"tags": ["parameters"]}), code(BETA_BODY),
                                    code("raise SystemExit('never run')", metadata={"tags": ["skip-execution"]})])
    return d


@pytest.fixture(scope="module")
def first_run(nbs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    return reproduce("smoke", out, {"x": 3}, nbs_dir=nbs)


def _copy(run, tmp_path):
    dst = tmp_path / "smoke"
    shutil.copytree(run.out, dst)
    return dst


def test_find_experiments(nbs):
    exps = find_experiments(nbs)
    assert [e.stem for e in exps] == ["10_alpha", "11_beta"]
    assert list(exps[1].params) == ["profile", "out_dir", "lr"] and exps[1].params["lr"] == "0.01"


def test_parse_value():
    assert [parse_value(v) for v in ["7", "-2.5", "1e-3", "False", "None", "pythia", "[1, 2]", "{a: 1}", ""]] == \
        [7, -2.5, 1e-3, False, None, "pythia", [1, 2], {"a": 1}, ""]


def test_plan_overrides(nbs):
    exps = find_experiments(nbs)
    assert plan_overrides(exps, {"x": 2, "lr": 0.1}) == {"10_alpha": {"x": 2}, "11_beta": {"lr": 0.1}}
    with pytest.raises(ParamError, match=r"unknown parameter 'nope'.*known: \['lr', 'x'\]"):
        plan_overrides(exps, {"nope": 1})
    with pytest.raises(ParamError, match="out_dir is set by reproduce"):
        plan_overrides(exps, {"out_dir": "x"})


def test_first_run_outputs(first_run):
    assert first_run.profile == "smoke" and [(r.stem, r.status) for r in first_run.runs] == [("10_alpha", "ran"), ("11_beta", "ran")]
    a = first_run.out / "10_alpha"
    assert read_json(a / "metrics.json")["metrics"]["x"] == 3
    assert (a / "fig1_alpha.png").read_bytes().startswith(b"\x89PNG")
    run = read_json(a / "run.json")
    assert run["status"] == "complete" and run["overrides"] == {"x": 3} and run["profile"] == "smoke"
    assert read_json(first_run.out / "11_beta" / "run.json")["overrides"] == {}


def test_executed_notebook_is_normalised(first_run):
    nb = nbformat.read(first_run.out / "10_alpha" / "10_alpha.ipynb", as_version=4)
    assert "papermill" not in nb.metadata
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert ["parameters"] in tags and ["injected-parameters"] in tags
    assert all("papermill" not in c.metadata and c.get("execution_count") is None for c in nb.cells)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "x = 3" in injected.source and 'profile = "smoke"' in injected.source


def test_report(first_run):
    report = read_json(first_run.out / "report.json")
    assert [n["stem"] for n in report["notebooks"]] == ["10_alpha", "11_beta"]
    assert {n["status"] for n in report["notebooks"]} == {"complete"}
    assert report["profiles"] == ["smoke"] and {"python", "torch", "transformers", "device"} <= set(report["environment"])
    for n in report["notebooks"]:  # each notebook's run records the environment its kernel ran in
        assert n["environment"]["python"] == platform.python_version() and "torch" in n["environment"]
    assert report["notebooks"][0]["metrics"]["loss"]["curve"][-1] == 19.0  # full lists stay in report.json
    md = first_run.report.read_text()
    assert "## 10_alpha" in md and "## 11_beta" in md
    assert "![fig1_alpha](10_alpha/fig1_alpha.png)" in md
    assert "| `loss.final` | 0.5 |" in md and "| `loss.curve` | 20 values: 0 … 19 (min 0, max 19) |" in md
    assert "executed notebook: 10_alpha/10_alpha.ipynb" in md
    assert f"- ran with: python {platform.python_version()}; torch" in md
    assert '<img src="10_alpha/fig1_alpha.png"' in (first_run.out / "report.html").read_text()


def test_skip_override_change_and_force(first_run, nbs, tmp_path):
    out = _copy(first_run, tmp_path)
    again = reproduce("smoke", out, {"x": 3}, nbs_dir=nbs)
    assert [r.status for r in again.runs] == ["skipped", "skipped"]
    changed = reproduce("smoke", out, {"x": 3, "lr": 0.5}, nbs_dir=nbs)  # lr only reaches 11_beta
    assert [r.status for r in changed.runs] == ["skipped", "ran"]
    assert read_json(out / "11_beta" / "metrics.json")["metrics"]["lr"] == 0.5
    (out / "11_beta" / "stale.png").write_bytes(b"old figure")
    forced = reproduce("smoke", out, {"lr": 0.5}, only=["11_beta"], force=True, nbs_dir=nbs)
    assert [(r.stem, r.status) for r in forced.runs] == [("11_beta", "ran")]
    assert not (out / "11_beta" / "stale.png").exists()  # a rerun starts from an empty folder
    assert len(read_json(out / "report.json")["notebooks"]) == 2  # the report still covers both


def test_edited_notebook_reruns(nbs, tmp_path, caplog):
    "A complete run is skipped only while the notebook's source (and the library) is what produced it."
    mine = tmp_path / "nbs"
    shutil.copytree(nbs, mine)
    first = reproduce("smoke", tmp_path / "o", only=["11_beta"], nbs_dir=mine)
    digest = read_json(tmp_path / "o" / "11_beta" / "run.json")["source_digest"]
    assert digest == source_digest(mine / "11_beta.ipynb") and len(digest) == 16
    assert [r.status for r in reproduce("smoke", tmp_path / "o", only=["11_beta"], nbs_dir=mine).runs] == ["skipped"]
    nb = nbformat.read(mine / "11_beta.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A remark: prose counts too, it is part of the executed notebook."))
    nbformat.write(nb, mine / "11_beta.ipynb")
    assert source_digest(mine / "11_beta.ipynb") != digest
    with caplog.at_level("INFO", logger="dyntrack.reproduce"):
        again = reproduce("smoke", tmp_path / "o", only=["11_beta"], nbs_dir=mine)
    assert [r.status for r in first.runs + again.runs] == ["ran", "ran"]
    assert "changed since its earlier run" in caplog.text
    assert read_json(tmp_path / "o" / "11_beta" / "run.json")["source_digest"] == source_digest(mine / "11_beta.ipynb")


def test_errors_before_running(nbs, tmp_path):
    with pytest.raises(ParamError, match="unknown parameter 'nope'"):
        reproduce("smoke", tmp_path / "o", {"nope": 1}, nbs_dir=nbs)
    with pytest.raises(ParamError, match="unknown parameter 'x'"):  # x exists, but not in the selected notebook
        reproduce("smoke", tmp_path / "o", {"x": 1}, only=["11_beta"], nbs_dir=nbs)
    with pytest.raises(ParamError, match=r"unknown notebook\(s\) \['12_gamma'\]"):
        reproduce("smoke", tmp_path / "o", only=["12_gamma"], nbs_dir=nbs)
    with pytest.raises(ParamError, match="profile='big'"):
        reproduce("big", tmp_path / "o", nbs_dir=nbs)
    assert not (tmp_path / "o").exists()
    (tmp_path / "p" / "10_alpha").mkdir(parents=True)
    (tmp_path / "p" / "10_alpha" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        reproduce("smoke", tmp_path / "p", only=["10_alpha"], nbs_dir=nbs)
    assert (tmp_path / "p" / "10_alpha" / "notes.txt").read_text() == "mine"


def test_failing_notebook(nbs, tmp_path, capsys):
    code = main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--nbs", str(nbs), "--only", "11_beta",
                 "-p", "lr", "-1.0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "notebook 11_beta failed" in err and "AssertionError: lr must be > 0, got -1.0" in err
    assert "assert lr > 0" in err and "cell" in err
    executed = tmp_path / "o" / "11_beta" / "11_beta.ipynb"
    assert f"partial executed notebook: {executed}" in err and executed.exists()
    assert read_json(tmp_path / "o" / "11_beta" / "run.json")["status"] == "failed"
    assert not is_complete(tmp_path / "o" / "11_beta", "smoke", {"lr": -1.0}, source_digest(nbs / "11_beta.ipynb"))


def test_cli(first_run, nbs, tmp_path, capsys):
    _copy(first_run, tmp_path)
    assert main(["--profile", "smoke", "--out", str(tmp_path / "{profile}"), "--nbs", str(nbs), "-p", "x", "3"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--nbs", str(nbs), "-p", "nope", "1"]) == 2
    assert "unknown parameter 'nope'" in capsys.readouterr().err
    assert main(["--nbs", str(nbs)]) == 2 and "--out is required" in capsys.readouterr().err
    assert main(["--list", "--nbs", str(nbs)]) == 0
    listed = capsys.readouterr().out
    assert "10_alpha" in listed and "    x = 1" in listed and "00_lib" not in listed
    with pytest.raises(SystemExit) as e: main(["--profile", "huge"])
    assert e.value.code == 2


def test_module_entry_point(nbs):
    res = subprocess.run([sys.executable, "-m", "dyntrack.reproduce", "--list", "--nbs", str(nbs)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "11_beta" in res.stdout and "lr = 0.01" in res.stdout


def test_wheelhouse_command_and_installer(tmp_path):
    cmd = pip_download_command(tmp_path, "3.12")
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == list(MANYLINUX_X86_64)
    assert cmd[-len(OFFLINE_PACKAGES):] == list(OFFLINE_PACKAGES)
    for pkg in ("papermill", "ipykernel", "pyzmq", "datasets", "dill<0.4.2", "nbdev==2.4.14"): assert pkg in OFFLINE_PACKAGES
    script = tmp_path / "install.sh"
    script.write_text(INSTALL_SH)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--no-index --no-deps" in INSTALL_SH and "PYTHONPATH" in INSTALL_SH
