"Crosscoding analysis (dyntrack.crosscoding.analysis): RelDec, the minimal-pair metric and splice, integrated-gradient IE against exact toys and on tiny real models, thresholds and means, RelIE, classes, the ablation check and the checkpoint choice."
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, normalizers, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from dyntrack.acts import blocks
from dyntrack.core import ParamError
from dyntrack.crosscoding.analysis import (
    _splice, ablation_check, ablation_deltas, ablation_validation, average_ranks, best_matches, choose_checkpoints,
    match_latents, random_rotation,
    class_counts, class_names, classify, indirect_effects, logit_diff, pair_effects, pair_tokens, rel_dec, rel_ie,
    site_codes, spearman, spliced_logit_diff, top_latents)
from dyntrack.crosscoding.model import Crosscoder, CrosscoderConfig, fold_scales
from dyntrack.data.grammar import load_lexicon
from dyntrack.data.tasks import MinimalPair, encode, make_minimal_pairs
from dyntrack.models.presets import build_model, model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEX = load_lexicon()


def word_tokenizer(eos: str | None = "<eos>") -> PreTrainedTokenizerFast:
    "Word-level tokenizer over the lexicon (lower-cased); its end-of-text token is the prefix `encode` puts first."
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    for w in sorted({LEX.info(f).word.lower() for r in LEX.rows for f in r.forms if f != "-"}): vocab.setdefault(w, len(vocab))
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    specials = dict(eos_token=eos) if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", **specials)


TOK = word_tokenizer()


def random_crosscoder(n_checkpoints: int, d_model: int, n_latents: int, seed: int = 0, kind: str = "l1") -> Crosscoder:
    "An untrained crosscoder with random, uneven decoder norms and a random b_dec, in eval mode."
    cc = Crosscoder(CrosscoderConfig(d_model=d_model, n_checkpoints=n_checkpoints, d_latents=n_latents, kind=kind,
                                     k=max(1, n_latents // 4), k_start=max(1, n_latents // 4), seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.W_dec.mul_(10 * torch.rand(n_latents, n_checkpoints, 1, generator=g))
        cc.W_enc.mul_(10)
        cc.b_dec.copy_(0.1 * torch.randn(n_checkpoints, d_model, generator=g))
    return cc.eval()


class Add(nn.Module):
    def __init__(self, d): super().__init__(); self.shift = nn.Parameter(torch.randn(d))
    def forward(self, hidden, *args, **kwargs): return hidden + self.shift

class RunningMean(nn.Module):
    def forward(self, hidden, *args, **kwargs):
        return hidden.cumsum(1) / torch.arange(1, hidden.shape[1] + 1, device=hidden.device)[:, None]

class Square(nn.Module):
    def forward(self, hidden, *args, **kwargs): return hidden * hidden

class ToyLM(nn.Module):
    "Embeddings, then blocks [Add, `middle`, Add] at `transformer.h` (as GPT-2's), then logits h W_U; the site is block 1's input."
    def __init__(self, d: int, middle: nn.Module, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.W_U = nn.Embedding(len(TOK), d), nn.Parameter(torch.randn(d, len(TOK)))
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([Add(d), middle, Add(d)])
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids)
        for block in self.transformer.h: hidden = block(hidden)
        return SimpleNamespace(logits=hidden @ self.W_U)


@pytest.fixture(scope="module")
def pairs():
    return make_minimal_pairs("pp_attractor_agreement", 3, seed=5) + make_minimal_pairs("simple_agreement", 2, seed=5)


def tiny_lm(arch: str, seed: int):
    config = model_config(arch, "tiny", vocab_size=len(TOK), max_seq_len=32, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=32)
    return build_model(config, seed=seed).eval()


def u_of(model: ToyLM, t) -> torch.Tensor:
    return (model.W_U[:, t.bad] - model.W_U[:, t.good]).detach()


# --- RelDec --------------------------------------------------------------------------------------------------

def test_rel_dec_known_shares_and_errors():
    shares = rel_dec(torch.tensor([[1.0, 3.0], [2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    assert shares.dtype == torch.float64
    torch.testing.assert_close(shares[:, 1], torch.tensor([0.75, 0.0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(rel_dec(torch.tensor([[1.0, 2.0, 1.0]])), torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64))
    for bad, words in ((torch.ones(3), "shape"), (torch.ones(3, 1), "shape"), (-torch.ones(2, 2), "≥ 0"),
                       (torch.tensor([[math.inf, 1.0]]), "finite")):
        with pytest.raises(ParamError, match=words): rel_dec(bad)


# --- metric and splice ---------------------------------------------------------------------------------------

def test_pair_tokens_prefix_and_first_difference(pairs):
    for pair in pairs:
        t = pair_tokens(TOK, pair)
        good, bad = encode(TOK, [pair.good, pair.bad])
        n = len(t.prefix)
        assert t.prefix == good[:n] == bad[:n] and good[n] == t.good != t.bad == bad[n] and t.prefix[0] == 0
        assert n == pair.word + 1  # word-level tokens: the prefix token, then the words before the differing one


def test_pair_tokens_refuses_pairs_without_a_position():
    bare = word_tokenizer(eos=None)  # no prefix token: a pair differing in its first word has nothing to condition on
    with pytest.raises(ParamError, match="share a token prefix"): pair_tokens(bare, MinimalPair("dogs run", "cats run", "x"))
    assert pair_tokens(TOK, MinimalPair("dogs run", "cats run", "x")).prefix == [0]
    for good, bad in (("the dog", "the dog runs"), ("the dog", "the dog")):
        with pytest.raises(ParamError, match=good): pair_tokens(TOK, MinimalPair(good, bad, "x"))


def test_logit_diff_by_hand(pairs):
    model = ToyLM(6, RunningMean())
    t = pair_tokens(TOK, pairs[0])
    with torch.no_grad():
        logits = model(torch.tensor([t.prefix])).logits[0, -1]
        assert float(logit_diff(model, t)) == pytest.approx(float(logits[t.bad] - logits[t.good]), abs=1e-6)
        assert logit_diff(model, t, batch=3).shape == (3,)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_splice_clean_activation_gives_the_clean_metric(pairs, arch):
    model, t = tiny_lm(arch, 0), pair_tokens(TOK, pairs[0])
    cc = random_crosscoder(2, 16, 8)
    x = site_codes([model, model], cc, 1, t)[0][:, 0]  # [n_pos, d_model]
    with torch.no_grad():
        torch.testing.assert_close(spliced_logit_diff(model, 1, t, x[None]), logit_diff(model, t))
        assert not torch.allclose(spliced_logit_diff(model, 1, t, x[None] * 0), logit_diff(model, t))
        # drop_first=0 replaces the prefix token's activation too
        full = site_codes([model, model], cc, 1, t, drop_first=0)[0][:, 0]
        torch.testing.assert_close(spliced_logit_diff(model, 1, t, full[None], drop_first=0), logit_diff(model, t))
    assert not blocks(model)[1]._forward_pre_hooks


def test_splice_hook_reads_and_writes_the_keyword_form():
    hidden, x_site = torch.zeros(2, 4, 3), torch.ones(2, 3, 3)
    args, kwargs = _splice(x_site, 1, None, (), {"hidden_states": hidden, "other": 5})
    assert args == () and kwargs["other"] == 5 and kwargs["hidden_states"][:, 0].eq(0).all() and kwargs["hidden_states"][:, 1:].eq(1).all()
    args, kwargs = _splice(x_site, 1, None, (hidden, "mask"), {"k": 1})
    assert args[1] == "mask" and kwargs == {"k": 1} and args[0].shape == (2, 4, 3) and args[0][:, 1:].eq(1).all()


# --- integrated gradients against exact toys -----------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3, 10])
def test_linear_toy_ie_is_exact_for_any_steps(pairs, steps):
    lms, cc = [ToyLM(8, RunningMean(), seed=1), ToyLM(8, RunningMean(), seed=2)], random_crosscoder(2, 8, 12, seed=2)
    t = pair_tokens(TOK, pairs[0])
    x, f = site_codes(lms, cc, 1, t)
    assert (f > 0).any()
    for c, model in enumerate(lms):
        e = pair_effects(model, cc, c, 1, t, x[:, c], f, steps=steps)
        u, n_seq = u_of(model, t), len(t.prefix)
        with torch.no_grad():
            torch.testing.assert_close(e.ie, f * (cc.W_dec[:, c] @ u) / n_seq)  # IE_i = f_i · ∂m/∂f_i
            torch.testing.assert_close(e.ie_err, (x[:, c] - cc.decode_at(f, c)) @ u / n_seq)
            at_b_dec = spliced_logit_diff(model, 1, t, cc.b_dec[c].expand(1, n_seq - 1, -1))
        assert e.m_zero == pytest.approx(float(at_b_dec), abs=1e-5)
        assert float(e.ie.sum() + e.ie_err.sum()) == pytest.approx(e.m_clean - e.m_zero, abs=1e-4)


def test_quadratic_toy_follows_the_left_riemann_rule(pairs):
    "m = u·(x_last²) + const: the N-step left sum evaluates the gradient at mean α = (N−1)/(2N), not ½."
    model, cc = ToyLM(8, Square(), seed=3), random_crosscoder(2, 8, 12, seed=4)
    t = pair_tokens(TOK, pairs[1])
    x, f = site_codes([model, ToyLM(8, Square(), seed=5)], cc, 1, t)
    with torch.no_grad():
        u, b = u_of(model, t), cc.b_dec[0]
        v = x[-1, 0] - b  # f W_dec + err at the metric's position
        err = x[-1, 0] - cc.decode_at(f, 0)[-1]
    for steps in (4, 10):
        e = pair_effects(model, cc, 0, 1, t, x[:, 0], f, steps=steps)
        mean_alpha = (steps - 1) / (2 * steps)
        with torch.no_grad():
            grad_site = 2 * u * (b + mean_alpha * v)  # [d]: the left sum's mean gradient wrt the site
            torch.testing.assert_close(e.ie[-1], f[-1] * (cc.W_dec[:, 0] @ grad_site), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(e.ie_err[-1], err @ grad_site, rtol=1e-4, atol=1e-5)
            assert e.ie[:-1].abs().max() == 0 and e.ie_err[:-1].abs().max() == 0  # only the last position matters
            gap = float(e.ie.sum() + e.ie_err.sum()) - (e.m_clean - e.m_zero)
            assert gap == pytest.approx(float(-(u * v * v).sum() / steps), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_completeness_on_tiny_real_models_converges(pairs, arch):
    lms, cc = [tiny_lm(arch, 0), tiny_lm(arch, 1)], random_crosscoder(2, 16, 24, seed=5)
    gaps = {}
    for steps in (10, 80):
        task = indirect_effects(lms, cc, 1, pairs, TOK, steps=steps)
        gaps[steps] = (task.total - (task.m_clean - task.m_zero)).abs()
        scale = (task.m_clean - task.m_zero).abs().max()
    assert gaps[10].max() < scale  # within the Riemann sum's error at 10 steps (up to ~0.7 of the range on some pairs)
    assert (gaps[80] <= gaps[10] / 4 + 1e-4).all() and gaps[80].max() < 0.15 * scale  # and that error falls as 1/steps, per pair
    torch.testing.assert_close(task.m_clean, torch.stack([torch.tensor([float(logit_diff(m, pair_tokens(TOK, p)).detach())
                                                                          for p in pairs]) for m in lms]))


# --- thresholds and means ------------------------------------------------------------------------------------

def test_task_aggregation_by_hand(pairs):
    "Threshold per (position, latent), mean over positions, then over pairs; the relative threshold scales with the spread."
    lms = [ToyLM(8, RunningMean(), seed=6), ToyLM(8, RunningMean(), seed=7)]
    cc = random_crosscoder(2, 8, 10, seed=8)
    task = indirect_effects(lms, cc, 1, pairs, TOK, threshold=0.3, rel_threshold=0.2)
    per_pair = []
    for p in pairs:
        t = pair_tokens(TOK, p)
        x, f = site_codes(lms, cc, 1, t)
        per_pair.append([pair_effects(m, cc, c, 1, t, x[:, c], f) for c, m in enumerate(lms)])
    m_clean = torch.tensor([[e[c].m_clean for e in per_pair] for c in range(2)])
    spread = m_clean.std(1, unbiased=False)
    torch.testing.assert_close(task.spread, spread)
    for c in range(2):
        def mean(threshold, node):
            values = [(e[c].ie if node == "latents" else e[c].ie_err[:, None]) for e in per_pair]
            return torch.stack([torch.where(v.abs() < threshold, 0, v).mean(0) for v in values]).mean(0)
        torch.testing.assert_close(task.ie[c], mean(0.3, "latents"))
        torch.testing.assert_close(task.ie_rel[c], mean(0.2 * float(spread[c]), "latents"))
        torch.testing.assert_close(task.ie_err[c], mean(0.3, "error")[0])
        torch.testing.assert_close(task.ie_err_rel[c], mean(0.2 * float(spread[c]), "error")[0])
    assert 0 < int((task.ie == 0).sum()) < task.ie.numel()  # the threshold bites, but not everywhere
    torch.testing.assert_close(task.total, task.m_clean - task.m_zero, atol=1e-4, rtol=1e-4)  # linear: exact


def test_drop_first_zero_attributes_the_prefix_position(pairs):
    toy = ToyLM(8, RunningMean(), seed=1)
    lms, cc = [toy, toy], random_crosscoder(2, 8, 12, seed=2)
    t = pair_tokens(TOK, pairs[0])
    x, f = site_codes(lms, cc, 1, t, drop_first=0)
    assert x.shape[0] == len(t.prefix)
    e = pair_effects(lms[0], cc, 0, 1, t, x[:, 0], f, drop_first=0)
    assert float(e.ie.sum() + e.ie_err.sum()) == pytest.approx(e.m_clean - e.m_zero, abs=1e-4)
    with pytest.raises(ParamError, match="drop_first=9"): indirect_effects(lms, cc, 1, pairs, TOK, drop_first=9)


def test_indirect_effects_errors_and_modes(pairs):
    lms, cc = [tiny_lm("gpt_neox", 0), tiny_lm("gpt_neox", 1)], random_crosscoder(2, 16, 8)
    with pytest.raises(ParamError, match="n_checkpoints=2"): indirect_effects(lms[:1], cc, 1, pairs, TOK)
    with pytest.raises(ParamError, match="layer"): indirect_effects(lms, cc, 5, pairs, TOK)
    with pytest.raises(ParamError, match="pairs"): indirect_effects(lms, cc, 1, [], TOK)
    with pytest.raises(ParamError, match="steps"): indirect_effects(lms, cc, 1, pairs, TOK, steps=0)
    expected = indirect_effects(lms, cc, 1, pairs[:2], TOK, threshold=0.0)
    lms[0].config.hidden_dropout = 0.5
    lms[0].train(); cc.train()
    again = indirect_effects(lms, cc, 1, pairs[:2], TOK, threshold=0.0)
    assert lms[0].training and not lms[1].training and cc.training  # modes restored
    torch.testing.assert_close(again.ie, expected.ie)  # effects are measured in eval mode


# --- RelIE and classes ---------------------------------------------------------------------------------------

def test_rel_ie_known_shares():
    ie = torch.tensor([[0.0, -1.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, -2.0]])  # [n_ckpt=3, h=3]
    torch.testing.assert_close(rel_ie(ie), torch.tensor([[1 / 3] * 3, [0.25, 0.75, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64))
    with pytest.raises(ParamError, match="n_checkpoints ≥ 2"): rel_ie(ie[:1])
    with pytest.raises(ParamError, match="finite"): rel_ie(torch.tensor([[math.nan], [1.0]]))


@pytest.mark.parametrize("shares,expected", [
    ([0.1, 0.9], "emerging"), ([0.9, 0.1], "discontinued"), ([0.29, 0.71], "emerging"), ([0.3, 0.7], "shared"),
    ([0.5, 0.5], "shared"), ([0.0, 1.0], "emerging"),
    ([0.8, 0.1, 0.1], "specific to checkpoint 0"), ([0.1, 0.75, 0.15], "specific to checkpoint 1"),
    ([0.05, 0.05, 0.9], "specific to checkpoint 2"), ([1 / 3, 1 / 3, 1 / 3], "shared"), ([0.3, 0.3, 0.4], "shared"),
    ([0.6, 0.4, 0.0], "pairwise shared"), ([0.0, 0.3, 0.7], "pairwise shared"), ([0.65, 0.2, 0.15], "other"),
    ([0.1, 0.2, 0.7], "other")])
def test_class_rule(shares, expected):
    assert classify(torch.tensor([shares], dtype=torch.float64)) == [expected]


def test_class_names_counts_and_errors():
    names = ["step 0", "step 4", "step 64"]
    assert class_names(3, names)[:3] == ["specific to step 0", "specific to step 4", "specific to step 64"]
    assert classify(torch.tensor([[0.1, 0.1, 0.8]]), names) == ["specific to step 64"]
    shares = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.5, 0.5], [0.95, 0.05]])
    assert class_counts(classify(shares), 2) == {"discontinued": 1, "emerging": 2, "shared": 1, "other": 0}
    with pytest.raises(ParamError, match="2 or 3"): classify(torch.full((2, 4), 0.25))
    with pytest.raises(ParamError, match="names"): class_names(3, ["a", "b"])
    with pytest.raises(ParamError, match="'shared maybe'"): class_counts(["shared maybe"], 2)


# --- ablation ------------------------------------------------------------------------------------------------

def test_ablation_of_a_linear_toy_is_minus_its_effect(pairs):
    "m linear in the site: zeroing latent i changes m by −Σ_p IE_{p,i} in every checkpoint."
    lms, cc = [ToyLM(8, RunningMean(), seed=6), ToyLM(8, RunningMean(), seed=7)], random_crosscoder(2, 8, 10, seed=8)
    delta = ablation_deltas(lms, cc, 1, pairs, TOK, range(10), chunk=3)
    expected = torch.zeros(2, 10)
    for p in pairs:
        t = pair_tokens(TOK, p)
        x, f = site_codes(lms, cc, 1, t)
        for c, m in enumerate(lms): expected[c] -= pair_effects(m, cc, c, 1, t, x[:, c], f).ie.sum(0)
    torch.testing.assert_close(delta, expected / len(pairs), atol=1e-5, rtol=1e-4)
    assert (delta != 0).any() and torch.equal(ablation_deltas(lms, cc, 1, pairs, TOK, [4, 2])[:, 1], delta[:, 2])
    with pytest.raises(ParamError, match=r"\[0, 9\]"): ablation_deltas(lms, cc, 1, pairs, TOK, [10])


def test_one_latent_of_known_effect():
    "A crosscoder whose latent 0 writes +w along u only at checkpoint 1: Δ_1 = −f_0 u·w/P, Δ_0 = 0; RelIE says 'emerging'."
    lms, cc = [ToyLM(8, RunningMean(), seed=9), ToyLM(8, RunningMean(), seed=9)], random_crosscoder(2, 8, 4, seed=10)
    pair = MinimalPair("the dog runs .", "the dog run .", "simple_agreement", 2)
    t = pair_tokens(TOK, pair)
    with torch.no_grad():
        cc.W_dec[0, 0] = 0; cc.W_dec[0, 1] = u_of(lms[1], t)
        cc.W_enc[:, :, 0] = 0; cc.b_enc[0] = 2.0  # latent 0 is 2 at every position
    delta = ablation_deltas(lms, cc, 1, [pair], TOK, [0])
    n_seq = len(t.prefix)
    assert float(delta[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(delta[1, 0]) == pytest.approx(-2.0 * float(u_of(lms[1], t) @ u_of(lms[1], t)) * (n_seq - 1) / n_seq, rel=1e-4)
    task = indirect_effects(lms, cc, 1, [pair], TOK, threshold=0.0)
    assert float(task.ie[1, 0]) == pytest.approx(-float(delta[1, 0]) / (n_seq - 1), rel=1e-4) and task.ie[0, 0] == 0
    assert classify(rel_ie(task.ie))[0] == "emerging"


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = np.random.default_rng(0)
    for n in (2, 5, 37):
        a, b = gen.integers(0, 4, n).astype(float), gen.normal(size=n)
        if np.ptp(a) == 0: continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert list(average_ranks(np.array([3.0, 1.0, 3.0, 3.0]))) == [3.0, 1.0, 3.0, 3.0]
    assert math.isnan(spearman([1, 2], [5, 5])) and spearman([1, 2, 3], [1, 5, 9]) == 1.0
    with pytest.raises(ParamError, match="NaN"): spearman([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ParamError, match=r"\[n\]"): spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_top_latents_union_prefix_and_zeros():
    ie = torch.tensor([[0.5, -3.0, 0.0, 0.0, 0.2], [0.0, 0.1, 0.0, -2.0, 0.0]])
    assert top_latents(ie, 1).tolist() == [1, 3]
    assert top_latents(ie, 2).tolist() == [1, 3, 0]  # ties among zeros never enter
    assert top_latents(ie, 10).tolist() == [1, 3, 0, 4]
    assert top_latents(torch.zeros(2, 5), 3).tolist() == []
    with pytest.raises(ParamError, match="k="): top_latents(ie, 0)


def test_ablation_check_known_answer_and_validation(pairs):
    delta = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])  # [n_ckpt, 4]: ratios 3, inf, 1, 0/0
    relie = torch.tensor([[0.3, 0.7], [0.0, 1.0], [0.6, 0.4], [0.5, 0.5]])
    reldec = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.5, 0.5]])
    check = ablation_check(torch.arange(4), delta, relie, reldec)
    torch.testing.assert_close(check.effect_share, torch.tensor([0.75, 1.0, 0.5, 0.5], dtype=torch.float64))
    assert check.rho_rel_ie == pytest.approx(spearman([0.75, 1.0, 0.5, 0.5], [0.7, 1.0, 0.4, 0.5]))
    assert check.rho_rel_dec == pytest.approx(spearman([0.75, 1.0, 0.5, 0.5], [0.1, 0.8, 0.9, 0.5]))
    with pytest.raises(ParamError, match="delta must be"): ablation_check(torch.arange(3), delta, relie, reldec)

    lms, cc = [ToyLM(8, RunningMean(), seed=6), ToyLM(8, RunningMean(), seed=7)], random_crosscoder(2, 8, 10, seed=8)
    task = indirect_effects(lms, cc, 1, pairs, TOK, threshold=0.0)
    checks = ablation_validation(lms, cc, 1, pairs, TOK, task.ie, rel_dec(cc.decoder_norms()), top_k=(2, 10))
    assert checks[2].latents.tolist() == top_latents(task.ie, 2).tolist()
    torch.testing.assert_close(checks[2].delta, ablation_deltas(lms, cc, 1, pairs, TOK, checks[2].latents))
    one = indirect_effects(lms, cc, 1, pairs[:1], TOK, threshold=0.0)  # one pair: Δ_c = −n_pos·IE_c (linear toy)
    check = ablation_validation(lms, cc, 1, pairs[:1], TOK, one.ie, rel_dec(cc.decoder_norms()), top_k=(10,))[10]
    assert check.rho_rel_ie == pytest.approx(1.0) and check.rho_rel_dec < 0.99  # the ratio ranks as RelIE, not RelDec


# --- checkpoint choice ---------------------------------------------------------------------------------------

def rows_of(acc, phenomenon="pp"):
    steps = [0] + [2**i for i in range(len(acc) - 1)]
    return [dict(step=s, tokens=s * 512, **{f"acc_{phenomenon}": a}) for s, a in zip(steps, acc)]


def sim_to_final(values):
    sim = np.eye(len(values))
    sim[:, -1] = sim[-1, :] = values
    return sim


REP = sim_to_final([0.1, 0.2, 0.4, 0.7, 0.9, 0.95, 0.99, 1.0])


@pytest.mark.parametrize("acc,pair,triplet,case", [
    ([0.5, 0.5, 0.52, 0.6, 0.8, 0.9, 0.92, 0.93], (2, 5), (2, 4, 5), "rise"),       # monotone
    ([0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0], (0, 6), (0, 3, 6), "rise"),          # linear from below chance at 0
    ([0.5, 0.52, 0.4, 0.2, 0.3, 0.6, 0.85, 0.9], (3, 6), (1, 3, 6), "dip"),         # dip below chance, then the rise
    ([0.55, 0.3, 0.3, 0.35, 0.6, 0.8, 0.9, 0.9], (3, 6), (0, 1, 6), "dip"),         # dip from the first checkpoint
    ([0.5, 0.51, 0.49, 0.5, 0.52, 0.5, 0.51, 0.5], (0, 5), (0, 3, 5), "flat"),      # no rise: representation change
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5], (0, 5), (0, 3, 5), "flat"),          # only a decline: no rise either
    ([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.95], (6, 7), (5, 6, 7), "rise"),         # a rise in the last interval
    ([0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], (1, 2), (1, 2, 3), "rise")])         # a rise in one early interval
def test_choose_checkpoints(acc, pair, triplet, case):
    choice = choose_checkpoints(rows_of(acc), "pp", REP)
    assert (choice.pair, choice.triplet, choice.case) == (pair, triplet, case)
    steps = [r["step"] for r in rows_of(acc)]
    assert choice.steps_triplet == tuple(steps[t] for t in triplet) and choice.steps_pair == tuple(steps[t] for t in pair)


def test_choose_checkpoints_degenerate_and_errors():
    flat = choose_checkpoints(rows_of([0.5] * 5), "pp", np.ones((5, 5)))
    assert (flat.pair, flat.triplet, flat.case) == ((0, 4), (0, 2, 4), "flat")
    assert choose_checkpoints(rows_of([0.5, 0.5, 1.0]), "pp", np.eye(3)).triplet == (0, 1, 2)
    with pytest.raises(ParamError, match="at least 3"): choose_checkpoints(rows_of([0.5, 1.0]), "pp", np.eye(2))
    with pytest.raises(ParamError, match=r"\[4, 4\]"): choose_checkpoints(rows_of([0.5] * 4), "pp", np.eye(3))
    with pytest.raises(ParamError, match="acc_pp"): choose_checkpoints(rows_of([0.5] * 4, "rc"), "pp", np.eye(4))
    with pytest.raises(ParamError, match="finite"): choose_checkpoints(rows_of([0.5, math.nan, 0.7]), "pp", np.eye(3))


# --- null crosscoders ----------------------------------------------------------------------------------------

def test_null_crosscoder_of_one_model_twice(pairs):
    model = tiny_lm("gpt_neox", 0)
    cc = random_crosscoder(2, 16, 16, seed=11)
    with torch.no_grad(): cc.W_dec[:, 1] = cc.W_dec[:, 0]; cc.b_dec[1] = cc.b_dec[0]
    task = indirect_effects([model, model], cc, 1, pairs, TOK, threshold=0.0)
    torch.testing.assert_close(task.ie[0], task.ie[1])
    assert set(classify(rel_ie(task.ie))) == set(classify(rel_dec(cc.decoder_norms()))) == {"shared"}


# --- the real crosscoder's variants --------------------------------------------------------------------------

def test_folded_crosscoder_keeps_rel_dec_and_completeness(pairs):
    lms, cc = [tiny_lm("gpt_neox", 0), tiny_lm("gpt_neox", 1)], random_crosscoder(2, 16, 24, seed=12)
    cc.set_scales([3.0, 0.25])
    folded = fold_scales(cc)
    torch.testing.assert_close(rel_dec(folded.decoder_norms()), rel_dec(cc.decoder_norms()))
    assert (rel_dec(cc.decoder_norms())[:, 1] - 0.5).abs().max() > 0.2  # uneven norms: the check can fail
    gaps = {}
    for steps in (20, 80):
        task = indirect_effects(lms, folded, 1, pairs, TOK, steps=steps)
        gaps[steps] = (task.total - (task.m_clean - task.m_zero)).abs()
    assert gaps[80].sum() < gaps[20].sum() / 2.5  # the folded weights on raw activations: the same 1/steps convergence


def test_batchtopk_crosscoder_with_its_inference_threshold(pairs):
    lms, cc = [tiny_lm("llama", 0), tiny_lm("llama", 1)], random_crosscoder(2, 16, 24, seed=13, kind="batchtopk")
    with torch.no_grad(): cc.threshold.fill_(0.05)  # eval mode: latents above the threshold, per token
    task = indirect_effects(lms, cc, 1, pairs, TOK, steps=40, threshold=0.0)
    scale = (task.m_clean - task.m_zero).abs().max()
    assert (task.total - (task.m_clean - task.m_zero)).abs().max() < 0.1 * scale and (task.ie != 0).any()
    delta = ablation_deltas(lms, cc, 1, pairs, TOK, top_latents(task.ie, 3))
    assert delta.shape[0] == 2 and (delta != 0).any()
    assert ablation_deltas(lms, cc, 1, pairs, TOK, []).shape == (2, 0)


# --- matching latents to another dictionary by decoder cosine ----------------------------------------------------------

def test_best_matches_finds_planted_identical_directions():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(500, 48, generator=g)
    order = torch.randperm(500, generator=g)[:40]
    idx, cos = best_matches(0.3 * target[order], target, chunk=7)  # any scale, any chunking
    assert idx.tolist() == order.tolist() and torch.allclose(cos, torch.ones(40), atol=1e-5)
    with pytest.raises(ParamError, match="must share d"): best_matches(target, torch.randn(5, 47))


def test_random_rotation_is_orthogonal_and_seeded():
    q = random_rotation(40, seed=2)
    torch.testing.assert_close(q @ q.T, torch.eye(40), atol=1e-5, rtol=0)
    assert torch.equal(q, random_rotation(40, seed=2)) and not torch.equal(q, random_rotation(40, seed=3))


def test_match_latents_planted_and_the_null_gives_chance():
    g = torch.Generator().manual_seed(4)
    h, d, m = 400, 48, 300
    targets = [torch.randn(m, d, generator=g) for _ in range(3)]
    W = torch.randn(h, 3, d, generator=g)
    norms = torch.rand(h, 3, generator=g)
    for c in range(3):  # 10 planted latents per checkpoint, at home there
        rows = slice(10 * c, 10 * c + 10)
        W[rows, c] = targets[c][50:60]
        norms[rows] = 0.1
        norms[rows, c] = 1.0
    match = match_latents(W, norms, targets, seed=0, quantile=0.95)
    assert match.home[:30].tolist() == [c for c in range(3) for _ in range(10)]
    assert match.index[:30].tolist() == list(range(50, 60)) * 3 and match.matched[:30].all()
    rate = match.matched[30:].float().mean().item()  # random latents: the same law as the null's
    assert 0.01 <= rate <= 0.10, rate  # chance 5% of 370
    assert (match.null_cosine > match.threshold).float().mean().item() == pytest.approx(0.05, abs=0.01)
    # a rotated null of a planted dictionary does not find the planted rows
    rotated = match_latents(W, norms, [t @ random_rotation(d, 9) for t in targets], seed=0, quantile=0.95)
    assert rotated.matched[:30].float().mean() < 0.2


def test_match_latents_without_a_target_leaves_latents_unmatched():
    W, norms = torch.randn(20, 2, 8), torch.rand(20, 2)
    match = match_latents(W, norms, [torch.randn(30, 8), None])
    away = match.home == 1
    assert (match.index[away] == -1).all() and match.cosine[away].isnan().all() and not match.matched[away].any()
    assert (match.index[~away] >= 0).all()
    everything_missing = match_latents(W, norms, [None, None])
    assert math.isnan(everything_missing.threshold) and not everything_missing.matched.any()
    with pytest.raises(ParamError, match="one entry per checkpoint"): match_latents(W, norms, [None])
