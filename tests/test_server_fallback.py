"""Fallback: a pair that fails mid-request (NaN log-probs, an exception) hands its requests to
the base or the expert alone, per policy; other requests in the batch never notice."""

from __future__ import annotations

import concurrent.futures
import math
from typing import Any

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.engine.continuous import ContinuousBatch
from proxytune.engine.members import Member, Pair
from proxytune.prompts import PromptFormat, TokenIds

RAW = PromptFormat.parse("raw")
PROMPTS = ["The quick brown fox", "def add(a, b):", "Rain falls on the quiet town"]
K = 3  # the broken model's logits turn bad from its K-th advance on
N = 10


class _State:
    """A decode state that turns bad after its model's ``k``-th advance."""

    def __init__(self, inner: Any, owner: Broken) -> None:
        self.inner, self.owner = inner, owner

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner.advance(ids)
        self.owner.advances += 1
        if self.owner.advances >= self.owner.k:
            if self.owner.mode == "raise":
                raise RuntimeError("the expert's server stopped answering")
            return torch.full_like(out, math.nan)
        return out

    def keep(self, index: torch.Tensor) -> None:
        self.inner.keep(index)

    @property
    def can_extend(self) -> bool:
        return self.inner.can_extend

    def extend(self, other: _State) -> None:
        self.inner.extend(other.inner)

    def compact(self) -> None:
        self.inner.compact()


class Broken:
    """A model that produces NaN logits (or raises) from its ``k``-th decode step on."""

    def __init__(self, inner: Any, k: int = K, mode: str = "nan") -> None:
        self.inner, self.k, self.mode, self.advances = inner, k, mode, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def start(self, prompts: Any, **kw: Any) -> tuple[_State, torch.Tensor]:
        state, logits = self.inner.start(prompts, **kw)
        return _State(state, self), logits


def two_pairs(tuner: ProxyTuner, broken_side: str = "expert", mode: str = "nan") -> ProxyTuner:
    """The fixture's models: pair 0 healthy, pair 1 the same models with one side broken."""
    good = tuner.pairs[0]
    expert = Member("expert[1]", good.expert.model, RAW)
    anti = Member("anti_expert[1]", good.anti_expert.model, RAW)
    if broken_side == "expert":
        expert = Member("expert[1]", Broken(good.expert.model, mode=mode), RAW)
    else:
        anti = Member("anti_expert[1]", Broken(good.anti_expert.model, mode=mode), RAW)
    pair0 = Pair(Member("expert[0]", good.expert.model, RAW), good.anti_expert, good.alpha)
    return ProxyTuner(tuner.base, [pair0, Pair(expert, anti, good.alpha)])


def healthy(tuner: ProxyTuner) -> ProxyTuner:
    good = tuner.pairs[0]
    pair = Pair(Member("expert[0]", good.expert.model, RAW), good.anti_expert, good.alpha)
    return ProxyTuner(tuner.base, [pair])


def run(batch: ContinuousBatch, jobs: list[Any]) -> dict[int, list[int]]:
    got: dict[int, list[int]] = {id(j): [] for j in jobs}
    for job, update in batch.step(jobs):
        got[id(job)].append(update.token_id)
    while batch.live_rows:
        for job, update in batch.step():
            got[id(job)].append(update.token_id)
    return got


def continued(tuner: ProxyTuner, prompt: str, head: list[int], role: str) -> list[int]:
    """What ``role`` alone generates after ``prompt`` and the tokens ``head``."""
    ids = tuner.base.prompt.render(prompt, tuner.tokenizer) + head
    alone = tuner.alone(role)
    out = alone.generate(TokenIds(ids, prompt), max_new_tokens=N - len(head), ignore_eos=True)
    return head + out[0].token_ids


@pytest.mark.parametrize("mode", ["nan", "raise"])
def test_a_failing_pair_falls_back_to_the_base_and_others_never_notice(tuner, mode):
    served = two_pairs(tuner, "expert", mode)
    ok = healthy(tuner)
    batch = ContinuousBatch(served)
    cfg = served.config(max_new_tokens=N, ignore_eos=True)
    falls = batch.prepare([PROMPTS[0]], cfg, active_pairs=[1])
    falls.fallback = "base"
    fails = batch.prepare([PROMPTS[1]], cfg, active_pairs=[1])  # policy "fail"
    others = [batch.prepare([p], cfg, active_pairs=[0]) for p in PROMPTS]
    plain = batch.prepare([PROMPTS[2]], cfg, active_pairs=[])
    got = run(batch, [falls, fails, *others, plain])
    for job, prompt in zip(others, PROMPTS, strict=True):  # pair 0 and the base alone: as ever
        assert got[id(job)] == ok.generate(prompt, max_new_tokens=N, ignore_eos=True)[0].token_ids
    assert got[id(plain)] == ok.alone("base").generate(
        PROMPTS[2], max_new_tokens=N, ignore_eos=True
    )[0].token_ids
    assert falls.error is None and falls.fell_back is not None
    assert falls.fell_back.to == "base" and falls.fell_back.step == K
    assert falls.fell_back.reason == ("non_finite" if mode == "nan" else "error")
    steered = ok.generate(PROMPTS[0], max_new_tokens=K, ignore_eos=True)[0].token_ids
    assert got[id(falls)] == continued(ok, PROMPTS[0], steered, "base")
    assert fails.error is not None and fails.fell_back is None
    assert len(got[id(fails)]) == K


def test_the_expert_policy_finishes_on_the_expert_when_the_anti_expert_fails(tuner):
    served = two_pairs(tuner, "anti")
    ok = healthy(tuner)
    batch = ContinuousBatch(served)
    job = batch.prepare([PROMPTS[0]], served.config(max_new_tokens=N, ignore_eos=True), None, [1])
    job.fallback = "expert"
    got = run(batch, [job])
    assert job.fell_back is not None and job.fell_back.to == "expert"
    steered = ok.generate(PROMPTS[0], max_new_tokens=K, ignore_eos=True)[0].token_ids
    assert got[id(job)] == continued(ok, PROMPTS[0], steered, "expert[0]")


def test_the_expert_policy_uses_the_base_when_the_expert_itself_fails(tuner):
    served = two_pairs(tuner, "expert")
    batch = ContinuousBatch(served)
    job = batch.prepare([PROMPTS[0]], served.config(max_new_tokens=N, ignore_eos=True), None, [1])
    job.fallback = "expert"
    run(batch, [job])
    assert job.fell_back is not None and job.fell_back.to == "base"


def test_the_server_says_a_request_fell_back_and_counts_it(tuner):
    pytest.importorskip("fastapi")
    import httpx
    from serving import serve_in_thread

    from proxytune.server import ServerSettings, create_app

    served = two_pairs(tuner, "expert")
    settings = ServerSettings(model_name="m", fallback="base")
    body = {"prompt": PROMPTS[0], "max_tokens": N, "ignore_eos": True, "active_pairs": [1]}
    with serve_in_thread(create_app(served, settings)) as url:
        post = lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=60)  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(post, [body, {**body, "active_pairs": [0]}]))
        assert [a.status_code for a in answers] == [200, 200]
        fell, fine = (a.json() for a in answers)
        assert fell["proxytune"]["fell_back"] == "base"
        assert fell["proxytune"]["reason"] == "non_finite"
        assert "NaN" in fell["proxytune"]["detail"]
        assert fell["choices"][0]["finish_reason"] == "length"
        assert "proxytune" not in fine
        served.pairs[1].expert.model.advances = 0
        failed = post({**body, "fallback": "fail"})
        assert failed.status_code == 500 and "NaN" in failed.json()["error"]["message"]
        served.pairs[1].expert.model.advances = 0
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
        assert '"fell_back":"base"' in lines[-1]
        assert post({**body, "fallback": "sideways"}).status_code == 400
        metrics = httpx.get(f"{url}/metrics").text
    assert 'proxytune_fallbacks_total{reason="non_finite",to="base"} 2' in metrics


def test_a_request_on_an_api_base_that_stops_answering_finishes_on_the_expert():
    from test_api_backend import FakeVLLM, mock_tuner, pair_of

    from proxytune.backends.hf import HFModel
    from proxytune.engine.serial import EngineLoop
    from proxytune.testing import build_model, build_tokenizer

    tok = build_tokenizer(300)
    models = {n: HFModel(build_model(tok, seed=s), tok, name=n) for n, s in
              (("base", 0), ("expert", 1), ("anti", 2))}  # fmt: skip

    class StopsAnswering(FakeVLLM):
        def __call__(self, request):
            if len(self.bodies) >= K:
                self.fail = 1
            return super().__call__(request)

    spec = {"top_logprobs": 5, "chunk": 1, "max_retries": 0}
    healthy_api = mock_tuner(models, tok, FakeVLLM(models["base"], tok), **spec)
    want = healthy_api.generate(PROMPTS[0], max_new_tokens=N, ignore_eos=True)[0].token_ids
    served = mock_tuner(models, tok, StopsAnswering(models["base"], tok), **spec)
    loop = EngineLoop(served)
    cfg = served.config(max_new_tokens=N, ignore_eos=True)
    job, failing = loop.prepare([PROMPTS[0]], cfg), loop.prepare([PROMPTS[1]], cfg)
    job.fallback = "expert"
    got: list[int] = []
    first = [job, failing]
    while first or loop.live_rows:
        for j, update in loop.step(first):
            if j is job:
                got.append(update.token_id)
        first = []
    assert failing.error is not None and "failed" in str(failing.error)
    fell = job.fell_back
    assert job.error is None and fell is not None and fell.to == "expert" and fell.reason == "error"
    assert 0 < fell.step < N and len(got) == N
    assert got[: fell.step] == want[: fell.step]
    expert_ids = job.prepared.rendered["expert[0]"][0] + got[: fell.step]
    alone = ProxyTuner(Member("base", models["expert"], RAW))
    rest = alone.generate(TokenIds(expert_ids, "x"), max_new_tokens=N - fell.step, ignore_eos=True)
    assert got[fell.step :] == rest[0].token_ids
    assert pair_of(models).expert.prompt.label == "chat"  # the expert read its own rendering


def test_a_fallback_policy_is_one_of_three():
    from proxytune.errors import ConfigError
    from proxytune.server import ServerSettings

    with pytest.raises(ConfigError, match="fallback must be one of"):
        ServerSettings(fallback="sideways")
