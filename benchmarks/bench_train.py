"""Training throughput: the dyntrack trainer against plain eager `transformers` loops, same model, data and batch.

Trains the `paper`-profile suite model for a fixed number of steps with
  1. the dyntrack `Trainer` (bf16 autocast, fused AdamW, torch.compile when --compile),
  2. a plain eager loop in fp32 with `torch.optim.AdamW` defaults (what a first training script looks like),
  3. the same plain loop with bf16 autocast (to show how much of the gain is precision alone),
and prints tokens/s, the ratio to (2), and model FLOPs utilisation. Timing starts after --warmup steps
(compilation, allocator warm-up) and ends after a device synchronisation.

    python benchmarks/bench_train.py --steps 60 --warmup 15 --out results/paper/benchmarks/train.json
"""
import argparse, tempfile, time

import numpy as np
import torch
import torch.nn.functional as F

from dyntrack.core import resolve_params, device_name, software_versions, write_json
from dyntrack.suite import SuiteParams
from dyntrack.models.presets import build_model, model_config
from dyntrack.data.tokens import TokenShards
from dyntrack.train.trainer import Callback, Trainer, TrainConfig, flops_per_token, mfu

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak, FLOP/s


def peak_flops(device) -> float:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


class Stopwatch(Callback):
    "Time updates `warmup + 1 … end` (default: to the last; device synchronised at both ends, state saves excluded)."
    def __init__(self, warmup, end=None): self.warmup, self.end, self.t0, self.t1 = warmup, end, None, None
    def on_step_end(self, trainer, step, loss):
        end = self.end or trainer.cfg.total_steps
        if step + 1 not in (self.warmup, end): return
        if trainer.device.type == "cuda": torch.cuda.synchronize()
        if step + 1 == self.warmup: self.t0 = time.perf_counter()
        else: self.t1 = time.perf_counter()
    @property
    def seconds(self) -> float: return self.t1 - self.t0


def run_dyntrack(cfg, data, p, steps, warmup, device, compile):
    model = build_model(cfg, seed=0)
    tc = TrainConfig(total_steps=warmup + steps, batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"],
                     warmup_steps=0, compile=compile, checkpoint_steps=[], eval_steps=[], resume_every=0,
                     log_every=10**9)
    watch = Stopwatch(warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(model, None, data, tc, run_dir, callbacks=[watch], device=str(device)).fit()
    return steps * p["batch_size"] * p["seq_len"] / (watch.t1 - watch.t0)


def run_plain(cfg, data, p, steps, warmup, device, bf16):
    model = build_model(cfg, seed=0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda": torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch = data.batch(step, p["batch_size"], p["seq_len"]).to(device)  # [batch, seq_len + 1]
        with amp: logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    if device.type == "cuda": torch.cuda.synchronize()
    return steps * p["batch_size"] * p["seq_len"] / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    p = vars(resolve_params(SuiteParams, a.profile))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the plain fp32 reference stays plain
    vocab = p["vocab_size"]
    data = TokenShards.from_arrays({"bench": np.random.default_rng(0).integers(0, vocab, 4_000_000, dtype=np.int64)})
    cfg = model_config(p["arch"], p["size"], vocab_size=vocab, max_seq_len=p["seq_len"])
    fpt, peak = flops_per_token(cfg, p["seq_len"]), peak_flops(device)
    results = {
        "plain eager fp32 (reference)": run_plain(cfg, data, p, a.steps, a.warmup, device, bf16=False),
        "plain eager bf16 autocast": run_plain(cfg, data, p, a.steps, a.warmup, device, bf16=device.type == "cuda"),
        "dyntrack Trainer": run_dyntrack(cfg, data, p, a.steps, a.warmup, device, compile=not a.no_compile),
    }
    ref = results["plain eager fp32 (reference)"]
    rows = [dict(variant=k, tokens_per_s=v, ratio=v / ref, mfu=mfu(v, fpt, peak)) for k, v in results.items()]
    print(f"device: {device_name(device)}; model {p['arch']}-{p['size']}, batch {p['batch_size']} x seq {p['seq_len']}, "
          f"{a.steps} timed steps after {a.warmup}; {fpt / 1e6:.1f} MFLOP/token")
    print(f"{'variant':32s} {'tokens/s':>12s} {'ratio':>7s} {'MFU':>6s}")
    for r in rows: print(f"{r['variant']:32s} {r['tokens_per_s']:12,.0f} {r['ratio']:7.2f} {r['mfu']:6.3f}")
    if a.out:
        write_json(a.out, dict(device=device_name(device), software=software_versions(), profile=a.profile,
                               steps=a.steps, warmup=a.warmup, flops_per_token=fpt, rows=rows))


if __name__ == "__main__":
    main()
