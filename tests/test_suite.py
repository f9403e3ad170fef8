"The suite experiment notebook end to end on a Hub-like suite (offline cache), opening suites from parameters, and their errors."
import json, re
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch

from conftest import toy_hub
from dyntrack.core import ParamError, resolve_params
from dyntrack.checkpoints import activation_similarity, emergence_tokens
from dyntrack.suite import SuiteParams, open_suite, resolve_site

NB = Path(__file__).parent.parent / "nbs" / "10_suite.ipynb"
REPO = "toy-org/toy-pythia"
RENAMED, RENAMED_REVISION = "toy-org/toy-staged", "stage1-step{step:06d}"  # a repo whose revisions are not Pythia's step{N}
# tiny evaluation sizes: the notebook's logic, not its numbers, is under test
FAST = dict(eval_words_per_domain=300, n_pairs=4, sim_tokens=256, eval_tokens=256, seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    "A Hub cache holding revisions step0 and step16 of a tiny GPT-NeoX with a BPE tokenizer trained on the corpus."
    return toy_hub(tmp_path_factory.mktemp("hub"), REPO, (0, 16))


@pytest.fixture(scope="module")
def renamed_hub(tmp_path_factory):
    "A Hub cache holding revisions stage1-step000000 and stage1-step000016 of such a model."
    return toy_hub(tmp_path_factory.mktemp("renamed_hub"), RENAMED, (0, 16), revision_format=RENAMED_REVISION)


def go_offline(monkeypatch, cache):
    "Make `huggingface_hub` read `cache` only (here and in kernels started from here)."
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(hub, monkeypatch): return go_offline(monkeypatch, hub)


@pytest.fixture
def renamed_offline(renamed_hub, monkeypatch): return go_offline(monkeypatch, renamed_hub)


def run_notebook(tmp_path, **params):
    out = tmp_path / "out"
    pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                        parameters=dict(profile="smoke", out_dir=str(out), **params), progress_bar=False)
    return out


def test_notebook_runs_on_a_hub_suite(tmp_path, renamed_offline):
    out = run_notebook(tmp_path, suite=f"hub:{RENAMED}", hub_steps=[16, 0], hub_revision=RENAMED_REVISION,
                       hub_tokens_per_step=1000, **FAST)
    m = json.loads((out / "metrics.json").read_text())
    assert m["notebook"] == "10_suite" and m["profile"] == "smoke" and m["device"].startswith("cpu")
    assert m["metrics"]["params"]["hub_revision"] == RENAMED_REVISION
    table = m["metrics"]["table"]
    assert [r["step"] for r in table] == [0, 16] and [r["tokens"] for r in table] == [0, 16000]
    assert m["metrics"]["site_layer"] == 1  # middle of a 2-block model
    assert {k for k in table[0] if k.startswith("acc_")} == {f"acc_{p}" for p in m["metrics"]["final_accuracy"]}
    assert all(0 <= r[k] <= 1 for r in table for k in r if k.startswith("acc_"))
    sim = np.array(m["metrics"]["similarity"])
    assert sim.shape == (2, 2) and np.allclose(np.diag(sim), 1, atol=1e-4) and sim[0, 1] < 0.999  # different weights
    for name in ("suite_loss_by_domain", "crosscoding_fig_accuracy_over_training", "crosscoding_fig_activation_similarity"):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_notebook_rejects_unknown_parameter(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown parameter\(s\) \['n_layer'\]"):
        run_notebook(tmp_path, n_layer=3)


def test_site_layer_out_of_range(offline):
    suite = open_suite(SuiteParams(suite=f"hub:{REPO}", hub_steps=(0, 16)))
    assert resolve_site(suite, -1) == 1
    with pytest.raises(ParamError, match=r"site_layer=2 is out of range; the suite has blocks \[0, 1\]"):
        resolve_site(suite, 2)


def test_missing_hub_revision_fails_clearly(offline):
    suite = open_suite(SuiteParams(suite=f"hub:{REPO}", hub_steps=(0, 3)))
    with pytest.raises(OSError):
        suite.load_model(1)


def test_hub_suite_in_another_revision_naming(renamed_offline):
    from dyntrack.suite import SuitePlan, check_suite_params
    p = SuiteParams(suite=f"hub:{RENAMED}", hub_steps=(16, 0), hub_revision=RENAMED_REVISION, hub_tokens_per_step=1000)
    suite = open_suite(p)
    assert [(c.step, c.revision, c.tokens_seen) for c in suite] == [(0, "stage1-step000000", 0), (16, "stage1-step000016", 16000)]
    assert check_suite_params(p) == SuitePlan([0, 16], 2, 64)
    first, last = (suite.load_model(i, device="cpu") for i in (0, 1))
    assert not torch.equal(first.gpt_neox.embed_in.weight, last.gpt_neox.embed_in.weight)  # two revisions, two models
    with pytest.raises(ParamError, match=f"suite='hub:{RENAMED}' cannot be opened"):  # Pythia's naming finds nothing here
        check_suite_params(SuiteParams(suite=f"hub:{RENAMED}", hub_steps=(0, 16)))


def test_bad_hub_revisions_are_refused():
    hub = dict(suite=f"hub:{REPO}")
    for bad, words in [("ckpt", r"hub_revision='ckpt' must name the step as \{step\}"),
                       ("step{step}-tokens{tok}B", r"hub_revision='step\{step\}-tokens\{tok\}B' does not format with step=0 \(KeyError"),
                       ("tokens{tokens_b}B", r"hub_revision='tokens\{tokens_b\}B' must name the step as \{step\}"),
                       ("step{}", "IndexError"), ("step{step:q}", "ValueError"), ("step{", "ValueError")]:
        with pytest.raises(ParamError, match=words): SuiteParams(**hub, hub_revision=bad)
        with pytest.raises(ParamError, match="^hub_revision="): resolve_params(SuiteParams, "smoke", dict(hub, hub_revision=bad))
    assert SuiteParams(**hub, hub_revision="ckpt_{step:05d}").hub_revision == "ckpt_{step:05d}"
    assert SuiteParams(**hub, hub_revision="step{step}-tokens{tokens_b}B").hub_revision == "step{step}-tokens{tokens_b}B"  # OLMo


def test_bad_suite_strings():
    for bad in ("hub:", "pythia", "folders:"):
        with pytest.raises(ParamError, match="suite="):
            SuiteParams(suite=bad)


def test_similarity_and_emergence_known_answers():
    a = torch.randn(40, 6)
    sim = activation_similarity([a, a * 3, -a])
    np.testing.assert_allclose(sim, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-5)
    rows = [dict(tokens=t, acc=v) for t, v in [(0, 0.5), (1, 0.95), (2, 0.8), (4, 0.91), (8, 0.99)]]
    assert emergence_tokens(rows, "acc") == 4  # the lucky checkpoint at 1 token does not count
    assert emergence_tokens(rows, "acc", 0.995) is None


# --- parameters: non-finite, ill-typed and unused values ------------------------------------------------------

def test_non_finite_floats_are_refused_in_every_parameter_set():
    from dyntrack.sae_track.chain import SaeTrackParams
    from dyntrack.topk.lm import TopKParams
    cases = [(SuiteParams, "lr"), (SaeTrackParams, "sae_lr"), (SaeTrackParams, "link_lr"), (SaeTrackParams, "l1_coef"),
             (SaeTrackParams, "formation_fraction"), (TopKParams, "act_threshold"), (TopKParams, "anneal_fraction"),
             (TopKParams, "steer_min_purity")]
    for cls, name in cases:
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ParamError, match=f"^{name}="):
                resolve_params(cls, "smoke", {name: bad})
            with pytest.raises(ParamError, match=f"^{name}="):
                cls(**{name: bad})  # built directly, as library code does
    with pytest.raises(ParamError, match="^steer_deltas="): TopKParams(steer_deltas=(1.0, float("inf")))
    with pytest.raises(ParamError, match="^batch_size=2.5 has the wrong type"): SuiteParams(batch_size=2.5)
    with pytest.raises(ParamError, match="^seed='abc' has the wrong type"): SuiteParams(seed="abc")


def test_unused_parameters_are_refused():
    hub = dict(suite=f"hub:{REPO}")
    for bad, words in [(dict(hub_steps=(0, 16)), r"hub_steps=\(0, 16\) is not used here \(only a hub suite"),
                       (dict(hub_tokens_per_step=1000), "hub_tokens_per_step=1000 is not used here"),
                       (dict(hub_revision="ckpt_{step}"), r"hub_revision='ckpt_\{step\}' is not used here"),
                       (dict(hub, run_dir="/somewhere"), "run_dir='/somewhere' is not used here"),
                       (dict(hub, size="medium"), "size='medium' is not used here"),
                       (dict(suite="run:/x", lr=0.5), "lr=0.5 is not used here")]:
        with pytest.raises(ParamError, match=words): SuiteParams(**bad)
    # the defaults and the profiles' values are what a run gets untold: they pass
    assert resolve_params(SuiteParams, "smoke", dict(hub, hub_steps=[0, 16])).size == "tiny"
    assert resolve_params(SuiteParams, "paper", hub).size == "base"


# --- checks before any work -------------------------------------------------------------------------------------

def test_checks_run_before_anything_is_generated(tmp_path, monkeypatch):
    from dyntrack.suite import SuitePlan, check_suite_params
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path))
    p = resolve_params(SuiteParams, "smoke")
    assert check_suite_params(p) == SuitePlan([0, 1, 2, 4, 8, 15, 30, 45, 60], 2, 64)
    for bad, words in [(dict(site_layer=99), r"site_layer=99 is out of range; the suite has blocks \[0, 1\]"),
                       (dict(device="gpu"), "device='gpu'"), (dict(device="cuda:7"), "device='cuda:7'"),
                       (dict(suite="run:/no/such/run"), "suite='run:/no/such/run' cannot be opened: /no/such/run/manifest.json"),
                       (dict(suite=f"folders:{tmp_path}/a"), f"{tmp_path}/a")]:
        with pytest.raises(ParamError, match=words): check_suite_params(resolve_params(SuiteParams, "smoke", bad))
    assert list(tmp_path.iterdir()) == []


def test_checks_read_a_hub_suite_config_only(offline):
    from dyntrack.suite import SuitePlan, check_suite_params
    p = SuiteParams(suite=f"hub:{REPO}", hub_steps=(0, 16))
    assert check_suite_params(p) == SuitePlan([0, 16], 2, 64)
    with pytest.raises(ParamError, match=r"site_layer=5 is out of range; the suite has blocks \[0, 1\]"):
        check_suite_params(SuiteParams(suite=f"hub:{REPO}", hub_steps=(0, 16), site_layer=5))
    with pytest.raises(ParamError, match="suite='hub:toy-org/missing' cannot be opened"):
        check_suite_params(SuiteParams(suite="hub:toy-org/missing", hub_steps=(0,)))


# --- cache keys and locks -----------------------------------------------------------------------------------------

TINY_SUITE = dict(words_per_domain=2000, vocab_size=300, size="tiny", seq_len=16, batch_size=4, total_steps=4,
                  warmup_steps=1, n_linear=2, eval_tokens=64, device="cpu")


def test_corpus_and_run_keys_cover_data_code_and_configs(tmp_path, monkeypatch):
    import dataclasses, shutil
    import dyntrack.data.embedded as embedded
    import dyntrack.train.suite as train_suite
    from dyntrack.data.grammar import find_data_dir
    from dyntrack.data.embedded import corpus_key
    from dyntrack.train.suite import run_key
    r = SuiteParams(**TINY_SUITE).recipe
    corpus_of = lambda r: corpus_key(r.words_per_domain, r.corpus_seed, r.vocab_size)
    corpus, run = corpus_of(r), run_key(r)
    assert corpus == corpus_key(2000, 0, 300) and run == run_key(SuiteParams(**TINY_SUITE).recipe)  # stable
    assert re.fullmatch(r"w2000-s0-v300-[0-9a-f]{16}", corpus) and re.fullmatch(r"gpt_neox-tiny-[0-9a-f]{16}", run)
    for change in (dict(lr=1e-2), dict(batch_size=8), dict(warmup_steps=2), dict(seed=1), dict(seq_len=32),
                   dict(arch="llama"), dict(corpus_seed=1), dict(words_per_domain=2001), dict(eval_tokens=128)):
        assert run_key(dataclasses.replace(r, **change)) != run, change
    evaluation_only = dict(n_pairs=1, sim_tokens=7, site_layer=0, eval_words_per_domain=5, device="auto")
    assert run_key(SuiteParams(**{**TINY_SUITE, **evaluation_only}).recipe) == run
    data = tmp_path / "data"
    shutil.copytree(find_data_dir(), data)
    monkeypatch.setattr(embedded, "find_data_dir", lambda: data)
    assert corpus_of(r) == corpus
    with open(data / "grammar.json", "a") as f: f.write(" ")  # an edit of the grammar file
    assert corpus_of(r) != corpus and run_key(r) != run
    monkeypatch.undo()
    seen = []
    for module in (embedded, train_suite):  # edited code
        monkeypatch.setattr(module, "module_digest", lambda *names: seen.append(names) or "edited")
    assert corpus_of(r) != corpus and run_key(r) != run
    assert ("dyntrack.data.corpus", "dyntrack.data.grammar", "dyntrack.data.tokens") in seen
    assert ("dyntrack.data.corpus", "dyntrack.data.grammar", "dyntrack.data.tokens", "dyntrack.train", "dyntrack.models") in seen


PREPARE = """
import json
import dyntrack.data.embedded as embedded
from dyntrack.data.tokens import tokenizer_hash
generated, generate = [], embedded.generate_corpus
embedded.generate_corpus = lambda *args, **kw: generated.append(1) or generate(*args, **kw)
tok, shards = embedded.prepare_embedded_data(words_per_domain=4000, corpus_seed=0, vocab_size=400)
print(json.dumps(dict(vocab=len(tok), tokenizer=tokenizer_hash(tok), n_tokens=shards.n_tokens("train"),
                      batch=shards.batch(0, 8, 32).tolist(), generated=len(generated))))
"""


def test_two_processes_share_a_fresh_corpus_cache(tmp_path):
    import os, subprocess, sys
    env = dict(os.environ, DYNTRACK_CACHE=str(tmp_path), DYNTRACK_PROGRESS="0")
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    first, second = (json.loads(out.splitlines()[-1]) for out, _ in outs)
    assert first["generated"] + second["generated"] == 1  # one wrote the corpus; the other waited and reused it
    assert {**first, "generated": 0} == {**second, "generated": 0} and first["vocab"] > 258
    (folder,) = [d for d in (tmp_path / "corpus").iterdir() if d.is_dir()]
    assert (folder.parent / f"{folder.name}.lock").exists()
    names = {p.name for p in folder.iterdir()}
    assert {"shards", "tokenizer"} <= names and not [n for n in names if n.startswith(".")]  # no scratch folders left


def test_a_run_that_would_repeat_text_is_refused_before_training(tmp_path, monkeypatch):
    "The corpus is prepared, then the run is refused with the numbers: no run folder, no lock, no model."
    from dyntrack.data.embedded import prepare_embedded_data
    from dyntrack.train.suite import default_run_dir, train_embedded_suite
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path))
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")
    recipe = SuiteParams(**{**TINY_SUITE, "total_steps": 5000}).recipe  # 340k tokens of a corpus of about 40k
    with pytest.raises(ParamError) as refusal:
        train_embedded_suite(recipe, device="cpu")
    message = str(refusal.value)
    assert message.startswith("words_per_domain=2000 is too small for total_steps=5000: the run reads 340,000 training tokens")
    held, fresh, enough = (int(x.replace(",", "")) for x in re.search(
        r"the corpus holds ([\d,]+), enough for (\d+) steps without reading a token twice; "
        r"raise words_per_domain to about ([\d,]+) or lower total_steps", message).groups())
    assert fresh * 4 * 17 <= held < 340_000 and enough == -(-1.1 * 2000 * 5000 // fresh)
    run_dir = default_run_dir(recipe)
    assert not run_dir.exists() and not run_dir.with_name(f"{run_dir.name}.lock").exists()  # nothing trained, not even locked
    assert fresh == prepare_embedded_data(2000, 0, 300)[1].fresh_steps(4, 16)  # the cached corpus, reopened


def test_embedded_suite_is_trained_under_a_lock_and_reused(tmp_path, monkeypatch, one_torch_thread):
    from dyntrack.train.suite import default_run_dir
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path))
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")
    p = SuiteParams(**TINY_SUITE)
    suite = open_suite(p)  # trains it: run_dir="" means the cache folder named by the recipe
    run_dir = default_run_dir(p.recipe)
    assert suite.steps == [0, 1, 2, 4] and Path(suite[-1].source).parent == run_dir
    assert (run_dir.parent / f"{run_dir.name}.lock").exists()
    mtime = (run_dir / "step4" / "model.safetensors").stat().st_mtime_ns
    assert open_suite(p).steps == suite.steps
    assert (run_dir / "step4" / "model.safetensors").stat().st_mtime_ns == mtime  # reopened, not retrained
    elsewhere = tmp_path / "elsewhere"
    assert Path(open_suite(SuiteParams(**TINY_SUITE, run_dir=str(elsewhere)))[-1].source).parent == elsewhere  # run_dir given
