"Residual-stream harvesting: equality with output_hidden_states, early stop, the shuffled buffers over one and several checkpoints, normalisation."
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from dyntrack.acts import (SITES, ActivationBuffer, MultiCheckpointBuffer, blocks, checkpoint_scales, estimate_scale,
                           estimate_scales, fold_scale, residual_at, residuals_at, window_acts)
from dyntrack.core import ParamError
from dyntrack.models.presets import build_model, model_config

VOCAB, N_LAYERS = 61, 4


def tiny_model(arch: str) -> nn.Module:
    if arch == "gpt2":
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=48, n_layer=N_LAYERS, n_head=2, vocab_size=VOCAB, n_positions=32,
                         bos_token_id=0, eos_token_id=0)
        return AutoModelForCausalLM.from_config(cfg).eval()
    cfg = model_config(arch, "tiny", vocab_size=VOCAB, max_seq_len=32, num_hidden_layers=N_LAYERS)
    return build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module", params=["gpt_neox", "llama", "gpt2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def neox():
    return tiny_model("gpt_neox")


def token_batches(n: int, batch: int = 2, seq: int = 9, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(n)]


def hidden_states(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states


# --- single and multiple sites -----------------------------------------------------------------------------

def test_blocks(model):
    assert len(blocks(model)) == N_LAYERS and isinstance(blocks(model), nn.ModuleList)


def test_residual_equals_hidden_states(model):
    ids = token_batches(1, batch=3, seq=11)[0]
    ref = hidden_states(model, ids)
    for layer in range(N_LAYERS):
        got = residual_at(model, ids, layer)
        assert got.shape == (3, 11, model.config.hidden_size) and not got.requires_grad
        torch.testing.assert_close(got, ref[layer])


def test_residual_with_padding_mask(model):
    ids = token_batches(1, batch=2, seq=8)[0]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding on the second sequence
    ref = hidden_states(model, ids, mask)
    torch.testing.assert_close(residual_at(model, ids, 2, attention_mask=mask), ref[2])


def test_residuals_at_several_sites(model):
    ids = token_batches(1)[0]
    ref = hidden_states(model, ids)
    got = residuals_at(model, ids, [3, 1, 1])
    assert list(got) == [1, 3]
    for layer, acts in got.items():
        torch.testing.assert_close(acts, ref[layer])


def count_block_calls(model) -> tuple[list[int], list]:
    calls = [0] * N_LAYERS
    def bump(i, *_): calls[i] += 1
    handles = [b.register_forward_hook(lambda *a, i=i: bump(i)) for i, b in enumerate(blocks(model))]
    return calls, handles


def test_early_stop_skips_later_blocks(model):
    calls, handles = count_block_calls(model)
    head_calls = []
    handles.append(model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        ids = token_batches(1)[0]
        residual_at(model, ids, 1)
        assert calls == [1, 0, 0, 0] and head_calls == []
        residuals_at(model, ids, [0, 2])  # stops after the deepest requested site
        assert calls == [2, 1, 0, 0] and head_calls == []
        residual_at(model, ids, 0)
        assert calls == [2, 1, 0, 0]
    finally:
        for h in handles: h.remove()
    # no capture hook is left behind
    n_hooks = sum(len(b._forward_pre_hooks) for b in blocks(model))
    assert n_hooks == 0


def test_layer_out_of_range(model):
    ids = token_batches(1)[0]
    for bad in (-1, N_LAYERS, 99):
        with pytest.raises(ParamError, match=r"layer must be in \[0, n_layers-1\] = \[0, 3\]"):
            residual_at(model, ids, bad)
    with pytest.raises(ParamError, match="layer must be in"):
        residuals_at(model, ids, [0, N_LAYERS])
    with pytest.raises(ParamError, match="layer must be in"):
        ActivationBuffer(model, N_LAYERS, token_batches(1))
    assert sum(len(b._forward_pre_hooks) for b in blocks(model)) == 0


def test_unsupported_architecture():
    with pytest.raises(ParamError, match=r"Sequential is not supported.*GPT-NeoX.*Llama.*GPT-2"):
        blocks(nn.Sequential(nn.Linear(2, 2)))


def test_wrapped_model():
    model = tiny_model("gpt_neox")
    wrapped = nn.DataParallel(model)  # moves `model` to cuda:0 when CUDA is available
    ids = token_batches(1)[0]
    torch.testing.assert_close(residual_at(wrapped, ids, 2), residual_at(model, ids, 2))


# --- the buffer --------------------------------------------------------------------------------------------

def test_buffer_yields_every_activation_once_without_first_positions(neox):
    batches = token_batches(5, batch=2, seq=9)  # 5 × 2 × 8 = 80 rows after drop_first=1
    buf = ActivationBuffer(neox, 2, batches, buffer_tokens=24, batch_size=8, seed=1)
    out = list(buf)
    assert [o.shape for o in out] == [(8, 64)] * 10 and buf.n_tokens == 80 and buf.n_sequences == 10
    full = [residual_at(neox, b, 2) for b in batches]                    # [2, 9, 64] each
    expected = torch.cat([f[:, 1:].reshape(-1, 64) for f in full])       # [80, 64]
    firsts = torch.cat([f[:, 0] for f in full])                          # [10, 64]
    got = torch.cat(out)
    match = torch.cdist(got, expected).argmin(1)
    assert sorted(match.tolist()) == list(range(80))
    torch.testing.assert_close(got, expected[match])
    assert torch.cdist(got, firsts).min() > 1e-3  # no position-0 (BOS) activation
    # half refill: the 2nd output half-buffer (rows 16..31) mixes survivors of batches 0-1 with new batch 2
    source_batch = match // 16
    assert (source_batch[16:32] < 2).any() and (source_batch[16:32] == 2).any()
    assert match.tolist() != sorted(match.tolist())


def test_buffer_drop_first_matches_manual_slice(neox):
    batches = token_batches(2, batch=1, seq=6)
    for drop in (0, 2):
        buf = ActivationBuffer(neox, 1, batches, buffer_tokens=100, batch_size=1, drop_first=drop)
        got = torch.cat(list(buf))
        expected = torch.cat([residual_at(neox, b, 1)[0, drop:] for b in batches])
        assert got.shape[0] == buf.n_tokens == 2 * (6 - drop)
        assert sorted(torch.cdist(got, expected).argmin(1).tolist()) == list(range(got.shape[0]))
    with pytest.raises(ParamError, match="drop_first=6"):
        list(ActivationBuffer(neox, 1, batches, buffer_tokens=100, batch_size=1, drop_first=6))


def test_buffer_deterministic(neox):
    batches = token_batches(4)
    run = lambda seed: list(ActivationBuffer(neox, 1, batches, buffer_tokens=20, batch_size=4, seed=seed))
    a, b, c = run(0), run(0), run(1)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    sort_rows = lambda t: t[torch.argsort(t[:, 0])]
    torch.testing.assert_close(sort_rows(torch.cat(a)), sort_rows(torch.cat(c)))  # same rows, other order


def test_buffer_streams_lazily_from_an_iterator(neox):
    consumed = []
    def source():
        for i, b in enumerate(token_batches(50)):
            consumed.append(i)
            yield b
    buf = ActivationBuffer(neox, 1, source(), buffer_tokens=32, batch_size=8, dtype=torch.bfloat16)
    first = next(iter(buf))
    assert first.shape == (8, 64) and first.dtype == torch.bfloat16
    assert len(consumed) == 2 and buf.n_tokens == 32  # only what one buffer needs


def test_buffer_empty_source_yields_nothing(neox):
    buf = ActivationBuffer(neox, 1, [], buffer_tokens=16, batch_size=4)
    assert list(buf) == [] and buf.n_tokens == 0
    few = list(ActivationBuffer(neox, 1, token_batches(1)[:1], buffer_tokens=64, batch_size=4))
    assert few and all(b.shape[0] == 4 for b in few)  # a source shorter than the buffer: full batches only


def test_buffer_reads_its_site(neox):
    batches = token_batches(3)
    post = list(ActivationBuffer(neox, 1, batches, buffer_tokens=16, batch_size=4, seed=2, site="resid_post"))
    pre = list(ActivationBuffer(neox, 2, batches, buffer_tokens=16, batch_size=4, seed=2))
    assert len(post) == len(pre) == 12 and all(torch.equal(a, b) for a, b in zip(post, pre))  # leaving 1 = entering 2
    last = torch.cat(list(ActivationBuffer(neox, 3, batches, buffer_tokens=100, batch_size=48, site="resid_post")))
    ref = torch.cat([hidden_states(neox, b)[4][:, 1:].reshape(-1, 64) for b in batches])  # after the final norm
    with torch.no_grad(): normed = neox.gpt_neox.final_layer_norm(last)
    match = torch.cdist(normed, ref).argmin(1)
    assert sorted(match.tolist()) == list(range(48))
    torch.testing.assert_close(normed, ref[match])
    with pytest.raises(ParamError, match=r"site='mlp_out' is not allowed.*resid_pre.*resid_post"):
        ActivationBuffer(neox, 1, batches, site="mlp_out")


def test_buffer_parameter_errors(neox):
    with pytest.raises(ParamError, match="buffer_tokens"):
        ActivationBuffer(neox, 0, [], buffer_tokens=4, batch_size=8)
    with pytest.raises(ParamError, match="batch_size"):
        ActivationBuffer(neox, 0, [], batch_size=0)


# --- normalisation -----------------------------------------------------------------------------------------

def test_scale_gives_mean_norm_sqrt_d(neox):
    acts = torch.cat(list(ActivationBuffer(neox, 3, token_batches(3), buffer_tokens=16, batch_size=4)))
    scale = estimate_scale(acts)
    assert (acts * scale).norm(dim=-1).mean().item() == pytest.approx(64**0.5, rel=1e-5)
    assert estimate_scale(acts.split(5)) == pytest.approx(scale, rel=1e-12)
    buf_scale = estimate_scale(ActivationBuffer(neox, 3, token_batches(3), buffer_tokens=16, batch_size=4))
    assert buf_scale == pytest.approx(scale, rel=1e-6)
    assert estimate_scale(acts.split(4), max_batches=2) == pytest.approx(estimate_scale(acts[:8]), rel=1e-12)
    with pytest.raises(ParamError, match="non-zero"):
        estimate_scale(torch.zeros(3, 8))


@pytest.mark.parametrize("site", SITES)
def test_estimate_scales_equal_estimate_scale_per_layer(model, site):
    batches = token_batches(4, batch=3, seq=10, seed=5)
    for drop, max_batches in [(0, None), (1, None), (2, 3)]:
        got = estimate_scales(model, [3, 0, 2, 0], batches, site=site, drop_first=drop, max_batches=max_batches)
        assert list(got) == [0, 2, 3]
        for layer, scale in got.items():
            rows = (window_acts(model, b, layer, drop_first=drop, site=site) for b in batches)
            assert scale == estimate_scale(rows, max_batches=max_batches)  # the same rows, the same float64 sums
    scale = estimate_scales(model, [1], batches, site)[1]
    scaled = window_acts(model, torch.cat(batches), 1, scale=scale, site=site)
    assert scaled.norm(dim=-1).mean().item() == pytest.approx(model.config.hidden_size**0.5, rel=1e-5)


def test_estimate_scales_one_stopped_pass_per_batch(neox):
    calls, handles = count_block_calls(neox)
    try:
        estimate_scales(neox, [0, 2], token_batches(3))
        assert calls == [3, 3, 0, 0]  # block 2's input is the deepest site: it never runs
        estimate_scales(neox, [0, 2], token_batches(2), site="resid_post")
        assert calls == [5, 5, 2, 0]
    finally:
        for h in handles: h.remove()


def test_estimate_scales_errors(neox):
    batches = token_batches(2, seq=5)
    for kw, words in [(dict(layers=[]), "layers must name at least one block"),
                      (dict(layers=[0, 4]), r"layer must be in \[0, n_layers-1\] = \[0, 3\]"),
                      (dict(site="resid_mid"), "site='resid_mid'"), (dict(drop_first=5), r"drop_first=5 .*\[0, 4\]"),
                      (dict(drop_first=-1), "drop_first=-1"), (dict(token_batches=[]), "at least one non-zero"),
                      (dict(max_batches=0), "at least one non-zero")]:
        with pytest.raises(ParamError, match=words):
            estimate_scales(**{**dict(model=neox, layers=[1], token_batches=batches), **kw})


def test_checkpoint_scales_read_one_iterator_for_every_model(neox):
    models = [neox, tiny_model("llama")]
    batches = token_batches(4)
    got = checkpoint_scales(models, 2, iter(batches), site="resid_post", max_batches=3)
    assert got == [estimate_scales(m, [2], batches[:3], site="resid_post")[2] for m in models]
    assert got[0] != got[1]


# --- the buffer over several checkpoints -------------------------------------------------------------------

def tiny_llama(seed: int, **overrides) -> nn.Module:
    cfg = model_config("llama", "tiny", vocab_size=VOCAB, max_seq_len=32, **{"num_hidden_layers": N_LAYERS, **overrides})
    return build_model(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def pair():
    return [tiny_llama(0), tiny_llama(1)]


def test_multi_rows_are_one_position_in_every_checkpoint(pair):
    batches, scales = token_batches(5, batch=2, seq=9), [0.5, 3.0]  # 5 × 2 × 8 = 80 positions
    buf = MultiCheckpointBuffer(pair, 2, batches, scales, buffer_tokens=24, batch_size=8, seed=1)
    out = list(buf)
    assert [o.shape for o in out] == [(8, 2, 64)] * 10 and buf.n_tokens == 80 and buf.n_sequences == 10
    per_model = [torch.cat([residual_at(m, b, 2)[:, 1:].reshape(-1, 64) for b in batches]) for m in pair]  # [80, 64] each
    for m, ref in zip(pair, per_model):
        torch.testing.assert_close(ref, torch.cat([hidden_states(m, b)[2][:, 1:].reshape(-1, 64) for b in batches]))
    expected = torch.stack([ref * s for ref, s in zip(per_model, scales)], dim=1)  # [80, 2, 64]: row p = position p
    got = torch.cat(out)
    match = torch.cdist(got.flatten(1), expected.flatten(1)).argmin(1)
    assert sorted(match.tolist()) == list(range(80))  # every position exactly once
    assert torch.equal(got, expected[match])  # both checkpoints of a row: the same position, each × its own scale
    assert match.tolist() != sorted(match.tolist())


def test_multi_order_fixed_by_seed_and_shared_with_the_single_buffer(pair):
    batches = token_batches(4)
    run = lambda seed: torch.cat(list(MultiCheckpointBuffer(pair, 1, batches, [2.0, 0.25], 20, 4, seed=seed)))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    sort_rows = lambda t: t[torch.argsort(t[:, 0, 0])]
    assert torch.equal(sort_rows(a), sort_rows(c))  # the same rows in another order
    single = [torch.cat(list(ActivationBuffer(m, 1, batches, 20, 4, seed=0))) for m in pair]
    assert torch.equal(a[:, 0], single[0] * 2.0) and torch.equal(a[:, 1], single[1] * 0.25)
    one = torch.cat(list(MultiCheckpointBuffer(pair[:1], 1, batches, [1.0], 20, 4, seed=0)))
    assert one.shape == (single[0].shape[0], 1, 64) and torch.equal(one[:, 0], single[0])


def test_multi_site_dtype_device_and_drop_first(pair):
    batches = token_batches(3, seq=7)
    post = torch.cat(list(MultiCheckpointBuffer(pair, 0, batches, [1.0, 1.0], 100, 42, site="resid_post", drop_first=0)))
    pre = torch.cat(list(MultiCheckpointBuffer(pair, 1, batches, [1.0, 1.0], 100, 42, drop_first=0)))
    assert post.shape == (3 * 2 * 7, 2, 64) and torch.equal(post, pre)
    buf = MultiCheckpointBuffer(pair, 1, iter(batches), [1.0, 1.0], 12, 4, dtype=torch.bfloat16, device="cpu")
    first = next(iter(buf))
    assert first.dtype == torch.bfloat16 and first.device.type == "cpu" and (buf.n_tokens, buf.n_sequences) == (12, 2)
    with pytest.raises(ParamError, match="drop_first=7"):
        list(MultiCheckpointBuffer(pair, 1, batches, [1.0, 1.0], 12, 4, drop_first=7))


@pytest.mark.parametrize("kw, words", [
    (dict(models=[]), "models must hold at least one model"),
    (dict(scales=[1.0]), "scales must hold one scale per model: got 1 scales for 2 models"),
    (dict(scales=[1.0, 1.0, 1.0]), "got 3 scales for 2 models"),
    (dict(scales=[1.0, 0.0]), r"scales must be finite and > 0; got scales\[1\]=0.0"),
    (dict(scales=[-2.0, 1.0]), r"scales\[0\]=-2.0"),
    (dict(scales=[1.0, float("inf")]), r"scales\[1\]=inf"),
    (dict(layer=N_LAYERS), "layer must be in"),
    (dict(site="resid_mid"), "site='resid_mid'"),
    (dict(batch_size=0), "batch_size"),
])
def test_multi_parameter_errors(pair, kw, words):
    with pytest.raises(ParamError, match=words):
        MultiCheckpointBuffer(**{**dict(models=pair, layer=1, source=[], scales=[1.0, 1.0]), **kw})


def test_multi_refuses_models_of_other_widths(pair):
    narrow = tiny_llama(0, hidden_size=32)
    with pytest.raises(ParamError, match=r"models must share d_model; got d_model=\[64, 64, 32\]"):
        MultiCheckpointBuffer(pair + [narrow], 1, [], [1.0] * 3)
    shallow = tiny_llama(0, num_hidden_layers=2)
    with pytest.raises(ParamError, match=r"layer must be in \[0, n_layers-1\] = \[0, 1\]"):
        MultiCheckpointBuffer(pair + [shallow], 3, [], [1.0] * 3)


def test_fold_scale_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=gen, dtype=torch.float64) * 5
    W_enc, b_enc = torch.randn(16, 40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    W_dec, b_dec = torch.randn(40, 16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
    scale = estimate_scale(x)

    def topk_sae(x, W_enc, b_enc, W_dec, b_dec, k=5):
        pre = (x - b_dec) @ W_enc + b_enc
        f = torch.zeros_like(pre).scatter(1, pre.topk(k).indices, pre.topk(k).values.relu())
        return f, f @ W_dec + b_dec

    f_s, xhat_s = topk_sae(x * scale, W_enc, b_enc, W_dec, b_dec)
    folded = fold_scale(W_enc, b_enc, W_dec, b_dec, scale)
    f, xhat = topk_sae(x, *folded)
    torch.testing.assert_close(f, f_s)
    torch.testing.assert_close(xhat, xhat_s / scale)
    torch.testing.assert_close(folded.W_dec.norm(dim=1), W_dec.norm(dim=1) / scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_close_to_cpu_float32(neox):
    batches = token_batches(2)
    ref = torch.cat(list(ActivationBuffer(neox, 2, batches, buffer_tokens=64, batch_size=4)))
    gpu = tiny_model("gpt_neox").cuda()
    buf = ActivationBuffer(gpu, 2, batches, buffer_tokens=64, batch_size=4, dtype=torch.bfloat16)
    out = torch.cat(list(buf))
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=0.05, atol=0.05)
