"AuxK without a host sync: the loss equals the one computed from the exact count of dead latents, for any count."
import math

import pytest
import torch
import torch.nn.functional as F

from dyntrack.crosscoding.model import Crosscoder, CrosscoderConfig
from dyntrack.sae.model import SaeConfig, SparseAutoencoder, normalised_mse


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters(): p.normal_()
    return model


def _sae_aux_exact(sae, x, dead):
    "AuxK from the text of Gao et al.: the top min(aux_k, n_dead) dead pre-activations, ReLU, decoded without b_dec."
    pre = sae.encode(x).pre_acts
    n_dead = int(dead.sum())
    if n_dead == 0: return torch.zeros(())
    values, idx = pre.masked_fill(~dead, -math.inf).topk(min(sae.cfg.aux_k, n_dead), dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, idx, F.relu(values))
    residual = x - sae(x).recon
    return sae.cfg.aux_coef * normalised_mse(residual.detach(), dense @ sae.W_dec)


@pytest.mark.parametrize("n_dead", [0, 1, 3, 5, 40])
def test_sae_auxk_equals_the_exact_count(n_dead):
    sae = _randomised(SparseAutoencoder(SaeConfig(d_model=12, d_sae=40, kind="topk", k=4, aux_k=5, batch_size=16,
                                                  n_tokens=160)))
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    got = sae(x, dead).aux_loss
    want = _sae_aux_exact(sae, x, dead)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (n_dead, float(got.detach()), float(want.detach()))
    assert (float(got.detach()) > 0) == (n_dead > 0)


def _cc_aux_exact(cc, x, dead):
    "Crosscoder AuxK with the exact dead count: top min(aux_k, n_dead) dead latents by f·Σ_m‖W_dec‖, no b_dec."
    n_dead = int(dead.sum())
    if n_dead == 0: return torch.zeros(())
    out = cc(x)
    f = F.relu(out.code.pre_acts)
    scores = (f * cc.decoder_norms().sum(-1)).masked_fill(~dead, -math.inf)
    top = scores.topk(min(cc.cfg.aux_k, n_dead), dim=-1).indices
    aux = torch.zeros_like(f).scatter(-1, top, f.gather(-1, top))
    rebuilt = (aux @ cc.W_dec.flatten(1)).unflatten(-1, cc.W_dec.shape[1:])
    return cc.cfg.aux_coef * normalised_mse((x - out.recon).detach(), rebuilt)


@pytest.mark.parametrize("n_dead", [0, 2, 4, 11])
def test_crosscoder_auxk_equals_the_exact_count(n_dead):
    cc = _randomised(Crosscoder(CrosscoderConfig(d_model=5, n_checkpoints=3, d_latents=11, kind="batchtopk", k=2,
                                                 k_start=0, aux_k=4, batch_size=7, n_tokens=70)))
    x = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(11, dtype=torch.bool)
    dead[torch.randperm(11, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    got = cc(x, dead).aux_loss
    want = _cc_aux_exact(cc, x, dead)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (n_dead, float(got.detach()), float(want.detach()))
    assert (float(got.detach()) > 0) == (n_dead > 0)
