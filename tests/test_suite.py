"The suite experiment notebook end to end on a Hub-like suite (offline cache), and its parameter errors."
import json
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch

from conftest import toy_hub
from dyntrack.core import ParamError
from dyntrack.suite import SuiteParams, activation_similarity, emergence_tokens, open_suite, resolve_site

NB = Path(__file__).parent.parent / "nbs" / "10_suite.ipynb"
REPO = "toy-org/toy-pythia"
# tiny evaluation sizes: the notebook's logic, not its numbers, is under test
FAST = dict(eval_words_per_domain=300, n_pairs=4, sim_tokens=256, eval_tokens=256, seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    "A Hub cache holding revisions step0 and step16 of a tiny GPT-NeoX with a BPE tokenizer trained on the corpus."
    return toy_hub(tmp_path_factory.mktemp("hub"), REPO, (0, 16))


@pytest.fixture
def offline(hub, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def run_notebook(tmp_path, **params):
    out = tmp_path / "out"
    pm.execute_notebook(str(NB), str(tmp_path / "executed.ipynb"), cwd=str(NB.parent), kernel_name="python3",
                        parameters=dict(profile="smoke", out_dir=str(out), **params), progress_bar=False)
    return out


def test_notebook_runs_on_a_hub_suite(tmp_path, offline):
    out = run_notebook(tmp_path, suite=f"hub:{REPO}", hub_steps=[16, 0], hub_tokens_per_step=1000, **FAST)
    m = json.loads((out / "metrics.json").read_text())
    assert m["notebook"] == "10_suite" and m["profile"] == "smoke" and m["device"].startswith("cpu")
    table = m["metrics"]["table"]
    assert [r["step"] for r in table] == [0, 16] and [r["tokens"] for r in table] == [0, 16000]
    assert m["metrics"]["site_layer"] == 1  # middle of a 2-block model
    assert {k for k in table[0] if k.startswith("acc_")} == {f"acc_{p}" for p in m["metrics"]["final_accuracy"]}
    assert all(0 <= r[k] <= 1 for r in table for k in r if k.startswith("acc_"))
    sim = np.array(m["metrics"]["similarity"])
    assert sim.shape == (2, 2) and np.allclose(np.diag(sim), 1, atol=1e-4) and sim[0, 1] < 0.999  # different weights
    for name in ("suite_loss_by_domain", "crosscoding_fig_accuracy_over_training", "crosscoding_fig_activation_similarity"):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_notebook_rejects_unknown_parameter(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown parameter\(s\) \['n_layer'\]"):
        run_notebook(tmp_path, n_layer=3)


def test_site_layer_out_of_range(offline):
    suite = open_suite(SuiteParams(suite=f"hub:{REPO}", hub_steps=(0, 16)))
    assert resolve_site(suite, -1) == 1
    with pytest.raises(ParamError, match=r"site_layer=2 is out of range; the suite has blocks \[0, 1\]"):
        resolve_site(suite, 2)


def test_missing_hub_revision_fails_clearly(offline):
    suite = open_suite(SuiteParams(suite=f"hub:{REPO}", hub_steps=(0, 3)))
    with pytest.raises(OSError):
        suite.load_model(1)


def test_bad_suite_strings():
    for bad in ("hub:", "pythia", "folders:"):
        with pytest.raises(ParamError, match="suite="):
            SuiteParams(suite=bad)


def test_similarity_and_emergence_known_answers():
    a = torch.randn(40, 6)
    sim = activation_similarity([a, a * 3, -a])
    np.testing.assert_allclose(sim, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-5)
    rows = [dict(tokens=t, acc=v) for t, v in [(0, 0.5), (1, 0.95), (2, 0.8), (4, 0.91), (8, 0.99)]]
    assert emergence_tokens(rows, "acc") == 4  # the lucky checkpoint at 1 token does not count
    assert emergence_tokens(rows, "acc", 0.995) is None
