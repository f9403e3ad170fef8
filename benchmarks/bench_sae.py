"""SAE training throughput: dyntrack's TopK SAE (sparse decoder) against a plain dense-decoder TopK SAE, same run.

Both sides train a TopK SAE on the suite's width (`d_model` of the profile's model size; `paper`: 512) at each
`--d-sae`, with the same batch of random activations (the data source does not change step throughput), the same k,
the same initial weights and the same dtype policy, the library's: float32 master weights and Adam state, the forward
under bf16 autocast on CUDA (plain float32 on the CPU), losses in float32.
  1. plain dense TopK (reference), written out below: h = (x − b_dec) W_enc + b_enc, keep the top k (unsorted, ReLU),
     scatter them into a dense [batch, d_sae] tensor, x̂ = z W_dec + b_dec as a dense matmul, MSE, `torch.optim.Adam`.
     No AuxK, no decoder-norm constraint, no dead-latent bookkeeping, no per-step host sync.
  2. dyntrack, AuxK idle: `dyntrack.sae.train.train_sae` exactly as the library trains (SparseAutoencoder with
     kind="topk", the embedding-bag decoder `decode_sparse`, normalised MSE, the AuxK term, unit-norm decoder with
     the parallel gradient removed, the tokens-since-fired counter, a log record per step) with the default
     `dead_tokens` (10M): no latent can die within the run, so AuxK costs only its dead-latent count.
  3. dyntrack, dead after 1 batch: the same with `dead_tokens` = one batch, so every latent that did not fire in the
     previous batch counts as dead and the AuxK top-`aux_k` search and reconstruction run on every step that has one
     (the worst case). With k · batch activations spread over d_sae latents some latents stay silent at 64k, while
     at small d_sae all may fire: the `AuxK steps` column gives the share of timed steps on which AuxK ran.
Tokens/s covers steps `--warmup + 1 … --warmup + --steps`: for the reference, timed from the end of step `--warmup`
to the end of the last (device synchronised at both ends); dyntrack is timed the same way, without a callback (one
would make `train_sae` settle every step's log record at once, a host sync per step): the clock starts when
`train_sae` asks for batch `--warmup` (after a device sync there, so the warm-up steps are done) and stops when it
has returned and the device is synchronised. ratio = tokens/s / reference tokens/s. Separately, the encoder matmul [batch, d_model] @ [d_model, d_sae]
(2 · batch · d_model · d_sae FLOP) is timed alone, with bf16 operands on CUDA (float32 on the CPU), and as the library
runs it (`SparseAutoencoder.pre_acts` under autocast, the bf16 cast of the fp32 weights included);
both are reported as achieved FLOP/s and as a fraction of the device's dense bf16 peak (bench_train.PEAK_BF16).
Before timing, both sides' reconstructions of one batch from the same weights are checked to agree (float32).

    python benchmarks/bench_sae.py --out results/paper/benchmarks/sae.json
    python benchmarks/bench_sae.py --d-sae 1024 4096 --batch 1024 --steps 5 --warmup 2   # CPU check
"""
import argparse, dataclasses, os, time

import torch
import torch.nn.functional as F
from torch import nn

from dyntrack.core import autocast, resolve_params, device_name, software_versions, write_json
from dyntrack.models.presets import SIZES
from dyntrack.sae.model import SaeConfig, SparseAutoencoder
from dyntrack.sae.train import train_sae
from dyntrack.suite import SuiteParams
from bench_train import peak_flops
from _timing import Clock, clocked, timed_loop


class PlainTopKSAE(nn.Module):
    "The straightforward TopK SAE: dense latents, dense decoder matmul; weights copied from a dyntrack SAE."
    def __init__(self, sae: SparseAutoencoder, k: int):
        super().__init__()
        self.k = k
        for name, p in sae.named_parameters(): setattr(self, name, nn.Parameter(p.detach().clone()))

    def forward(self, x):  # x [batch, d_model] -> reconstruction [batch, d_model]
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # [batch, d_sae]
        values, indices = pre.topk(self.k, dim=-1, sorted=False)  # [batch, k]
        z = torch.zeros_like(pre).scatter(-1, indices, F.relu(values))  # [batch, d_sae]
        return z @ self.W_dec + self.b_dec


def run_plain(model, pool, steps, warmup, device, lr):
    "Tokens/s of the plain loop: forward under autocast, float32 MSE, Adam."
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    def step(i):
        x = pool[i % len(pool)]  # [batch, d_model]
        with autocast(device): recon = model(x)
        loss = F.mse_loss(recon.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * pool[0].shape[0] / timed_loop(step, steps, warmup, device)


def run_dyntrack(cfg, pool, steps, warmup, device):
    "Tokens/s of `train_sae` as the library trains (no callbacks); mean dead fraction and share of AuxK steps, timed part."
    clock = Clock(device)
    batches = clocked((pool[i % len(pool)] for i in range(warmup + steps)), warmup, clock)  # the pool, cycled
    sae = SparseAutoencoder(cfg, device=device)
    history = train_sae(sae, batches, dataclasses.replace(cfg, n_tokens=(warmup + steps) * cfg.batch_size)).history
    seconds, timed_log = clock.stop(), history[warmup:]
    mean = lambda values: sum(values) / len(values)
    return (steps * cfg.batch_size / seconds, mean([r["dead_fraction"] for r in timed_log]),
            mean([float(r["aux_loss"] > 0) for r in timed_log]))


def timed(fn, repeats, device):
    "Seconds per call of `fn` after one warm-up call."
    return timed_loop(lambda i: fn(), repeats, 1, device) / repeats


@torch.no_grad()
def encoder_rates(sae, x, repeats, device):
    "FLOP/s of the encoder matmul alone (bf16 operands on CUDA) and of the library's encoder pre-activations."
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    xb, wb = x.to(dtype), sae.W_enc.detach().to(dtype)  # [batch, d_model], [d_model, d_sae]
    flop = 2 * x.shape[0] * x.shape[1] * wb.shape[1]
    def as_run():
        with autocast(device): return sae.pre_acts(x)
    return flop / timed(lambda: xb @ wb, repeats, device), flop / timed(as_run, repeats, device)


@torch.no_grad()
def check_same_function(sae, plain, x):
    "Max |x̂_dyntrack − x̂_plain| on `x` in float32 (same weights); raise if they disagree."
    ours, ref = sae.reconstruct(sae.encode(x)), plain(x)
    diff = (ours - ref).abs().max().item()
    if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()):
        raise AssertionError(f"reference and dyntrack reconstructions differ by up to {diff:.3g}")
    return diff


def trace(d_model, d_sae, a, device, n_steps=5, rows=25):
    "Print torch.profiler's busiest operators over `n_steps` steps of each side at `d_sae`: where a step's time goes."
    from torch.profiler import ProfilerActivity, profile
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(a.batch, d_model, device=device, generator=gen) for _ in range(a.pool)]
    cfg = SaeConfig(d_model=d_model, d_sae=d_sae, kind="topk", k=a.k, batch_size=a.batch, n_tokens=2 * n_steps * a.batch)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sides = {"plain dense TopK": lambda: run_plain(PlainTopKSAE(SparseAutoencoder(cfg, device=device), a.k), pool,
                                                  n_steps, n_steps, device, cfg.lr),
             "dyntrack train_sae": lambda: run_dyntrack(cfg, pool, n_steps, n_steps, device)}
    for name, run in sides.items():
        with profile(activities=activities) as prof: run()  # warm-up steps included: same for both sides
        print(f"\n{name}, d_sae {d_sae}: {2 * n_steps} steps\n" + prof.key_averages().table(sort_by=sort, row_limit=rows))


def bench_one(d_model, d_sae, a, device, peak):
    "All rows for one dictionary size."
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(a.batch, d_model, device=device, generator=gen) for _ in range(a.pool)]  # [batch, d_model]
    n_tokens = (a.warmup + a.steps) * a.batch
    cfg = SaeConfig(d_model=d_model, d_sae=d_sae, kind="topk", k=a.k, batch_size=a.batch, n_tokens=n_tokens)
    sae = SparseAutoencoder(cfg, device=device)
    diff = check_same_function(sae, PlainTopKSAE(sae, a.k), pool[0])
    enc_mm, enc_run = encoder_rates(sae, pool[0], a.encoder_repeats, device)
    ref = run_plain(PlainTopKSAE(sae, a.k), pool, a.steps, a.warmup, device, cfg.lr)
    rows = [dict(variant="plain dense TopK (reference)", tokens_per_s=ref, dead_fraction=None, auxk_steps=None)]
    for name, dead in (("dyntrack, AuxK idle", cfg.dead_tokens), ("dyntrack, dead after 1 batch", a.batch)):
        run_cfg = dataclasses.replace(cfg, dead_tokens=dead)
        tps, dead_frac, aux_share = run_dyntrack(run_cfg, pool, a.steps, a.warmup, device)
        rows.append(dict(variant=name, tokens_per_s=tps, dead_fraction=dead_frac, auxk_steps=aux_share))
    del pool, sae
    if device.type == "cuda": torch.cuda.empty_cache()
    for r in rows: r.update(d_sae=d_sae, ratio=r["tokens_per_s"] / ref)
    return rows, dict(d_sae=d_sae, encoder_matmul_flops=enc_mm, encoder_matmul_peak_fraction=enc_mm / peak,
                      encoder_as_run_flops=enc_run, encoder_as_run_peak_fraction=enc_run / peak,
                      max_recon_diff=diff)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper", help="profile whose model size sets d_model")
    ap.add_argument("--d-sae", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--batch", type=int, default=SaeConfig.batch_size, help="activation vectors per step")
    ap.add_argument("--k", type=int, default=SaeConfig.k)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through")
    ap.add_argument("--encoder-repeats", type=int, default=50)
    ap.add_argument("--trace", action="store_true", help="also print a profiler table per side at the largest d_sae")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if min(a.warmup, a.steps, a.pool, a.encoder_repeats) < 1:
        ap.error("--warmup, --steps, --pool and --encoder-repeats must be at least 1")
    os.environ.setdefault("DYNTRACK_PROGRESS", "0")  # no train_sae progress bars in the output
    p = resolve_params(SuiteParams, a.profile)
    d_model = SIZES[p.size]["d_model"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32 (the autocast matmuls are bf16 anyway)
    peak = peak_flops(device)
    rows, encoder = [], []
    for d_sae in a.d_sae:
        r, e = bench_one(d_model, d_sae, a, device, peak)
        rows += r; encoder.append(e)
    print(f"device: {device_name(device)}; d_model {d_model} ({a.profile} size {p.size}), batch {a.batch}, k {a.k}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; {a.steps} timed steps after {a.warmup}")
    print(f"{'d_sae':>6s} {'variant':30s} {'tokens/s':>12s} {'ratio':>7s} {'dead frac':>9s} {'AuxK steps':>10s}")
    for r in rows:
        dead = "" if r["dead_fraction"] is None else f"{r['dead_fraction']:9.3f} {r['auxk_steps']:10.2f}"
        print(f"{r['d_sae']:6d} {r['variant']:30s} {r['tokens_per_s']:12,.0f} {r['ratio']:7.2f} {dead}")
    print(f"{'d_sae':>6s} {'enc matmul TFLOP/s':>19s} {'of peak':>8s} {'enc as run TFLOP/s':>19s} {'of peak':>8s} "
          f"{'max |Δx̂|':>9s}")
    for e in encoder:
        print(f"{e['d_sae']:6d} {e['encoder_matmul_flops'] / 1e12:19.2f} {e['encoder_matmul_peak_fraction']:8.3f} "
              f"{e['encoder_as_run_flops'] / 1e12:19.2f} {e['encoder_as_run_peak_fraction']:8.3f} "
              f"{e['max_recon_diff']:9.2g}")
    if a.out:
        write_json(a.out, dict(device=device_name(device), software=software_versions(), profile=a.profile,
                               d_model=d_model, batch=a.batch, k=a.k, steps=a.steps, warmup=a.warmup,
                               peak_bf16_flops=peak, rows=rows, encoder=encoder))
    if a.trace: trace(d_model, max(a.d_sae), a, device)


if __name__ == "__main__":
    main()
