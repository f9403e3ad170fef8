"""FSDP (`TrainConfig.parallel="fsdp"`) on two gloo ranks: the same losses and weights as one process, plain
checkpoints, and a trainer state in the single-process format that resumes under FSDP or in one process."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dyntrack.core import ParamError
from dyntrack.models.suite import CheckpointSuite
from dyntrack.train.trainer import Trainer, block_modules, shard_model

sys.path.insert(0, str(Path(__file__).parent))
from test_train import log_records, make_config, make_data, make_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import Kill, make_config, make_data, make_model
from dyntrack.train.trainer import Trainer
torch.set_num_threads(1)
kill = [Kill({kill})] if {kill} is not None else []
Trainer(make_model(), None, make_data(), make_config(**{kw!r}), {run_dir!r}, callbacks=kill).fit()
"""


def torchrun(tmp_path, run_dir, kw, kill=None) -> subprocess.CompletedProcess:
    "Train with two gloo ranks under torchrun (FSDP), optionally killed at step `kill`."
    script = tmp_path / f"fsdp_{Path(run_dir).name}.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), kw=dict(kw, parallel="fsdp"),
                                    run_dir=str(run_dir), kill=kill))
    env = dict(os.environ, OMP_NUM_THREADS="1", DYNTRACK_PROGRESS="0")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


# Weights agree to float summation order, amplified by Adam where a gradient is ~0 (the attention key bias)
TOL = dict(atol=5e-5, rtol=1e-4)
KW = dict(total_steps=8, checkpoint_steps=[4, 8], eval_steps=[8], resume_every=3)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    "One process, the same config: what FSDP must reproduce."
    run_dir = tmp_path_factory.mktemp("single") / "run"
    model = make_model()
    Trainer(model, None, make_data(), make_config(**KW), run_dir).fit()
    return run_dir, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fsdp_two_ranks_match_one_process(tmp_path, single):
    one_dir, one_weights = single
    proc = torchrun(tmp_path, tmp_path / "fsdp", KW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = log_records(one_dir), log_records(tmp_path / "fsdp")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two[1:]], [r["loss"] for r in one[1:]], atol=1e-5, rtol=1e-5)
    assert [r["tokens_seen"] for r in two] == [r["tokens_seen"] for r in one] and [r["flops"] for r in two] == [r["flops"] for r in one]
    for d in ("up", "down"):  # validation ran on both ranks; rank 0 logged it
        assert abs(two[-1]["val_loss"][d] - one[-1]["val_loss"][d]) < 1e-4
    saved = load_file(tmp_path / "fsdp/trainer_state/model.safetensors")  # whole, unsharded
    assert set(saved) == set(one_weights)
    for k, v in one_weights.items(): torch.testing.assert_close(saved[k], v, **TOL, msg=k)
    final = CheckpointSuite.from_run(tmp_path / "fsdp").load_model(step=8)  # a plain checkpoint
    for k, v in one_weights.items(): torch.testing.assert_close(final.state_dict()[k], v, **TOL, msg=k)
    opt = torch.load(tmp_path / "fsdp/trainer_state/optimizer.pt", weights_only=True)["optimizer"]
    plain = torch.load(one_dir / "trainer_state/optimizer.pt", weights_only=True)["optimizer"]
    assert sorted(opt["state"]) == sorted(plain["state"])  # numbered as optimizer.state_dict() numbers them
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in plain["param_groups"]]
    for i, s in plain["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg_sq"], s["exp_avg_sq"], atol=1e-7, rtol=1e-3)


def test_fsdp_resumes_under_fsdp_and_in_one_process(tmp_path, single):
    one_dir, one_weights = single
    proc = torchrun(tmp_path, tmp_path / "cut", KW, kill=5)  # state saved at step 3, killed during step 5
    assert proc.returncode != 0 and "Killed" in proc.stderr
    assert json.loads((tmp_path / "cut/trainer_state/state.json").read_text())["step"] == 3
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")  # the same killed run, resumed in one process below
    proc = torchrun(tmp_path, tmp_path / "cut", KW)  # resumed with FSDP
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose([r["loss"] for r in log_records(tmp_path / "cut")[1:]],
                               [r["loss"] for r in log_records(one_dir)[1:]], atol=1e-5, rtol=1e-5)
    model = make_model(seed=7)  # resumed in one process from the FSDP run's state
    Trainer(model, None, make_data(), make_config(**dict(KW, parallel="fsdp")), tmp_path / "cut2").fit()
    for k, v in one_weights.items(): torch.testing.assert_close(model.state_dict()[k], v, **TOL, msg=k)


def test_blocks_are_found_and_tied_weights_are_refused():
    model = make_model()
    assert block_modules(model) == list(model.gpt_neox.layers)
    from transformers import GPT2Config, GPT2LMHeadModel
    tied = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(ParamError, match="ties parameters"): shard_model(tied)
