"""The benchmarks (benchmarks/*.py) run at their tiny sizes on the CPU and write their JSON and tables (fields, not
speed); the shared timing helper (benchmarks/_timing.py) times the steps it says it times."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import _timing, bench_sparsify  # noqa: E402

HAS_SPARSIFY = importlib.util.find_spec("sparsify") is not None


def run_bench(script, *args, timeout=300):
    "Run benchmarks/`script` with `args` on the CPU, one thread; the finished process."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DYNTRACK_PROGRESS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def in_process(monkeypatch):
    "Run a benchmark's `main` here on the CPU: what it sets globally (env, TF32) is put back afterwards."
    monkeypatch.setenv("DYNTRACK_PROGRESS", "0")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


# --- _timing ---

def test_timed_loop_times_the_steps_after_the_warmup(monkeypatch):
    ticks, calls = iter(range(100)), []
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: next(ticks))  # one tick per clock reading
    def step(i): calls.append(i); next(ticks)  # each step takes one tick
    assert _timing.timed_loop(step, steps=3, warmup=2, device="cpu") == 4  # start after 2 steps, 3 steps, stop
    assert calls == [0, 1, 2, 3, 4]
    assert _timing.timed_loop(lambda i: None, steps=1, warmup=0, device="cpu") == 1


def test_counts_are_checked_by_name():
    for kwargs, name in ((dict(steps=0, warmup=1), "steps=0"), (dict(steps=1, warmup=0), "warmup=0"),
                         (dict(steps=1, warmup=1, rounds=0), "rounds=0"), (dict(steps=2.5, warmup=1), "steps=2.5")):
        with pytest.raises(ValueError, match=name): _timing.check_counts(**kwargs)
    with pytest.raises(ValueError, match="warmup=-1 must be an integer ≥ 0"): _timing.timed_loop(print, 1, -1, "cpu")


def test_clock_started_by_the_warmup_item_and_unstopped_clock_refused():
    clock = _timing.Clock("cpu")
    items = _timing.clocked(iter("abcd"), warmup=2, clock=clock)
    assert [next(items), next(items)] == ["a", "b"] and clock.t0 is None
    assert next(items) == "c" and clock.t0 is not None
    with pytest.raises(RuntimeError, match="not started and stopped"): clock.seconds
    assert clock.stop() >= 0 and list(items) == ["d"]


def test_rounds_take_turns_and_median_round_is_a_round_that_ran():
    order = []
    results = _timing.rounds(dict(a=lambda: order.append("a") or len(order), b=lambda: order.append("b") or len(order)), 3)
    assert order == ["a", "b"] * 3 and results == dict(a=[1, 3, 5], b=[2, 4, 6])
    assert _timing.median_round([5, 1, 3]) == 3 and _timing.median_round([4, 1, 3, 2]) == 2
    rows = [dict(tps=9, x="slow"), dict(tps=1, x="fast"), dict(tps=5, x="mid")]
    assert _timing.median_round(rows, key=lambda r: r["tps"])["x"] == "mid"


# --- the benchmarks, tiny ---

def test_tiny_crosscoder_benchmark_writes_its_tables(tmp_path):
    done = run_bench("bench_crosscoder.py", "--tiny", "--cpu", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "crosscoder.json").read_text())
    assert r["device"].startswith("cpu") and r["commit"] and r["time"] and r["dtype"] == "float32"
    assert (r["checkpoints"], r["d_model"], r["d_latents"], r["batch"], r["rounds"]) == (3, 32, 256, 128, 1)
    t = r["training"]
    assert t["reference_tokens_per_s"] > 0 and t["dyntrack_tokens_per_s"] > 0
    assert t["ratio"] == t["dyntrack_tokens_per_s"] / t["reference_tokens_per_s"]
    assert len(t["reference_rounds"]) == len(t["dyntrack_rounds"]) == 1 and t["max_loss_diff"] < 1e-3
    ie = r["ie"]
    assert (ie["size"], ie["pairs"], ie["ig_steps"], ie["d_latents"]) == ("tiny", 2, 2, 8 * ie["d_model"])
    assert ie["examples_per_s"] > 0 and ie["phenomenon"] == "pp_attractor_agreement"
    md = (tmp_path / "out" / "crosscoder.md").read_text()
    assert "| dense reference" in md and "| dyntrack (Crosscoder + train_sae)" in md and "examples/s" in md
    assert f"{t['ratio']:.2f}" in md and r["commit"] in md


def test_tiny_train_benchmark_runs_both_peers(tmp_path):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it (the bench extra)
    done = run_bench("bench_train.py", "--tiny", "--require-peers", "--out", str(tmp_path / "train.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "train.json").read_text())
    assert r["device"].startswith("cpu") and r["commit"] and r["time"] and r["software"]["transformers"]
    assert (r["profile"], r["size"], r["steps"], r["warmup"], r["compile"], r["skipped"]) == ("smoke", "tiny", 2, 1, False, {})
    rows = {row["variant"]: row for row in r["rows"]}
    assert list(rows) == ["plain eager fp32", "plain eager bf16 autocast", "plain compiled loop (bf16, fused AdamW)",
                          "transformers.Trainer", "dyntrack Trainer"]
    ours = rows["dyntrack Trainer"]["tokens_per_s"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["rounds"] == [row["tokens_per_s"]]
        assert row["dyntrack_ratio"] == ours / row["tokens_per_s"]
    assert rows["dyntrack Trainer"]["dyntrack_ratio"] == 1 and r["flops_per_token"] > 0
    md = (tmp_path / "train.md").read_text()
    assert r["commit"] in md and all(f"| {name} |" in md for name in rows)


def test_tiny_sparsify_benchmark_without_the_peer(tmp_path, in_process, capsys):
    r = bench_sparsify.main(["--tiny", "--cpu", "--out", str(tmp_path / "out")])  # on the CPU: no Triton decoder
    assert "skipping the sparsify side" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "sparsify.json").read_text()) == json.loads(json.dumps(r))
    assert r["device"].startswith("cpu") and r["commit"] and r["time"] and r["peer_skipped"]
    assert (r["d_model"], r["d_sae"], r["k"], r["batch"], r["steps"], r["warmup"], r["rounds"]) == (32, 512, 4, 64, 3, 2, 1)
    rows = {row["setting"]: row for row in r["rows"]}
    assert [row["side"] for row in r["rows"]] == ["dyntrack train_sae"] * 2
    idle, auxk = rows["AuxK idle"], rows["AuxK every step"]
    assert idle["dead_fraction"] == 0 and idle["auxk_steps"] == 0  # default dead_tokens: nothing dies in 5 steps
    assert 0 < auxk["dead_fraction"] < 1 and auxk["auxk_steps"] == 1  # 64 × 4 activations leave latents silent
    assert all(row["tokens_per_s"] > 0 and row["ratio"] == 1 for row in r["rows"])
    md = (tmp_path / "out" / "sparsify.md").read_text()
    assert f"sparsify skipped: {r['peer_skipped']}" in md and "| AuxK every step | dyntrack train_sae |" in md


def test_sparsify_benchmark_with_require_peer_stops_before_work(in_process, capsys):
    with pytest.raises(SystemExit, match="bench_sparsify: --require-peer, but ") as stop:
        bench_sparsify.main(["--tiny", "--cpu", "--require-peer"])
    assert ("not installed" in str(stop.value)) != HAS_SPARSIFY and "| AuxK" not in capsys.readouterr().out


@pytest.mark.skipif(not HAS_SPARSIFY, reason="sparsify (the bench extra) is not installed")
def test_tiny_sparsify_benchmark_with_the_peer_on_the_cpu(in_process):
    r = bench_sparsify.main(["--tiny", "--cpu", "--peer-on-cpu"])
    assert r["peer_skipped"] is None and r["sparsify"] == "1.3.3" and r["sparsify_decoder"] == "eager_decode"
    assert r["max_recon_diff"] < 1e-4  # same weights, same reconstruction
    rows = {(row["setting"], row["side"]): row for row in r["rows"]}
    assert set(rows) == {(s, side) for s in ("AuxK idle", "AuxK every step")
                         for side in ("dyntrack train_sae", "sparsify, torch Adam")}  # fused Adam: CUDA only
    ours, peer = rows["AuxK every step", "dyntrack train_sae"], rows["AuxK every step", "sparsify, torch Adam"]
    assert peer["auxk_steps"] == ours["auxk_steps"] == 1
    assert abs(peer["dead_fraction"] - ours["dead_fraction"]) < 0.05  # one definition of dead on both sides
    assert peer["ratio"] == ours["tokens_per_s"] / peer["tokens_per_s"]
