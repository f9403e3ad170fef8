"SAE training and evaluation: warm starts, schedules, exact resume (skipping without recomputing), any DictionaryModel, planted-feature recovery, spliced ΔCE."
import dataclasses, json, shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyntrack.acts import ActivationBuffer
from dyntrack.core import CorruptFileError, ParamError
from dyntrack.models.presets import build_model, model_config
from dyntrack.sae.model import DictionaryModel, EncoderOutput, ForwardOutput, SaeConfig, SparseAutoencoder, load_sae
from dyntrack.sae.train import (_splice, delta_ce, max_cosine, planted_sparse_data, sae_lr, skip_batches, sparsity_scale,
                                splice_eval, train_sae)
from dyntrack.train.state import load_run_state, read_log
from dyntrack.train.trainer import lm_loss

VOCAB = 61


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_cfg(**kw) -> SaeConfig:
    return SaeConfig(**{**dict(d_model=16, d_sae=48, kind="topk", k=2, lr=5e-3, warmup_steps=3, batch_size=64,
                                n_tokens=64 * 12, dead_tokens=64 * 3), **kw})


def params(sae) -> dict:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# --- learning the planted features --------------------------------------------------------------------------

@pytest.mark.parametrize("kind, extra", [("topk", dict(k=3)), ("relu", dict(l1_coef=0.2, lr=1e-2))])
def test_recovers_planted_features(kind, extra):
    steps = 300 if kind == "topk" else 800
    data = planted_sparse_data(256 * steps, d_model=32, n_features=64, k=3)
    cfg = SaeConfig(**{**dict(d_model=32, d_sae=128, kind=kind, lr=3e-3, warmup_steps=10, batch_size=256,
                              n_tokens=256 * steps, dead_tokens=256 * 20), **extra})
    res = train_sae(SparseAutoencoder(cfg), data.x.split(256), cfg)
    cos = max_cosine(data.features, res.sae.W_dec)
    assert res.steps == steps and cos.mean() > 0.97 and (cos > 0.9).float().mean() > 0.95, cos
    assert set(res.history[-1]) >= {"loss", "recon_loss", "sparsity_loss", "aux_loss", "l0", "dead_fraction", "lr"}


def test_b_dec_initialisation():
    data = planted_sparse_data(64 * 2, 16, 32, 2)
    for how in ("geometric_median", "mean", "zeros"):
        cfg = planted_cfg(b_dec_init=how, n_tokens=64, lr=1e-9)
        sae = train_sae(SparseAutoencoder(cfg), data.x.split(64), cfg).sae
        expected = {"mean": data.x[:64].mean(0), "zeros": torch.zeros(16)}.get(how)
        if expected is not None: torch.testing.assert_close(sae.b_dec, expected, atol=1e-6, rtol=0)
        else: assert (sae.b_dec - data.x[:64].mean(0)).norm() > 1e-3  # the median is not the mean


# --- warm starts --------------------------------------------------------------------------------------------------

def test_warm_start_copies_weights_not_optimizer_state():
    data = planted_sparse_data(64 * 24, 16, 32, 2)
    cfg = planted_cfg()
    first = train_sae(SparseAutoencoder(cfg), data.x[:64 * 12].split(64), cfg).sae
    before = params(first)
    link_cfg = dataclasses.replace(cfg, lr=4e-4, warmup_steps=2, n_tokens=64 * 4, seed=7)
    seen = []
    link = SparseAutoencoder(link_cfg)
    res = train_sae(link, data.x[64 * 12:].split(64), link_cfg, warm_start=first,
                    callbacks=[lambda step, rec, sae: seen.append(params(sae)) if step == 1 else None])
    assert [r["lr"] for r in res.history] == pytest.approx([2e-4, 4e-4, 4e-4, 4e-4])
    # a fresh Adam's first update is lr · g/(|g| + eps) ≈ ±lr for every element with a gradient; b_dec has no
    # norm constraint, so its first step shows it (an inherited Adam state would scale it differently)
    step1 = (seen[0]["b_dec"] - before["b_dec"]).abs()
    torch.testing.assert_close(step1, torch.full_like(step1, 2e-4), rtol=1e-3, atol=0)
    assert (seen[0]["W_enc"] - before["W_enc"]).abs().max() <= 2e-4 * 1.01  # started from the copied weights
    for k, v in params(first).items(): assert torch.equal(v, before[k])  # the predecessor is untouched
    assert not torch.equal(link.W_dec, first.W_dec)


def test_l2_pull_keeps_link_closer():
    data = planted_sparse_data(64 * 24, 16, 32, 2)
    cfg = planted_cfg()
    first = train_sae(SparseAutoencoder(cfg), data.x[:64 * 12].split(64), cfg).sae
    moved = data.x[64 * 12:] @ torch.linalg.matrix_exp(0.3 * (lambda a: a - a.T)(torch.randn(16, 16)))
    dist = {}
    for pull in (0.0, 10.0):
        link = train_sae(SparseAutoencoder(cfg), moved.split(64), cfg, warm_start=first, l2_pull=pull).sae
        dist[pull] = sum((a - b).pow(2).sum() for a, b in zip(link.parameters(), first.parameters())).item()
    assert dist[10.0] < dist[0.0]
    with pytest.raises(ParamError, match="warm_start"): train_sae(SparseAutoencoder(cfg), moved.split(64), cfg, l2_pull=1.0)


# --- checkpoints and resume -------------------------------------------------------------------------------------

class Interrupt(Exception): pass


def stop_at(n: int):
    def callback(step, record, sae):
        if step == n: raise Interrupt
    return callback


def test_resume_equals_uninterrupted(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg = planted_cfg()  # topk with a short dead window: the AuxK counters must survive the restart
    batches = data.x.split(64)
    ref = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "ref", checkpoint_every=4)
    assert ref.history[-1]["aux_loss"] > 0  # the dead-latent counter was in play
    with pytest.raises(Interrupt):
        train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run", checkpoint_every=4, callbacks=[stop_at(6)])
    assert json.loads((tmp_path / "run" / "state" / "state.json").read_text())["step"] == 4
    resumed = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run", checkpoint_every=4)
    assert resumed.steps == 12 and [r["step"] for r in resumed.history] == list(range(5, 13))
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    log = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert log("run") == log("ref")
    assert torch.equal(load_sae(tmp_path / "run" / "sae").W_dec, ref.sae.W_dec)
    again = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run")
    assert again.history == [] and again.steps == 12
    with pytest.raises(ParamError, match="lr"):
        train_sae(SparseAutoencoder(cfg), batches, dataclasses.replace(cfg, lr=1e-3), out_dir=tmp_path / "run")


def test_records_settled_a_step_late_equal_those_settled_at_once(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg, batches = planted_cfg(), data.x.split(64)
    late = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "late")  # no callback: one step late
    seen = []
    now = train_sae(SparseAutoencoder(cfg), batches, cfg, callbacks=[lambda step, rec, sae: seen.append((step, rec))])
    assert [r["step"] for r in late.history] == list(range(1, 13)) and late.history == now.history
    assert seen == [(r["step"], r) for r in now.history]  # each callback gets its own step's record, at once
    logged = [json.loads(l) for l in (tmp_path / "late" / "log.jsonl").read_text().splitlines()]
    assert logged == late.history and logged[-1]["aux_loss"] > 0


def test_exhausted_and_bad_batches():
    cfg = planted_cfg()
    res = train_sae(SparseAutoencoder(cfg), torch.randn(64 * 5, 16).split(64), cfg)
    assert res.exhausted and res.steps == 5 and res.tokens_seen == 320
    with pytest.raises(ParamError, match="batch_size=64"): train_sae(SparseAutoencoder(cfg), [torch.randn(10, 16)], cfg)
    with pytest.raises(ParamError, match="d_sae"): train_sae(SparseAutoencoder(cfg), [], planted_cfg(d_sae=50))
    assert sae_lr(0, cfg) == pytest.approx(cfg.lr / 3) and sae_lr(2, cfg) == sae_lr(99, cfg) == cfg.lr
    assert [sae_lr(s, cfg) for s in range(3)] == [cfg.lr * (1 / 3), cfg.lr * (2 / 3), cfg.lr]  # the old arithmetic, to the bit


# --- ΔCE -----------------------------------------------------------------------------------------------------------

def counting(n: int, seed: int) -> torch.Tensor:
    return (torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed)) + torch.arange(13)) % VOCAB


@pytest.fixture(scope="module")
def counting_model():
    "A tiny GPT-NeoX taught to count, so zero-ablation really hurts and the recovered fraction means something."
    torch.set_num_threads(1)
    model = build_model(model_config("gpt_neox", "tiny", vocab_size=VOCAB, max_seq_len=16), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(50):
        loss = lm_loss(model, counting(16, step))
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


def identity_sae(d_model: int, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_model=d_model, d_sae=2 * d_model, batch_size=2, n_tokens=2))
    with torch.no_grad():
        eye = torch.eye(d_model)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1)); sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_dec.copy_(torch.randn(d_model, generator=torch.Generator().manual_seed(seed)))
    return sae


@pytest.mark.parametrize("layer", [0, 1])
def test_identity_sae_has_zero_delta_ce(counting_model, layer):
    windows = [counting(4, 100 + i) for i in range(2)]
    res = splice_eval(counting_model, identity_sae(64), windows, layer=layer, scale=2.5)
    assert abs(res.delta_ce) < 1e-5 and abs(res.recovered - 1) < 1e-4 and res.zero_ablated > res.clean + 1
    assert abs(delta_ce(counting_model, identity_sae(64), windows, layer, drop_first=0)) < 1e-5
    bad = splice_eval(counting_model, SparseAutoencoder(SaeConfig(d_model=64, expansion=2)), windows, layer=layer)
    assert bad.delta_ce > 0.05 and bad.recovered < 1 and bad.clean == res.clean
    with pytest.raises(ParamError, match="layer"): splice_eval(counting_model, identity_sae(64), windows, layer=2)


def test_splice_hook_handles_keyword_hidden_states():
    class Block(nn.Module):
        def forward(self, hidden_states, scale=1.0): return hidden_states * scale
    block = Block()
    block.register_forward_pre_hook(lambda m, a, kw: _splice(torch.zeros_like, 1, m, a, kw), with_kwargs=True)
    h = torch.ones(2, 3, 4)
    for out in (block(h, scale=2.0), block(hidden_states=h, scale=2.0)):
        assert (out[:, 0] == 2).all() and (out[:, 1:] == 0).all()


# --- the run folder under faults ------------------------------------------------------------------------------

DEAD_PID = 2**22 + 4321  # above the largest pid Linux hands out: no process has it


def interrupted_run(tmp_path, cfg, batches):
    "A run into tmp_path/'run' stopped after step 6, its state saved at step 4."
    with pytest.raises(Interrupt):
        train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run", checkpoint_every=4, callbacks=[stop_at(6)])
    return tmp_path / "run"


def test_kill_between_the_renames_of_a_state_save_resumes_from_it(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg, batches = planted_cfg(), data.x.split(64)
    ref = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "ref", checkpoint_every=4)
    run = interrupted_run(tmp_path, cfg, batches)
    (run / "state").rename(run / f".state.old-{DEAD_PID}-abcd1234")  # killed between the renames of the next save
    (run / f".state.tmp-{DEAD_PID}-0123abcd").mkdir()  # and its half-written copy
    resumed = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=run, checkpoint_every=4)
    assert [r["step"] for r in resumed.history] == list(range(5, 13))  # from the saved step 4, not from 0
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    assert read_log(run / "log.jsonl") == read_log(tmp_path / "ref" / "log.jsonl")
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", "sae", "state"]  # dead writers' leftovers gone


def test_lost_state_is_refused_not_restarted(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg, batches = planted_cfg(), data.x.split(64)
    run = interrupted_run(tmp_path, cfg, batches)
    shutil.rmtree(run / "state")
    log = (run / "log.jsonl").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"state is missing.*got to step 6, past its state save at step 4.*delete"):
        train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=run, checkpoint_every=4)
    assert (run / "log.jsonl").read_bytes() == log


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json"])
def test_damaged_state_names_the_file(tmp_path, name):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg, batches = planted_cfg(), data.x.split(64)
    path = interrupted_run(tmp_path, cfg, batches) / "state" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="^" + str(path).replace(".", r"\.") + " .*delete"):
        train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run", checkpoint_every=4)


def test_torn_last_log_line_does_not_stop_a_finished_run(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg, batches = planted_cfg(), data.x.split(64)
    first = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run")
    with open(tmp_path / "run" / "log.jsonl", "a") as f: f.write('{"step": 13, "lo')  # killed mid-append
    again = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "run")
    assert again.history == [] and again.steps == 12 and read_log(tmp_path / "run" / "log.jsonl") == first.history


def test_state_is_the_shared_run_state_and_leaves_the_callers_rng_alone(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg, batches = planted_cfg(), data.x.split(64)
    ref = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=tmp_path / "ref", checkpoint_every=4)
    run = interrupted_run(tmp_path, cfg, batches)
    assert sorted(p.name for p in (run / "state").iterdir()) == ["model.safetensors", "optimizer.pt", "state.json"]
    sae = SparseAutoencoder(cfg)
    loaded = load_run_state(run / "state", sae, torch.optim.Adam(sae.parameters()), "", restore_rng=False)
    assert loaded.counters["step"] == 4 and loaded.tensors["since_fired"].shape == (cfg.d_sae,)  # the train.state layout
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resumed = train_sae(SparseAutoencoder(cfg), batches, cfg, out_dir=run, checkpoint_every=4)  # resumed from state/
    assert torch.equal(torch.rand(3), expected)  # training draws nothing and the saved RNG states were not restored
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k


# --- schedules -------------------------------------------------------------------------------------------------

def test_schedule_known_values():
    cfg = planted_cfg(lr=1e-3, warmup_steps=2, lr_decay_fraction=0.3, l1_warmup_steps=4, n_tokens=64 * 10)
    # lr_at's tail: from step 10 − round(0.3 · 10) = 7 the lr falls linearly to 0 at the last step
    assert [sae_lr(step, cfg) for step in range(10)] == pytest.approx([5e-4] + [1e-3] * 7 + [5e-4, 0.0], abs=1e-15)
    assert [sparsity_scale(step, cfg) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    plain = planted_cfg()  # the defaults leave today's runs alone: no decay, no λ warm-up
    assert [sae_lr(step, plain) for step in range(12)] == [plain.lr * (1 / 3), plain.lr * (2 / 3)] + [plain.lr] * 10
    assert {sparsity_scale(step, plain) for step in range(12)} == {1.0}


def test_schedules_reach_the_run():
    data = planted_sparse_data(64 * 10, 16, 32, 2)
    cfg = planted_cfg(kind="relu", l1_coef=0.1, lr_decay_fraction=0.5, l1_warmup_steps=4, n_tokens=64 * 10)
    batches, penalty = data.x.split(64), {}
    def next_penalty(step, record, sae):  # the unscaled penalty the next step will see: its batch, these weights
        if step < len(batches):
            with torch.no_grad(): penalty[step] = sae.sparsity_penalty(sae.encode(batches[step])).item()
    res = train_sae(SparseAutoencoder(cfg), batches, cfg, callbacks=[next_penalty])
    assert [r["lr"] for r in res.history] == [sae_lr(step, cfg) for step in range(10)] and res.history[-1]["lr"] == 0
    assert res.history[0]["sparsity_loss"] == 0 and res.history[0]["loss"] == res.history[0]["recon_loss"]
    for step in range(1, 10):
        assert res.history[step]["sparsity_loss"] == pytest.approx(sparsity_scale(step, cfg) * penalty[step], rel=1e-5)
    full = train_sae(SparseAutoencoder(cfg), batches, dataclasses.replace(cfg, l1_warmup_steps=0)).history
    assert full[0]["sparsity_loss"] > 0 and full[0]["recon_loss"] == res.history[0]["recon_loss"]


# --- resuming without recomputing skipped batches ---------------------------------------------------------------

class Replayable:
    "Batches of `x`; `skip(n)` gives those after the first n without making the skipped ones, as a buffer would."
    def __init__(self, x: torch.Tensor, batch_size: int):
        self.x, self.batch_size, self.made, self.skips = x, batch_size, 0, []

    def _from(self, first: int):
        for b in range(first, len(self.x) // self.batch_size):
            self.made += 1
            yield self.x[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self): return self._from(0)

    def skip(self, n_batches: int):
        self.skips.append(n_batches)
        return self._from(n_batches)


def test_skip_batches_uses_skip_where_the_source_has_it():
    x = torch.arange(40.0).reshape(10, 4)
    source = Replayable(x, 2)
    assert [b[0, 0].item() for b in skip_batches(source, 3)] == [24.0, 32.0]
    assert source.skips == [3] and source.made == 2
    assert [b[0, 0].item() for b in skip_batches(x.split(2), 3)] == [24.0, 32.0]  # no skip: read and dropped
    assert list(skip_batches(x.split(2), 7)) == [] and len(list(skip_batches(Replayable(x, 2), 0))) == 5


def test_resume_calls_skip_and_equals_uninterrupted(tmp_path):
    data = planted_sparse_data(64 * 12, 16, 32, 2)
    cfg = planted_cfg()
    ref = train_sae(SparseAutoencoder(cfg), Replayable(data.x, 64), cfg, out_dir=tmp_path / "ref", checkpoint_every=4)
    with pytest.raises(Interrupt):
        train_sae(SparseAutoencoder(cfg), Replayable(data.x, 64), cfg, out_dir=tmp_path / "run", checkpoint_every=4,
                  callbacks=[stop_at(6)])
    source = Replayable(data.x, 64)
    resumed = train_sae(SparseAutoencoder(cfg), source, cfg, out_dir=tmp_path / "run", checkpoint_every=4)
    assert source.skips == [4] and source.made == 8  # the 4 batches before the saved state were never made
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    assert read_log(tmp_path / "run" / "log.jsonl") == read_log(tmp_path / "ref" / "log.jsonl")


def buffer_run(model, out_dir, stop: int | None = None):
    "A TopK SAE trained on an ActivationBuffer over the counting model, state saved at step 30; (result or None, buffer)."
    cfg = SaeConfig(d_model=64, d_sae=96, kind="topk", k=4, lr=3e-3, warmup_steps=3, batch_size=32,
                    n_tokens=32 * 40, dead_tokens=32 * 4)
    buffer = ActivationBuffer(model, layer=1, source=[counting(4, 400 + i) for i in range(32)], buffer_tokens=64,
                              batch_size=32, seed=3)  # token batches of 4 × 12 rows
    callbacks = [stop_at(stop)] if stop is not None else []
    try: return train_sae(SparseAutoencoder(cfg), buffer, cfg, out_dir=out_dir, checkpoint_every=30, callbacks=callbacks), buffer
    except Interrupt: return None, buffer


def test_resume_from_an_activation_buffer_equals_uninterrupted(counting_model, tmp_path):
    ref, _ = buffer_run(counting_model, tmp_path / "ref")
    buffer_run(counting_model, tmp_path / "run", stop=33)
    resumed, _ = buffer_run(counting_model, tmp_path / "run")
    assert [r["step"] for r in resumed.history] == list(range(31, 41))
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    assert read_log(tmp_path / "run" / "log.jsonl") == read_log(tmp_path / "ref" / "log.jsonl")


def test_resumed_buffer_does_not_harvest_what_was_skipped(counting_model, tmp_path):
    _, whole = buffer_run(counting_model, tmp_path / "ref")
    buffer_run(counting_model, tmp_path / "run", stop=33)
    _, resumed = buffer_run(counting_model, tmp_path / "run")
    # 30 batches skipped = 960 rows handed out, of the 1300-odd the whole run harvests; the resumed buffer harvests
    # the 10 batches' worth it still hands out and the token batches with rows still held (a few buffer_tokens)
    assert resumed.n_tokens < whole.n_tokens - 480, (resumed.n_tokens, whole.n_tokens)


# --- any DictionaryModel: a crosscoder-shaped model [batch, n_checkpoints, d_model] ----------------------------

@dataclasses.dataclass
class ToyCrosscoderConfig:
    "A crosscoder's config as the trainer sees it: its own architecture fields plus the training fields."
    n_checkpoints: int = 2
    d_model: int = 8
    d_sae: int = 24
    l1_coef: float = 0.05
    lr: float = 5e-3
    warmup_steps: int = 2
    lr_decay_fraction: float = 0.25
    l1_warmup_steps: int = 3
    batch_size: int = 32
    n_tokens: int = 32 * 12
    dead_tokens: int = 32 * 100
    seed: int = 0

    @property
    def n_steps(self) -> int: return self.n_tokens // self.batch_size


class ToyCrosscoder(DictionaryModel, format="test-crosscoder-v1", config=ToyCrosscoderConfig):
    "f = ReLU(Σ_m x_m W_enc^m + b_enc), x̂_m = f W_dec^m + b_dec^m, penalty λ Σ_i f_i Σ_m ‖W_dec,i^m‖ (METHODS.md §2)."
    def __init__(self, cfg: ToyCrosscoderConfig, device=None):
        super().__init__()
        self.cfg, gen = cfg, torch.Generator().manual_seed(cfg.seed)
        m, d, h = cfg.n_checkpoints, cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(0.1 * torch.randn(m, d, h, generator=gen).to(device))
        self.b_enc = nn.Parameter(torch.zeros(h, device=device))
        self.W_dec = nn.Parameter(0.1 * torch.randn(h, m, d, generator=gen).to(device))
        self.b_dec = nn.Parameter(torch.zeros(m, d, device=device))

    @property
    def n_latents(self) -> int: return self.cfg.d_sae

    def check_config(self, cfg) -> None:
        if (cfg.n_checkpoints, cfg.d_model, cfg.d_sae) != (self.cfg.n_checkpoints, self.cfg.d_model, self.cfg.d_sae):
            raise ParamError("config does not describe this crosscoder")

    def sparsity_penalty(self, code: EncoderOutput) -> torch.Tensor:
        return self.cfg.l1_coef * (code.latents * self.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()

    def forward(self, x, dead_mask=None, sparsity_scale: float = 1.0) -> ForwardOutput:
        pre = torch.einsum("bmd,mdh->bh", x, self.W_enc) + self.b_enc  # [batch, d_sae]
        code = EncoderOutput(pre, F.relu(pre), None, None)
        recon = torch.einsum("bh,hmd->bmd", code.latents, self.W_dec) + self.b_dec  # [batch, n_checkpoints, d_model]
        recon_loss = (recon - x).pow(2).sum((1, 2)).mean()
        sparsity = sparsity_scale * self.sparsity_penalty(code)
        return ForwardOutput(recon, code, recon_loss, sparsity, recon_loss.new_zeros(()), recon_loss + sparsity)


def two_checkpoints(n: int) -> torch.Tensor:
    "Activations [n, 2, 8]: the same planted features, the second checkpoint's rotated a little."
    data = planted_sparse_data(n, 8, 12, 2, seed=5)
    rotation = torch.linalg.matrix_exp(0.1 * (lambda a: a - a.T)(torch.randn(8, 8, generator=torch.Generator().manual_seed(7))))
    return torch.stack([data.x, data.x @ rotation], dim=1)


def test_a_crosscoder_trains_saves_and_resumes_through_the_same_trainer(tmp_path):
    cfg = ToyCrosscoderConfig()
    x = two_checkpoints(32 * 12)
    ref = train_sae(ToyCrosscoder(cfg), x.split(32), cfg, out_dir=tmp_path / "ref", checkpoint_every=4)
    assert ref.steps == 12 and ref.history[-1]["recon_loss"] < 0.8 * ref.history[0]["recon_loss"]  # it learns
    assert ref.history[0]["sparsity_loss"] == 0 and ref.history[-1]["sparsity_loss"] > 0 and ref.history[-1]["lr"] == 0
    assert ref.tokens_seen == 32 * 12  # rows are token positions, dim 0
    back = load_sae(tmp_path / "ref" / "sae")
    assert type(back) is ToyCrosscoder and back.cfg == cfg and torch.equal(back.W_dec, ref.sae.W_dec)
    with pytest.raises(Interrupt):
        train_sae(ToyCrosscoder(cfg), x.split(32), cfg, out_dir=tmp_path / "run", checkpoint_every=4, callbacks=[stop_at(6)])
    resumed = train_sae(ToyCrosscoder(cfg), x.split(32), cfg, out_dir=tmp_path / "run", checkpoint_every=4)
    for k, v in params(ref.sae).items(): assert torch.equal(params(resumed.sae)[k], v), k
    with pytest.raises(ParamError, match="crosscoder"):
        train_sae(ToyCrosscoder(cfg), x.split(32), dataclasses.replace(cfg, d_sae=25))
