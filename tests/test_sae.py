"Sparse autoencoders: config checks, invariants of the recipe, the model contract, fast vs reference decoding, AuxK, files by format and SAELens interop."
import dataclasses, json

import pytest
import torch

import dyntrack.sae.model as sae_mod
from dyntrack.core import CorruptFileError, ParamError
from dyntrack.sae.model import (FORMATS, DictionaryModel, SaeConfig, SparseAutoencoder, decode_dense, decode_latents,
                                decode_sparse, evaluate_sae, explained_variance, from_saelens, geometric_median, l0,
                                load_sae, normalize_decoder, remove_parallel_grad, save_sae, to_saelens, topk_code)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give
    yield
    torch.set_num_threads(n)


def small_cfg(**kw) -> SaeConfig:
    return SaeConfig(**{**dict(d_model=12, d_sae=40, kind="topk", k=4, batch_size=16, n_tokens=160), **kw})


def randomised(sae: SparseAutoencoder, seed: int = 0) -> SparseAutoencoder:
    "`sae` with non-trivial biases, so tests exercise every term."
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.cfg.d_sae, generator=gen))
        sae.b_dec.copy_(torch.randn(sae.cfg.d_model, generator=gen))
    return sae


# --- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(kind="gelu"), "kind"), (dict(kind="topk", k=0), "k"), (dict(kind="topk", d_sae=8, k=9), "k"),
    (dict(d_model=0), "d_model"), (dict(expansion=0), "expansion"), (dict(d_sae=-1), "d_sae"),
    (dict(l1_coef=-1.0), "l1_coef"), (dict(aux_coef=-0.1), "aux_coef"), (dict(lr=0.0), "lr"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(batch_size=1), "batch_size"), (dict(n_tokens=100), "n_tokens"),
    (dict(dead_tokens=0), "dead_tokens"), (dict(b_dec_init="median"), "b_dec_init"),
    (dict(decoder_init_norm=0.5), "decoder_init_norm"), (dict(unit_norm_decoder=False, decoder_init_norm=0.0), "decoder_init_norm"),
    (dict(l1_coef=float("nan")), "l1_coef"), (dict(lr=float("inf")), "lr"), (dict(aux_coef=float("inf")), "aux_coef"),
    (dict(d_model="12"), "d_model"), (dict(d_sae=40.0), "d_sae"), (dict(kind="topk", k=2.5), "k"), (dict(k=0), "k"),
    (dict(seed=-1), "seed"), (dict(unit_norm_decoder="yes"), "unit_norm_decoder"), (dict(n_tokens=None), "n_tokens"),
    (dict(lr_decay_fraction=-0.1), "lr_decay_fraction"), (dict(lr_decay_fraction=1.01), "lr_decay_fraction"),
    (dict(l1_warmup_steps=-1), "l1_warmup_steps"), (dict(l1_warmup_steps=1.5), "l1_warmup_steps"),
])
def test_bad_config_rejected(kw, field):
    with pytest.raises(ParamError, match=f"^{field}="):
        SaeConfig(**{**dict(d_model=12, batch_size=128, n_tokens=1280), **kw})


def test_config_derives_sizes():
    cfg = SaeConfig(d_model=12, expansion=3, batch_size=16, n_tokens=100)
    assert (cfg.d_sae, cfg.aux_k, cfg.n_steps) == (36, 6, 6)
    assert SaeConfig(d_model=12, d_sae=7, aux_k=3).aux_k == 3
    assert SaeConfig(d_model=12, unit_norm_decoder=False, decoder_init_norm=0.1).decoder_init_norm == 0.1


# --- geometric median -----------------------------------------------------------------------------------------

def test_geometric_median_known_answers():
    line = torch.tensor([[0.0], [1.0], [3.0], [10.0], [100.0]])
    assert abs(geometric_median(line).item() - 3.0) < 1e-3
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [50.0, 50.0]])
    # by symmetry on the diagonal (t, t); the unit pulls balance when 2t/√(1+t²) = 1, i.e. t = 1/√3 (the mean: 10)
    torch.testing.assert_close(geometric_median(square), torch.full((2,), 3 ** -0.5), atol=1e-4, rtol=0)
    same = torch.ones(5, 3) * 2.5
    torch.testing.assert_close(geometric_median(same), same[0])


# --- fast vs reference paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, d_sae, d_model, k", [(1, 13, 7, 1), (5, 13, 7, 1), (9, 37, 48, 5), (3, 64, 64, 64)])
def test_sparse_decode_matches_dense_values_and_grads(n, d_sae, d_model, k):
    gen = torch.Generator().manual_seed(n * d_sae + k)
    pre = torch.randn(n, d_sae, generator=gen, dtype=torch.float64)
    W = torch.randn(d_sae, d_model, generator=gen, dtype=torch.float64)
    g_out = torch.randn(n, d_model, generator=gen, dtype=torch.float64)
    results = []
    for sparse in (False, True):
        pre_, W_ = pre.clone().requires_grad_(), W.clone().requires_grad_()
        out = decode_latents(topk_code(pre_, k), W_, sparse=sparse)
        out.backward(g_out)
        results.append((out.detach(), pre_.grad, W_.grad))
    for ref, fast in zip(*results): torch.testing.assert_close(fast, ref)


def test_sparse_decode_keeps_leading_dims():
    code = topk_code(torch.randn(2, 3, 11), 2)
    W = torch.randn(11, 5)
    torch.testing.assert_close(decode_sparse(code.top_indices, code.top_values, W), decode_dense(code.latents, W))


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_forward_fast_equals_reference(kind, monkeypatch):
    sae = randomised(SparseAutoencoder(small_cfg(kind=kind, d_model=7, d_sae=13, k=1, aux_k=3, l1_coef=0.1)))
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    dead = torch.arange(13) % 2 == 0
    grads = []
    for sparse in (False, True):
        monkeypatch.setattr(sae_mod, "SPARSE_DECODE", sparse)
        sae.zero_grad()
        out = sae(x, dead)
        out.loss.backward()
        grads.append([out.loss.detach(), out.recon.detach()] + [p.grad.clone() for p in sae.parameters()])
    for ref, fast in zip(*grads): torch.testing.assert_close(fast, ref)


# --- the ReLU recipe: unit-norm decoder ----------------------------------------------------------------------

def test_remove_parallel_grad_leaves_perpendicular_part():
    sae = SparseAutoencoder(small_cfg(kind="relu", l1_coef=0.01))
    sae(torch.randn(16, 12)).loss.backward()
    g0, W = sae.W_dec.grad.clone(), sae.W_dec.detach()
    remove_parallel_grad(sae)
    g = sae.W_dec.grad
    assert (g * W).sum(1).abs().max() < 1e-6  # ⟂ every row
    assert (g0 * W).sum(1).abs().max() > 1e-3
    w_hat = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(g + (g0 * w_hat).sum(1, keepdim=True) * w_hat, g0)  # only the parallel part went


def test_unit_norm_invariant_through_training(tmp_path):
    from dyntrack.sae.train import train_sae
    cfg = small_cfg(kind="relu", l1_coef=0.05, lr=1e-2, warmup_steps=2)
    sae = SparseAutoencoder(cfg)
    norms = []
    train_sae(sae, torch.randn(160, 12).split(16), cfg, callbacks=[lambda s, r, m: norms.append(m.W_dec.norm(dim=1))])
    assert len(norms) == cfg.n_steps
    for n in norms: torch.testing.assert_close(n, torch.ones(40))
    with torch.no_grad(): sae.W_dec.mul_(torch.rand(40, 1) + 0.5)
    normalize_decoder(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


def test_relu_loss_terms():
    sae = randomised(SparseAutoencoder(small_cfg(kind="relu", l1_coef=0.3)))
    x = torch.randn(16, 12)
    out = sae(x)
    torch.testing.assert_close(out.recon_loss, ((x - out.recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    torch.testing.assert_close(out.sparsity_loss, 0.3 * out.latents.sum(1).mean())
    assert out.aux_loss == 0 and abs(explained_variance(x, out.recon) - (1 - out.recon_loss.item())) < 1e-6


# --- the contract the trainer uses ------------------------------------------------------------------------------

@pytest.mark.parametrize("unit", [True, False])
def test_constraint_hooks_follow_the_config(unit):
    "With unit_norm_decoder the hooks are remove_parallel_grad and normalize_decoder; without, they change nothing."
    sae = randomised(SparseAutoencoder(small_cfg(kind="relu", l1_coef=0.01, unit_norm_decoder=unit)))
    twin = randomised(SparseAutoencoder(sae.cfg))
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(4))
    for m in (sae, twin): m(x).loss.backward()
    sae.after_backward()
    if unit: remove_parallel_grad(twin)
    assert torch.equal(sae.W_dec.grad, twin.W_dec.grad)
    with torch.no_grad():
        for m in (sae, twin): m.W_dec.mul_(torch.linspace(0.5, 2.0, 40)[:, None])
    sae.after_step()
    if unit: normalize_decoder(twin)
    assert torch.equal(sae.W_dec, twin.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40) if unit else torch.linspace(0.5, 2.0, 40))


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_sparsity_scale_scales_only_the_penalty(kind):
    sae = randomised(SparseAutoencoder(small_cfg(kind=kind, l1_coef=0.3)))
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    full, part, off = sae(x), sae(x, sparsity_scale=0.4), sae(x, sparsity_scale=0.0)
    torch.testing.assert_close(full.sparsity_loss, sae.sparsity_penalty(full.code))
    torch.testing.assert_close(part.sparsity_loss, 0.4 * full.sparsity_loss)
    assert off.sparsity_loss == 0 and torch.equal(off.loss, off.recon_loss + off.aux_loss)
    assert torch.equal(part.recon, full.recon) and torch.equal(part.recon_loss, full.recon_loss)
    assert (full.sparsity_loss > 0) == (kind == "relu")  # TopK has no penalty: its k is its sparsity


def test_model_facts_for_the_trainer():
    sae = SparseAutoencoder(small_cfg(kind="relu", d_sae=40))
    assert sae.n_latents == 40 and sae.device == torch.device("cpu") and isinstance(sae, DictionaryModel)
    assert sae.format == "dyntrack-sae-v1" and FORMATS["dyntrack-sae-v1"] is SparseAutoencoder
    out = sae(torch.randn(16, 12))
    assert out.code.fired().shape == (40,) and out.code.active().shape == (16,)
    with pytest.raises(ParamError, match=r"d_sae \(SAE 40, config 41\)"): sae.check_config(small_cfg(kind="relu", d_sae=41))
    with pytest.raises(ParamError, match="kind"): sae.check_config(small_cfg(kind="topk"))
    sae.check_config(dataclasses.replace(sae.cfg, lr=1.0))  # training fields may differ


@pytest.mark.parametrize("how", ["geometric_median", "mean", "zeros"])
def test_init_from_batch_sets_b_dec(how):
    sae = SparseAutoencoder(small_cfg(b_dec_init=how))
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(6)) + 3.0
    sae.init_from_batch(x)
    expected = {"geometric_median": geometric_median(x), "mean": x.mean(0), "zeros": torch.zeros(12)}[how]
    assert torch.equal(sae.b_dec.detach(), expected)


# --- TopK and AuxK --------------------------------------------------------------------------------------------

def aux_setup(aux_coef: float):
    "Latents 0-1 always win the top-2; latents 6-11 fire positively but never make it, and are marked dead."
    sae = SparseAutoencoder(SaeConfig(d_model=8, d_sae=12, kind="topk", k=2, aux_k=6, aux_coef=aux_coef,
                                      batch_size=16, n_tokens=16))
    with torch.no_grad(): sae.b_enc.copy_(torch.tensor([10.0, 10.0] + [0.0] * 4 + [1.0] * 6))
    dead = torch.zeros(12, dtype=torch.bool)
    dead[6:] = True
    return sae, 0.1 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dead


@pytest.mark.parametrize("sparse", [False, True])
def test_auxk_gradient_reaches_dead_latents(sparse, monkeypatch):
    monkeypatch.setattr(sae_mod, "SPARSE_DECODE", sparse)
    for aux_on in (True, False):
        sae, x, dead = aux_setup(1 / 32 if aux_on else 0.0)
        out = sae(x, dead)
        assert set(out.latents.nonzero()[:, 1].tolist()) == {0, 1}  # the dead ones never fire
        out.loss.backward()
        enc_cols, dec_rows = sae.W_enc.grad[:, 6:].norm(dim=0), sae.W_dec.grad[6:].norm(dim=1)
        if aux_on: assert out.aux_loss > 0 and (enc_cols > 0).all() and (dec_rows > 0).all()
        else: assert out.aux_loss == 0 and (enc_cols == 0).all() and (dec_rows == 0).all()
    sae, x, dead = aux_setup(1 / 32)
    sae(x).loss.backward()  # no dead mask: no aux
    assert (sae.W_enc.grad[:, 6:] == 0).all()


def test_auxk_normalisation():
    sae, x, dead = aux_setup(0.5)
    out = sae(x, dead)
    e = (x - out.recon).detach()
    code = topk_code(sae.encode(x).pre_acts.masked_fill(~dead, float("-inf")), 6)
    e_hat = decode_dense(code.latents, sae.W_dec)
    torch.testing.assert_close(out.aux_loss, 0.5 * ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum())


def test_topk_sparsity():
    sae = randomised(SparseAutoencoder(small_cfg()))
    out = sae(torch.randn(16, 12))
    assert l0(out.latents) <= 4 and (out.latents >= 0).all() and out.sparsity_loss == 0


# --- metrics --------------------------------------------------------------------------------------------------

def test_evaluate_sae_pools_over_batches():
    sae = randomised(SparseAutoencoder(small_cfg()))
    x = torch.randn(48, 12)
    whole, parts = evaluate_sae(sae, [x]), evaluate_sae(sae, x.split(5))
    for a, b in zip(whole, parts): assert abs(a - b) < 1e-6
    with torch.no_grad(): out = sae(x)
    assert abs(whole.explained_variance - explained_variance(x, out.recon)) < 1e-5
    assert abs(whole.l0 - l0(out.latents)) < 1e-6
    assert abs(whole.dead_fraction - (1 - (out.latents != 0).any(0).float().mean().item())) < 1e-6
    with pytest.raises(ParamError, match="at least one batch"): evaluate_sae(sae, [])


# --- files ----------------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    sae = randomised(SparseAutoencoder(small_cfg(kind="relu")))
    link_cfg = dataclasses.replace(sae.cfg, lr=4e-5, warmup_steps=3)  # the config it was trained with
    save_sae(sae, link_cfg, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    back = load_sae(tmp_path / "sae")
    assert back.cfg == link_cfg
    for name, p in sae.state_dict().items(): assert torch.equal(back.state_dict()[name], p)
    with pytest.raises(FileExistsError): save_sae(sae, link_cfg, tmp_path / "sae")
    save_sae(sae, link_cfg, tmp_path / "sae", overwrite=True)
    with pytest.raises(ParamError, match="d_sae"): save_sae(sae, small_cfg(kind="relu", d_sae=41), tmp_path / "x")
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**saved, "colour": "red"}))
    with pytest.raises(CorruptFileError, match="cfg.json.*colour"): load_sae(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**saved, "format": "other"}))
    with pytest.raises(ValueError, match="dyntrack-sae-v1"): load_sae(tmp_path / "sae")


def tiny_registry(monkeypatch):
    "A copy of the format registry for one test, so the classes a test defines do not stay registered."
    monkeypatch.setattr(sae_mod, "FORMATS", dict(sae_mod.FORMATS))


@dataclasses.dataclass
class TinyConfig:
    width: int = 3
    gain: float = 1.0


def test_load_builds_the_class_registered_for_the_saved_format(tmp_path, monkeypatch):
    "A model class defined outside sae (as a crosscoder's package would) registers its format and loads back as itself."
    tiny_registry(monkeypatch)

    class Tiny(DictionaryModel, format="test-tiny-v1", config=TinyConfig):
        def __init__(self, cfg, device=None):
            super().__init__()
            self.cfg, self.w = cfg, torch.nn.Parameter(torch.arange(float(cfg.width), device=device))
        def check_config(self, cfg):
            if cfg.width != self.cfg.width: raise ParamError(f"width={cfg.width} is not this model's {self.cfg.width}")

    model = Tiny(TinyConfig(width=4, gain=2.5))
    save_sae(model, model.cfg, tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "cfg.json").read_text()) == dict(format="test-tiny-v1", module=__name__, width=4, gain=2.5)
    back = load_sae(tmp_path / "tiny")
    assert type(back) is Tiny and back.cfg == TinyConfig(4, 2.5) and torch.equal(back.w, model.w)
    assert type(load_sae(save_sae(randomised(SparseAutoencoder(small_cfg())), small_cfg(), tmp_path / "sae"))) is SparseAutoencoder
    with pytest.raises(ParamError, match="width=5"): save_sae(model, TinyConfig(width=5), tmp_path / "other")
    with pytest.raises(ParamError, match="test-tiny-v1.*taken"):
        class Impostor(DictionaryModel, format="test-tiny-v1", config=TinyConfig): pass


@pytest.mark.parametrize("saved_format", ["dyntrack-crosscoder-v0", None])
def test_unknown_format_names_the_file_and_the_known_formats(tmp_path, saved_format):
    save_sae(SparseAutoencoder(small_cfg()), small_cfg(), tmp_path / "sae")
    path = tmp_path / "sae" / "cfg.json"
    saved = {k: v for k, v in json.loads(path.read_text()).items() if k != "format"}
    path.write_text(json.dumps(saved if saved_format is None else {"format": saved_format, **saved}))
    with pytest.raises(CorruptFileError) as e: load_sae(tmp_path / "sae")
    message = str(e.value)
    assert message.startswith(f"{path} has format {saved_format!r}") and "not a known format (" in message, message
    assert "dyntrack-sae-v1" in message.split("known format (")[1], message


# --- SAELens ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saelens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("kind, scale", [("relu", 1.0), ("topk", 1.0), ("topk", 3.5)])
def test_saelens_loads_our_export(saelens, tmp_path, kind, scale):
    ours = randomised(SparseAutoencoder(small_cfg(kind=kind, k=3)))
    to_saelens(ours, ours.cfg, tmp_path / "export", hook_name="blocks.2.hook_resid_pre", model_name="tiny", scale=scale)
    theirs = saelens.SAE.load_from_disk(tmp_path / "export")
    assert type(theirs).__name__ == {"relu": "StandardSAE", "topk": "TopKSAE"}[kind]
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x * scale).latents)
        torch.testing.assert_close(theirs(x), ours(x * scale).recon / scale)
        z = torch.relu(torch.randn(20, 40))
        torch.testing.assert_close(theirs.decode(z), ours.decode(z) / scale)
    back = from_saelens(tmp_path / "export")
    assert dataclasses.replace(back.cfg, unit_norm_decoder=True) == ours.cfg and back.cfg.unit_norm_decoder == (scale == 1.0)


@pytest.mark.parametrize("arch, b_dec_in", [("standard", True), ("standard", False), ("topk", True)])
def test_we_load_a_saelens_save(saelens, tmp_path, arch, b_dec_in):
    common = dict(d_in=12, d_sae=30, apply_b_dec_to_input=b_dec_in)
    theirs = (saelens.StandardSAE(saelens.StandardSAEConfig(**common)) if arch == "standard"
              else saelens.TopKSAE(saelens.TopKSAEConfig(**common, k=5)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (theirs.W_enc, theirs.b_enc, theirs.W_dec, theirs.b_dec): p.copy_(torch.randn(p.shape, generator=gen))
    theirs.save_model(tmp_path / "theirs")
    ours = from_saelens(tmp_path / "theirs")
    assert ours.cfg.kind == ("relu" if arch == "standard" else "topk") and not ours.cfg.unit_norm_decoder
    x = torch.randn(25, 12, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).latents, theirs.encode(x))
        torch.testing.assert_close(ours(x).recon, theirs(x))


def test_from_saelens_refuses_what_it_cannot_express(tmp_path):
    sae = SparseAutoencoder(small_cfg())
    to_saelens(sae, sae.cfg, tmp_path / "e", hook_name="h")
    cfg_path = tmp_path / "e" / "cfg.json"
    raw = json.loads(cfg_path.read_text())
    for key, value in [("normalize_activations", "layer_norm"), ("reshape_activations", "hook_z"),
                       ("rescale_acts_by_decoder_norm", True), ("architecture", "jumprelu")]:
        cfg_path.write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ParamError, match=key): from_saelens(tmp_path / "e")
    cfg_path.write_text(json.dumps({**raw, "d_sae": 41}))
    with pytest.raises(ValueError, match="W_enc"): from_saelens(tmp_path / "e")


@pytest.mark.parametrize("name, damage", [
    ("sae.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    ("sae.safetensors", lambda p: p.unlink()),
    ("cfg.json", lambda p: p.write_text('{"format": "dyntrack-sae-v1", "d_mod')),
    ("cfg.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "d_sae": -1}))),
    ("cfg.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "d_sae": 41}))),  # not the weights'
    ("cfg.json", lambda p: p.write_text("[1, 2]")),
])
def test_damaged_sae_folder_names_the_file(tmp_path, name, damage):
    sae = randomised(SparseAutoencoder(small_cfg()))
    save_sae(sae, sae.cfg, tmp_path / "sae")
    damage(tmp_path / "sae" / name)
    error = FileNotFoundError if not (tmp_path / "sae" / name).exists() else CorruptFileError
    wrong = "sae.safetensors" if "41" in (tmp_path / "sae" / "cfg.json").read_text() else name  # the weights disagree
    with pytest.raises(error, match="^" + str(tmp_path / "sae" / wrong).replace(".", r"\.")):
        load_sae(tmp_path / "sae")


def test_damaged_saelens_weights_name_the_file(tmp_path):
    sae = SparseAutoencoder(small_cfg())
    to_saelens(sae, sae.cfg, tmp_path / "e", hook_name="h")
    weights = tmp_path / "e" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CorruptFileError, match=r"sae_weights\.safetensors cannot be read.*export the SAE again"):
        from_saelens(tmp_path / "e")
