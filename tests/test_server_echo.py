"""Token-id prompts, ``echo`` and unknown fields on ``/v1/completions`` (issue 14): ids give
the text prompt's output, echoed log-probs are the teacher-forced scorer's, and every
combination the models cannot honour is a 400 naming the field."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from serving import serve_in_thread  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.engine.blackbox import BlackBoxStats  # noqa: E402
from proxytune.errors import ConfigError  # noqa: E402
from proxytune.evaluation.scoring import encode, score, score_ids  # noqa: E402
from proxytune.prompts import TokenIds  # noqa: E402
from proxytune.server import ServerSettings, create_app  # noqa: E402

C = "/v1/completions"
TEXTS = ["The quick brown fox", "Question: what is two plus three? Answer:"]
TOL = 1e-5


@pytest.fixture(scope="module")
def raw(raw_tuner) -> ProxyTuner:
    """base + one pair, every model on the raw prompt format (they all read the same ids)."""
    return raw_tuner


@pytest.fixture(scope="module")
def url(raw) -> Iterator[str]:
    with serve_in_thread(create_app(raw, ServerSettings(model_name="raw"))) as u:
        yield u


@pytest.fixture(scope="module")
def chat_url(tuner) -> Iterator[str]:
    """The conftest tuner: its expert reads its chat template."""
    with serve_in_thread(create_app(tuner, ServerSettings(model_name="chat"))) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ids_of(tuner: ProxyTuner, text: str) -> list[int]:
    """The base's raw rendering of ``text``: what a text prompt becomes."""
    return tuner.base.prompt.render(text, tuner.tokenizer)


def post(url: str, **body) -> httpx.Response:
    return httpx.post(url + C, json=body, timeout=60)


# token-id prompts -------------------------------------------------------------------------------


def test_token_id_prompts_give_the_output_of_the_text_prompt(client, raw):
    ids = [ids_of(raw, t) for t in TEXTS]
    text = client.completions.create(model="raw", prompt=TEXTS[0], max_tokens=12, logprobs=2)
    by_ids = client.completions.create(model="raw", prompt=ids[0], max_tokens=12, logprobs=2)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.choices[0].logprobs == text.choices[0].logprobs
    assert by_ids.usage == text.usage
    # a batch of id lists, sampled with a seed: the rows of the text batch, in order
    settings = {"n": 2, "temperature": 0.9, "seed": 5, "max_tokens": 8}
    texts = client.completions.create(model="raw", prompt=TEXTS, **settings)
    batch = client.completions.create(model="raw", prompt=ids, **settings)
    assert [c.text for c in batch.choices] == [c.text for c in texts.choices]
    assert len({c.text for c in batch.choices}) > 1  # really sampled


# echo ------------------------------------------------------------------------------------------


def test_echo_logprobs_equal_the_teacher_forced_scorer(url, raw):
    """lm-eval's request (echo, logprobs 1, max_tokens 1) on a context + continuation: the
    continuation's echoed log-probs are what ``score`` gives it after the context."""
    context, continuation = "Question: what is two plus three? Answer:", " five."
    ids = ids_of(raw, context + continuation)
    assert ids == ids_of(raw, context) + encode(raw, continuation)  # the split is clean
    r = post(url, prompt=ids, max_tokens=1, logprobs=1, echo=True, alpha=0.7)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = score(raw, [context], [continuation], alpha=0.7, top=1)[0]
    ctx = len(ids_of(raw, context))
    got = lp["token_logprobs"][ctx:-1]
    assert len(got) == len(ref.tokens)
    for g, t in zip(got, ref.tokens, strict=True):
        assert abs(g - t.logprob) < TOL
    # lm-eval's greedy test reads the top log-probs; the scorer's greedy flags agree
    greedy = all(
        g == max(top.values()) for g, top in zip(got, lp["top_logprobs"][ctx:-1], strict=True)
    )
    assert greedy == ref.greedy
    # every prompt position, against the scorer on the whole prompt
    whole = score_ids(raw, [ids[:1]], [ids[1:]], alpha=0.7)[0]
    for g, t in zip(lp["token_logprobs"][1:-1], whole.tokens, strict=True):
        assert abs(g - t.logprob) < TOL
    # the generated token: what the same request without echo returns
    plain = post(url, prompt=ids, max_tokens=1, logprobs=1, alpha=0.7).json()["choices"][0]
    assert choice["text"] == context + continuation + plain["text"]
    assert lp["token_logprobs"][-1] == plain["logprobs"]["token_logprobs"][0]
    assert lp["text_offset"][-1] == len(context + continuation)


def test_echo_alone_follows_the_requests_rule_alpha_and_active_pairs(url, raw):
    ids = ids_of(raw, TEXTS[1])
    cases = [
        ({}, {}),
        ({"alpha": -0.5}, {"alpha": -0.5}),
        ({"rule": "product"}, {"rule": "product"}),
        ({"active_pairs": []}, {"alpha": 0.0}),  # the base alone
    ]
    seen = []
    for body, settings in cases:
        r = post(url, prompt=TEXTS[1], max_tokens=0, logprobs=3, echo=True, **body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == TEXTS[1] and choice["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 0
        lp = choice["logprobs"]
        ref = score_ids(raw, [ids[:1]], [ids[1:]], top=3, **settings)[0]
        rows = zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], ref.tokens, strict=True)
        for g, top, t in rows:
            assert abs(g - t.logprob) < TOL
            best = max(top.values())
            assert abs(best - t.top[0][1]) < TOL and 1 <= len(top) <= 4
        seen.append(lp["token_logprobs"][1:])
        # offsets index the echoed text (ASCII here: every token is whole characters)
        text, offs = choice["text"], lp["text_offset"]
        ends = [*offs[1:], len(text)]
        assert [text[a:b] for a, b in zip(offs, ends, strict=True)] == lp["tokens"]
    assert len({tuple(s) for s in seen}) == len(cases)  # each setting really changed them


def test_echo_without_logprobs_and_with_n(client, raw):
    r = client.completions.create(model="raw", prompt=TEXTS[0], max_tokens=4, echo=True, n=2)
    plain = client.completions.create(model="raw", prompt=TEXTS[0], max_tokens=4, n=2)
    assert [c.text for c in r.choices] == [TEXTS[0] + c.text for c in plain.choices]
    assert all(c.logprobs is None for c in r.choices)
    alone = client.completions.create(
        model="raw", prompt=[[5, 6], [7]], max_tokens=0, echo=True, logprobs=0
    )
    assert [c.logprobs.token_logprobs[0] for c in alone.choices] == [None, None]
    assert len(alone.choices[1].logprobs.tokens) == 1


# refusals and the unknown-field policy ----------------------------------------------------------

BAD = [  # (body, param, words in the message)
    ({"prompt": [3, 10_000]}, "prompt", "token id 10000 at position 1 is outside the vocabulary"),
    ({"prompt": [[1, 2], [-1]]}, "prompt", "prompt[1]: token id -1"),
    ({"prompt": [[1, 2], []]}, "prompt", "prompt[1]: an empty list of token ids"),
    ({"prompt": []}, "prompt", "give at least one prompt"),
    ({"prompt": [1.5, 2]}, "prompt", "a list of token ids (integers)"),
    ({"prompt": [True]}, "prompt", "a list of token ids (integers)"),
    ({"prompt": [[1, "a"]]}, "prompt", "a list of token ids"),
    ({"prompt": [{"role": "user", "content": "hi"}]}, "prompt", "/v1/chat/completions"),
    ({"prompt": "x", "echo": True, "stream": True}, "echo", "stream: false"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "only with echo"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD)
def test_bad_prompts_and_echo_get_a_400_naming_the_field(url, body, param, words):
    r = post(url, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "not supported: each model" not in error["message"]  # the old, wrong reason


def test_ids_and_echo_are_refused_where_a_model_reads_its_chat_template(chat_url):
    r = post(chat_url, prompt=[5, 6, 7], max_tokens=2)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt"
    assert "the expert[0] reads 'chat' prompts" in error["message"]
    assert "/" not in error["message"]  # the model's path stays on the server
    r = post(chat_url, prompt="Hello", max_tokens=0, echo=True, logprobs=1)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "echo"
    assert "the expert[0] reads 'chat' prompts" in error["message"]
    # with the pair switched off only the base runs, on the raw format: both are fine
    for body in ({"prompt": [5, 6, 7]}, {"prompt": "Hello", "echo": True, "logprobs": 1}):
        r = post(chat_url, max_tokens=1, active_pairs=[], **body)
        assert r.status_code == 200, r.text


def test_unknown_fields_are_ignored_with_a_logged_warning(url, caplog):
    caplog.set_level(logging.WARNING, logger="proxytune.server")
    plain = post(url, prompt="x", max_tokens=3).json()["choices"][0]["text"]
    r = post(url, prompt="x", max_tokens=3, alpah=2, do_sample=False, stream_options=None)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain
    assert "ignored unknown field(s) 'alpah', 'do_sample'" in caplog.text


def test_ids_and_echo_are_refused_where_the_base_is_an_api_model(url, tiny_dirs, monkeypatch):
    """An API base is sent text (or ids only if its endpoint takes them): no verbatim ids."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    steered = ProxyTuner.from_api(
        f"{url}/v1",
        "raw",
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["anti"]),
        device="cpu",
        dtype="float32",
        base_options={"tokenizer": str(tiny_dirs["base"])},
    )
    with pytest.raises(ConfigError, match="the base is an API model"):
        steered.prepare(TokenIds([5, 6], "ab"))
    with serve_in_thread(create_app(steered, ServerSettings(model_name="s"))) as u:
        base_api = httpx.get(u + "/health").json()["base_api"]  # probed at startup
        assert base_api["prompt_path"] == "tokens" and base_api["model"] == "raw"
        for body, param in (
            ({"prompt": [5, 6]}, "prompt"),
            ({"prompt": "x", "echo": True}, "echo"),
        ):
            r = post(u, max_tokens=2, **body)
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param
            assert "the base is an API model" in error["message"]


def test_echo_on_a_speculative_server_equals_the_continuous_batch(url, raw):
    body = {"prompt": TEXTS[1], "max_tokens": 3, "logprobs": 2, "echo": True}
    with serve_in_thread(create_app(raw, ServerSettings(speculative=2))) as u:
        spec = post(u, **body).json()["choices"][0]
    batched = post(url, **body).json()["choices"][0]
    assert spec["text"] == batched["text"]
    n = len(ids_of(raw, TEXTS[1]))
    assert spec["logprobs"]["token_logprobs"][:n] == batched["logprobs"]["token_logprobs"][:n]


def test_a_black_box_base_on_this_server_is_exact_with_a_bpe_tokenizer(
    tiny_dirs, tuner, monkeypatch
):
    """The issue's divergence: the API-base client sends token ids, which this server now
    reads verbatim, so a full-vocabulary top-k through it is local proxy-tuning, token for
    token (text prompts were re-tokenized on the server side and drifted)."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    plain = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]), base_prompt="raw", device="cpu", dtype="float32"
    )  # on `auto` its tokenizer's chat template would refuse ids, and the client send text
    vocab = plain.vocab_size
    settings = ServerSettings(model_name="base", max_top_logprobs=vocab)
    with serve_in_thread(create_app(plain, settings)) as base_url:
        steered = ProxyTuner.from_api(
            f"{base_url}/v1",
            "base",
            expert=str(tiny_dirs["expert"]),
            anti_expert=str(tiny_dirs["anti"]),
            top_logprobs=vocab,
            expert_prompt="chat",
            anti_expert_prompt="raw",
            device="cpu",
            dtype="float32",
            base_options={"tokenizer": str(tiny_dirs["base"]), "prompt": "raw"},
        )
        prompts = ["The quick brown fox", "Numbers: 0 1 2", "def add(a, b):"]
        stats = BlackBoxStats()
        got = steered.generate(prompts, max_new_tokens=24, stats=stats)
    want = tuner.generate(prompts, max_new_tokens=24)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert steered.base.model.prompt_path == stats.prompt_path == "tokens"  # the id path
    assert stats.api.calls > 0 and not stats.notes and stats.chunks.text_drift == 0


def test_a_rule_failing_while_echo_scores_fails_that_request_alone(raw):
    def combine(ctx):  # a broken custom rule: NaN when alpha is 7
        return ctx.base * math.nan if ctx.alphas and ctx.alphas[0] == 7.0 else ctx.base

    broken = ProxyTuner(raw.base, raw.pairs, raw.defaults, rule=combine)
    with serve_in_thread(create_app(broken, ServerSettings(model_name="b"))) as u:
        r = post(u, prompt="Rain falls", max_tokens=0, echo=True, logprobs=1, alpha=7)
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "NaN" in r.json()["error"]["message"]
        good = post(u, prompt="Rain falls", max_tokens=0, echo=True, logprobs=1)
        assert good.status_code == 200
        assert httpx.get(f"{u}/health").json()["status"] == "ok"
