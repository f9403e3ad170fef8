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
    rel_dec)
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
