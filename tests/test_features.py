"Features: the labelled window (both methods' token selections), top activations against brute force, labels."
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from dyntrack.acts import residual_at, window_acts
from dyntrack.core import ParamError
from dyntrack.data.corpus import annotate, generate_documents
from dyntrack.data.embedded import labelled_tokens
from dyntrack.data.grammar import WordInfo, load_lexicon
from dyntrack.data.tokens import train_tokenizer
from dyntrack.features import (
    LABEL_FIELDS, FeatureLabel, TokenWindow, category_names, field_codes, hypergeom_log_tail, labels_at, random_positions,
    sae_encoder, token_window, top_activations, top_activations_by_latent, top_positions, top_token_summary, word_category)
from dyntrack.models.presets import build_model, model_config
from dyntrack.sae.model import SaeConfig, SparseAutoencoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 61


# --- the labelled window ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [doc for d in ("farm", "kitchen", "school") for doc in generate_documents(d, 30, seed=3)]
    return train_tokenizer(texts, 500, tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def texts():
    return {"farm": generate_documents("farm", 10, seed=9), "school": generate_documents("school", 10, seed=9)}


def sae_track_window_before(tokenizer, texts, context, n_tokens):
    "SAE-Track's window as it was built inside `sae_track.chain`: (ids, entries of the analysed positions)."
    n_seq = -(-n_tokens // (context - 1))
    ids, infos = labelled_tokens(tokenizer, texts, n_seq * context, None)
    infos = [w for i, w in enumerate(infos[: n_seq * context]) if i % context]
    return torch.tensor(ids[: n_seq * context]).view(n_seq, context), infos


def topk_window_before(tokenizer, texts, n_tokens, seq_len):
    "TopK's window as it was built inside `topk.lm`: (ids, category ids [n_seq, seq_len], names)."
    lex = load_lexicon()
    names = category_names(lex)
    index = {name: i for i, name in enumerate(names)}
    n_seq = max(1, n_tokens // seq_len)
    ids, infos = labelled_tokens(tokenizer, texts, n_seq * seq_len, lex)
    cats = [index.get(word_category(info), -1) for info in infos]
    shape = (n_seq, seq_len)
    return torch.tensor(ids[: n_seq * seq_len]).view(shape), torch.tensor(cats[: n_seq * seq_len]).view(shape), names


@pytest.mark.parametrize("context, n_tokens", [(12, 150), (12, 11), (12, 12), (9, 1), (16, 200), (2, 37)])
def test_token_window_keeps_each_methods_selection(tokenizer, texts, context, n_tokens):
    ids, infos = sae_track_window_before(tokenizer, texts, context, n_tokens)
    window = token_window(tokenizer, texts, context, n_tokens)                   # SAE-Track: drop 1, round up
    assert torch.equal(window.ids, ids) and window.infos == infos and len(window.token_ids) >= n_tokens
    ids, category, names = topk_window_before(tokenizer, texts, n_tokens, context)
    every = token_window(tokenizer, texts, context, n_tokens, drop_first=0, rounding="down")  # TopK
    assert torch.equal(every.ids, ids) and torch.equal(every.category, category.flatten()) and every.names == names
    assert torch.equal(every.token_ids, ids.flatten()) and every.ids.shape[0] == max(1, n_tokens // context)


def test_token_window_aligns_tokens_and_words(tokenizer, texts):
    window = token_window(tokenizer, texts, context=12, n_tokens=150)
    assert window.ids.shape == (14, 12) and len(window.infos) == 14 * 11 == len(window.token_ids) == len(window.category)
    assert torch.equal(window.token_ids, window.ids[:, 1:].flatten())
    first_doc = tokenizer(texts["farm"][0], add_special_tokens=False)["input_ids"]
    assert window.ids.flatten()[: len(first_doc)].tolist() == first_doc  # the first document opens the window
    eos = tokenizer.eos_token_id
    assert window.ids.flatten()[len(first_doc)] == eos                  # then EOS, then the first school document
    for t, w in zip(window.token_ids.tolist(), window.infos):
        if t == eos or not tokenizer.decode([t]).strip(): assert w is None  # EOS and a bare space lie in no word
        else: assert w is not None and tokenizer.decode([t]).strip().lower() in w.word.lower()


def test_token_window_categories_of_whole_words(tokenizer):
    text = "The dog saw a red apple."
    w = token_window(tokenizer, {"a": [text], "b": ["Anna ran."]}, context=4, n_tokens=16, drop_first=0, rounding="down")
    assert w.ids.shape == (4, 4) and w.category.shape == (16,) and w.names == sorted(w.names)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = {(x.start, x.end): word_category(x.info) for x in annotate(text)}
    whole = 0  # tokens that are a whole word carry that word's category
    for (start, end), c in zip(enc["offset_mapping"], w.category.tolist()):
        start += len(text[start:end]) - len(text[start:end].lstrip())
        if (start, end) in words:
            whole += 1
            assert w.names[c] == words[start, end], (text[start:end], w.names[c])
    assert whole >= 3 and words[(4, 7)] == "noun:animal" and words[(23, 24)] == "punct:punct"
    n = len(enc["input_ids"])
    assert w.ids.flatten()[n] == tokenizer.eos_token_id and w.category[n] == -1 and w.entries[n] is None


def test_token_window_rows_match_window_acts(tokenizer, texts):
    "Analysed position j of the window is row j of `acts.window_acts` with the same `drop_first`."
    config = model_config("gpt_neox", "tiny", vocab_size=len(tokenizer), max_seq_len=16, hidden_size=16,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = build_model(config, seed=0).eval()
    for drop_first in (0, 1, 3):
        window = token_window(tokenizer, texts, 8, 40, drop_first=drop_first)
        acts = window_acts(model, window.ids, 1, drop_first=drop_first)
        assert len(acts) == len(window.token_ids) == len(window.infos)
        j = len(acts) - 1
        row, col = divmod(j, 8 - drop_first)
        assert window.token_ids[j] == window.ids[row, col + drop_first]
        torch.testing.assert_close(acts[j], residual_at(model, window.ids[row:row + 1], 1)[0, col + drop_first])


def test_token_window_errors(tokenizer, texts):
    with pytest.raises(ParamError, match="^analysis_tokens=1000000: the texts hold .* lower analysis_tokens"):
        token_window(tokenizer, texts, 12, 10**6, param="analysis_tokens")
    with pytest.raises(ParamError, match="^entropy_tokens=1000000: .* lower entropy_tokens"):
        token_window(tokenizer, texts, 4, 10**6, drop_first=0, rounding="down", param="entropy_tokens")
    with pytest.raises(ParamError, match="^context=1"): token_window(tokenizer, texts, 1, 10)
    with pytest.raises(ParamError, match="^context=2"): token_window(tokenizer, texts, 2, 10, drop_first=2)
    with pytest.raises(ParamError, match="^rounding='half'"): token_window(tokenizer, texts, 8, 10, rounding="half")
    with pytest.raises(ParamError, match="^n_tokens=0"): token_window(tokenizer, texts, 8, 0)
    ids = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(ParamError, match="entries holds 12 entries for the 15 positions"): TokenWindow(ids, [None] * 12, [])
    with pytest.raises(ParamError, match="^drop_first=5"): TokenWindow(ids, [None] * 15, [], drop_first=5)
    with pytest.raises(ParamError, match="ids must be"): TokenWindow(ids.flatten(), [None] * 15, [])


def test_category_names_cover_every_word():
    lex = load_lexicon()
    names = category_names(lex)
    assert names == sorted(set(names)) and len(names) == len({(r.pos, r.category) for r in lex.rows})
    assert all(word_category(w.info) in names for w in annotate("The dog saw a red apple. Anna ran.") if w.info)
    assert word_category(None) is None


# --- top activations ----------------------------------------------------------------------------------------

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


def counting(n: int, seed: int, seq: int = 13) -> torch.Tensor:
    return (torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed)) + torch.arange(seq)) % VOCAB


@pytest.fixture(scope="module")
def model():
    return build_model(model_config("gpt_neox", "tiny", vocab_size=VOCAB, max_seq_len=16), seed=0).eval()


class SpellIds:
    "A tokenizer that spells token t as 't<t>'."
    def decode(self, ids): return " ".join(f"t{i}" for i in ids)


def brute_force(encode, model, batches, layer, scale=1.0, drop_first=1, site="resid_pre"):
    "Every position (batch, row, pos) of `batches` and the values of `encode` there, one pass per batch: [n], [n, L]."
    places, values = [], []
    for b, ids in enumerate(batches):
        with torch.no_grad(): h = residual_at(model, ids, layer, site=site)[:, drop_first:] * scale
        values.append(encode(h).flatten(0, 1))
        places += [(b, r, p) for r in range(ids.shape[0]) for p in range(drop_first, ids.shape[1])]
    return places, torch.cat(values)


@pytest.mark.parametrize("k, scale, drop_first, site", [(5, 1.0, 1, "resid_pre"), (1, 2.5, 0, "resid_pre"),
                                                        (7, 1.0, 3, "resid_post"), (200, 1.0, 1, "resid_pre")])
def test_top_activations_equal_brute_force(model, k, scale, drop_first, site):
    gen = torch.Generator().manual_seed(k)
    batches = [torch.randint(0, VOCAB, shape, generator=gen) for shape in ((3, 9), (1, 13), (4, 5), (2, 16))]
    directions = torch.randn(64, 5, generator=gen)
    encode = lambda h: (h @ directions).relu()
    latents = [40, 7, 3, 11, 0]
    out = top_activations_by_latent(encode, model, SpellIds(), batches, 1, latents, k=k, scale=scale,
                                    drop_first=drop_first, site=site)
    assert list(out) == latents
    places, z = brute_force(encode, model, batches, 1, scale, drop_first, site)
    for j, latent in enumerate(latents):
        order = [i for i in z[:, j].argsort(descending=True, stable=True)[:k].tolist() if z[i, j] > 0]  # by sorting everything
        hits, value_at = out[latent], dict(zip(places, z[:, j].tolist()))
        torch.testing.assert_close(torch.tensor([h.score for h in hits]), z[order, j])
        assert len({(h.batch, h.row, h.pos) for h in hits}) == len(hits)
        for h in hits:  # ties (drop_first=0: position 0 sees one token) may pick another place of the same value
            assert value_at[h.batch, h.row, h.pos] == pytest.approx(h.score, abs=1e-6)
            assert h.token == f"t{int(batches[h.batch][h.row, h.pos])}" and h.pos >= drop_first
        fired = z[:, j][z[:, j] > 0]
        distinct = fired.unique().numel() == fired.numel()
        assert distinct or drop_first == 0  # later positions see several tokens: no ties, one answer
        if distinct: assert [(h.batch, h.row, h.pos) for h in hits] == [places[i] for i in order]
    assert sum(map(len, out.values())) > 0


def test_top_activations_with_a_real_tokenizer(model):
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")))
    ids = [counting(4, 200 + i) for i in range(3)]
    direction = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    hits = top_activations(lambda h: h @ direction, model, tokenizer, ids, layer=1, latent=3, k=5, context=2)
    assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:
        token_id, row = int(ids[h.batch][h.row, h.pos]), ids[h.batch][h.row]
        assert h.token == f"w{token_id}" and h.pos >= 1
        assert h.context == " ".join(f"w{t}" for t in row[max(0, h.pos - 2):h.pos].tolist()) + f"[[w{token_id}]]"
        with torch.no_grad(): direct = (residual_at(model, ids[h.batch], 1) @ direction)[h.row, h.pos, 0]
        assert abs(direct.item() - h.score) < 1e-5


def test_sae_encoder_topk_matches_dense_latents(model):
    "One pass for many latents of a TopK SAE gives each latent's top positions of the dense latents, none invented."
    sae = SparseAutoencoder(SaeConfig(d_model=64, d_sae=256, kind="topk", k=8, n_tokens=4096, seed=1))
    ids = [counting(4, 300 + i) for i in range(3)]
    with torch.no_grad(): z = torch.cat([sae.encode(residual_at(model, i, 1)).latents[:, 1:] for i in ids])  # [12, seq', 256]
    fires = (z > 0).flatten(0, 1).sum(0)
    latents = [int(fires.argmax()), int(fires.argmin()), 17, int(fires.argmax())]  # busiest, quietest, any, a repeat
    out = top_activations_by_latent(sae_encoder(sae, latents), model, SpellIds(), ids, layer=1, latents=latents, k=6)
    assert list(out) == list(dict.fromkeys(latents))
    for latent, hits in out.items():
        column = z[..., latent].flatten()
        expected = column[column > 0].sort(descending=True).values[:6]
        torch.testing.assert_close(torch.tensor([h.score for h in hits]), expected)
        for h in hits: assert abs(z[4 * h.batch + h.row, h.pos - 1, latent].item() - h.score) < 1e-6
    with pytest.raises(ParamError, match="latent=256"): sae_encoder(sae, [3, 256])


def test_top_activations_edge_cases(model):
    ids = [counting(2, 1)]
    silent = top_activations_by_latent(lambda h: -h[..., :2].abs(), model, SpellIds(), ids, 1, latents=[0, 1])
    assert silent == {0: [], 1: []}                                              # never positive: no hits
    assert top_activations_by_latent(lambda h: h[..., :1], model, SpellIds(), [], 1, latents=[5]) == {5: []}
    with pytest.raises(ParamError, match=r"len\(latents\)=3"):
        top_activations_by_latent(lambda h: h[..., :2], model, SpellIds(), ids, 1, latents=[0, 1, 2])
    with pytest.raises(ParamError, match="^k=0"): top_activations(lambda h: h[..., :1], model, SpellIds(), ids, 1, 0, k=0)
    with pytest.raises(ParamError, match="^drop_first=13"):
        top_activations(lambda h: h[..., :1], model, SpellIds(), ids, 1, 0, drop_first=13)


def test_top_token_summary(tokenizer, texts):
    window = token_window(tokenizer, texts, context=12, n_tokens=50)
    a, b, c = [t for t in dict.fromkeys(window.token_ids.tolist()) if tokenizer.decode([t]).strip()][:3]
    summary = top_token_summary(tokenizer, torch.tensor([b, a, a, c, a]), torch.tensor([1.0, 2.0, 1.0, 0.0, 0.5]))
    assert summary == f"{tokenizer.decode([a]).strip()}×3, {tokenizer.decode([b]).strip()}×1"  # c is silent
    assert top_token_summary(tokenizer, torch.tensor([a, b]), torch.zeros(2)) == "(silent)"
    assert top_token_summary(tokenizer, torch.tensor([a, b, c]), torch.ones(3), n=2).count("×") == 2


# --- labels -------------------------------------------------------------------------------------------------

def info(lemma, pos="noun", category="animal", number="sg", word=None):
    return WordInfo(word or lemma, lemma, pos, category, number, None, 1, None, ())


LEXICON = ([info(f"n{i}", "noun", ("animal", "food", "tool", "place")[i % 4], "sg" if i % 3 else "pl") for i in range(24)]
           + [info(f"v{i}", "verb", ("motion", "ingest")[i % 2], None) for i in range(12)]
           + [info("the", "det", "article", None), info("a", "det", "article", "sg")])


def random_window(n: int, seed: int, none_share: float = 0.1) -> list:
    "`n` analysed positions, each a random lexicon entry (None with probability `none_share`)."
    rng = random.Random(seed)
    return [rng.choice(LEXICON) if rng.random() >= none_share else None for _ in range(n)]


def positions(infos, test, k=25):
    return torch.tensor([i for i, w in enumerate(infos) if w is not None and test(w)][:k])


def kinds_values(labels): return [(label.kind, label.value) for label in labels]


def test_hypergeom_log_tail_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    n_with = torch.tensor([0, 1, 17, 430, 999, 1000])
    tail = hypergeom_log_tail(1000, 25, n_with)
    for c in range(26):
        for v, K in enumerate(n_with.tolist()):
            want = stats.hypergeom.sf(c - 1, 1000, K, 25)
            assert math.isclose(tail[c, v].exp().item(), want, rel_tol=1e-9, abs_tol=1e-300), (c, K)


def test_field_codes_cover_every_field():
    infos = random_window(300, 0)
    for field in LABEL_FIELDS:
        codes = field_codes(infos, field)
        for w, c in zip(infos, codes.codes.tolist()):
            value = None if w is None else getattr(w, field)
            assert (c == -1) if value is None else codes.values[c] == str(value)


def test_labels_known_answers():
    "Nouns, one lemma, two lemmas of one category, a concept of one lemma, silent features: each gets its class."
    infos = random_window(3000, 1)
    top = torch.stack([positions(infos, lambda w: w.pos == "noun"), positions(infos, lambda w: w.category == "food"),
                       positions(infos, lambda w: w.lemma == "v3"), positions(infos, lambda w: w.lemma in ("n0", "n4")),
                       positions(infos, lambda w: w.lemma == "n1")])
    values = torch.ones(top.shape)
    labels = labels_at(values, top, infos, min_purity=0.0)
    assert kinds_values(labels) == [("concept", "pos=noun"), ("concept", "category=food"), ("token", "v3"),
                                    ("token", "n0"), ("token", "n1")]  # two or one word of a category: token-level
    assert labels[2].purity == 1.0 and labels[2].base_rate == pytest.approx(sum(w is not None and w.lemma == "v3" for w in infos) / 3000)
    assert kinds_values(labels_at(values, top, infos, min_lemmas=1, min_purity=0.0))[3] == ("concept", "category=animal")
    values[0, -1] = 0.0        # fires at 24 of its 25 top positions
    values[1] = 0.0            # never fires
    assert [label.kind for label in labels_at(values, top, infos)][:2] == ["silent", "silent"]
    assert labels_at(values, top, infos)[0] == FeatureLabel("silent", "")


def test_random_and_shuffled_features_get_no_label():
    "Random top positions prefer nothing: the false-label rate stays at about the level or below."
    infos = random_window(4000, 2)
    gen = torch.Generator().manual_seed(0)
    top = torch.stack([torch.randperm(len(infos), generator=gen)[:25] for _ in range(3000)])
    for level in (0.01, 0.05):
        labels = labels_at(torch.ones(top.shape), top, infos, min_purity=0.0, level=level)
        assert sum(label.kind != "unlabelled" for label in labels) / len(labels) <= level
    nouns = positions(infos, lambda w: w.category == "animal")[None]  # a concept feature, then the same with shuffled labels
    shuffled = [infos[i] for i in torch.randperm(len(infos), generator=gen).tolist()]
    assert labels_at(torch.ones(1, 25), nouns, infos, min_purity=0.0)[0].value == "category=animal"
    assert labels_at(torch.ones(1, 25), nouns, shuffled, min_purity=0.0)[0].kind == "unlabelled"


def test_a_common_value_at_its_base_rate_gets_no_label():
    "The defect a raw majority had: number=sg on 70% of the window is no label for a feature holding it 70% of the time."
    singular = [info(f"s{i}", "noun", ("animal", "food")[i % 2], "sg") for i in range(20)]
    plural = [info(f"p{i}", "noun", ("animal", "food")[i % 2], "pl") for i in range(20)]
    rng = random.Random(3)
    infos = [rng.choice(singular) if rng.random() < 0.7 else rng.choice(plural) for _ in range(5000)]
    sg, pl = positions(infos, lambda w: w.number == "sg", 5000), positions(infos, lambda w: w.number == "pl", 5000)
    top = torch.stack([torch.cat([sg[25 * j: 25 * j + 18], pl[25 * j: 25 * j + 7]]) for j in range(40)])  # 72% sg each
    assert {label.kind for label in labels_at(torch.ones(top.shape), top, infos)} == {"unlabelled"}
    all_sg = labels_at(torch.ones(1, 25), sg[None, :25], infos)[0]  # 25 of 25 against 70% is a claim: p ≈ 0.7^25
    assert all_sg.value == "number=sg" and all_sg.p_value == pytest.approx(all_sg.base_rate ** 25, rel=0.1)
    assert labels_at(torch.ones(1, 25), pl[None, :25], infos)[0].value == "number=pl"  # the rarer value is


def test_labels_at_errors_and_seeds():
    infos = random_window(500, 4)
    top = torch.stack([torch.randperm(500, generator=torch.Generator().manual_seed(s))[:10] for s in range(20)])
    values = torch.ones(top.shape)
    assert labels_at(values, top, infos, seed=1) == labels_at(values, top, infos, seed=1)
    with pytest.raises(ParamError, match="top_values"): labels_at(values[:, :3], top, infos)
    with pytest.raises(ParamError, match="^level="): labels_at(values, top, infos, level=0.0)
    with pytest.raises(ParamError, match="^min_purity="): labels_at(values, top, infos, min_purity=2)
    with pytest.raises(ParamError, match="^n_shuffles="): labels_at(values, top, infos, n_shuffles=0)
