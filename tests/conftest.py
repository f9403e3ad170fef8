"Helpers shared by several test files."
import hashlib, os
from pathlib import Path

import pytest
import torch


# `.ci/run` reproduces every experiment notebook in smoke (`make figures PROFILE=smoke OUT=...`) before `make test`
# and names that output folder here, so a test that checks a notebook's own smoke run reads it instead of running the
# notebook a second time.
SMOKE_RUN = "DYNTRACK_SMOKE_RUN"


def reproduced_smoke_outputs(nb: Path) -> Path | None:
    "`$DYNTRACK_SMOKE_RUN/<nb stem>` if the smoke reproduction there ran notebook `nb` as it is now, without overrides; else None."
    from dyntrack.reproduce.run import is_complete, source_digest
    root = os.environ.get(SMOKE_RUN)
    if not root: return None
    folder = Path(root) / nb.stem
    return folder if is_complete(folder, "smoke", {}, source_digest(nb)) else None


@pytest.fixture
def one_torch_thread():
    "Tiny models run fastest on one thread; more threads only contend with other processes on a 2-core machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fake_hub_cache(cache_dir: Path, repo_id: str, checkpoints: dict, tokenizer, revision_format: str = "step{step}") -> None:
    "Lay out `checkpoints` {step: model} like the Hugging Face hub cache: blobs, refs/<revision of step>, snapshots/<commit>."
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for step, model in checkpoints.items():
        staging = cache_dir / f"staging{step}"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        revision = revision_format.format(step=step)
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in staging.iterdir():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.write_bytes(f.read_bytes())
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs" / revision).write_text(commit)


def toy_hub(root: Path, repo_id: str, steps, revision_format: str = "step{step}") -> Path:
    "A Hub cache under `root` with a revision (`revision_format` of its step) per step N of a tiny GPT-NeoX (seed N) and a BPE tokenizer."
    from dyntrack.data.corpus import generate_corpus
    from dyntrack.models.presets import build_model, model_config
    from dyntrack.data.tokens import train_tokenizer
    docs = [d for ds in generate_corpus(3000, seed=5).values() for d in ds]
    tok = train_tokenizer(docs, 400, root / "tok")
    config = model_config("gpt_neox", "tiny", vocab_size=len(tok), max_seq_len=64)
    fake_hub_cache(root / "cache", repo_id, {s: build_model(config, s) for s in steps}, tok, revision_format)
    return root / "cache"
