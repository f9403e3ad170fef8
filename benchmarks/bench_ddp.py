"""Data-parallel training: the `paper`-profile suite model on two GPUs (torchrun, DDP over NCCL) against one GPU.

Every run trains the same model from the same seed on the same global batches (128 × 256 tokens in `paper`) of the
embedded corpus for `--steps` updates; only how the batch is computed differs:
  1gpu          one process, the whole batch at once (the reference)
  1gpu-accum2   one process, the batch as two accumulated halves: the same sums in another order, i.e. the size of
                the loss differences that floating-point reduction order alone causes (the noise floor)
  2gpu          `torchrun --nproc_per_node 2`: each rank computes half the batch, DDP all-reduces the gradients
  2gpu-stopped  the 2-GPU run stopped right after its trainer state was saved at step `--steps // 2`
  resume-1gpu   a copy of 2gpu-stopped resumed on one GPU to the end
  resume-cpu    a copy of 2gpu-stopped resumed on the CPU for `--cpu-steps` updates (fp32: `precision` is auto)
and the 2-GPU run's suite checkpoint at `--steps // 2` is loaded on the CPU and evaluated against the validation loss
the 2-GPU run logged for it. Tokens/s is timed from update `--warmup` to `--steps // 2` (no checkpoint or evaluation
in that window); scaling efficiency = 2-GPU tokens/s / (2 × 1-GPU tokens/s). `--batch-size` sets the global batch
(rows of `seq_len` tokens; default: the profile's). `--speed-batches` adds, for each global batch given, a 1-GPU
and a 2-GPU run of `--speed-steps` updates that are only timed: how efficiency depends on the rows per GPU.
`--trace-steps N` profiles N updates of the main 1-GPU and 2-GPU runs after the timed window (from update
`--steps // 2 + 2`) with torch.profiler: per rank, a table of the busiest operators (`profile_rank{r}.txt`) and a
Chrome trace (`trace_rank{r}.json`) in the run's folder, to see where a step's time goes on the host and the device.
`--omp-threads` sets OMP_NUM_THREADS for every process (torchrun's default is 1).

    python benchmarks/bench_ddp.py --out results/paper/benchmarks/ddp    # on a host with 2 GPUs
    python benchmarks/bench_ddp.py --batch-size 256 --speed-batches 128 --out /tmp/ddp
    python benchmarks/bench_ddp.py --profile smoke --device cpu --out /tmp/ddp   # the same protocol, gloo on CPU

NCCL's NVLink multicast (NVLS) is switched off in the environment of every process it starts.
"""
import argparse, dataclasses, json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dyntrack.core import device_name, resolve_params, software_versions, write_json
from dyntrack.models.presets import build_model, model_config
from dyntrack.models.suite import CheckpointSuite
from dyntrack.data.embedded import prepare_embedded_data
from dyntrack.suite import SuiteParams
from dyntrack.train.suite import train_config
from dyntrack.train.state import read_log
from dyntrack.train.trainer import Callback, Trainer, validation_losses
from bench_train import Stopwatch

NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


class Stopped(Exception): "Raised by `StopAt` to end a run early, as a crash or a lost node would."


class StopAt(Callback):
    "Stop the run when update `step` is about to start (everything due after update `step - 1` has been done)."
    def __init__(self, step): self.step = step
    def on_step_start(self, trainer, step):
        if step == self.step: raise Stopped(step)


class Profile(Callback):
    "torch.profiler over updates `start … start + n - 1`; writes a table and a Chrome trace per rank into `out`."
    def __init__(self, start: int, n: int, out): self.start, self.n, self.out, self.prof = start, n, Path(out), None
    def on_step_start(self, trainer, step):
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile
            cuda = trainer.device.type == "cuda"
            self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
            self.prof.__enter__()
    def on_step_end(self, trainer, step, loss):
        if self.prof is None or step != self.start + self.n - 1: return
        if trainer.device.type == "cuda": torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=30)
        (self.out / f"profile_rank{trainer.rank}.txt").write_text(f"{self.n} updates from {self.start}\n{table}\n")
        self.prof.export_chrome_trace(str(self.out / f"trace_rank{trainer.rank}.json"))
        self.prof = None


class LossTrace(Callback):
    "Keep every update's loss as a tensor (no GPU sync per step); read them once at the end."
    def __init__(self): self.steps, self.losses = [], []
    def on_step_end(self, trainer, step, loss): self.steps.append(step + 1); self.losses.append(loss.detach())
    def records(self) -> dict[int, float]: return dict(zip(self.steps, torch.stack(self.losses).tolist())) if self.losses else {}


def bench_params(a) -> SuiteParams:
    given = dict(words_per_domain=a.words_per_domain, device=a.device)
    p = resolve_params(SuiteParams, a.profile, given | ({"batch_size": a.batch_size} if a.batch_size else {}))
    return dataclasses.replace(p, compile=p.compile and a.device != "cpu")  # `compile` may differ on resume


def bench_config(p: SuiteParams, a, grad_accum: int = 1):
    "The suite's trainer config for `--steps` updates, with a checkpoint and trainer-state save at the middle step."
    mid = a.steps // 2
    return dataclasses.replace(train_config(p.recipe), total_steps=a.steps, warmup_steps=min(p.warmup_steps, mid // 2),
                               checkpoint_steps=[mid, a.steps], eval_steps=[mid, a.steps], resume_every=mid,
                               grad_accum=grad_accum, log_every=a.steps)


def worker(a):
    "One training run (a torchrun rank or a plain process); rank 0 writes `{run_dir}/bench.json`."
    p = bench_params(a)
    tokenizer, shards = prepare_embedded_data(p.words_per_domain, p.corpus_seed, p.vocab_size)  # the driver built them: this only opens the cache
    config = model_config(p.arch, p.size, vocab_size=len(tokenizer), max_seq_len=p.seq_len,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg = bench_config(p, a, a.grad_accum)
    watch, trace = Stopwatch(a.warmup, end=a.steps // 2), LossTrace()
    callbacks = [watch, trace] + ([StopAt(a.stop_at)] if a.stop_at else [])
    if a.trace_steps: callbacks.append(Profile(a.steps // 2 + 2, a.trace_steps, a.run_dir))
    trainer = Trainer(build_model(config, seed=p.seed), tokenizer, shards, cfg, a.run_dir, callbacks, device=p.device)
    stopped = None
    try: trainer.fit()
    except Stopped as e: stopped = e.args[0]
    if trainer.rank == 0:
        tps = cfg.batch_size * cfg.seq_len * (a.steps // 2 - a.warmup) / watch.seconds if watch.t1 else None
        write_json(Path(a.run_dir) / "bench.json",
                   dict(device=device_name(trainer.device), world_size=trainer.world_size, grad_accum=cfg.grad_accum,
                        stopped_at=stopped, tokens_per_s=tps, losses=trace.records()))
    if dist.is_initialized(): dist.destroy_process_group()


def launch(a, run_dir, nproc=1, **overrides):
    "Run `worker` in `nproc` processes (torchrun when > 1) with `overrides` of the command line; its bench.json."
    args = dict(vars(a), run_dir=str(run_dir), **overrides)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k not in ("cmd", "out", "speed_batches") and v is not None]
    script = [str(Path(__file__).resolve()), "worker", *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, **NO_MULTICAST, DYNTRACK_PROGRESS="0")
    if a.omp_threads: env["OMP_NUM_THREADS"] = str(a.omp_threads)
    t0 = time.perf_counter()
    subprocess.run(launcher + script, env=env, check=True)
    print(f"  {Path(run_dir).name}: {time.perf_counter() - t0:.0f} s wall (start-up and compilation included)", flush=True)
    return json.loads((Path(run_dir) / "bench.json").read_text())


def max_gap(a: dict, b: dict, steps) -> float:
    "Largest |loss difference| between two runs over `steps` (JSON keys are strings)."
    return max(abs(a[str(s)] - b[str(s)]) for s in steps)


def cpu_checkpoint_check(run_dir, step: int, p: SuiteParams, shards, cfg) -> dict:
    "Load the suite checkpoint `step` of `run_dir` on the CPU; its validation loss beside the one logged in training."
    suite = CheckpointSuite.from_run(run_dir)
    model = suite.load_model(step=step, device="cpu", dtype=torch.float32)
    cpu = validation_losses(model, shards, cfg.seq_len, cfg.batch_size // 4, cfg.eval_tokens or None)
    logged = next(r for r in read_log(Path(run_dir) / "log.jsonl") if r["step"] == step)["val_loss"]
    return dict(step=step, cpu_fp32=float(np.mean(list(cpu.values()))), logged_bf16=float(np.mean(list(logged.values()))))


def main(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    p = bench_params(a)
    _, shards = prepare_embedded_data(p.words_per_domain, p.corpus_seed, p.vocab_size)  # once, before any process starts: ranks must not race on the cache
    cfg, mid, gpus = bench_config(p, a), a.steps // 2, torch.cuda.device_count() if a.device != "cpu" else 0
    print(f"device: {device_name(a.device)} ×{max(gpus, 1)}; {p.arch}-{p.size}, batch {p.batch_size} × {p.seq_len}, "
          f"{a.steps} steps, timed {a.warmup}..{mid}", flush=True)
    for d in ("1gpu", "1gpu-accum2", "2gpu", "2gpu-stopped", "resume-1gpu", "resume-cpu"): shutil.rmtree(out / d, ignore_errors=True)
    by_batch = [speed_pair(a, out, b) for b in a.speed_batches]
    one = launch(a, out / "1gpu")
    accum = launch(a, out / "1gpu-accum2", grad_accum=2, trace_steps=0)
    two = launch(a, out / "2gpu", nproc=2)
    stopped = launch(a, out / "2gpu-stopped", nproc=2, stop_at=mid, trace_steps=0)
    assert stopped["stopped_at"] == mid, stopped["stopped_at"]
    for d in ("resume-1gpu", "resume-cpu"): shutil.copytree(out / "2gpu-stopped", out / d)
    resumed = launch(a, out / "resume-1gpu", trace_steps=0)
    cpu = launch(a, out / "resume-cpu", device="cpu", stop_at=mid + a.cpu_steps, trace_steps=0)
    after, late = range(mid + 1, a.steps + 1), range(a.warmup + 1, a.steps + 1)
    summary = dict(
        device=device_name(a.device), software=software_versions(), profile=a.profile, steps=a.steps, warmup=a.warmup,
        batch_size=p.batch_size, seq_len=p.seq_len, words_per_domain=p.words_per_domain,
        tokens_per_s={"1gpu": one["tokens_per_s"], "2gpu": two["tokens_per_s"], "1gpu-accum2": accum["tokens_per_s"]},
        scaling_efficiency=two["tokens_per_s"] / (2 * one["tokens_per_s"]),
        efficiency_by_batch=sorted(by_batch + [dict(batch_size=p.batch_size, rows_per_gpu=p.batch_size // 2,
                                                    tokens_per_s_1gpu=one["tokens_per_s"], tokens_per_s_2gpu=two["tokens_per_s"],
                                                    efficiency=two["tokens_per_s"] / (2 * one["tokens_per_s"]), steps=a.steps)],
                                   key=lambda r: r["batch_size"]),
        max_loss_gap={"2gpu vs 1gpu": max_gap(two["losses"], one["losses"], late),
                      "1gpu-accum2 vs 1gpu (noise floor)": max_gap(accum["losses"], one["losses"], late),
                      "resume-1gpu vs 2gpu": max_gap(resumed["losses"], two["losses"], after),
                      "resume-cpu vs 2gpu": max_gap(cpu["losses"], two["losses"], range(mid + 1, mid + a.cpu_steps + 1))},
        final_loss={k: r["losses"][str(a.steps)] for k, r in (("1gpu", one), ("2gpu", two), ("resume-1gpu", resumed))},
        cpu_checkpoint=cpu_checkpoint_check(out / "2gpu", mid, p, shards, cfg),
        losses={k: r["losses"] for k, r in (("1gpu", one), ("1gpu-accum2", accum), ("2gpu", two),
                                             ("resume-1gpu", resumed), ("resume-cpu", cpu))})
    write_json(out / "ddp.json", summary)
    plot(summary, out / "ddp_loss.png")
    report(summary)


def speed_pair(a, out, batch_size) -> dict:
    "Tokens/s of a 1-GPU and a 2-GPU run of `--speed-steps` updates at global batch `batch_size` (timed only)."
    runs = {n: launch(a, out / f"speed-b{batch_size}-{n}gpu", nproc=n, batch_size=batch_size, steps=a.speed_steps,
                      trace_steps=0) for n in (1, 2)}
    for n in (1, 2): shutil.rmtree(out / f"speed-b{batch_size}-{n}gpu")  # only the numbers are kept
    one, two = runs[1]["tokens_per_s"], runs[2]["tokens_per_s"]
    return dict(batch_size=batch_size, rows_per_gpu=batch_size // 2, tokens_per_s_1gpu=one, tokens_per_s_2gpu=two,
                efficiency=two / (2 * one), steps=a.speed_steps)


def plot(s, path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 3.8))
    ref = s["losses"]["1gpu"]
    for i, (name, rec) in enumerate(s["losses"].items()):
        steps, style = sorted(int(k) for k in rec), dict(label=name, lw=1, color=f"C{i}")
        ax.plot(steps, [rec[str(k)] for k in steps], **style)
        if name != "1gpu": dx.plot(steps, [rec[str(k)] - ref[str(k)] for k in steps], **style)
    ax.set(xlabel="update", ylabel="training loss", title="Loss per update"); ax.legend(fontsize=8)
    dx.set(xlabel="update", ylabel="loss − 1-GPU loss", title="Difference from the 1-GPU run"); dx.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(path, dpi=120)


def report(s):
    print(f"\n{'run':14s} {'tokens/s':>12s}")
    for k, v in s["tokens_per_s"].items(): print(f"{k:14s} {v:12,.0f}")
    print(f"scaling efficiency (2-GPU / 2 × 1-GPU): {s['scaling_efficiency']:.3f}")
    print(f"\n{'global batch':>12s} {'rows/GPU':>8s} {'1 GPU tok/s':>12s} {'2 GPUs tok/s':>13s} {'efficiency':>10s} {'updates':>7s}")
    for r in s["efficiency_by_batch"]:
        print(f"{r['batch_size']:12d} {r['rows_per_gpu']:8d} {r['tokens_per_s_1gpu']:12,.0f} {r['tokens_per_s_2gpu']:13,.0f} "
              f"{r['efficiency']:10.3f} {r['steps']:7d}")
    print("\nlargest |loss difference| per update:")
    for k, v in s["max_loss_gap"].items(): print(f"  {k:36s} {v:.4f}")
    print("final loss:", {k: round(v, 4) for k, v in s["final_loss"].items()})
    c = s["cpu_checkpoint"]
    print(f"2-GPU checkpoint step {c['step']} on CPU: validation loss {c['cpu_fp32']:.4f} (fp32) vs "
          f"{c['logged_bf16']:.4f} logged in training")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="main", choices=["main", "worker"])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--steps", type=int, default=400, help="updates per run (checkpoint and state save at the middle)")
    ap.add_argument("--warmup", type=int, default=50, help="updates before timing starts (compilation, warm-up)")
    ap.add_argument("--cpu-steps", type=int, default=3, help="updates of the CPU resume")
    ap.add_argument("--words-per-domain", type=int, default=500_000, help="corpus size (batches repeat windows if small)")
    ap.add_argument("--device", default="auto", help="auto | cpu (then the 2-process runs use gloo)")
    ap.add_argument("--batch-size", type=int, default=0, help="global batch in rows; 0 = the profile's")
    ap.add_argument("--speed-batches", type=int, nargs="*", default=[], help="more global batches, timed only")
    ap.add_argument("--speed-steps", type=int, default=160, help="updates of each --speed-batches run")
    ap.add_argument("--trace-steps", type=int, default=0, help="updates profiled in the main 1-GPU and 2-GPU runs")
    ap.add_argument("--omp-threads", type=int, default=0, help="OMP_NUM_THREADS of every process; 0 = leave it")
    ap.add_argument("--out", default="runs/bench-ddp")
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trace_steps and a.steps // 2 + 2 + a.trace_steps > a.steps:
        ap.error(f"--trace-steps {a.trace_steps} does not fit after update {a.steps // 2 + 2} of --steps {a.steps}")
    return a


if __name__ == "__main__":
    args = parse()
    worker(args) if args.cmd == "worker" else main(args)
