"""Tests of dyntrack.data.tasks: minimal pairs (one changed word, held out, really ungrammatical, from the right domains)
and batched LM scoring."""
import os
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

os.environ.setdefault("DYNTRACK_PROGRESS", "0")

from dyntrack.core import ParamError
from dyntrack.data.corpus import annotate, generate_corpus, is_heldout
from dyntrack.data.grammar import load_grammar, load_lexicon
from dyntrack.data.tasks import (PHENOMENA, MinimalPair, encode, lambada_accuracy, make_lambada, make_minimal_pairs,
                            make_pair_sets, minimal_pair_accuracy, score_pairs, sequence_logprobs)

LEX = load_lexicon()
N = 30
SENTENCE_END = re.compile(r"(?<=\.) (?=[A-Z])")
AGREEMENT = ("simple_agreement", "irregular_agreement", "pp_attractor_agreement", "rc_attractor_agreement",
             "pp_chain_agreement", "double_rc_agreement", "long_distance_agreement", "rare_noun_agreement")
ATTRACTED = ("pp_attractor_agreement", "rc_attractor_agreement", "pp_chain_agreement", "double_rc_agreement",
             "long_distance_agreement")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair_sets():
    return make_pair_sets(N, seed=11)


def word_tokenizer(bos: str | None = None, eos: str | None = "<eos>") -> PreTrainedTokenizerFast:
    "Word-level tokenizer over the lexicon (lower-cased), with optional BOS and EOS tokens."
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, "<bos>": 3}
    for w in sorted({i.word.lower() for r in LEX.rows for i in [LEX.info(f) for f in r.forms if f != "-"]}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    specials = {k: v for k, v in dict(bos_token=bos, eos_token=eos).items() if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", **specials)


TOK = word_tokenizer()


def tiny_model(arch: str, vocab_size: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    return GPTNeoXForCausalLM(GPTNeoXConfig(**common))


# ---------------------------------------------------------------- pairs
def words(text):
    return [w.text for w in annotate(text)]


def test_pairs_differ_in_exactly_one_word_and_are_heldout(pair_sets):
    assert set(pair_sets) == set(PHENOMENA)
    for phenomenon, pairs in pair_sets.items():
        assert len(pairs) == N and len({p.good for p in pairs}) == N
        for p in pairs:
            g, b = words(p.good), words(p.bad)
            assert len(g) == len(b) and [i for i in range(len(g)) if g[i] != b[i]] == [p.word], p
            last = SENTENCE_END.split(p.good)[-1]  # a coreference chain's context sentences are training text
            assert is_heldout(last) and p.phenomenon == phenomenon
            assert all(LEX.info(w) for w in g + b) and all(LEX.info(w).standard for w in g)


def _nouns(ws, end):
    return [i for i in range(end) if LEX.info(ws[i]).pos in ("noun", "name")]


def _value(word):
    return LEX.info(word).rank  # a numeral's rank is its value


def check_agreement(phenomenon, g, good, bad, word):
    "The changed verb agrees with the first noun (the subject); in attractor phenomena the nearest noun has the other number."
    nouns = _nouns(g, word)
    subject = LEX.info(g[nouns[0]])
    assert subject.number == good.number != bad.number, (phenomenon, g)
    if phenomenon in ATTRACTED:
        attractor = LEX.info(g[nouns[-1]])  # nearest noun before the verb
        assert attractor.number == bad.number != subject.number, (phenomenon, g)
    if phenomenon == "rare_noun_agreement":
        assert [r for r in LEX.rows if r.pos == "noun" and r.lemma == subject.lemma][0].source == "pseudo"


def check_fact_pair(phenomenon, g, b, word):
    "The good value is the entity's own; the bad one is the same attribute's value of another entity; the entity is in the bucket."
    grammar = load_grammar()
    entity = LEX.info(g[0])
    facts = grammar.facts[entity.word]
    attr = next(a for a, v in facts.items() if v == g[word])
    holders = [e for e, f in grammar.facts.items() if f[attr] == b[word]]
    assert b[word] != g[word] and holders and entity.word not in holders, (g, b)
    lo, hi = grammar.fact_buckets[phenomenon.removeprefix("fact_recall_")]
    assert entity.category == "entity" and lo <= entity.rank <= hi, (g, entity)


def check_pair(phenomenon, g, b, word):
    "The good text obeys the phenomenon's rule at the changed word and the bad one breaks it, by the lexicon alone."
    if phenomenon.startswith("fact_recall_"): return check_fact_pair(phenomenon, g, b, word)
    good, bad = LEX.info(g[word]), LEX.info(b[word])
    assert good.lemma == bad.lemma and good.pos == bad.pos or good.pos == bad.pos == "num", (g, b)
    if phenomenon in ("anaphor_gender", "coreference_chain"):
        ante = LEX.info(g[_nouns(g, word)[-1]])  # the reflexive's own clause subject
        assert {good.gender, bad.gender} == {"m", "f"}
        if phenomenon == "anaphor_gender": assert good.gender == ante.gender != bad.gender
        else:  # the role noun has no gender: only the earlier sentences fix it
            name = next(LEX.info(w) for w in g if LEX.info(w).pos == "name")
            pronouns = {LEX.info(w).gender for w in g[:word] if LEX.info(w).pos == "pron"}
            assert ante.gender is None and good.gender in pronouns and bad.gender == name.gender != good.gender
        return
    if phenomenon == "pseudo_irregular_plural":  # the subject noun itself: irregular plural vs over-regularised
        row = next(r for r in LEX.rows if r.pos == "noun" and r.lemma == good.lemma)
        assert row.args == "pseudo_irregular" and (g[word], b[word]) == row.forms[1:] and not bad.standard
        return
    if phenomenon == "two_step_addition":
        *addends, total = [_value(w) for w in g[:word + 1] if LEX.info(w).pos == "num"]
        assert sum(addends) == total and abs(_value(b[word]) - total) == 1
        return
    if phenomenon == "sequence_continuation":
        terms = [_value(w) for w in g[:word + 1] if LEX.info(w).pos == "num"]
        steps = set(np.diff(terms))
        assert len(steps) == 1 and steps != {1} and _value(b[word]) == terms[-2] + 1 != terms[-1]
        return
    assert good.number != bad.number and None not in (good.number, bad.number)
    if phenomenon == "determiner_noun":  # the closest number-marked determiner or numeral before the noun
        det = next(LEX.info(g[i]) for i in range(word - 1, -1, -1) if LEX.info(g[i]).pos in ("det", "num"))
        assert det.number == good.number != bad.number
    elif phenomenon == "dialect_agreement":  # a singular village subject with the plural verb form
        subject = LEX.info(g[_nouns(g, word)[0]])
        assert subject.number == "sg" and subject.domains == ("village",) and (good.number, bad.number) == ("pl", "sg")
    elif phenomenon == "anaphor_number":
        assert LEX.info(g[_nouns(g, word)[0]]).number == good.number
    else:
        check_agreement(phenomenon, g, good, bad, word)


def test_bad_sentence_breaks_the_rule(pair_sets):
    for phenomenon, pairs in pair_sets.items():
        for p in pairs:
            check_pair(phenomenon, words(p.good), words(p.bad), p.word)


def test_pairs_come_from_their_domains(pair_sets):
    g = load_grammar()
    village = {f.lower() for r in LEX.rows if r.domains == ("village",) for f in r.forms}
    for phenomenon, pairs in pair_sets.items():
        in_village = [any(w.lower() in village for w in words(p.good)) for p in pairs]
        if phenomenon == "dialect_agreement": assert all(in_village)
        else: assert not any(in_village), phenomenon  # standard rules are never tested on the dialect
    assert g.phenomenon_domains["two_step_addition"] == g.phenomenon_domains["sequence_continuation"] == ("counting",)


def test_pair_sentences_never_appear_in_training_documents(pair_sets):
    "No good sentence anywhere; no bad one in the pair's own domains (a bad standard sentence may be good village dialect)."
    corpus = generate_corpus(20_000, seed=0, n_workers=1)
    by_domain = {d: {s for doc in docs for s in SENTENCE_END.split(doc)} for d, docs in corpus.items()}
    training = set().union(*by_domain.values())
    assert len(training) > 10_000
    domains = load_grammar().phenomenon_domains
    for phenomenon, pairs in pair_sets.items():
        own = set().union(*(by_domain[d] for d in domains[phenomenon]))
        for p in pairs:
            assert SENTENCE_END.split(p.good)[-1] not in training and SENTENCE_END.split(p.bad)[-1] not in own


def test_fact_pairs_cover_their_buckets_and_attributes():
    g = load_grammar()
    for bucket, (lo, hi) in g.fact_buckets.items():
        pairs = make_minimal_pairs(f"fact_recall_{bucket}", 200, seed=3)
        ranks = [LEX.info(words(p.good)[0]).rank for p in pairs]
        assert lo <= min(ranks) and max(ranks) <= hi and len(set(ranks)) > min(100, (hi - lo) // 2), bucket
        if hi - lo > 1000: assert np.mean(ranks) == pytest.approx((lo + hi) / 2, rel=0.1)  # uniform in the bucket
        attrs = Counter(next(a for a, v in g.facts[words(p.good)[0]].items() if v == words(p.good)[p.word]) for p in pairs)
        assert set(attrs) == set(g.spec["facts"]["attributes"]) and min(attrs.values()) == 50, attrs


def test_fact_bad_values_are_as_often_more_as_less_frequent():
    "The bad value's owner is the next entity above or below in rank, half the time each."
    g = load_grammar()
    pairs = make_minimal_pairs("fact_recall_rare", 200, seed=4)
    above = [LEX.info(words(p.good)[0]).rank % 2 == 1 for p in pairs]
    assert 0.35 < np.mean(above) < 0.65


def test_pairs_are_balanced_and_deterministic(pair_sets):
    for phenomenon in AGREEMENT + ("anaphor_number",):
        controller = [LEX.info(words(p.good)[_nouns(words(p.good), p.word)[0]]).number for p in pair_sets[phenomenon]]
        assert controller.count("sg") == N // 2, phenomenon
    genders = [LEX.info(words(p.good)[p.word]).gender for p in pair_sets["anaphor_gender"]]
    assert genders.count("m") == genders.count("f")
    assert make_minimal_pairs("determiner_noun", 10, seed=11) == pair_sets["determiner_noun"][:10]
    assert make_minimal_pairs("determiner_noun", 10, seed=12) != pair_sets["determiner_noun"][:10]
    irregular = {r.forms[1] for r in LEX.rows if r.pos == "noun" and r.args == "irregular"}
    for p in pair_sets["irregular_agreement"]:
        subject = LEX.info(words(p.good)[_nouns(words(p.good), p.word)[0]])
        assert LEX.inflect(subject.word, "pl") in irregular


def test_wrong_answers_are_as_often_larger_as_smaller():
    "In the arithmetic pairs the size of a number says nothing: a bigger-is-likelier prior scores chance."
    for phenomenon in ("two_step_addition", "sequence_continuation"):
        pairs = make_minimal_pairs(phenomenon, 200, seed=3)
        larger = np.mean([_value(words(p.bad)[p.word]) > _value(words(p.good)[p.word]) for p in pairs])
        assert 0.4 < larger < 0.6, (phenomenon, larger)


def test_errors():
    with pytest.raises(ParamError, match="phenomenon='island_effects'.*simple_agreement"):
        make_minimal_pairs("island_effects", 3)
    with pytest.raises(ParamError, match="n=-1"):
        make_minimal_pairs("anaphor_gender", -1)
    with pytest.raises(ParamError, match="batch_size"):
        score_pairs(tiny_model("gpt_neox", len(TOK)), TOK, [], batch_size=0)


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_batched_scores_equal_unbatched(pair_sets, arch):
    model = tiny_model(arch, len(TOK))
    pairs = [p for ps in pair_sets.values() for p in ps[:6]]
    one = score_pairs(model, TOK, pairs, batch_size=1)
    many = score_pairs(model, TOK, pairs, batch_size=16)
    torch.testing.assert_close(one.good, many.good, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.bad, many.bad, rtol=1e-4, atol=1e-4)
    assert one.first_diff.tolist() == [p.word + 1 for p in pairs]  # word-level: the changed word, after the prefix
    assert all(g[:i] == b[:i] and g[i] != b[i] for g, b, i in zip(one.good_ids, one.bad_ids, one.first_diff.tolist()))
    assert model.training  # scoring restores the mode it found


def test_hand_computed_logprob():
    model = tiny_model("gpt_neox", len(TOK)).eval()
    ids = encode(TOK, ["Mary"])[0]
    assert ids == [TOK.eos_token_id, TOK.convert_tokens_to_ids("mary")]  # no BOS: EOS is the prefix
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, 0].log_softmax(-1)[ids[1]]
    torch.testing.assert_close(sequence_logprobs(model, [ids])[0], expected)
    pair = MinimalPair("Mary", "John", "demo", 0)
    s = score_pairs(model, TOK, [pair])
    torch.testing.assert_close(s.good[0], expected)
    assert s.first_diff.tolist() == [1]


def test_prefix_token_choice():
    with_bos = word_tokenizer(bos="<bos>")
    assert encode(with_bos, ["The dog runs."])[0][0] == with_bos.convert_tokens_to_ids("<bos>")
    bare = word_tokenizer(eos=None)
    assert bare.bos_token_id is None and bare.eos_token_id is None
    assert encode(bare, ["The dog runs."])[0] == bare.convert_tokens_to_ids(["the", "dog", "runs", "."])
    model = tiny_model("gpt_neox", len(bare))
    s = score_pairs(model, bare, [MinimalPair("The dog runs.", "The dog run.", "demo", 2)])
    assert s.first_diff.tolist() == [2] and torch.isfinite(s.good).all()


def test_minimal_pair_accuracy_matches_scores(pair_sets):
    model = tiny_model("gpt_neox", len(TOK))
    acc = minimal_pair_accuracy(model, TOK, pair_sets, batch_size=32)
    assert set(acc) == set(PHENOMENA)
    for phenomenon, pairs in pair_sets.items():
        s = score_pairs(model, TOK, pairs)
        assert acc[phenomenon] == pytest.approx(float((s.good > s.bad).float().mean()))


# ---------------------------------------------------------------- LAMBADA-style
class Oracle(torch.nn.Module):
    "Predicts `token` at every position."
    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.vocab = token, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 1.0
        return SimpleNamespace(logits=logits)


def test_lambada_items_and_accuracy():
    items = make_lambada(30, seed=2)
    assert items == make_lambada(30, seed=2) and items != make_lambada(30, seed=3)
    for it in items:
        last = it.context.rsplit(". ", 1)[-1]
        assert is_heldout(f"{last} {it.target}.") and it.context.startswith(it.target + " ")
        assert LEX.info(it.target).pos == "name" and last.startswith("Then ")
    first = items[0]
    oracle = Oracle(TOK.convert_tokens_to_ids(first.target.lower()), len(TOK))
    assert lambada_accuracy(oracle, TOK, [first]) == 1.0
    others = [it for it in items if it.target != first.target]
    assert lambada_accuracy(oracle, TOK, others) == 0.0
    assert 0.0 <= lambada_accuracy(tiny_model("llama", len(TOK)), TOK, items, batch_size=8) <= 1.0
