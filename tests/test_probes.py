"""dyntrack.probes on constructed inputs: the excess loss of a known matrix, orderings of known emergence, recipe variants and their run keys, refusals."""
import dataclasses

import numpy as np
import pytest

from dyntrack.core import ParamError, resolve_params
from dyntrack.data.grammar import load_grammar
from dyntrack.probes import (ProbeParams, depth_gap, depth_recipes, domain_recipes, mean_offdiag_excess, seed_recipes,
                             stable_orderings, transfer_matrix)
from dyntrack.train.suite import EmbeddedRecipe, run_key


def test_excess_loss_of_a_known_matrix():
    # every model is 1 nat worse off its own domain, plus 0.5 on domain "c": excess (1·4 + 1.5·2) / 6
    losses = {d: {e: 2.0 + (d != e) * (1.0 + 0.5 * (e == "c")) for e in "abc"} for d in "abc"}
    m = transfer_matrix(losses)
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 2.0)
    assert mean_offdiag_excess(m) == pytest.approx((4 * 1.0 + 2 * 1.5) / 6)
    assert mean_offdiag_excess(m.T) == pytest.approx(mean_offdiag_excess(m))  # the diagonal is 2 everywhere
    assert mean_offdiag_excess(np.array([[1.0, 0.5], [0.5, 1.0]])) == pytest.approx(-0.5)  # transfer can help
    with pytest.raises(ParamError, match="at least two"): mean_offdiag_excess(np.ones((1, 1)))


def test_stable_orderings_of_known_emergence():
    em = {0: dict(a=10, b=20, c=40, d=None), 1: dict(a=10, b=30, c=30, d=None), 2: dict(a=5, b=40, c=80, d=90)}
    assert stable_orderings(em) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]  # b, c tie in seed 1
    assert stable_orderings({0: dict(x=None, y=None)}) == []  # never emerged: not ordered
    with pytest.raises(ParamError, match="emergence_by_seed is empty"): stable_orderings({})


def test_depth_gap():
    g = depth_gap({"a": 2.0}, {"a": 2.3}, dict(rc=0.9, simple=1.0), dict(rc=0.6, simple=1.0), ["rc"])
    assert g.loss_gap == pytest.approx(0.3) and g.deep_acc_gap == pytest.approx(0.3) and list(g.per_phenomenon) == ["rc"]


def test_recipe_variants_change_run_key():
    r = EmbeddedRecipe(size="tiny", total_steps=20, warmup_steps=2, n_linear=4)
    keys = {run_key(r)}
    keys |= {run_key(v) for v in domain_recipes(r).values()}
    depth = depth_recipes(r, 12, 0.25)  # 12 and 3 blocks: neither is tiny's own 2
    keys |= {run_key(v) for v in depth.values()}
    keys |= {run_key(v) for v in seed_recipes(r, (1, 2)).values()}
    n_domains = len(load_grammar().domains)
    assert len(keys) == 1 + n_domains + 2 + 2
    assert run_key(depth_recipes(r, 0, 0.5)["deep"]) == run_key(r)  # the size's own depth is the reference model
    assert {k: v.depth for k, v in depth.items()} == dict(deep=12, shallow=3)
    assert run_key(depth_recipes(r, 8, 0.25)["shallow"]) == run_key(r)  # 2 blocks: tiny itself


def test_bad_values_are_refused_with_their_names():
    with pytest.raises(ParamError, match="train_domain='atlantis' is not allowed"): EmbeddedRecipe(train_domain="atlantis")
    with pytest.raises(ParamError, match="n_layers=-1"): EmbeddedRecipe(n_layers=-1)
    with pytest.raises(ParamError, match="seeds=\\(\\) must be distinct"): resolve_params(ProbeParams, "smoke", dict(seeds=()))
    with pytest.raises(ParamError, match="unknown"): resolve_params(ProbeParams, "smoke", dict(train_domain="farm"))
    p = resolve_params(ProbeParams, "paper")
    assert p.recipe.size == "small" and p.deep_layers == 8 and p.recipe.seed == p.seeds[0]
    assert dataclasses.replace(p.recipe, train_domain=load_grammar().domains[0]).train_domain == load_grammar().domains[0]
