"""dyntrack.reproduce.run end to end on tiny experiment notebooks (one papermill kernel per notebook run)."""
import json, os, platform, re, shutil, signal, subprocess, sys, time
from configparser import ConfigParser
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dyntrack.reproduce.run as reproduce_module
import dyntrack.reproduce.wheelhouse as wheelhouse_module
from dyntrack.core import PROFILES, ParamError, read_json
from dyntrack.reproduce.run import (NotebookFailed, find_experiments, is_complete, main, parse_value, plan_overrides,
                                    reproduce, resolve_profile, source_digest)
from dyntrack.reproduce.wheelhouse import INSTALL_SH, MANYLINUX_X86_64, OFFLINE_PACKAGES, offline_packages, pip_download_command

REPO = Path(__file__).resolve().parent.parent
ALPHA_PARAMS = ('profile = "smoke"  # run profile\nout_dir = "../runs/alpha"  # outputs\nx = 1  # a number\n'
                'fail = False  # raise after saving the figure')
ALPHA_BODY = """\
import time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dyntrack.core import device_name, save_figure, write_metrics
t0 = time.time()
fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1], [0, x])
save_figure(fig, out_dir, "fig1_alpha")
assert not fail, "asked to fail"
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
    with pytest.raises(ParamError, match=r"unknown parameter 'nope'.*known: \['fail', 'lr', 'x'\]"):
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
    assert "executed notebook: [10_alpha/10_alpha.ipynb](10_alpha/10_alpha.ipynb)" in md
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
    with caplog.at_level("INFO", logger="dyntrack.reproduce.run"):
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
    executed = tmp_path / "o" / "11_beta.failed" / "11_beta.ipynb"  # the failure record, beside the outputs folder
    assert f"partial executed notebook: {executed}" in err and executed.exists()
    assert read_json(tmp_path / "o" / "11_beta.failed" / "run.json")["status"] == "failed"
    assert not (tmp_path / "o" / "11_beta").exists()  # no complete run: no outputs folder
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
    res = subprocess.run([sys.executable, "-m", "dyntrack.reproduce.run", "--list", "--nbs", str(nbs)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "11_beta" in res.stdout and "lr = 0.01" in res.stdout


def test_wheelhouse_command_and_installer(tmp_path):
    cmd = pip_download_command(tmp_path, "3.12")
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == list(MANYLINUX_X86_64)
    assert cmd[-len(OFFLINE_PACKAGES):] == offline_packages()
    assert {"papermill", "ipykernel", "pyzmq", "datasets", "nbdev"} <= {Requirement(p).name for p in offline_packages()}
    assert "dill<0.4.2" in offline_packages()
    script = tmp_path / "install.sh"
    script.write_text(INSTALL_SH)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--no-index --no-deps" in INSTALL_SH and "PYTHONPATH" in INSTALL_SH


# --- the run contract under failures, kills and bad input (issue #11) ---

SLOW_PARAMS = 'profile = "smoke"\nout_dir = "../runs/slow"\nsleep_s = 0  # seconds to wait inside the notebook'
SLOW_BODY = """\
import json, os, pathlib, time
out = pathlib.Path(out_dir)
(out / "started").write_text(str(os.getpid()))  # the test kills this kernel too
time.sleep(sleep_s)
(out / "fig_slow.png").write_bytes(b"not really a PNG")
(out / "metrics.json").write_text(json.dumps(dict(notebook="12_slow", profile=profile, device="cpu", wall_s=0.0,
                                                  metrics={"sleep_s": sleep_s})))"""


def _linked_files(out):
    "Every file report.md and report.html link to, relative to `out`."
    links = re.findall(r"\]\(([^)]+)\)", (out / "report.md").read_text())
    links += re.findall(r'(?:src|href)="([^"]+)"', (out / "report.html").read_text())
    return sorted(set(links))


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_rerun_keeps_complete_outputs(first_run, nbs, tmp_path, capsys):
    "A rerun that fails leaves the earlier complete outputs untouched; the report lists it as FAILED beside them."
    out = _copy(first_run, tmp_path)
    before = _files(out / "10_alpha")
    code = main(["--profile", "smoke", "--out", str(out), "--nbs", str(nbs), "--only", "10_alpha",
                 "-p", "x", "4", "-p", "fail", "True"])
    assert code == 1 and "AssertionError: asked to fail" in capsys.readouterr().err
    assert _files(out / "10_alpha") == before  # metrics.json, the figure, run.json, the executed notebook
    failed = out / "10_alpha.failed"
    run = read_json(failed / "run.json")
    assert run["status"] == "failed" and "asked to fail" in run["error"] and run["overrides"] == {"x": 4, "fail": True}
    assert "fail = True" in (failed / "10_alpha.ipynb").read_text()  # the partial executed notebook
    report = read_json(out / "report.json")
    alpha = next(n for n in report["notebooks"] if n["stem"] == "10_alpha")
    assert alpha["status"] == "failed" and alpha["failure"]["executed"] == "10_alpha.failed/10_alpha.ipynb"
    assert alpha["metrics"]["x"] == 3  # the earlier complete run's metrics are still reported
    md = (out / "report.md").read_text()
    assert "FAILED" in md and "asked to fail" in md and "10_alpha.failed/10_alpha.ipynb" in md
    assert "from an earlier complete run" in md and "![fig1_alpha](10_alpha/fig1_alpha.png)" in md
    assert "FAILED" in (out / "report.html").read_text()
    assert all((out / link).exists() for link in _linked_files(out))
    assert main(["--profile", "smoke", "--out", str(out), "--nbs", str(nbs), "--only", "10_alpha", "-p", "x", "5"]) == 0
    assert not failed.exists() and read_json(out / "10_alpha" / "metrics.json")["metrics"]["x"] == 5
    assert "FAILED" not in (out / "report.md").read_text()


def test_killed_run_and_lock(tmp_path, capsys):
    "A second run into a busy --out exits 2 naming the holder; after a SIGKILL the report says it is incomplete."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    code = nbformat.v4.new_code_cell
    _notebook(nbs / "12_slow.ipynb", [code(SLOW_PARAMS, metadata={"tags": ["parameters"]}), code(SLOW_BODY)])
    out = tmp_path / "o"
    args = ["--profile", "smoke", "--out", str(out), "--nbs", str(nbs)]
    assert main(args) == 0
    complete = _files(out / "12_slow")
    proc = subprocess.Popen([sys.executable, "-m", "dyntrack.reproduce.run", *args, "-p", "sleep_s", "300"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kernel_pid = None
    try:
        for _ in range(600):  # until the notebook runs, in its staging folder
            started = list(out.glob(".12_slow.tmp-*/started"))
            if started and started[0].read_text(): kernel_pid = int(started[0].read_text()); break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert kernel_pid, "the slow notebook did not start"
        md = (out / "report.md").read_text()
        assert "INCOMPLETE" in md and "12_slow" in md  # written when the run started
        capsys.readouterr()
        assert main(args) == 2  # the lock: the second run does not run anything
        err = capsys.readouterr().err
        assert f"--out {out}" in err and f"pid {proc.pid}" in err
    finally:
        proc.kill(); proc.wait()
        if kernel_pid: os.kill(kernel_pid, signal.SIGKILL)
    assert _files(out / "12_slow") == complete  # the killed run left the complete outputs alone
    md = (out / "report.md").read_text()
    assert "INCOMPLETE" in md and "pending: 12_slow" in md
    assert read_json(out / "report.json")["run"]["state"] == "in progress"
    links = _linked_files(out)
    assert "12_slow/12_slow.ipynb" in links and all((out / link).exists() for link in links)
    assert main(args) == 0  # the dead run's lock went with it; the complete outputs are still complete
    assert "INCOMPLETE" not in (out / "report.md").read_text()
    assert not list(out.glob(".12_slow.*"))  # the killed run's staging folder is cleaned up


def test_complete_covers_data(nbs, tmp_path):
    "Editing a file under the repository's data/ (beside nbs/) makes a complete run rerun."
    repo = tmp_path / "repo"
    shutil.copytree(nbs, repo / "nbs")
    (repo / "data").mkdir()
    (repo / "data" / "grammar.json").write_text('{"rules": 1}')
    nb = repo / "nbs" / "11_beta.ipynb"
    d0 = source_digest(nb)
    assert reproduce("smoke", tmp_path / "o", only=["11_beta"], nbs_dir=repo / "nbs").runs[0].status == "ran"
    assert reproduce("smoke", tmp_path / "o", only=["11_beta"], nbs_dir=repo / "nbs").runs[0].status == "skipped"
    (repo / "data" / "grammar.json").write_text('{"rules": 2}')
    assert source_digest(nb) != d0
    assert reproduce("smoke", tmp_path / "o", only=["11_beta"], nbs_dir=repo / "nbs").runs[0].status == "ran"
    d1 = source_digest(nb)
    (repo / "data" / "sub").mkdir()
    (repo / "data" / "sub" / "extra.tsv").write_text("a\tb\n")
    assert source_digest(nb) != d1


def test_digest_covers_every_module(nbs, monkeypatch):
    "The digest takes the package's modules from core.module_digest, which covers subpackages too."
    calls = []
    monkeypatch.setattr(reproduce_module, "module_digest", lambda *names: calls.append(names) or "a")
    d_a = source_digest(nbs / "11_beta.ipynb")
    monkeypatch.setattr(reproduce_module, "module_digest", lambda *names: "b")
    assert calls == [("dyntrack",)] and source_digest(nbs / "11_beta.ipynb") != d_a


def test_hollow_package(nbs, tmp_path):
    "From a folder holding a folder named dyntrack (a checkout's parent), `import dyntrack` is hollow: exit 2, named."
    (tmp_path / "dyntrack").mkdir()
    (tmp_path / "dyntrack" / "README.md").write_text("a checkout")
    res = subprocess.run([sys.executable, "-m", "dyntrack.reproduce.run", "--profile", "smoke", "--out", "o", "--nbs", str(nbs)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert str(tmp_path / "dyntrack") in res.stderr and "shadows" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_exit_codes(first_run, nbs, tmp_path, capsys):
    "Bad -p values and corrupt files in --out exit 2 with a message naming the parameter or the file."
    out = _copy(first_run, tmp_path)
    args = ["--profile", "smoke", "--out", str(out), "--nbs", str(nbs)]
    assert main([*args, "-p", "x", "[0, 1"]) == 2
    err = capsys.readouterr().err
    assert "-p x" in err and "YAML" in err and "Traceback" not in err
    for bad in ("inf", "nan", "[1, .inf]"):
        assert main([*args, "--only", "11_beta", "-p", "lr", bad]) == 2
        assert "lr" in (err := capsys.readouterr().err) and "finite" in err
    (out / "10_alpha" / "run.json").write_text('{"status": "compl')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out / "10_alpha" / "run.json") in err and "not valid JSON" in err


def test_refuses_foreign_report(first_run, nbs, tmp_path, capsys):
    "An --out holding a report.md or report.html reproduce did not write is refused, the file left alone."
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    assert main(["--profile", "smoke", "--out", str(out), "--nbs", str(nbs), "--only", "11_beta"]) == 2
    assert str(out / "report.md") in capsys.readouterr().err
    assert (out / "report.md").read_text() == "my own notes" and not (out / "11_beta").exists()
    (out / "report.md").unlink()
    (out / "report.html").write_text("<p>mine</p>")
    (out / "report.json").write_text('{"mine": true}')
    assert main(["--profile", "smoke", "--out", str(out), "--nbs", str(nbs), "--only", "11_beta"]) == 2
    assert "report.html" in capsys.readouterr().err and (out / "report.html").read_text() == "<p>mine</p>"
    ours = _copy(first_run, tmp_path)  # a dyntrack report is replaced as usual
    assert main(["--profile", "smoke", "--out", str(ours), "--nbs", str(nbs), "-p", "x", "3"]) == 0


def test_list_describes_parameters(capsys):
    "--list gives each parameter's type, its value in each profile and the comment of its parameters-cell line."
    assert main(["--list", "--only", "10_suite"]) == 0
    listed = capsys.readouterr().out
    from dyntrack.train.suite import EmbeddedRecipe  # lr is a field of the recipe part; its rows sit beside it
    smoke, paper = EmbeddedRecipe.PROFILES["smoke"]["lr"], EmbeddedRecipe.PROFILES["paper"]["lr"]
    assert f"    lr: float = {smoke!r} | {paper!r}  # peak learning rate (warm-up then cosine to 10%)\n" in listed
    assert "SuiteParams" in listed and "None" not in listed.split("lr:")[1].split("\n")[0]
    assert '    profile = "smoke"  # smoke' in listed
    assert "11_sae_track" not in listed


def test_report_wall_time(first_run):
    "The report shows one wall time per notebook: run.json's, the whole notebook; the total adds those."
    report = read_json(first_run.out / "report.json")
    walls = [read_json(first_run.out / n["stem"] / "run.json")["wall_s"] for n in report["notebooks"]]
    assert [n["wall_s"] for n in report["notebooks"]] == walls and report["total_wall_s"] == round(sum(walls), 2)
    assert read_json(first_run.out / "11_beta" / "metrics.json")["wall_s"] == 0.0 < walls[1]  # metrics.json's differs
    md = first_run.report.read_text()
    assert f"- wall time (whole notebook): {walls[1]:.1f} s" in md and f"total notebook time {report['total_wall_s']:.1f} s" in md  # the rounded total, as written


NOISY_BODY = """\
import sys, warnings
from dyntrack.core import progress
for step in progress(range(50), desc="steps"): pass
print("\\rredraw\\x1b[A of a bar", file=sys.stderr)
print("plain line to stderr", file=sys.stderr)
warnings.warn("a genuine warning")
import json, pathlib
(pathlib.Path(out_dir) / "metrics.json").write_text(json.dumps(dict(notebook="12_noisy", profile=profile,
                                                               device="cpu", wall_s=0.0, metrics={})))"""


def test_executed_notebook_has_no_progress_bars(tmp_path, capfd):
    "Progress bars are off in the kernel and redraws are dropped from the executed notebook; warnings stay."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    code = nbformat.v4.new_code_cell
    _notebook(nbs / "12_noisy.ipynb", [code('profile = "smoke"\nout_dir = "x"', metadata={"tags": ["parameters"]}),
                                       code(NOISY_BODY)])
    env_before = {k: os.environ.get(k) for k in ("DYNTRACK_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    capfd.readouterr()
    reproduce("smoke", tmp_path / "o", nbs_dir=nbs)
    log = capfd.readouterr().err
    assert {k: os.environ.get(k) for k in env_before} == env_before  # restored afterwards
    nb = nbformat.read(tmp_path / "o" / "12_noisy" / "12_noisy.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "\r" not in text and "\x1b[" not in text and "steps" not in text
    assert "plain line to stderr" in text and "UserWarning: a genuine warning" in text
    assert "without encryption" not in log and "KeyboardInterrupt" not in log


def test_make_lab_as_root():
    "make lab passes --allow-root when run as root, and LAB_ARGS through."
    res = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--port 8899"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lab = next(l for l in res.stdout.splitlines() if "-m jupyterlab" in l)
    assert "--port 8899" in lab and ("--allow-root" in lab) == (os.getuid() == 0)


def test_readme_papermill_example_makes_its_folder():
    "Each papermill command in the README creates the folder its executed notebook goes to."
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(.*python -m papermill \S+ (\S+)/\S+\.ipynb.*)$", readme, flags=re.M)
    assert commands
    for line, folder in commands: assert f"mkdir -p {folder} &&" in line, line


# --- issue #12: reproduce split into run, report and wheelhouse; explicit dependency order ---

def _specs(requirements) -> dict:
    "Canonical name -> specifier set of each requirement text."
    return {canonicalize_name(Requirement(r).name): Requirement(r).specifier for r in requirements}


def test_wheelhouse_pins_come_from_metadata(tmp_path, monkeypatch):
    "The download command pins every package dyntrack declares exactly as its metadata (= settings.ini) does."
    cmd = pip_download_command(tmp_path)
    pkgs = _specs(cmd[-len(OFFLINE_PACKAGES):])
    declared = _specs(metadata.requires("dyntrack"))
    ini = ConfigParser(delimiters=["="])
    ini.read(REPO / "settings.ini")
    written = _specs((ini["DEFAULT"]["requirements"] + " " + ini["DEFAULT"]["dev_requirements"]).split())
    both = pkgs.keys() & declared.keys()
    assert both == {"papermill", "ipykernel", "nbformat", "datasets", "nbdev", "fastcore", "execnb", "ghapi", "fastgit"}
    assert all(pkgs[n] == declared[n] == written[n] for n in both), {n: (pkgs[n], declared[n], written[n]) for n in both}
    assert all(str(pkgs[n]) for n in both) and pkgs["dill"] == Requirement("dill<0.4.2").specifier  # transitive: kept
    monkeypatch.setattr(metadata, "requires", lambda dist: ['nbdev==9.9; extra == "dev"', "Papermill>=7"])
    moved = pip_download_command(tmp_path)
    assert {"nbdev==9.9", "Papermill>=7", "fastcore", "dill<0.4.2"} <= set(moved)  # the pins follow the metadata
    with pytest.raises(ValueError, match="pins 'nbdev==2.4.14', which dyntrack declares as 'nbdev==9.9'"):
        offline_packages(["nbdev==2.4.14"])


def test_wheelhouse_without_metadata(tmp_path, monkeypatch, capsys):
    "Without dyntrack's metadata there are no pins: dyntrack-wheelhouse exits 1 saying so, before downloading."
    def missing(dist): raise metadata.PackageNotFoundError(dist)
    monkeypatch.setattr(metadata, "requires", missing)
    assert wheelhouse_module.main(["--out", str(tmp_path / "wh")]) == 1
    assert "dyntrack is not installed" in capsys.readouterr().err and not list((tmp_path / "wh").glob("*"))


def test_console_scripts_point_at_the_modules():
    "The installed console scripts load dyntrack.reproduce.run:main and dyntrack.reproduce.wheelhouse:main."
    eps = {ep.name: ep for ep in metadata.distribution("dyntrack").entry_points if ep.group == "console_scripts"}
    assert eps["dyntrack-reproduce"].load() is main and eps["dyntrack-wheelhouse"].load() is wheelhouse_module.main
    res = subprocess.run([sys.executable, "-m", "dyntrack.reproduce.wheelhouse", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "dyntrack-wheelhouse" in res.stdout


def test_profile_names_come_from_core(nbs, monkeypatch, capsys):
    "A profile added to core.PROFILES is accepted by resolve_profile and --profile; reproduce names none itself."
    monkeypatch.setitem(PROFILES, "tiny", {})
    assert resolve_profile("tiny") == "tiny"
    assert main(["--list", "--profile", "tiny", "--nbs", str(nbs)]) == 0  # argparse's choices: core.PROFILES too
    with pytest.raises(ParamError, match="tiny"): resolve_profile("huge")
    source = "".join(p.read_text() for p in (REPO / "dyntrack" / "reproduce").glob("*.py"))
    names = r"""["'](?:smoke|paper|auto)["']"""
    assert not re.search(rf"{names}\s*,\s*{names}", source)


NEEDS_BODY = """\
import json, pathlib
out = pathlib.Path(out_dir)
for need in {needs!r}:  # what this notebook reuses: a needed notebook's outputs, beside its own folder in --out
    json.loads((out.parent / need / "metrics.json").read_text())
(out / "metrics.json").write_text(json.dumps(dict(notebook="{stem}", profile=profile, device="cpu", wall_s=0.0, metrics={{}})))"""


def _needing(nbs, stem, needs=None, needs_src=None):
    "A tiny experiment notebook that reads the metrics.json of every notebook in `needs`, with a `needs` cell if given."
    code = nbformat.v4.new_code_cell
    needs_src = needs_src or (None if needs is None else f"needs = {needs!r}  # run these first")
    cells = [code(needs_src, metadata={"tags": ["needs"]})] if needs_src else []
    cells += [code('profile = "smoke"\nout_dir = "x"', metadata={"tags": ["parameters"]}),
              code(NEEDS_BODY.format(needs=[Path(n).stem for n in needs or []], stem=stem))]
    _notebook(nbs / f"{stem}.ipynb", cells)


def test_needs_order_the_run(tmp_path, caplog, capsys):
    "A notebook runs after the notebooks its needs cell names, not in file-name order; --only adds none of them."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _needing(nbs, "10_a", needs=["12_c.ipynb"])
    _needing(nbs, "11_b")
    _needing(nbs, "12_c", needs=[])
    assert [(e.stem, e.needs) for e in find_experiments(nbs)] == [("11_b", ()), ("12_c", ()), ("10_a", ("12_c",))]
    res = reproduce("smoke", tmp_path / "o", nbs_dir=nbs)
    assert [(r.stem, r.status) for r in res.runs] == [("11_b", "ran"), ("12_c", "ran"), ("10_a", "ran")]
    assert read_json(tmp_path / "o" / "report.json")["run"]["selected"] == ["11_b", "12_c", "10_a"]
    other = tmp_path / "p"
    with caplog.at_level("WARNING", logger="dyntrack.reproduce.run"), pytest.raises(NotebookFailed, match="10_a"):
        reproduce("smoke", other, only=["10_a"], nbs_dir=nbs)  # 12_c is not pulled in: 10_a finds no outputs of it
    assert f"10_a needs 12_c, which is not selected and has no complete smoke outputs in {other}" in caplog.text
    assert not (other / "12_c").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="dyntrack.reproduce.run"):
        res = reproduce("smoke", other, only=["10_a", "12_c"], nbs_dir=nbs)
    assert [r.stem for r in res.runs] == ["12_c", "10_a"] and "needs" not in caplog.text
    assert main(["--list", "--nbs", str(nbs)]) == 0
    listed = capsys.readouterr().out
    assert "10_a  (needs: 12_c)\n" in listed and listed.index("12_c") < listed.index("10_a")


@pytest.mark.parametrize("cells, words", [
    ({"10_a": ["11_b"], "11_b": ["10_a"], "12_c": []}, "the needs cells form a cycle: 10_a -> 11_b -> 10_a"),
    ({"10_a": ["10_a"]}, "cycle: 10_a -> 10_a"),
    ({"10_a": ["10_suite"], "11_b": None}, "10_a.ipynb needs '10_suite': no experiment notebook of"),
    ({"10_a": 'needs = "11_b"', "11_b": None}, "10_a.ipynb: its needs cell must be one assignment of a list"),
    ({"10_a": "needs = [f'{1}1_b']", "11_b": None}, "10_a.ipynb: its needs cell must be"),
], ids=["cycle", "self", "unknown", "not-a-list", "not-literal"])
def test_needs_errors(cells, words, tmp_path, capsys):
    "Cycles, unknown names and needs cells that are not a literal list stop reproduce before anything runs (exit 2)."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for stem, needs in cells.items():
        if isinstance(needs, str): _needing(nbs, stem, needs_src=needs)
        else: _needing(nbs, stem, needs=needs)
    with pytest.raises(ParamError, match=re.escape(words)): find_experiments(nbs)
    assert main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--nbs", str(nbs)]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_two_needs_cells(tmp_path):
    "A notebook with two needs cells is refused, named: which one would count is not obvious to its reader."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _needing(nbs, "11_b", needs=[])
    nb = nbformat.read(nbs / "11_b.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("needs = []", metadata={"tags": ["needs"]}))
    nbformat.write(nb, nbs / "11_b.ipynb")
    with pytest.raises(ParamError, match="11_b.ipynb has 2 cells tagged needs"): find_experiments(nbs)


def test_needs_survive_nbdev_clean(tmp_path):
    "nbdev_clean (this repository's settings: cell tags kept, notebook metadata dropped) leaves the needs cell readable."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _needing(nbs, "10_a", needs=["12_c"])
    _needing(nbs, "12_c")
    nb = nbformat.read(nbs / "10_a.ipynb", as_version=4)
    nb.metadata["needs"] = ["something else"]
    nb.cells[0].metadata["collapsed"] = True
    nbformat.write(nb, nbs / "10_a.ipynb")
    clean = "import sys; from nbdev.clean import nbdev_clean; nbdev_clean.__wrapped__(fname=sys.argv[1])"
    res = subprocess.run([sys.executable, "-c", clean, str(nbs / "10_a.ipynb")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cleaned = nbformat.read(nbs / "10_a.ipynb", as_version=4)
    assert "needs" not in cleaned.metadata and cleaned.cells[0].metadata == {"tags": ["needs"]}
    assert [(e.stem, e.needs) for e in find_experiments(nbs)] == [("12_c", ()), ("10_a", ("12_c",))]


def test_repository_needs():
    "The repository's experiment notebooks run in the order their needs give, whatever those say."
    exps = find_experiments(REPO / "nbs")
    order = [e.stem for e in exps]
    assert {"10_suite", "11_sae_track", "13_topk_lm"} <= set(order)
    assert all(order.index(n) < order.index(e.stem) for e in exps for n in e.needs)


def test_run_records_the_source_commit(tmp_path):
    "environment() names the checkout's commit; $DYNTRACK_COMMIT wins when set (a copied tree's .git may be stale); else 'unknown'."
    from dyntrack.reproduce.report import environment
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if head.returncode == 0 and not os.environ.get("DYNTRACK_COMMIT"):
        assert environment()["commit"].removesuffix("+dirty") == head.stdout.strip()
    shutil.copytree(REPO / "dyntrack", tmp_path / "dyntrack")
    script = "from dyntrack.reproduce.report import source_commit; print(source_commit())"
    for env, want in [(dict(DYNTRACK_COMMIT="5834d57"), "5834d57"), ({}, "unknown")]:
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             env={"PYTHONPATH": str(tmp_path), "PATH": os.environ["PATH"], **env})
        assert out.stdout.strip() == want, out.stderr[-2000:]
