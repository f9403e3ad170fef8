"Model presets, checkpoint schedules, atomic checkpoint saving, checkpoint suites (local and offline Hub), sibling sets and parameter averages."
import json, os, subprocess, sys, textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import dyntrack.models.suite
from dyntrack.core import Busy, CorruptFileError, ParamError, file_lock, write_json
from conftest import fake_hub_cache
from dyntrack.models.presets import build_model, checkpoint_schedule, model_config, pythia_steps
from dyntrack.models.suite import CheckpointSuite, read_manifest, save_checkpoint

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


@pytest.mark.parametrize("total,n_linear,per_octave", [(60, 4, 1), (1000, 10, 2), (3000, 12, 3), (3000, 16, 3), (3000, 12, 4),
                                                        (143_000, 143, 1), (50, 50, 8), (7, 2, 5)])
def test_log_spaced_schedules(total, n_linear, per_octave):
    "per_octave steps per doubling until they are as far apart as the linear ones, then the linear ones: no dip, no crowding."
    steps = checkpoint_schedule(total, n_linear=n_linear, per_octave=per_octave)
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == total
    log_until = int(total / (n_linear * (2 ** (1 / per_octave) - 1)))
    logs = sorted({round(2 ** (j / per_octave)) for j in range(200)} & set(range(1, min(log_until, total + 1))))
    assert [s for s in steps if 0 < s < log_until] == logs  # before log_until: the log-spaced steps alone
    spacing = total / n_linear
    assert all(abs(s - round(s / spacing) * spacing) < 1 for s in steps if s > log_until)  # after it: the linear grid
    assert max(b - a for a, b in zip(steps, steps[1:])) < 2 * spacing
    octave = [s for s in steps if 2 * per_octave <= s <= min(log_until, total) / 2]  # ratios settle after the first few
    assert all(b / a <= 2 ** (1 / per_octave) * 1.2 for a, b in zip(octave, octave[1:]))


def test_schedule_known_answers():
    assert checkpoint_schedule(100) == [0, 1, 2, 4, 8, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert checkpoint_schedule(143_000, n_linear=143) == pythia_steps()
    assert pythia_steps()[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and len(pythia_steps()) == 154
    with pytest.raises(ParamError, match="n_linear"):
        checkpoint_schedule(10, n_linear=0)
    with pytest.raises(ParamError, match="total_steps"):
        checkpoint_schedule(0)
    assert checkpoint_schedule(64, log_until=64, n_linear=1, per_octave=2) == [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64]
    assert checkpoint_schedule(60, n_linear=4) == [0, 1, 2, 4, 8, 15, 30, 45, 60]  # per_octave=1: the old schedule
    paper = checkpoint_schedule(3000, n_linear=16, per_octave=3)  # log-spaced to 3000 / (16 (2^(1/3) - 1)) = 721
    assert paper[:14] == [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32] and 645 in paper and 750 in paper
    assert len(paper) == 40 and paper[-13:] == [round(k * 187.5) for k in range(4, 17)]
    with pytest.raises(ParamError, match="per_octave=0"):
        checkpoint_schedule(10, per_octave=0)
    with pytest.raises(ParamError, match="per_octave=1.5 must be an int"):
        checkpoint_schedule(10, per_octave=1.5)


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
    assert [{k: c[k] for k in ("step", "tokens_seen", "path")} for c in manifest["checkpoints"]] == [
        dict(step=s, tokens_seen=s * 100, path=f"step{s}") for s in (0, 2, 8)]
    assert all(sorted(c["files"]) == sorted(p.name for p in (run / c["path"]).iterdir()) for c in manifest["checkpoints"])
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
    assert [(c["step"], c["tokens_seen"], c["path"]) for c in read_manifest(run)["checkpoints"]] == [(5, 55, "step5")]
    assert same_weights(CheckpointSuite.from_run(run).load_model(0), build_model(config, seed=1))
    assert sorted(p.name for p in run.iterdir()) == [".manifest.lock", "manifest.json", "step5"]


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
    assert sorted(p.name for p in run.iterdir()) == [".manifest.lock", "manifest.json", "step0"]  # no step1, no temporary
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


# --- bad input: configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("kw, words", [
    (dict(vocab_size="64"), "vocab_size='64' must be an int"), (dict(vocab_size=64.0), "vocab_size=64.0 must be an int"),
    (dict(max_seq_len=-1), r"max_seq_len=-1 is out of range"), (dict(num_hidden_layers="3"), "num_hidden_layers='3'"),
    (dict(num_hidden_layers=-2), r"num_hidden_layers=-2 is out of range"), (dict(num_hidden_layers=0), "num_hidden_layers=0"),
    (dict(intermediate_size=-5), "intermediate_size=-5"), (dict(num_attention_heads=0), "num_attention_heads=0"),
    (dict(initializer_range=float("inf")), "initializer_range=inf is not a finite number"),
    (dict(attention_dropout=float("nan")), "attention_dropout=nan"), (dict(tie_word_embeddings=1), "tie_word_embeddings=1"),
    (dict(hidden_size=48, num_attention_heads=5), "hidden_size=48 must be divisible by num_attention_heads=5"),
])
def test_config_values_refused_with_the_field(arch, kw, words):
    "Wrong types, sizes < 1 and non-finite floats used to pass, or fail inside transformers without a ParamError."
    args = {**dict(vocab_size=10, max_seq_len=8), **kw}
    with pytest.raises(ParamError, match=words):
        model_config(arch, "tiny", **args)


# --- faults: remote code, damaged files, foreign manifests, killed writers, locks -------------------------

CUSTOM_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
class XConfig(PretrainedConfig): model_type = "dyntrack_test_custom"
class XModel(PreTrainedModel): config_class = XConfig
class XTokenizer(PreTrainedTokenizerFast): pass
'''

LOAD_CUSTOM = '''
import sys, transformers
from dyntrack.models.presets import build_model
from dyntrack.models.suite import CheckpointSuite
suite = CheckpointSuite.from_folders([sys.argv[1]])
config = transformers.PretrainedConfig(auto_map={{"AutoModelForCausalLM": "modeling_x.XModel"}}, name_or_path=sys.argv[1])
for name, load in [("config", lambda: suite.config), ("model", lambda: suite.load_model(0)),
                   ("tokenizer", lambda: suite.load_tokenizer(0)), ("build", lambda: build_model(config))]:
    try: load(); print(name, "loaded")
    except Exception as e: print(name, "refused", type(e).__name__, "custom code" in str(e))
'''


@pytest.mark.parametrize("answer", ["y\n" * 20, None], ids=["y-on-stdin", "stdin-closed"])
def test_checkpoint_code_never_runs(tmp_path, answer):
    "A folder asking for its own code (auto_map) is refused without a prompt, even with 'y' waiting on stdin."
    folder, marker = tmp_path / "step0", tmp_path / "MARKER"
    folder.mkdir()
    (folder / "modeling_x.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    auto_map = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(dict(model_type="dyntrack_test_custom", auto_map=auto_map)))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(auto_map={"AutoTokenizer": ["modeling_x.XTokenizer", None]})))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    stdin = dict(input=answer) if answer else dict(stdin=subprocess.DEVNULL)
    out = subprocess.run([sys.executable, "-c", LOAD_CUSTOM.format(), str(folder)], **stdin, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not marker.exists(), out.stdout
    assert "Do you wish to run the custom code" not in out.stdout + out.stderr
    assert [line.split() for line in out.stdout.splitlines()] == [
        [name, "refused", "ValueError", "True"] for name in ("config", "model", "tokenizer", "build")]


def flip_byte(path, offset=-3):
    "Flip one bit of the byte at `offset` (in the tensor data, so the header still parses); the size stays."
    with open(path, "r+b") as f:
        f.seek(offset, 2)
        byte = f.read(1)[0]
        f.seek(offset, 2)
        f.write(bytes([byte ^ 1]))
    mtime = os.stat(path).st_mtime_ns + 10**9  # a later mtime even where the clock ticks coarsely
    os.utime(path, ns=(mtime, mtime))


def test_damaged_run_checkpoint_is_named(tmp_path, config, tokenizer, monkeypatch):
    run = tmp_path / "run"
    for step in (0, 1, 2):
        save_checkpoint(build_model(config, seed=step), tokenizer, run, step, step * 10)
    suite = CheckpointSuite.from_run(run)
    flip_byte(run / "step0" / "model.safetensors")
    os.truncate(run / "step1" / "model.safetensors", 1000)
    (run / "step2" / "tokenizer.json").unlink()
    with pytest.raises(CorruptFileError, match=r"step0/model.safetensors does not match its SHA-256"):
        suite.load_model(step=0)
    with pytest.raises(CorruptFileError, match=r"step1/model.safetensors has 1000 bytes where the manifest says"):
        suite.load_model(step=1)
    with pytest.raises(CorruptFileError, match=r"step2/tokenizer.json is missing"):
        suite.load_tokenizer(suite.at(2))


def test_checksums_are_checked_once_per_file_version(tmp_path, config, tokenizer, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    hashed = []
    real = dyntrack.models.suite.file_sha256
    monkeypatch.setattr(dyntrack.models.suite, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    suite = CheckpointSuite.from_run(run)
    suite.load_model(0)
    assert sorted(hashed) == sorted(read_manifest(run)["checkpoints"][0]["files"])
    hashed.clear()
    suite.load_tokenizer(0), CheckpointSuite.from_run(run).load_model(0)
    assert hashed == []  # verified files are only stat'ed again
    flip_byte(run / "step0" / "model.safetensors")  # changed in place: a new mtime, so hashed again
    with pytest.raises(CorruptFileError, match="model.safetensors does not match"):
        suite.load_model(0)


def test_old_manifest_without_checksums_still_opens(tmp_path, config, tokenizer):
    run = tmp_path / "run"
    model = build_model(config, seed=0)
    save_checkpoint(model, tokenizer, run, 0, 0)
    manifest = read_manifest(run)
    for c in manifest["checkpoints"]: del c["files"]
    write_json(run / "manifest.json", manifest)
    flip_byte(run / "step0" / "model.safetensors", offset=-1000)  # not detectable without a checksum: loads
    assert CheckpointSuite.from_run(run)[0].files is None and CheckpointSuite.from_run(run).load_model(0) is not None


def test_damaged_plain_folder_names_the_file(tmp_path, config, tokenizer):
    "Without a manifest there is no checksum, but a truncated weights file or a missing tokenizer.json is named."
    step_dir = save_checkpoint(build_model(config, seed=0), tokenizer, tmp_path / "run", 0, 0)
    os.truncate(step_dir / "model.safetensors", (step_dir / "model.safetensors").stat().st_size - 10)
    (step_dir / "tokenizer.json").unlink()
    suite = CheckpointSuite.from_folders([step_dir])
    with pytest.raises(CorruptFileError, match=r"weights of checkpoint .*run/step0 are damaged.*step0/model.safetensors"):
        suite.load_model(0)
    with pytest.raises(CorruptFileError, match=r"step0/tokenizer.json is missing: cannot load the tokenizer of checkpoint"):
        suite.load_tokenizer(0)
    (step_dir / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(CorruptFileError, match=r"step0/tokenizer.json is not valid JSON"):
        suite.load_tokenizer(0)


@pytest.mark.parametrize("entry, words", [
    (dict(path="../elsewhere"), r"manifest.json: entry checkpoints\[1\] is invalid: path='../elsewhere'"),
    (dict(path="/tmp/outside"), r"manifest.json: entry checkpoints\[1\] is invalid: path='/tmp/outside'"),
    (dict(step=0, path="step0"), r"manifest.json lists checkpoint step\(s\) \[0\] more than once"),
    (dict(step="1"), r"checkpoints\[1\] is invalid: step='1' must be an int"),
    (dict(step=1.5), r"step=1.5 must be an int"), (dict(tokens_seen=-10), r"tokens_seen=-10 must be an int >= 0"),
    (dict(files={"../../etc/passwd": dict(size=1, sha256="0")}), "files must map file names"),
])
def test_foreign_manifest_entries_refused(tmp_path, config, tokenizer, entry, words):
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    manifest = read_manifest(run)
    manifest["checkpoints"].append({**dict(step=1, tokens_seen=10, path="step1"), **entry})
    write_json(run / "manifest.json", manifest)
    with pytest.raises(CorruptFileError, match=words):
        CheckpointSuite.from_run(run)
    with pytest.raises(CorruptFileError, match=words):  # a resumed trainer's save refuses it too
        save_checkpoint(build_model(config, seed=0), tokenizer, run, 2, 20)


def test_garbled_manifest_names_the_file(tmp_path, config, tokenizer):
    run = tmp_path / "run"
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(text[: len(text) // 2])  # a half-written copy
    with pytest.raises(CorruptFileError, match=rf"{run / 'manifest.json'} is not valid JSON"):
        CheckpointSuite.from_run(run)


def test_checkpoint_moved_aside_by_a_killed_writer_is_restored(tmp_path, config, tokenizer):
    "overwrite=True renames the old folder aside before renaming the new one in; a kill in between loses neither."
    run = tmp_path / "run"
    model = build_model(config, seed=2)
    save_checkpoint(build_model(config, seed=0), tokenizer, run, 0, 0)
    save_checkpoint(model, tokenizer, run, 2, 20)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "step2").rename(run / f".step2.old-{int(dead.stdout)}-0badf00d")  # as left by the killed writer
    suite = CheckpointSuite.from_run(run)
    assert suite.steps == [0, 2] and same_weights(suite.load_model(step=2), model)
    assert sorted(p.name for p in run.iterdir()) == [".manifest.lock", "manifest.json", "step0", "step2"]


class LockProbe:
    "A tokenizer whose saving asks another process whether the manifest lock is free."
    def __init__(self, lock): self.lock, self.answer = lock, None
    def save_pretrained(self, path):
        probe = (f"from dyntrack.core import Busy, file_lock\n"
                 f"try:\n    with file_lock({str(self.lock)!r}, wait=False): print('free')\n"
                 f"except Busy: print('busy')")
        self.answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip()


def test_save_holds_the_manifest_lock(tmp_path, config):
    run = tmp_path / "run"
    probe = LockProbe(run / ".manifest.lock")
    save_checkpoint(build_model(config, seed=0), probe, run, 0, 0)
    assert probe.answer == "busy"  # another process saving into this run waits for the manifest write
    with file_lock(run / ".manifest.lock", wait=False): pass  # released afterwards
    assert read_manifest(run)["checkpoints"][0]["step"] == 0


def test_topk_run_loads_in_a_fresh_interpreter(tmp_path):
    "A TopK run saved by save_checkpoint loads, checksums checked, with only dyntrack.models.suite imported and no remote code."
    from dyntrack.topk.model import topk_config
    model = build_model(topk_config("tiny", 50, 16, k=3, num_hidden_layers=3), seed=1).eval()
    save_checkpoint(model, None, tmp_path / "run", 4, 40)
    assert json.loads((tmp_path / "run" / "step4" / "config.json").read_text())["dyntrack_module"] == "dyntrack.topk.model"
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad(): torch.save(model(ids).logits, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from dyntrack.models.suite import CheckpointSuite
        assert "dyntrack.topk.model" not in sys.modules
        model = CheckpointSuite.from_run({str(tmp_path / 'run')!r}).load_model(step=4)
        print(type(model).__name__, model.config.topk_k)
        with torch.no_grad(): torch.testing.assert_close(model(torch.arange(12).view(2, 6)).logits, torch.load({str(tmp_path / 'want.pt')!r}))
        """)
    out = subprocess.run([sys.executable, "-c", script], input="y\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["TopKLlamaForCausalLM", "3"]


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


def test_damaged_hub_cache_file_is_named(tmp_path, monkeypatch, config, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fake_hub_cache(tmp_path / "hub", "toy-org/toy-pythia", {0: build_model(config, seed=0)}, tokenizer)
    cached = next((tmp_path / "hub").glob("models--*/snapshots/*/model.safetensors"))
    os.truncate(cached.resolve(), cached.stat().st_size - 10)
    suite = CheckpointSuite.from_hub("toy-org/toy-pythia", [0], cache_dir=tmp_path / "hub", local_files_only=True)
    with pytest.raises(CorruptFileError, match=r"toy-org/toy-pythia \(revision step0\) are damaged.*snapshots/\w+/model.safetensors"):
        suite.load_model(0)


# --- sibling models and parameter averages -----------------------------------------------------------------

def llama_siblings(n: int, **overrides):
    cfg = model_config("llama", "tiny", vocab_size=len(WORDS), max_seq_len=32, **overrides)
    return [build_model(cfg, seed=s) for s in range(n)]


def test_average_parameters_of_llama_models():
    from dyntrack.models.siblings import average_parameters
    a, b, c = llama_siblings(3)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert same_weights(average_parameters([a, a]), a) and same_weights(average_parameters([a], weights=[1]), a)
    pair = average_parameters([a, b]).state_dict()
    assert all(torch.equal(pair[k], (sa[k] + sb[k]) / 2) for k in sa)
    mix = average_parameters(iter([sa, sb, sc]), weights=[0.2, 0.3, 0.5])  # a generator of state dicts
    assert all(torch.allclose(mix[k], 0.2 * sa[k] + 0.3 * sb[k] + 0.5 * sc[k], atol=1e-7) for k in sa)
    assert not any(t.requires_grad for t in mix.values()) and mix.keys() == sa.keys()
    half = [{k: v.bfloat16() for k, v in s.items()} for s in (sa, sb)]  # summed in float64, cast back to bfloat16
    merged = average_parameters(half)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert all(torch.equal(merged[k], ((half[0][k].double() + half[1][k].double()) / 2).bfloat16()) for k in sa)
    for model, count in ((a, 3), (b, 5)): model.register_buffer("n_merged", torch.tensor([count]))  # an int buffer
    out = average_parameters([a, b])
    assert torch.equal(out.n_merged, torch.tensor([3])) and out is not a and torch.equal(a.n_merged, torch.tensor([3]))
    with pytest.raises(ParamError, match="weights=.*must sum to 1"):
        average_parameters([sa, sb], weights=[0.5, 0.25])
    with pytest.raises(ParamError, match="weights=.*must be finite numbers >= 0"):
        average_parameters([sa, sb], weights=[2.0, -1.0])
    with pytest.raises(ParamError, match="model 1 has another config than model 0: .*intermediate_size: 192 vs 256"):
        average_parameters([a, llama_siblings(1, intermediate_size=256)[0]])
    with pytest.raises(ParamError, match=r"key 'lm_head.weight' is torch.float32 \(3, 64\) in model 1"):
        average_parameters([sa, dict(sb, **{"lm_head.weight": sb["lm_head.weight"][:3]})])


def test_merged_model_saves_and_loads_with_plain_transformers(tmp_path, tokenizer):
    "A merge is an ordinary model: save_checkpoint writes it with checksums, from_pretrained and suites load it."
    from dyntrack.models.siblings import average_parameters
    merged = average_parameters(llama_siblings(2))
    step_dir = save_checkpoint(merged, tokenizer, tmp_path / "merged", 0, 0, meta=dict(merged_from=["seed0", "seed1"]))
    ids = torch.tensor([[2, 3, 5, 6, 7, 8]])
    with torch.no_grad():
        want = merged.eval()(ids).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(step_dir, trust_remote_code=False).eval()(ids).logits, want)
        torch.testing.assert_close(CheckpointSuite.from_run(tmp_path / "merged").load_model(0)(ids).logits, want)
    assert read_manifest(tmp_path / "merged")["meta"]["merged_from"] == ["seed0", "seed1"]


def test_model_set_of_runs(tmp_path, config, tokenizer):
    from dyntrack.models.siblings import ModelSet, average_parameters
    models = {name: build_model(config, seed=s) for s, name in enumerate(["animals", "kitchen"])}
    for name, model in models.items():
        for step in (0, 6): save_checkpoint(model if step else build_model(config, seed=9), tokenizer, tmp_path / name, step, step * 10)
    siblings = ModelSet.from_runs({name: tmp_path / name for name in models})
    assert siblings.step == 6 and list(siblings) == ["animals", "kitchen"] and siblings["kitchen"].tokens_seen == 60
    assert same_weights(siblings.load_model("kitchen"), models["kitchen"]) and siblings.config.hidden_size == 64
    assert same_weights(average_parameters(siblings.models()), average_parameters(list(models.values())))
    start = ModelSet.from_runs({name: tmp_path / name for name in models}, step=0)
    assert same_weights(start.load_model("animals"), start.load_model("kitchen"))  # both began from the seed-9 model
    flip_byte(tmp_path / "kitchen" / "step6" / "model.safetensors")  # members' checksums are checked as in a suite
    with pytest.raises(CorruptFileError, match=r"kitchen/step6/model.safetensors does not match its SHA-256"):
        siblings.load_model("kitchen")
    with pytest.raises(ParamError, match=r"step=3 is not a checkpoint of member\(s\) \['animals', 'kitchen'\]"):
        ModelSet.from_runs({name: tmp_path / name for name in models}, step=3)


def test_model_set_of_hub_repos_offline(tmp_path, monkeypatch, config, tokenizer):
    "Siblings published as separate Hub repos (e.g. one per seed) at one revision; a different architecture is named."
    from dyntrack.models.siblings import ModelSet
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fake_hub_cache(tmp_path / "hub", "toy-org/seed1", {8: build_model(config, seed=1)}, tokenizer)
    fake_hub_cache(tmp_path / "hub", "toy-org/seed2", {8: build_model(config, seed=2)}, tokenizer)
    llama = model_config("llama", "tiny", vocab_size=len(WORDS), max_seq_len=32)
    fake_hub_cache(tmp_path / "hub", "toy-org/llama", {8: build_model(llama, seed=1)}, tokenizer)
    hub = lambda repo: CheckpointSuite.from_hub(repo, [8], cache_dir=tmp_path / "hub", local_files_only=True)
    seeds = ModelSet({"seed1": hub("toy-org/seed1"), "seed2": hub("toy-org/seed2")})
    assert [c.revision for c in seeds.members.values()] == ["step8", "step8"]
    assert same_weights(seeds.load_model("seed2"), build_model(config, seed=2))
    with pytest.raises(ParamError, match="member 'llama' is no sibling of 'seed1': config fields differ .*model_type: 'gpt_neox' vs 'llama'"):
        ModelSet({"seed1": hub("toy-org/seed1"), "llama": hub("toy-org/llama")}).load_model("seed1")


def test_presets_live_in_one_module():
    "Presets and schedules moved to models.presets; models.suite keeps no copy or re-export of them."
    import dyntrack.models.presets as presets
    moved = ["ARCHS", "SIZES", "COUNT_FIELDS", "model_config", "build_model", "checkpoint_schedule", "pythia_steps",
             "PYTHIA_TOKENS_PER_STEP", "PYTHIA_SIZES"]
    assert all(hasattr(presets, name) for name in moved)
    assert not set(moved) & set(dyntrack.models.suite.__all__)  # pythia uses some, imported, not defined
    assert all(getattr(dyntrack.models.suite, name) is getattr(presets, name) for name in moved
               if hasattr(dyntrack.models.suite, name))
