"""Continuous batching (``engine.continuous``/``server.scheduler``) on tiny models, no HTTP.

The property everything rests on: a request's tokens do not depend on which other requests
share its batch, or on when it joined.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.arithmetic import steering_kl
from proxytune.engine.continuous import ContinuousBatch
from proxytune.engine.controls import MAX_ABS_ALPHA, request_alphas
from proxytune.engine.requests import member_key
from proxytune.errors import ConfigError, NumericalError
from proxytune.schedules import Linear
from proxytune.server.scheduler import Finished, Scheduler, ShuttingDown

PROMPTS = ["The quick brown fox", "def add(a, b):", "Rain falls on", "Once upon a time there was"]
CHAT = [{"role": "user", "content": "What is two plus three?"}]


def run(batch: ContinuousBatch, arrivals: dict[int, list]) -> dict[int, list]:
    """Step ``batch``, admitting ``arrivals[step]`` before step ``step``; updates per job."""
    out: dict[int, list] = {}
    pending = dict(arrivals)
    step = 0
    while pending or batch.live_rows:
        for job, update in batch.step(pending.pop(step, [])):
            out.setdefault(id(job), []).append(update)
        step += 1
    return out


def rows_of(updates: list) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for u in updates:
        rows.setdefault(u.row, []).append(u.token_id)
    return rows


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_joining_between_steps_each_equal_the_request_alone(tuner, overlap, monkeypatch):
    """Also with the roles' forwards overlapped (``options.overlap``): the same tokens."""
    batch = ContinuousBatch(tuner.with_options(overlap=overlap))
    cases = [  # (prompt, alpha, active pairs, settings)
        (PROMPTS[0], None, None, {"max_new_tokens": 12}),
        (PROMPTS[1], 0.5, None, {"max_new_tokens": 9, "ignore_eos": True}),
        (PROMPTS[2], None, [], {"max_new_tokens": 14}),
        (CHAT, 1.5, None, {"max_new_tokens": 10, "stop": ("e",)}),
        (PROMPTS[3], 0.0, None, {"max_new_tokens": 11, "ignore_eos": True}),
        (PROMPTS[0], {"schedule": "linear", "start": 0, "end": 2, "steps": 5}, None, {}),
    ]
    jobs, want = [], []
    for prompt, alpha, active, settings in cases:
        settings = {"max_new_tokens": 8, **settings}
        jobs.append(batch.prepare([prompt], tuner.config(**settings), alpha, active))
        alone = tuner.alone("base") if active == [] else tuner
        alone_alpha = None if active == [] else alpha
        if isinstance(alpha, dict):
            alone_alpha = Linear(0.0, 2.0, 5)
        want.append(alone.generate(prompt, alpha=alone_alpha, overlap=False, **settings)[0])
    got = run(batch, {0: jobs[:2], 3: jobs[2:4], 4: [jobs[4]], 7: [jobs[5]]})
    for job, ref in zip(jobs, want, strict=True):
        updates = got[id(job)]
        assert [u.token_id for u in updates] == ref.token_ids
        assert "".join(u.delta for u in updates) == ref.text
        assert updates[-1].finish_reason == ref.finish_reason
        assert updates[-1].stop_reason == ref.stop_reason


def test_pairs_that_are_off_never_run(tuner):
    batch = ContinuousBatch(tuner)
    job = batch.prepare(PROMPTS[:2], tuner.config(max_new_tokens=3), 0.0)
    assert set(job.rendered) == {"base"}
    batch.step([job])
    assert len(batch.slots[member_key(tuner.base)].rows) == 2
    assert member_key(tuner.pairs[0].expert) not in batch.slots


def test_each_request_runs_its_own_rule_in_a_shared_batch(tuner):
    batch = ContinuousBatch(tuner)
    settings = {"max_new_tokens": 10, "ignore_eos": True}
    specs = [None, {"name": "plausible", "tau": 0.2}, {"name": "rerank", "k": 3}, "base"]
    jobs = [
        batch.prepare([PROMPTS[i]], tuner.config(**settings), rule=spec)
        for i, spec in enumerate(specs)
    ]
    got = run(batch, {0: jobs[:2], 2: jobs[2:]})
    for i, (job, spec) in enumerate(zip(jobs, specs, strict=True)):
        want = tuner.generate(PROMPTS[i], rule=spec, **settings)[0]
        assert [u.token_id for u in got[id(job)]] == want.token_ids, spec
    assert set(jobs[3].rendered) == {"base"}  # rule 'base' reads no pair model


def test_request_rules_are_checked_and_model_loading_rules_refused(tuner):
    batch = ContinuousBatch(tuner)
    cfg = tuner.config(max_new_tokens=2)
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        batch.prepare(["x"], cfg, rule="nope")
    with pytest.raises(ConfigError, match=r"rule.tau must be"):
        batch.prepare(["x"], cfg, rule={"name": "plausible", "tau": 2})
    with pytest.raises(ConfigError, match=r"\['args'\] loads a model"):
        nested = {"name": "plausible", "inner": {"name": "args", "model": "/etc"}}
        batch.prepare(["x"], cfg, rule=nested)
    with pytest.raises(ConfigError, match="rule must be a rule name"):
        batch.prepare(["x"], cfg, rule=5)


def test_mixed_sampling_settings_in_one_batch_equal_each_alone(tuner):
    batch = ContinuousBatch(tuner)
    settings = [
        {"temperature": 0.8, "seed": 1, "n": 2},
        {"temperature": 1.0, "top_k": 5, "seed": 2},
        {"temperature": 0.7, "top_p": 0.8, "min_p": 0.05, "seed": 3},
        {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.3},
        {"logprobs": True, "top_logprobs": 3},
    ]
    jobs, want = [], []
    for i, s in enumerate(settings):
        s = {"max_new_tokens": 10, "ignore_eos": True, **s}
        jobs.append(batch.prepare([PROMPTS[i % 4]], tuner.config(**s)))
        want.append(tuner.generate(PROMPTS[i % 4], **s))
    got = run(batch, {0: jobs[:3], 2: jobs[3:]})
    for job, ref in zip(jobs, want, strict=True):
        rows = rows_of(got[id(job)])
        assert [rows[i] for i in sorted(rows)] == [r.token_ids for r in ref]
    records = [u.logprob for u in got[id(jobs[-1])]]
    for mine, theirs in zip(records, want[-1][0].logprobs, strict=True):
        assert mine.token_id == theirs.token_id
        assert [t[0] for t in mine.top] == [t[0] for t in theirs.top]
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5)


def test_extend_and_compact_keep_each_rows_logits(tuner):
    lm = tuner.base.model
    a, b = [[5, 6, 7, 8, 9, 10]], [[11, 12], [13, 14, 15]]
    s_ab, _ = lm.start(a)
    s_b, _ = lm.start(b)
    assert s_ab.can_extend
    s_ab.extend(s_b)
    assert s_ab.ids.shape == (3, 6)
    ref_a, _ = lm.start(a)
    ref_b, _ = lm.start(b)
    step = torch.tensor([[20], [21], [22]])
    merged = s_ab.advance(step)[:, -1]
    torch.testing.assert_close(merged[:1], ref_a.advance(step[:1])[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged[1:], ref_b.advance(step[1:])[:, -1], atol=1e-5, rtol=0)
    s_ab.keep(torch.tensor([1, 2]))  # the long row leaves: its padding columns can go
    s_ab.compact()
    assert s_ab.ids.shape == (2, 4)
    assert s_ab.cache.layers[0].keys.shape[-2] == 4
    step = torch.tensor([[23], [24]])
    torch.testing.assert_close(
        s_ab.advance(step)[:, -1], ref_b.advance(step)[:, -1], atol=1e-5, rtol=0
    )


def test_cancelled_requests_leave_the_batch_at_the_next_step(tuner):
    batch = ContinuousBatch(tuner)
    cfg = tuner.config(max_new_tokens=20, ignore_eos=True)
    keep, drop = batch.prepare([PROMPTS[0]], cfg), batch.prepare([PROMPTS[1]], cfg)
    batch.step([keep, drop])
    drop.cancel()
    updates = batch.step()
    assert [job for job, _ in updates] == [keep]
    assert all(len(s.rows) == 1 for s in batch.slots.values())


def test_a_failing_combination_fails_its_own_request_only(tuner):
    def combine(ctx):
        if ctx.alphas and ctx.alphas[0] == 7.0:
            return torch.full_like(ctx.base, math.nan)
        from proxytune.arithmetic import combine_proxy

        return combine_proxy(ctx.base, *ctx.ran())

    broken = ProxyTuner(tuner.base, tuner.pairs, tuner.defaults, rule=combine)
    batch = ContinuousBatch(broken)
    cfg = tuner.config(max_new_tokens=6)
    good, bad = batch.prepare([PROMPTS[0]], cfg), batch.prepare([PROMPTS[1]], cfg, 7.0)
    got = run(batch, {0: [good, bad]})
    assert isinstance(bad.error, NumericalError) and id(bad) not in got
    assert [u.token_id for u in got[id(good)]] == tuner.generate(
        PROMPTS[0], **{"max_new_tokens": 6}
    )[0].token_ids


def test_steering_kl_by_hand():
    base = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]]))
    steered = torch.log(torch.tensor([[0.25, 0.5, 0.25], [1.0, 0.0, 0.0]]))
    want = [0.25 * math.log(0.5) + 0.5 * math.log(2.0), math.log(2.0)]
    assert steering_kl(steered, base).tolist() == pytest.approx(want, abs=1e-6)
    assert steering_kl(base + 3.0, base).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_request_alphas_validation(tuner):
    pairs = tuner.pairs
    schedules, active = request_alphas(pairs, 0.5, active_pairs=[])
    assert active == [False] and schedules[0](0) == 0.0  # switched off: alpha 0, never run
    schedules, active = request_alphas(pairs, [0.5])
    assert active == [True] and schedules[0](3) == 0.5
    with pytest.raises(ConfigError, match=r"alpha\[0\] must be a number"):
        request_alphas(pairs, ["x"])
    with pytest.raises(ConfigError, match="2 values given for 1 pair"):
        request_alphas(pairs, [1, 2])
    with pytest.raises(ConfigError, match=f"between -{MAX_ABS_ALPHA:g} and"):
        request_alphas(pairs, 1e9)
    with pytest.raises(ConfigError, match="finite"):
        request_alphas(pairs, math.inf)
    with pytest.raises(ConfigError, match="active_pairs: 1 is not a pair index"):
        request_alphas(pairs, None, active_pairs=[1])
    with pytest.raises(ConfigError, match="no expert/anti-expert pair"):
        request_alphas([], 1.0)


def test_scheduler_shutdown_cancels_leftover_work(tuner):
    scheduler = Scheduler(tuner, max_batch_size=4, max_queue=4)
    scheduler.start()
    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    job = scheduler.batch.prepare([PROMPTS[0]], tuner.config(max_new_tokens=240, ignore_eos=True))
    scheduler.submit(job, sink)
    scheduler.close(timeout=0.0)
    assert done.wait(5)
    assert isinstance(events[-1].error, ShuttingDown)
    assert not scheduler.alive
    with pytest.raises(ShuttingDown):
        scheduler.submit(job, sink)


def test_a_failed_step_fails_the_running_requests_and_the_worker_keeps_serving(tuner):
    scheduler = Scheduler(tuner, max_batch_size=4, max_queue=4)
    real, calls = scheduler.batch.step, []

    def flaky(jobs=()):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(jobs)

    scheduler.batch.step = flaky
    scheduler.start()
    try:
        for want_error in (True, False):
            events, done = [], threading.Event()

            def sink(event, events=events, done=done):
                events.append(event)
                if isinstance(event, Finished):
                    done.set()

            cfg = tuner.config(max_new_tokens=5, ignore_eos=True)
            scheduler.submit(scheduler.batch.prepare([PROMPTS[0]], cfg), sink)
            assert done.wait(10)
            error = events[-1].error
            assert (isinstance(error, RuntimeError) and "boom" in str(error)) == want_error
            assert scheduler.alive and scheduler.running == 0
        assert scheduler.metrics.failures.get() == 1
    finally:
        scheduler.close()


@pytest.mark.parametrize("how", ["says so", "fails to merge"])
def test_models_whose_caches_cannot_merge_take_new_requests_once_the_batch_drains(
    tuner, monkeypatch, how
):
    from proxytune.backends.hf import HFDecodeState

    if how == "says so":
        monkeypatch.setattr(HFDecodeState, "can_extend", property(lambda self: False))
    else:  # the merge itself fails (one model of several): undone, the request waits
        real = HFDecodeState.extend

        def extend(self, other):
            if self.lm is tuner.pairs[0].expert.model:
                raise NotImplementedError("no merging here")
            real(self, other)

        monkeypatch.setattr(HFDecodeState, "extend", extend)
    scheduler = Scheduler(tuner, max_batch_size=8, max_queue=8)
    order: list[str] = []
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    finished = {name: threading.Event() for name in "ab"}
    started = threading.Event()

    def sink_of(name):
        def sink(event):
            if isinstance(event, Finished):
                assert event.error is None
                order.append(f"{name} done")
                finished[name].set()
                return
            tokens[name] += [u.token_id for u in event]
            if f"{name} first" not in order:
                order.append(f"{name} first")
                started.set()

        return sink

    scheduler.start()
    settings = {"max_new_tokens": 30, "ignore_eos": True}
    try:
        cfg = tuner.config(**settings)
        scheduler.submit(scheduler.batch.prepare([PROMPTS[0]], cfg), sink_of("a"))
        assert started.wait(20)  # a is decoding: b cannot join its batch
        scheduler.submit(scheduler.batch.prepare([PROMPTS[1]], cfg), sink_of("b"))
        assert finished["a"].wait(20) and finished["b"].wait(20)
    finally:
        scheduler.close()
    assert order == ["a first", "a done", "b first", "b done"]
    for name, prompt in zip("ab", PROMPTS, strict=False):
        assert tokens[name] == tuner.generate(prompt, **settings)[0].token_ids


def test_one_pass_lora_pairs_batch_continuously_too(tiny_dirs, tmp_path):
    """Expert = a LoRA adapter on the anti-expert's model, both roles in one forward pass
    (``backends/lora_pair.py``): requests still join between steps and match running alone."""
    from proxytune import ModelSpec
    from proxytune.testing import save_tiny_lora

    save_tiny_lora(tiny_dirs["anti"], tmp_path / "adapter", seed=7)
    cpu = {"device": "cpu", "dtype": "float32"}
    one_pass = ProxyTuner.from_specs(
        ModelSpec(str(tiny_dirs["base"]), **cpu),
        [
            (
                ModelSpec(str(tiny_dirs["anti"]), adapter=str(tmp_path / "adapter"), **cpu),
                ModelSpec(str(tiny_dirs["anti"]), **cpu),
                1.5,
            )
        ],
    )
    assert type(one_pass.pairs[0].expert.model).__name__ == "LoraView"
    batch = ContinuousBatch(one_pass)
    settings = {"max_new_tokens": 10, "ignore_eos": True}
    cases = [(PROMPTS[0], None), (PROMPTS[1], []), (PROMPTS[2], None), (PROMPTS[3], None)]
    jobs = [batch.prepare([p], one_pass.config(**settings), None, a) for p, a in cases]
    got = run(batch, {0: jobs[:2], 3: jobs[2:]})
    for job, (prompt, active) in zip(jobs, cases, strict=True):
        alone = one_pass.alone("base") if active == [] else one_pass
        want = alone.generate(prompt, **settings)[0].token_ids
        assert [u.token_id for u in got[id(job)]] == want


def test_a_request_whose_scores_cannot_be_sampled_fails_alone(tuner):
    """Sampling (``_choose``) and records, not only scoring, fail one request only: the rows
    that shared its sampling group keep their seeded samples (each generator rewound)."""

    def combine(ctx):
        from proxytune.arithmetic import combine_proxy

        scores = combine_proxy(ctx.base, *ctx.ran())
        if ctx.alphas and ctx.alphas[0] == 7.0:  # passes the scorer's checks, breaks sampling
            scores = scores.clone()
            scores[:, 3] = math.inf
        return scores

    broken = ProxyTuner(tuner.base, tuner.pairs, tuner.defaults, rule=combine)
    batch = ContinuousBatch(broken)
    s = {"max_new_tokens": 6, "temperature": 0.8, "ignore_eos": True}
    goods = [batch.prepare([PROMPTS[i]], tuner.config(seed=i, **s)) for i in (0, 2)]
    bad = batch.prepare([PROMPTS[1]], tuner.config(seed=1, logprobs=True, **s), 7.0)
    greedy = batch.prepare([PROMPTS[3]], tuner.config(max_new_tokens=5, logprobs=True))
    got = run(batch, {0: [goods[0], bad, goods[1], greedy]})
    assert isinstance(bad.error, NumericalError) and id(bad) not in got
    assert "sampling failed" in str(bad.error)
    for i, job in zip((0, 2), goods, strict=True):
        want = tuner.generate(PROMPTS[i], seed=i, **s)[0].token_ids
        assert [u.token_id for u in got[id(job)]] == want
    want = tuner.generate(PROMPTS[3], max_new_tokens=5)[0].token_ids
    assert [u.token_id for u in got[id(greedy)]] == want


def test_a_request_whose_logprob_records_fail_fails_alone(tuner, monkeypatch):
    """Records of one ``top_logprobs`` group are made for the whole group; where that raises
    they are made request by request, and only the request at fault fails."""
    import proxytune.engine.continuous as continuous

    def combine(ctx):
        from proxytune.arithmetic import combine_proxy

        scores = combine_proxy(ctx.base, *ctx.ran())
        if ctx.alphas and ctx.alphas[0] == 7.0:  # a finite mark the records below refuse
            scores = scores.clone()
            scores[:, 4] = 123.0
        return scores

    made = continuous.logprob_records

    def records(scores, chosen, k, tokenizer):
        if bool((scores[:, 4] == 123.0).any()):
            raise RuntimeError("records refused")
        return made(scores, chosen, k, tokenizer)

    monkeypatch.setattr(continuous, "logprob_records", records)
    batch = ContinuousBatch(ProxyTuner(tuner.base, tuner.pairs, tuner.defaults, rule=combine))
    s = {"max_new_tokens": 4, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    good = batch.prepare([PROMPTS[0]], tuner.config(**s))
    bad = batch.prepare([PROMPTS[1]], tuner.config(**s), 7.0)
    got = run(batch, {0: [good, bad]})
    assert isinstance(bad.error, RuntimeError) and id(bad) not in got
    want = tuner.generate(PROMPTS[0], **s)[0]
    assert [u.token_id for u in got[id(good)]] == want.token_ids
    assert all(u.logprob is not None and len(u.logprob.top) == 2 for u in got[id(good)])


@pytest.mark.parametrize(
    ("settings", "rule", "says"),
    [
        ({"temperature": 1e-39}, None, r"temperature must be 0 \(greedy\) or at least"),
        ({}, {"name": "tokens", "bias": {"5": 1.7e308}}, "bias"),
        ({}, {"name": "tokens", "bias_strings": {"x": -1e300}}, "bias_strings"),
    ],
)
def test_settings_that_overflow_sampling_are_refused_at_admission(tuner, settings, rule, says):
    batch = ContinuousBatch(tuner)
    with pytest.raises(ConfigError, match=says):
        batch.prepare([PROMPTS[0]], tuner.config(max_new_tokens=2, **settings), rule=rule)


@pytest.mark.parametrize("continuous", [True, False])
def test_a_job_cancelled_right_after_a_step_never_stays_running(tuner, continuous):
    """The cancel race of a client that gives up (issue 16, item 7): a cancel that lands after
    a step's dispatch looked at the job left the worker idle with the job still counted in
    ``running`` (and a shutdown waiting its full timeout). Forced here at that exact point."""
    scheduler = Scheduler(tuner, max_batch_size=4, max_queue=4, continuous=continuous)
    real, cancelled = scheduler._dispatch, threading.Event()

    def dispatch(updates):
        real(updates)
        if updates and not cancelled.is_set():  # the client goes away now
            cancelled.set()
            scheduler.cancel(updates[0][0])

    scheduler._dispatch = dispatch
    scheduler.start()
    try:
        cfg = tuner.config(max_new_tokens=50, ignore_eos=True)
        events = []
        scheduler.submit(scheduler.batch.prepare([PROMPTS[0]], cfg), events.append)
        assert cancelled.wait(10)
        deadline = time.monotonic() + 5
        while scheduler.running:
            assert time.monotonic() < deadline, "the cancelled job stayed in running"
            time.sleep(0.005)
        assert not any(isinstance(e, Finished) for e in events)  # cancelled: no more events
        started = time.monotonic()
        scheduler.close(timeout=10)
        assert time.monotonic() - started < 5  # nothing left to wait for
    finally:
        scheduler.close(timeout=0)


def nested(depth: int) -> dict:
    spec: dict = {"name": "plausible"}
    for _ in range(depth - 1):
        spec = {"name": "plausible", "inner": spec}
    return spec


@pytest.mark.parametrize("depth", [17, 50, 300, 10_000])
def test_deeply_nested_request_rules_are_refused_at_admission(tuner, depth):
    """Issue 16, item 1: depth 50 stalled the worker, 300 gave a RecursionError (a 500)."""
    batch = ContinuousBatch(tuner)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^rule is nested more than 16 levels deep"):
        batch.prepare([PROMPTS[0]], tuner.config(max_new_tokens=2), rule=nested(depth))
    assert time.monotonic() - started < 1


def test_oversized_request_rules_are_refused_at_admission(tuner):
    big = {"name": "tokens", "bias": {str(i): 1.0 for i in range(3000)}}
    with pytest.raises(ConfigError, match=r"^rule holds more than 2000 keys and values"):
        ContinuousBatch(tuner).prepare([PROMPTS[0]], tuner.config(), rule=big)


def test_the_deepest_allowed_rule_prints_and_steps_cheaply(tuner):
    """Printing a rule (``str``, ``to_spec``) is linear in its depth and done once, not
    2^depth at every step: a request with the deepest rule allowed costs about what a plain one
    costs."""
    from proxytune.rules import make_rule

    rule = make_rule(nested(16))
    started = time.monotonic()
    text, spec = str(rule), rule.to_spec()
    assert time.monotonic() - started < 0.5
    assert text.count("plausible(") == 15 and spec["inner"]["name"] == "plausible"
    spec["inner"]["name"] = "changed"  # a copy: the rule's own spec is untouched
    assert rule.to_spec()["inner"]["name"] == "plausible" and make_rule(rule.to_spec()) == rule
    batch = ContinuousBatch(tuner)
    cfg = tuner.config(max_new_tokens=8, ignore_eos=True)
    deep = batch.prepare([PROMPTS[0]], cfg, rule=nested(16))
    plain = batch.prepare([PROMPTS[0]], cfg, rule="plausible")
    started = time.monotonic()
    got = run(batch, {0: [deep, plain]})
    assert time.monotonic() - started < 10
    assert [u.token_id for u in got[id(deep)]] == [u.token_id for u in got[id(plain)]]
