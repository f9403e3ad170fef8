"Crosscoders through time: the model against a dense reference of METHODS.md §2, BatchTopK, folding, files, training through train_sae (planted data and an LM's checkpoints), exact resume, statistics."
import copy, dataclasses, json, math, subprocess, sys

import pytest
import torch
import torch.nn.functional as F

from dyntrack.acts import checkpoint_scales, residual_at
from dyntrack.core import CorruptFileError, ParamError
from dyntrack.crosscoding.model import (Crosscoder, CrosscoderConfig, batch_topk, crosscoder_stats, fold_scales, k_at,
                                        planted_checkpoints, train_crosscoder)
from dyntrack.models.presets import build_model, model_config
from dyntrack.sae.model import load_sae, save_sae
from dyntrack.sae.train import mean_lm_loss, train_sae
from dyntrack.train.trainer import lm_loss

VOCAB = 61


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_of(**kw) -> CrosscoderConfig:
    "A tiny config: 3 checkpoints of width 5, 11 latents (awkward sizes)."
    return CrosscoderConfig(**{**dict(d_model=5, n_checkpoints=3, d_latents=11, batch_size=7, n_tokens=7 * 20), **kw})


def bt_cfg(**kw) -> CrosscoderConfig:
    return cfg_of(**{**dict(kind="batchtopk", k=2, k_start=5, k_anneal_steps=3, threshold_start_step=2), **kw})


def batch(n: int = 7, m: int = 3, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, m, d, generator=torch.Generator().manual_seed(seed))


def randomised(cc: Crosscoder, seed: int = 1) -> Crosscoder:
    "`cc` with every parameter redrawn (biases non-zero, decoder rows of unequal norms)."
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cc.parameters(): p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return cc


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Interrupt(Exception): pass


def stop_at(n: int):
    def callback(step, record, sae):
        if step == n: raise Interrupt
    return callback


# --- the config ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(n_checkpoints=1), "n_checkpoints=1 is out of range"),
    (dict(d_model=0), "d_model=0 is out of range"),
    (dict(kind="relu"), "kind='relu' has the wrong type"),
    (dict(l1_coef=-1.0), "l1_coef=-1.0 is out of range"),
    (dict(l1_coef=float("inf")), "l1_coef=inf is not a finite number"),
    (dict(lr=0.0), "lr=0.0 must be > 0"),
    (dict(lr_decay_fraction=1.5), "lr_decay_fraction=1.5 is out of range"),
    (dict(l1_warmup_steps=-2), "l1_warmup_steps=-2 is out of range"),
    (dict(batch_size=0), "batch_size=0 is out of range"),
    (dict(n_tokens=3), "n_tokens=3 is out of range; allowed: [7, inf]"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0 is out of range"),
    (dict(threshold_ema=2.0), "threshold_ema=2.0 is out of range"),
    (dict(decoder_init_norm=-0.1), "decoder_init_norm=-0.1 is out of range"),
    (dict(seed=1.5), "seed=1.5 has the wrong type"),
    (dict(kind="batchtopk", k=12, k_start=12), "k=12 is out of range; allowed: [1, 11]"),
    (dict(kind="batchtopk", k=3, k_start=2), "k_start=2 is out of range; allowed: [3, 11]"),
    (dict(kind="batchtopk", k=3, k_start=0, k_anneal_steps=-1), "k_anneal_steps=-1 is out of range"),
])
def test_bad_config_values_name_the_field(kw, words):
    with pytest.raises(ParamError) as e: cfg_of(**kw)
    assert str(e.value).startswith(words), str(e.value)


def test_derived_fields_and_the_training_protocol():
    cfg = CrosscoderConfig(d_model=64, batch_size=100, n_tokens=100 * 200)
    assert (cfg.d_latents, cfg.aux_k, cfg.decoder_init_norm, cfg.l1_warmup_steps, cfg.n_steps) == (512, 32, 0.08, 10, 200)
    assert CrosscoderConfig(d_model=64, kind="batchtopk", k=4, k_start=0).decoder_init_norm == 1.0
    assert CrosscoderConfig(d_model=64, kind="batchtopk", k=4, k_start=0).k_start == 4
    assert CrosscoderConfig(d_model=64, decoder_init_norm=0.3).decoder_init_norm == 0.3
    assert CrosscoderConfig(d_model=64, l1_warmup_steps=0).l1_warmup_steps == 0
    for name in ("lr", "warmup_steps", "lr_decay_fraction", "l1_warmup_steps", "batch_size", "dead_tokens", "n_steps"):
        assert hasattr(cfg, name), name  # sae.model.TrainingConfig


# --- the model against its definition --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_shapes(kind):
    cc = Crosscoder(cfg_of() if kind == "l1" else bt_cfg())
    x = batch()
    out, f = cc(x), cc.encode(x)
    assert out.recon.shape == (7, 3, 5) and f.shape == (7, 11) and cc.decode(f).shape == (7, 3, 5)
    assert cc.decode_at(f, 2).shape == (7, 5) and cc.decoder_norms().shape == (11, 3) and cc.n_latents == 11
    assert out.code.fired().shape == (11,) and out.code.active().shape == (7,) and out.latents.shape == (7, 11)
    assert cc.scales.shape == (3,) and all(t.ndim == 0 for t in out[2:])
    with pytest.raises(ParamError, match=r"x must be \[batch, n_checkpoints=3, d_model=5\]; got shape \(7, 15\)"):
        cc(x.flatten(1))
    with pytest.raises(ParamError, match="c=3 is out of range"): cc.decode_at(f, 3)


@pytest.mark.parametrize("kind, norm", [("l1", 0.08), ("batchtopk", 1.0)])
def test_init_encoder_is_decoder_transpose_with_row_norms(kind, norm):
    cc = Crosscoder(cfg_of() if kind == "l1" else bt_cfg())
    torch.testing.assert_close(cc.W_dec.norm(dim=-1), torch.full((11, 3), norm))
    for m in range(3):
        for i in range(11): assert torch.equal(cc.W_enc[m, :, i], cc.W_dec[i, m])
    assert (cc.b_enc == 0).all() and (cc.b_dec == 0).all()
    assert not torch.equal(cc.W_dec, Crosscoder(dataclasses.replace(cc.cfg, seed=1)).W_dec)
    assert torch.equal(cc.W_dec, Crosscoder(cc.cfg).W_dec)  # the seed decides


def reference_loss(cc: Crosscoder, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    "§2's formula written out token by token: (f, x̂, Σ_m ‖x̂_m − x_m‖² mean, λ Σ_i f_i Σ_m ‖W_dec,i^m‖ mean) for ReLU."
    B, M, _ = x.shape
    f = torch.stack([F.relu(sum(x[b, m] @ cc.W_enc[m] for m in range(M)) + cc.b_enc) for b in range(B)])
    recon = torch.stack([torch.stack([f[b] @ cc.W_dec[:, m] + cc.b_dec[m] for m in range(M)]) for b in range(B)])
    mse = sum(((recon[b, m] - x[b, m]) ** 2).sum() for b in range(B) for m in range(M)) / B
    l1 = sum(f[b, i] * sum(cc.W_dec[i, m].norm() for m in range(M)) for b in range(B) for i in range(cc.n_latents)) / B
    return f, recon, mse, scale * cc.cfg.l1_coef * l1


def test_loss_equals_a_dense_reference_values_and_gradients():
    cc, x = randomised(Crosscoder(cfg_of(l1_coef=0.7))), batch()
    out = cc(x, sparsity_scale=0.4)
    f, recon, mse, l1 = reference_loss(cc, x, 0.4)
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.recon_loss, mse)
    torch.testing.assert_close(out.sparsity_loss, l1)
    torch.testing.assert_close(out.loss, mse + l1)
    assert (f > 0).any() and (f == 0).any()  # both sides of the ReLU in play
    grads = torch.autograd.grad(out.loss, list(cc.parameters()))
    ref = torch.autograd.grad(mse + l1, list(cc.parameters()))
    for name, g, r in zip([n for n, _ in cc.named_parameters()], grads, ref): torch.testing.assert_close(g, r, msg=name)


def test_decoder_norm_weighted_l1_is_its_definition():
    cc = randomised(Crosscoder(cfg_of(l1_coef=1.3)))
    f = F.relu(torch.randn(4, 11, generator=torch.Generator().manual_seed(3)))
    code = cc.code(batch(4))._replace(latents=f)
    norms = torch.tensor([[cc.W_dec[i, m].norm().item() for m in range(3)] for i in range(11)])  # [h, m]
    torch.testing.assert_close(cc.decoder_norms(), norms)
    expected = 1.3 * sum(f[b, i].item() * norms[i].sum().item() for b in range(4) for i in range(11)) / 4
    assert math.isclose(cc.sparsity_penalty(code).item(), expected, rel_tol=1e-5)
    assert Crosscoder(bt_cfg()).sparsity_penalty(code) == 0  # BatchTopK has no L1


def test_grad_clipping_bounds_the_global_norm_and_decoder_norms_stay_free():
    cc = randomised(Crosscoder(cfg_of(grad_clip=0.5)))
    cc(batch() * 10).loss.backward()
    cc.after_backward()
    total = torch.cat([p.grad.flatten() for p in cc.parameters()]).norm()
    assert math.isclose(total.item(), 0.5, rel_tol=1e-4)
    before = cc.W_dec.detach().clone()
    cc.after_step()  # the L1 recipe constrains nothing
    assert torch.equal(cc.W_dec, before) and cc.steps_done == 0


# --- BatchTopK -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(1, 1), (7, 2), (13, 3), (4, 11)])
def test_batch_topk_keeps_exactly_k_times_batch(n, k):
    acts = torch.rand(n, 11, generator=torch.Generator().manual_seed(n)) + 0.01  # all positive
    weights = torch.rand(11, generator=torch.Generator().manual_seed(k)) + 0.1
    kept = batch_topk(acts, weights, k)
    assert (kept != 0).sum() == n * k
    scores = acts * weights
    assert scores[kept != 0].min() >= torch.cat([scores[kept == 0], torch.zeros(1)]).max()  # the largest scores survive
    assert torch.equal(kept[kept != 0], acts[kept != 0])  # values unscaled


def test_batchtopk_model_anneals_k_and_keeps_k_times_batch_per_step():
    cfg = bt_cfg(k=2, k_start=5, k_anneal_steps=3, d_latents=11)
    cc, x = Crosscoder(cfg), batch().abs()  # positive inputs: the ReLU zeroes few latents
    with torch.no_grad(): cc.b_enc.fill_(5.0)  # every pre-activation positive
    counts = []
    for _ in range(5):
        counts.append(int(cc(x).code.active().sum()))
        cc.after_step()
    assert [k_at(s, cfg) for s in range(5)] == [5, 4, 3, 2, 2] and counts == [7 * k for k in (5, 4, 3, 2, 2)]


def test_threshold_ema_updates_from_its_start_step():
    cfg = bt_cfg(threshold_start_step=2, threshold_ema=0.9)
    cc, x = Crosscoder(cfg), batch()
    thresholds, mins = [], []
    for step in range(5):
        f = F.relu(cc.pre_acts(x))
        w = cc.decoder_norms().sum(-1)
        kept = batch_topk(f, w, k_at(step, cfg))
        mins.append((kept * w)[kept > 0].min().item())
        cc(x)
        cc.after_step()
        thresholds.append(cc.threshold.item())
    assert thresholds[:2] == [-1.0, -1.0]
    assert math.isclose(thresholds[2], mins[2], rel_tol=1e-6)
    for step in (3, 4): assert math.isclose(thresholds[step], 0.9 * thresholds[step - 1] + 0.1 * mins[step], rel_tol=1e-6)
    cc.eval()
    scores = F.relu(cc.pre_acts(x)) * cc.decoder_norms().sum(-1)
    assert torch.equal(cc.encode(x), F.relu(cc.pre_acts(x)) * (scores > cc.threshold))
    assert cc.steps_done == 5 and cc._step == 5


def test_eval_without_a_threshold_falls_back_to_the_batch_selection():
    cc, x = Crosscoder(bt_cfg(k_anneal_steps=0)), batch()
    assert cc.threshold < 0
    train_f = cc.encode(x)
    cc.eval()
    assert torch.equal(cc.encode(x), train_f) and cc._kept_min is not None  # eval leaves the training stash alone


def test_through_train_sae_the_threshold_starts_at_its_step():
    data = planted_checkpoints(32 * 12, 8, 6, 3, 3, 2, seed=1).x  # [384, 2, 8]
    cfg = CrosscoderConfig(d_model=8, d_latents=24, kind="batchtopk", k=2, k_start=6, k_anneal_steps=4,
                           threshold_start_step=5, lr=3e-3, batch_size=32, n_tokens=32 * 12)
    seen = []
    train_sae(Crosscoder(cfg), data.split(32), cfg, callbacks=[lambda step, record, cc: seen.append(
        (step, record["l0"], cc.threshold.item()))])
    assert [s for s, _, _ in seen] == list(range(1, 13))
    assert all(t == -1 for s, _, t in seen[:5]) and all(t > 0 for s, _, t in seen[5:]), seen
    assert len({t for _, _, t in seen[5:]}) == 7  # moved at every step
    assert [round(l0) for _, l0, _ in seen[:5]] == [6, 5, 4, 3, 2]


def reference_aux(cc: Crosscoder, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    "AuxK written out: per token, the aux_k dead latents of largest ReLU(pre)·Σ‖W_dec‖ rebuild the residual (no b_dec)."
    out = cc(x)
    residual = (x - out.recon).detach()
    f, w = F.relu(out.code.pre_acts), cc.decoder_norms().sum(-1).detach()
    dead_ids = dead.nonzero().flatten().tolist()
    rebuilt = []
    for b in range(x.shape[0]):
        top = sorted(dead_ids, key=lambda i: -(f[b, i] * w[i]).item())[:cc.cfg.aux_k]
        rebuilt.append(sum(f[b, i] * cc.W_dec[i] for i in top))  # [m, d]
    rebuilt = torch.stack(rebuilt)
    return cc.cfg.aux_coef * (residual - rebuilt).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()


def test_auxk_equals_its_reference_and_its_gradient_reaches_the_dead_latents():
    cc = randomised(Crosscoder(bt_cfg(aux_k=2, aux_coef=0.5, k_anneal_steps=0)))
    x, dead = batch(), torch.tensor([i % 3 == 0 for i in range(11)])  # latents 0, 3, 6, 9 dead
    out = cc(x, dead_mask=dead)
    torch.testing.assert_close(out.aux_loss, reference_aux(cc, x, dead))
    assert out.aux_loss > 0 and torch.equal(out.loss, out.recon_loss + out.sparsity_loss + out.aux_loss)
    cc.zero_grad()
    out.aux_loss.backward()
    assert cc.W_dec.grad[dead].abs().sum() > 0 and cc.W_dec.grad[~dead].abs().sum() == 0
    assert cc.W_enc.grad[..., dead].abs().sum() > 0 and cc.b_enc.grad[dead].abs().sum() > 0
    assert cc.b_dec.grad is None or cc.b_dec.grad.abs().sum() == 0  # the residual is detached, the rebuild bias-free
    assert cc(x, dead_mask=torch.zeros(11, dtype=torch.bool)).aux_loss == 0
    assert Crosscoder(cfg_of()).forward(x, dead_mask=dead).aux_loss == 0  # the L1 recipe has no AuxK


# --- folding the scales ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_fold_scales_gives_identical_latents_and_reconstruction_over_s(kind):
    cc = randomised(Crosscoder(cfg_of() if kind == "l1" else bt_cfg(k_anneal_steps=0)))
    s = torch.tensor([3.0, 0.2, 1.7])
    cc.set_scales(s.tolist())
    x = batch(20)  # scaled activations
    cc(x); cc.after_step(); cc.eval()  # BatchTopK: a threshold to use
    folded = fold_scales(cc).eval()
    raw = x / s[:, None]
    torch.testing.assert_close(folded.encode(raw), cc.encode(x))
    f = cc.encode(x)
    torch.testing.assert_close(folded.decode(f), cc.decode(f) / s[:, None])
    for c in range(3): torch.testing.assert_close(folded.decode_at(f, c), cc.decode_at(f, c) / s[c])
    torch.testing.assert_close(folded.decoder_norms(), cc.decoder_norms())
    torch.testing.assert_close(folded.W_enc, cc.W_enc * s[:, None, None])
    assert torch.equal(folded.b_enc, cc.b_enc) and torch.equal(folded.scales, cc.scales) and folded.folded
    assert not cc.folded and folded.W_enc.data_ptr() != cc.W_enc.data_ptr()
    with pytest.raises(ParamError, match="folded in already"): fold_scales(folded)
    with pytest.raises(ParamError, match="folded in already"): folded.set_scales([1.0, 1.0, 1.0])


@pytest.mark.parametrize("scales", [[1.0, 2.0], [1.0, 2.0, float("nan")], [1.0, 0.0, 2.0]])
def test_set_scales_refuses_bad_scales(scales):
    with pytest.raises(ParamError, match="scales must be 3 finite numbers > 0"): Crosscoder(cfg_of()).set_scales(scales)


# --- files -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_save_load_round_trip_with_scales_and_buffers(kind, tmp_path):
    cc = randomised(Crosscoder(cfg_of() if kind == "l1" else bt_cfg()))
    cc.set_scales([2.0, 0.5, 1.25])
    for _ in range(3): cc(batch()); cc.after_step()
    save_sae(cc, cc.cfg, tmp_path / "cc")
    assert json.loads((tmp_path / "cc" / "cfg.json").read_text())["format"] == "dyntrack-crosscoder-v1"
    back = load_sae(tmp_path / "cc")
    assert type(back) is Crosscoder and back.cfg == cc.cfg and back._step == cc._step
    for k, v in params(cc).items(): assert torch.equal(params(back)[k], v), k
    folded = fold_scales(cc)
    save_sae(folded, folded.cfg, tmp_path / "folded")
    assert load_sae(tmp_path / "folded").folded and torch.equal(load_sae(tmp_path / "folded").W_dec, folded.W_dec)
    with pytest.raises(ParamError, match="config does not describe this crosscoder: d_latents"):
        save_sae(cc, dataclasses.replace(cc.cfg, d_latents=12), tmp_path / "other")


def test_saved_crosscoder_loads_in_a_fresh_interpreter(tmp_path):
    "load_sae finds the crosscoder's class from the module recorded in cfg.json; the sae layer names no method."
    cc = randomised(Crosscoder(cfg_of()))
    save_sae(cc, cc.cfg, tmp_path / "cc")
    torch.save(cc.W_dec.detach(), tmp_path / "want.pt")
    script = (f"import sys, torch\nfrom dyntrack.sae.model import load_sae\nassert 'dyntrack.crosscoding.model' not in sys.modules\n"
              f"back = load_sae({str(tmp_path / 'cc')!r})\nprint(type(back).__name__)\n"
              f"assert torch.equal(back.W_dec, torch.load({str(tmp_path / 'want.pt')!r}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["Crosscoder"], out.stderr[-3000:]


@pytest.mark.parametrize("edit, words", [
    (lambda c: {**c, "d_latent": 3}, "unknown parameter(s) ['d_latent']"),
    (lambda c: {**c, "kind": "topk"}, "kind='topk' has the wrong type"),
    (lambda c: {**c, "n_checkpoints": 1}, "n_checkpoints=1 is out of range"),
    (lambda c: {**c, "format": "dyntrack-crosscoder-v9"}, "format 'dyntrack-crosscoder-v9', which is not a known format"),
])
def test_unknown_or_bad_configs_are_refused_naming_the_file(edit, words, tmp_path):
    cc = Crosscoder(cfg_of())
    save_sae(cc, cc.cfg, tmp_path / "cc")
    path = tmp_path / "cc" / "cfg.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CorruptFileError) as e: load_sae(tmp_path / "cc")
    assert str(e.value).startswith(str(path)) and words in str(e.value), str(e.value)


# --- training on planted data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_training_on_planted_data_lowers_the_loss_and_finds_the_features(kind):
    planted = planted_checkpoints(128 * 200, 12, 8, 4, 4, 2, seed=2)
    base = dict(d_model=12, d_latents=40, lr=5e-3, warmup_steps=5, batch_size=128, n_tokens=128 * 200, dead_tokens=128 * 20)
    cfg = (CrosscoderConfig(**base, l1_coef=0.2) if kind == "l1" else
           CrosscoderConfig(**base, kind="batchtopk", k=2, k_start=8, k_anneal_steps=50, threshold_start_step=50))
    res = train_sae(Crosscoder(cfg), planted.x.split(128), cfg)
    first, last = res.history[0]["recon_loss"], sum(r["recon_loss"] for r in res.history[-10:]) / 10
    assert res.steps == 200 and last < 0.1 * first, (first, last)
    cos = (F.normalize(planted.features.flatten(1), dim=-1) @ F.normalize(res.sae.W_dec.detach().flatten(1), dim=-1).T)
    assert cos.max(1).values.mean() > 0.9
    assert res.history[-1]["lr"] < 1e-4  # the decay over the last 20% reached the run
    if kind == "l1": assert res.history[0]["sparsity_loss"] == 0 < res.history[-1]["sparsity_loss"]  # λ ramped from 0
    else: assert res.history[-1]["l0"] <= 2 and res.sae.threshold > 0


def test_planted_checkpoints_has_the_kinds_it_says():
    p = planted_checkpoints(50, 6, 2, 1, 1, 2, seed=0)
    assert p.x.shape == (50, 2, 6) and p.kinds == ("shared", "shared", "emerging", "discontinued")
    assert p.features[2, 0].abs().sum() == 0 and p.features[3, 1].abs().sum() == 0
    torch.testing.assert_close(p.features[:2].norm(dim=-1), torch.ones(2, 2))
    with pytest.raises(ParamError, match="k=5 is out of range"): planted_checkpoints(5, 6, 2, 1, 1, 5)


def test_resume_equals_uninterrupted_with_the_step_counter_and_auxk_in_play(tmp_path):
    data = planted_checkpoints(32 * 12, 8, 6, 3, 3, 2, seed=4).x
    cfg = CrosscoderConfig(d_model=8, d_latents=24, kind="batchtopk", k=2, k_start=6, k_anneal_steps=8,
                           threshold_start_step=3, lr=3e-3, batch_size=32, n_tokens=32 * 12, dead_tokens=32 * 2)
    ref = train_sae(Crosscoder(cfg), data.split(32), cfg, out_dir=tmp_path / "ref", checkpoint_every=4)
    assert any(r["aux_loss"] > 0 for r in ref.history)  # the dead-latent counter was in play
    with pytest.raises(Interrupt):
        train_sae(Crosscoder(cfg), data.split(32), cfg, out_dir=tmp_path / "run", checkpoint_every=4, callbacks=[stop_at(6)])
    resumed = train_sae(Crosscoder(cfg), data.split(32), cfg, out_dir=tmp_path / "run", checkpoint_every=4)
    assert [r["step"] for r in resumed.history] == list(range(5, 13)) and resumed.sae._step == 12
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    assert (tmp_path / "run" / "log.jsonl").read_text() == (tmp_path / "ref" / "log.jsonl").read_text()


def test_cpu_bf16_autocast_runs_both_kinds_close_to_float32():
    for cc in (randomised(Crosscoder(cfg_of())), randomised(Crosscoder(bt_cfg(k_anneal_steps=0)))):
        x, dead = batch(16), torch.arange(11) < 4
        ref = cc(x, dead_mask=dead)
        with torch.autocast("cpu", dtype=torch.bfloat16): half = cc(x, dead_mask=dead)
        half.loss.backward()
        assert half.loss.dtype == torch.float32 and math.isclose(half.loss.item(), ref.loss.item(), rel_tol=0.05)


# --- language-model checkpoints: training and statistics -------------------------------------------------------

def counting(n: int, seed: int) -> torch.Tensor:
    return (torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed)) + torch.arange(13)) % VOCAB


@pytest.fixture(scope="module")
def two_checkpoints():
    "A tiny GPT-NeoX taught to count, after 10 and after 40 steps."
    torch.set_num_threads(1)
    model = build_model(model_config("gpt_neox", "tiny", vocab_size=VOCAB, max_seq_len=16), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    out = []
    for step in range(40):
        loss = lm_loss(model, counting(16, step))
        opt.zero_grad(); loss.backward(); opt.step()
        if step + 1 in (10, 40): out.append(copy.deepcopy(model).eval())
    return out


def lm_run(models, out_dir, stop=None, **kw):
    cfg = CrosscoderConfig(d_model=64, d_latents=96, l1_coef=0.5, lr=3e-3, warmup_steps=3, batch_size=32,
                           n_tokens=32 * 40)
    source = [counting(4, 400 + i)[:, :-1] for i in range(32)]  # token batches of 4 × 12 positions
    held_out = [counting(4, 900 + i)[:, :-1] for i in range(3)]
    callbacks = [stop_at(stop)] if stop is not None else []
    return train_crosscoder(models, 1, source, cfg, out_dir, scale_batches=held_out, buffer_tokens=64,
                            checkpoint_every=30, callbacks=callbacks, **kw)


def test_train_crosscoder_records_the_scales_and_trains(two_checkpoints, tmp_path):
    res = lm_run(two_checkpoints, tmp_path / "run")
    held_out = [counting(4, 900 + i)[:, :-1] for i in range(3)]
    expected = checkpoint_scales(two_checkpoints, 1, held_out, drop_first=0)  # first position included
    assert res.sae.scales.tolist() == torch.tensor(expected).tolist()
    assert expected != checkpoint_scales(two_checkpoints, 1, held_out, drop_first=1)  # which positions counted matters
    assert res.steps == 40 and res.tokens_seen == 40 * 32 and not res.exhausted  # 32 batches × 4 × 11 rows ≥ 1280
    assert res.history[-1]["recon_loss"] < 0.5 * res.history[0]["recon_loss"]
    assert torch.equal(load_sae(tmp_path / "run" / "sae").scales, res.sae.scales)


def test_train_crosscoder_resumes_equal_to_uninterrupted(two_checkpoints, tmp_path):
    ref = lm_run(two_checkpoints, tmp_path / "ref")
    with pytest.raises(Interrupt): lm_run(two_checkpoints, tmp_path / "run", stop=33)
    resumed = lm_run(two_checkpoints, tmp_path / "run")
    assert [r["step"] for r in resumed.history] == list(range(31, 41))
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    with pytest.raises(ParamError, match="holds a crosscoder trained with scales"):
        lm_run(two_checkpoints, tmp_path / "run", scales=[1.0, 1.0])


def test_train_crosscoder_refuses_what_does_not_fit(two_checkpoints):
    cfg = CrosscoderConfig(d_model=64, d_latents=96, batch_size=32, n_tokens=64)
    with pytest.raises(ParamError, match="models must hold cfg.n_checkpoints=2 models; got 1"):
        train_crosscoder(two_checkpoints[:1], 1, [], cfg, scales=[1.0])
    with pytest.raises(ParamError, match="cfg.d_model=32 but the models' residual stream has 64"):
        train_crosscoder(two_checkpoints, 1, [], dataclasses.replace(cfg, d_model=32), scales=[1.0, 1.0])
    with pytest.raises(ParamError, match="pass scale_batches"): train_crosscoder(two_checkpoints, 1, [], cfg)
    with pytest.raises(ParamError, match="site='resid_mid'"):
        train_crosscoder(two_checkpoints, 1, [], cfg, site="resid_mid", scales=[1.0, 1.0])


def identity_crosscoder(d_model: int, scales) -> Crosscoder:
    "Two checkpoints, latents ±x_m per checkpoint: an exact reconstruction."
    cc = Crosscoder(CrosscoderConfig(d_model=d_model, d_latents=4 * d_model, batch_size=2, n_tokens=2))
    eye = torch.eye(d_model)
    with torch.no_grad():
        cc.W_enc.zero_(); cc.W_dec.zero_()
        for m in range(2):
            cols = slice(2 * m * d_model, 2 * (m + 1) * d_model)
            cc.W_enc[m, :, cols] = torch.cat([eye, -eye], 1); cc.W_dec[cols, m] = torch.cat([eye, -eye], 0)
    cc.set_scales(scales)
    return cc


@pytest.mark.parametrize("layer, site", [(0, "resid_pre"), (1, "resid_pre"), (0, "resid_post")])
def test_identity_crosscoder_costs_nothing(two_checkpoints, layer, site):
    windows = [counting(4, 7000 + i) for i in range(2)]
    stats = crosscoder_stats(identity_crosscoder(64, [5.0, 0.3]), two_checkpoints, layer, windows, site=site)
    assert all(abs(d) < 1e-5 for d in stats["delta_ce"]) and all(abs(r - 1) < 1e-4 for r in stats["ce_recovered"])
    assert all(abs(v - 1) < 1e-6 for v in stats["explained_variance"]) and stats["n_tokens"] == 2 * 4 * 11
    assert stats["l0"] == 128 and stats["dead_fraction"] == 0
    assert all(z > c for z, c in zip(stats["zero_ablated_loss"], stats["clean_loss"]))


def test_stats_equal_a_reference_with_scales_folded(two_checkpoints):
    "A random crosscoder with scales: spliced losses, explained variance, L0 and dead fraction, recomputed by hand."
    cc = randomised(Crosscoder(CrosscoderConfig(d_model=64, d_latents=40, batch_size=2, n_tokens=2)), seed=5)
    with torch.no_grad(): cc.b_enc.sub_(2.0)  # some latents never fire
    scales = [2.0, 0.5]
    cc.set_scales(scales)
    windows = [counting(4, 8000 + i) for i in range(3)]
    stats = crosscoder_stats(cc, two_checkpoints, 1, windows)
    s = torch.tensor(scales)
    acts = [torch.stack([residual_at(m, w[:, :-1], 1)[:, 1:] for m in two_checkpoints], dim=2) for w in windows]  # raw
    x = torch.cat([a.flatten(0, 1) for a in acts])  # [n, 2, 64]
    f = cc.encode(x * s[:, None])  # the unfolded crosscoder on scaled activations
    recon = cc.decode(f) / s[:, None]
    for c, model in enumerate(two_checkpoints):
        ev = 1 - (x[:, c] - recon[:, c]).pow(2).sum() / (x[:, c] - x[:, c].mean(0)).pow(2).sum()
        assert math.isclose(stats["explained_variance"][c], ev.item(), rel_tol=1e-4, abs_tol=1e-5)
        losses = []
        for w, a in zip(windows, acts):
            r = (cc.decode_at(cc.encode(a.flatten(0, 1) * s[:, None]), c) / s[c]).view(a.shape[0], a.shape[1], 64)
            losses.append(mean_lm_loss(model, [w], 1, lambda h, r=r: r, drop_first=1))
        assert math.isclose(stats["spliced_loss"][c], sum(losses) / 3, rel_tol=1e-5)
        assert math.isclose(stats["clean_loss"][c], mean_lm_loss(model, windows, 1), rel_tol=1e-6)
        assert math.isclose(stats["delta_ce"][c], stats["spliced_loss"][c] - stats["clean_loss"][c], rel_tol=1e-9)
    assert math.isclose(stats["l0"], (f != 0).sum(-1).float().mean().item(), rel_tol=1e-6)
    assert 0 < stats["dead_fraction"] == 1 - (f != 0).any(0).float().mean().item()


def test_stats_refuse_what_does_not_fit(two_checkpoints):
    cc, windows = identity_crosscoder(64, [1.0, 1.0]), [counting(2, 1)]
    with pytest.raises(ParamError, match="site='resid_post' of the last block"):
        crosscoder_stats(cc, two_checkpoints, 1, windows, site="resid_post")
    with pytest.raises(ParamError, match="n_checkpoints=2 models; got 1"): crosscoder_stats(cc, two_checkpoints[:1], 1, windows)
    with pytest.raises(ParamError, match="at least one batch"): crosscoder_stats(cc, two_checkpoints, 1, [])
    with pytest.raises(ParamError, match="layer must be in"): crosscoder_stats(cc, two_checkpoints, 5, windows)
