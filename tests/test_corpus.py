"""Tests of dyntrack.data.corpus: lexicon, grammar, determinism, agreement ground truth, Zipf, domains, held-out rule."""
import os
import re
from collections import Counter

import numpy as np
import pytest

os.environ.setdefault("DYNTRACK_PROGRESS", "0")

from dyntrack.core import ParamError
from dyntrack.data.corpus import (
    CorpusConfig, Generator, annotate, generate_corpus, generate_documents, generate_sentences, is_heldout,
    label_offsets, story)
from dyntrack.data.grammar import compile_construction, find_data_dir, load_grammar, load_lexicon

LEX = load_lexicon()
SENTENCE_END = re.compile(r"(?<=\.) (?=[A-Z])")


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(40_000, seed=0, n_workers=1)


def check_relations(sent):
    "Every recorded dependency holds according to the lexicon alone."
    info = [LEX.info(w) for w in sent.words]
    assert all(info), sent.text
    for rel in sent.relations:
        target, ctrl = info[rel.target], [info[i] for i in rel.controllers]
        want = "pl" if len(ctrl) > 1 else ctrl[0].number
        assert target.number == want, (sent.text, rel)
        if rel.kind == "refl" and want == "sg" and ctrl[0].gender:
            assert target.gender == ctrl[0].gender, (sent.text, rel)


# ---------------------------------------------------------------- lexicon and data
def test_lexicon_labels_every_form_once():
    assert len(LEX) > 8000 and len({r.lemma for r in LEX.rows if r.pos == "noun"}) > 2500
    assert LEX.info("mice") == LEX.info("MICE") and LEX.info("mice").lemma == "mouse"
    assert (LEX.info("children").number, LEX.info("child").number) == ("pl", "sg")
    assert (LEX.info("runs").number, LEX.info("run").number, LEX.info("ran").tense) == ("sg", "pl", "past")
    assert LEX.info("Mary").gender == "f" and LEX.info("herself").gender == "f" and LEX.info("cow").category == "animal"
    assert LEX.info("flurbogorp") is None
    irregular = {r.forms[1] for r in LEX.rows if r.pos == "noun" and r.args == "irregular"}
    assert {"mice", "children", "geese", "feet", "teeth", "women"} <= irregular


def test_inflect_round_trips_and_errors():
    for word in ("dog", "mouse", "runs", "is", "was", "this", "that"):
        info = LEX.info(word)
        other = LEX.inflect(word, "pl" if info.number == "sg" else "sg")
        assert LEX.inflect(other, info.number) == word
    assert LEX.inflect("themselves", "sg", "n") == "itself" and LEX.inflect("herself", gender="m") == "himself"
    with pytest.raises(ParamError, match="not in the lexicon"):
        LEX.inflect("flurbogorp", "pl")
    with pytest.raises(ParamError, match="no form with number='pl'"):
        LEX.inflect("every", "pl")


def test_lexicon_script_is_deterministic(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_lexicon", find_data_dir() / "make_lexicon.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.OUT = tmp_path / "lexicon.tsv"
    mod.main()
    assert mod.OUT.read_bytes() == (find_data_dir() / "lexicon.tsv").read_bytes()


def test_data_dir_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="lacks .*lexicon.tsv.*data_dir="):
        find_data_dir(tmp_path)
    monkeypatch.setenv("DYNTRACK_DATA", str(find_data_dir()))
    assert find_data_dir() == find_data_dir(str(find_data_dir()))


def test_template_errors():
    classes = load_grammar().classes
    for spec, msg in [({"t": "NP.s FOO.s", "refs": {"s": "any"}}, "unknown template slot"),
                      ({"t": "NP.s", "refs": {"s": "animals"}}, "unknown class"),
                      ({"t": "NP.s", "refs": {"s": "any:plural"}}, "unknown modifier"),
                      ({"t": "NP.s V.x", "refs": {"s": "any"}}, "undeclared"),
                      ({"t": "NP.s PP.a", "refs": {"a": "any:opp=s", "s": "any"}}, "needs s first")]:
        with pytest.raises(ValueError, match=msg):
            compile_construction(spec, "bad", classes)


# ---------------------------------------------------------------- determinism
def test_documents_are_deterministic_in_the_seed():
    a = generate_documents("farm", 80, seed=3)
    assert a == generate_documents("farm", 80, seed=3)
    assert a != generate_documents("farm", 80, seed=4)
    assert generate_documents("farm", 10, seed=3) == a[:10]
    assert generate_documents("farm", 80, seed=3) != generate_documents("kitchen", 80, seed=3)


def test_corpus_independent_of_workers():
    one = generate_corpus(3000, seed=7, domains=("sport", "counting"), n_workers=1)
    two = generate_corpus(3000, seed=7, domains=("sport", "counting"), n_workers=2)
    assert one == two and list(one) == ["sport", "counting"]
    assert one["sport"] == generate_documents("sport", len(one["sport"]), seed=7)
    for docs in one.values():
        n = sum(d.count(" ") + 1 for d in docs)
        assert 3000 <= n < 3000 + max(d.count(" ") + 1 for d in docs)


def test_config_errors():
    with pytest.raises(ParamError, match="n_words_per_domain"):
        CorpusConfig(n_words_per_domain=0)
    with pytest.raises(ParamError, match="n_workers"):
        CorpusConfig(n_workers=0)
    with pytest.raises(ParamError, match="domains='mars'.*farm"):
        generate_corpus(100, domains=("mars",))
    with pytest.raises(ParamError, match="domain='mars'"):
        generate_documents("mars", 1)
    with pytest.raises(ParamError, match="construction='passive'"):
        generate_sentences("passive", 1)


# ---------------------------------------------------------------- ground truth
def test_every_construction_satisfies_its_relations():
    g = load_grammar()
    for name in g.constructions:
        sents = generate_sentences(name, 60, seed=1)
        for sent in sents:
            check_relations(sent)
        assert all(s.text.endswith(".") and s.text[0].isupper() for s in sents)
    kinds = Counter(r.kind for s in generate_sentences("reflexive", 50, seed=0) for r in s.relations)
    assert kinds["refl"] == 50


def test_phenomenon_constructions_force_structure():
    g = load_grammar()
    gen = Generator(0)
    for con in g.phenomena["pp_attractor_agreement"]:
        for _ in range(30):
            sent = gen.sentence(con, "work", heldout=None)
            check_relations(sent)
            nouns = [i for i, w in enumerate(sent.words) if LEX.info(w).pos == "noun"]
            assert LEX.info(sent.words[nouns[0]]).number != LEX.info(sent.words[nouns[-1]]).number, sent.text
    for sent in (gen.sentence(g.phenomena["irregular_agreement"][1], "farm", heldout=None) for _ in range(30)):
        subj = next(w for w in sent.words if LEX.info(w).pos == "noun")
        assert LEX.info(subj).number == "pl" and [r for r in LEX.rows if r.forms[-1] == subj][0].args == "irregular"


def test_addition_is_correct_and_counts_agree():
    value = {r.forms[0]: r.rank for r in LEX.rows if r.pos == "num"}
    for sent in generate_sentences("addition", 100, seed=0):
        a, _, b, _, c, _ = sent.words
        assert value[a] + value[b] == value[c]
    for sent in generate_sentences("count_sequence", 50, seed=0):
        check_relations(sent)
        nums = [value[w] for w in sent.words if w in value]
        assert nums == list(range(nums[0], nums[0] + len(nums)))


def test_story_pronouns_refer_back_to_the_protagonist():
    gen = Generator(5)
    for _ in range(60):
        texts = story(gen, "school", second_name=False, ending=True)
        name = texts[0].split()[0]
        gender = LEX.info(name).gender
        assert texts[-1].endswith(f" {name}.") and LEX.info(name).pos == "name"
        words = {w.lower() for t in texts[1:] for w in re.findall(r"[A-Za-z]+", t)}
        wrong = {"f": {"he", "him", "his"}, "m": {"she", "her"}}[gender]
        assert not words & wrong, texts


# ---------------------------------------------------------------- statistics
def test_zipf_rank_frequency_slope(corpus):
    counts = Counter(w.lower() for docs in corpus.values() for d in docs for w in re.findall(r"[A-Za-z]+", d))
    freqs = np.array(sorted(counts.values(), reverse=True), dtype=float)
    ranks = np.arange(1, len(freqs) + 1)
    slope = np.polyfit(np.log(ranks[9:1000]), np.log(freqs[9:1000]), 1)[0]
    assert -1.45 < slope < -0.7, slope
    assert len(counts) > 3000


def test_domains_shift_the_distribution(corpus):
    def categories(docs):
        return Counter(w.info.category for d in docs[:400] for w in annotate(d) if w.info.pos == "noun")
    farm, kitchen, history = categories(corpus["farm"]), categories(corpus["kitchen"]), categories(corpus["history"])
    share = lambda c, k: c[k] / sum(c.values())
    assert share(farm, "animal") > 2 * share(kitchen, "animal")
    assert share(kitchen, "food") > 2 * share(farm, "food") and share(kitchen, "container") > share(farm, "container")
    assert share(history, "weapon") > 4 * share(kitchen, "weapon")
    counted = {d: Counter(w.lower() for doc in docs for w in re.findall(r"[a-z]+", doc)) for d, docs in corpus.items()}
    assert counted["farm"]["barn"] > 3 * counted["work"]["barn"]
    count_words = sum(counted["counting"][w] for w in ("two", "three", "four"))
    assert count_words > 3 * sum(counted["school"][w] for w in ("two", "three", "four"))


def test_every_word_is_labelled(corpus):
    for d, docs in corpus.items():
        for doc in docs[:200]:
            assert all(w.info is not None for w in annotate(doc)), doc


def test_label_offsets():
    text = "Two mice sleep. The dogs run."
    labels = label_offsets(text, [(0, 3), (3, 6), (6, 8), (8, 14), (14, 15), (15, 19), (0, 0)])
    assert [l.word if l else None for l in labels] == ["two", "mice", "mice", "sleep", ".", "the", None]


# ---------------------------------------------------------------- held-out rule
def test_heldout_rule():
    assert is_heldout("x") == (__import__("zlib").crc32(b"x") % 50 == 0)
    share = np.mean([is_heldout(f"The dog {i} runs.") for i in range(20_000)])
    assert 0.015 < share < 0.025
    held = generate_sentences("transitive", 30, seed=2, heldout=True)
    assert all(is_heldout(s.text) for s in held) and len({s.text for s in held}) > 25
    assert not any(is_heldout(s.text) for s in generate_sentences("intransitive", 2000, seed=2))


def test_training_documents_contain_no_heldout_sentence(corpus):
    sentences = [s for docs in corpus.values() for d in docs for s in SENTENCE_END.split(d)]
    assert len(sentences) > 20_000 and all(s.endswith(".") for s in sentences)
    assert not any(is_heldout(s) for s in sentences)
