"""TopK SAE training: dyntrack's `train_sae` against EleutherAI sparsify's `SparseCoder` step, same activations, same run.

Both sides train a TopK SAE of `--d-sae` latents, k `--k`, on activations of width `--d-model` (random vectors already
in memory, [batch, d_model], the same pool for every side: the data source does not change step throughput), starting
from the same weights, float32 master weights and optimizer state, the forward under bf16 autocast on CUDA.
  1. dyntrack: `dyntrack.sae.train.train_sae` exactly as the library trains (the embedding-bag decoder, normalised
     MSE, AuxK, unit-norm decoder with the parallel gradient removed, fused Adam on CUDA, the tokens-since-fired
     counter, a log record per step copied to the host without waiting), no callbacks.
  2. sparsify, fused Adam: `sparsify.SparseCoder` (eai-sparsify 1.3.3; on CUDA its Triton decoder and its own bf16
     autocast) in the step its trainer takes, written out below: forward with the dead mask, FVU + α · AuxK,
     backward, parallel gradient removed, `torch.optim.Adam(fused=True)`, decoder renormalised, tokens-since-fired
     update. Its trainer also reads the FVU to the host every step; this step does not, which only helps the peer.
  3. sparsify, torch Adam: the same with `torch.optim.Adam` at its defaults (what its trainer builds); the only
     sparsify side on the CPU.
Each side runs in two settings:
  AuxK idle        no latent can be dead within the run (dyntrack's default `dead_tokens`; sparsify without a mask);
  AuxK every step  a latent that did not fire in the previous batch counts as dead (dyntrack `dead_tokens` = one
                   batch; sparsify's mask `tokens since fired ≥ batch`), so the AuxK search and reconstruction run on
                   every step that has a dead latent. Both use aux_k = d_model / 2 and α = `--aux-coef`.
Tokens/s covers steps `--warmup + 1 … --warmup + --steps`, device synchronised at both ends (`_timing`); each round
runs every side once, in turn, and the table gives the median of `--rounds` rounds. ratio = dyntrack / side.
Before timing, both models' float32 reconstructions of one batch from the same weights are checked to agree.

sparsify is a benchmark-only dependency (`pip install -e ".[bench]"`; the GPU host gets it from `make wheelhouse`).
Without it, or without CUDA (its Triton decoder), the peer is skipped with a message, or the script stops with one
under `--require-peer`; `--peer-on-cpu` runs it on the CPU with its eager decoder (a check of the script, no numbers).

    python benchmarks/bench_sparsify.py --require-peer --out results/paper/benchmarks/sparsify
    python benchmarks/bench_sparsify.py --tiny --out /tmp/bench_sparsify        # CPU, seconds
Writes `sparsify.json` (every number, device, commit, time, software) and `sparsify.md` (the table) into `--out`.
"""
import argparse, dataclasses, importlib.util, os, sys, time
from pathlib import Path

import torch

from dyntrack.core import device_name, software_versions, write_json
from dyntrack.reproduce.report import source_commit
from dyntrack.sae.model import SaeConfig, SparseAutoencoder
from dyntrack.sae.train import train_sae
from _timing import Clock, check_counts, clocked, median_round, rounds, timed_loop

TINY = dict(d_model=32, d_sae=512, k=4, batch=64, steps=3, warmup=2, rounds=1, pool=2)  # --tiny: a CPU check
SETTINGS = ("AuxK idle", "AuxK every step")
DEC_NOTE = dict(triton_decode="", eager_decode=" Its eager decoder: a check of the script, not its speed.")
TOKENS_PER_S = lambda result: result["tokens_per_s"]


def peer_unavailable(device, peer_on_cpu: bool) -> str | None:
    "Why the sparsify side cannot run here (no package, no CUDA for its Triton decoder), or None."
    if importlib.util.find_spec("sparsify") is None:
        return 'sparsify is not installed (pip install -e ".[bench]", or the wheelhouse on the GPU host)'
    if device.type != "cuda" and not peer_on_cpu:
        return "no CUDA device: sparsify's Triton decoder needs one (--peer-on-cpu runs its eager decoder instead)"
    return None


def sparsify_module():
    "The imported `sparsify` package and the name of the decoder it chose ('triton_decode' or 'eager_decode')."
    import sparsify, sparsify.utils
    return sparsify, sparsify.utils.decoder_impl.__name__


def sparse_coder(sae: SparseAutoencoder, k: int):
    "A sparsify `SparseCoder` holding `sae`'s weights (its encoder is an nn.Linear: W_enc transposed)."
    sparsify, _ = sparsify_module()
    coder = sparsify.SparseCoder(sae.cfg.d_model, sparsify.SparseCoderConfig(num_latents=sae.cfg.d_sae, k=k),
                                 device=sae.device, dtype=torch.float32)
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.W_enc.T); coder.encoder.bias.copy_(sae.b_enc)
        coder.W_dec.copy_(sae.W_dec); coder.b_dec.copy_(sae.b_dec)
    return coder


@torch.no_grad()
def check_same_function(sae: SparseAutoencoder, coder, x) -> float:
    "Max |x̂_dyntrack − x̂_sparsify| on `x` [batch, d_model] in float32 from the same weights; raise if they disagree."
    ours = sae.reconstruct(sae.encode(x))
    top = coder.encode(x)
    theirs = coder.decode(top.top_acts, top.top_indices)
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-3 * ours.abs().max().item():
        raise AssertionError(f"dyntrack and sparsify reconstructions of the same weights differ by up to {diff:.3g}")
    return diff


def run_dyntrack(cfg: SaeConfig, pool, steps, warmup, device) -> dict:
    "Tokens/s of `train_sae` as the library trains; mean dead fraction and share of steps with AuxK, timed steps."
    clock = Clock(device)
    batches = clocked((pool[i % len(pool)] for i in range(warmup + steps)), warmup, clock)
    sae = SparseAutoencoder(cfg, device=device)
    history = train_sae(sae, batches, dataclasses.replace(cfg, n_tokens=(warmup + steps) * cfg.batch_size)).history
    seconds, timed = clock.stop(), history[warmup:]
    return dict(tokens_per_s=steps * cfg.batch_size / seconds,
                dead_fraction=sum(r["dead_fraction"] for r in timed) / len(timed),
                auxk_steps=sum(r["aux_loss"] > 0 for r in timed) / len(timed))


def run_sparsify(cfg: SaeConfig, pool, steps, warmup, device, fused: bool, auxk: bool) -> dict:
    "Tokens/s of sparsify's step on `pool`; `auxk`: a latent silent in the previous batch is dead; as `run_dyntrack`."
    coder = sparse_coder(SparseAutoencoder(cfg, device=device), cfg.k)
    with torch.no_grad(): coder.b_dec.copy_(pool[0].mean(0))  # sparsify's trainer: b_dec from the first batch
    opt = torch.optim.Adam(coder.parameters(), lr=cfg.lr, fused=True if fused else None)
    since = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)  # tokens since each latent fired
    seen = []  # (dead mask, AuxK loss) of each timed step, read after the clock stops: no extra work in the steps

    def step(i):
        nonlocal since
        x = pool[i % len(pool)]  # [batch, d_model]
        dead = since >= cfg.batch_size if auxk and i > 0 else None  # [d_sae]; none before a batch has been seen
        out = coder(x, dead_mask=dead)  # bf16 autocast inside on CUDA
        (out.fvu + cfg.aux_coef * out.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step(); opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)
            fired[out.latent_indices.flatten()] = True
            since = torch.where(fired, 0, since + cfg.batch_size)
        if i >= warmup: seen.append((dead, out.auxk_loss.detach()))

    seconds = timed_loop(step, steps, warmup, device)
    dead_fraction = [0.0 if dead is None else dead.float().mean().item() for dead, _ in seen]
    return dict(tokens_per_s=steps * cfg.batch_size / seconds, dead_fraction=sum(dead_fraction) / steps,
                auxk_steps=sum(float(aux > 0) for _, aux in seen) / steps)


def sides(cfg: SaeConfig, pool, a, device, setting: str, with_peer: bool) -> dict:
    "{side name: () -> result dict} for one setting."
    auxk = setting == "AuxK every step"
    ours = dataclasses.replace(cfg, dead_tokens=cfg.batch_size) if auxk else cfg
    out = {"dyntrack train_sae": lambda: run_dyntrack(ours, pool, a.steps, a.warmup, device)}
    for name, fused in (("sparsify, fused Adam", True), ("sparsify, torch Adam", False)):
        if with_peer and (device.type == "cuda" or not fused):  # fused Adam: CUDA only here
            out[name] = lambda fused=fused: run_sparsify(cfg, pool, a.steps, a.warmup, device, fused, auxk)
    return out


def bench(a, device, with_peer: bool) -> tuple[list[dict], float | None]:
    "Rows {setting, side, tokens_per_s, rounds, ratio, dead_fraction, auxk_steps} and the reconstruction check."
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(a.batch, a.d_model, device=device, generator=gen) for _ in range(a.pool)]  # [batch, d_model]
    cfg = SaeConfig(d_model=a.d_model, d_sae=a.d_sae, kind="topk", k=a.k, batch_size=a.batch, aux_coef=a.aux_coef,
                    n_tokens=(a.warmup + a.steps) * a.batch)
    diff = None
    if with_peer:
        sae = SparseAutoencoder(cfg, device=device)
        diff = check_same_function(sae, sparse_coder(sae, a.k), pool[0])
    rows = []
    for setting in SETTINGS:
        results = rounds(sides(cfg, pool, a, device, setting, with_peer), a.rounds)
        ours = median_round(results["dyntrack train_sae"], TOKENS_PER_S)["tokens_per_s"]
        for name, side in results.items():
            mid = median_round(side, TOKENS_PER_S)
            rows.append(dict(setting=setting, side=name, tokens_per_s=mid["tokens_per_s"],
                             rounds=[r["tokens_per_s"] for r in side], ratio=ours / mid["tokens_per_s"],
                             dead_fraction=mid["dead_fraction"], auxk_steps=mid["auxk_steps"]))
    return rows, diff


def markdown(r: dict) -> str:
    "The report: setup line, the table, and why the peer is missing if it is."
    lines = [f"# TopK SAE training: dyntrack against sparsify", "",
             f"Device: {r['device']}; commit {r['commit']}; {r['dtype']}; {r['time']}; "
             + (f"sparsify skipped: {r['peer_skipped']}." if r["peer_skipped"] else
                f"sparsify {r['sparsify']} ({r['sparsify_decoder']}).{DEC_NOTE[r['sparsify_decoder']]}"), "",
             f"d_model {r['d_model']}, {r['d_sae']} latents, k {r['k']}, batch {r['batch']}, α_aux {r['aux_coef']:g}; "
             f"{r['steps']} timed steps after {r['warmup']}, median of {r['rounds']} rounds.", ""]
    lines += ["| setting | side | tokens/s | dyntrack ÷ side | dead fraction | AuxK steps |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {x['setting']} | {x['side']} | {x['tokens_per_s']:,.0f} | {x['ratio']:.2f} | {x['dead_fraction']:.3f} "
              f"| {x['auxk_steps']:.2f} |" for x in r["rows"]]
    return "\n".join(lines + [""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=SaeConfig.batch_size, help="activation vectors per step")
    ap.add_argument("--aux-coef", type=float, default=SaeConfig.aux_coef, help="weight α of the AuxK loss, both sides")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU check of the script in seconds")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    ap.add_argument("--require-peer", action="store_true", help="stop, instead of skipping it, if sparsify cannot run")
    ap.add_argument("--peer-on-cpu", action="store_true", help="run sparsify on the CPU too (eager decoder; a check)")
    ap.add_argument("--out", default="", help="folder for sparsify.json and sparsify.md")
    a = ap.parse_args(argv)
    if a.tiny:
        for k, v in TINY.items(): setattr(a, k, v)
    try: check_counts(a.steps, a.warmup, a.rounds)
    except ValueError as e: ap.error(f"--{e}")
    if a.pool < 1: ap.error(f"--pool={a.pool} must be at least 1")
    if not 1 <= a.k <= a.d_sae: ap.error(f"--k={a.k} must lie in 1 … --d-sae={a.d_sae}")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    skipped = peer_unavailable(device, a.peer_on_cpu)
    if skipped and a.require_peer: sys.exit(f"bench_sparsify: --require-peer, but {skipped}")
    if skipped: print(f"bench_sparsify: skipping the sparsify side: {skipped}", file=sys.stderr)
    version, decoder = (None, None) if skipped else (lambda m, d: (m.__version__, d))(*sparsify_module())
    if a.require_peer and device.type == "cuda" and decoder != "triton_decode":
        sys.exit(f"bench_sparsify: --require-peer, but sparsify chose {decoder}, not its Triton decoder "
                 "(is triton installed, SPARSIFY_DISABLE_TRITON unset?)")
    os.environ.setdefault("DYNTRACK_PROGRESS", "0")  # no train_sae progress bars in the output
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32 (the autocast matmuls are bf16 anyway)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    rows, diff = bench(a, device, with_peer=not skipped)
    r = dict(device=device_name(device), commit=source_commit(), time=started, software=software_versions(),
             sparsify=version, sparsify_decoder=decoder, peer_skipped=skipped,
             dtype="bf16 autocast" if device.type == "cuda" else "float32", d_model=a.d_model, d_sae=a.d_sae, k=a.k,
             batch=a.batch, aux_coef=a.aux_coef, steps=a.steps, warmup=a.warmup, rounds=a.rounds,
             max_recon_diff=diff, rows=rows, wall_s=time.perf_counter() - t0)
    print(markdown(r))
    if a.out:
        out = Path(a.out)
        write_json(out / "sparsify.json", r)
        (out / "sparsify.md").write_text(markdown(r))
    return r


if __name__ == "__main__":
    main()
