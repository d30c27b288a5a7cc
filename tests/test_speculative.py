"""Speculative proxy decoding is exact; stacked roles, int8 layers and cached prefixes keep it."""

from __future__ import annotations

import json

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.arithmetic import combine_proxy, log_probs
from proxytune.backends.llamacpp_prompts import common_prefix
from proxytune.backends.quantize import Int8Linear
from proxytune.backends.stacked import LockstepError, StackedView
from proxytune.cli import main
from proxytune.config import GenerationConfig, parse_draft_length
from proxytune.engine import Member, Pair, prepare
from proxytune.engine.speculative import (
    RoundCosts,
    SpeculativeStats,
    best_draft_length,
    speculative_decode,
)
from proxytune.errors import ConfigError
from proxytune.sampling import shape_scores
from proxytune.schedules import Constant
from proxytune.specs import ModelSpec

PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return", "Once upon a"]


def ids(results):
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def drafting(tiny_dirs):
    """A pair whose expert shares the base's weights: drafts are often, not always, accepted."""
    return ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["base"]),
        anti_expert=str(tiny_dirs["anti"]),
        alpha=0.5,
        base_prompt="raw",
        expert_prompt="raw",
        anti_expert_prompt="raw",
        device="cpu",
    )


# -- greedy: token for token the plain loop ---------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, "auto"])
def test_greedy_equals_the_plain_loop_batched(drafting, tuner, k):
    for t in (drafting, tuner):  # high and low acceptance
        want = t.generate(PROMPTS, max_new_tokens=24)
        stats = SpeculativeStats()
        got = t.generate(PROMPTS, max_new_tokens=24, speculative=k, stats=stats)
        assert ids(got) == ids(want)
        assert [r.text for r in got] == [r.text for r in want]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
        assert stats.proposed > 0 and 0 <= stats.acceptance_rate <= 1
    assert stats.tokens_per_round >= 1


def test_rows_finish_mid_draft_on_stop_strings_eos_and_budget(drafting):
    plain = drafting.generate(PROMPTS, max_new_tokens=20)
    eos = plain[0].token_ids[3]  # an id that turns up mid-generation: rows end inside a draft
    stop = plain[2].text[5:7]
    cases = [
        {"eos_token_ids": (eos,)},
        {"stop": [stop]},
        {"stop": [stop], "eos_token_ids": (eos,)},
        {"max_new_tokens": 1},
        {"max_new_tokens": 2},
        {"max_new_tokens": 7},
    ]
    for case in cases:
        settings = {"max_new_tokens": 20, **case}
        want = drafting.generate(PROMPTS, **settings)
        got = drafting.generate(PROMPTS, speculative=4, **settings)
        assert ids(got) == ids(want), case
        assert [r.text for r in got] == [r.text for r in want], case
        assert [(r.finish_reason, r.stop_reason) for r in got] == [
            (r.finish_reason, r.stop_reason) for r in want
        ], case
    ended = drafting.generate(PROMPTS, max_new_tokens=20, eos_token_ids=(eos,), speculative=4)
    assert any(r.stop_reason == eos for r in ended)
    assert any(r.stop_reason == stop for r in drafting.generate(PROMPTS, stop=[stop]))


def test_penalties_logprobs_n_and_no_cache_match(drafting):
    for settings in (
        {"repetition_penalty": 1.3, "presence_penalty": 0.2},
        {"logprobs": True, "top_logprobs": 3, "n": 2},
        {"use_cache": False},
    ):
        want = drafting.generate(PROMPTS, max_new_tokens=12, **settings)
        got = drafting.generate(PROMPTS, max_new_tokens=12, speculative=3, **settings)
        assert ids(got) == ids(want), settings
        if settings.get("logprobs"):
            for a, b in zip(got, want, strict=True):
                assert [x.top[0][0] for x in a.logprobs] == [x.top[0][0] for x in b.logprobs]
                for x, y in zip(a.logprobs, b.logprobs, strict=True):
                    assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_a_perfect_drafter_is_always_accepted(tiny_dirs):
    """Expert and anti-expert equal: the target is the base, and the expert is the base."""
    same = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["base"]),
        anti_expert=str(tiny_dirs["base"]),
        base_prompt="raw",
        expert_prompt="raw",
        anti_expert_prompt="raw",
        device="cpu",
    )
    stats = SpeculativeStats()
    got = same.generate(PROMPTS, max_new_tokens=16, speculative=3, stats=stats)
    assert ids(got) == ids(same.generate(PROMPTS, max_new_tokens=16))
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_round > 3


def test_steps_stream_one_list_per_position(drafting):
    steps = list(drafting.steps(PROMPTS, max_new_tokens=10, speculative=3))
    for updates in steps:
        rows = [u.row for u in updates]
        assert len(rows) == len(set(rows))  # at most one new token per row per list
    assert sum(len(u) for u in steps) == sum(
        len(r.token_ids) for r in drafting.generate(PROMPTS, max_new_tokens=10)
    )


def test_seeded_sampling_is_the_same_batched_or_alone(drafting):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2, speculative="auto")
    batched = drafting.generate(PROMPTS, **kw)
    alone = [r for p in PROMPTS for r in drafting.generate([p], **kw)]
    assert ids(batched) == ids(alone)
    assert ids(drafting.generate(PROMPTS, **kw)) == ids(batched)


def test_no_pair_to_draft_with_falls_back_to_the_plain_loop(tuner):
    stats = SpeculativeStats()
    got = tuner.generate(PROMPTS, alpha=0.0, max_new_tokens=6, speculative=2, stats=stats)
    assert ids(got) == ids(tuner.generate(PROMPTS, alpha=0.0, max_new_tokens=6))
    assert stats.rounds == 0


def test_draft_length_settings():
    assert parse_draft_length("auto") == "auto" and parse_draft_length("3") == 3
    for bad in (0, -1, "x", 1.5, True):
        with pytest.raises(ConfigError):
            parse_draft_length(bad)
    flat = RoundCosts(draft_ratio=0.1).round_cost  # before any measurement
    assert best_draft_length([0.95], flat) > best_draft_length([0.5], flat) >= 1
    assert best_draft_length([0.95, 0.5], flat) == best_draft_length([0.95, 0.5, 0.5, 0.95], flat)


def test_cli_speculative(tiny_dirs, capsys):
    args = ["generate", "--base", str(tiny_dirs["base"]), "--expert", str(tiny_dirs["base"])]
    args += ["--anti-expert", str(tiny_dirs["anti"]), "--expert-prompt", "raw"]
    args += ["--alpha", "0.5", "--max-new-tokens", "8", "--device", "cpu", "--json", "Rain"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)
    for k in ("2", "auto"):
        assert main([*args, "--speculative", k]) == 0
        out = capsys.readouterr()
        assert json.loads(out.out)["token_ids"] == want["token_ids"]
        assert "drafts accepted" in out.err


# -- sampling: the distribution of the plain loop ------------------------------------------------

VOCAB = 5


class Letters:
    """A tokenizer of the letters a..e (ids 0..4)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - ord("a") for c in text]}

    def decode(self, ids, **_):
        return "".join(chr(ord("a") + i) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return self.decode([ids]) if isinstance(ids, int) else [self.decode([i]) for i in ids]


class Scripted:
    """A mock LogitsModel: fixed random logits per (position, last id)."""

    def __init__(self, seed, scale=1.5):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(16, VOCAB, VOCAB, generator=g) * scale
        self.name, self.tokenizer, self.device = f"scripted{seed}", Letters(), torch.device("cpu")
        self.vocab_width, self.context_length, self.eos_token_ids = VOCAB, 16, ()

    def logits(self, seq):
        return self.table[len(seq), seq[-1]]

    def start(self, prompts, use_cache=True):
        state = ScriptedState(self, [list(p) for p in prompts])
        return state, torch.stack([self.logits(s) for s in state.seqs])


class ScriptedState:
    def __init__(self, model, seqs):
        self.model, self.seqs = model, seqs

    def advance(self, tokens):
        out = []
        for seq, row in zip(self.seqs, tokens.tolist(), strict=True):
            steps = []
            for t in row:
                seq.append(t)
                steps.append(self.model.logits(seq))
            out.append(torch.stack(steps))
        return torch.stack(out)

    def keep(self, rows):
        self.seqs = [self.seqs[i] for i in rows.tolist()]

    def rollback(self, drop):
        for seq, d in zip(self.seqs, torch.as_tensor(drop).tolist(), strict=True):
            del seq[len(seq) - d :]


def exact_joint(models, alpha, prompt, config):
    """P(x1, x2, x3) of the plain loop, from the same arithmetic and sampling chain."""

    def p(seq):
        lps = [log_probs(m.logits(seq)[None], VOCAB) for m in models]
        scores = combine_proxy(lps[0], [(lps[1], lps[2])], [alpha])
        shaped = shape_scores(
            scores,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
            repetition_penalty=config.repetition_penalty,
            history=[seq],
        )
        return torch.softmax(shaped, dim=-1)[0].double()

    joint = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    p1 = p(prompt)
    for a in range(VOCAB):
        p2 = p([*prompt, a])
        for b in range(VOCAB):
            joint[a, b] = p1[a] * p2[b] * p([*prompt, a, b])
    return joint


def tv(p, q):
    """Total variation distance."""
    return float((p - q).abs().sum() / 2)


def chi_square(counts, expected):
    """Pearson's statistic and its 0.1% critical value (Wilson-Hilferty), over possible cells."""
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
    return stat, critical


@pytest.mark.parametrize(
    ("k", "settings"),
    [
        (3, {"temperature": 1.0}),
        ("auto", {"temperature": 0.8, "top_k": 4, "top_p": 0.95, "repetition_penalty": 1.3}),
    ],
)
def test_sampled_tokens_follow_the_target_distribution(k, settings):
    """2500 seeded rows of 3 tokens on a 5-id vocabulary; chi-square (0.1% level) and total
    variation against the exact joint law of consecutive token pairs."""
    models = (Scripted(0), Scripted(1), Scripted(2))
    alpha, prompt, n = 0.7, "ab", 2500
    config = GenerationConfig(max_new_tokens=3, seed=1234, n=n, ignore_eos=True, **settings)
    base = Member("base", models[0])
    pair = Pair(
        Member("expert[0]", models[1]), Member("anti_expert[0]", models[2]), Constant(alpha)
    )
    stats = SpeculativeStats()
    rows: dict[int, list[int]] = {}
    request = prepare(base, [pair], [prompt], config, VOCAB, ())
    for updates in speculative_decode(request, k=k, stats=stats):
        for u in updates:
            rows.setdefault(u.row, []).append(u.token_id)
    samples = torch.tensor(list(rows.values()))
    assert samples.shape == (n, 3)
    assert 0.2 < stats.acceptance_rate < 0.95  # both branches (accept, residual) are exercised
    joint = exact_joint(models, alpha, [0, 1], config)
    for axes, law in (((0, 1), joint.sum(2)), ((1, 2), joint.sum(0))):
        counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
        for a, b in samples[:, list(axes)].tolist():
            counts[a, b] += 1
        stat, critical = chi_square(counts, n * law)
        assert stat < critical, axes
        assert tv(counts / n, law) < 0.05
    # the test has power: the draft's own law (what accepting every draft would give) is far
    draft = exact_joint((models[1],) * 3, 0.0, [0, 1], config).sum(2)
    assert tv(draft, joint.sum(2)) > 0.2


class Clock:
    """A fake clock that the timed mock models advance: forwards cost what the test says."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Timed(Scripted):
    """:class:`Scripted` with 64 positions, whose forwards advance ``clock`` by
    ``per_call + per_position * width``."""

    def __init__(self, seed, clock, per_call, per_position):
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(64, VOCAB, VOCAB, generator=g) * 1.5
        self.context_length = 64
        self.clock, self.per_call, self.per_position = clock, per_call, per_position

    def start(self, prompts, use_cache=True):
        state, first = super().start(prompts, use_cache)
        return TimedState(self, state.seqs), first


class TimedState(ScriptedState):
    def advance(self, tokens):
        self.model.clock.now += self.model.per_call + self.model.per_position * tokens.shape[1]
        return super().advance(tokens)


@pytest.mark.parametrize(
    ("verify_call", "verify_position", "drafts"), [(0, 1, "few"), (1, 0, "many")]
)
def test_auto_learns_what_drafting_costs(verify_call, verify_position, drafts):
    """``k='auto'`` measures its rounds: where verifying ``n`` positions costs ``n`` times one
    (a compute-bound CPU) it soon drafts nothing (plain steps); where it costs the same at any
    width (memory-bound, a GPU) it keeps drafting several tokens per round."""
    clock = Clock()
    base = Member("base", Timed(0, clock, verify_call, verify_position))
    expert = Member("expert[0]", Timed(1, clock, 0.2, 0.0))
    anti = Member("anti_expert[0]", Timed(2, clock, verify_call, verify_position))
    pair = Pair(expert, anti, Constant(0.7))
    config = GenerationConfig(max_new_tokens=40, n=4, ignore_eos=True)  # greedy: timed
    stats = SpeculativeStats()
    rounds = speculative_decode(
        prepare(base, [pair], ["ab"], config, VOCAB, ()), k="auto", stats=stats, clock=clock
    )
    emitted = sum(len(updates) for updates in rounds)
    assert emitted == 4 * 40
    drafts_per_row_round = stats.proposed / stats.row_rounds
    if drafts == "few":
        assert drafts_per_row_round < 0.3 and stats.tokens_per_round < 1.3
    else:
        assert drafts_per_row_round > 1.0 and stats.tokens_per_round > 1.4
    # the same stats carry the measured costs into the next call: no exploring again
    proposed, costs = stats.proposed, stats.costs
    assert costs is not None and costs.draft is not None and costs.verify
    again = speculative_decode(
        prepare(base, [pair], ["ab"], config, VOCAB, ()), k="auto", stats=stats, clock=clock
    )
    assert sum(len(updates) for updates in again) == 4 * 40
    assert stats.costs is costs
    if drafts == "few":
        assert stats.proposed == proposed


# -- rollback, stacked roles, int8 ---------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_rollback_per_row_equals_a_fresh_prefill(tuner, use_cache):
    lm = tuner.base.model
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
    state, _ = lm.start(prompts, use_cache=use_cache)
    fed = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31]])
    state.advance(fed)
    drop = [1, 4, 2]
    state.rollback(torch.tensor(drop))
    nxt = torch.tensor([[40], [41], [42]])
    got = state.advance(nxt)[:, -1]
    kept = [
        p + f[: 4 - d] + n
        for p, f, d, n in zip(prompts, fed.tolist(), drop, nxt.tolist(), strict=True)
    ]
    _, want = lm.start(kept)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert state.ids.shape[1] == max(len(s) for s in kept)  # the freed columns were cut


def test_stacked_roles_share_one_forward_and_change_nothing(tiny_dirs):
    plain = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["expert"]),  # one model, two prompts: chat and raw
        expert_prompt="chat",
        anti_expert_prompt="raw",
        device="cpu",
    )
    stacked = plain.with_options(stacked=True)
    assert isinstance(stacked.pairs[0].expert.model, StackedView)
    assert stacked.base.model is plain.base.model  # not shared: left alone
    lm = plain.pairs[0].expert.model
    shapes = []
    forward = lm.forward
    lm.forward = lambda **kw: shapes.append(kw["input_ids"].shape[0]) or forward(**kw)
    try:
        for settings in ({}, {"temperature": 1.0, "seed": 3, "n": 2}, {"stop": ["e"]}):
            shapes.clear()
            got = stacked.generate(PROMPTS, max_new_tokens=10, **settings)
            n_rows = len(PROMPTS) * settings.get("n", 1)
            assert 2 * n_rows in shapes  # decode steps ran both roles' rows together
            assert ids(got) == ids(plain.generate(PROMPTS, max_new_tokens=10, **settings))
        assert ids(stacked.generate(PROMPTS, max_new_tokens=10, speculative=2)) == ids(
            plain.generate(PROMPTS, max_new_tokens=10)
        )
    finally:
        lm.forward = forward


def test_stacked_roles_driven_apart_raise(tiny_dirs):
    plain = ProxyTuner.from_pretrained(
        str(tiny_dirs["base"]),
        expert=str(tiny_dirs["expert"]),
        anti_expert=str(tiny_dirs["expert"]),
    )
    view = plain.with_options(stacked=True).pairs[0].expert.model
    a, _ = view.start([[5, 6]])
    b, _ = view.start([[7, 8, 9]])
    a.advance(torch.tensor([[1]]))
    with pytest.raises(LockstepError):
        b.advance(torch.tensor([[2]]))


def test_int8_linear_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quant = Int8Linear(linear)
    x = torch.randn(2, 5, 64) * torch.rand(2, 5, 1) * 10
    full = quant(x)
    alone = torch.stack(
        [torch.stack([quant(x[i, j][None])[0] for j in range(5)]) for i in range(2)]
    )
    assert torch.equal(full, alone)  # bit for bit
    with torch.no_grad():
        ref = linear(x)
    assert float((full - ref).norm() / ref.norm()) < 0.02


def test_int8_models_decode_batched_and_speculatively(tiny_dirs):
    """On the tiny models int8 output is the same batched, alone and speculative. (On real
    models activation rounding can amplify float noise between batch shapes: docs/speed.md.)"""

    def spec(name, **kw):
        return ModelSpec(str(tiny_dirs[name]), device="cpu", quantize="int8", **kw)

    quant = ProxyTuner.from_specs(spec("base"), [(spec("base", prompt="raw"), spec("anti"), 0.5)])
    assert isinstance(quant.base.model.model.model.layers[0].mlp.up_proj, Int8Linear)
    want = quant.generate(PROMPTS, max_new_tokens=12)
    assert ids(quant.generate(PROMPTS, max_new_tokens=12, speculative=3)) == ids(want)
    assert ids(want) == [quant.generate([p], max_new_tokens=12)[0].token_ids for p in PROMPTS]
    with pytest.raises(ConfigError):
        ModelSpec("x", quantize="int4")


def test_a_shared_prefix_is_prefilled_once_and_changes_nothing(drafting):
    cached = drafting.with_options(prefix_cache=True, prefix_min_tokens=4)
    lm = cached.base.model
    assert cached.pairs[0].expert.model is lm  # roles on one model share one cache
    preamble = "Question: what is two plus three? Answer: five. Question: "
    prompts = [preamble + p for p in PROMPTS]
    want = drafting.generate(prompts, max_new_tokens=12)
    assert ids(cached.generate(prompts, max_new_tokens=12)) == ids(want)
    assert ids(cached.generate(prompts, max_new_tokens=12, speculative=3)) == ids(want)
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "seed": 5}
    assert ids(cached.generate(prompts, **sampled)) == ids(drafting.generate(prompts, **sampled))
    assert len(lm.prefixes) == 1
    (prefix,) = lm.prefixes
    rendered = [lm.tokenizer(p)["input_ids"] for p in prompts]
    assert prefix == common_prefix(rendered)
    before = lm.reused_tokens
    alone = cached.generate([preamble + "Rain"], max_new_tokens=6)  # a later request: a hit
    assert lm.reused_tokens == before + 2 * len(prefix)  # base and expert roles
    assert ids(alone) == ids(drafting.generate([preamble + "Rain"], max_new_tokens=6))


def test_one_pass_lora_pair_rolls_back_and_stays_exact(tiny_dirs, tmp_path):
    """Expert = a LoRA adapter on the anti-expert's weights, both served by one model
    (``backends/lora_pair.py``): the drafter runs on its own, the anti-expert verifies, and
    both roll back per row; greedy output equals the plain loop's."""
    from proxytune.testing import save_tiny_lora

    save_tiny_lora(tiny_dirs["anti"], tmp_path / "adapter", seed=3)
    cpu = {"device": "cpu", "dtype": "float32"}
    anti = ModelSpec(str(tiny_dirs["anti"]), **cpu)
    expert = ModelSpec(str(tiny_dirs["anti"]), adapter=str(tmp_path / "adapter"), **cpu)
    one_pass = ProxyTuner.from_specs(ModelSpec(str(tiny_dirs["base"]), **cpu), [(expert, anti, 1)])
    assert type(one_pass.pairs[0].expert.model).__name__ == "LoraView"
    want = one_pass.generate(PROMPTS, max_new_tokens=16)
    for k in (2, "auto"):
        stats = SpeculativeStats()
        got = one_pass.generate(PROMPTS, max_new_tokens=16, speculative=k, stats=stats)
        assert ids(got) == ids(want)
        assert stats.proposed > 0
    sampled = one_pass.generate(PROMPTS, max_new_tokens=8, speculative=3, temperature=0.9, seed=5)
    alone = [
        one_pass.generate([p], max_new_tokens=8, speculative=3, temperature=0.9, seed=5)[0]
        for p in PROMPTS
    ]
    assert ids(sampled) == ids(alone)
