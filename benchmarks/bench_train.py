"""Training throughput: the dyntrack trainer against the loops a researcher would write instead, same model, data, batch.

Trains the profile's suite model (`paper`: GPT-NeoX base, batch 128 × 256 tokens) for --warmup + --steps updates with
  1. plain eager fp32: the loop of `run_loop` without compilation, autocast or fused AdamW (a first training script);
  2. plain eager bf16: the same loop under bf16 autocast (on CUDA), to show how much of a gain is precision alone;
  3. compiled loop: the ~15-line loop of `run_loop` with `torch.compile`, bf16 autocast and fused AdamW (on CUDA);
  4. HF Trainer: `transformers.Trainer` with bf16, `torch_compile=True` and `optim="adamw_torch_fused"` (on CUDA),
     constant LR, the same AdamW hyper-parameters and clip; it reads the same windows in the same order, as
     `input_ids = labels` of seq_len tokens (it shifts the labels itself, so it predicts seq_len − 1 of them);
  5. the dyntrack `Trainer` as the suite trains (bf16 autocast and fused AdamW on CUDA, torch.compile unless
     --no-compile), no checkpoints, evaluations or state saves within the run;
all with the profile's LR, AdamW betas (0.9, 0.95), weight decay 0.1 (the plain loops on every parameter, the two
trainers on matrices only) and the gradient norm clipped at 1. Prints tokens/s, dyntrack ÷ variant, and model FLOPs
utilisation (`flops_per_token`, dense bf16 peak). Each variant's clock runs from the end of update --warmup (compilation, allocator warm-up done) to the
end of the last update, device synchronised at both ends (`_timing`); with --rounds > 1 the variants take turns
and the table gives each one's median round. transformers.Trainer needs `accelerate` (the `bench` extra); without it
that variant is skipped with a message, or the script stops under --require-peers. On a host with several GPUs run
it with one visible (CUDA_VISIBLE_DEVICES=0): transformers.Trainer would otherwise spread over all of them.

    python benchmarks/bench_train.py --require-peers --out results/paper/benchmarks/train.json
    python benchmarks/bench_train.py --tiny --out /tmp/bench_train.json          # CPU, seconds
Writes the JSON (every number, device, commit, time, software) to --out and the table beside it (`.md`).
"""
import argparse, importlib.util, os, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dyntrack.core import resolve_params, device_name, software_versions, write_json
from dyntrack.data.tokens import TokenShards
from dyntrack.models.presets import build_model, model_config
from dyntrack.reproduce.report import source_commit
from dyntrack.suite import SuiteParams
from dyntrack.train.trainer import Callback, Trainer, TrainConfig, flops_per_token, mfu
from _timing import Clock, check_counts, median_round, rounds, timed_loop

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak, FLOP/s
VARIANTS = ("eager fp32", "eager bf16", "compiled loop", "HF Trainer", "dyntrack")
NAMES = {"eager fp32": "plain eager fp32", "eager bf16": "plain eager bf16 autocast",
         "compiled loop": "plain compiled loop (bf16, fused AdamW)", "HF Trainer": "transformers.Trainer",
         "dyntrack": "dyntrack Trainer"}
TINY = dict(profile="smoke", steps=2, warmup=1, no_compile=True)  # --tiny: a CPU check of the whole script


def peak_flops(device) -> float:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


class Stopwatch(Callback):
    "Time updates `warmup + 1 … end` (default: to the last) of a dyntrack `Trainer` on a `Clock`; state saves excluded."
    def __init__(self, warmup, end=None): self.warmup, self.end, self.clock = warmup, end, None
    def on_step_end(self, trainer, step, loss):
        if self.clock is None: self.clock = Clock(trainer.device)
        if step + 1 == self.warmup: self.clock.start()
        if step + 1 == (self.end or trainer.cfg.total_steps): self.clock.stop()
    @property
    def seconds(self) -> float: return self.clock.seconds


def run_dyntrack(cfg, data, p, steps, warmup, device, compile) -> float:
    "Tokens/s of the dyntrack `Trainer`, no checkpoints, evaluations or state saves within the run."
    tc = TrainConfig(total_steps=warmup + steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr, warmup_steps=0,
                     compile=compile, checkpoint_steps=[], eval_steps=[], resume_every=0, log_every=10**9)
    watch = Stopwatch(warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(build_model(cfg, seed=0), None, data, tc, run_dir, callbacks=[watch], device=str(device)).fit()
    return steps * p.batch_size * p.seq_len / watch.seconds


def run_loop(cfg, data, p, steps, warmup, device, bf16: bool, compile: bool, fused: bool) -> float:
    "Tokens/s of the plain loop, with bf16 autocast, torch.compile and fused AdamW as asked."
    model = build_model(cfg, seed=0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused or None)
    forward = torch.compile(model) if compile else model
    def step(i):
        batch = data.batch(i, p.batch_size, p.seq_len).to(device)  # [batch, seq_len + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(batch[:, :-1]).logits  # [batch, seq_len, vocab]
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * p.batch_size * p.seq_len / timed_loop(step, steps, warmup, device)


class Windows(torch.utils.data.IterableDataset):
    "The token windows of updates 0, 1, … in order, as HF examples of seq_len tokens: input_ids = labels."
    def __init__(self, data, p, n_steps): self.data, self.p, self.n_steps = data, p, n_steps
    def __iter__(self):
        for step in range(self.n_steps):
            for row in self.data.batch(step, self.p.batch_size, self.p.seq_len)[:, :-1]:  # [seq_len]
                yield dict(input_ids=row, labels=row)


def hf_unavailable() -> str | None:
    "Why transformers.Trainer cannot run here, or None."
    if importlib.util.find_spec("accelerate") is None:
        return 'transformers.Trainer needs accelerate, which is not installed (pip install -e ".[bench]")'
    return None


def run_hf(cfg, data, p, steps, warmup, device, compile) -> float:
    "Tokens/s of `transformers.Trainer`: bf16, torch_compile and fused AdamW on CUDA, constant LR, clip at 1."
    from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments

    class HFStopwatch(TrainerCallback):
        "Starts `clock` after update `warmup` and stops it after the last."
        def __init__(self): self.clock = Clock(device)
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup: self.clock.start()
            if state.global_step == warmup + steps: self.clock.stop()

    cuda, watch = device.type == "cuda", HFStopwatch()
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=p.batch_size,
            learning_rate=p.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, bf16=cuda, torch_compile=compile,
            optim="adamw_torch_fused" if cuda else "adamw_torch", use_cpu=not cuda, logging_strategy="no",
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        HFTrainer(model=build_model(cfg, seed=0), args=args, train_dataset=Windows(data, p, warmup + steps),
                  callbacks=[watch]).train()
    return steps * p.batch_size * p.seq_len / watch.clock.seconds


def variant_runs(cfg, data, p, a, device, compile) -> dict:
    "{variant: () -> tokens/s} for the variants asked for."
    cuda, args = device.type == "cuda", (cfg, data, p, a.steps, a.warmup, device)
    runs = {"eager fp32": lambda: run_loop(*args, bf16=False, compile=False, fused=False),
            "eager bf16": lambda: run_loop(*args, bf16=cuda, compile=False, fused=False),
            "compiled loop": lambda: run_loop(*args, bf16=cuda, compile=compile, fused=cuda),
            "HF Trainer": lambda: run_hf(*args, compile=compile),
            "dyntrack": lambda: run_dyntrack(*args, compile=compile)}
    return {v: runs[v] for v in VARIANTS if v in a.variants}


def markdown(r: dict) -> str:
    "The report: setup line, the table, skipped variants."
    lines = ["# LM training throughput: dyntrack against the loops a researcher would write", "",
             f"Device: {r['device']}; commit {r['commit']}; {r['time']}.", "",
             f"{r['arch']}-{r['size']} ({r['profile']} profile), batch {r['batch_size']} × seq {r['seq_len']}, "
             f"compile={r['compile']}; {r['steps']} timed steps after {r['warmup']}, median of {r['rounds']} "
             f"round(s); {r['flops_per_token'] / 1e6:.1f} MFLOP/token.", "",
             "| variant | tokens/s | dyntrack ÷ variant | MFU |", "|---|---:|---:|---:|"]
    lines += [f"| {x['variant']} | {x['tokens_per_s']:,.0f} | {x['dyntrack_ratio']:.2f} | {x['mfu']:.3f} |"
              for x in r["rows"]]
    lines += [f"\nSkipped: {name}: {why}." for name, why in r["skipped"].items()]
    return "\n".join(lines + [""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all variants, taken in turn; median per variant")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile anywhere")
    ap.add_argument("--require-peers", action="store_true", help="stop, instead of skipping it, if a peer cannot run")
    ap.add_argument("--tiny", action="store_true", help="the smoke profile for 1 + 2 steps, uncompiled: a CPU check")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    ap.add_argument("--out", default="", help="JSON file; the table goes beside it with the suffix .md")
    a = ap.parse_args(argv)
    if a.tiny:
        for k, v in TINY.items(): setattr(a, k, v)
    try: check_counts(a.steps, a.warmup, a.rounds)
    except ValueError as e: ap.error(f"--{e}")
    if "dyntrack" not in a.variants: ap.error("--variants must include dyntrack (the ratios are dyntrack's)")
    os.environ.setdefault("DYNTRACK_PROGRESS", "0")  # no trainer progress bars in the output
    p = resolve_params(SuiteParams, a.profile)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the plain fp32 reference stays plain
    skipped = {NAMES["HF Trainer"]: why for why in [hf_unavailable()] if why and "HF Trainer" in a.variants}
    if skipped and a.require_peers: sys.exit(f"bench_train: --require-peers, but {next(iter(skipped.values()))}")
    if skipped: a.variants = [v for v in a.variants if v != "HF Trainer"]
    for name, why in skipped.items(): print(f"bench_train: skipping {name}: {why}", file=sys.stderr)
    compile, vocab = not a.no_compile, p.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, 4_000_000, dtype=np.int64)
    data = TokenShards.from_arrays({"bench": ids}, vocab_size=vocab)
    cfg = model_config(p.arch, p.size, vocab_size=vocab, max_seq_len=p.seq_len)
    fpt, peak = flops_per_token(cfg, p.seq_len), peak_flops(device)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    results = rounds(variant_runs(cfg, data, p, a, device, compile), a.rounds)
    ours = median_round(results["dyntrack"])
    rows = [dict(variant=NAMES[v], tokens_per_s=median_round(tps), rounds=tps, dyntrack_ratio=ours / median_round(tps),
                 mfu=mfu(median_round(tps), fpt, peak)) for v, tps in results.items()]
    r = dict(device=device_name(device), commit=source_commit(), time=started, software=software_versions(),
             profile=a.profile, arch=p.arch, size=p.size, batch_size=p.batch_size, seq_len=p.seq_len, compile=compile,
             steps=a.steps, warmup=a.warmup, rounds=a.rounds, flops_per_token=fpt, peak_bf16_flops=peak, rows=rows,
             skipped=skipped, wall_s=time.perf_counter() - t0)
    print(markdown(r))
    if a.out:
        write_json(a.out, r)
        Path(a.out).with_suffix(".md").write_text(markdown(r))
    return r


if __name__ == "__main__":
    main()
