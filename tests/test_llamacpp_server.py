"""llama.cpp's own OpenAI-compatible server (llama-cpp-python's server extra) as an API base.

The test starts ``python -m llama_cpp.server`` on a tiny GGUF and proxy-tunes through it; the
reference is local proxy-tuning of the same GGUF on this project's llama.cpp backend. What
that server does, read from its source (llama_cpp/server/types.py, app.py; llama.py):

- prompts are text only (a token-id prompt fails validation, answered as HTTP 500), one per
  request (a list of two is an assertion error): the client falls back to text and is given
  ``max_prompts: 1``; the character tokenizer makes the text path exact (no re-tokenization
  drift, checked);
- ``logprobs: k`` has no cap (k = V works) and is computed from the raw logits, before
  ``logit_bias``; every candidate is text, so special tokens all show as ``""`` and map to no
  id, and a stop token ends the completion without its log-probs. ``logit_bias`` on the
  special tokens keeps the server from stopping without changing the log-probs it returns.

So the strongest property that holds: greedy output is local proxy-tuning's token for token
up to the first special token local proxy-tuning chooses (the black-box run cannot choose
one: the server never shows their log-probs by id).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxytune import ProxyTuner
from proxytune.backends import llamacpp
from proxytune.backends.api import EndpointError
from proxytune.backends.gguf_write import write_gguf
from proxytune.engine.blackbox import BlackBoxStats
from proxytune.specs import ModelSpec
from proxytune.testing import build_char_tokenizer, build_model

try:  # the server extra: sse-starlette, starlette-context, pydantic-settings
    import llama_cpp.server.app  # noqa: F401

    SERVER = ""
except ImportError as err:
    SERVER = (
        f"llama_cpp.server cannot be imported ({err}): pip install 'proxytune[llamacpp-server]'"
    )

pytestmark = pytest.mark.skipif(
    bool(SERVER) or not llamacpp.available(), reason=SERVER or llamacpp.INSTALL
)
PROMPTS = ["The quick brown fox", "Numbers: 0 1 2", "def add(a, b):", "Rain"]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """Base, expert and anti-expert over the character tokenizer, as GGUF files."""
    tok = build_char_tokenizer(for_gguf=True)
    root = tmp_path_factory.mktemp("cppserver")
    for name, seed in (("base", 0), ("expert", 1), ("anti", 2)):
        folder = root / name
        model = build_model(tok, seed=seed)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        write_gguf(model, tok, folder / "model.gguf")
    return tok, root


@pytest.fixture(scope="module")
def server(ggufs) -> Iterator[str]:
    """``python -m llama_cpp.server`` on the base GGUF, on a free loopback port."""
    _, root = ggufs
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(root / "base/model.gguf")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "256"]
    log = root / "server.log"  # a file, not a pipe: a full pipe would block the server
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}/v1/models", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"llama_cpp.server did not answer on {url} within {timeout} s")


def spec(root, name: str) -> ModelSpec:
    path = str(root / name / "model.gguf")
    return ModelSpec(path, prompt="raw", device="cpu", backend="llamacpp", threads=1)


def test_black_box_through_llama_cpps_server_is_local_proxy_tuning_until_a_special_token(
    ggufs, server, monkeypatch
):
    tok, root = ggufs
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    specials = set(tok.all_special_ids)
    pair = (spec(root, "expert"), spec(root, "anti"), 1.0)
    local = ProxyTuner.from_specs(spec(root, "base"), [pair])
    remote = ProxyTuner.from_api(
        server,
        "base",
        expert=spec(root, "expert"),
        anti_expert=spec(root, "anti"),
        top_logprobs=len(tok),
        base_options={
            "tokenizer": str(root / "base"),
            "prompt": "raw",
            "max_prompts": 1,
            "extra_body": {"logit_bias": {str(i): -100.0 for i in specials}},
        },
    )
    stats = BlackBoxStats()
    got = remote.generate(PROMPTS, max_new_tokens=24, stats=stats)
    want = local.generate(PROMPTS, max_new_tokens=24)
    compared = 0
    for g, w in zip(got, want, strict=True):
        cut = next((i for i, t in enumerate(w.token_ids) if t in specials), len(w.token_ids))
        assert g.token_ids[:cut] == w.token_ids[:cut]
        assert not specials & set(g.token_ids)
        compared += cut
    assert compared >= 48  # most of the 96 tokens: the property is not vacuous
    assert remote.base.model.prompt_path == "text"  # it refused the token prompt
    assert stats.chunks.text_drift == 0 and stats.mean_coverage > 0.99
    assert stats.api.calls == stats.api.row_requests  # one prompt per call (max_prompts: 1)


def test_its_refusals_are_not_retried(ggufs, server, monkeypatch):
    """A token-id prompt is a validation error that the server answers with HTTP 500: the
    client takes it as a refusal (no retries) when prompt_as is tokens."""
    _, root = ggufs
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    remote = ProxyTuner.from_api(
        server,
        "base",
        expert=spec(root, "expert"),
        anti_expert=spec(root, "anti"),
        base_options={"tokenizer": str(root / "base"), "prompt": "raw", "prompt_as": "tokens"},
    )
    with pytest.raises(EndpointError, match=r"refused the request.*validation error"):
        remote.generate("Rain", max_new_tokens=2)
    assert remote.base.model.usage.retries == 0
