"SAE-Track: the warm-started chain, decoder drift, progress measure, formation steps, phases, labels and patterns."
import math

import pytest
import torch

from dyntrack.core import ParamError
from dyntrack.corpus import WordInfo
from dyntrack.models import CheckpointSuite, build_model, model_config, save_checkpoint
from dyntrack.sae import SaeConfig, load_sae
from dyntrack.sae_track import (FeatureLabel, decoder_cosines, decoder_pca, formation_step, label_feature,
                                pairwise_similarity, pattern, phase_boundaries, progress_measure, random_positions,
                                top_positions, train_chain)

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


# --- positions and the progress measure ---------------------------------------------------------------------

def test_top_and_random_positions():
    lat = torch.zeros(20, 4)
    lat[torch.tensor([3, 9, 15]), 2] = torch.tensor([1.0, 3.0, 2.0])
    top = top_positions(lat, k=3)
    assert top.shape == (4, 3) and top[2].tolist() == [9, 15, 3]
    r = random_positions(20, 8, seed=3)
    assert r.shape == (8,) and len(set(r.tolist())) == 8 and r.max() < 20
    assert torch.equal(r, random_positions(20, 8, seed=3)) and not torch.equal(r, random_positions(20, 8, seed=4))
    with pytest.raises(ParamError, match="k="): top_positions(lat, k=21)
    with pytest.raises(ParamError, match="latents"): top_positions(torch.zeros(5), k=2)
    with pytest.raises(ParamError, match="k="): random_positions(5, 6)


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
    steps = [0, 1, 2, 4, 8]
    assert formation_step(steps, [0.0, 0.2, 0.5, 0.7, 1.0]) == 2  # reaching exactly the fraction counts
    assert formation_step(steps, [0.0, 0.6, 0.4, 0.7, 1.0]) == 4  # dips back below: the later crossing
    assert formation_step(steps, [0.0, 0.2, 0.5, 0.7, 1.0], fraction=0.9) == 8
    assert formation_step(steps, [2.0, 2.0, 2.0, 2.0, 2.0]) == 0
    assert formation_step(steps, torch.tensor([1.0, 0.5, 0.2, 0.0, 0.0])) is None
    with pytest.raises(ParamError, match="steps and values"): formation_step(steps, [1.0, 2.0])
    with pytest.raises(ParamError, match="fraction"): formation_step(steps, [1.0] * 5, fraction=1.5)


def test_phase_boundaries_known_answers():
    assert phase_boundaries(list(range(10, 110, 10))) == (10, 90)
    assert phase_boundaries([5, None, 5, 5]) == (5, 5)
    assert phase_boundaries([0, 100, 200, 300], quantiles=(0.25, 0.75)) == (0, 200)
    with pytest.raises(ParamError, match="formation_steps"): phase_boundaries([None, None])
    with pytest.raises(ParamError, match="quantiles"): phase_boundaries([1, 2], quantiles=(0.9, 0.1))


# --- labels and patterns ------------------------------------------------------------------------------------

def info(lemma, pos="noun", category="animal", number="sg", word=None):
    return WordInfo(word or lemma, lemma, pos, category, number, None, 1, None, ())


def test_label_feature_known_answers():
    assert label_feature([info("dog")] * 3 + [info("cat"), None]) == FeatureLabel("token", "dog", 0.6)
    animals = [info("dog"), info("cat"), info("cow"), info("hen"), info("red", "adj", "colour", None)]
    assert label_feature(animals) == FeatureLabel("concept", "category=animal", 0.8)
    plural = [info("dog", number="pl"), info("hat", category="clothing", number="pl"),
              info("cup", category="kitchen", number="pl"), info("ran", "verb", "motion", None)]
    assert label_feature(plural) == FeatureLabel("concept", "number=pl", 0.75)
    verbs = [info("run", "verb", "motion", None), info("eat", "verb", "ingest", None), info("see", "verb", "percept", None)]
    assert label_feature(verbs) == FeatureLabel("concept", "pos=verb", 1.0)
    scattered = [info("dog"), info("red", "adj", "colour", None), info("run", "verb", "motion", None), None]
    assert label_feature(scattered).kind == "unlabelled"
    assert label_feature(animals, threshold=0.9).kind == "unlabelled"  # 4 of 5 nouns: pos=noun is only 0.8
    with pytest.raises(ParamError, match="token_infos_top"): label_feature([])
    with pytest.raises(ParamError, match="threshold"): label_feature(animals, threshold=2)


def test_pattern_known_answers():
    U = FeatureLabel("unlabelled", "", 0.0)
    dog, cat = FeatureLabel("token", "dog", 0.9), FeatureLabel("token", "cat", 0.9)
    animal = FeatureLabel("concept", "category=animal", 0.8)
    assert pattern([dog] * 4) == "maintaining"
    assert pattern([U, dog, dog]) == "maintaining"   # unlabelled early is ignored
    assert pattern([dog, U, dog]) == "maintaining"   # a gap does not break the run
    assert pattern([dog, dog, cat]) == "shifting"
    assert pattern([dog, animal]) == "shifting"      # token meaning turns into a concept
    assert pattern([U, U, animal, animal]) == "grouping"
    assert pattern([U, U]) == "other" and pattern([dog, U]) == "other"
    with pytest.raises(ParamError, match="labels_over_time"): pattern([])
