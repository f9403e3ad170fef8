"""Activation harvesting: `residual_at` (stops after the site) against a full forward with `output_hidden_states`.

Same model (the `paper`-profile suite model), same tokens; prints the time per batch of both and their ratio for
sites across the depth. Target: at least 2x for a site in the first half of the model.

    python benchmarks/bench_acts.py --out results/paper/benchmarks/acts.json
"""
import argparse, time

import torch

from dyntrack.acts import residual_at
from dyntrack.core import resolve_params, device_name, software_versions, write_json
from dyntrack.suite import SuiteParams
from dyntrack.models.presets import build_model, model_config


def timed(fn, repeats, device):
    fn()  # warm-up
    if device.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats): fn()
    if device.type == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    p = vars(resolve_params(SuiteParams, a.profile))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(p["arch"], p["size"], vocab_size=p["vocab_size"], max_seq_len=p["seq_len"])
    model = build_model(cfg, seed=0).to(device, dtype).eval()
    ids = torch.randint(0, p["vocab_size"], (a.batch, p["seq_len"]), device=device)
    n = cfg.num_hidden_layers
    rows = []
    with torch.no_grad():
        full = timed(lambda: model(ids, output_hidden_states=True).hidden_states, a.repeats, device)
        for layer in sorted({1, n // 4, n // 2 - 1, n // 2, n - 1}):
            early = timed(lambda: residual_at(model, ids, layer), a.repeats, device)
            rows.append(dict(layer=layer, full_ms=full * 1e3, early_stop_ms=early * 1e3, speedup=full / early))
    print(f"device: {device_name(device)}; {p['arch']}-{p['size']} ({n} blocks), batch {a.batch} x seq {p['seq_len']}, {dtype}")
    print(f"{'site (entering block)':>22s} {'full fwd ms':>12s} {'early stop ms':>14s} {'speed-up':>9s}")
    for r in rows: print(f"{r['layer']:>22d} {r['full_ms']:12.2f} {r['early_stop_ms']:14.2f} {r['speedup']:9.2f}")
    if a.out:
        write_json(a.out, dict(device=device_name(device), software=software_versions(), profile=a.profile,
                               batch=a.batch, seq_len=p["seq_len"], rows=rows))


if __name__ == "__main__":
    main()
