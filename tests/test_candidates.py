"""Candidate scoring: rules that only re-rank the base's candidates choose the same tokens from
the pair's log-probs over those candidates alone (the engine and llama.cpp side: test_llamacpp)."""

from __future__ import annotations

import pytest
import torch

from proxytune.arithmetic import candidate_log_probs
from proxytune.engine.step import candidate_ids
from proxytune.rules import CandidateCombiner, PairInfo, Request, StepContext, make_rule

V, B = 60, 3


def request(pairs: int = 1) -> Request:
    return Request(("",), tuple(PairInfo() for _ in range(pairs)), V)


@pytest.mark.parametrize(
    ("spec", "only"),
    [
        ("rerank", True),
        ({"name": "rerank", "k": V}, False),  # every token a candidate: nothing to skip
        ("plausible", True),
        ({"name": "plausible", "tau": 0.0}, False),  # no filter
        ({"name": "plausible", "tau": 0.0, "top_p": 0.9}, True),
        ({"name": "rerank", "inner": {"name": "tokens", "bias": {3: 2.0}}}, True),
        ({"name": "rerank", "inner": "plausible"}, True),
        ({"name": "rerank", "inner": "product"}, True),
        ({"name": "rerank", "inner": "union"}, False),  # reads the experts' whole rows
        ({"name": "rerank", "inner": "gated"}, False),  # an entropy over the whole row
        ({"name": "rerank", "inner": "mixture"}, False),  # log-sum of probabilities
        ("proxy", False),  # the plain formula reads every token
        ("union", False),
    ],
)
def test_which_rules_score_candidates_only(spec, only):
    bound = make_rule(spec).bind(request())
    assert getattr(bound, "candidate_only", False) is only
    assert isinstance(bound, CandidateCombiner) or not only


def test_a_step_function_rule_never_does():
    bound = make_rule({"name": "rerank", "inner": lambda ctx: ctx.base}).bind(request())
    assert not bound.candidate_only


def _distributions(gen: torch.Generator, rows: int = B) -> torch.Tensor:
    return torch.log_softmax(3 * torch.randn(rows, V, generator=gen), dim=-1)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "rerank", "k": 5},
        {"name": "rerank"},
        {"name": "plausible", "tau": 0.05},
        {"name": "plausible", "tau": 0.0, "top_p": 0.8},
        {"name": "rerank", "k": 6, "temperatures": {"base": 1.5, "expert": 0.7}},
        {"name": "rerank", "k": 6, "inner": {"name": "proxy", "temperatures": {"anti_expert": 2}}},
        {"name": "rerank", "k": 4, "inner": {"name": "tokens", "bias": {1: 3.0}, "block": [2]}},
        {"name": "plausible", "tau": 0.02, "inner": {"name": "rerank", "k": 3}},
    ],
)
def test_log_probs_over_the_candidates_choose_what_full_log_probs_choose(spec):
    """The invariance the rules declare: each pair model's logits at the step's candidates
    alone, unnormalised and shifted by an arbitrary constant per row, give the same
    distribution as its full log-probs (two pairs, one with a per-row alpha)."""
    gen = torch.Generator().manual_seed(0)
    base = _distributions(gen)
    full = [(_distributions(gen), _distributions(gen)) for _ in range(2)]
    alphas = (1.0, torch.tensor([[0.5], [2.0], [-1.0]]))
    bound = make_rule(spec).bind(request(2))
    assert bound.candidate_only
    ids = candidate_ids(bound, base)
    assert 0 < len(ids) < V

    def over_candidates(lp: torch.Tensor) -> torch.Tensor:
        shift = 10 * torch.randn(B, 1, generator=gen)  # unnormalised: any constant per row
        return candidate_log_probs(lp[:, ids] + shift, ids, V)

    seen = [(over_candidates(e), over_candidates(a)) for e, a in full]
    want = bound(StepContext(base, full, alphas))
    got = bound(StepContext(base, seen, alphas))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert torch.equal(got.argmax(dim=-1), want.argmax(dim=-1))
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(want, -1))


def test_candidate_log_probs_are_normalised_over_the_candidates():
    lp = candidate_log_probs(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([4, 0, 2]), 6)
    assert torch.isneginf(lp[0, [1, 3, 5]]).all()
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0))
    assert lp[0, 2] > lp[0, 0] > lp[0, 4]
