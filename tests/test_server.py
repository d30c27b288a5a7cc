"""The OpenAI-compatible server, end to end: a real uvicorn on a loopback port, tiny models,
the official ``openai`` client (the issue's "must hold" list)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from serving import serve_in_thread  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.errors import ConfigError  # noqa: E402
from proxytune.schedules import Linear  # noqa: E402
from proxytune.server import ServerSettings, create_app  # noqa: E402

MODEL = "tiny"
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Rain falls on the quiet town",
    "Once upon a time there was",
    "Numbers: 0 1 2",
    "Question: what is two plus three? Answer:",
    "Lists, loops and functions",
    "Proxy tuning steers",
]


@pytest.fixture(scope="module")
def url(tuner) -> Iterator[str]:
    with serve_in_thread(
        create_app(tuner, ServerSettings(model_name=MODEL, max_batch_size=32))
    ) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    """One sample of /metrics (``name`` with its labels, exactly as printed)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def stream_text(client, model_: str = MODEL, **kwargs) -> tuple[str, str | None]:
    """Text and finish reason of one streamed chat or completion."""
    chat = "messages" in kwargs
    create = client.chat.completions.create if chat else client.completions.create
    text, finish = [], None
    for chunk in create(model=model_, stream=True, **kwargs):
        for c in chunk.choices:
            text.append((c.delta.content if chat else c.text) or "")
            finish = c.finish_reason or finish
    return "".join(text), finish


# the basics -------------------------------------------------------------------------------------


def test_models_health_and_metrics(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/v1/models/{MODEL}").json()["pairs"] == 1
    missing = httpx.get(f"{url}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    prom = httpx.get(f"{url}/metrics")
    assert prom.headers["content-type"].startswith("text/plain")
    for name in (
        "proxytune_requests_total",
        "proxytune_generation_tokens_total",
        "proxytune_request_duration_seconds",
        "proxytune_queue_depth",
        "proxytune_steering_kl_nats_mean",
    ):
        assert f"# TYPE {name} " in prom.text


def test_completions_equal_the_engine(client, tuner):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12)
    ref = tuner.generate(PROMPTS[0], max_new_tokens=12)[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == ref.completion_tokens
    # several prompts x n samples, seeded: the engine's rows, in the same order
    settings = {"n": 2, "temperature": 0.9, "seed": 11}
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1:3], max_tokens=8, **settings)
    ref = tuner.generate(PROMPTS[1:3], max_new_tokens=8, **settings)
    assert [c.text for c in r.choices] == [x.text for x in ref]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]


def test_chat_streaming_equals_non_streaming_and_the_engine(client, tuner, url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    streamed, finish = stream_text(client, messages=messages, max_tokens=10)
    ref = tuner.generate([messages], max_new_tokens=10)[0]
    assert whole.choices[0].message.content == streamed == ref.text
    assert whole.choices[0].finish_reason == finish == ref.finish_reason
    # the raw stream: data lines only, usage last when asked for, then [DONE]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == ref.completion_tokens
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_logprobs_are_those_of_the_combined_distribution(client, tuner):
    ref = tuner.generate(PROMPTS[0], max_new_tokens=6, logprobs=True, top_logprobs=3)[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-5)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value and 1 <= len(top) <= 4  # 3 alternatives and the chosen one
    assert "".join(lp.tokens) == ref.text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ref = tuner.generate([[{"role": "user", "content": PROMPTS[0]}]], max_new_tokens=6,
                         logprobs=True, top_logprobs=3)[0]  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [f"token_id:{i}" for i in ref.token_ids]
    assert [[t.token for t in c.top_logprobs] for c in content] == [
        [f"token_id:{i}" for i, _, _ in t.top] for t in ref.logprobs
    ]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in ref.logprobs], 1e-5)
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == ref.text


def test_alpha_and_active_pairs_through_extra_body(client, tuner):
    def text(**extra):
        r = client.completions.create(
            model=MODEL, prompt=PROMPTS[2], max_tokens=10, extra_body=extra
        )
        return r.choices[0].text

    def engine(t, **kw):
        return t.generate(PROMPTS[2], max_new_tokens=10, **kw)[0].text

    plain = engine(tuner.alone("base"))
    assert text(alpha=0) == text(active_pairs=[]) == plain
    assert text(alpha=0.5) == text(alpha=[0.5]) == engine(tuner, alpha=0.5) != plain
    schedule = {"schedule": "linear", "start": 0.0, "end": 2.0, "steps": 4}
    assert text(alpha=schedule) == engine(tuner, alpha=Linear(0.0, 2.0, 4))
    assert text() == engine(tuner)  # the recipe's default alpha (1.0)


def test_rules_per_request_and_per_server(client, tuner):
    spec = {"name": "plausible", "tau": 0.2}
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[4], max_tokens=10, extra_body={"rule": spec}
    )
    assert r.choices[0].text == tuner.generate(PROMPTS[4], max_new_tokens=10, rule=spec)[0].text
    reranked = tuner.with_rule({"name": "rerank", "k": 2})  # e.g. a recipe's rule
    with serve_in_thread(create_app(reranked, ServerSettings(model_name=MODEL))) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        assert httpx.get(f"{u}/v1/models/{MODEL}").json()["rule"] == "rerank(k=2)"
        r = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=10)
        assert r.choices[0].text == reranked.generate(PROMPTS[4], max_new_tokens=10)[0].text


# concurrency ------------------------------------------------------------------------------------


def test_16_concurrent_streaming_greedy_requests_each_equal_the_request_alone(client, url):
    requests = []
    for i in range(16):
        kwargs = {
            "max_tokens": 6 + (i * 5) % 17,
            "extra_body": {"alpha": [None, 0, 0.5, 1.5][i % 4]},
        }
        if kwargs["extra_body"]["alpha"] is None:
            del kwargs["extra_body"]
        if i % 3 == 0:
            kwargs["messages"] = [{"role": "user", "content": PROMPTS[i % 8]}]
        else:
            kwargs["prompt"] = PROMPTS[i % 8]
        if i % 5 == 0:
            kwargs["stop"] = ["e"]
        requests.append(kwargs)
    alone = [stream_text(client, **kw) for kw in requests]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

        async def one(i, kwargs):
            await asyncio.sleep(0.004 * i)  # staggered: later requests join a running batch
            chat = "messages" in kwargs
            create = aclient.chat.completions.create if chat else aclient.completions.create
            text, finish = [], None
            async for chunk in await create(model=MODEL, stream=True, **kwargs):
                for c in chunk.choices:
                    text.append((c.delta.content if chat else c.text) or "")
                    finish = c.finish_reason or finish
            return "".join(text), finish

        try:
            return await asyncio.gather(*(one(i, kw) for i, kw in enumerate(requests)))
        finally:
            await aclient.close()

    single = metric(url, 'proxytune_batch_rows_bucket{le="1"}')
    steps = metric(url, "proxytune_batch_rows_count")
    assert asyncio.run(together()) == alone
    batched = (metric(url, "proxytune_batch_rows_count") - steps) - (
        metric(url, 'proxytune_batch_rows_bucket{le="1"}') - single
    )
    assert batched > 0  # some steps decoded several requests together


def test_seeded_sampling_is_reproducible_under_load(client, url):
    kwargs = {"prompt": PROMPTS[5], "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 2}
    first = [c.text for c in client.completions.create(model=MODEL, **kwargs).choices]
    assert first[0] != first[1]  # two samples, not one twice

    def busy():
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30)

    others = [threading.Thread(target=busy) for _ in range(3)]
    for t in others:
        t.start()
    again = [c.text for c in client.completions.create(model=MODEL, **kwargs).choices]
    for t in others:
        t.join()
    assert again == first


# bad input --------------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
HUGE_BIAS = {"name": "tokens", "bias": {"5": 1.7e308}}


REDOS = {"name": "context", "rules": [{"regex": "(a|aa)+$", "alpha": 1}]}  # backtracks
LINEAR_0_5 = {"schedule": "linear", "start": 0, "end": 5, "steps": 4}
PRODUCT_COLD = {"name": "product", "temperatures": {"expert": 1e-300}}
PROXY_COLD = {"name": "proxy", "temperatures": {"base": 1e-320}}
CONTEXT_HUGE = {"name": "context", "rules": [{"keyword": "x", "alpha": 1e300}]}


def deep_rule(depth: int) -> dict:
    spec: dict = {"name": "plausible"}
    for _ in range(depth - 1):
        spec = {"name": "plausible", "inner": spec}
    return spec


BAD = [  # (route, body, status, param, words in the message)
    (C, {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    (C, {"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    (C, {"prompt": "x", "temperature": 1e-39}, 400, "temperature", "at least 0.0001"),
    (C, {"prompt": "x", "rule": HUGE_BIAS}, 400, "rule.bias['5']", "1000000.0]"),
    (C, {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens", "context holds only"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "0 is allowed only with echo"),
    (CH, {"messages": USER, "max_completion_tokens": 999}, 400, "max_completion_tokens", "context"),
    (C, {"prompt": "word " * 300}, 400, "prompt", "context holds 256"),
    (CH, {"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages", "context"),
    (C, {"prompt": "x", "alpha": "strong"}, 400, "alpha", "must be a number"),
    (C, {"prompt": "x", "alpha": [1, 2]}, 400, "alpha", "2 values given for 1 pair"),
    (C, {"prompt": "x", "alpha": [None]}, 400, "alpha[0]", "must be a number"),
    (C, {"prompt": "x", "alpha": 1e9}, 400, "alpha", "between -100 and 100"),
    (C, {"prompt": "x", "rule": deep_rule(300)}, 400, "rule", "nested more than 16 levels"),
    (C, {"prompt": "a" * 40 + "!", "rule": REDOS}, 400, "rule", "took over 0.1s"),
    (C, {"prompt": "x", "active_pairs": [3]}, 400, "active_pairs", "not a pair index"),
    (C, {"prompt": "x", "rule": "nope"}, 400, "rule", "unknown rule 'nope'"),
    (C, {"prompt": "x", "rule": {"name": "plausible", "tau": 2}}, 400, "rule.tau", "[0.0, 1.0]"),
    (C, {"prompt": "x", "rule": {"name": "args", "model": "/etc"}}, 400, "rule", "loads a model"),
    (C, {"prompt": "x", "logprobs": 21}, 400, "logprobs", "limit of 20"),
    (CH, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
    (CH, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "requires logprobs"),
    (C, {"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    (C, {"prompt": "x", "n": 33}, 400, "n", "lower n"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    (C, {"prompt": [1, 2, 3]}, 400, "prompt", "the expert[0] reads 'chat' prompts"),
    (C, {"max_tokens": 3}, 400, "prompt", "required"),
    (C, {"prompt": "x", "echo": True}, 400, "echo", "the expert[0] reads 'chat' prompts"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    (CH, {"messages": []}, 400, "messages", "at least 1"),
    (CH, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "user"),
    (CH, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ""),
    (CH, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    (CH, {"messages": USER, "seed": 1.5}, 400, "seed", "valid integer"),
    # a rule's own bounds, asked before the request is queued (issue 28)
    (C, {"prompt": "x", "rule": "mixture", "alpha": 1.5}, 400, "alpha", "in [0, 1]"),
    (C, {"prompt": "x", "rule": "mixture", "alpha": -0.1}, 400, "alpha", "got -0.1"),
    (C, {"prompt": "x", "rule": "mixture", "alpha": LINEAR_0_5}, 400, "alpha", "got 0 to 5"),
    (C, {"prompt": "x", "rule": PRODUCT_COLD}, 400, "rule.temperatures['expert']", "[0.0001,"),
    (C, {"prompt": "x", "rule": PROXY_COLD}, 400, "rule.temperatures['base']", "[0.0001,"),
    (C, {"prompt": "x", "rule": CONTEXT_HUGE}, 400, "rule.rules[0].alpha", "[-100.0, 100.0]"),
]


@pytest.mark.parametrize(("route", "body", "status", "param", "words"), BAD)
def test_bad_input_gets_an_openai_error_naming_the_field(url, route, body, status, param, words):
    r = httpx.post(url + route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert error["type"] == ("invalid_request_error")


def test_malformed_requests_and_the_server_keeps_serving(url, client):
    nan = httpx.post(f"{url}{C}", content=b'{"prompt": "x", "alpha": NaN}')
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "alpha"
    inf = httpx.post(f"{url}{C}", content=b'{"prompt": "x", "repetition_penalty": Infinity}')
    assert inf.status_code == 400 and inf.json()["error"]["param"] == "repetition_penalty"
    assert "finite" in inf.json()["error"]["message"]
    for content in (b"{nope", b"[1, 2]", b"\xff"):
        r = httpx.post(f"{url}{C}", content=content)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    assert httpx.get(f"{url}{C}").status_code == 405
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text
    assert metric(url, "proxytune_generation_failures_total") == 0


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", extra_body={"alpha": "max"})
    assert err.value.body["param"] == "alpha"


# serving variants -------------------------------------------------------------------------------


def test_a_base_only_model_is_served_plainly(tiny_dirs):
    plain = ProxyTuner.from_pretrained(str(tiny_dirs["base"]), device="cpu", dtype="float32")
    with serve_in_thread(create_app(plain, ServerSettings(model_name="base"))) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="base", prompt=PROMPTS[3], max_tokens=8)
        assert r.choices[0].text == plain.generate(PROMPTS[3], max_new_tokens=8)[0].text
        with pytest.raises(openai.BadRequestError, match="no expert/anti-expert pair"):
            c.completions.create(model="base", prompt="x", extra_body={"alpha": 1})
        assert metric(u, "proxytune_steering_kl_nats_count") == 0


def test_engine_loop_mode_runs_each_request_on_the_tuners_own_loop(tuner):
    """The mode black-box tuners get (an API base, a pair of another tokenizer): requests
    interleave step by step on ``tuner.steps``; here forced on a local tuner."""
    cases = [
        ({"prompt": PROMPTS[0]}, {}),
        ({"prompt": PROMPTS[1], "extra_body": {"alpha": 0.5}}, {"alpha": 0.5}),
        ({"prompt": PROMPTS[2], "extra_body": {"active_pairs": []}}, {"alpha": 0.0}),
        ({"prompt": PROMPTS[3], "n": 2, "temperature": 1.0, "seed": 3}, {"n": 2,
         "temperature": 1.0, "seed": 3}),
        ({"prompt": PROMPTS[4], "extra_body": {"rule": "plausible"}}, {"rule": "plausible"}),
    ]  # fmt: skip
    app = create_app(tuner, ServerSettings(model_name=MODEL, continuous=False))
    assert type(app.state.scheduler.batch).__name__ == "EngineLoop"
    with serve_in_thread(app) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        got: dict[int, list[str]] = {}

        def ask(i, kwargs):
            r = c.completions.create(model=MODEL, max_tokens=12, **kwargs)
            got[i] = [choice.text for choice in r.choices]

        threads = [threading.Thread(target=ask, args=(i, kw)) for i, (kw, _) in enumerate(cases)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, (kwargs, engine) in enumerate(cases):
            want = tuner.generate(kwargs["prompt"], max_new_tokens=12, **engine)
            assert got[i] == [r.text for r in want], kwargs
        bad = httpx.post(f"{u}{C}", json={"prompt": "x", "rule": {"name": "args", "model": "m"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rule"
        assert metric(u, "proxytune_steering_kl_nats_count") == 0
        long = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up stops its work
            httpx.post(f"{u}{C}", json=long, timeout=0.3)
        deadline = time.monotonic() + 60  # generous: CI machines can be loaded
        while metric(u, "proxytune_requests_cancelled_total") < 1 or app.state.scheduler.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert metric(u, "proxytune_generation_tokens_total") < 12 * 6 + 200


def test_speculative_server_is_exact_and_reports_acceptance(tuner):
    """``speculative`` as a startup option: concurrent greedy requests (streamed or not) give
    the plain loop's text, seeded sampling gives what ``generate(speculative=...)`` gives, and
    /metrics counts the drafts."""

    app = create_app(tuner, ServerSettings(model_name=MODEL, speculative="auto"))
    assert type(app.state.scheduler.batch).__name__ == "EngineLoop"
    with serve_in_thread(app) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        got: dict[int, str] = {}

        def ask(i):
            if i % 2:
                chunks = c.completions.create(
                    model=MODEL, prompt=PROMPTS[i], max_tokens=14, stream=True
                )
                got[i] = "".join(ch.choices[0].text for ch in chunks)
            else:
                got[i] = (
                    c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=14)
                    .choices[0]
                    .text
                )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(4):
            assert got[i] == tuner.generate(PROMPTS[i], max_new_tokens=14)[0].text
        sampled = c.completions.create(
            model=MODEL, prompt=PROMPTS[5], max_tokens=10, temperature=0.8, seed=11
        )
        want = tuner.generate(
            PROMPTS[5], max_new_tokens=10, temperature=0.8, seed=11, speculative="auto"
        )
        assert sampled.choices[0].text == want[0].text
        proposed = metric(u, "proxytune_speculative_drafts_proposed_total")
        accepted = metric(u, "proxytune_speculative_drafts_accepted_total")
        assert proposed > 0 and 0 <= accepted <= proposed
    with pytest.raises(ConfigError, match="continuous batching"):
        create_app(tuner, ServerSettings(speculative=2, continuous=True))
    with pytest.raises(ConfigError, match="no pair"):
        create_app(tuner.alone("base"), ServerSettings(speculative=2))
    with pytest.raises(ConfigError, match="draft length"):
        create_app(tuner, ServerSettings(speculative="fast"))


def test_a_black_box_tuner_whose_base_is_this_server(tiny_dirs, monkeypatch):
    """proxytune as both ends: one server serves the base plainly (top-20 log-probs), a tuner
    steers it through that API with a local pair, and a second server serves the tuner."""
    if not hasattr(ProxyTuner, "from_api"):
        pytest.skip("no API-base backend in this tree")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    plain = ProxyTuner.from_pretrained(str(tiny_dirs["base"]), device="cpu", dtype="float32")
    with serve_in_thread(create_app(plain, ServerSettings(model_name="base"))) as base_url:
        steered = ProxyTuner.from_api(
            f"{base_url}/v1",
            "base",
            expert=str(tiny_dirs["expert"]),
            anti_expert=str(tiny_dirs["anti"]),
            device="cpu",
            dtype="float32",
            base_options={"tokenizer": str(tiny_dirs["base"])},
        )
        assert steered.blackbox
        app = create_app(steered, ServerSettings(model_name="steered"))
        assert type(app.state.scheduler.batch).__name__ == "EngineLoop"
        with serve_in_thread(app) as u:
            c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
            text, _ = stream_text(c, prompt=PROMPTS[0], max_tokens=8, model_="steered")
            assert text == steered.generate(PROMPTS[0], max_new_tokens=8)[0].text


def test_api_key_guards_everything_but_health(tuner):
    settings = ServerSettings(model_name=MODEL, api_key="sekret")
    with serve_in_thread(create_app(tuner, settings)) as u:
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            r = httpx.get(u + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{u}{C}", json={"prompt": "x"}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        assert httpx.get(f"{u}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{u}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def test_full_queue_answers_429_and_disconnects_cancel_work(tuner):
    settings = ServerSettings(model_name=MODEL, max_batch_size=1, max_queue=1)
    long = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}  # seconds of work
    app = create_app(tuner, settings)
    scheduler = app.state.scheduler
    with serve_in_thread(app) as u:
        with httpx.stream("POST", f"{u}{C}", json={**long, "stream": True}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # (a dropped iterator would close the response)
            next(lines)  # running: it holds the only batch slot
            waiting = threading.Thread(target=httpx.post, args=(f"{u}{C}",), kwargs={
                "json": {"prompt": "y", "max_tokens": 3}, "timeout": 60})  # fmt: skip
            waiting.start()
            deadline = time.monotonic() + 60  # generous: CI machines can be loaded
            while httpx.get(f"{u}/health").json()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            full = httpx.post(f"{u}{C}", json={"prompt": "z", "max_tokens": 3})
            assert full.status_code == 429
            assert full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
        # the first client went away: its rows leave, the queued request runs and finishes
        waiting.join(30)
        assert not waiting.is_alive()
        assert metric(u, "proxytune_requests_cancelled_total") == 1
        tokens = metric(u, "proxytune_generation_tokens_total")
        assert tokens < 200 + 3
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{u}{C}", json=long, timeout=0.3)
        deadline = time.monotonic() + 60  # generous: CI machines can be loaded
        while metric(u, "proxytune_requests_cancelled_total") < 2 or scheduler.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert metric(u, "proxytune_generation_tokens_total") < 2 * 200  # stopped early
        assert httpx.get(f"{u}/health").json() == {"status": "ok", "running": 0, "queued": 0}


def test_cli_serve_speculative_option(tiny_dirs, monkeypatch, capsys):
    import proxytune.server
    from proxytune.cli import main

    seen = {}
    monkeypatch.setattr(
        proxytune.server, "serve", lambda t, s, **kw: seen.update(tuner=t, settings=s)
    )
    models = ["--base", str(tiny_dirs["base"]), "--expert", str(tiny_dirs["expert"])]
    models += ["--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu"]
    # --speculative is an engine option: the tuner carries it (the scheduler reads it when
    # ServerSettings.speculative is left unset)
    assert main(["serve", *models, "--speculative", "auto"]) == 0
    assert seen["tuner"].options.speculative == "auto" and seen["settings"].speculative is None
    assert main(["serve", *models, "--speculative", "4"]) == 0
    assert seen["tuner"].options.speculative == 4 and seen["settings"].speculative is None
    assert main(["serve", "--speculative", "fast"]) == 2  # refused before any model loads
    assert "draft length >= 1 or 'auto'" in capsys.readouterr().err


def test_server_limits_logprobs_and_max_tokens(tuner):
    settings = ServerSettings(model_name=MODEL, max_top_logprobs=40, max_tokens=5)
    with serve_in_thread(create_app(tuner, settings)) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        r = c.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=2,
            logprobs=40,
            extra_body={"return_tokens_as_token_ids": True},  # distinct keys
        )
        assert all(len(top) in (40, 41) for top in r.choices[0].logprobs.top_logprobs)
        with pytest.raises(openai.BadRequestError, match="limit of 40"):
            c.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=41)
        with pytest.raises(openai.BadRequestError, match="limit of 5"):
            c.completions.create(model=MODEL, prompt="x", max_tokens=6)
        r = c.completions.create(model=MODEL, prompt="x", extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5  # the default (128) within the server's cap


def test_a_failing_rule_fails_its_request_with_500_and_the_server_keeps_serving(tuner):
    def combine(ctx):  # a broken custom rule: NaN when alpha is 7
        return ctx.base * math.nan if ctx.alphas and ctx.alphas[0] == 7.0 else ctx.base

    broken = ProxyTuner(tuner.base, tuner.pairs, tuner.defaults, rule=combine)
    with serve_in_thread(create_app(broken, ServerSettings(model_name=MODEL))) as u:
        bad = {"prompt": "x", "max_tokens": 4, "alpha": 7}
        r = httpx.post(f"{u}{C}", json=bad)
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "NaN" in r.json()["error"]["message"]
        with httpx.stream("POST", f"{u}{C}", json={**bad, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert "generation_failed" in events[-2] and events[-1] == "data: [DONE]"
        good = httpx.post(f"{u}{C}", json={"prompt": "x", "max_tokens": 4})
        assert good.status_code == 200
        assert metric(u, "proxytune_generation_failures_total") == 2
        assert httpx.get(f"{u}/health").json()["status"] == "ok"


def test_a_rule_setting_out_of_range_is_a_400_even_for_a_stream(url):
    """Refused while the request is prepared, before it is queued: a stream gets a 400, not a
    200 whose events end in an error."""
    failed = 'proxytune_requests_total{endpoint="/v1/completions",status="500"}'
    before = metric(url, failed), metric(url, "proxytune_generation_failures_total")
    body = {"prompt": "hi", "max_tokens": 3, "rule": "mixture", "alpha": 1.5, "stream": True}
    with httpx.stream("POST", f"{url}{C}", json=body, timeout=30) as r:
        r.read()
    assert r.status_code == 400 and r.json()["error"]["param"] == "alpha"
    assert (metric(url, failed), metric(url, "proxytune_generation_failures_total")) == before


def test_a_backtracking_regex_never_freezes_the_server(url):
    """Issue 16, item 2: ``(a+)+$`` on 26 a's and a '!' froze /health for 11.5 s; context
    regexes now run on an engine with a time budget that lets other threads run."""
    rule = {"name": "context", "rules": [{"regex": "(a+)+$", "alpha": 1}]}
    body = {"prompt": "a" * 26 + "!", "max_tokens": 2, "rule": rule}
    slow = {"prompt": "a" * 40 + "!", "max_tokens": 2, "rule": REDOS}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        answers = [pool.submit(httpx.post, f"{url}{C}", json=b, timeout=30) for b in (body, slow)]
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 200
        codes = [a.result().status_code for a in answers]
    assert codes == [200, 400]
    assert time.monotonic() - started < 10


LINEAR = {"schedule": "linear", "start": 0, "end": 1, "steps": 3}
MALFORMED = [  # (raw body, param, words): issue 16, item 5 (and item 9's schedules)
    (b'{"prompt": "x", "rule": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", None, "too deeply"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None, "4300 digits"),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt", "lone surrogate"),
    (b'{"prompt": ["ok", "a\\udfffb"], "max_tokens": 2}', "prompt[1]", "lone surrogate"),
    (b'{"prompt": "x", "rule": {"name": ["plausible"]}}', "rule.name", "a rule name"),
    (b'{"prompt": "x", "rule": {"name": {"a": 1}}}', "rule.name", "a rule name"),
    *[
        (json.dumps({"prompt": "x", "alpha": {**LINEAR, key: value}}).encode(), f"alpha.{key}", w)
        for key, value, w in [
            ("start", "abc", "must be a number"),
            ("start", [1], "must be a number"),
            ("start", "1", "must be a number"),
            ("steps", "x", "integer >= 1"),
            ("steps", None, "integer >= 1"),
            ("steps", 2.7, "integer >= 1"),
        ]
    ],
]


def test_malformed_input_is_a_400_and_the_connection_stays_usable(url, client):
    with httpx.Client() as keep_alive:
        for body, param, words in MALFORMED:
            r = keep_alive.post(f"{url}{C}", content=body)
            assert r.status_code == 400, (body[:80], r.text)
            assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
        chat = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
        r = keep_alive.post(f"{url}{CH}", content=chat)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
        ok = keep_alive.post(f"{url}{C}", json={"prompt": "x", "max_tokens": 2, "alpha": LINEAR})
        assert ok.status_code == 200
    assert metric(url, "proxytune_generation_failures_total") == 0


def test_a_bug_answers_500_without_dropping_the_keep_alive_connection(url, monkeypatch):
    from proxytune.server import app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "_prepare", broken)
    with httpx.Client() as keep_alive:
        r = keep_alive.post(f"{url}{C}", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "RuntimeError: a bug" in r.json()["error"]["message"]
        monkeypatch.undo()
        assert keep_alive.post(f"{url}{C}", json={"prompt": "x", "max_tokens": 2}).is_success


def test_request_bodies_over_the_limit_get_413_before_parsing(tuner):
    """Issue 16, item 4: a 30 MB body took 98 s and 10 GB to be refused."""
    app = create_app(tuner, ServerSettings(model_name=MODEL, max_body_bytes=1000))
    with serve_in_thread(app) as u:
        big = {"prompt": "x" * 2000, "max_tokens": 2}
        r = httpx.post(f"{u}{C}", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "at most 1000 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 200
            yield b'{"prompt": "x"}'

        r = httpx.post(f"{u}{CH}", content=chunks())
        assert r.status_code == 413
        assert httpx.post(f"{u}{C}", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    with pytest.raises(ConfigError, match="max-body-bytes must be an integer >= 1"):
        ServerSettings(max_body_bytes=0)


def test_browsers_cannot_drive_a_keyless_local_server(tuner):
    """A page cannot POST a simple (non-JSON) body, nor read answers through a rebound name."""
    with serve_in_thread(create_app(tuner, ServerSettings(model_name=MODEL))) as u:
        body = json.dumps({"prompt": "x", "max_tokens": 2})
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = httpx.post(f"{u}{C}", content=body, headers={"Content-Type": kind})
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        r = httpx.get(f"{u}/v1/models", headers={"Host": "evil.example:8000"})
        assert r.status_code == 403 and "--allow-host evil.example" in r.json()["error"]["message"]
        assert httpx.post(f"{u}{C}", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        assert httpx.get(f"{u}/v1/models", headers={"Host": "localhost:8000"}).status_code == 200
    anyone = ServerSettings(model_name=MODEL, allowed_hosts=("*",))
    with serve_in_thread(create_app(tuner, anyone)) as u:
        assert httpx.get(f"{u}/v1/models", headers={"Host": "evil.example"}).status_code == 200
    keyed = ServerSettings(model_name=MODEL, api_key="k")  # a page cannot send the key
    with serve_in_thread(create_app(tuner, keyed)) as u:
        auth = {"Host": "gpu-box.internal", "Authorization": "Bearer k"}
        assert httpx.get(f"{u}/v1/models", headers=auth).status_code == 200
