"Tests of dyntrack.progressive: samplers against their formulas, layer maps, the plan model, exact growth, optimiser moments carried to copies, resume, two gloo ranks, FLOPs, parameter checks and the smoke notebook."
import json, math, os, socket
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import reproduced_smoke_outputs
from dyntrack.core import ParamError, resolve_params
from dyntrack.data.tokens import TokenShards
from dyntrack.models.presets import build_model, model_config
from dyntrack.models.suite import CheckpointSuite
from dyntrack.progressive.model import (LAYER_MAPS, SAMPLERS, X_MIN, depth_from_y, draw_depth, draw_depths, edge_y, grow,
                                        growth_is_exact, growth_sources, interpolation_map, layer_map, lvps_y, plan_config,
                                        plan_flops_per_token, stacking_map)
from dyntrack.progressive.runs import (ProgressiveParams, ProgressiveSchedule, RunSpec, cost_to_reach, depth_histograms,
                                       run_specs)
from dyntrack.train.trainer import Callback, TrainConfig, Trainer

os.environ["DYNTRACK_PROGRESS"] = "0"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NB = Path(__file__).parents[1] / "nbs" / "14_progressive.ipynb"
VOCAB, SEQ, L = 50, 16, 4


def base(n_layers=L):
    return model_config("llama", "tiny", vocab_size=VOCAB, max_seq_len=SEQ, num_hidden_layers=n_layers)


def shards(seed=0):
    rng = np.random.default_rng(seed)
    return TokenShards.from_arrays({"a": rng.integers(0, VOCAB, 20_000)}, {"a": rng.integers(0, VOCAB, 2_000)}, vocab_size=VOCAB)


def formula_depths(kind, n, depth, grid=200_001):
    "Depths of the sampler formula on a fine uniform grid of x in [x_min, 1] (its exact distribution in the limit)."
    x = np.linspace(X_MIN, 1, grid)
    return depth_from_y((lvps_y if kind == "lvps" else edge_y)(x, n, depth), n, depth)


# ---- samplers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("kind", ["lvps", "edge"])
def test_sampler_mean_and_extremes_match_the_formula(kind, n):
    draws = draw_depths(kind, n, 12, seed=3, steps=range(6000))
    exact = formula_depths(kind, n, 12)
    assert draws.min() == n and draws.max() == 12 and exact.min() == n and exact.max() == 12
    assert abs(draws.mean() - exact.mean()) < 4 * exact.std() / math.sqrt(len(draws)) + 1e-9
    r, begin, end = 12 / n, 12 / n + 0.4, 0.6  # the formula's ends: LVPS passes through (x_min, begin) and (1, end)
    y = lvps_y if kind == "lvps" else edge_y
    ends = (begin, end) if kind == "lvps" else tuple((begin - end) / (1 + math.exp(20 * (x - 0.5))) + end for x in (X_MIN, 1.0))
    assert math.isclose(float(y(X_MIN, n, 12)), ends[0]) and math.isclose(float(y(1.0, n, 12)), ends[1])
    assert depth_from_y(y(X_MIN, n, 12), n, 12) == 12 and depth_from_y(y(1.0, n, 12), n, 12) == n


def test_lvps_prefers_low_depths_edge_both_ends_uniform_flat():
    lvps, edge, uni = (np.bincount(draw_depths(s, 3, 12, 0, range(6000)), minlength=13)[3:] / 6000 for s in ("lvps", "edge", "uniform"))
    assert lvps[0] == lvps.max() and lvps[:3].sum() > 0.5  # low depths first
    assert edge[0] + edge[-1] > 0.6 and edge[4] < 0.05      # both ends, little in the middle
    assert np.all(np.abs(uni - 1 / 10) < 0.025)             # {3..12}
    assert abs(draw_depths("uniform", 3, 12, 0, range(6000)).mean() - 7.5) < 0.15


def test_draws_are_a_function_of_seed_step_and_micro_batch():
    a = [draw_depth("lvps", 3, 12, 7, s, m) for s in range(50) for m in range(3)]
    assert a == [draw_depth("lvps", 3, 12, 7, s, m) for s in range(50) for m in range(3)]
    assert a != [draw_depth("lvps", 3, 12, 8, s, m) for s in range(50) for m in range(3)]
    assert draw_depth("full", 3, 12, 0, 5) == 12 and draw_depth("distinct", 3, 12, 0, 5) == 3
    with pytest.raises(ParamError, match="^sampler="): draw_depth("gaussian", 3, 12, 0, 0)


# ---- layer maps -----------------------------------------------------------------------------------------------------
def test_layer_maps_for_every_n_and_depth():
    for depth in range(1, 25):
        for n in range(1, min(depth, 12) + 1):
            interp, stack = interpolation_map(n, depth), stacking_map(n, depth)
            assert interp == [math.floor(i * n / depth) for i in range(depth)]
            assert interp == sorted(interp) and set(interp) == set(range(n))
            counts = np.bincount(interp)
            assert counts.max() - counts.min() <= 1  # consecutive repeats, as even as possible
            full, rest = divmod(depth, n)
            assert stack[: full * n] == list(range(n)) * full and stack[full * n:] == list(range(n - rest, n))
            assert set(stack) == set(range(n)) and len(stack) == depth
    assert interpolation_map(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2] and stacking_map(3, 8) == [0, 1, 2, 0, 1, 2, 1, 2]
    with pytest.raises(ParamError, match="^n_distinct=5 is more distinct blocks than depth=4"): interpolation_map(5, 4)
    with pytest.raises(ParamError, match="^layer_map="): layer_map("cyclic", 2, 4)


# ---- the plan model and growth ----------------------------------------------------------------------------------------
def test_plan_model_reuses_blocks_and_materialises_to_plain_llama(tmp_path):
    model = build_model(plan_config(base(6), 3), seed=0).eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    assert len(model.model.blocks) == 3 and model.plan == [0, 0, 1, 1, 2, 2]
    assert model.model.layers[0] is model.model.layers[1] is model.model.blocks[0]  # no weight copies
    plain = model.materialise()
    assert type(plain) is LlamaForCausalLM and plain.config.num_hidden_layers == 6
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is LlamaForCausalLM
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    model.plan = [2, 0]  # any plan, any order
    torch.testing.assert_close(model(input_ids=ids).logits, model.materialise()(input_ids=ids).logits)
    with pytest.raises(ParamError, match="^plan="): model.plan = [0, 3]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # a block used twice gets the sum of both uses' gradients
    assert model.model.blocks[1].mlp.down_proj.weight.grad is None and model.model.blocks[0].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("kind", LAYER_MAPS)
def test_growth_preserves_the_shared_models_function(kind):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    model = build_model(plan_config(base(12), 1, layer_map(kind, 1, 12)), seed=2).eval()
    for n_new in (3, 6, 12):
        before = model(input_ids=ids).logits
        grown, copied = grow(model, n_new, kind)
        assert grown.plan == layer_map(kind, n_new, 12) and growth_is_exact(kind, model.config.n_distinct, n_new, 12)
        torch.testing.assert_close(grown(input_ids=ids).logits, before, rtol=0, atol=0)
        src = growth_sources(kind, model.config.n_distinct, n_new)
        for j in range(n_new):
            assert copied[f"model.blocks.{j}.mlp.up_proj.weight"] == f"model.blocks.{src[j]}.mlp.up_proj.weight"
        model = grown
    assert not growth_is_exact("interpolation", 2, 3, 6)
    with pytest.raises(ParamError, match="growth must add blocks"): grow(model, 12)


# ---- the callback in the trainer ---------------------------------------------------------------------------------
SPEC = RunSpec("apollo_lvps", L, (1, 2, 4), (0, 2, 4), "lvps", "interpolation")


def make_trainer(run_dir, spec=SPEC, callbacks=(), total_steps=8, grad_accum=2, **cfg):
    config = TrainConfig(total_steps=total_steps, batch_size=4, seq_len=SEQ, lr=3e-3, warmup_steps=1, grad_accum=grad_accum,
                         checkpoint_steps=[total_steps], eval_steps=[], resume_every=3, log_every=1, **cfg)
    model = build_model(plan_config(base(spec.n_layers), spec.stages[0], spec.eval_plan(0)), seed=0)
    schedule = ProgressiveSchedule(spec, seed=0)
    return Trainer(model, None, shards(), config, run_dir, [schedule, *callbacks], device="cpu"), schedule


class Depths(Callback):
    "Record the plan depth and FLOPs per token of every micro-batch (placed after the schedule)."
    def __init__(self): self.seen = []
    def on_batch(self, trainer, step, batch):
        self.seen.append((step, len(trainer.model.plan), trainer.flops_per_token))
        return batch


def test_flops_follow_the_depth_run_at_every_micro_batch(tmp_path):
    rec = Depths()
    trainer, _ = make_trainer(tmp_path / "run", callbacks=[rec])
    result = trainer.fit()
    expect = [(s, draw_depth(SPEC.sampler, SPEC.stages[SPEC.stage_at(s)], L, 0, s, m)) for s in range(8) for m in range(2)]
    assert [(s, d) for s, d, _ in rec.seen] == expect
    cfg = base()
    per_token = [plan_flops_per_token(cfg, SEQ, d) for _, d in expect]
    assert [f for _, _, f in rec.seen] == per_token
    assert math.isclose(result.flops, sum(per_token) * 2 * SEQ)  # micro-batch of 2 rows
    d = 4  # the known plan: 4 blocks of d 64, MLP 192 (3 matrices), 2 heads, vocab 50
    assert plan_flops_per_token(cfg, SEQ, d) == 6 * (d * (4 * 64 * 64 + 3 * 64 * 192) + d * SEQ * 64 + 64 * VOCAB)
    hist = depth_histograms(SPEC, 0, 8, 2)
    for n, a, b in zip(SPEC.stages, SPEC.starts, (2, 4, 8)):
        assert hist[f"N={n}"] == np.bincount([dd for s, dd in expect if a <= s < b], minlength=L + 1).tolist()
    suite = CheckpointSuite.from_run(tmp_path / "run")  # the final checkpoint is a plain Llama of depth L
    plain = suite.load_model()
    assert type(plain) is LlamaForCausalLM and plain.config.num_hidden_layers == L


class Moments(Callback):
    "At each switch step's start, the AdamW second moments by parameter name (placed first: before growth; last: after)."
    def __init__(self, switches): self.switches, self.seen = switches, {}
    def on_step_start(self, trainer, step):
        if step in self.switches:
            self.seen[step] = {n: trainer.optimizer.state[p]["exp_avg_sq"].clone()
                               for n, p in trainer.model.named_parameters() if p in trainer.optimizer.state}


def test_growth_carries_optimiser_moments_to_the_copies(tmp_path):
    first, last = Moments({2, 4}), Moments({2, 4})
    trainer, schedule = make_trainer(tmp_path / "run", callbacks=[last])
    trainer.callbacks.insert(0, first)  # before the schedule grows the model
    trainer.fit()
    for step, (n_old, n_new) in zip((2, 4), [(1, 2), (2, 4)]):
        src = growth_sources("interpolation", n_old, n_new)
        old, new = first.seen[step], last.seen[step]
        assert len(new) > len(old) and all(f"model.blocks.{j}.mlp.up_proj.weight" in new for j in range(n_new))
        for name, moment in new.items():
            parts = name.split(".")
            if parts[:2] == ["model", "blocks"]: parts[2] = str(src[int(parts[2])])
            torch.testing.assert_close(moment, old[".".join(parts)], rtol=0, atol=0)
    assert set(schedule.jumps) == {"2", "4"}
    for jump in schedule.jumps.values(): assert jump["before"] == pytest.approx(jump["after"], abs=1e-6)  # exact growth


class Kill(Callback):
    def __init__(self, at): self.at = at
    def on_step_start(self, trainer, step):
        if step == self.at: raise KeyboardInterrupt


def test_killed_after_a_switch_and_resumed_equals_uninterrupted(tmp_path):
    whole, _ = make_trainer(tmp_path / "whole")
    whole.fit()
    killed, _ = make_trainer(tmp_path / "killed", callbacks=[Kill(5)])
    with pytest.raises(KeyboardInterrupt): killed.fit()  # state saved at step 3, stage N=2
    resumed, schedule = make_trainer(tmp_path / "killed")
    result = resumed.fit()
    assert result.steps == 8 and schedule.stage == 2
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert result.flops == whole.flops


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rec = Depths()
    trainer, _ = make_trainer(Path(out) / "run", callbacks=[rec], total_steps=5, grad_accum=1)
    trainer.fit()
    seen = [None, None]
    dist.all_gather_object(seen, [(s, d) for s, d, _ in rec.seen])
    if rank == 0: Path(out, "seen.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can hang a spawned rank at exit (seen on a 2-core CI run)


def test_two_gloo_ranks_draw_identical_depths(tmp_path):
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = json.loads((tmp_path / "seen.json").read_text())
    assert rank0 == rank1  # batch 4 over 2 ranks: one micro-batch of two rows per step and rank
    assert rank0 == [[s, draw_depth("lvps", SPEC.stages[SPEC.stage_at(s)], L, 0, s, 0)] for s in range(5)]


# ---- measures and parameters ----------------------------------------------------------------------------------------
def test_cost_to_reach_interpolates_the_first_crossing():
    cost, loss = np.array([0.0, 10, 20, 30]), np.array([5.0, 4, 4.5, 3])
    assert cost_to_reach(cost, loss, 4.0) == 10 and cost_to_reach(cost, loss, 3.5) == pytest.approx(20 + 20 / 3)
    assert cost_to_reach(cost, loss, 2.0) is None


@pytest.mark.parametrize("bad, name", [
    (dict(stage_layers=(1, 3, 2, 12)), "stage_layers"), (dict(stage_layers=(1, 3, 16)), "stage_layers"),
    (dict(stage_layers=(1, 3, 6)), "stage_layers"), (dict(samplers=("lvps", "gaussian")), "samplers"),
    (dict(stacking_sampler="full"), "stacking_sampler"), (dict(stage_fractions=(0.5, 0.2, 0.7)), "stage_fractions"),
    (dict(total_steps=8, warmup_steps=1), "stage_fractions"), (dict(small_depths=(1.5,)), "small_depths"), (dict(n_linear=3), "n_linear")])
def test_bad_parameters_name_the_parameter(bad, name):
    with pytest.raises(ParamError, match=f"^{name}"): resolve_params(ProgressiveParams, "paper", bad)


def test_profiles_and_runs():
    paper = resolve_params(ProgressiveParams, "paper")
    assert (paper.words_per_domain, paper.corpus_seed, paper.vocab_size) == (11_500_000, 0, 8192)
    assert paper.stages == (1, 3, 6, 12) and paper.starts == (0, 40, 80, 200)
    specs = run_specs(paper)
    assert list(specs) == ["scratch", "apollo_lvps", "apollo_uniform", "apollo_edge", "stacking", "no_lessons",
                           "scratch_L3", "scratch_L6"]
    assert specs["no_lessons"].eval_plan(1) == [0, 1, 2] and specs["stacking"].eval_plan(1) == stacking_map(3, 12)
    assert {s.n_layers for n, s in specs.items() if not n.startswith("scratch_L")} == {12}


# ---- the experiment notebook ----------------------------------------------------------------------------------------
def run_notebook(tmp_path, **params):
    out = tmp_path / "out"
    pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                        parameters=dict(profile="smoke", out_dir=str(out), run_dir=str(tmp_path / "runs"), **params),
                        progress_bar=False)
    return out


def test_notebook_smoke(tmp_path):
    "The CI smoke reproduction's outputs when it ran this notebook as it is (conftest), else a shorter run of one sampler."
    out = reproduced_smoke_outputs(NB) or run_notebook(tmp_path, total_steps=20, eval_every=4, samplers=["lvps"])
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("flops_to_scratch_final_loss", "flops_saving_vs_scratch", "switch_loss_jump", "final_ppl",
                "final_minimal_pair_acc", "depth_histograms", "train_wall_s", "wall_saving_vs_scratch"):
        assert key in m, key
    apollo = {f"apollo_{s}" for s in m["params"]["samplers"]}  # one Apollo run per sampler
    assert set(m["final_ppl"]) == {"scratch", *apollo, "stacking", "no_lessons", "scratch_L2"} and "apollo_lvps" in apollo
    assert m["flops_saving_vs_scratch"]["scratch"]["scratch_final"] == 0
    for run, planned in m["planned_flops"].items(): assert math.isclose(m["flops"][run], planned, rel_tol=1e-9), run
    assert all(abs(j["growth_jump"]) < 1e-5 for j in m["switch_loss_jump"]["apollo_lvps"].values())
    for name in ("loss_vs_flops_and_wall_time", "flops_and_time_saved_to_threshold", "loss_jump_at_stage_switch",
                 "sampled_depth_histograms", "final_ppl_and_minimal_pairs"):
        assert (out / f"progressive_fig_{name}.png").stat().st_size > 1000


def test_notebook_stops_on_a_schedule_that_does_not_grow(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="stage_layers"):
        run_notebook(tmp_path, stage_layers=(1, 2, 2, 4))
