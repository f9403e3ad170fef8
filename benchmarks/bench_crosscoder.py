"""Crosscoder throughput: dyntrack's crosscoder training against a plain dense crosscoder, same run; IE examples/s.

(a) Training. Both sides train an L1 crosscoder over `--checkpoints` checkpoints of width `--d-model` with
`--d-latents` latents on the same random activations already in memory ([batch, n_checkpoints, d_model]; the data
source does not change step throughput), from the same initial weights, with the library's dtype policy: float32
master weights and Adam state, the forward under bf16 autocast on CUDA (plain float32 on the CPU), losses in float32.
  1. plain dense crosscoder (reference), written out below: f = ReLU(einsum("bmd,mdh->bh", x, W_enc) + b_enc),
     x̂ = einsum("bh,hmd->bmd", f, W_dec) + b_dec, loss = mean over tokens of Σ_m ‖x̂_m − x_m‖² plus
     λ · mean over tokens of Σ_i f_i Σ_m ‖W_dec,i^m‖ (the decoder norms recomputed for the penalty), `torch.optim.Adam`
     at its defaults. No gradient clipping, no λ ramp, no learning-rate schedule, no dead-latent count, no log record.
  2. dyntrack: `dyntrack.crosscoding.model.Crosscoder` trained by the platform's one SAE trainer,
     `dyntrack.sae.train.train_sae`, exactly as `train_crosscoder` trains it (the encoder one matmul over the
     concatenated checkpoints, fused Adam on CUDA, the global gradient-norm clip at 1, the λ ramp and the linear-decay
     tail, the tokens-since-fired counter, a log record per step copied to the host without waiting).
Tokens/s covers steps `--warmup + 1 … --warmup + --steps`, timed from the end of step `--warmup` to the end of the last
(device synchronised at both ends; dyntrack's clock starts when `train_sae` asks for batch `--warmup`, after a sync);
each side runs `--rounds` times, alternating, and the table gives the median round. ratio = dyntrack / reference.
Before timing, both sides' loss on one batch from the same weights is checked to agree (float32).
`--profile-step` prints torch.profiler's busiest operators over a few steps of each side.

(b) Indirect effects. `dyntrack.crosscoding.analysis.indirect_effects` (integrated gradients, `--ie-steps` steps,
through each checkpoint's decoder with the error node separate) of a random crosscoder over `--checkpoints` randomly
initialised GPT-NeoX models of preset size `--ie-size` on `--ie-pairs` minimal pairs of `--phenomenon`; examples/s =
pairs / seconds (each pair is run at every checkpoint), the median of `--rounds` rounds after one warm-up call.

    python benchmarks/bench_crosscoder.py --out results/paper/benchmarks/crosscoder
    python benchmarks/bench_crosscoder.py --tiny --out /tmp/bench_cc        # CPU, seconds
Writes `crosscoder.json` (every number, device, commit, software) and `crosscoder.md` (the tables) into `--out`.
"""
import argparse, dataclasses, os, statistics, tempfile, time
from pathlib import Path

import torch
from torch import nn

from dyntrack.core import autocast, device_name, software_versions, write_json
from dyntrack.crosscoding.analysis import indirect_effects
from dyntrack.crosscoding.model import Crosscoder, CrosscoderConfig, squared_error
from dyntrack.data.corpus import generate_corpus
from dyntrack.data.tasks import PHENOMENA, make_minimal_pairs
from dyntrack.data.tokens import train_tokenizer
from dyntrack.models.presets import build_model, model_config
from dyntrack.reproduce.report import source_commit
from dyntrack.sae.train import train_sae
from _timing import Clock, clocked, rounds, sync, timed_loop

TINY = dict(checkpoints=3, d_model=32, d_latents=256, batch=128, steps=4, warmup=2, rounds=1, pool=2, ie_size="tiny",
            ie_pairs=2, ie_steps=2, vocab=300, words=300)  # --tiny: a CPU check of the whole script in seconds


class DenseCrosscoder(nn.Module):
    "The straightforward crosscoder: einsum encoder over checkpoints, ReLU, dense decoder; weights copied from a dyntrack one."
    def __init__(self, cc: Crosscoder):
        super().__init__()
        self.l1_coef = cc.cfg.l1_coef
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"): setattr(self, name, nn.Parameter(getattr(cc, name).detach().clone()))

    def forward(self, x):  # x [batch, m, d] -> (reconstruction [batch, m, d], loss)
        f = torch.relu(torch.einsum("bmd,mdh->bh", x, self.W_enc) + self.b_enc)  # [batch, h]
        recon = torch.einsum("bh,hmd->bmd", f, self.W_dec) + self.b_dec
        mse = (recon.float() - x).pow(2).sum((1, 2)).mean()
        l1 = (f.float() * self.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()  # decoder-norm-weighted L1
        return recon, mse + self.l1_coef * l1


def run_dense(model, pool, steps, warmup, device, lr):
    "Tokens/s of the plain loop: forward under autocast, float32 loss, Adam."
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    def step(i):
        with autocast(device): _, loss = model(pool[i % len(pool)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * pool[0].shape[0] / timed_loop(step, steps, warmup, device)


def run_dyntrack(cfg, pool, steps, warmup, device):
    "Tokens/s of `train_sae` training a `Crosscoder` as `train_crosscoder` does (no callbacks, no out_dir)."
    clock = Clock(device)
    batches = clocked((pool[i % len(pool)] for i in range(warmup + steps)), warmup, clock)  # the pool, cycled
    train_sae(Crosscoder(cfg, device=device), batches, dataclasses.replace(cfg, n_tokens=(warmup + steps) * cfg.batch_size))
    return steps * cfg.batch_size / clock.stop()


@torch.no_grad()
def check_same_loss(cc, dense, x):
    "|loss_dyntrack − loss_dense| on `x` in float32 from the same weights (λ at full strength); raise if they disagree."
    out, (_, ref) = cc(x), dense(x)
    ours = float(out.recon_loss + out.sparsity_loss)
    if abs(ours - float(ref)) > 1e-4 * abs(float(ref)) + 1e-6:
        raise AssertionError(f"dense reference loss {float(ref):.6g} and dyntrack loss {ours:.6g} differ")
    assert torch.allclose(out.recon, dense(x)[0], rtol=1e-4, atol=1e-5)
    return abs(ours - float(ref))


def config(a, device) -> CrosscoderConfig:
    return CrosscoderConfig(d_model=a.d_model, n_checkpoints=a.checkpoints, d_latents=a.d_latents, kind="l1",
                            batch_size=a.batch, n_tokens=(a.warmup + a.steps) * a.batch, lr=a.lr)


def bench_training(a, device) -> dict:
    "Median tokens/s of each side over `a.rounds` alternating rounds, and the ratio of the medians."
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(a.batch, a.checkpoints, a.d_model, device=device, generator=gen) for _ in range(a.pool)]
    cfg = config(a, device)
    cc = Crosscoder(cfg, device=device)
    diff = check_same_loss(cc, DenseCrosscoder(cc), pool[0])
    timed = rounds(dict(dense=lambda: run_dense(DenseCrosscoder(Crosscoder(cfg, device=device)), pool, a.steps,
                                                a.warmup, device, cfg.lr),
                        ours=lambda: run_dyntrack(cfg, pool, a.steps, a.warmup, device)), a.rounds)
    dense, ours = timed["dense"], timed["ours"]
    ref, tps = statistics.median(dense), statistics.median(ours)
    return dict(reference_tokens_per_s=ref, dyntrack_tokens_per_s=tps, ratio=tps / ref, reference_rounds=dense,
                dyntrack_rounds=ours, max_loss_diff=diff,
                flop_per_token=2 * 3 * 2 * a.checkpoints * a.d_model * a.d_latents)  # 2 matmuls, fwd + 2 bwd


def profile_step(a, device, n_steps=3, rows=20) -> str:
    "torch.profiler's busiest operators over `n_steps` steps (after as many warm-up steps) of each side."
    from torch.profiler import ProfilerActivity, profile
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(a.batch, a.checkpoints, a.d_model, device=device, generator=gen)]
    cfg = dataclasses.replace(config(a, device), n_tokens=2 * n_steps * a.batch)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for name, run in (("dense reference", lambda: run_dense(DenseCrosscoder(Crosscoder(cfg, device=device)), pool,
                                                            n_steps, n_steps, device, cfg.lr)),
                      ("dyntrack train_sae", lambda: run_dyntrack(cfg, pool, n_steps, n_steps, device))):
        with profile(activities=activities) as prof: run()
        out.append(f"{name}: {2 * n_steps} steps\n" + prof.key_averages().table(sort_by=sort, row_limit=rows))
    return "\n".join(out)


def bench_ie(a, device) -> dict:
    "Median examples/s of `indirect_effects` on random models of size `a.ie_size` and a random crosscoder."
    with tempfile.TemporaryDirectory() as tmp:
        texts = [d for ds in generate_corpus(a.words, seed=0).values() for d in ds]
        tok = train_tokenizer(texts, a.vocab, Path(tmp) / "tok")
    cfg = model_config("gpt_neox", a.ie_size, vocab_size=len(tok), max_seq_len=128)
    models = [build_model(cfg, seed=s).to(device).eval() for s in range(a.checkpoints)]
    layer = cfg.num_hidden_layers // 2
    d = cfg.hidden_size
    cc = Crosscoder(CrosscoderConfig(d_model=d, n_checkpoints=a.checkpoints, d_latents=a.ie_latents or 8 * d),
                    device=device).eval()
    pairs = make_minimal_pairs(a.phenomenon, a.ie_pairs, seed=0)
    run = lambda: indirect_effects(models, cc, layer, pairs, tok, steps=a.ie_steps)
    run(); sync(device)
    rates = [len(pairs) / timed_loop(lambda i: run(), 1, 0, device) for _ in range(a.rounds)]
    return dict(size=a.ie_size, d_model=d, n_layers=cfg.num_hidden_layers, layer=layer, d_latents=cc.n_latents,
                pairs=len(pairs), ig_steps=a.ie_steps, phenomenon=a.phenomenon, examples_per_s=statistics.median(rates),
                rounds=rates)


def markdown(r: dict) -> str:
    t, ie = r["training"], r["ie"]
    return "\n".join([
        f"# Crosscoder benchmark", "",
        f"Device: {r['device']}; commit {r['commit']}; {r['dtype']}; {r['time']}.", "",
        f"## Training ({r['checkpoints']} checkpoints × d {r['d_model']} × {r['d_latents']} latents, batch {r['batch']}, "
        f"{r['steps']} timed steps after {r['warmup']}, median of {r['rounds']} rounds)", "",
        "| side | tokens/s | ratio |", "|---|---:|---:|",
        f"| dense reference (einsum, ReLU, dense decoder, decoder-norm L1, Adam) | {t['reference_tokens_per_s']:,.0f} | 1.00 |",
        f"| dyntrack (Crosscoder + train_sae) | {t['dyntrack_tokens_per_s']:,.0f} | {t['ratio']:.2f} |", "",
        f"## Indirect effects (GPT-NeoX {ie['size']}: d {ie['d_model']}, {ie['n_layers']} layers, site layer {ie['layer']}; "
        f"{ie['d_latents']} latents; {ie['ig_steps']} IG steps; {ie['pairs']} pairs of {ie['phenomenon']})", "",
        "| examples/s (pairs, all checkpoints) |", "|---:|", f"| {ie['examples_per_s']:,.2f} |", ""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-latents", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through")
    ap.add_argument("--ie-size", default="base", help="model preset of the IE benchmark's checkpoints")
    ap.add_argument("--ie-latents", type=int, default=0, help="crosscoder latents in the IE benchmark; 0 = 8 × d_model")
    ap.add_argument("--ie-pairs", type=int, default=16)
    ap.add_argument("--ie-steps", type=int, default=10)
    ap.add_argument("--phenomenon", default="pp_attractor_agreement", choices=PHENOMENA)
    ap.add_argument("--vocab", type=int, default=2000, help="tokenizer size of the IE benchmark's models")
    ap.add_argument("--words", type=int, default=3000, help="words per domain the IE benchmark's tokenizer learns from")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU check of the script in seconds")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    ap.add_argument("--profile-step", action="store_true", help="print a profiler table of a few steps of each side")
    ap.add_argument("--out", default="", help="folder for crosscoder.json and crosscoder.md")
    a = ap.parse_args(argv)
    if a.tiny:
        for k, v in TINY.items(): setattr(a, k, v)
    if min(a.warmup, a.steps, a.pool, a.rounds, a.ie_pairs, a.ie_steps) < 1 or a.checkpoints < 2:
        ap.error("--warmup, --steps, --pool, --rounds, --ie-pairs and --ie-steps must be at least 1, --checkpoints at least 2")
    os.environ.setdefault("DYNTRACK_PROGRESS", "0")  # no progress bars in the output
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32 (the autocast matmuls are bf16 anyway)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    training = bench_training(a, device)
    ie = bench_ie(a, device)
    r = dict(device=device_name(device), commit=source_commit(), software=software_versions(), time=started,
             dtype="bf16 autocast" if device.type == "cuda" else "float32", checkpoints=a.checkpoints,
             d_model=a.d_model, d_latents=a.d_latents, batch=a.batch, steps=a.steps, warmup=a.warmup, rounds=a.rounds,
             training=training, ie=ie)
    r["wall_s"] = time.perf_counter() - t0
    print(markdown(r))
    if a.out:
        out = Path(a.out)
        write_json(out / "crosscoder.json", r)
        (out / "crosscoder.md").write_text(markdown(r))
    if a.profile_step: print(profile_step(a, device))
    return r


if __name__ == "__main__":
    main()
