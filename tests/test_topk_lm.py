"Tests of dyntrack.topk_lm: TopK exactness, exempt blocks, annealing, gradients, save/load, generate, steering, entropies, training."
import copy, json, math, os

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dyntrack.acts import blocks, residual_at
from dyntrack.core import ParamError
from dyntrack.models import CheckpointSuite, build_model
from dyntrack.tokens import TokenShards
from dyntrack.topk_lm import (TopKAnnealing, TopKLlamaConfig, TopKLlamaForCausalLM, active_tokens, anneal_alpha,
                              category_purity, default_k, dense_config, layer_sparsity, mass_entropy,
                              semantic_entropy, set_topk_alpha, steer, token_entropy, token_mass, topk_activation,
                              topk_config, topk_mask)
from dyntrack.train import Callback, History, TrainConfig, Trainer

os.environ["DYNTRACK_PROGRESS"] = "0"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, N_LAYERS, D_MODEL = 50, 4, 64


def make_model(seed: int = 0, alpha: float = 0.0, **kw) -> TopKLlamaForCausalLM:
    model = build_model(topk_config("tiny", VOCAB, 32, num_hidden_layers=N_LAYERS, **kw), seed=seed).eval()
    set_topk_alpha(model, alpha)
    return model


def make_ids(batch: int = 3, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def block_outputs(model, ids) -> list[torch.Tensor]:
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
        outs = block_outputs(make_model(k=5, act=act), ids)
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
