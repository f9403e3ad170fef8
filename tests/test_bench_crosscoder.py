"The crosscoder benchmark (benchmarks/bench_crosscoder.py) runs at its --tiny size on the CPU and writes its JSON and markdown table (fields, not speed)."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_tiny_benchmark_writes_its_tables(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DYNTRACK_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_crosscoder.py"), "--tiny", "--cpu",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
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
