"""Token-level records of what steering did: per generated token, every model's probability.

:func:`analyze` generates for each prompt, then replays the generated tokens through the
teacher-forced scorer (:func:`proxytune.evaluation.scoring.score_ids`, which reproduces
generation's own log-probs) with ``detail=True``, and keeps per token:

- ``p_base``, ``p_expert[i]``, ``p_anti_expert[i]``, ``p_combined``: the token's probability
  under each model and under the combined (sampled-from) distribution;
- ``shift = log p_combined - log p_base``: how far steering raised (> 0) or lowered it;
- ``rank_base``, ``rank_combined`` and ``rank_change = rank_base - rank_combined`` (> 0:
  promoted; a token with ``rank_base > 0`` and ``rank_combined == 0`` is one the base would
  not have picked greedily);
- ``kl_base_combined = KL(p_base || p_combined)`` over the whole vocabulary at that position
  (and the reverse, ``kl_combined_base``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.scoring import render, score_ids

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


@dataclass
class TokenRecord:
    position: int
    token_id: int
    token: str
    """The token decoded on its own (what summaries group by)."""
    text: str
    """The text this token adds to the output (may be empty inside a multi-byte character)."""
    p_base: float
    p_combined: float
    p_experts: list[float | None]
    p_antis: list[float | None]
    shift: float
    rank_base: int
    rank_combined: int
    rank_change: int
    kl_base_combined: float | None
    kl_combined_base: float | None
    top_base: list[tuple[str, float]] = field(default_factory=list)
    """The base's most likely tokens here: ``(text, probability)``."""
    top_combined: list[tuple[str, float]] = field(default_factory=list)

    @property
    def promoted_to_top(self) -> bool:
        """Steering made this the most likely token; the base alone preferred another."""
        return self.rank_combined == 0 and self.rank_base > 0


@dataclass
class SequenceRecord:
    """One generated sequence and its tokens' records."""

    prompt: str
    text: str
    finish_reason: str
    alpha: Any
    tokens: list[TokenRecord]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SequenceRecord:
        tokens = []
        for t in data["tokens"]:
            t = dict(t)
            t["top_base"] = [tuple(x) for x in t.get("top_base", [])]
            t["top_combined"] = [tuple(x) for x in t.get("top_combined", [])]
            tokens.append(TokenRecord(**t))
        return cls(data["prompt"], data["text"], data["finish_reason"], data["alpha"], tokens)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each id adds when decoding ``ids`` left to right; a token that ends inside a
    multi-byte character adds nothing, and the token that completes it adds the character."""
    pieces, shown = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        if text.endswith("\ufffd") or not text.startswith(shown):
            if not text.startswith(shown):  # the tokenizer rewrote earlier text: fall back
                pieces.append(tokenizer.convert_ids_to_tokens(int(ids[i])))
                shown = text
            else:
                pieces.append("")
            continue
        pieces.append(text[len(shown) :])
        shown = text
    return pieces


def analyze(
    tuner: ProxyTuner,
    prompts: Sequence[str],
    *,
    alpha: Any = None,
    rule: Any = None,
    top: int = 5,
    batch_size: int = 8,
    progress: bool = False,
    **settings: Any,
) -> list[SequenceRecord]:
    """Generate for ``prompts`` with ``tuner`` (``settings`` as for ``generate``; greedy by
    default) and record every generated token (see the module docstring), ``batch_size``
    prompts at a time (with a progress bar if ``progress``)."""
    from tqdm.auto import tqdm

    steering: dict[str, Any] = {}
    if alpha is not None:
        steering["alpha"] = alpha
    if rule is not None:
        steering["rule"] = rule
    out: list[SequenceRecord] = []
    bar = tqdm(total=len(prompts), desc="analyze", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = list(prompts[start : start + max(1, batch_size)])
        out += _analyze_batch(tuner, chunk, steering, top, alpha, settings)
        bar.update(len(chunk))
    bar.close()
    return out


def _analyze_batch(
    tuner: ProxyTuner,
    prompts: list[str],
    steering: dict[str, Any],
    top: int,
    alpha: Any,
    settings: dict[str, Any],
) -> list[SequenceRecord]:
    results = tuner.generate(list(prompts), **steering, **settings)
    rendered = [render(tuner, p) for p in prompts]
    scored = score_ids(
        tuner,
        [rendered[r.prompt_index] for r in results],
        [r.token_ids for r in results],
        prompts=[prompts[r.prompt_index] for r in results],
        detail=True,
        top=top,
        **steering,
    )
    tok = tuner.tokenizer
    n_pairs = len(tuner.pairs)

    def text_of(token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=False)

    def prob(lp: float | None) -> float | None:
        return None if lp is None else math.exp(lp)

    out = []
    for r, s in zip(results, scored, strict=True):
        pieces = token_texts(tok, r.token_ids)
        records = []
        for j, (t, piece) in enumerate(zip(s.tokens, pieces, strict=True)):
            lp_base = t.model_logprobs["base"]
            records.append(
                TokenRecord(
                    position=j,
                    token_id=t.token_id,
                    token=text_of(t.token_id),
                    text=piece,
                    p_base=math.exp(lp_base),
                    p_combined=math.exp(t.logprob),
                    p_experts=[prob(t.model_logprobs.get(f"expert[{i}]")) for i in range(n_pairs)],
                    p_antis=[
                        prob(t.model_logprobs.get(f"anti_expert[{i}]")) for i in range(n_pairs)
                    ],
                    shift=t.logprob - lp_base,
                    rank_base=t.model_ranks["base"],
                    rank_combined=int(t.rank or 0),
                    rank_change=t.model_ranks["base"] - int(t.rank or 0),
                    kl_base_combined=_finite(t.kl_base_combined),
                    kl_combined_base=_finite(t.kl_combined_base),
                    top_base=[(text_of(i), math.exp(v)) for i, v in t.top_base],
                    top_combined=[(text_of(i), math.exp(v)) for i, v in t.top],
                )
            )
        out.append(
            SequenceRecord(
                prompt=prompts[r.prompt_index],
                text=r.text,
                finish_reason=r.finish_reason,
                alpha=alpha if isinstance(alpha, (int, float)) else None,
                tokens=records,
            )
        )
    return out


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: an infinite KL (the rule masked a token the base allows) -> None."""
    return value if value is not None and math.isfinite(value) else None


def save_records(records: Sequence[SequenceRecord], path: str | Path) -> Path:
    """One JSON line per sequence."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return path


def load_records(path: str | Path) -> list[SequenceRecord]:
    with open(path, encoding="utf-8") as f:
        return [SequenceRecord.from_dict(json.loads(line)) for line in f if line.strip()]
