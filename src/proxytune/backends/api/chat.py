"""A chat-completions endpoint as an API base: requests and answers in the legacy shape.

The client (:mod:`.client`) speaks ``/v1/completions``; with ``endpoint: chat`` it builds
each request with :func:`chat_body` (one conversation: the prompt as the user message, the
tokens so far as an assistant message that the endpoint continues) and reads each answer
through :func:`legacy_choice`, so that the rest of the client is shared. Only endpoints that
continue the final assistant message (vLLM's ``continue_final_message``) give the right
prefix after the first call; see docs/black-box.md.
"""

from __future__ import annotations

from typing import Any


def chat_body(text: str, reply: str, top: int | None) -> dict[str, Any]:
    """A chat request's fields for one prefix ``text`` ending in the generated ``reply``: the
    rest as the user message, the reply as an assistant message the endpoint continues (vLLM's
    ``continue_final_message``), and ``top`` alternatives per position.

    >>> chat_body("Hi! Hel", "Hel", 2)["messages"][1]
    {'role': 'assistant', 'content': 'Hel'}
    """
    messages = [{"role": "user", "content": text[: len(text) - len(reply)]}]
    if reply:
        messages.append({"role": "assistant", "content": reply})
    body: dict[str, Any] = {"messages": messages}
    if reply:
        body.update(continue_final_message=True, add_generation_prompt=False)
    if top is not None:
        body.update(logprobs=True, top_logprobs=top)
    return body


def legacy_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice in the legacy completions shape (``text``; ``tokens``, ``token_logprobs``,
    ``top_logprobs``), each candidate named by its ``bytes`` where given (exact)."""
    out = {"index": choice.get("index", 0), "finish_reason": choice.get("finish_reason")}
    out["text"] = (choice.get("message") or {}).get("content") or ""
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        out["logprobs"] = {
            "tokens": [_chat_token(c) for c in content],
            "token_logprobs": [c.get("logprob") for c in content],
            "top_logprobs": [
                {_chat_token(t): t.get("logprob") for t in c.get("top_logprobs") or []}
                for c in content
            ],
        }
    return out


def _chat_token(entry: dict[str, Any]) -> str:
    """A chat candidate's name for :class:`CandidateMapper`: ``token_id:N`` as given, else its
    UTF-8 ``bytes`` (as ``bytes:\\xNN...``), else its text."""
    token = str(entry.get("token", ""))
    raw = entry.get("bytes")
    if token.startswith("token_id:") or not raw:
        return token
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
