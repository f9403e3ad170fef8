"""TopK language-model training: step time of the TopK Llama against its dense baseline, same run, same trainer.

The `paper` profile's model size (Llama "base": d512 × 8 blocks, vocabulary 8192), batch (128 × 256 tokens) and
learning rate, trained by the dyntrack `Trainer` exactly as the suite is trained (bf16 autocast on CUDA, fused AdamW,
`torch.compile` when the profile asks for it) on random tokens, in up to four runs of --warmup + --steps updates:
  1. dense         `topk_model.dense_config`: the plain Llama (the reference)
  2. TopK anneal   `topk_model.topk_config` with α fixed at --alpha (0 < α < 1): the annealing phase, where every TopK'd
                   block computes both f(x) and the top-k mask and mixes them, y = α·f(x) + (1 − α)·f(x)·mask
  3. TopK pure     the same model with α = 0: the pure-TopK phase after annealing
  4. TopK sched    (`--variants ... schedule`) the `TopKAnnealing` callback driving α from 1 towards 0 over the
                   whole run, i.e. α changes every step as in a real annealing phase (timed steps have 0 < α < 1; the
                   one recompilation under torch.compile, at update 1 when α leaves 1, falls in the warm-up)
Step time is timed from the end of update --warmup to the end of the last update (bench_train.Stopwatch, device
synchronised at both ends), so compilation and allocator warm-up are excluded; ratio = step time / dense step time.
After each TopK run the mean number of non-zero entries per position after the TopK'd blocks is measured on a few
sequences (`layer_sparsity`, float32): k in the pure phase shows the mask is active. `run s` is the whole run's wall
time, compilation included.

    python benchmarks/bench_topk.py --out results/paper/benchmarks/topk.json
    python benchmarks/bench_topk.py --variants schedule --out results/paper/benchmarks/topk_schedule.json
    python benchmarks/bench_topk.py --profile smoke --size small --steps 5 --warmup 2 --variants anneal pure schedule
"""
import argparse, os, tempfile, time

import numpy as np
import torch

from dyntrack.core import resolve_params, device_name, software_versions, write_json
from dyntrack.models.presets import build_model
from dyntrack.suite import SuiteParams
from dyntrack.data.tokens import TokenShards
from dyntrack.topk.model import TopKAnnealing, dense_config, layer_sparsity, set_topk_alpha, topk_config
from dyntrack.train.trainer import Trainer, TrainConfig
from bench_train import Stopwatch

VARIANTS = ("anneal", "pure", "schedule")


def run(config, data, p, steps, warmup, device, compile, alpha=None, schedule=False):
    "Train a fresh model of `config` for warmup + steps updates; (seconds per timed step, run wall s, TopK non-zeros)."
    model = build_model(config, seed=0)
    if alpha is not None: set_topk_alpha(model, alpha)
    total = warmup + steps
    tc = TrainConfig(total_steps=total, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr, warmup_steps=0,
                     compile=compile, checkpoint_steps=[], eval_steps=[], resume_every=0, log_every=10**9)
    watch = Stopwatch(warmup)
    callbacks = [watch] + ([TopKAnnealing(fraction=1.0)] if schedule else [])  # α = 1 − step / total
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(model, None, data, tc, run_dir, callbacks=callbacks, device=str(device)).fit()
    wall = time.perf_counter() - t0
    nonzero = None
    if hasattr(config, "topk_k"):
        ids = data.batch(0, 4, p.seq_len)[:, :-1]  # [4, seq_len]
        sparse_layers = config.num_hidden_layers - config.n_nontopk
        nonzero = layer_sparsity(model, ids)[:sparse_layers].mean().item() if sparse_layers else None
    return watch.seconds / steps, wall, nonzero


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5, help="fixed α of the annealing-phase run, 0 < α < 1")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["anneal", "pure"],
                    help="TopK runs besides the dense reference (schedule: the TopKAnnealing callback)")
    ap.add_argument("--size", default="", help="model preset instead of the profile's (e.g. small for a CPU check)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    os.environ.setdefault("DYNTRACK_PROGRESS", "0")  # no trainer progress bars in the output
    if not 0 < a.alpha < 1: ap.error(f"--alpha={a.alpha} must lie strictly between 0 and 1")
    if a.warmup < 2 or a.steps < 1: ap.error("--warmup must be at least 2 (the schedule run recompiles at update 1) "
                                             "and --steps at least 1")
    p = resolve_params(SuiteParams, a.profile, dict(size=a.size or None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile = p.compile and not a.no_compile
    ids = np.random.default_rng(0).integers(0, p.vocab_size, 4_000_000, dtype=np.int64)
    data = TokenShards.from_arrays({"bench": ids}, vocab_size=p.vocab_size)
    dense = dense_config(p.size, p.vocab_size, p.seq_len)
    topk = topk_config(p.size, p.vocab_size, p.seq_len)
    topk_runs = dict(anneal=(f"TopK annealing (α={a.alpha:g})", dict(alpha=a.alpha)),
                     pure=("TopK pure (α=0)", dict(alpha=0.0)),
                     schedule=("TopK annealing (schedule)", dict(alpha=1.0, schedule=True)))
    runs = {"dense (reference)": dict(config=dense)}
    runs.update({topk_runs[v][0]: dict(config=topk, **topk_runs[v][1]) for v in VARIANTS if v in a.variants})
    results = {name: run(data=data, p=p, steps=a.steps, warmup=a.warmup, device=device, compile=compile, **kw)
               for name, kw in runs.items()}
    tokens = p.batch_size * p.seq_len
    ref = results["dense (reference)"][0]
    rows = [dict(variant=name, step_ms=s * 1e3, tokens_per_s=tokens / s, ratio_to_dense=s / ref, run_s=wall,
                 topk_nonzero_per_position=nz) for name, (s, wall, nz) in results.items()]
    print(f"device: {device_name(device)}; llama-{p.size} (d {dense.hidden_size} x {dense.num_hidden_layers} blocks, "
          f"vocab {p.vocab_size}), TopK k={topk.topk_k} on all but the last {topk.n_nontopk} blocks; batch "
          f"{p.batch_size} x seq {p.seq_len}, compile={compile}; {a.steps} timed steps after {a.warmup}")
    print(f"{'variant':28s} {'step ms':>9s} {'tokens/s':>12s} {'ratio':>7s} {'nonzero/pos':>11s} {'run s':>7s}")
    for r in rows:
        nz = "" if r["topk_nonzero_per_position"] is None else f"{r['topk_nonzero_per_position']:11.1f}"
        print(f"{r['variant']:28s} {r['step_ms']:9.2f} {r['tokens_per_s']:12,.0f} {r['ratio_to_dense']:7.3f} "
              f"{nz:>11s} {r['run_s']:7.1f}")
    if a.out:
        write_json(a.out, dict(device=device_name(device), software=software_versions(), profile=a.profile,
                               size=p.size, batch_size=p.batch_size, seq_len=p.seq_len, vocab_size=p.vocab_size,
                               topk_k=topk.topk_k, n_nontopk=topk.n_nontopk, compile=compile, steps=a.steps,
                               warmup=a.warmup, rows=rows))


if __name__ == "__main__":
    main()
