"""Token-level analysis: records against the engine, summaries by hand, the HTML report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from proxytune.analysis import (
    SequenceRecord,
    TokenRecord,
    analyze,
    load_records,
    promoted_tokens,
    render_html,
    save_records,
    shift_color,
    summarize,
    token_texts,
    write_report,
)

PROMPTS = ["The quick brown", "def add(a, b):"]


@pytest.fixture(scope="module")
def records(tuner) -> list[SequenceRecord]:
    return analyze(tuner, PROMPTS, max_new_tokens=8, top=3)


def test_records_match_generation(tuner, records) -> None:
    results = tuner.generate(PROMPTS, max_new_tokens=8, logprobs=True)
    assert len(records) == len(results)
    for rec, res in zip(records, results, strict=True):
        assert [t.token_id for t in rec.tokens] == res.token_ids
        assert rec.text == res.text
        for t, lp in zip(rec.tokens, res.logprobs, strict=True):
            assert math.log(t.p_combined) == pytest.approx(lp.logprob, abs=1e-4)
            assert t.shift == pytest.approx(math.log(t.p_combined) - math.log(t.p_base), abs=1e-5)
            assert t.rank_change == t.rank_base - t.rank_combined
            assert t.rank_combined == 0  # greedy decoding picks the combined top token
            assert t.kl_base_combined is not None and t.kl_base_combined >= -1e-6
            assert len(t.p_experts) == len(t.p_antis) == 1
            assert 0 < t.p_experts[0] <= 1 and 0 < t.p_antis[0] <= 1
            assert len(t.top_combined) == 3 and t.top_combined[0][1] == pytest.approx(
                t.p_combined, rel=1e-4
            )


def test_alpha_zero_changes_nothing(tuner) -> None:
    (rec,) = analyze(tuner, PROMPTS[:1], alpha=0.0, max_new_tokens=5)
    for t in rec.tokens:
        assert t.shift == pytest.approx(0.0, abs=1e-6)
        assert t.kl_base_combined == pytest.approx(0.0, abs=1e-6)
        assert t.rank_change == 0 and not t.promoted_to_top


def test_token_texts_add_up_to_the_decoded_text(tuner) -> None:
    tok = tuner.tokenizer
    ids = tok("héllo wörld, the quick brown fox", add_special_tokens=False)["input_ids"]
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids)


def _token(text: str, shift: float, rank_base: int = 0, rank_combined: int = 0) -> TokenRecord:
    p_base = 0.1
    return TokenRecord(
        position=0,
        token_id=0,
        token=text,
        text=text,
        p_base=p_base,
        p_combined=p_base * math.exp(shift),
        p_experts=[0.5],
        p_antis=[0.2],
        shift=shift,
        rank_base=rank_base,
        rank_combined=rank_combined,
        rank_change=rank_base - rank_combined,
        kl_base_combined=0.5,
        kl_combined_base=0.4,
    )


def test_promoted_tokens_by_hand() -> None:
    seq = SequenceRecord(
        prompt="p",
        text="",
        finish_reason="length",
        alpha=1.0,
        tokens=[
            _token(" Therefore", 2.0, rank_base=3),
            _token(" Therefore", 1.0, rank_base=1),
            _token(" Paris", 0.5),
            _token("\n", -1.0),
            _token(" Let", 3.0, rank_base=2),
        ],
    )
    rows = promoted_tokens([seq], n=10, min_count=1)
    assert [r["token"] for r in rows] == [" Let", " Therefore", " Paris", "\n"]
    therefore = rows[1]
    assert therefore["count"] == 2
    assert therefore["mean_shift"] == pytest.approx(1.5)
    assert therefore["promoted_to_top"] == 2
    assert [r["token"] for r in promoted_tokens([seq], min_count=2)] == [" Therefore"]
    s = summarize([seq])
    assert s["tokens"] == 5 and s["promoted_to_top"] == 3
    assert s["mean_shift"] == pytest.approx((2 + 1 + 0.5 - 1 + 3) / 5)
    assert s["share_promoted_to_top"] == pytest.approx(0.6)


def test_shift_colours() -> None:
    assert shift_color(0.0) == "rgba(0, 0, 0, 0.00)"
    assert shift_color(1.0).startswith("rgba(46, 160, 67")  # green: raised
    assert shift_color(-1.0).startswith("rgba(207, 34, 46")  # red: lowered
    assert shift_color(100.0) == shift_color(2.0)  # saturates at the scale


def test_html_report_written_with_the_tokens(records, tmp_path: Path) -> None:
    paths = write_report(records, tmp_path / "report")
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for rec in records:
        for t in rec.tokens:
            if t.text.strip() and t.text.isprintable():
                assert f">{_escape(t.text)}</span>" in page
    assert page.count('class="tok') == sum(len(r.tokens) for r in records)
    assert "Most promoted tokens" in page and "KL(base||combined)" in page
    for name in ("shift_hist", "kl_by_position", "promoted_tokens", "p_base_vs_combined"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
        assert f'src="{paths[name].name}"' in page
    assert load_records(paths["records"])[0].tokens == records[0].tokens


def test_html_escapes_token_text() -> None:
    seq = SequenceRecord("<b>prompt</b>", "", "stop", None, [_token("<script>", 1.0)])
    page = render_html([seq])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;prompt&lt;/b&gt;" in page


def test_records_round_trip(records, tmp_path: Path) -> None:
    path = save_records(records, tmp_path / "r.jsonl")
    assert load_records(path) == records


def _escape(text: str) -> str:
    import html

    return html.escape(text)
