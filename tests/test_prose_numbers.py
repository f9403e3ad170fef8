r"""Numbers the notebooks' prose quotes from the paper run agree with `results/paper/`.

A number in a markdown cell of an experiment notebook that comes from the committed paper run is written with the
metric it quotes right after it, in an HTML comment that renderers hide: `2.987<!--m:final_val_loss.scratch_L3-->`.
The key is a path into that notebook's `results/paper/<stem>/metrics.json` "metrics" (dict keys and list indices
separated by dots; a dot inside a key is written `\.`). An optional unit after the number says how it was scaled: `%` (× 100), `M` (/ 1e6), `k` (/ 1e3),
`×` (none); an optional `|scale` in the comment multiplies the metric first (e.g. `|1e-6`). The number must equal
the metric rounded to the digits quoted. A rerun that changes a quoted metric fails here until the prose is updated."""
import json, math, re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"(?P<num>[-−]?\d[\d,]*(?:\.\d+)?)\s?(?P<unit>%|M|k|×)?\s?<!--\s*m:(?P<key>[^|\s>]+)(?:\|(?P<scale>[^\s>]+))?\s*-->")
UNITS = {"%": 100.0, "M": 1e-6, "k": 1e-3, "×": 1.0, None: 1.0}


def quoted_numbers(text: str) -> list[dict]:
    "Every tagged number in `text`: its value as written, the digits after the point, unit, key and extra scale."
    out = []
    for m in TAG.finditer(text):
        num = m["num"].replace("−", "-").replace(",", "")
        out.append(dict(text=m[0], value=float(num), decimals=len(num.split(".")[1]) if "." in num else 0,
                        unit=m["unit"], key=m["key"], scale=float(m["scale"]) if m["scale"] else 1.0))
    return out


def metric_at(metrics: dict, key: str):
    "The value at dotted path `key` of `metrics`; KeyError naming the first part that is missing."
    value, parts = metrics, [p.replace("\\.", ".") for p in re.split(r"(?<!\\)\.", key)]
    for i, part in enumerate(parts):
        if isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value: value = value[part]
        else: raise KeyError(f"{'.'.join(parts[:i + 1])!r} is not in the metrics")
    return value


def disagreement(q: dict, metrics: dict) -> str | None:
    "None when quote `q` equals its metric rounded to the quoted digits, else what is wrong."
    try: value = metric_at(metrics, q["key"])
    except KeyError as e: return f"{q['text']}: {e.args[0]}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"{q['text']}: the metric is {value!r}, not a finite number"
    shown = value * q["scale"] * UNITS[q["unit"]]
    if abs(shown - q["value"]) > 0.5 * 10 ** -q["decimals"] * (1 + 1e-9) + 1e-12:
        return f"{q['text']}: the paper run has {shown:.{q['decimals'] + 2}f}"
    return None


def test_quoted_numbers_are_parsed():
    text = ("loss 2.987<!--m:a.b--> vs 3.031 (untagged), saves 31%<!--m:save--> and 12,000<!--m:n--> entities; "
            "−0.008 <!--m:gap|1e3--> and 80.0M<!--m:tokens.2-->")
    qs = quoted_numbers(text)
    assert [(q["value"], q["decimals"], q["unit"], q["key"], q["scale"]) for q in qs] == [
        (2.987, 3, None, "a.b", 1.0), (31.0, 0, "%", "save", 1.0), (12000.0, 0, None, "n", 1.0),
        (-0.008, 3, None, "gap", 1000.0), (80.0, 1, "M", "tokens.2", 1.0)]


def test_disagreement_rounds_to_the_quoted_digits():
    metrics = dict(a=dict(b=2.98686), save=0.3149, n=12000, gap=-8.04e-6, tokens=[1, 2, 7.996e7], flag=True, s="x",
                   frac={"0.3": [32, 1500]})
    ok = ("2.987<!--m:a.b--> 31%<!--m:save--> 12,000<!--m:n--> −0.008<!--m:gap|1e3--> 80.0M<!--m:tokens.2--> "
          r"1500<!--m:frac.0\.3.1--> 7.996e7 is 80.0M<!--m:tokens.-1-->")
    assert [disagreement(q, metrics) for q in quoted_numbers(ok)] == [None] * 7
    bad = "2.98<!--m:a.b--> 32%<!--m:save--> 1<!--m:nope.x--> 1<!--m:flag--> 1<!--m:s--> 3<!--m:tokens.9-->"
    msgs = [disagreement(q, metrics) for q in quoted_numbers(bad)]
    assert "the paper run has 2.9869" in msgs[0] and "31.49" in msgs[1]
    assert "'nope' is not in the metrics" in msgs[2] and "True, not a finite number" in msgs[3]
    assert "'x', not a finite number" in msgs[4] and "'tokens.9' is not in the metrics" in msgs[5]


def _experiment_notebooks():
    for path in sorted((ROOT / "nbs").glob("1*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any("parameters" in c.metadata.get("tags", []) for c in nb.cells): yield path, nb


@pytest.mark.parametrize("path,nb", list(_experiment_notebooks()), ids=lambda v: getattr(v, "stem", ""))
def test_prose_quotes_the_committed_paper_run(path, nb):
    quotes = [q for c in nb.cells if c.cell_type == "markdown" for q in quoted_numbers(c.source)]
    if not quotes: pytest.skip(f"{path.name} quotes no tagged number")
    metrics_file = ROOT / "results" / "paper" / path.stem / "metrics.json"
    assert metrics_file.exists(), f"{path.name} quotes the paper run but {metrics_file} does not exist"
    metrics = json.loads(metrics_file.read_text())["metrics"]
    wrong = [msg for q in quotes if (msg := disagreement(q, metrics))]
    assert not wrong, f"{path.name}: prose disagrees with {metrics_file.relative_to(ROOT)}:\n" + "\n".join(wrong)
