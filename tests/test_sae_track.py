"SAE-Track (dyntrack.sae_track.chain and dyntrack.sae_track.analysis): parameters, the warm-started chain, activation scales, link checks, warm vs cold, decoder drift, progress measure, formation steps, phases, patterns, the analysis pass and the embedding view."
import json, math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import toy_hub
from dyntrack.acts import residual_at, window_acts
from dyntrack.core import PROFILES, ParamError, read_json, resolve_params
from dyntrack.data.grammar import WordInfo
from dyntrack.features import FeatureLabel, TokenWindow
from dyntrack.models.presets import build_model, model_config
from dyntrack.models.suite import CheckpointSuite, save_checkpoint
from dyntrack.sae.model import SaeConfig, SparseAutoencoder, load_sae
from dyntrack.sae.train import planted_sparse_data, train_sae
from dyntrack.sae_track.chain import (
    MEASURES, ResamplingSae, SaeCheck, SaeTrackParams, _link_acts, activation_scales, chain_key, chain_sae, check_sae,
    cold_match, eval_steps, resolve_steps, sae_configs, tokens_to_match, train_chain, train_control_chain, warm_cold_curves)
from dyntrack.sae_track.analysis import (
    PATTERNS, ChainAnalysis, analyse_chain, analyse_checkpoint, boundary_problems, decoder_cosines, decoder_pca,
    distinct_features, drift_vs_control, embed_2d, feature_patterns, formation_step, formation_sweep, link_cosines,
    mean_pairwise, overlap_pattern, pairwise_similarity, pattern_counts, pattern_examples, phase_boundaries, phase_of,
    label_fractions, progress_measure, progress_measures, random_positions, separation, token_overlap, token_shares,
    top_positions)
from dyntrack.sae.model import evaluate_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 61


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")


# --- the chain ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    run = tmp_path_factory.mktemp("suite") / "run"
    config = model_config("gpt_neox", "tiny", vocab_size=VOCAB, max_seq_len=16, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=32)
    for step in (0, 10, 20): save_checkpoint(build_model(config, seed=step), None, run, step, tokens_seen=step * 64)
    return CheckpointSuite.from_run(run)


def chain_cfg(**kw) -> SaeConfig:
    return SaeConfig(**{**dict(d_model=16, d_sae=32, kind="topk", k=4, batch_size=32, n_tokens=64, warmup_steps=1,
                               lr=1e-2), **kw})


def tokens(ckpt):
    return torch.randint(0, VOCAB, (16, 9), generator=torch.Generator().manual_seed(ckpt.step)).split(4)


def test_chain_without_training_copies_weights(suite, tmp_path):
    paths = train_chain(suite, 1, lambda ckpt: [], chain_cfg(), chain_cfg(lr=1e-3), tmp_path)
    assert paths == [tmp_path / f"step{s}" / "sae" for s in (0, 10, 20)]
    saes = [load_sae(p) for p in paths]
    for sae in saes[1:]:
        for name, value in saes[0].state_dict().items(): assert torch.equal(sae.state_dict()[name], value), name


def test_chain_links_start_from_predecessor_and_resume(suite, tmp_path):
    seen = []
    def source(ckpt):
        seen.append(ckpt.step)
        return tokens(ckpt)
    paths = train_chain(suite, 1, source, chain_cfg(), chain_cfg(n_tokens=32), tmp_path, steps=[0, 10])
    assert seen == [0, 10] and len(paths) == 2
    a, b = (load_sae(p) for p in paths)
    assert not torch.equal(a.W_dec, b.W_dec)
    scratch = load_sae(train_chain(suite, 1, lambda c: [], chain_cfg(seed=5), chain_cfg(), tmp_path / "other",
                                   steps=[0])[0])  # another random initialisation
    assert (a.W_dec - b.W_dec).norm() < 0.5 * (a.W_dec - scratch.W_dec).norm()  # link 10 starts from link 0
    seen.clear()
    assert train_chain(suite, 1, source, chain_cfg(), chain_cfg(n_tokens=32), tmp_path) == paths + [tmp_path / "step20" / "sae"]
    assert seen == [20]  # finished links are skipped
    torch.testing.assert_close(load_sae(paths[1]).W_dec, b.W_dec)


def test_chain_rejects_mismatched_configs(suite, tmp_path):
    with pytest.raises(ParamError, match="link_cfg"):
        train_chain(suite, 1, tokens, chain_cfg(), chain_cfg(d_sae=48), tmp_path)


# --- decoder drift ------------------------------------------------------------------------------------------

def test_decoder_cosines_known_answers():
    W = torch.randn(7, 5)
    assert torch.allclose(decoder_cosines([W, W]), torch.ones(2, 7))
    angle = 0.4
    moved = W.clone()
    moved[3] = torch.tensor([1.0, 0, 0, 0, 0])
    final = moved.clone()
    final[3] = torch.tensor([math.cos(angle), math.sin(angle), 0, 0, 0])
    cos = decoder_cosines([moved, final])
    assert cos.shape == (2, 7) and abs(cos[0, 3].item() - math.cos(angle)) < 1e-6
    assert torch.allclose(cos[0, torch.arange(7) != 3], torch.ones(6))


def test_decoder_pca_trajectory():
    Ws = [torch.zeros(2, 3) for _ in range(4)]
    for t, W in enumerate(Ws): W[0] = torch.tensor([float(t), 0.0, 0.0])
    xy = decoder_pca(Ws, 0)
    assert xy.shape == (4, 2)
    torch.testing.assert_close(xy[:, 0], torch.tensor([-1.5, -0.5, 0.5, 1.5]))  # sign: first → last increases
    torch.testing.assert_close(xy[:, 1], torch.zeros(4), atol=1e-6, rtol=0)


def test_decoder_bad_inputs():
    with pytest.raises(ParamError, match="W_decs"): decoder_cosines([torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(ParamError, match="W_decs"): decoder_cosines([])
    with pytest.raises(ParamError, match="latent"): decoder_pca([torch.randn(4, 3)] * 2, 4)


# --- the progress measure ---------------------------------------------------------------------------------

def test_progress_measure_known_answers():
    same, ortho = torch.ones(5, 8), torch.eye(8)[:5]
    assert progress_measure(same, ortho, "cosine") == pytest.approx(1.0)
    assert progress_measure(same, ortho, "jaccard") == pytest.approx(1.0)
    assert progress_measure(same, ortho, "weighted_jaccard") == pytest.approx(1.0)
    assert progress_measure(ortho, ortho) == pytest.approx(0.0)
    # a planted feature: every top position has latent 0 at 3.0 plus one private latent at 1.0
    planted = torch.zeros(4, 8)
    planted[:, 0] = 3.0
    planted[torch.arange(4), torch.arange(1, 5)] = 1.0
    assert progress_measure(planted, ortho, "jaccard") == pytest.approx(1 / 3)
    assert progress_measure(planted, ortho, "weighted_jaccard") == pytest.approx(3 / 5)  # Σmin 3, Σmax 5
    assert progress_measure(planted, ortho, "cosine") == pytest.approx(9 / 10)


def test_pairwise_similarity_conventions():
    reps = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    for kind in ("jaccard", "weighted_jaccard"):
        sim = pairwise_similarity(reps, kind)
        assert sim[0, 1] == 0 and sim[2, 2] == 1  # two empty sets share nothing


def test_progress_measure_bad_inputs():
    with pytest.raises(ParamError, match="kind"): progress_measure(torch.ones(3, 4), torch.ones(3, 4), "euclid")
    with pytest.raises(ParamError, match="reps_t and reps_random"): progress_measure(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ParamError, match="reps_t"): progress_measure(torch.ones(1, 4), torch.ones(3, 4))
    with pytest.raises(ParamError, match="reps_random"): progress_measure(torch.ones(3, 4), torch.ones(4))
    with pytest.raises(ParamError, match="non-negative"):
        progress_measure(-torch.ones(3, 4), torch.ones(3, 4), "weighted_jaccard")


# --- formation steps and phases -----------------------------------------------------------------------------

def test_formation_step_known_answers():
    "The normalised rise: 0 at the trajectory's minimum, 1 at its maximum."
    steps = [0, 1, 2, 4, 8]
    assert formation_step(steps, [0.0, 0.2, 0.5, 0.7, 1.0]) == 2  # reaching exactly the fraction counts
    assert formation_step(steps, [0.0, 0.6, 0.4, 0.7, 1.0]) == 4  # dips back below: the later crossing
    assert formation_step(steps, [0.0, 0.2, 0.5, 0.7, 1.0], fraction=0.9) == 8
    assert formation_step(steps, [1.0, 0.9, 1.2, 1.5, 1.9]) == 4  # starts high: the rise counts from its minimum 0.9
    assert formation_step(steps, [2.0, 2.0, 2.0, 2.0, 2.0]) is None  # flat: nothing forms (not "at step 0")
    assert formation_step(steps, [0.5, 0.51, 0.5, 0.52, 0.52], min_rise=0.05) is None  # a rise below min_rise is noise
    assert formation_step(steps, [0.0, 0.5, 1.0, 0.8, 0.3]) is None  # rose, then fell back below half its rise
    assert formation_step(steps, torch.tensor([1.0, 0.5, 0.2, 0.0, 0.0])) is None
    with pytest.raises(ParamError, match="min_rise"): formation_step(steps, [1.0] * 5, min_rise=-1)
    with pytest.raises(ParamError, match="steps and values"): formation_step(steps, [1.0, 2.0])
    with pytest.raises(ParamError, match="fraction"): formation_step(steps, [1.0] * 5, fraction=1.5)


def test_phase_boundaries_known_answers():
    assert phase_boundaries(list(range(10, 110, 10))) == (10, 90)
    assert phase_boundaries([5, None, 5, 5]) == (5, 5)
    assert phase_boundaries([0, 100, 200, 300], quantiles=(0.25, 0.75)) == (0, 200)
    with pytest.raises(ParamError, match="formation_steps"): phase_boundaries([None, None])
    with pytest.raises(ParamError, match="quantiles"): phase_boundaries([1, 2], quantiles=(0.9, 0.1))


def test_formation_sweep_on_a_constructed_curve():
    "Concept features rising between steps 4 and 16, token features high and flat: the sweep moves with the fraction."
    steps = [0, 1, 2, 4, 8, 16, 32, 64]
    rise = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.5, 0.8, 1.0, 1.0])                # one planted curve, then delays
    concept = torch.stack([rise, torch.cat([rise[:1], rise[:-1]]), torch.cat([rise[:2], rise[:-2]])], 1)
    token = torch.full((8, 2), 0.9) + 0.001 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sweep = formation_sweep(steps, torch.cat([concept, token], 1), ["concept"] * 3 + ["token"] * 2, (0.3, 0.5, 0.7, 0.9),
                            quantiles=(0.0, 1.0), min_rise=0.05)
    assert sweep[0.3]["formation_steps"] == [8, 16, 32, None, None]   # ≥ 0.3 from 0.5 on, one checkpoint later each
    assert sweep[0.5]["formation_steps"] == [8, 16, 32, None, None]
    assert sweep[0.7]["formation_steps"] == [16, 32, 64, None, None]
    assert sweep[0.9]["formation_steps"] == [32, 64, 64, None, None]
    assert sweep[0.5]["boundaries"] == [8, 32] and sweep[0.5]["problems"] == []
    assert sweep[0.9]["boundaries"] == [32, 64] and sweep[0.9]["problems"] == ["empty convergent phase: b2 is the last checkpoint (step 64)"]
    assert sweep[0.5]["by_kind"]["token"] == dict(n=2, n_formed=0, median_step=None, boundaries=None, problems=["no feature forms"])
    assert sweep[0.5]["by_kind"]["concept"]["median_step"] == 16 and set(sweep[0.5]["by_kind"]) == {"concept", "token"}
    same = formation_sweep(steps, concept[:, :1].repeat(1, 4), ["concept"] * 4, (0.5,))
    assert same[0.5]["boundaries"] == [8, 8] and same[0.5]["problems"][0].startswith("empty emergent phase: b1 = b2 = step 8, where 100%")
    assert boundary_problems([2, 4], (2, 4), steps) == []
    with pytest.raises(ParamError, match="measure"): formation_sweep(steps, torch.ones(3, 2), ["token"] * 2, (0.5,))
    with pytest.raises(ParamError, match="final_kinds"): formation_sweep(steps, torch.ones(8, 2), ["token"], (0.5,))


def test_planted_feature_forms_at_the_planted_step():
    "Top positions that become alike at step 16 (through the centred progress measure): the feature forms at step 16."
    gen, steps, planted = torch.Generator().manual_seed(3), [0, 1, 2, 4, 8, 16, 32, 64], 5  # aligned from index 5 on
    top, rand, curve = torch.arange(12)[None], torch.arange(100, 160), []
    offset = torch.full((16,), 4.0)                                     # anisotropy: every position shares it
    for t in range(len(steps)):
        acts = torch.randn(300, 16, generator=gen) + offset
        if t >= planted: acts[:12] = offset + 3 * torch.eye(16)[0] + 0.1 * torch.randn(12, 16, generator=gen)
        prog, *_ = analyse_checkpoint(exact_sae(16), acts, torch.tensor([0]), top, rand, [None] * 300, 12, 0.6)
        curve.append(prog["activation_cosine"].item())
    assert formation_step(steps, curve, 0.5, min_rise=0.1) == steps[planted] == 16
    assert max(curve[:planted]) < 0.2 < 0.8 < min(curve[planted:])      # centred: the shared offset is no structure

# --- patterns -------------------------------------------------------------------------------------------

def info(lemma, pos="noun", category="animal", number="sg", word=None):
    return WordInfo(word or lemma, lemma, pos, category, number, None, 1, None, ())


def test_overlap_pattern_on_constructed_trajectories():
    "Patterns read from the top tokens at every checkpoint, with silent as a state of its own."
    U, S = FeatureLabel("unlabelled", ""), FeatureLabel("silent", "")
    dog, cat = FeatureLabel("token", "dog", 0.9), FeatureLabel("token", "cat", 0.9)
    animal = FeatureLabel("concept", "category=animal", 0.8)
    DOG, CAT, MIX, ANIMALS = {1: 1.0}, {2: 1.0}, {t: 0.2 for t in range(5, 10)}, {1: 0.4, 2: 0.3, 3: 0.3}
    assert token_overlap(DOG, ANIMALS) == pytest.approx(0.4) and token_overlap(MIX, ANIMALS) == 0.0
    assert overlap_pattern([DOG] * 4, [dog] * 4) == "maintaining"
    assert overlap_pattern([DOG, CAT, CAT, DOG], [dog, cat, cat, dog]) == "shifting"  # the ends agree, the middle does not
    assert overlap_pattern([DOG, DOG, ANIMALS], [dog, dog, animal]) == "shifting"      # token → concept (overlap 0.4)
    assert overlap_pattern([MIX, MIX, ANIMALS], [U, U, animal]) == "grouping"
    assert overlap_pattern([MIX, CAT], [U, cat]) == "other"                          # scattered → token-level
    assert overlap_pattern([DOG, CAT], [dog, U]) == "other"                          # unlabelled at the end
    assert overlap_pattern([{}, DOG, {}, DOG], [S, dog, S, dog]) == "maintaining"     # silent stretches are no change
    assert overlap_pattern([{}, CAT, DOG], [S, cat, dog]) == "shifting"               # born late: its first live state
    assert overlap_pattern([DOG, DOG, {}], [dog, dog, S]) == "discontinued"
    assert overlap_pattern([{}, {}], [S, S]) == "silent"
    assert overlap_pattern([DOG, {1: 0.6, 4: 0.4}], [dog, dog], threshold=0.5) == "maintaining"
    assert overlap_pattern([DOG, {1: 0.6, 4: 0.4}], [dog, dog], threshold=0.7) == "shifting"
    with pytest.raises(ParamError, match="one entry per checkpoint"): overlap_pattern([DOG], [dog, dog])
    with pytest.raises(ParamError, match="label kind 'pure'"): overlap_pattern([DOG], [FeatureLabel("pure", "dog")])
    assert token_shares(torch.tensor([1, 1, 2, 3]), torch.tensor([1.0, 2.0, 0.5, 0.0])) == {1: 2 / 3, 2: 1 / 3}
    assert token_shares(torch.tensor([1, 2]), torch.zeros(2)) == {}


def test_feature_patterns_on_a_constructed_analysis():
    "feature_patterns reads the window's tokens at each checkpoint's top positions."
    token_ids = torch.tensor([1, 1, 1, 2, 2, 2, 5, 6, 7])               # positions 0-2: dog, 3-5: cat, 6-8: three words
    pos = torch.tensor([[[0, 1, 2], [0, 1, 2], [6, 7, 8], [0, 1, 2]],   # [T=3, F=4, k=3]
                        [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]],
                        [[0, 1, 2], [3, 4, 5], [0, 3, 4], [0, 1, 2]]])
    values = torch.ones(3, 4, 3)
    values[2, 3] = 0                                                     # feature 3 is silent at the end
    dog, cat, U, S = FeatureLabel("token", "dog"), FeatureLabel("token", "cat"), FeatureLabel("unlabelled", ""), FeatureLabel("silent", "")
    animal = FeatureLabel("concept", "category=animal")
    labels = [[dog, dog, U, dog], [dog, cat, U, dog], [dog, cat, animal, S]]
    an = ChainAnalysis([0, 1, 2], [], torch.arange(4), pos[-1], torch.arange(3), {}, labels, values, pos)
    assert feature_patterns(an, token_ids) == ["maintaining", "shifting", "grouping", "discontinued"]


def test_pattern_counts_examples_distinct():
    dog, cat = FeatureLabel("token", "dog", 0.7), FeatureLabel("token", "cat", 0.9)
    U, S = FeatureLabel("unlabelled", ""), FeatureLabel("silent", "")
    pats = ["shifting", "maintaining", "maintaining", "other", "discontinued"]
    assert pattern_counts(pats) == dict(maintaining=2, shifting=1, grouping=0, other=1, discontinued=1, silent=0)
    with pytest.raises(ParamError, match="unknown pattern"): pattern_counts(["drifting"])
    finals = [dog, cat, FeatureLabel("token", "dog", 0.95), U, S]
    assert pattern_examples(pats, finals) == dict(maintaining=2, shifting=0, grouping=None)
    assert distinct_features(finals, 5) == [2, 1] and distinct_features(finals, 1) == [2]


# --- parameters ---------------------------------------------------------------------------------------------

def test_params_derive_and_reject():
    p = SaeTrackParams(first_tokens=200_000, sae_batch_size=1000)
    assert (p.link_tokens, p.cold_tokens) == (10_000, 100_000)
    assert SaeTrackParams(link_tokens=5000, sae_batch_size=1000).link_tokens == 5000
    first, link, cold = sae_configs(p, d_model=64)
    assert first.d_sae == 16 * 64 and (link.n_tokens, link.lr, link.warmup_steps) == (10_000, p.link_lr, 3)
    assert cold.n_tokens == 100_000 + p.first_warmup_steps * 1000 and cold.lr == first.lr  # its budget past its warm-up
    assert first.dead_tokens == 10_000
    assert sae_configs(SaeTrackParams(d_sae=300), 64)[0].d_sae == 300
    for bad, match in ((dict(kind="gated"), "kind"), (dict(n_top=1), "n_top"), (dict(phase_quantiles=(0.5,)), "phase_quantiles"),
                       (dict(link_lr=0.0), "link_lr"), (dict(label_threshold=1.2), "label_threshold"),
                       (dict(first_tokens=1000), "first_tokens"), (dict(suite="nowhere"), "suite"),
                       (dict(formation_fractions=(0.5, 1.0)), "formation_fractions"), (dict(formation_fractions=()), "formation_fractions"),
                       (dict(resample_every=-1), "resample_every"), (dict(overlap_threshold=2.0), "overlap_threshold"),
                       (dict(control_links=-1), "control_links")):
        with pytest.raises(ParamError, match=match): SaeTrackParams(**bad)


def test_profiles_resolve():
    for profile in PROFILES:
        p = resolve_params(SaeTrackParams, profile)
        assert p.link_tokens >= p.sae_batch_size and p.splice_tokens <= p.analysis_tokens


def test_resolve_steps_and_chain_key(suite):
    assert resolve_steps(suite, (), (), 2) == ([0, 10, 20], [10, 20])
    assert resolve_steps(suite, (), (), 5) == ([0, 10, 20], [10, 20])  # at most every step after the first
    assert resolve_steps(suite, (0, 20), (), 1) == ([0, 20], [20])
    with pytest.raises(ParamError, match=r"chain_steps \[5\] are not checkpoints of the suite; its steps: \[0, 10, 20\]"):
        resolve_steps(suite, (0, 5), (), 1)
    with pytest.raises(ParamError, match="at least two"): resolve_steps(suite, (10,), (), 1)
    with pytest.raises(ParamError, match="cold_steps"): resolve_steps(suite, (), (0,), 1)
    p = SaeTrackParams()
    assert chain_key(p, suite, 1) == chain_key(SaeTrackParams(n_random=7, analysis_tokens=10**5), suite, 1)
    assert len({chain_key(p, suite, 1), chain_key(p, suite, 0), chain_key(SaeTrackParams(sae_seed=1), suite, 1),
                chain_key(p, suite.select([0, 10]), 1)}) == 4


def test_chain_key_covers_the_code(suite, monkeypatch):
    import dyntrack.sae_track.chain as sae_track_mod
    p = SaeTrackParams()
    key = chain_key(p, suite, 1)
    assert key == chain_key(SaeTrackParams(), suite, 1) and key.startswith("relu-L1-")  # stable across calls
    seen = []
    monkeypatch.setattr(sae_track_mod, "module_digest", lambda *names: seen.append(names) or "edited")
    assert chain_key(p, suite, 1) != key
    assert {"dyntrack.sae", "dyntrack.train.state", "dyntrack.sae_track.chain", "dyntrack.acts", "dyntrack.data.embedded"} <= set(seen[0])


def test_params_refuse_non_finite_and_unused_values():
    for bad, words in [(dict(sae_lr=float("inf")), "^sae_lr=inf is not a finite number"),
                       (dict(link_lr=float("nan")), "^link_lr=nan"), (dict(l1_coef=float("-inf")), "^l1_coef="),
                       (dict(label_threshold=float("nan")), "^label_threshold="),
                       (dict(phase_quantiles=(0.1, float("inf"))), "^phase_quantiles="),
                       (dict(sae_text="texts/"), "^sae_text='texts/' is not used here"),
                       (dict(k=8), "^k=8 is not used here"), (dict(kind="topk", l1_coef=1.0), "^l1_coef=1.0 is not used here"),
                       (dict(d_sae=512, sae_expansion=8), "^sae_expansion=8 is not used here"),
                       (dict(cold_steps=(8,), n_cold=4), "^n_cold=4 is not used here"),
                       (dict(suite=f"hub:{REPO}", eval_tokens=100), "^eval_tokens=100 is not used here"),
                       (dict(suite=f"hub:{REPO}", vocab_size=500), "^vocab_size=500 is not used here")]:
        with pytest.raises(ParamError, match=words): SaeTrackParams(**bad)
    with pytest.raises(ParamError, match="^sae_lr="): resolve_params(SaeTrackParams, "smoke", dict(sae_lr=float("inf")))
    for name in ("sim_tokens", "n_pairs"):  # 10_suite's evaluation sizes are not parts of SAE-Track's parameters
        with pytest.raises(ParamError, match=rf"^unknown parameter\(s\) \['{name}'\]"):
            resolve_params(SaeTrackParams, "smoke", {name: 100})
    assert SaeTrackParams(suite=f"hub:{REPO}", words_per_domain=5000).words_per_domain == 5000  # sizes the chain's text


def test_check_before_training(suite, tmp_path, monkeypatch):
    from dyntrack.sae_track.chain import check_sae_track_params
    monkeypatch.setenv("DYNTRACK_CACHE", str(tmp_path / "cache"))
    smoke = resolve_params(SaeTrackParams, "smoke")
    assert check_sae_track_params(smoke).steps == [0, 1, 2, 4, 8, 15, 30, 45, 60]  # the schedule it will be trained with
    for bad, words in [(dict(chain_steps=[0, 3]), r"chain_steps \[3\] are not checkpoints"),
                       (dict(cold_steps=[0]), "cold_steps"), (dict(site_layer=2), "site_layer=2 is out of range"),
                       (dict(device="gpu"), "device='gpu'"), (dict(kind="topk", k=257), "k=257")]:
        with pytest.raises(ParamError, match=words): check_sae_track_params(resolve_params(SaeTrackParams, "smoke", bad))
    run = dict(suite=f"run:{Path(suite[0].source).parent}")
    assert check_sae_track_params(SaeTrackParams(**run, d_sae=32, chain_steps=(0, 20))).steps == [0, 10, 20]
    for bad, words in [(dict(chain_steps=(0, 15)), r"chain_steps \[15\]"), (dict(site_layer=2), r"blocks \[0, 1\]"),
                       (dict(sae_text=str(tmp_path / "none")), "sae_text=")]:
        with pytest.raises(ParamError, match=words): check_sae_track_params(SaeTrackParams(**run, d_sae=32, **bad))
    assert not (tmp_path / "cache").exists()  # nothing generated, trained or named


def test_chain_waits_for_a_concurrent_run_and_reuses_its_links(suite, tmp_path, monkeypatch):
    import contextlib, shutil
    import dyntrack.sae_track.chain as sae_track_mod
    done = train_chain(suite, 1, tokens, chain_cfg(), chain_cfg(n_tokens=32), tmp_path / "done")
    held = []
    @contextlib.contextmanager
    def other_run_finishes_first(path, wait=True, what=None):  # the lock is granted after another run wrote the chain
        held.append(str(path))
        shutil.copytree(tmp_path / "done", tmp_path / "chain")
        yield path
    monkeypatch.setattr(sae_track_mod, "file_lock", other_run_finishes_first, raising=False)
    seen = []
    paths = train_chain(suite, 1, lambda ckpt: seen.append(ckpt.step) or tokens(ckpt), chain_cfg(),
                        chain_cfg(n_tokens=32), tmp_path / "chain")
    assert held == [f"{tmp_path / 'chain'}.lock"] and seen == []  # checked again under the lock: nothing retrained
    for a, b in zip(paths, done): assert torch.equal(load_sae(a).W_dec, load_sae(b).W_dec)


# --- activations ----------------------------------------------------------------------------------------

def test_window_acts_scales_and_link_acts(suite):
    model = suite.load_model(suite[1])
    ids = tokens(suite[1])[0]                                    # [4, 9]
    acts = window_acts(model, ids, 1, scale=2.0, batch_seqs=3)
    torch.testing.assert_close(acts, 2 * residual_at(model, ids, 1)[:, 1:].reshape(-1, 16))
    before = torch.cat([residual_at(model, b, 1)[:, 1:].flatten(0, 1).float() for b in ids.split(64)]) * 2.0
    assert torch.equal(window_acts(model, ids, 1, 2.0), before)  # acts' harvest is the chain's former one, to the bit
    scales = activation_scales(suite, 1, tokens, n_batches=2)
    assert sorted(scales) == [0, 10, 20]
    x = torch.cat([window_acts(model, b, 1, scales[10]) for b in tokens(suite[1])[:2]])
    assert x.norm(dim=-1).mean().item() == pytest.approx(4.0, rel=1e-5)  # √d_model
    cfg = chain_cfg()
    a, b = (list(_link_acts(model, 1, tokens(suite[1]), cfg, s)) for s in (1.0, 0.5))
    assert len(a) == 4 and all(x.shape == (32, 16) for x in a)  # 16 sequences × 8 positions, in batches of 32
    for x, y in zip(a, b): torch.testing.assert_close(y, 0.5 * x)


def test_activation_scales_recorded_and_reused(suite, tmp_path, monkeypatch):
    path = tmp_path / "chain" / "scales.json"
    first = activation_scales(suite.select([0, 10]), 1, tokens, path=path)
    assert first == {s: v for s, v in activation_scales(suite, 1, tokens).items() if s in (0, 10)}
    loaded, load = [], suite.load_model
    monkeypatch.setattr(suite, "load_model", lambda ckpt, **kw: loaded.append(ckpt.step) or load(ckpt, **kw))
    again = activation_scales(suite, 1, tokens, path=path)  # only step 20 is new
    assert loaded == [20] and {s: again[s] for s in (0, 10)} == first and sorted(again) == [0, 10, 20]
    assert [r["step"] for r in read_json(path)["scales"]] == [0, 10, 20]
    assert (path.parent / "scales.json.lock").exists()  # measured under a lock: two runs of one chain measure once
    with pytest.raises(ParamError, match="layer 1 over 1 batches, not layer 1 over 2"):
        activation_scales(suite, 1, tokens, n_batches=2, path=path)


def test_chain_applies_scales(suite, tmp_path):
    still = chain_cfg(kind="relu", l1_coef=0.0, lr=1e-12)  # training barely moves b_dec from its initial geometric median
    plain = train_chain(suite, 1, tokens, still, still, tmp_path / "plain", steps=[0])
    scaled = train_chain(suite, 1, tokens, still, still, tmp_path / "scaled", steps=[0], scales={0: 10.0})
    b_plain, b_scaled = load_sae(plain[0]).b_dec, load_sae(scaled[0]).b_dec  # the median of the first batch, scaled
    torch.testing.assert_close(b_scaled, 10 * b_plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(ParamError, match="scales"): train_chain(suite, 1, tokens, chain_cfg(), chain_cfg(), tmp_path, scales={0: 1.0})


# --- link checks, warm vs cold ------------------------------------------------------------------------------

def exact_sae(d: int) -> SparseAutoencoder:
    "z = (ReLU(x), ReLU(−x)), x̂ = ReLU(x) − ReLU(−x) = x: a perfect reconstruction."
    sae = SparseAutoencoder(SaeConfig(d_model=d, d_sae=2 * d, l1_coef=0.0, batch_size=2, n_tokens=2))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1)); sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def test_check_sae_known_answers(suite):
    model, ids = suite.load_model(suite[2]), torch.cat(tokens(suite[2]))   # [16, 9]
    exact = check_sae(model, exact_sae(16), window_acts(model, ids, 1, 3.0), ids, 1, 3.0)
    assert exact.explained_variance == pytest.approx(1.0, abs=1e-5) and exact.delta_ce == pytest.approx(0.0, abs=1e-4)
    assert exact.l0 == 16 and exact.dead_fraction == 0 and exact.ce_recovered == pytest.approx(1.0, abs=1e-3)
    silent = exact_sae(16)
    with torch.no_grad(): silent.b_enc.fill_(-1e4)                      # never fires: reconstructs b_dec = 0 only
    zero = check_sae(model, silent, window_acts(model, ids, 1, 3.0), ids, 1, 3.0)
    assert zero.l0 == 0 and zero.dead_fraction == 1 and zero.ce_recovered == pytest.approx(0.0, abs=1e-4)
    assert zero.explained_variance < 0.05


def test_eval_steps_and_tokens_to_match():
    assert eval_steps(10) == [1, 2, 4, 8, 10] and eval_steps(16) == [1, 2, 4, 8, 16] and eval_steps(1) == [1]
    assert eval_steps(5, per_octave=2) == [1, 2, 3, 4, 5]
    curve = [dict(tokens=64 * 2**i, explained_variance=v) for i, v in enumerate([-2.0, 0.1, 0.5, 0.45, 0.9])]
    assert tokens_to_match(curve, 0.5) == 256 and tokens_to_match(curve, 0.0) == 128 and tokens_to_match(curve, 0.95) is None
    assert tokens_to_match(curve, 0.3, key="explained_variance") == 256


def test_tokens_to_match_on_delta_ce_and_cold_match():
    curve = [dict(tokens=64 * 2**i, delta_ce=v, explained_variance=e) for i, (v, e) in enumerate([(3.0, 0.1), (1.0, 0.5), (0.2, 0.8)])]
    assert tokens_to_match(curve, 1.0, key="delta_ce") == 128 and tokens_to_match(curve, 0.1, key="delta_ce") is None
    warm = [dict(tokens=0, delta_ce=2.0, explained_variance=0.3), dict(tokens=32, delta_ce=0.9, explained_variance=0.6)]
    assert cold_match(warm, curve, 32, "delta_ce") == dict(target=0.9, cold_final=0.2, tokens_to_match=256, ratio=8.0, censored=False)
    assert cold_match(warm, curve, 32) == dict(target=0.6, cold_final=0.8, tokens_to_match=256, ratio=8.0, censored=False)
    never = cold_match([dict(tokens=32, explained_variance=0.95)], curve, 32)   # the cold start never gets there
    assert never["censored"] and never["tokens_to_match"] is None and never["ratio"] == 256 / 32  # a lower bound
    with pytest.raises(ParamError, match="link_tokens"): cold_match(warm, curve, 0)
    with pytest.raises(ParamError, match="warm and cold"): cold_match([], curve, 32)


def test_warm_cold_curves_repeat_the_link(suite, tmp_path):
    first, link, cold = chain_cfg(kind="relu", l1_coef=1e-3), chain_cfg(kind="relu", l1_coef=1e-3, n_tokens=64, lr=1e-3), \
        chain_cfg(kind="relu", l1_coef=1e-3, n_tokens=128)
    paths = train_chain(suite, 1, tokens, first, link, tmp_path / "chain", steps=[0, 10])
    window = TokenWindow(torch.cat(tokens(suite[1])), [None] * 16 * 9, [])
    curves = warm_cold_curves(suite, 10, paths[0], 1, tokens, link, cold, 1.0, window, window.ids[:4])
    assert [pt["tokens"] for pt in curves["warm"]] == [0, 32, 64] and [pt["tokens"] for pt in curves["cold"]] == [32, 64, 128]
    model = suite.load_model(suite[1])
    acts = window_acts(model, window.ids, 1)
    inherited, chained = (check_sae(model, load_sae(p), acts, window.ids[:4], 1, 1.0) for p in paths)
    assert curves["warm"][0]["explained_variance"] == pytest.approx(inherited.explained_variance, abs=1e-6)
    assert curves["warm"][-1]["explained_variance"] == pytest.approx(chained.explained_variance, abs=1e-5)  # the link, again
    assert set(curves["cold"][0]) == {"tokens", *SaeCheck._fields}


# --- progress of many features; the analysis pass -----------------------------------------------------------

def test_progress_measures_match_the_reference():
    gen = torch.Generator().manual_seed(0)
    reps = torch.rand(6, 5, 10, generator=gen) * (torch.rand(6, 5, 10, generator=gen) > 0.5)
    rand = torch.rand(8, 10, generator=gen) * (torch.rand(8, 10, generator=gen) > 0.5)
    for kind in ("cosine", "jaccard", "weighted_jaccard"):
        ref = torch.tensor([progress_measure(r, rand, kind) for r in reps])
        torch.testing.assert_close(progress_measures(reps, rand, kind), ref)
        torch.testing.assert_close(progress_measures(reps, rand, kind, max_elements=50), ref)
    with pytest.raises(ParamError, match="reps must"): progress_measures(torch.ones(3, 4), rand)
    with pytest.raises(ParamError, match="reps_random"): progress_measures(reps, torch.ones(8, 3))
    with pytest.raises(ParamError, match="non-negative"): progress_measures(-reps - 1, rand, "weighted_jaccard")


def test_analyse_checkpoint_planted_feature():
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(200, 8, generator=gen)                                 # [n, d_model]
    acts[:10] = torch.tensor([3.0, -2.0, 1.0, 0, 0, 0, 0, 0])                  # the planted feature: 10 identical positions
    top, rand = torch.arange(10)[None], torch.arange(100, 140)
    infos = [info("dog")] * 10 + [info("cat")] * 190
    prog, labels, values, pos = analyse_checkpoint(exact_sae(8), acts, torch.tensor([0]), top, rand, infos, 10, 0.6)
    z = torch.cat([acts.relu(), (-acts).relu()], 1)                            # exact_sae's latents [200, 16]
    # identical top representations: their mean similarity is 1, so M = 1 − the random positions' mean similarity;
    # cosines are taken after the window's mean is subtracted (identical rows stay identical)
    assert prog["activation_cosine"].item() == pytest.approx(1 - mean_pairwise(acts[rand] - acts.mean(0)), abs=1e-5)
    assert prog["feature_cosine"].item() == pytest.approx(1 - mean_pairwise(z[rand] - z.mean(0)), abs=1e-5)
    for kind in ("jaccard", "weighted_jaccard"):
        assert prog[f"feature_{kind}"].item() == pytest.approx(1 - mean_pairwise(z[rand], kind), abs=1e-5)
    raw, *_ = analyse_checkpoint(exact_sae(8), acts, torch.tensor([0]), top, rand, infos, 10, 0.6, centred=False)
    assert raw["activation_cosine"].item() == pytest.approx(1 - mean_pairwise(acts[rand]), abs=1e-5)
    assert set(pos[0].tolist()) == set(range(10)) and labels[0][:3] == ("token", "dog", 1.0)  # latent 0 = relu(x_0)
    assert labels[0].base_rate == pytest.approx(0.05) and labels[0].p_value == pytest.approx(1 / math.comb(200, 10))  # 10 of 200
    assert values.shape == (1, 10) and (values == 3.0).all()


@pytest.fixture(scope="module")
def trained_chain(suite, tmp_path_factory):
    cfg = chain_cfg(n_tokens=256, k=3)
    return train_chain(suite, 1, tokens, cfg, chain_cfg(n_tokens=64, k=3), tmp_path_factory.mktemp("chain"))


def test_analyse_chain_invariants(suite, trained_chain, monkeypatch):
    ids = torch.randint(0, VOCAB, (12, 9), generator=torch.Generator().manual_seed(7))
    window = TokenWindow(ids, [info(f"w{t}") for t in ids.flatten().tolist()], [])  # ground truth: the token itself
    loaded, load = [], suite.load_model
    monkeypatch.setattr(suite, "load_model", lambda ckpt, **kw: loaded.append(ckpt.step) or load(ckpt, **kw))
    an = analyse_chain(suite, trained_chain, 1, window, {0: 1.0, 10: 2.0, 20: 0.5}, ids[:4], n_top=5, n_random=20)
    monkeypatch.undo()
    assert sorted(loaded) == [0, 10, 20]                                      # every checkpoint's model loaded once
    n_live, fl = len(an.live), an.final_live
    assert an.steps == [0, 10, 20] and n_live > 0 and an.top_final.shape == (n_live, 5)
    assert {k: tuple(v.shape) for k, v in an.progress.items()} == {m: (3, n_live) for m in MEASURES}
    assert an.top_values.shape == an.top_pos.shape == (3, n_live, 5) and len(an.labels) == 3
    final_sae = load_sae(trained_chain[-1])
    z = final_sae.encode(window_acts(suite.load_model(suite[2]), ids, 1, 0.5)).latents
    assert ((z[:, an.live[fl]] > 0).sum(0) >= 5).all() and ((z > 0).sum(0) >= 5).sum() == fl.sum()  # live = fires at ≥ n_top
    first_sae = load_sae(trained_chain[0])                                    # followed too: live under the early link
    z0 = first_sae.encode(window_acts(suite.load_model(suite[0]), ids, 1, 1.0)).latents
    early = ((z0 > 0).sum(0) >= 5).nonzero().squeeze(1)
    assert torch.equal(an.live[an.early_live], early) and torch.equal(an.live, torch.unique(torch.cat([an.live[fl], early])))
    assert torch.equal(an.top_pos[-1][fl], an.top_final[fl])                  # the last SAE is the final SAE
    assert all(an.labels[-1][f].kind == "silent" for f in (~fl).nonzero().squeeze(1).tolist())
    for label, vals, pos in zip(an.labels[-1], an.top_values[-1], an.top_pos[-1]):   # labels read the top tokens
        if label.kind == "token":
            toks = Counter(window.token_ids[p].item() for v, p in zip(vals, pos) if v > 0)
            assert f"w{toks.most_common(1)[0][0]}" == label.value
    patterns = feature_patterns(an, window.token_ids)
    assert len(patterns) == n_live and set(patterns) <= set(PATTERNS) and patterns.count("discontinued") == (~fl).sum()
    assert an.checks[-1] == check_sae(suite.load_model(suite[2]), final_sae, window_acts(suite.load_model(suite[2]), ids, 1, 0.5),
                                      ids[:4], 1, 0.5)


# --- phases, fractions, embedding ---------------------------------------------------------------------------

def test_phase_of_and_label_fractions():
    steps = [0, 1, 2, 4, 8, 16]
    assert phase_of(steps, (0, 4)) == ["initialisation", "emergent", "emergent", "emergent", "convergent", "convergent"]
    assert phase_of(steps, (16, 16)) == ["initialisation"] * 6
    with pytest.raises(ParamError, match="boundaries"): phase_of(steps, (4, 2))
    kinds = [["token"] * 3 + ["unlabelled"], ["token", "concept", "concept", "unlabelled"], ["concept"] * 4]
    fr = label_fractions(kinds, ["initialisation", "convergent", "convergent"])
    assert fr == dict(initialisation=dict(token=0.75, concept=0.0, unlabelled=0.25, silent=0.0), emergent=None,
                      convergent=dict(token=0.125, concept=0.75, unlabelled=0.125, silent=0.0))
    fr = label_fractions([["silent", "token"], ["silent", "silent"]], ["emergent", "emergent"])
    assert fr["emergent"] == dict(token=0.25, concept=0.0, unlabelled=0.0, silent=0.75)  # silent is a class of its own
    with pytest.raises(ParamError, match="kinds"): label_fractions(kinds, ["emergent"])


def test_embedding_and_separation():
    gen = torch.Generator().manual_seed(0)
    line = torch.arange(20.0)[:, None] * torch.tensor([1.0, 2.0, 2.0])          # points on one line in 3-D
    xy = embed_2d(line)
    assert xy.shape == (20, 2) and np.allclose(xy[:, 1], 0, atol=1e-4) and np.allclose(np.abs(np.diff(xy[:, 0])), 3.0, atol=1e-4)
    groups = np.repeat([0, 1], 15)
    apart = torch.cat([torch.tensor([5.0, 0, 0]) + 0.1 * torch.randn(15, 3, generator=gen),
                       torch.tensor([0, 5.0, 0]) + 0.1 * torch.randn(15, 3, generator=gen)])
    assert separation(apart, groups) > 0.9 and separation(torch.randn(30, 3, generator=gen), groups) < 0.2


# --- the experiment notebook on a Hub-like suite ------------------------------------------------------------

NB = Path(__file__).parent.parent / "nbs" / "11_sae_track.ipynb"
REPO = "toy-org/toy-pythia"
TINY = dict(words_per_domain=3000, eval_words_per_domain=400, d_sae=96, sae_batch_size=128, first_tokens=2048,
            link_tokens=256, cold_tokens=1024, first_warmup_steps=2, sae_context=32, analysis_tokens=1024,
            splice_tokens=256, n_top=5, n_random=20, n_drift_features=4, n_embed_features=3, device="cpu")
REQUIRED = ("chain_links", "final_explained_variance", "max_dead_fraction", "warm_vs_cold_token_ratio",
            "phase_boundaries_steps", "token_level_fraction_by_phase", "concept_level_fraction_by_phase", "pattern_counts",
            "dead_fraction_per_link", "drift_vs_control", "phase_boundaries_by_fraction", "phase_boundary_problems",
            "formation_sweep", "cold_tokens_to_match", "warm_vs_cold_censored", "n_final_live", "n_early_live")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    "A Hub cache holding revisions step0, step8 and step16 of a tiny GPT-NeoX with a BPE tokenizer trained on the corpus."
    return toy_hub(tmp_path_factory.mktemp("hub"), REPO, (0, 8, 16))


def test_notebook_runs_on_a_hub_suite(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants
    import papermill as pm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    out = tmp_path / "out"
    pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                        progress_bar=False, parameters=dict(profile="smoke", out_dir=str(out), suite=f"hub:{REPO}",
                                                            hub_steps=[0, 8, 16], chain_dir=str(tmp_path / "chain"), **TINY))
    m = json.loads((out / "metrics.json").read_text())
    assert m["notebook"] == "11_sae_track" and m["profile"] == "smoke"
    metrics = m["metrics"]
    assert set(REQUIRED) <= set(metrics) and metrics["chain_links"] == 3 and metrics["site_layer"] == 1
    assert [link["step"] for link in metrics["links"]] == [0, 8, 16] and set(metrics["warm_vs_cold_token_ratio"]) == {"16"}
    assert sum(metrics["pattern_counts"].values()) == metrics["n_live_features"] > 0
    assert {"discontinued", "silent"} <= set(metrics["pattern_counts"])
    assert metrics["n_live_features"] >= max(metrics["n_final_live"], metrics["n_early_live"])  # followed: the union
    assert metrics["pattern_counts"]["discontinued"] == metrics["n_live_features"] - metrics["n_final_live"]
    assert set(metrics["dead_fraction_per_link"]) == {"0", "8", "16"}
    assert metrics["max_dead_fraction"] == max(metrics["dead_fraction_per_link"].values())
    assert set(metrics["phase_boundaries_by_fraction"]) == {"0.3", "0.5", "0.7", "0.9"}
    assert all(r is not None for r in metrics["warm_vs_cold_token_ratio"].values())       # censored ones are bounds
    assert set(metrics["cold_tokens_to_match"]["16"]) == {"explained_variance", "delta_ce"}
    drift = metrics["drift_vs_control"]
    assert drift["control_step"] == 16 and drift["control_links"] == 2 and len(drift["control_per_link"]) == 2
    assert set(metrics["token_level_fraction_by_phase"]) == {"initialisation", "emergent", "convergent"}
    assert sorted(p.name for p in (tmp_path / "chain").iterdir() if p.is_dir()) == ["control-step16-n2", "step0", "step16", "step8"]
    for name in ("saetrack_chain_link_metrics", "saetrack_fig_decoder_drift_histograms", "saetrack_fig_decoder_drift_curves",
                 "saetrack_fig_decoder_pca_trajectories", "saetrack_fig_progress_measure", "saetrack_fig_phases",
                 "saetrack_fig_semantic_evolution", "saetrack_fig_embedding_pca", "saetrack_fig_warm_vs_cold",
                 "saetrack_fig_drift_vs_control", "saetrack_fig_formation_sweep"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    chain = json.loads((out / "chain_features.json").read_text())  # what 12_crosscoding matches its latents to
    assert (chain["format"], chain["site"], chain["site_layer"], chain["steps"]) == ("dyntrack-chain-features-v1", "resid_pre", 1, [0, 8, 16])
    assert [(c["step"], c["source"], c["revision"]) for c in chain["checkpoints"]] == [(s, REPO, f"step{s}") for s in (0, 8, 16)]
    assert all((Path(path) / "cfg.json").exists() for path in chain["sae_paths"]) and len(chain["sae_paths"]) == 3
    assert len(chain["latents"]) == len(chain["formation_steps"]) == len(chain["final_labels"]) == metrics["n_final_live"]
    assert all(label["kind"] != "silent" for label in chain["final_labels"]) and chain["d_model"] == 64


# --- dead latents, the control chain ----------------------------------------------------------------------

def test_resampler_revives_dead_latents():
    "Latents killed by a large negative bias stay dead in a plain SAE and are revived by the resampler."
    data = planted_sparse_data(8192, d_model=8, n_features=16, k=2, seed=0)
    cfg = SaeConfig(d_model=8, d_sae=32, l1_coef=1e-3, batch_size=64, n_tokens=4096, lr=1e-2, warmup_steps=1, b_dec_init="zeros")
    plain, resampling = chain_sae(cfg), chain_sae(cfg, resample_every=8, resample_until=0.5)
    assert type(plain) is SparseAutoencoder and isinstance(resampling, ResamplingSae)
    for sae in (plain, resampling):
        with torch.no_grad(): sae.b_enc[:16] = -100.0
        train_sae(sae, data.x.split(64), cfg)
    before, after = (evaluate_sae(sae, [data.x]).dead_fraction for sae in (plain, resampling))
    assert before >= 0.5 and after < 0.2 and resampling.resampled >= 16
    assert (resampling.W_dec.norm(dim=1) - 1).abs().max() < 1e-5        # resampled rows keep the unit-norm decoder
    assert evaluate_sae(resampling, [data.x]).explained_variance > evaluate_sae(plain, [data.x]).explained_variance


def test_resampler_stops_and_checks():
    cfg = SaeConfig(d_model=8, d_sae=16, l1_coef=1e-3, batch_size=32, n_tokens=32 * 40, lr=1e-2, warmup_steps=1)
    sae = ResamplingSae(cfg, every=4, until=0.5)
    counts = []
    sae.resample = lambda: counts.append(sae.n_step) or 0                # record the steps it resamples at
    train_sae(sae, torch.randn(32 * 40, 8).split(32), cfg)
    assert counts == [4, 8, 12, 16, 20]                                 # every 4 steps, up to half of 40
    with pytest.raises(ParamError, match="every"): ResamplingSae(cfg, every=0)
    with pytest.raises(ParamError, match="until"): ResamplingSae(cfg, every=2, until=1.5)
    with pytest.raises(ParamError, match="resample_every"): chain_sae(cfg, resample_every=-1)


def test_chain_with_resampling_saves_plain_saes(suite, tmp_path):
    paths = train_chain(suite, 1, tokens, chain_cfg(kind="relu", l1_coef=1e-3), chain_cfg(kind="relu", l1_coef=1e-3),
                        tmp_path, steps=[0, 10], resample_every=1)
    assert all(type(load_sae(p)) is SparseAutoencoder for p in paths)


def test_fixed_checkpoint_chain_drifts_less_than_the_real_chain(suite, tmp_path):
    "Links on one checkpoint move decoder rows less than links across checkpoints whose activations differ."
    first, link = chain_cfg(n_tokens=2048, lr=1e-2), chain_cfg(n_tokens=1024, lr=1e-2)
    def long_tokens(ckpt):
        return torch.randint(0, VOCAB, (512, 9), generator=torch.Generator().manual_seed(ckpt.step)).split(4)
    chain = train_chain(suite, 1, long_tokens, first, link, tmp_path / "chain")
    control = train_control_chain(suite, 0, chain[0], 1, long_tokens, link, tmp_path / "control", token_steps=[10, 20])
    assert control[0] == chain[0] and [p.parent.name for p in control[1:]] == ["link0", "link1"]
    W, C = [load_sae(p).W_dec for p in chain], [load_sae(p).W_dec for p in control]
    d = drift_vs_control(W, C, torch.arange(32), end=-1)
    control_0 = drift_vs_control(W[:1] + W[1:], C, torch.arange(32), end=2)
    assert d["n_links"] == 2 and d["control_over_n"] < 0.5 * d["chain_over_n"]  # the chain's checkpoints differ (other seeds)
    assert control_0 == d and len(d["chain_per_link"]) == 2 and len(d["control_per_link"]) == 2
    mtime = control[1].stat().st_mtime_ns                                # finished control links are reused
    assert train_control_chain(suite, 0, chain[0], 1, long_tokens, link, tmp_path / "control", [10, 20]) == control
    assert control[1].stat().st_mtime_ns == mtime
    with pytest.raises(ParamError, match="token_steps"): train_control_chain(suite, 0, chain[0], 1, long_tokens, link, tmp_path, [])


def test_link_cosines_and_drift_checks():
    gen = torch.Generator().manual_seed(0)
    A, B, shared = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen), 20 * torch.randn(4, generator=gen)
    torch.testing.assert_close(link_cosines([A, B]), torch.nn.functional.cosine_similarity(A, B, dim=-1)[None])
    assert link_cosines([A + shared, B + shared]).mean() > 0.9 > link_cosines([A + shared, B + shared], centred=True).mean()
    torch.testing.assert_close(decoder_cosines([A + shared, A + shared], centred=True), torch.ones(2, 6))
    with pytest.raises(ParamError, match="at least two"): link_cosines([A])
    with pytest.raises(ParamError, match="control_W"): drift_vs_control([A, B], [A], torch.arange(6))
    with pytest.raises(ParamError, match="differ"): drift_vs_control([A, B], [A[:, :3], A[:, :3]], torch.arange(6))
    with pytest.raises(ParamError, match="no link before"): drift_vs_control([A, B], [A, B], torch.arange(6), end=0)
