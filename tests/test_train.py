"""Tests of dyntrack.train.trainer: learning, exact resume, DDP equivalence and options, checkpoints, accumulation, config
checks, callbacks (with state, before checkpoints), growing the model mid-run."""
import copy, dataclasses, json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dyntrack.train.trainer as train_mod
from dyntrack.core import CorruptFileError, ParamError
from dyntrack.models.presets import build_model, model_config
from dyntrack.models.suite import CheckpointSuite, read_manifest
from dyntrack.data.tokens import TokenShards
from dyntrack.train.state import read_log, truncate_log
from dyntrack.train.trainer import Callback, History, TrainConfig, Trainer, block_params, flops_per_token, lm_loss

os.environ["DYNTRACK_PROGRESS"] = "0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def counting(direction: int, n_tokens: int, seed: int, vocab: int = 64) -> np.ndarray:
    "Token stream counting up (or down) modulo `vocab`, restarting at a random token every 16 tokens."
    starts = np.random.default_rng(seed).integers(0, vocab, n_tokens // 16 + 1)
    return ((starts[:, None] + direction * np.arange(16)) % vocab).ravel()[:n_tokens].astype(np.uint16)


def make_data() -> TokenShards:
    return TokenShards.from_arrays(train={"up": counting(1, 20_000, 0), "down": counting(-1, 20_000, 1)},
                                   val={"up": counting(1, 2_000, 2), "down": counting(-1, 2_000, 3)}, vocab_size=64)


def make_model(dropout: float = 0.0, seed: int = 0):
    cfg = model_config("gpt_neox", "tiny", vocab_size=64, max_seq_len=64, hidden_dropout=dropout,
                       attention_dropout=dropout)
    return build_model(cfg, seed=seed)


def make_config(**kw) -> TrainConfig:
    base = dict(total_steps=12, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=2, checkpoint_steps=[0, 4, 12],
                resume_every=5, log_every=1, eval_tokens=256)
    return TrainConfig(**{**base, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def log_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_loss_decreases(tmp_path):
    history = History()
    cfg = make_config(total_steps=30, batch_size=16, seq_len=32, checkpoint_steps=[0, 30])
    result = Trainer(make_model(), None, make_data(), cfg, tmp_path, callbacks=[history]).fit()
    losses = [r["loss"] for r in history.records]
    assert result.steps == 30 and result.tokens_seen == 30 * 16 * 32 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    val = [r["val_loss"] for r in log_records(tmp_path) if "val_loss" in r]
    assert [set(v) for v in val] == [{"up", "down"}] * 2
    assert all(val[1][d] < 0.7 * val[0][d] for d in ("up", "down"))


class Killed(Exception):
    pass


class Kill(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_start(self, trainer, step):
        if step == self.at: raise Killed(step)


def test_kill_and_resume_is_bit_identical(tmp_path):
    cfg, data = make_config(), make_data()
    full = make_model(dropout=0.1)  # dropout: resume must restore the RNG too
    Trainer(full, None, data, cfg, tmp_path / "full").fit()
    with pytest.raises(Killed):
        Trainer(make_model(dropout=0.1), None, data, cfg, tmp_path / "cut", callbacks=[Kill(8)]).fit()
    assert json.loads((tmp_path / "cut/trainer_state/state.json").read_text())["step"] == 5
    assert (tmp_path / "cut/step4").exists() and not (tmp_path / "cut/step12").exists()
    resumed = make_model(dropout=0.1, seed=123)  # any init: the saved weights replace it
    result = Trainer(resumed, None, data, cfg, tmp_path / "cut").fit()
    assert result.steps == 12
    for k, v in weights(full).items(): assert torch.equal(v, resumed.state_dict()[k]), k
    full_log, cut_log = log_records(tmp_path / "full"), log_records(tmp_path / "cut")
    assert [r["step"] for r in cut_log] == list(range(13))  # no duplicates from the killed tail
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]
    assert read_manifest(tmp_path / "cut")["checkpoints"] == read_manifest(tmp_path / "full")["checkpoints"]


def test_kill_before_first_state_save_restarts(tmp_path):
    cfg, data = make_config(resume_every=0), make_data()
    with pytest.raises(Killed):
        Trainer(make_model(), None, data, cfg, tmp_path, callbacks=[Kill(6)]).fit()
    assert not (tmp_path / "trainer_state").exists() and (tmp_path / "step4").exists()
    result = Trainer(make_model(), None, data, cfg, tmp_path).fit()  # rewrites step0/step4 of the same run
    assert result.steps == 12 and [r["step"] for r in log_records(tmp_path)] == list(range(13))


def test_finished_run_returns_without_training(tmp_path):
    cfg, data = make_config(total_steps=4, checkpoint_steps=[4]), make_data()
    first = Trainer(make_model(), None, data, cfg, tmp_path).fit()
    model = make_model(seed=5)
    again = Trainer(model, None, data, cfg, tmp_path).fit()
    assert (again.steps, again.loss, again.flops) == (first.steps, first.loss, first.flops)
    saved = load_file(tmp_path / "trainer_state/model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_different_config_is_refused_and_nothing_changes(tmp_path):
    cfg, data = make_config(total_steps=4, checkpoint_steps=[0, 4]), make_data()
    Trainer(make_model(), None, data, cfg, tmp_path).fit()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = dataclasses.replace(cfg, lr=1e-3, batch_size=4)
    with pytest.raises(ParamError, match=r"different config.*batch_size \(saved 8, given 4\).*lr \(saved 0.003"):
        Trainer(make_model(), None, data, other, tmp_path).fit()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    Trainer(make_model(), None, data, dataclasses.replace(cfg, log_every=3), tmp_path).fit()  # cannot change weights


def test_checkpoints_and_manifest(tmp_path):
    cfg = make_config(total_steps=8, checkpoint_steps=[0, 1, 2, 4, 8], eval_steps=[0, 8])
    seen = []

    class OnCheckpoint(Callback):
        def on_checkpoint(self, trainer, step): seen.append((step, (trainer.run_dir / f"step{step}").exists()))

    Trainer(make_model(), None, make_data(), cfg, tmp_path, callbacks=[OnCheckpoint()]).fit()
    manifest = read_manifest(tmp_path)
    assert [(c["step"], c["tokens_seen"], c["path"]) for c in manifest["checkpoints"]] == [
        (s, s * 8 * 16, f"step{s}") for s in (0, 1, 2, 4, 8)]
    assert seen == [(s, True) for s in (0, 1, 2, 4, 8)]
    train_meta = manifest["meta"]["train"]
    assert train_meta["0"]["loss"] is None and set(train_meta["8"]["val_loss"]) == {"up", "down"}
    assert train_meta["4"]["val_loss"] is None and train_meta["4"]["loss"] > 0
    suite = CheckpointSuite.from_run(tmp_path)
    assert suite.steps == [0, 1, 2, 4, 8]
    final = suite.load_model(step=8)
    saved = load_file(tmp_path / "trainer_state/model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in final.state_dict().items())


def test_grad_accumulation_equals_full_batch(tmp_path):
    cfg, data = make_config(total_steps=4, checkpoint_steps=[], eval_steps=[]), make_data()
    one, four = make_model(), make_model()
    r1 = Trainer(one, None, data, cfg, tmp_path / "a").fit()
    r4 = Trainer(four, None, data, dataclasses.replace(cfg, grad_accum=4), tmp_path / "b").fit()
    assert r1.flops == r4.flops
    assert abs(r1.loss - r4.loss) < 1e-5
    for (k, a), b in zip(one.state_dict().items(), four.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import make_config, make_data, make_model
from dyntrack.train.trainer import Trainer
torch.set_num_threads(1)
Trainer(make_model(), None, make_data(), make_config(**{kw!r}), {run_dir!r}).fit()
"""


def test_ddp_two_processes_match_one(tmp_path):
    kw = dict(total_steps=5, checkpoint_steps=[5], eval_steps=[], resume_every=0)
    single = make_model()
    Trainer(single, None, make_data(), make_config(**kw), tmp_path / "single").fit()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), kw=kw, run_dir=str(tmp_path / "ddp")))
    env = dict(os.environ, OMP_NUM_THREADS="1", DYNTRACK_PROGRESS="0")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = log_records(tmp_path / "single"), log_records(tmp_path / "ddp")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(6))
    np.testing.assert_allclose([r["loss"] for r in two[1:]], [r["loss"] for r in one[1:]], atol=1e-5, rtol=1e-5)
    assert [r["tokens_seen"] for r in two] == [r["tokens_seen"] for r in one]
    assert [r["flops"] for r in two] == [r["flops"] for r in one]
    ddp_weights = load_file(tmp_path / "ddp/trainer_state/model.safetensors")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_callback_hooks_in_order(tmp_path):
    calls = []

    class Recorder(Callback):
        def on_fit_start(self, trainer): calls.append(("fit_start", trainer.step))
        def on_step_start(self, trainer, step): calls.append(("step_start", step))
        def on_batch(self, trainer, step, batch):
            calls.append(("batch", step, tuple(batch.shape)))
            return batch
        def on_step_end(self, trainer, step, loss): calls.append(("step_end", step, trainer.step))
        def on_before_checkpoint(self, trainer, step):
            calls.append(("before_checkpoint", step, (trainer.run_dir / f"step{step}").exists()))
        def on_checkpoint(self, trainer, step): calls.append(("checkpoint", step))

    cfg = make_config(total_steps=2, grad_accum=2, checkpoint_steps=[0, 2])
    Trainer(make_model(), None, make_data(), cfg, tmp_path, callbacks=[Recorder()]).fit()
    micro = ("batch", 0, (4, 17))
    assert calls == [("fit_start", 0), ("before_checkpoint", 0, False), ("checkpoint", 0),
                     ("step_start", 0), micro, micro, ("step_end", 0, 1),
                     ("step_start", 1), ("batch", 1, (4, 17)), ("batch", 1, (4, 17)), ("step_end", 1, 2),
                     ("before_checkpoint", 2, False), ("checkpoint", 2)]


def test_callback_changes_batch_and_flops(tmp_path):
    class HalfDepthFlops(Callback):  # what Apollo does: FLOPs of the depth it runs
        def on_batch(self, trainer, step, batch):
            trainer.flops_per_token = flops_per_token(trainer.model.config, trainer.cfg.seq_len, n_layers=1)
            return torch.zeros_like(batch)  # a constant stream is learned at once

    cfg = make_config(total_steps=6, lr=1e-2, checkpoint_steps=[], eval_steps=[])
    model = make_model()
    result = Trainer(model, None, make_data(), cfg, tmp_path, callbacks=[HalfDepthFlops()]).fit()
    assert result.flops == 6 * 8 * 16 * flops_per_token(model.config, 16) / 2
    assert result.loss < 1.0


def test_flops_count_matches_parameters():
    for arch in ("gpt_neox", "llama"):
        model = build_model(model_config(arch, "tiny", vocab_size=64, max_seq_len=64))
        block = (model.gpt_neox.layers if arch == "gpt_neox" else model.model.layers)[0]
        assert block_params(model.config) == sum(p.numel() for p in block.parameters() if p.ndim == 2)
        n, d = model.config.num_hidden_layers, model.config.hidden_size
        assert flops_per_token(model.config, 16) == 6 * n * block_params(model.config) + 6 * n * 16 * d
    from transformers import LlamaConfig
    class DerivedConfig(LlamaConfig): model_type = "derived_llama"  # our own types (TopK, layer plans) derive from Llama
    llama = model_config("llama", "tiny", vocab_size=64, max_seq_len=64)
    assert block_params(DerivedConfig(**llama.to_dict())) == block_params(llama)  # a gated MLP: 3 matrices, not 2


def test_continued_pretraining_from_a_seed(tmp_path):
    seed_cfg = make_config(total_steps=4, checkpoint_steps=[4], min_lr_ratio=0.1)
    Trainer(make_model(), None, make_data(), seed_cfg, tmp_path / "seed").fit()
    assert seed_cfg.lr_at(3) == pytest.approx(0.1 * seed_cfg.lr)  # the seed ends at its final LR
    seed = CheckpointSuite.from_run(tmp_path / "seed").load_model(step=4).train()
    unit_cfg = make_config(total_steps=3, warmup_steps=0, schedule="constant", lr=0.1 * seed_cfg.lr, checkpoint_steps=[0, 3])
    Trainer(seed, None, make_data(), unit_cfg, tmp_path / "unit").fit()
    assert [r["lr"] for r in log_records(tmp_path / "unit")[1:]] == pytest.approx([3e-4] * 3)
    unit0 = CheckpointSuite.from_run(tmp_path / "unit").load_model(step=0)
    seed_weights = load_file(tmp_path / "seed/trainer_state/model.safetensors")
    assert all(torch.equal(v, seed_weights[k]) for k, v in unit0.state_dict().items())


def test_bf16_autocast_on_cpu(tmp_path):
    cfg = make_config(total_steps=2, checkpoint_steps=[], eval_steps=[2], precision="bf16")
    model = make_model()
    result = Trainer(model, None, make_data(), cfg, tmp_path).fit()
    assert np.isfinite(result.loss) and next(model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize("kw, words", [
    (dict(total_steps=0), "total_steps=0"),
    (dict(batch_size=6, grad_accum=4), "batch_size=6 must be divisible by grad_accum=4"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio=1.5"),
    (dict(warmup_steps=20), "warmup_steps=20"),
    (dict(schedule="step"), "schedule='step'.*cosine"),
    (dict(precision="fp16"), "precision='fp16'.*bf16"),
    (dict(betas=(0.9, 1.2)), "betas"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0"),
    (dict(checkpoint_steps=[0, 13]), "checkpoint_steps entry=13"),
    (dict(eval_steps=[-1]), "eval_steps entry=-1"),
    (dict(log_every=0), "log_every=0"),
    (dict(lr=float("inf")), "lr=inf"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(batch_size=-4), "batch_size=-4"),
    (dict(seq_len="256"), "seq_len='256'"),
    (dict(total_steps=12.0), "total_steps=12.0"),
    (dict(grad_clip=float("inf")), "grad_clip=inf"),
    (dict(seed=-1), "seed=-1"),
    (dict(data_seed=-1), "data_seed=-1"),
    (dict(betas=(0.9, float("nan"))), "betas"),
    (dict(checkpoint_steps=[0, "4"]), "checkpoint_steps"),
    (dict(decay_fraction=-0.1), "decay_fraction=-0.1"),
    (dict(decay_fraction=0.2), "decay_fraction=0.2 is the decay tail of schedule='constant'"),
    (dict(schedule="constant", decay_fraction=float("nan")), "decay_fraction=nan"),
    (dict(ddp_find_unused_parameters="yes"), "ddp_find_unused_parameters='yes'"),
    (dict(ddp_static_graph=1), "ddp_static_graph=1"),
])
def test_bad_config_raises(kw, words):
    with pytest.raises(ParamError, match=f"^{words}"):
        make_config(**kw)


def test_batch_must_divide_over_micro_batches_and_ranks(tmp_path):
    cfg = make_config(batch_size=8, grad_accum=8)
    Trainer(make_model(), None, make_data(), cfg, tmp_path)  # 8 micro-batches of 1 row: fine
    assert cfg.eval_steps == cfg.checkpoint_steps  # eval defaults to the checkpoint steps


def test_lr_schedule_shapes():
    cfg = make_config(total_steps=20, warmup_steps=5, lr=1.0, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and lrs[5] == 1.0
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == pytest.approx(0.1)
    assert dataclasses.replace(cfg, schedule="linear").lr_at(19) == pytest.approx(0.1)
    assert {dataclasses.replace(cfg, schedule="constant").lr_at(s) for s in range(5, 20)} == {1.0}
    tail = [dataclasses.replace(cfg, schedule="constant", decay_fraction=0.25, min_lr_ratio=0.0).lr_at(s) for s in range(20)]
    assert tail[:5] == lrs[:5] and set(tail[5:16]) == {1.0} and tail[-1] == 0.0  # constant, then to 0 over the last 5
    assert tail[15:] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_decay_tail_reaches_the_optimizer(tmp_path):
    cfg = make_config(total_steps=10, warmup_steps=0, schedule="constant", decay_fraction=0.2, min_lr_ratio=0.0,
                      checkpoint_steps=[], eval_steps=[])
    Trainer(make_model(), None, make_data(), cfg, tmp_path).fit()
    assert [r["lr"] for r in log_records(tmp_path)[1:]] == pytest.approx([3e-3] * 8 + [3e-3, 0.0])


def test_truncate_log(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(dict(step=s)) + "\n" for s in range(5)))
    truncate_log(path, 2)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [0, 1, 2]
    truncate_log(tmp_path / "missing.jsonl", 0)  # no log yet: nothing to do


# --- the run folder under bad input and faults --------------------------------------------------------------------

DEAD_PID = 2**22 + 4321  # above the largest pid Linux hands out: no process has it


def files_of(folder) -> dict:
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_reused_run_dir_with_other_data_model_or_code_is_refused(tmp_path, monkeypatch):
    cfg, data = make_config(total_steps=2, checkpoint_steps=[2]), make_data()
    Trainer(make_model(), None, data, cfg, tmp_path).fit()
    before = files_of(tmp_path)
    other_data = TokenShards.from_arrays(train={"up": counting(1, 20_000, 7), "down": counting(-1, 20_000, 1)},
                                         val={"up": counting(1, 2_000, 2), "down": counting(-1, 2_000, 3)}, vocab_size=64)
    wide = build_model(model_config("gpt_neox", "tiny", vocab_size=64, max_seq_len=128))
    for model, shards, words in [(make_model(), other_data, r"Differing fields: data \(saved"),
                                 (make_model(), data.subset(["up"]), r"Differing fields: data \(saved"),
                                 (wide, data, r"model\.max_position_embeddings \(saved 64, given 128\)")]:
        with pytest.raises(ParamError, match=r"use another run_dir.*" + words):
            Trainer(model, None, shards, cfg, tmp_path).fit()
    monkeypatch.setattr(train_mod, "module_digest", lambda *names, n=16: "edited-code")
    with pytest.raises(ParamError, match=r"Differing fields: code \(saved '[0-9a-f]{16}', given 'edited-code'\)"):
        Trainer(make_model(), None, data, cfg, tmp_path).fit()
    assert files_of(tmp_path) == before  # refused before anything was written
    monkeypatch.undo()
    assert Trainer(make_model(seed=9), None, make_data(), cfg, tmp_path).fit().steps == 2  # same inputs: reopened


def test_run_dir_without_identity_is_refused(tmp_path):
    cfg, data = make_config(total_steps=2, checkpoint_steps=[2]), make_data()
    Trainer(make_model(), None, data, cfg, tmp_path).fit()
    (tmp_path / "run_identity.json").unlink()  # what a run folder of an older dyntrack holds
    with pytest.raises(ParamError, match=r"run_identity\.json is missing.*cannot be checked.*another run_dir"):
        Trainer(make_model(), None, data, cfg, tmp_path).fit()


def test_kill_between_the_renames_of_a_state_save_resumes_from_it(tmp_path):
    cfg, data = make_config(), make_data()
    full = make_model(dropout=0.1)
    Trainer(full, None, data, cfg, tmp_path / "full").fit()
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        Trainer(make_model(dropout=0.1), None, data, cfg, cut, callbacks=[Kill(8)]).fit()
    log_before = log_records(cut)
    # the next save was killed after moving the step-5 state aside, before renaming its own copy into place
    (cut / "trainer_state").rename(cut / f".trainer_state.old-{DEAD_PID}-abcd1234")
    (cut / f".trainer_state.tmp-{DEAD_PID}-0123abcd").mkdir()  # that writer's half-written copy
    (cut / f".trainer_state.tmp-{DEAD_PID}-0123abcd" / "model.safetensors").write_bytes(b"half")
    history = History()
    resumed = make_model(dropout=0.1, seed=123)
    Trainer(resumed, None, data, cfg, cut, callbacks=[history]).fit()
    assert [r["step"] for r in history.records] == list(range(6, 13))  # continued after step 5, not from 0
    for k, v in weights(full).items(): assert torch.equal(v, resumed.state_dict()[k]), k
    assert log_records(cut)[:6] == log_before[:6]  # the records up to the saved step were kept, not rewritten
    losses = lambda run: [(r["step"], r["loss"]) for r in log_records(run)]
    assert losses(cut) == losses(tmp_path / "full")
    assert [p.name for p in cut.iterdir() if p.name.startswith(".trainer_state.")] == []  # dead writers' leftovers gone


def test_lost_trainer_state_is_refused_not_restarted(tmp_path):
    cfg, data = make_config(), make_data()
    with pytest.raises(Killed):
        Trainer(make_model(), None, data, cfg, tmp_path, callbacks=[Kill(8)]).fit()
    shutil.rmtree(tmp_path / "trainer_state")  # saved at step 5, then lost
    before = files_of(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"trainer_state is missing.*got to step 8.*save at step 5.*delete"):
        Trainer(make_model(), None, data, cfg, tmp_path).fit()
    assert files_of(tmp_path) == before  # the log was not emptied


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json"])
def test_damaged_trainer_state_names_the_file(tmp_path, name):
    cfg, data = make_config(total_steps=4, checkpoint_steps=[4], resume_every=2), make_data()
    with pytest.raises(Killed):
        Trainer(make_model(), None, data, cfg, tmp_path, callbacks=[Kill(3)]).fit()
    path = tmp_path / "trainer_state" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, as by a full disk
    with pytest.raises(CorruptFileError, match="^" + str(path).replace(".", r"\.") + r" .*delete"):
        Trainer(make_model(), None, data, cfg, tmp_path).fit()


def test_torn_last_log_line_does_not_stop_a_finished_run(tmp_path):
    cfg, data = make_config(total_steps=4, checkpoint_steps=[4]), make_data()
    first = Trainer(make_model(), None, data, cfg, tmp_path).fit()
    records = log_records(tmp_path)
    with open(tmp_path / "log.jsonl", "a") as f: f.write('{"step": 5, "tokens_se')  # killed mid-append
    again = Trainer(make_model(), None, data, cfg, tmp_path).fit()
    assert again.steps == first.steps == 4 and log_records(tmp_path) == records


def test_read_log_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    assert read_log(path) == [dict(step=0), dict(step=1)]
    path.write_text('{"step": 0}\n\n{"step": 1, "lo\n{"step": 2}\n')  # a damaged line, and records after it
    with pytest.raises(CorruptFileError, match=r"log\.jsonl line 3 is not a JSON record"):
        read_log(path)
    with pytest.raises(CorruptFileError, match="line 3"):
        truncate_log(path, 5)
    path.write_bytes(b'{"step": 0}\n\xff\xfe\x00\n{"step": 2}\n')
    with pytest.raises(CorruptFileError, match="line 2"):
        read_log(path)


# --- seams for the coming methods: callback state, growing the model, a hook before checkpoints, DDP options ------

class Count(Callback):
    "Counts updates and sums their losses: a state that is not a function of the step."
    def __init__(self): self.count, self.loss_sum = 0, 0.0
    def on_step_end(self, trainer, step, loss): self.count, self.loss_sum = self.count + 1, self.loss_sum + float(loss)
    def state_dict(self): return dict(count=self.count, loss_sum=self.loss_sum)
    def load_state_dict(self, state): self.count, self.loss_sum = state["count"], state["loss_sum"]


def test_callback_state_is_resumed_after_a_kill(tmp_path):
    cfg, data = make_config(), make_data()
    full = Count()
    Trainer(make_model(), None, data, cfg, tmp_path / "full", callbacks=[full]).fit()
    with pytest.raises(Killed):
        Trainer(make_model(), None, data, cfg, tmp_path / "cut", callbacks=[Count(), Kill(8)]).fit()
    saved = json.loads((tmp_path / "cut/trainer_state/state.json").read_text())
    assert saved["step"] == 5 and saved["callbacks"]["Count"]["count"] == 5 and list(saved["callbacks"]) == ["Count"]
    resumed = Count()
    Trainer(make_model(), None, data, cfg, tmp_path / "cut", callbacks=[History(), resumed]).fit()  # stateless: free
    assert (resumed.count, resumed.loss_sum) == (full.count, full.loss_sum) == (12, full.loss_sum)
    with pytest.raises(ParamError, match=r"state\.json holds the states of callbacks \['Count'\].*given are \[\]"):
        Trainer(make_model(), None, data, cfg, tmp_path / "cut").fit()


def grown(model, depth: int):
    "A copy of the GPT-NeoX `model` with `depth` blocks, block i a deep copy of block i × n_layers // depth."
    n, big = model.config.num_hidden_layers, copy.deepcopy(model)
    big.gpt_neox.layers = torch.nn.ModuleList(copy.deepcopy(model.gpt_neox.layers[i * n // depth]) for i in range(depth))
    big.config.num_hidden_layers = depth
    return big


def head_name(model) -> str:
    "The name of the unembedding's weight among `model`'s parameters."
    return next(name for name, p in model.named_parameters() if p is model.get_output_embeddings().weight)


def sources(model, depth: int, skip=()) -> dict[str, str]:
    "{parameter of grown(model, depth): the parameter of `model` it copies}, leaving out the names in `skip`."
    n, out = model.config.num_hidden_layers, {}
    for name, _ in grown(model, depth).named_parameters():
        parts = name.split(".")
        if parts[:2] == ["gpt_neox", "layers"]: parts[2] = str(int(parts[2]) * n // depth)
        if name not in skip: out[name] = ".".join(parts)
    return out


class Grow(Callback):
    "Grow the model to `depth` blocks before update `at`; on resume past it, rebuild the grown model first."
    def __init__(self, at: int, depth: int = 4): self.at, self.depth = at, depth
    def on_fit_start(self, trainer):
        if trainer.step > self.at: trainer.replace_parameters(grown(trainer.model, self.depth))
    def on_step_start(self, trainer, step):
        if step == self.at: trainer.replace_parameters(grown(trainer.model, self.depth), sources(trainer.model, self.depth))


def test_replace_parameters_keeps_the_moments_of_copied_parameters(tmp_path):
    data = make_data()
    trainer = Trainer(make_model(), None, data, make_config(compile=True), tmp_path)
    trainer.setup()
    batch = data.batch(0, 8, 16, seed=0)
    lm_loss(trainer.model, batch).backward(); trainer.optimizer.step(); trainer.optimizer.zero_grad()
    old = {name: {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for name, p in trainer.model.named_parameters()}
    head = head_name(trainer.model)  # embed_out or lm_head, by transformers version
    copied = sources(trainer.model, 4, skip=[head])
    big = grown(trainer.model, 4)
    trainer.replace_parameters(big, copied)
    assert trainer.model is big and trainer.forward_model._orig_mod is big  # the compile wrapper is rebuilt around it
    params = dict(big.named_parameters())
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in params.values()}
    assert trainer.flops_per_token == flops_per_token(make_model().config, 16, n_layers=4)  # the grown depth's
    for name, source in copied.items():
        state = trainer.optimizer.state[params[name]]
        for k in ("exp_avg", "exp_avg_sq", "step"): assert torch.equal(state[k], old[source][k]), (name, k)
    assert {"gpt_neox.layers.2.mlp.dense_h_to_4h.weight": "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"}.items() <= copied.items()
    assert params[head] not in trainer.optimizer.state  # not copied: starts fresh
    lm_loss(big, batch).backward(); trainer.optimizer.step()  # a further update runs on the grown model
    assert trainer.optimizer.state[params["gpt_neox.layers.3.attention.dense.weight"]]["step"].item() == 2
    assert trainer.optimizer.state[params[head]]["step"].item() == 1
    assert not torch.equal(old["gpt_neox.layers.1.attention.dense.weight"]["exp_avg"],
                           trainer.optimizer.state[params["gpt_neox.layers.3.attention.dense.weight"]]["exp_avg"])
    for bad in ({head: "gpt_neox.embed_in.bias"}, {head: "gpt_neox.final_layer_norm.weight"},
                {"gpt_neox.embed_in.bias": head}):  # no such source, another shape, no such parameter
        with pytest.raises(ParamError, match=r"^copied\['[\w.]+'\] = .* not a parameter of the new model"):
            trainer.replace_parameters(grown(big, 2), bad)
    assert trainer.model is big  # refused before anything changed


def test_a_model_grown_mid_run_resumes_bit_identically(tmp_path):
    cfg, data = make_config(checkpoint_steps=[0, 4, 12]), make_data()
    full = Trainer(make_model(dropout=0.1), None, data, cfg, tmp_path / "full", callbacks=[Grow(3)])
    full.fit()
    assert full.model.config.num_hidden_layers == 4
    with pytest.raises(Killed):
        Trainer(make_model(dropout=0.1), None, data, cfg, tmp_path / "cut", callbacks=[Grow(3), Kill(8)]).fit()
    resumed = Trainer(make_model(dropout=0.1), None, data, cfg, tmp_path / "cut", callbacks=[Grow(3)])
    resumed.fit()  # from the state of step 5: the 4-block model and its AdamW state
    for k, v in full.model.state_dict().items(): assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["loss"] for r in log_records(tmp_path / "cut")] == [r["loss"] for r in log_records(tmp_path / "full")]
    layers = lambda run, s: json.loads((tmp_path / run / f"step{s}" / "config.json").read_text())["num_hidden_layers"]
    assert [layers("cut", s) for s in (0, 4, 12)] == [2, 4, 4]


def test_before_checkpoint_hook_is_seen_in_the_checkpoint(tmp_path):
    class Materialise(Callback):  # what progressive training does: write the full model, then train on
        def on_before_checkpoint(self, trainer, step):
            trainer.model.config.stage = f"full depth at step {step}"
            with torch.no_grad(): trainer.model.get_output_embeddings().weight[0].fill_(float(step))
    cfg = make_config(total_steps=4, checkpoint_steps=[0, 4], eval_steps=[])
    Trainer(make_model(), None, make_data(), cfg, tmp_path, callbacks=[Materialise()]).fit()
    for step in (0, 4):
        assert json.loads((tmp_path / f"step{step}" / "config.json").read_text())["stage"] == f"full depth at step {step}"
        saved = CheckpointSuite.from_run(tmp_path).load_model(step=step)
        assert torch.equal(saved.get_output_embeddings().weight[0], torch.full((64,), float(step)))


GROW_DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_train import Grow, make_config, make_data, make_model
from dyntrack.train.trainer import Callback, Trainer
torch.set_num_threads(1)

class Wrapped(Callback):  # what DDP wraps after each update
    def __init__(self): self.seen = []
    def on_step_end(self, trainer, step, loss):
        ddp = trainer.ddp
        self.seen.append([step, ddp.module is trainer.model, trainer.model.config.num_hidden_layers,
                          ddp.find_unused_parameters, ddp.static_graph])

wrapped = Wrapped()
trainer = Trainer(make_model(), None, make_data(), make_config(**{kw!r}), {run_dir!r}, callbacks=[Grow(2), wrapped])
trainer.fit()
with open({out!r} + str(trainer.rank), "w") as f: json.dump(wrapped.seen, f)
"""


def test_ddp_options_reach_ddp_and_a_grown_model_trains_under_it(tmp_path):
    kw = dict(total_steps=4, checkpoint_steps=[4], eval_steps=[], resume_every=0, ddp_find_unused_parameters=True,
              ddp_static_graph=True)
    single = Trainer(make_model(), None, make_data(), make_config(**kw), tmp_path / "single", callbacks=[Grow(2)])
    single.fit()
    script = tmp_path / "grow_ddp.py"
    script.write_text(GROW_DDP_SCRIPT.format(tests=str(Path(__file__).parent), kw=kw, run_dir=str(tmp_path / "ddp"),
                                             out=str(tmp_path / "seen")))
    env = dict(os.environ, OMP_NUM_THREADS="1", DYNTRACK_PROGRESS="0")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen{rank}").read_text())
        assert seen == [[s, True, 2 if s < 2 else 4, True, True] for s in range(4)], (rank, seen)
    ddp_weights = load_file(tmp_path / "ddp/trainer_state/model.safetensors")
    assert set(ddp_weights) == set(single.model.state_dict())
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_init_from_continues_the_full_state_of_another_run(tmp_path):
    "A unit run with init_from equals loading the seed's weights and AdamW state by hand and taking the same updates."
    seed_cfg = make_config(total_steps=6, checkpoint_steps=[6], min_lr_ratio=0.1)
    Trainer(make_model(), None, make_data(), seed_cfg, tmp_path / "seed").fit()
    unit_data = make_data().subset(["down"])
    unit_cfg = make_config(total_steps=4, warmup_steps=0, schedule="constant", lr=seed_cfg.lr_at(5), checkpoint_steps=[4],
                           weight_decay=0.05, init_from=str(tmp_path / "seed/trainer_state"), data_seed=3)
    Trainer(make_model(seed=9), None, unit_data, unit_cfg, tmp_path / "unit").fit()
    unit = load_file(tmp_path / "unit/trainer_state/model.safetensors")
    # the known answer: seed state loaded by hand, then the unit's 4 batches with the unit's recipe
    model = make_model(seed=5).train()
    opt = torch.optim.AdamW(train_mod.param_groups(model, 0.1), lr=1.0, betas=(0.9, 0.95))
    from dyntrack.train.state import load_run_state
    load_run_state(tmp_path / "seed/trainer_state", model, opt, "", restore_rng=False)
    assert all(s["step"] == 6 for s in opt.state.values())  # the seed's AdamW step count comes along
    opt.param_groups[0]["weight_decay"] = 0.05
    for step in range(4):
        for g in opt.param_groups: g["lr"] = unit_cfg.lr
        lm_loss(model, unit_data.batch(step, 8, 16, seed=3)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
    for k, v in model.state_dict().items(): torch.testing.assert_close(unit[k], v, rtol=0, atol=1e-6)
    # without the moments (a fresh AdamW on the seed's weights) the answer differs
    fresh = make_config(total_steps=4, warmup_steps=0, schedule="constant", lr=seed_cfg.lr_at(5), checkpoint_steps=[4],
                        weight_decay=0.05, data_seed=3)
    seed_model = CheckpointSuite.from_run(tmp_path / "seed").load_model(step=6).train()
    Trainer(seed_model, None, unit_data, fresh, tmp_path / "fresh").fit()
    other = load_file(tmp_path / "fresh/trainer_state/model.safetensors")
    assert max((other[k] - unit[k]).abs().max().item() for k in unit) > 1e-4
    assert json.loads((tmp_path / "unit/train_config.json").read_text())["init_from"] == unit_cfg.init_from
    with pytest.raises(ParamError, match="init_from"):
        Trainer(make_model(), None, unit_data, dataclasses.replace(unit_cfg, init_from=str(tmp_path)), tmp_path / "bad").fit()
