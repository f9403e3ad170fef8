"Model presets, checkpoint schedules, atomic checkpoint saving and checkpoint suites (local and offline Hub)."
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from dyntrack.core import ParamError
from conftest import fake_hub_cache
from dyntrack.models import (CheckpointSuite, build_model, checkpoint_schedule, model_config, pythia_steps,
                             read_manifest, save_checkpoint)

WORDS = ["<unk>", "<bos>", "the", "cat", "dog", "sat", "on", "a", "mat", "."]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")


@pytest.fixture(scope="module")
def config():
    return model_config("gpt_neox", "tiny", vocab_size=len(WORDS), max_seq_len=32)


def first_weight(model):
    return next(iter(model.state_dict().values()))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- presets -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("size,d,n", [("tiny", 64, 2), ("small", 256, 4), ("base", 512, 8), ("medium", 768, 12)])
def test_presets(arch, size, d, n):
    cfg = model_config(arch, size, vocab_size=1000, max_seq_len=128)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.model_type) == (d, n, arch)
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.max_position_embeddings == 128
    assert not cfg.tie_word_embeddings and cfg._attn_implementation == "sdpa"


def test_pythia_style_choices(config):
    assert config.use_parallel_residual and config.intermediate_size == 4 * 64
    rotary = getattr(config, "rotary_pct", None) or config.rope_parameters["partial_rotary_factor"]  # 4.x / 5.x
    assert rotary == 0.25


def test_preset_errors():
    with pytest.raises(ParamError, match=r"arch='gpt2'.*gpt_neox.*llama"):
        model_config("gpt2", "tiny", 10, 8)
    with pytest.raises(ParamError, match=r"size='huge'.*tiny.*small.*base.*medium"):
        model_config("llama", "huge", 10, 8)
    with pytest.raises(ParamError, match="hiden_size"):
        model_config("llama", "tiny", 10, 8, hiden_size=32)
    with pytest.raises(ParamError, match="vocab_size"):
        model_config("llama", "tiny", 0, 8)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_build_model_deterministic(arch):
    cfg = model_config(arch, "tiny", vocab_size=50, max_seq_len=16, num_hidden_layers=1)
    state = torch.random.get_rng_state()
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert same_weights(a, b) and not same_weights(a, c)
    assert a(torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 5, 50)


# --- schedules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,log_until,n_linear", [(1, None, 1), (60, None, 10), (1000, 64, 5), (999, 2000, 7),
                                                      (5000, 0, 3), (143_000, None, 143)])
def test_schedule_invariants(total, log_until, n_linear):
    steps = checkpoint_schedule(total, log_until, n_linear)
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == total
    powers = [2**j for j in range(20) if 2**j <= min(total, total // n_linear if log_until is None else log_until)]
    assert set(powers) <= set(steps)
    assert len(steps) <= 1 + len(powers) + n_linear


def test_schedule_known_answers():
    assert checkpoint_schedule(100) == [0, 1, 2, 4, 8, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert checkpoint_schedule(143_000, n_linear=143) == pythia_steps()
    assert pythia_steps()[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and len(pythia_steps()) == 154
    with pytest.raises(ParamError, match="n_linear"):
        checkpoint_schedule(10, n_linear=0)
    with pytest.raises(ParamError, match="total_steps"):
        checkpoint_schedule(0)


# --- saving and run suites ---------------------------------------------------------------------------------

def test_saved_checkpoint_loads_with_plain_transformers(tmp_path, config, tokenizer):
    model = build_model(config, seed=0)
    step_dir = save_checkpoint(model, tokenizer, tmp_path / "run", step=4, tokens_seen=4096)
    assert step_dir == tmp_path / "run" / "step4" and (step_dir / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(step_dir)
    ids = AutoTokenizer.from_pretrained(step_dir)("the cat sat on a mat", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 5, 6, 7, 8]]
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, model.eval()(ids).logits)


def test_manifest_round_trip(tmp_path, config, tokenizer):
    run = tmp_path / "run"
    models = {step: build_model(config, seed=step) for step in (8, 0, 2)}
    for step, model in models.items():  # saved out of order: the manifest is kept sorted
        save_checkpoint(model, tokenizer, run, step, tokens_seen=step * 100, meta={f"m{step}": step})
    manifest = read_manifest(run)
    assert manifest["format"] == "dyntrack-suite-v1"
    assert manifest["checkpoints"] == [dict(step=s, tokens_seen=s * 100, path=f"step{s}") for s in (0, 2, 8)]
    assert manifest["meta"] == {"m8": 8, "m0": 0, "m2": 2}
    suite = CheckpointSuite.from_run(run)
    assert (suite.steps, suite.tokens, len(suite), [c.step for c in suite]) == ([0, 2, 8], [0, 200, 800], 3, [0, 2, 8])
    assert (suite.n_layers, suite.d_model) == (2, 64)
    assert same_weights(suite.load_model(1), models[2]) and same_weights(suite.load_model(step=8), models[8])
    assert same_weights(suite.load_model(suite[0]), models[0]) and not suite.load_model(-1).training
    assert suite.load_model(0, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert suite.load_tokenizer().convert_ids_to_tokens([3]) == ["cat"]
    sub = suite.select([8, 0])
    assert sub.steps == [0, 8] and sub[-1].source == str(run / "step8")
    folders = CheckpointSuite.from_folders([run / "step2", run / "step0"], tokens=[20, 0])
    assert folders.steps == [0, 2] and folders.tokens == [0, 20]


def test_resave_needs_overwrite(tmp_path, config, tokenizer):
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 5, 50)
    with pytest.raises(FileExistsError, match="step5"):
        save_checkpoint(build_model(config, seed=1), tokenizer, run, 5, 50)
    save_checkpoint(build_model(config, seed=1), tokenizer, run, 5, 55, overwrite=True)
    assert read_manifest(run)["checkpoints"] == [dict(step=5, tokens_seen=55, path="step5")]
    assert same_weights(CheckpointSuite.from_run(run).load_model(0), build_model(config, seed=1))
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "step5"]


class BrokenTokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{")
        raise OSError("disk full")


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, config, tokenizer):
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    before = (run / "manifest.json").read_text()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model(config, seed=1), BrokenTokenizer(), run, 1, 10)
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "step0"]  # no step1, no temporary
    assert (run / "manifest.json").read_text() == before


def test_unlisted_step_folder_is_replaced(tmp_path, config, tokenizer):
    "A save interrupted after the folder rename but before the manifest write leaves an unlisted folder."
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    manifest = (run / "manifest.json").read_text()
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 2, 20)
    (run / "manifest.json").write_text(manifest)  # as if the manifest write never happened
    save_checkpoint(build_model(config, seed=2), tokenizer, run, 2, 20)  # the resumed run saves step 2 again
    assert CheckpointSuite.from_run(run).steps == [0, 2]
    assert same_weights(CheckpointSuite.from_run(run).load_model(step=2), build_model(config, seed=2))


def test_compiled_model_is_unwrapped(tmp_path, config, tokenizer):
    model = build_model(config, seed=0)
    step_dir = save_checkpoint(torch.compile(model), tokenizer, tmp_path / "run", 0, 0)
    assert same_weights(AutoModelForCausalLM.from_pretrained(step_dir), model)


def test_missing_and_corrupt(tmp_path, config, tokenizer):
    with pytest.raises(FileNotFoundError, match="manifest.json.*from_folders"):
        CheckpointSuite.from_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CheckpointSuite.from_run(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "checkpoints": []}))
    with pytest.raises(ValueError, match="dyntrack-suite-v1"):
        CheckpointSuite.from_run(tmp_path)
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 3, 30)
    suite = CheckpointSuite.from_run(run)
    with pytest.raises(ParamError, match=r"step=7 is not in this suite; available steps: \[0, 3\]"):
        suite.select([0, 7])
    with pytest.raises(ParamError, match="available steps"):
        suite.load_model(step=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        CheckpointSuite.from_folders([run / "step0", tmp_path / "nowhere"])
    for f in (run / "step3").iterdir():
        f.unlink()
    (run / "step3").rmdir()
    with pytest.raises(FileNotFoundError, match="missing.*step3"):
        CheckpointSuite.from_run(run)


# --- Hub suites, offline -----------------------------------------------------------------------------------

def test_hub_suite_offline(tmp_path, monkeypatch, config, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    models = {0: build_model(config, seed=0), 16: build_model(config, seed=16)}
    fake_hub_cache(tmp_path / "hub", "toy-org/toy-pythia", models, tokenizer)
    suite = CheckpointSuite.from_hub("toy-org/toy-pythia", [16, 0], tokens_per_step=2048,
                                     cache_dir=tmp_path / "hub", local_files_only=True)
    assert suite.steps == [0, 16] and suite.tokens == [0, 32768] and [c.revision for c in suite] == ["step0", "step16"]
    assert (suite.n_layers, suite.d_model) == (2, 64)
    first, last = suite.load_model(0), suite.load_model(step=16)
    assert same_weights(first, models[0]) and same_weights(last, models[16])
    assert not torch.equal(first_weight(first), first_weight(last))  # different revisions, different weights
    assert suite.load_tokenizer()("the dog").input_ids == [2, 4]
    with pytest.raises(OSError):  # a revision the cache does not hold fails, offline, without a network call
        CheckpointSuite.from_hub("toy-org/toy-pythia", [3], cache_dir=tmp_path / "hub", local_files_only=True).load_model(0)


def test_pythia_suite_addresses():
    suite = CheckpointSuite.pythia("160m", steps=[0, 1000, 143_000])
    assert [(c.source, c.revision, c.tokens_seen) for c in suite] == [
        ("EleutherAI/pythia-160m", "step0", 0), ("EleutherAI/pythia-160m", "step1000", 1000 * 2_097_152),
        ("EleutherAI/pythia-160m", "step143000", 143_000 * 2_097_152)]
    assert len(CheckpointSuite.pythia("70m", deduped=True)) == 154
    assert CheckpointSuite.pythia("70m", deduped=True)[0].source == "EleutherAI/pythia-70m-deduped"
    with pytest.raises(ParamError, match="size='7b'"):
        CheckpointSuite.pythia("7b")
    with pytest.raises(ParamError, match=r"\[3\] are not Pythia checkpoints"):
        CheckpointSuite.pythia("70m", steps=[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_model_on_cuda(tmp_path, config, tokenizer):
    save_checkpoint(build_model(config, seed=0), tokenizer, tmp_path / "run", 0, 0)
    model = CheckpointSuite.from_run(tmp_path / "run").load_model(0, device="cuda", dtype=torch.bfloat16)
    assert next(model.parameters()).device.type == "cuda" and model.dtype == torch.bfloat16 and not model.training
