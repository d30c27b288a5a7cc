"""Short-answer weak-to-strong reranking: the objective and the pick by hand, the forced first
token, and the system end to end on the tiny models (candidates, their scores, the pick)."""

from __future__ import annotations

import pytest
import torch

from proxytune.errors import ConfigError
from proxytune.evaluation.rerank import FirstToken, RerankSystem, pick, rerank_objective
from proxytune.evaluation.scoring import render, score_ids
from proxytune.rules import StepContext

PROMPTS = ["The quick brown fox", "Rain"]


def test_the_pick_follows_the_objective_by_hand():
    # prompt 0: y0 is the base's favourite, y1 what the expert adds over the anti-expert
    base = torch.tensor([-1.0, -2.0, -4.0, -0.5])
    expert = torch.tensor([-5.0, -1.0, -1.0, -2.0])
    anti = torch.tensor([-3.0, -3.0, -1.0, -2.0])
    groups = [0, 0, 0, 1]
    # beta 0: log p_M alone -> y0; beta 1: -1 - 2 = -3 vs -2 + 2 = 0 vs -4 + 0 -> y1
    assert pick(rerank_objective(base, expert, anti, 0.0), groups) == [0, 3]
    assert pick(rerank_objective(base, expert, anti, 1.0), groups) == [1, 3]
    assert rerank_objective(base, expert, anti, 1.0).tolist() == [-3.0, 0.0, -4.0, -0.5]
    assert pick(torch.tensor([1.0, 1.0, 0.0]), [0, 0, 0]) == [0]  # a tie: the earlier one


def test_first_token_forces_step_zero_only():
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), -1)
    rule = FirstToken(first=(2, 0, 1))
    got = rule(StepContext(lp, prompt_index=(0, 2)))
    assert got.argmax(-1).tolist() == [2, 1] and torch.isneginf(got).sum() == 4
    assert torch.equal(rule(StepContext(lp, step=1, prompt_index=(0, 2))), lp)


def test_rerank_system_end_to_end_on_the_tiny_models(tuner):
    settings = {"max_new_tokens": 5}
    system = RerankSystem("rerank", tuner, beta=1.0, k=2)
    per_prompt = system.candidates(PROMPTS, **settings)
    expert_role = tuner.pairs[0].expert.role
    ids = lambda out: [r.token_ids for r in out]  # noqa: E731
    base = ids(tuner.alone("base").generate(PROMPTS, **settings))
    expert = ids(tuner.alone(expert_role).generate(PROMPTS, **settings))
    proxy = ids(tuner.generate(PROMPTS, **settings))
    firsts = tuner.alone("base").generate(PROMPTS, max_new_tokens=1, logprobs=True, top_logprobs=3)
    for p, cands in enumerate(per_prompt):
        assert [c.source for c in cands] == ["base", "expert", "proxy", "first[1]", "first[2]"]
        assert [c.result.token_ids for c in cands[:3]] == [base[p], expert[p], proxy[p]]
        ranked = [alt[0] for alt in firsts[p].logprobs[0].top]
        assert [c.result.token_ids[0] for c in cands[3:]] == ranked[1:3]
        assert all(c.result.prompt_index == p for c in cands)
    # each model's sequence log-prob is what that model alone gives the candidate
    cand = per_prompt[1][3]
    for who, role in (("base", "base"), ("expert", expert_role)):
        alone = tuner.alone(role)
        (s,) = score_ids(alone, [render(alone, PROMPTS[1])], [cand.result.token_ids])
        assert getattr(cand, who) == pytest.approx(s.logprob, abs=1e-4)
    assert cand.score == pytest.approx(cand.base + cand.expert - cand.anti, abs=1e-9)
    # the answer of each prompt is its best-scored candidate
    out = system.generate(PROMPTS, **settings)
    for p, cands in enumerate(per_prompt):
        best = max(cands, key=lambda c: c.score)
        assert out[p].token_ids == best.result.token_ids and out[p].prompt_index == p
    assert system.describe()["beta"] == 1.0 and system.describe()["kind"] == "rerank"
    assert len(system.score(PROMPTS, [" a", " b"])) == 2


def test_alternative_first_tokens_run_in_batches_no_larger_than_the_callers(tuner, monkeypatch):
    # k rows per prompt would exceed what a llama.cpp context holds at once (64 rows): the
    # system never asks a backend for more rows than the caller's batch
    from proxytune.tuner import ProxyTuner

    sizes: list[int] = []
    generate = ProxyTuner.generate

    def recording(self, prompts, **kwargs):
        sizes.append(len(prompts))
        return generate(self, prompts, **kwargs)

    monkeypatch.setattr(ProxyTuner, "generate", recording)
    per_prompt = RerankSystem("rerank", tuner, k=3).candidates(PROMPTS, max_new_tokens=3)
    assert max(sizes) == len(PROMPTS)
    firsts = tuner.alone("base").generate(PROMPTS, max_new_tokens=1, logprobs=True, top_logprobs=4)
    for p, cands in enumerate(per_prompt):
        assert [c.source for c in cands[3:]] == ["first[1]", "first[2]", "first[3]"]
        ranked = [alt[0] for alt in firsts[p].logprobs[0].top]
        assert [c.result.token_ids[0] for c in cands[3:]] == ranked[1:4]
        assert all(c.result.prompt_index == p for c in cands)


def test_a_beta_sweep_makes_the_candidates_once_and_picks_as_alone(tuner, monkeypatch):
    from proxytune.tuner import ProxyTuner

    settings = {"max_new_tokens": 4}
    alone = {
        b: RerankSystem("r", tuner, beta=b, k=2).candidates(PROMPTS, **settings) for b in (0.0, 3.0)
    }
    calls: list[int] = []
    generate = ProxyTuner.generate
    monkeypatch.setattr(
        ProxyTuner, "generate", lambda self, p, **kw: calls.append(1) or generate(self, p, **kw)
    )
    made: dict = {}
    first = RerankSystem("r@0", tuner, beta=0.0, k=2, made=made).candidates(PROMPTS, **settings)
    before = len(calls)
    again = RerankSystem("r@3", tuner, beta=3.0, k=2, made=made).candidates(PROMPTS, **settings)
    assert len(calls) == before > 0  # nothing generated for the second beta
    for got, want in ((first, alone[0.0]), (again, alone[3.0])):
        assert [[(c.source, c.result.token_ids, c.score) for c in cands] for cands in got] == [
            [(c.source, c.result.token_ids, c.score) for c in cands] for cands in want
        ]
    # other prompts or settings are made anew
    RerankSystem("r@3", tuner, beta=3.0, k=2, made=made).candidates(PROMPTS[:1], **settings)
    assert len(calls) > before


def test_rerank_system_refuses_what_it_cannot_do(tuner):
    with pytest.raises(ConfigError, match="needs a tuner with one pair of expert and anti-expert"):
        RerankSystem("r", tuner.alone("base"))
    with pytest.raises(ConfigError, match="rerank k must be an integer >= 0"):
        RerankSystem("r", tuner, k=-1)
    with pytest.raises(ConfigError, match="decodes greedily with one answer per prompt"):
        RerankSystem("r", tuner, k=0).generate(PROMPTS, n=2)


def test_rerank_system_is_evaluated_like_a_system(tuner, tmp_path):
    import json

    from proxytune.evaluation import System, Task, evaluate

    rows = [{"id": f"q{i}", "prompt": f"Q: {w}?\nA:", "answer": "1"} for i, w in enumerate("ab")]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = Task(name="qa", data=str(data), extract="last_number", gold="{answer}")
    systems = [
        System("proxy@1", tuner, "proxy", 1.0),
        RerankSystem("rerank", tuner, beta=1.0, k=1, alpha=1.0),  # grouped with proxy@1
    ]
    report = evaluate(
        task, systems, tmp_path / "out", settings={"max_new_tokens": 4}, progress=False
    )
    assert report.score("rerank", "exact_match") is not None
    saved = [json.loads(x) for x in (tmp_path / "out" / "rerank.jsonl").read_text().splitlines()]
    want = RerankSystem("r", tuner, beta=1.0, k=1, alpha=1.0).generate(
        [r["prompt"] for r in rows], max_new_tokens=4
    )
    assert [s["outputs"] for s in saved] == [[w.text] for w in want]
