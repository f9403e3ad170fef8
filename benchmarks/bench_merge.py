"""Parameter averaging: streamed from safetensors files (`models.siblings.stream_average`) against loading every model's
state dict and averaging them (`AutoModelForCausalLM.from_pretrained` n times, then `average_parameters`), on the same n saved models.

Each way runs in a fresh subprocess; peak memory is the peak anonymous resident memory (RssAnon, sampled every 2 ms:
memory-mapped file pages are page cache, not copies, and are not counted). Prints both times, peaks and their ratios.

    python benchmarks/bench_merge.py --n 8 --size small --out results/paper/benchmarks/merge.json
"""
import argparse, json, subprocess, sys, tempfile, threading, time
from pathlib import Path


def rss_anon_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"): return int(line.split()[1])
    return 0


def measure(way: str, folders: list[str]) -> dict:
    "Run one way in this process; time and peak RssAnon above the start."
    import torch
    from dyntrack.models.siblings import average_parameters, stream_average
    base, peak, done = rss_anon_kib(), [0], threading.Event()
    def sample():
        while not done.is_set(): peak[0] = max(peak[0], rss_anon_kib()); time.sleep(0.002)
    thread = threading.Thread(target=sample, daemon=True); thread.start()
    t0 = time.perf_counter()
    if way == "stream": merged = stream_average(folders)
    else:  # every model loaded, then their state dicts averaged
        from transformers import AutoModelForCausalLM
        models = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
        merged = average_parameters([m.state_dict() for m in models])
    wall = time.perf_counter() - t0
    done.set(); thread.join()
    peak[0] = max(peak[0], rss_anon_kib())
    n_bytes = sum(t.numel() * t.element_size() for t in merged.values())
    import resource
    return dict(way=way, wall_s=wall, peak_mib=(peak[0] - base) / 1024, model_mib=n_bytes / 2 ** 20,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # file pages included


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="models averaged")
    ap.add_argument("--size", default="small", help="model preset (dyntrack.models.presets.SIZES)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default=None)
    ap.add_argument("--_way", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_folders", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._way:
        print(json.dumps(measure(a._way, a._folders))); return
    from dyntrack.core import device_name, software_versions, write_json
    from dyntrack.models.presets import build_model, model_config
    tmp = Path(tempfile.mkdtemp())
    folders = []
    for s in range(a.n):
        build_model(model_config("gpt_neox", a.size, vocab_size=a.vocab, max_seq_len=256), seed=s).save_pretrained(tmp / f"m{s}")
        folders.append(str(tmp / f"m{s}"))
    results = {}
    for way in ("stream", "load_all"):
        run = subprocess.run([sys.executable, __file__, "--_way", way, "--_folders", *folders], capture_output=True, text=True, check=True)
        results[way] = json.loads(run.stdout.strip().splitlines()[-1])
    s, l = results["stream"], results["load_all"]
    ratios = dict(time_stream_over_load_all=s["wall_s"] / l["wall_s"], peak_stream_over_load_all=s["peak_mib"] / max(l["peak_mib"], 1e-9))
    print(f"n={a.n} {a.size} models of {s['model_mib']:.1f} MiB: stream {s['wall_s']:.2f} s, peak {s['peak_mib']:.0f} MiB; "
          f"load all {l['wall_s']:.2f} s, peak {l['peak_mib']:.0f} MiB; ratios time {ratios['time_stream_over_load_all']:.2f}, "
          f"peak memory {ratios['peak_stream_over_load_all']:.2f}; "
          f"whole-process peak RSS (mapped file pages included) stream {s['peak_rss_mib']:.0f} MiB, load all {l['peak_rss_mib']:.0f} MiB")
    if a.out: write_json(a.out, dict(n=a.n, size=a.size, results=results, ratios=ratios, device=device_name("cpu"),
                                     software=software_versions()))


if __name__ == "__main__": main()
