"The crosscoding experiment (dyntrack.crosscoding.run and nbs/12_crosscoding.ipynb): parameter checks that name the parameter before any work, the crosscoders' cache key, the SAE-Track chain file and when it is refused, and a smoke run of the notebook on a Hub-like suite (with a chain to match)."
import dataclasses, json
from pathlib import Path

import pytest

from conftest import toy_hub
from dyntrack.core import ParamError, resolve_params
from dyntrack.crosscoding.run import (CHAIN_FEATURES_FORMAT, CROSSCODER_FIELDS, CrosscodingParams, chain_decoders,
                                      chain_features, check_crosscoding_params, crosscoder_config, crosscoder_key,
                                      formation_of)
from dyntrack.core import write_json
from dyntrack.sae.model import SaeConfig, SparseAutoencoder, save_sae
from dyntrack.models.suite import Checkpoint

NB = Path(__file__).parent.parent / "nbs" / "12_crosscoding.ipynb"


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")


# --- parameters: every bad value stops with its name, before anything is generated or trained ---------------------

BAD = [  # (overrides of the smoke profile, words the error starts with or holds)
    (dict(phenomenon="agreement"), "phenomenon='agreement' is not allowed"),
    (dict(pair_steps=[0, 3]), "pair_steps [3] are not checkpoints of the suite; its steps: [0, 1, 2, 4, 8, 15, 30, 45, 60]"),
    (dict(pair_steps=[15, 2]), "pair_steps=(15, 2) must be 2 increasing checkpoint steps"),
    (dict(pair_steps=[15]), "pair_steps=(15,) must be 2 increasing checkpoint steps"),
    (dict(triplet_steps=[0, 8, 99]), "triplet_steps [99] are not checkpoints of the suite"),
    (dict(site_layer=5), "site_layer=5 is out of range; the suite has blocks [0, 1]"),
    (dict(kind="batchtopk", k=300), "k=300 does not fit: a crosscoder of d_latents=256 latents"),
    (dict(kind="batchtopk", d_latents=8, k=9), "k=9 does not fit"),
    (dict(cc_tokens=100), "cc_tokens=100 is out of range"),
    (dict(cc_lr=-1.0), "cc_lr=-1.0 must be > 0"),
    (dict(cc_context=128), "cc_context=128 is longer than the embedded suite's sequences (seq_len=64)"),
    (dict(ie_pairs=41), "ie_pairs=41 must be at most n_pairs=40"),
    (dict(null_seed=0), "null_seed=0 is the suite's own seed"),
    (dict(total_steps=1, warmup_steps=0, n_linear=1), "suite='embedded' has 2 checkpoint(s) [0, 1]; crosscoding through time needs at least 3"),
    (dict(k=8), "k=8 is not used here (an L1 crosscoder keeps no fixed number of latents)"),
    (dict(d_latents=128, expansion=2), "expansion=2 is not used here (d_latents is given)"),
    (dict(null_crosscoders=False, null_seed=4), "null_seed=4 is not used here (null_crosscoders=False)"),
    (dict(device="gpu"), "device='gpu'"),
    (dict(sim_tokens=float("nan")), "sim_tokens=nan"),
    (dict(chain_steps=[0, 4]), "unknown parameter(s) ['chain_steps']"),
]


@pytest.mark.parametrize("overrides, words", BAD, ids=[next(iter(o)) + f"-{i}" for i, (o, _) in enumerate(BAD)])
def test_bad_parameters_are_named_before_any_work(overrides, words, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path))
    with pytest.raises(ParamError) as failure: check_crosscoding_params(resolve_params(CrosscodingParams, "smoke", overrides))
    assert words in str(failure.value)
    assert list(tmp_path.iterdir()) == []  # no corpus generated, no suite trained, no folder named


def test_good_parameters_pass_and_plan_the_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path))
    smoke = resolve_params(CrosscodingParams, "smoke", dict(pair_steps=[2, 60], triplet_steps=[0, 8, 60], kind="batchtopk", k=16))
    plan = check_crosscoding_params(smoke)
    assert (plan.steps, plan.n_layers, plan.d_model) == ([0, 1, 2, 4, 8, 15, 30, 45, 60], 2, 64)
    assert smoke.two_seed_null and not resolve_params(CrosscodingParams, "paper").two_seed_null
    cfg = crosscoder_config(smoke, plan.d_model, 3)
    assert (cfg.d_latents, cfg.k, cfg.k_start, cfg.n_steps, cfg.batch_size) == (256, 16, 80, 256, 256)
    assert list(tmp_path.iterdir()) == []


# --- the cache key: every field that changes the weights changes it, the others do not ---------------------------

CKPTS = [Checkpoint(s, s * 100, f"/runs/a/step{s}") for s in (0, 8, 16)]
CHANGED = dict(kind="batchtopk", d_latents=100, expansion=3, l1_coef=0.5, k=7, cc_tokens=12_288, cc_batch_size=512,
               cc_lr=1e-3, cc_context=32, cc_seed=1, words_per_domain=50_000, corpus_seed=3)


def _key(checkpoints=CKPTS[:2], layer=1, **changes):
    smoke = resolve_params(CrosscodingParams, "smoke")
    # replace() runs the checks again, and refuse_unused would refuse e.g. `k` for an L1 crosscoder: skip them here,
    # the key reads the fields only
    p = object.__new__(type(smoke))
    p.__dict__.update({**smoke.__dict__, **changes})
    return crosscoder_key(p, checkpoints, layer)


def test_every_crosscoder_field_is_covered():
    assert set(CHANGED) == set(CROSSCODER_FIELDS)
    smoke = resolve_params(CrosscodingParams, "smoke")
    assert all(getattr(smoke, f) != v for f, v in CHANGED.items())  # each is a real change


@pytest.mark.parametrize("field", CROSSCODER_FIELDS)
def test_key_changes_with_each_crosscoder_field(field):
    assert _key(**{field: CHANGED[field]}) != _key()


@pytest.mark.parametrize("field, value", [("ie_pairs", 4), ("n_top", 3), ("phenomenon", "simple_agreement"),
                                          ("label_threshold", 0.9), ("null_crosscoders", False), ("ie_steps", 20),
                                          ("analysis_tokens", 1024), ("n_shown", 1), ("pair_steps", (0, 8)),
                                          ("n_pairs", 10), ("sim_tokens", 64)])
def test_key_ignores_analysis_fields(field, value):
    assert _key(**{field: value}) == _key()


def test_key_names_its_checkpoints_and_site():
    assert _key().startswith("l1-L1-x2-")
    assert len({_key(), _key(CKPTS), _key([CKPTS[0], CKPTS[2]]), _key([CKPTS[1], CKPTS[1]]), _key(layer=0),
                _key([CKPTS[0], dataclasses.replace(CKPTS[1], source="/runs/b/step8")])}) == 6


# --- the SAE-Track chain's features: read only when made on the same suite and site ---------------------------------

def write_chain(folder: Path, steps, source, revision_format, d_model=64, d_sae=32, layer=1, formation=None):
    "A chain_features.json as 11_sae_track writes it, with random SAEs (one per step), into `folder`."
    paths = []
    for s in steps:
        cfg = SaeConfig(d_model=d_model, d_sae=d_sae, seed=s)
        paths.append(str(save_sae(SparseAutoencoder(cfg), cfg, folder / "chain" / f"step{s}")))
    latents = list(range(0, d_sae, 2))
    formation = formation or [steps[i % len(steps)] if i % 3 else None for i in range(len(latents))]
    write_json(folder / "chain_features.json", dict(
        format=CHAIN_FEATURES_FORMAT, notebook="11_sae_track", profile="smoke", suite="test",
        checkpoints=[dict(step=s, source=source(s), revision=revision_format and revision_format.format(step=s)) for s in steps],
        site="resid_pre", site_layer=layer, d_model=d_model, d_sae=d_sae, steps=list(steps), sae_paths=paths,
        formation_measure="activation_cosine", formation_fraction=0.5, latents=latents, formation_steps=formation,
        final_labels=[dict(kind="silent", value="")] * len(latents)))
    return folder


RUN = [Checkpoint(s, s * 10, f"/runs/a/step{s}") for s in (0, 4, 8)]


def test_chain_features_missing_file_skips_with_a_message(tmp_path):
    info, msg = chain_features(tmp_path / "11_sae_track", RUN, 1, 64)
    assert info is None and "no " in msg and "chain_features.json" in msg and "skipped" in msg


def test_chain_features_read_on_the_same_suite_and_site(tmp_path):
    write_chain(tmp_path, (0, 8, 16), lambda s: f"/runs/a/step{s}", None)
    info, msg = chain_features(tmp_path, RUN, 1, 64)
    assert info is not None and "steps [0, 8] shared" in msg, msg
    decoders = chain_decoders(info, [c.step for c in RUN])
    assert decoders[1] is None and decoders[0].shape == decoders[2].shape == (32, 64)
    assert formation_of(info, __import__("torch").tensor([0, 1, 2, 4])) == [None, None, 8, 16]


@pytest.mark.parametrize("change, words", [(dict(layer=0), "another site"), (dict(d_model=32), "another site"),
                                           (dict(source=lambda s: f"/runs/b/step{s}"), "another suite"),
                                           (dict(steps=(1, 2)), "has none of the steps")])
def test_chain_features_refuses_another_suite_or_site(tmp_path, change, words):
    args = dict(steps=(0, 8, 16), source=lambda s: f"/runs/a/step{s}", revision_format=None) | change
    write_chain(tmp_path, **args)
    info, msg = chain_features(tmp_path, RUN, 1, 64)
    assert info is None and words in msg and "skipped" in msg, msg


# --- the notebook: stops in its parameter cell; runs in smoke on a Hub-like suite ------------------------------------

def _execute(tmp_path, **params):
    import papermill as pm
    return pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                               progress_bar=False, parameters=dict(profile="smoke", out_dir=str(tmp_path / "out"), **params))


@pytest.mark.parametrize("params, words", [(dict(site_layer=7), "site_layer=7 is out of range"),
                                           (dict(triplet_steps=[0, 4, 5]), "triplet_steps [5] are not checkpoints"),
                                           (dict(kind="batchtopk", d_latents=16, k=32), "k=32 does not fit")])
def test_notebook_stops_in_its_parameter_cell(params, words, tmp_path, monkeypatch):
    import papermill as pm
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("DYNTRACK_CACHE", str(cache))  # the kernel inherits it
    with pytest.raises(pm.PapermillExecutionError) as failure: _execute(tmp_path, **params)
    assert words in failure.value.evalue, failure.value.evalue
    assert "notebook_params(" in failure.value.source  # the cell right after the parameters
    assert list(cache.iterdir()) == []


REPO = "toy-org/toy-pythia"
TINY = dict(words_per_domain=3000, eval_words_per_domain=400, n_pairs=8, ie_pairs=4, seq_len=32, eval_tokens=512,
            sim_tokens=512, cc_tokens=2048, cc_batch_size=128, cc_context=32, analysis_tokens=1024, n_top=5, n_shown=2,
            device="cpu")
FIGURES = ("accuracy_choice", "similarity_choice", "crosscoder_stats", "reldec_histograms", "ie_over_triplet",
           "relie_simplex", "top_features", "ablation_check")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    "A Hub cache holding revisions step0, step8 and step16 of a tiny GPT-NeoX with a BPE tokenizer trained on the corpus."
    return toy_hub(tmp_path_factory.mktemp("hub"), REPO, (0, 8, 16))


def test_notebook_runs_on_a_hub_suite(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path / "cache"))
    write_chain(tmp_path / "11_sae_track", (0, 8, 16), lambda s: REPO, "step{step}")  # beside out_dir: found by default
    _execute(tmp_path, suite=f"hub:{REPO}", hub_steps=[0, 8, 16], **TINY)
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (record["notebook"], record["profile"]) == ("12_crosscoding", "smoke")
    m = record["metrics"]
    assert m["site_layer"] == 1 and len(m["pair_steps"]) == 2 and len(m["triplet_steps"]) == 3
    assert set(m["pair_steps"]) | set(m["triplet_steps"]) <= {0, 8, 16}
    assert set(m["crosscoder_stats"]) == {"pair", "triplet", "same_checkpoint"}  # a hub suite has no second seed here
    for name, st in m["crosscoder_stats"].items():
        n = 3 if name == "triplet" else 2
        assert len(st["delta_ce"]) == len(st["ce_recovered"]) == n and st["l0"] > 0 and 0 <= st["dead_fraction"] <= 1
    assert set(m["reldec_class_counts"]) == set(m["relie_class_counts"]) == {"pair", "triplet"}
    assert set(m["reldec_class_counts"]["pair"]) == {"discontinued", "emerging", "shared", "other"}
    assert sum(m["reldec_class_counts"]["pair"].values()) == m["n_live"]["pair"] > 0  # every live latent has a class
    assert sum(m["relie_class_counts"]["triplet"].values()) == m["n_with_effect"]["triplet"]
    assert set(m["null_reldec_class_counts"]) == {"same_checkpoint"}
    assert set(m["ablation_spearman_relie"]) == set(m["ablation_spearman_reldec"]) == {"top10", "top100"}
    assert set(m["null_ablation_spearman_relie"]) == {"same_checkpoint"}
    for rho in (*m["ablation_spearman_relie"].values(), *m["ablation_spearman_reldec"].values(),
                *m["null_ablation_spearman_relie"]["same_checkpoint"].values()):
        assert rho is None or -1 <= rho <= 1  # None: undefined (fewer than two latents, or a constant share)
    match = m["sae_track_match"]
    assert match["sae_track_dir"] == str((tmp_path / "11_sae_track").resolve()) and set(match["crosscoders"]) == {"pair", "triplet"}
    for name, cc in match["crosscoders"].items():
        assert cc["steps"] == (m["pair_steps"] if name == "pair" else m["triplet_steps"])
        assert sum(c["n_live"] for c in cc["classes"].values()) == m["n_live"][name]
        for c in cc["classes"].values():
            assert c["n_formed"] == len(c["formation_steps"]) <= c["n_matched"] <= c["n_live"]
            assert set(c["formation_steps"]) <= {0, 8, 16}
    for name in FIGURES + ("sae_track_formation",): assert (tmp_path / "out" / f"crosscoding_fig_{name}.png").stat().st_size > 1000, name
    crosscoders = [d for d in (tmp_path / "cache" / "crosscoding").iterdir() if d.is_dir() and d.name.startswith("l1-")]
    assert len(crosscoders) == 3 and all((d / "sae" / "cfg.json").exists() for d in crosscoders)
