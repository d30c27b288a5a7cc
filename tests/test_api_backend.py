"""A base behind an OpenAI-compatible endpoint: the project's own server on a loopback port
(a real uvicorn serving a tiny model), and an in-process vLLM-like endpoint (httpx's
MockTransport) for token prompts and for the ways endpoints fail."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import serve_in_thread  # noqa: E402

from proxytune import ProxyTuner  # noqa: E402
from proxytune.backends.api import (  # noqa: E402
    APIModel,
    APISpec,
    CandidateMapper,
    EndpointError,
    _completions_url,
)
from proxytune.backends.hf import HFModel  # noqa: E402
from proxytune.backends.topk import topk_row  # noqa: E402
from proxytune.cli import main  # noqa: E402
from proxytune.engine import Member, Pair  # noqa: E402
from proxytune.engine.blackbox import BlackBoxStats  # noqa: E402
from proxytune.errors import ConfigError  # noqa: E402
from proxytune.prompts import PromptFormat  # noqa: E402
from proxytune.recipe import parse_recipe  # noqa: E402
from proxytune.server import ServerSettings, create_app  # noqa: E402
from proxytune.testing import (  # noqa: E402
    build_char_tokenizer,
    build_model,
    build_tokenizer,
)

PROMPTS = ["The quick brown fox", "def add(a, b):"]
STEPS = 12


char_tokenizer = build_char_tokenizer


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve ``app`` on loopback; yield its OpenAI base URL (``.../v1``)."""
    with serve_in_thread(app) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    """Base, expert and anti-expert over the character tokenizer, in memory and on disk."""
    tok = char_tokenizer()
    root = tmp_path_factory.mktemp("chars")
    models, dirs = {}, {}
    for name, seed in (("base", 0), ("expert", 1), ("anti", 2)):
        model = build_model(tok, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        models[name], dirs[name] = HFModel(model, tok, name=name), root / name
    return tok, models, dirs


@pytest.fixture(scope="module")
def url(chars) -> Iterator[str]:
    """The project's server, serving the base alone, every candidate allowed (k up to V)."""
    tok, models, _ = chars
    served = ProxyTuner(Member("base", models["base"]))
    settings = ServerSettings(model_name="tiny", max_top_logprobs=len(tok), max_batch_size=8)
    with serving(create_app(served, settings)) as u:
        yield u


def pair_of(models) -> Pair:
    return Pair(
        Member("expert[0]", models["expert"], PromptFormat("chat")),
        Member("anti_expert[0]", models["anti"]),
    )


def api_tuner(models, tok, url: str, **spec) -> ProxyTuner:
    model = APIModel(APISpec(url=url, model="tiny", **spec), tok)
    return ProxyTuner(Member("base", model), [pair_of(models)])


# the real server ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, "auto"])
def test_k_equal_to_the_vocabulary_is_local_proxy_tuning(chars, url, chunk):
    tok, models, _ = chars
    local = ProxyTuner(Member("base", models["base"]), [pair_of(models)])
    api = api_tuner(models, tok, url, top_logprobs=len(tok), chunk=chunk)
    stats = BlackBoxStats()
    got = api.generate(PROMPTS, max_new_tokens=STEPS, stats=stats)
    want = local.generate(PROMPTS, max_new_tokens=STEPS)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    # the server takes token-id prompts (issue 14): sent as ids, no fallback to text
    assert not any("as text" in n for n in stats.notes) and stats.chunks.text_drift == 0
    assert stats.api.unmapped == 0 and stats.mean_coverage == 1.0
    assert stats.api.calls <= stats.chunks.tbt_calls == stats.steps
    if chunk == 1:
        assert stats.api.calls == stats.steps and stats.calls_saved == 0
        assert stats.api.prompt_tokens == stats.chunks.tbt_prompt_tokens


def test_chunked_sampling_equals_token_by_token(chars, url):
    tok, models, _ = chars
    settings = {"max_new_tokens": STEPS, "temperature": 0.8, "seed": 5, "n": 2}
    one = api_tuner(models, tok, url, top_logprobs=len(tok), chunk=1)
    four = api_tuner(models, tok, url, top_logprobs=len(tok), chunk=4)
    stats = BlackBoxStats()
    a = one.generate(PROMPTS[0], alpha=0.3, **settings)
    b = four.generate(PROMPTS[0], alpha=0.3, stats=stats, **settings)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert stats.chunks.served > 0 and stats.api.calls < stats.chunks.tbt_calls


def test_small_k_alpha_zero_is_the_base_alone(chars, url):
    """Greedy on the top-k is exact for the base alone: its best token is always shown."""
    tok, models, _ = chars
    api = api_tuner(models, tok, url, top_logprobs=3, chunk=1)
    alone = ProxyTuner(Member("base", models["base"]))
    got = api.generate(PROMPTS, alpha=0.0, max_new_tokens=STEPS)
    assert [r.token_ids for r in got] == [
        r.token_ids for r in alone.generate(PROMPTS, max_new_tokens=STEPS)
    ]
    # steered with k = 3: runs, and only picks from the base's candidates or the expert's top
    steered = api.generate(PROMPTS[0], max_new_tokens=4, logprobs=True, top_logprobs=2)[0]
    assert len(steered.token_ids) == 4 and steered.logprobs is not None


def test_candidates_mapped_by_text_when_ids_are_not_returned(chars, url):
    tok, models, _ = chars
    local = ProxyTuner(Member("base", models["base"]), [pair_of(models)])
    api = api_tuner(models, tok, url, top_logprobs=len(tok), token_ids=False, chunk=1)
    stats = BlackBoxStats()
    got = api.generate(PROMPTS[1], max_new_tokens=STEPS, stats=stats)[0]
    assert got.token_ids == local.generate(PROMPTS[1], max_new_tokens=STEPS)[0].token_ids
    assert stats.api.unmapped == 0 and stats.api.candidates >= STEPS * len(tok)


def test_from_api_recipe_and_cli(chars, url, tmp_path, capsys):
    tok, models, dirs = chars
    k = len(tok)
    local = ProxyTuner(Member("base", models["base"]), [pair_of(models)])
    want = local.generate(PROMPTS[0], max_new_tokens=8)[0].text
    tuner = ProxyTuner.from_api(
        url, "tiny", expert=str(dirs["expert"]), anti_expert=str(dirs["anti"]),
        top_logprobs=k, device="cpu", dtype="float32",
        expert_prompt="chat", anti_expert_prompt="raw", base_options={"prompt": "raw"},  # as local
    )  # fmt: skip
    assert tuner.generate(PROMPTS[0], max_new_tokens=8)[0].text == want
    recipe = tmp_path / "api.yaml"
    recipe.write_text(
        f"base: {{url: '{url}', model: tiny, top_logprobs: {k}, chunk: 2}}\n"
        f"pairs:\n  - expert: {{model: '{dirs['expert']}', prompt: chat}}\n"
        f"    anti_expert: '{dirs['anti']}'\n"
        "model_defaults: {device: cpu, dtype: float32}\n"
        "generation: {max_new_tokens: 8}\n"
    )
    assert ProxyTuner.from_recipe(recipe).generate(PROMPTS[0])[0].text == want
    argv = ["generate", "--base-url", url, "--base-model", "tiny", "--top-logprobs", str(k)]
    argv += ["--expert", str(dirs["expert"]), "--anti-expert", str(dirs["anti"])]
    argv += ["--device", "cpu", "--max-new-tokens", "8", "--json", PROMPTS[0]]
    argv += ["--base-prompt", "raw", "--anti-expert-prompt", "raw"]  # the reference's formats
    assert main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["text"] == want
    assert "calls" in out.err and "coverage" in out.err
    assert main(["generate", "--base-url", url, "x"]) == 2  # --base-model is required
    assert "--base-model" in capsys.readouterr().err
    bad = ["generate", "--base-url", url, "--base-model", "tiny", "--base-endpoint", "responses"]
    assert main([*bad, "--expert", str(dirs["expert"]), "x"]) == 2
    assert "endpoint must be completions or chat" in capsys.readouterr().err


# an in-process vLLM-like endpoint -------------------------------------------------------------


class FakeVLLM:
    """``/v1/completions`` over a local model, vLLM-style: token-id prompts, ``token_id:N``
    candidates, ``n`` samples. Switches make it fail the ways endpoints fail."""

    def __init__(
        self, model, tokenizer, *, tokens=True, logprobs=True, fail=0, status=503, adds=(),
        report_ids=False, max_prompts=None,
    ):  # fmt: skip
        self.model, self.tok = model, tokenizer
        self.tokens, self.logprobs, self.fail, self.status = tokens, logprobs, fail, status
        self.adds = list(adds)  # ids put before every token prompt (a server adding a BOS)
        self.report_ids, self.max_prompts = report_ids, max_prompts
        self.bodies: list[dict] = []
        self.headers: list[httpx.Headers] = []
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.headers.append(request.headers)
        if self.fail:
            self.fail -= 1
            return httpx.Response(self.status, json={"error": {"message": "busy"}})
        choices, prompt_tokens = [], 0
        if self.max_prompts and len(body["prompt"]) > self.max_prompts:
            return httpx.Response(500, json={"error": {"message": ""}})  # llama.cpp's assert
        for p in body["prompt"]:
            if not isinstance(p, str) and not self.tokens:
                message = "prompt: must be a string or a list of strings"
                return httpx.Response(400, json={"error": {"message": message}})
            ids = self.tok(p)["input_ids"] if isinstance(p, str) else self.adds + list(p)
            prompt_tokens += len(ids)
            for _ in range(body.get("n", 1)):
                choices.append(self._choice(list(ids), body, len(choices)))
                if self.report_ids:
                    choices[-1]["prompt_token_ids"] = list(ids)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(choices)}
        return httpx.Response(200, json={"choices": choices, "usage": usage})

    def _choice(self, ids: list[int], body: dict, index: int) -> dict:
        as_ids = body.get("return_tokens_as_token_ids", False)

        def name(i: int) -> str:
            return f"token_id:{i}" if as_ids else self.tok.decode([i])

        tokens, chosen, tops = [], [], []
        for _ in range(body["max_tokens"]):
            with torch.no_grad():
                logits = self.model.model(torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float()[: len(self.tok)], dim=-1)
            if body.get("temperature", 1.0) == 0:
                t = int(lp.argmax())
            else:
                t = int(torch.multinomial(lp.exp(), 1, generator=self.gen))
            tokens.append(t)
            chosen.append(float(lp[t]))
            if body.get("logprobs") is not None:
                top = torch.topk(lp, body["logprobs"])
                tops.append(
                    {name(int(i)): float(v) for i, v in zip(top.indices, top.values, strict=True)}
                )
            ids.append(t)
            if t == self.tok.eos_token_id:
                break
        logprobs = None
        if body.get("logprobs") is not None and self.logprobs:
            logprobs = {
                "tokens": [name(t) for t in tokens],
                "token_logprobs": chosen,
                "top_logprobs": tops,
            }
        return {
            "index": index,
            "text": self.tok.decode(tokens, skip_special_tokens=True),
            "logprobs": logprobs,
            "finish_reason": "stop" if tokens[-1] == self.tok.eos_token_id else "length",
        }


class FakeChat(FakeVLLM):
    """``/v1/chat/completions`` over a local model: the user message is the raw prompt, an
    assistant message is continued (``continue_final_message``); candidates carry ``bytes``;
    ``cap`` refuses more ``top_logprobs`` (OpenAI: 20)."""

    def __init__(self, model, tokenizer, cap=None):
        super().__init__(model, tokenizer)
        self.cap = cap

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        top = body.get("top_logprobs") if body.get("logprobs") else None
        if self.cap is not None and top is not None and top > self.cap:
            message = f"top_logprobs: must be <= {self.cap}"
            return httpx.Response(400, json={"error": {"message": message}})
        messages = body["messages"]
        assert body.get("continue_final_message", False) == (len(messages) == 2)
        ids = self.tok("".join(m["content"] for m in messages))["input_ids"]
        legacy = {**body, "logprobs": top, "return_tokens_as_token_ids": False}
        choices = [self._chat(self._choice(list(ids), legacy, i)) for i in range(body.get("n", 1))]
        return httpx.Response(200, json={"choices": choices})

    @staticmethod
    def _chat(choice: dict) -> dict:
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        lp, content = choice["logprobs"], None
        if lp is not None:
            content = [
                {**entry(t, v), "top_logprobs": [entry(a, b) for a, b in top.items()]}
                for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                     strict=True)
            ]  # fmt: skip
        return {
            "index": choice["index"],
            "message": {"role": "assistant", "content": choice["text"]},
            "logprobs": {"content": content} if content is not None else None,
            "finish_reason": choice["finish_reason"],
        }


def test_a_chat_endpoint_continues_the_reply_and_is_exact_with_every_candidate(chars):
    """k = V on a chat endpoint over the character tokenizer (text is exact): the output of
    the completions endpoint; the reply so far travels as a continued assistant message."""
    tok, models, _ = chars
    want = mock_tuner(models, tok, FakeVLLM(models["base"], tok), top_logprobs=len(tok))
    want = want.generate(PROMPTS, max_new_tokens=6, alpha=0.5)
    endpoint = FakeChat(models["base"], tok)
    stats = BlackBoxStats()
    tuner = mock_tuner(models, tok, endpoint, top_logprobs=len(tok), endpoint="chat")
    got = tuner.generate(PROMPTS, max_new_tokens=6, alpha=0.5, stats=stats)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert stats.prompt_path == "text" and stats.api.unmapped == 0
    assert stats.api.calls == stats.api.row_requests  # one conversation per request
    later = [b for b in endpoint.bodies if len(b["messages"]) == 2]
    assert later and all(b["continue_final_message"] for b in later)
    user, assistant = later[0]["messages"]
    assert user["role"] == "user" and user["content"] in PROMPTS
    assert assistant["role"] == "assistant" and assistant["content"]


def test_a_chat_endpoint_caps_its_alternatives(chars):
    """OpenAI's chat endpoint gives at most 20 alternatives: more is its one-line refusal;
    20 runs (the rest of the vocabulary gets the missing-mass rule)."""
    tok, models, _ = chars
    capped = FakeChat(models["base"], tok, cap=20)
    with pytest.raises(EndpointError, match="top_logprobs: must be <= 20"):
        mock_tuner(models, tok, capped, top_logprobs=len(tok), endpoint="chat").generate(
            PROMPTS[0], max_new_tokens=2
        )
    stats = BlackBoxStats()
    mock_tuner(models, tok, capped, top_logprobs=20, endpoint="chat").generate(
        PROMPTS[0], max_new_tokens=4, stats=stats
    )
    assert stats.api.calls >= 1 and stats.mean_coverage > 0.9
    with pytest.raises(ConfigError, match="endpoint must be completions or chat"):
        APISpec(url="http://x.test/v1", model="m", endpoint="responses")


@pytest.fixture(scope="module")
def bpe():
    """Base, expert and anti-expert over a BPE tokenizer with merges (text is not exact)."""
    tok = build_tokenizer(300)
    models = {n: HFModel(build_model(tok, seed=s), tok, name=n) for n, s in
              (("base", 0), ("expert", 1), ("anti", 2))}  # fmt: skip
    return tok, models


def mock_tuner(models, tok, fake: FakeVLLM, sleeps: list | None = None, **spec) -> ProxyTuner:
    model = APIModel(
        APISpec(url="http://endpoint.test/v1", model="m", **spec),
        tok,
        transport=httpx.MockTransport(fake),
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )
    return ProxyTuner(Member("base", model), [pair_of(models)])


def test_token_prompts_are_exact_where_text_would_drift(bpe):
    tok, models = bpe
    want = ProxyTuner(Member("base", models["base"]), [pair_of(models)]).generate(
        PROMPTS, max_new_tokens=STEPS
    )
    endpoint = FakeVLLM(models["base"], tok)
    stats = BlackBoxStats()
    got = mock_tuner(models, tok, endpoint, top_logprobs=len(tok)).generate(
        PROMPTS, max_new_tokens=STEPS, stats=stats
    )
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(isinstance(b["prompt"][0], list) for b in endpoint.bodies)  # token prompts
    assert stats.notes == [] and stats.chunks.text_drift == 0
    assert len(endpoint.bodies[0]["prompt"]) == 2  # one call carries every live row
    # the same endpoint taking text only: prompts are re-tokenized, and the drift is counted
    text_only = FakeVLLM(models["base"], tok, tokens=False)
    stats = BlackBoxStats()
    tuner = mock_tuner(models, tok, text_only, top_logprobs=len(tok), chunk=1)
    tuner.generate(PROMPTS, max_new_tokens=STEPS, stats=stats)
    assert stats.notes and stats.chunks.text_drift > 0
    assert tuner.base.model.prompt_path == "text"


def test_the_path_is_probed_once_logged_and_shown(bpe, caplog):
    tok, models = bpe
    for endpoint, path in ((FakeVLLM(models["base"], tok), "tokens"),
                           (FakeVLLM(models["base"], tok, tokens=False), "text")):  # fmt: skip
        model = mock_tuner(models, tok, endpoint).base.model
        assert model.client.describe()["prompt_path"] == "not yet probed"
        with caplog.at_level(logging.INFO, logger="proxytune.backends.api.client"):
            assert model.probe() == path
        assert model.client.describe()["prompt_path"] == path
        assert f"prompts travel as {path}" in caplog.text
        assert len(endpoint.bodies) == (1 if path == "tokens" else 2)  # a refusal, then text
        caplog.clear()


@pytest.mark.parametrize("how", ["usage", "prompt_token_ids"])
def test_an_endpoint_that_does_not_read_token_ids_verbatim_is_refused(bpe, how):
    """A server that puts a BOS before token prompts scores other prefixes: refused, by the
    ids it says it read or by its prompt-token count."""
    tok, models = bpe
    endpoint = FakeVLLM(models["base"], tok, adds=[tok.bos_token_id], report_ids=how != "usage")
    tuner = mock_tuner(models, tok, endpoint)
    with pytest.raises(EndpointError, match=r"not take token-id prompts verbatim.*prompt_as: te"):
        tuner.generate(PROMPTS[0], max_new_tokens=2)
    reported = FakeVLLM(models["base"], tok, report_ids=True)  # the ids sent: fine
    mock_tuner(models, tok, reported).generate(PROMPTS[0], max_new_tokens=2)


def test_max_prompts_sends_one_prompt_per_call(bpe):
    """llama.cpp's server takes one prompt per request: ``max_prompts: 1`` splits the call,
    the output is unchanged."""
    tok, models = bpe
    want = mock_tuner(models, tok, FakeVLLM(models["base"], tok)).generate(
        PROMPTS, max_new_tokens=4
    )
    endpoint = FakeVLLM(models["base"], tok, max_prompts=1)
    got = mock_tuner(models, tok, endpoint, max_prompts=1).generate(PROMPTS, max_new_tokens=4)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(len(b["prompt"]) == 1 for b in endpoint.bodies)
    with pytest.raises(ConfigError, match="max_prompts must be an integer >= 1"):
        APISpec(url="http://x.test/v1", model="m", max_prompts=0)


def test_support_is_the_endpoints_candidates_and_the_experts_top(bpe):
    """k = 1 and no expert tokens: only the endpoint's own greedy token can be chosen."""
    tok, models = bpe
    endpoint = FakeVLLM(models["base"], tok)
    tuner = mock_tuner(models, tok, endpoint, top_logprobs=1, expert_top=0)
    got = tuner.generate(PROMPTS[0], alpha=2.0, max_new_tokens=6)[0]
    alone = ProxyTuner(Member("base", models["base"])).generate(PROMPTS[0], max_new_tokens=6)
    assert got.token_ids == alone[0].token_ids
    # n samples of one prompt share one prompt per call until they part
    stats = BlackBoxStats()
    tuner.generate(PROMPTS[0], max_new_tokens=2, n=3, temperature=1.0, seed=1, stats=stats)
    assert len(endpoint.bodies[-2]["prompt"]) == 1 and stats.api.row_requests < 6


def test_missing_logprobs_is_a_clear_error(bpe):
    tok, models = bpe
    tuner = mock_tuner(models, tok, FakeVLLM(models["base"], tok, logprobs=False))
    with pytest.raises(EndpointError, match=r"returned no log-probabilities.*sampled"):
        tuner.generate(PROMPTS[0], max_new_tokens=2)


def test_sampled_estimate_is_the_last_resort(chars):
    """No log-probs at all: n sampled one-token completions per step, mapped by their text."""
    tok, models, _ = chars
    endpoint = FakeVLLM(models["base"], tok, logprobs=False)
    stats = BlackBoxStats()
    tuner = mock_tuner(models, tok, endpoint, logprobs="sampled", samples=16)
    got = tuner.generate(PROMPTS[0], alpha=0.0, max_new_tokens=3, stats=stats)[0]
    assert all(b["n"] == 16 and "logprobs" not in b for b in endpoint.bodies)
    assert stats.api.calls == stats.steps and stats.api.completion_tokens == 16 * stats.steps
    assert stats.mean_coverage > 0.9  # the share of draws whose text mapped to one id
    # peaked tiny models: the most frequent of 16 draws is the base's greedy token
    alone = ProxyTuner(Member("base", models["base"]))
    assert got.token_ids == alone.generate(PROMPTS[0], max_new_tokens=3)[0].token_ids


def test_retries_with_backoff_then_gives_up(bpe):
    tok, models = bpe
    sleeps: list[float] = []
    endpoint = FakeVLLM(models["base"], tok, fail=2)
    tuner = mock_tuner(models, tok, endpoint, sleeps, top_logprobs=5, backoff=0.5, chunk=1)
    stats = BlackBoxStats()
    tuner.generate(PROMPTS[0], max_new_tokens=2, stats=stats)
    assert sleeps == [0.5, 1.0] and stats.api.retries == 2 and stats.api.calls == 2
    down = mock_tuner(models, tok, FakeVLLM(models["base"], tok, fail=99), [], max_retries=2)
    with pytest.raises(EndpointError, match="failed 3 time"):
        down.generate(PROMPTS[0], max_new_tokens=2)
    refused = FakeVLLM(models["base"], tok, fail=1, status=401)
    with pytest.raises(EndpointError, match="HTTP 401"):
        mock_tuner(models, tok, refused, []).generate(PROMPTS[0], max_new_tokens=2)
    assert len(refused.bodies) == 1  # a client error is not retried


def test_timeouts_are_retried(bpe):
    tok, _ = bpe
    attempts = []

    def slow(request):
        attempts.append(1)
        raise httpx.ReadTimeout("too slow", request=request)

    model = APIModel(
        APISpec(url="http://endpoint.test", model="m", max_retries=1, timeout=0.01),
        tok,
        transport=httpx.MockTransport(slow),
        sleep=lambda s: None,
    )
    with pytest.raises(EndpointError, match=r"no answer within 0\.01 s"):
        ProxyTuner(Member("base", model)).generate("x", max_new_tokens=1)
    assert len(attempts) == 2


def test_api_key_comes_from_the_environment(bpe, monkeypatch):
    tok, models = bpe
    monkeypatch.setenv("TINY_KEY", "s3cret")
    endpoint = FakeVLLM(models["base"], tok)
    mock_tuner(models, tok, endpoint, api_key_env="TINY_KEY").generate("x", max_new_tokens=1)
    assert endpoint.headers[0]["authorization"] == "Bearer s3cret"
    monkeypatch.delenv("TINY_KEY")
    endpoint = FakeVLLM(models["base"], tok)
    mock_tuner(models, tok, endpoint, api_key_env="TINY_KEY").generate("x", max_new_tokens=1)
    assert "authorization" not in endpoint.headers[0]


# pieces ---------------------------------------------------------------------------------------


def test_missing_mass_rules():
    ids = torch.tensor([[0, 1, -1]])
    lps = torch.log(torch.tensor([[0.7, 0.2, 1.0]]))
    row, known = topk_row(ids, lps, 4)  # 0.1 left over two unseen tokens, under the cap
    assert torch.allclose(row.exp(), torch.tensor([[0.7, 0.2, 0.05, 0.05]]))
    assert known.tolist() == [[True, True, False, False]]
    row, _ = topk_row(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.1]])), 3)
    assert row.exp()[0, 2] == pytest.approx(0.1)  # 0.4 left, capped at the k-th (0.1)
    row, _ = topk_row(ids, lps, 4, "none")
    assert torch.isneginf(row[0, 2:]).all()
    full = torch.log_softmax(torch.randn(1, 5), -1)
    row, known = topk_row(torch.arange(5)[None], full, 5)
    assert known.all() and torch.equal(row, full)
    row, _ = topk_row(torch.tensor([[0]]), torch.tensor([[-9999.0]]), 2)  # OpenAI's "impossible"
    assert torch.isneginf(row[0, 0])


def test_candidate_mapping_rules():
    tok = build_tokenizer(300)
    mapper = CandidateMapper(tok, len(tok))
    assert mapper.id_of("token_id:42") == 42 and mapper.id_of("token_id:99999") is None
    the = tok.convert_tokens_to_ids("Ġthe")
    assert mapper.id_of(" the") == the and mapper.id_of("Ġthe") == the  # text, raw piece
    assert mapper.id_of("</s>") == tok.eos_token_id
    assert mapper.id_of("\ufffd") is None  # every half character shows as U+FFFD: ambiguous
    half = tok.convert_tokens_to_ids("â")  # the byte 0xe2
    assert mapper.id_of("bytes:\\xe2") == half
    assert mapper.id_of("no such token anywhere") is None


def test_spec_validation_and_urls():
    assert _completions_url("http://h:1") == "http://h:1/v1/completions"
    assert _completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert _completions_url("http://h:1", chat=True) == "http://h:1/v1/chat/completions"
    with pytest.raises(ConfigError, match="top_logprobs"):
        APISpec(url="http://h", model="m", top_logprobs=0)
    with pytest.raises(ConfigError, match="http"):
        APISpec(url="h:1", model="m")
    with pytest.raises(ConfigError, match="unknown API base option"):
        parse_recipe({"base": {"url": "http://h", "model": "m", "device": "cpu"}})
    r = parse_recipe({"base": {"url": "http://h/v1", "model": "m", "top_logprobs": 5}})
    assert isinstance(r.base, APISpec) and r.base.top_logprobs == 5


def test_an_api_base_refuses_what_needs_full_logits(bpe):
    tok, models = bpe
    tuner = mock_tuner(models, tok, FakeVLLM(models["base"], tok))
    with pytest.raises(ConfigError, match="speculative"):
        tuner.generate("x", max_new_tokens=2, speculative=2)
    with pytest.raises(ConfigError, match="LogitsProcessor"):
        tuner.logits_processor("x")
    with pytest.raises(ConfigError, match="top-k"):
        tuner.base.model.start([[1, 2]])
