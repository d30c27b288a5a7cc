"""Nudging and the union plausibility mask: by hand on small logits, the settings that reduce
them to known rules (base, expert, proxy, plausible), their errors, and end to end."""

from __future__ import annotations

import math

import pytest
import torch

from proxytune.errors import ConfigError, NumericalError
from proxytune.rules import (
    Nudging,
    PairInfo,
    Plausible,
    Proxy,
    Request,
    StepContext,
    Union,
    make_rule,
    nudge_scores,
    union_mask,
)

INF = math.inf
PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return"]


def lsm(row: list[float]) -> list[float]:
    """log_softmax by hand."""
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def T(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# row 0: the base is sure (top-1 p = 0.80), row 1: it hesitates (top-1 p = 0.40)
PB = [[0.80, 0.10, 0.06, 0.04], [0.40, 0.35, 0.15, 0.10]]
PE = [[0.05, 0.05, 0.10, 0.80], [0.10, 0.20, 0.60, 0.10]]
PA = [[0.25, 0.25, 0.25, 0.25], [0.40, 0.30, 0.20, 0.10]]
B = [[math.log(p) for p in row] for row in PB]
E = [[math.log(p) for p in row] for row in PE]
A = [[math.log(p) for p in row] for row in PA]
V = 4


def ctx(alphas=(1.0,), pairs=None, base=None) -> StepContext:
    pairs = ((T(E), T(A)),) if pairs is None else pairs
    return StepContext(T(B) if base is None else base, pairs, alphas)


# -- nudging ----------------------------------------------------------------------------------


def test_nudging_hands_only_the_hesitant_rows_to_the_expert():
    got = Nudging(gamma=0.5)(ctx())  # 0.80 >= 0.5: base; 0.40 < 0.5: expert
    assert torch.equal(got[0], T(B)[0]) and torch.equal(got[1], T(E)[1])
    assert got.argmax(-1).tolist() == [0, 2]
    assert torch.equal(Nudging(gamma=0.9)(ctx()), T(E))  # both rows below 0.9
    assert torch.equal(Nudging(gamma=0.4)(ctx()), T(B))  # strict: 0.40 is not below 0.40
    assert torch.equal(nudge_scores(T(B), T(E), 0.5), got)  # the rule is its formula


def test_nudging_limits_are_the_base_alone_and_the_expert_alone():
    # every top-1 probability is >= 1/V: gamma <= 1/V never nudges, on any input
    random = torch.log_softmax(torch.randn(64, V, generator=torch.Generator().manual_seed(0)), -1)
    expert = torch.log_softmax(torch.randn(64, V), -1)
    assert torch.equal(nudge_scores(random, expert, 1.0 / V), random)
    assert torch.equal(Nudging(gamma=1e-9)(ctx()), T(B))
    # gamma = 1 is above every top-1 below certainty: the expert everywhere
    assert torch.equal(nudge_scores(random, expert, 1.0), expert)
    assert torch.equal(Nudging(gamma=1.0)(ctx()), T(E))


def test_nudging_at_alpha_zero_is_the_base_and_reads_no_anti_expert():
    assert torch.equal(Nudging(gamma=1.0)(ctx(alphas=(0.0,))), T(B))
    per_row = torch.tensor([[1.0], [0.0]])  # row 1 switched off
    got = Nudging(gamma=1.0)(ctx(alphas=(per_row,)))
    assert torch.equal(got[0], T(E)[0]) and torch.equal(got[1], T(B)[1])
    request = Request(pairs=(PairInfo(True, True),))
    assert Nudging().needs(request) == ((True, False),)
    off = Request(pairs=(PairInfo(True, True), PairInfo(True, True, always_off=True)))
    assert Nudging().needs(off) == ((True, False), (False, False))
    # the threshold reads the calibrated base: T = 4 flattens row 0 below 0.5
    assert torch.equal(Nudging(gamma=0.5, temperatures={"base": 4.0})(ctx())[0], T(E)[0])


def test_nudging_settings_and_model_set_are_checked():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(
            ConfigError, match=r"rule.gamma must be a finite number in \(0.0, 1.0\]"
        ):
            make_rule({"name": "nudging", "gamma": bad})
    two = Request(pairs=(PairInfo(True, True), PairInfo(True, True)))
    with pytest.raises(ConfigError, match="hands the token to one expert, but 2 pairs are on"):
        Nudging().needs(two)
    with pytest.raises(ConfigError, match="pair 0 has only an anti-expert"):
        Nudging().needs(Request(pairs=(PairInfo(False, True),)))
    rule = make_rule({"name": "nudging", "gamma": 0.3})
    assert rule == Nudging(gamma=0.3) and rule.to_spec() == {"name": "nudging", "gamma": 0.3}


# -- union plausibility mask ------------------------------------------------------------------


def test_union_keeps_what_the_base_or_the_expert_finds_plausible():
    got = Union(tau=0.5)(ctx())
    proxy = Proxy()(ctx())
    # tau 0.5: row 0 base keeps {0} (0.8), expert keeps {3} (0.8); row 1 base keeps {0, 1}
    # (0.40, 0.35 >= 0.20 > 0.15), expert keeps {2} (0.60; 0.20 < 0.30)
    keep = [{0, 3}, {0, 1, 2}]
    want = [[proxy[r, t].item() if t in keep[r] else -INF for t in range(V)] for r in range(2)]
    assert got.tolist() == want
    plausible = Plausible(tau=0.5)(ctx())  # the base's half only
    assert [t for t in range(V) if plausible[0, t] > -INF] == [0]


def test_union_reduces_to_proxy_when_everything_is_kept_and_to_plausible_at_alpha_zero():
    assert torch.equal(Union(tau=0.0)(ctx()), Proxy()(ctx()))
    assert torch.equal(Union(tau=1e-3)(ctx()), Proxy()(ctx()))  # every p >= 1e-3 x best here
    # a pair at alpha 0 has no say in the mask: the base's plausibility alone
    assert torch.equal(Union(tau=0.5)(ctx(alphas=(0.0,))), Plausible(tau=0.5)(ctx(alphas=(0.0,))))
    # unlike plausible, a token the base rules out comes back where the expert finds it
    # plausible and inner gives it mass (a mixture); the others stay out
    base = T([[0.0, -INF, -INF, -INF]])
    out = Union(tau=0.5, inner={"name": "mixture"})(
        ctx(base=base, pairs=((T(E[:1]), None),), alphas=(0.5,))
    )
    assert torch.isneginf(out[0, 1:3]).all() and out[0, 3] > -INF  # expert keeps {3}
    assert union_mask(T(B), [], 0.5).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
    ]


def test_union_runs_the_expert_and_shows_inner_only_what_it_reads():
    request = Request(pairs=(PairInfo(True, True),))
    assert Union().needs(request) == ((True, True),)
    assert Union(inner="base").needs(request) == ((True, False),)  # the mask needs the expert
    assert Union(inner="product").needs(request) == ((True, False),)
    seen = []
    rule = Union(tau=0.5, inner=lambda c: seen.append(c.pairs) or c.base)
    rule(ctx())
    assert seen[0][0][0] is not None and seen[0][0][1] is not None  # a function reads all
    assert torch.equal(
        Union(tau=0.5, inner="product")(ctx()),
        Union(tau=0.5, inner="product")(ctx(pairs=((T(E), None),))),
    )


def test_union_settings_and_empty_rows_are_named():
    with pytest.raises(ConfigError, match=r"rule.tau must be a finite number in \[0.0, 1.0\]"):
        make_rule({"name": "union", "tau": 1.5})
    blocks_row_0 = {"name": "tokens", "block": [0, 3]}  # exactly what the union keeps in row 0
    with pytest.raises(NumericalError, match=r"union\(tau=0.5, .*left no .*row 0.*lower tau"):
        Union(tau=0.5, inner=blocks_row_0)(ctx())
    assert make_rule({"name": "union", "tau": 0.2}).to_spec() == {"name": "union", "tau": 0.2}


# -- end to end on the tiny models ------------------------------------------------------------


def test_nudging_end_to_end_is_the_base_or_the_expert_at_its_limits(tuner):
    ids = lambda out: [r.token_ids for r in out]  # noqa: E731
    base = ids(tuner.generate(PROMPTS, rule="base", max_new_tokens=8))
    expert = ids(tuner.generate(PROMPTS, rule={"name": "mixture"}, alpha=1.0, max_new_tokens=8))
    small = 0.5 / tuner.vocab_size
    assert ids(tuner.generate(PROMPTS, rule={"name": "nudging", "gamma": small},
                              max_new_tokens=8)) == base  # fmt: skip
    assert ids(tuner.generate(PROMPTS, rule={"name": "nudging", "gamma": 1.0},
                              max_new_tokens=8)) == expert  # fmt: skip
    assert base != expert  # the limits differ, so the test can tell them apart


def test_union_end_to_end_with_tau_zero_is_proxy(tuner):
    plain = [r.token_ids for r in tuner.generate(PROMPTS, max_new_tokens=8)]
    got = tuner.generate(PROMPTS, rule={"name": "union", "tau": 0.0}, max_new_tokens=8)
    assert [r.token_ids for r in got] == plain
    masked = tuner.generate(PROMPTS, rule={"name": "union", "tau": 0.5}, max_new_tokens=8)
    assert all(len(r.token_ids) > 0 for r in masked)
