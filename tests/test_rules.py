"""Steering rules: each against a hand computation, the edge cases that reduce to plain
decoding, -inf inputs, emptied distributions, and the wiring (tuner, recipe, CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.arithmetic import combine_proxy
from proxytune.cli import main
from proxytune.errors import ConfigError, NumericalError
from proxytune.recipe import parse_recipe
from proxytune.rules import (
    RULES,
    Args,
    Context,
    Gated,
    Mixture,
    PairInfo,
    Pairs,
    Plausible,
    Product,
    Proxy,
    Request,
    Rerank,
    StepContext,
    Tokens,
    args_scores,
    choose_alphas,
    confidence_gate,
    describe,
    entropy,
    make_rule,
    merge_specs,
    mixture_scores,
    parse_rule_args,
)

INF = math.inf
PROMPTS = ["The quick brown fox", "Rain", "def add(a, b):\n    return"]


def lsm(row: list[float]) -> list[float]:
    """log_softmax by hand."""
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def ent(row: list[float]) -> float:
    """Entropy (nats) of log-probs by hand."""
    return -sum(math.exp(x) * x for x in row if x > -INF)


def T(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


B = [lsm([2.0, 1.0, 0.0, -1.0]), lsm([0.0, 0.5, 3.0, 0.0])]
E = [lsm([0.0, 3.0, 0.0, 0.0]), lsm([1.0, 0.0, 0.0, 2.0])]
A = [lsm([1.0, 1.0, 1.0, 1.0]), lsm([0.0, 0.0, 1.0, 0.0])]
V = 4


def ctx(pairs=None, alphas=(1.0,), base=None, **kw) -> StepContext:
    """The fixed context: ``B`` with one pair ``(E, A)`` unless told otherwise."""
    pairs = ((T(E), T(A)),) if pairs is None else pairs
    return StepContext(T(B) if base is None else base, pairs, alphas, **kw)


def close(got: torch.Tensor, want: list[list[float]]) -> None:
    assert got.tolist() == [pytest.approx(w, abs=1e-5) for w in want]


# -- proxy and calibration --------------------------------------------------------------------


def test_proxy_rule_is_the_paper_formula_bit_for_bit():
    c = ctx(alphas=(0.5,))
    assert torch.equal(Proxy()(c), combine_proxy(T(B), [(T(E), T(A))], [0.5]))
    close(Proxy()(c), [[B[r][t] + 0.5 * (E[r][t] - A[r][t]) for t in range(V)] for r in range(2)])
    assert torch.equal(Proxy()(ctx(alphas=(0.0,))), T(B))  # alpha = 0: plain decoding
    # a pair the loop did not run is (None, None) and contributes nothing
    assert torch.equal(Proxy()(ctx(pairs=((None, None),), alphas=(3.0,))), T(B))


def test_rule_temperatures_are_bounded_so_the_scores_stay_finite():
    for t in (1e-300, 5e-324, 1e-5, 1e300, 0.0, -1.0, math.inf):
        with pytest.raises(
            ConfigError,
            match=r"temperatures\['expert'\] must be a finite number in \[0.0001, 10000.0\]",
        ):
            make_rule({"name": "product", "temperatures": {"expert": t}})
    masked = T([[0.0, -INF, 1.0, 2.0]])  # a masked token: -inf / T must not turn into NaN
    for t in (1e-4, 1e4):
        rule = make_rule({"name": "proxy", "temperatures": {"base": t, "expert": t}})
        got = rule(ctx(base=masked, pairs=((T(E[:1]), T(A[:1])),)))
        assert not got.isnan().any() and torch.isneginf(got[0, 1])


def test_calibration_divides_each_model_by_its_temperature_before_combining():
    rule = Proxy(temperatures={"base": 0.5, "expert": 2.0})
    got = rule(ctx())
    want = [
        [
            lsm([x / 0.5 for x in B[r]])[t] + lsm([x / 2.0 for x in E[r]])[t] - A[r][t]
            for t in range(V)
        ]
        for r in range(2)
    ]
    close(got, want)
    # a per-pair key wins over the generic one; T = 1 is exact
    assert torch.equal(Proxy(temperatures={"expert": 2.0, "expert[0]": 1.0})(ctx()), Proxy()(ctx()))


def test_calibration_settings_are_checked():
    with pytest.raises(ConfigError, match=r"proxy.temperatures\['expert'\] must be a finite"):
        Proxy(temperatures={"expert": 0.0})
    with pytest.raises(ConfigError, match="not a model role"):
        Proxy(temperatures={"expert_0": 1.0})
    with pytest.raises(ConfigError, match=r"names 'expert\[1\]' but there are 1 pair"):
        Proxy(temperatures={"expert[1]": 2.0})(ctx())
    with pytest.raises(ConfigError, match="pair 0 has no anti_expert"):
        Proxy(temperatures={"anti_expert[0]": 2.0})(ctx(pairs=((T(E), None),)))


# -- product of experts and mixture -----------------------------------------------------------


def test_product_of_experts_by_hand_and_it_never_runs_anti_experts():
    got = Product(temperatures={"expert": 2.0})(ctx(alphas=(0.7,)))
    close(
        got, [[B[r][t] + 0.7 * lsm([x / 2 for x in E[r]])[t] for t in range(V)] for r in range(2)]
    )
    assert torch.equal(Product()(ctx(alphas=(0.0,))), T(B))
    request = Request(pairs=(PairInfo(True, True), PairInfo(True, True, always_off=True)))
    assert Product().needs(request) == ((True, False), (False, False))
    with pytest.raises(ConfigError, match="pair 0 has only an anti-expert"):
        Product().needs(Request(pairs=(PairInfo(False, True),)))


def test_mixture_by_hand_and_its_limits():
    got = Mixture()(ctx(alphas=(0.3,)))
    want = [
        [math.log(0.7 * math.exp(B[r][t]) + 0.3 * math.exp(E[r][t])) for t in range(V)]
        for r in range(2)
    ]
    close(got, want)
    assert torch.equal(Mixture()(ctx(alphas=(0.0,))), T(B))  # w = 0: plain decoding, exactly
    close(Mixture()(ctx(alphas=(1.0,))), E)  # w = 1: the expert alone
    # per-row weights: a row with w = 0 is the base bit for bit
    per_row = Mixture()(ctx(alphas=(torch.tensor([[0.0], [0.5]]),)))
    assert torch.equal(per_row[0], T(B)[0])
    with pytest.raises(ConfigError, match=r"summing to at most 1"):
        Mixture()(ctx(pairs=((T(E), None), (T(A), None)), alphas=(0.6, 0.6)))


def pair(lo: float, hi: float | None = None, **kw) -> PairInfo:
    return PairInfo(alpha_range=(lo, lo if hi is None else hi), **kw)


def test_mixture_refuses_weights_outside_its_range_before_any_model_runs():
    refused = {
        "1.5": (pair(1.5),),
        "-0.1": (pair(-0.1),),
        "0 to 5": (pair(0.0, 5.0),),  # a schedule that leaves [0, 1] only later
        "0.6, 0.6": (pair(0.6), pair(0.6)),  # each in range, their sum is not
    }
    for got, pairs in refused.items():
        with pytest.raises(ConfigError, match=rf"^alpha: rule 'mixture' .* \[0, 1\].*got {got};"):
            Mixture().needs(Request(pairs=pairs))
    fine = (pair(0.3), pair(0.0, 0.7), pair(9.0, always_off=True), PairInfo())
    assert Mixture().needs(Request(pairs=fine))  # PairInfo(): a function, checked as it runs
    # nested: the ranges follow the alphas a context rule picks, pair by pair
    context = {"name": "context", "rules": [{"keyword": "sql", "alpha": 3.0}], "inner": "mixture"}
    with pytest.raises(ConfigError, match=r"got 3;"):
        make_rule(context).needs(Request(prompts=("sql",), pairs=(pair(0.5),)))
    assert make_rule(context).needs(Request(prompts=("poem",), pairs=(pair(0.5),)))
    replaced = {**context, "default": 0.3}  # every prompt gets 0.3: the pair's own 7 never runs
    assert make_rule(replaced).bind(Request(prompts=("poem",), pairs=(pair(7.0),)))
    with pytest.raises(ConfigError, match=r"got 1.5;"):
        make_rule({**context, "scale": True}).needs(Request(prompts=("sql",), pairs=(pair(0.5),)))
    with pytest.raises(ConfigError, match=r"got 2;"):
        make_rule({"name": "pairs", "rules": ["proxy", "mixture"]}).needs(
            Request(pairs=(pair(5.0), pair(2.0)))
        )


def test_mixture_is_stable_where_probabilities_underflow():
    base = T([[-2000.0, 0.0]])
    expert = T([[-1000.0, 0.0]])
    got = mixture_scores(base, [expert], [0.5])
    assert torch.isfinite(got).all()  # naive log(0.5 e^-2000 + 0.5 e^-1000) would be -inf
    assert float(got[0, 0]) == pytest.approx(-1000.0 + math.log(0.5), abs=1e-3)


# -- several pairs, each with its own rule ----------------------------------------------------


def test_pairs_rule_gives_each_pair_its_own_rule():
    e2, a2 = T([lsm([0.0, 0.0, 2.0, 0.0])] * 2), T(A)
    c = ctx(pairs=((T(E), T(A)), (e2, a2)), alphas=(0.5, 0.25))
    got = Pairs(rules=["proxy", "product"])(c)
    want = [
        [B[r][t] + 0.5 * (E[r][t] - A[r][t]) + 0.25 * e2[r, t].item() for t in range(V)]
        for r in range(2)
    ]
    close(got, want)
    request = Request(pairs=(PairInfo(), PairInfo()))
    assert Pairs(rules=["base", "product"]).needs(request) == ((False, False), (True, False))
    with pytest.raises(ConfigError, match=r"1 rule\(s\) in 'rules' for 2 pair\(s\)"):
        Pairs(rules=["proxy"]).needs(request)


# -- confidence gating and context-aware alpha ------------------------------------------------


def test_entropy_and_the_gate_function():
    assert entropy(T([lsm([0.0] * 4)])).item() == pytest.approx(math.log(4))
    assert entropy(T([[0.0, -INF]])).item() == 0.0  # a masked token adds 0, not NaN
    gate = confidence_gate(torch.tensor([2.0, 2.0, 2.0, 2.0]), torch.tensor([0.0, 1.5, 1.75, 3.0]))
    assert gate.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.0])
    floor = confidence_gate(torch.tensor([2.0]), torch.tensor([3.0]), low=0.0, high=2.0, floor=0.2)
    assert floor.tolist() == pytest.approx([0.2])


def test_gated_scales_alpha_per_row_by_the_entropy_gap():
    rule = Gated(low=-1.0, high=1.0)
    got = rule(ctx(alphas=(2.0,)))
    want = []
    for r in range(2):
        g = min(max((ent(B[r]) - ent(E[r]) + 1.0) / 2.0, 0.0), 1.0)
        want.append([B[r][t] + 2.0 * g * (E[r][t] - A[r][t]) for t in range(V)])
    close(got, want)
    assert torch.equal(Gated(floor=1.0)(ctx(alphas=(2.0,))), Proxy()(ctx(alphas=(2.0,))))
    assert torch.equal(Gated()(ctx(alphas=(0.0,))), T(B))
    with pytest.raises(ConfigError, match=r"high .* must be greater than low"):
        Gated(low=1.0, high=1.0)


def test_context_alpha_is_chosen_per_prompt_and_follows_each_row():
    rule = Context(rules=[{"keyword": "SQL", "alpha": 2.0}, {"regex": r"\bpoem\b", "alpha": [0.5]}])
    request = Request(prompts=("write sql please", "a poem", "nothing"), pairs=(PairInfo(),))
    base, e, a = (T([x[0]] * 3) for x in (B, E, A))
    # rows answer prompts 2, 0, 1 (the loop drops and reorders rows as they finish)
    c = StepContext(base, ((e, a),), (1.0,), prompt_index=(2, 0, 1))
    got = rule.bind(request)(c)
    off = [E[0][t] - A[0][t] for t in range(V)]
    close(got, [[B[0][t] + w * off[t] for t in range(V)] for w in (1.0, 2.0, 0.5)])
    scaled = Context(rules=[{"keyword": "sql", "alpha": 3.0}], scale=True).bind(request)
    close(
        scaled(replace_alphas(c, 0.5)),
        [[B[0][t] + w * off[t] for t in range(V)] for w in (0.5, 1.5, 0.5)],
    )
    default = Context(rules=[{"keyword": "sql", "alpha": 1.0}], default=0.0).bind(request)
    assert torch.equal(default(c)[0], base[0])  # no match -> default 0 -> the base


def replace_alphas(c: StepContext, alpha: float) -> StepContext:
    return StepContext(c.base, c.pairs, (alpha,), c.step, c.prompt_index, c.generated)


def test_context_turns_on_a_pair_whose_own_alpha_is_zero_and_checks_its_settings():
    rule = Context(rules=[{"keyword": "sql", "alpha": 1.0}])
    off = PairInfo(always_off=True)
    assert rule.needs(Request(prompts=("sql",), pairs=(off,))) == ((True, True),)
    assert rule.needs(Request(prompts=("poem",), pairs=(off,))) == ((False, False),)
    with pytest.raises(ConfigError, match=r"rule.rules\[0\].regex is not a valid regular"):
        make_rule({"name": "context", "rules": [{"regex": "(", "alpha": 1.0}]})
    with pytest.raises(ConfigError, match=r"context.rules\[0\].alpha gives 2 alphas for 1"):
        Context(rules=[{"keyword": "x", "alpha": [1.0, 2.0]}]).needs(Request(pairs=(off,)))
    with pytest.raises(ConfigError, match="needs at least one"):
        make_rule({"name": "context", "rules": []})
    for spec in (
        {"rules": [{"keyword": "x", "alpha": 1e300}]},
        {"rules": [{"keyword": "x", "alpha": [1, -101]}]},
        {"rules": [{"keyword": "x", "alpha": 1}], "default": 1e9},
    ):
        with pytest.raises(ConfigError, match=r"must be a finite number in \[-100.0, 100.0\]"):
            make_rule({"name": "context", **spec})  # as a request's own alpha
    chat = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "hi"}]
    assert choose_alphas(chat, [{"keyword": "sql", "alpha": 2.0}]) == 2.0


# -- filters: top-k rerank, plausibility ------------------------------------------------------


def test_rerank_keeps_only_the_base_top_k():
    got = Rerank(k=2)(ctx())
    proxy = Proxy()(ctx())
    keep = [{0, 1}, {2, 1}]  # the base's two best tokens per row
    want = [[proxy[r, t].item() if t in keep[r] else -INF for t in range(V)] for r in range(2)]
    assert got.tolist() == want
    assert torch.equal(Rerank(k=V)(ctx()), proxy)  # k = vocab size: plain decoding
    # a token the base rules out stays out, even if the inner rule (a mixture) brings it back
    base = T([[0.0, -INF, -INF, -INF]])
    mixed = Rerank(k=3, inner={"name": "mixture"})(
        ctx(base=base, pairs=((T(E[:1]), None),), alphas=(0.5,))
    )
    assert torch.isneginf(mixed[0, 1:]).all()


def test_rerank_that_empties_a_row_names_its_setting():
    vetoed = T([[-INF, 0.0, 0.0, 0.0], [0.0, 0.0, -INF, 0.0]])  # vetoes each row's top token
    with pytest.raises(NumericalError, match=r"rerank\(k=1\) left no possible token.*raise k"):
        Rerank(k=1)(ctx(pairs=((vetoed, None),)))


def test_plausibility_filter_by_hand():
    got = Plausible(tau=0.3)(ctx())
    proxy = Proxy()(ctx())
    for r in range(2):
        best = max(B[r])
        for t in range(V):
            keep = math.exp(B[r][t]) >= 0.3 * math.exp(best)
            assert got[r, t].item() == (proxy[r, t].item() if keep else -INF)
    nucleus = Plausible(tau=0.0, top_p=0.6)(ctx())  # row 0: p = .64 .24 .09 .03 -> 1 token
    assert [t for t in range(V) if nucleus[0, t] > -INF] == [0]
    assert torch.equal(Plausible(tau=0.0)(ctx()), proxy)  # tau = 0: plain decoding


def test_plausibility_that_empties_a_row_names_tau():
    vetoed = T([[-INF, 0.0, 0.0, 0.0], [0.0, 0.0, -INF, 0.0]])
    with pytest.raises(NumericalError, match=r"plausible\(tau=1.0\).*lower tau"):
        Plausible(tau=1.0)(ctx(pairs=((vetoed, None),)))


# -- token biases, blocks and allow-lists -----------------------------------------------------


@pytest.fixture(scope="module")
def tok(tuner):
    return tuner.tokenizer


def token_request(tok, prompts=("x",)) -> Request:
    return Request(
        prompts=prompts, pairs=(), vocab_size=len(tok), tokenizer=tok, eos_token_ids=(2,)
    )


def flat(n: int, rows: int = 2) -> torch.Tensor:
    return torch.log_softmax(torch.zeros(rows, n), -1)


def test_token_bias_and_block_by_id(tok):
    v = len(tok)
    rule = Tokens(bias={5: 2.0, "7": -1.0}, block=[9], inner="base")  # JSON keys are strings
    got = rule.bind(token_request(tok))(StepContext(flat(v)))
    want = flat(v).clone()
    want[:, 5] += 2.0
    want[:, 7] -= 1.0
    want[:, 9] = -INF
    assert torch.equal(got, want)


def test_token_strings_expand_with_the_base_tokenizer(tok):
    v = len(tok)
    one = tok(" the", add_special_tokens=False)["input_ids"]
    many = tok(" brown fox", add_special_tokens=False)["input_ids"]
    assert len(one) == 1 and len(many) > 1
    rule = Tokens(bias_strings={" the": 3.0}, block_strings=[" brown fox"], inner="base")
    bound = rule.bind(token_request(tok))
    # row 0 just generated the string's other tokens: its last token is blocked there only
    c = StepContext(flat(v), generated=[many[:-1], []])
    got = bound(c)
    assert got[0, one[0]].item() == pytest.approx(flat(v)[0, 0].item() + 3.0)
    assert got[0, many[-1]].item() == -INF and got[1, many[-1]].item() > -INF


def test_allow_list_keeps_only_its_tokens_and_eos(tok):
    v = len(tok)
    ids = tok("Rain", add_special_tokens=False)["input_ids"]
    got = Tokens(allow=[11], allow_strings=["Rain"], inner="base").bind(token_request(tok))(
        StepContext(flat(v))
    )
    assert sorted((got[0] > -INF).nonzero().flatten().tolist()) == sorted({11, 2, *ids})


def test_token_settings_that_empty_the_distribution_are_named(tok):
    v = len(tok)
    with pytest.raises(ConfigError, match=r"tokens.block: token id 99999 is outside"):
        Tokens(block=[99999]).bind(token_request(tok))
    with pytest.raises(ConfigError, match="allow-list minus the block-list leaves no token"):
        Tokens(allow=[11], block=[11], allow_eos=False).bind(token_request(tok))
    with pytest.raises(ConfigError, match="token strings need the base tokenizer"):
        Tokens(block_strings=["x"])(ctx())
    vetoed = flat(v)
    vetoed[:, 11] = -INF  # the inner rule rules out the only allowed token
    bound = Tokens(allow=[11], allow_eos=False, inner="base").bind(token_request(tok))
    with pytest.raises(NumericalError, match="allow / block"):
        bound(StepContext(vetoed))


# -- -inf inputs: no NaN, never an empty row --------------------------------------------------


def fake_reward(prompts, responses):
    return torch.tensor([float(len(r)) for r in responses])


@pytest.mark.parametrize(
    "spec",
    [
        "proxy",
        "product",
        {"name": "mixture"},
        "base",
        {"name": "pairs", "rules": ["mixture"]},
        {"name": "gated", "low": -5.0},
        {"name": "context", "rules": [{"keyword": "x", "alpha": -1.0}]},
        {"name": "rerank", "k": 2},
        {"name": "plausible", "tau": 0.01},
        {"name": "tokens", "bias": {1: 1.0}},
        {"name": "args", "model": fake_reward, "k": 3, "w": 0.5},
    ],
    ids=str,
)
def test_masked_inputs_never_give_nan_or_an_empty_row(spec, tok):
    base = T([[0.0, -INF, -1.0, -2.0], [-INF, -INF, 0.0, -1.0]])
    expert = T([[-INF, 0.0, -1.0, -INF], [-1.0, -INF, -INF, 0.0]])
    anti = T([[-1.0, -INF, -INF, -INF], [-INF, -INF, 0.0, -1.0]])
    alpha = 0.5 if "mixture" in str(spec) else -1.0  # negative: a masked expert pushes up
    c = StepContext(base, ((expert, anti),), (alpha,))
    rule = make_rule(spec)
    request = Request(("x",), (PairInfo(),), 4, tok, ())
    got = rule.bind(request)(c)
    assert not torch.isnan(got).any() and not torch.isposinf(got).any()
    assert (got > -INF).any(dim=-1).all()


# -- reward-guided decoding (ARGS) ------------------------------------------------------------


def test_args_scores_by_hand():
    scores = T([[0.0, -1.0, -INF, -3.0]])
    got = args_scores(scores, torch.tensor([[1, 2, 0]]), T([[1.0, 5.0, -2.0]]), 0.5)
    assert got.tolist() == [[-1.0, -0.5, -INF, -INF]]  # a ruled-out candidate stays out


def test_args_rescores_the_base_top_k_with_the_reward(tok):
    calls = []

    def reward(prompts, responses):
        calls.append((list(prompts), list(responses)))
        return torch.tensor([float(len(r)) for r in responses])

    v = len(tok)
    base = torch.log_softmax(torch.randn(1, v, generator=torch.Generator().manual_seed(0)), -1)
    request = Request(prompts=("Hi",), pairs=(), vocab_size=v, tokenizer=tok)
    gen = tok("Rain", add_special_tokens=False)["input_ids"]
    got = Args(model=reward, w=2.0, k=3).bind(request)(StepContext(base, generated=[gen]))
    top = torch.topk(base[0], 3).indices.tolist()
    texts = [tok.decode([*gen, t], skip_special_tokens=True) for t in top]
    assert calls == [(["Hi"] * 3, texts)]
    want = torch.full((v,), -INF)
    for t, text in zip(top, texts, strict=True):
        want[t] = base[0, t] + 2.0 * len(text)
    assert torch.equal(got[0], want)


def test_args_with_w_zero_is_exactly_the_inner_rule_and_never_scores():
    def reward(prompts, responses):
        raise AssertionError("w = 0 must not call the reward model")

    assert torch.equal(Args(model=reward, w=0.0)(ctx()), Proxy()(ctx()))
    assert torch.equal(Args(w=0.0, inner="base")(ctx()), T(B))  # no model needed at w = 0


def test_args_refuses_a_bad_reward_and_a_missing_model(tok):
    with pytest.raises(ConfigError, match=r"args\.model is required"):
        make_rule("args")
    request = Request(prompts=("x",), pairs=(), vocab_size=V, tokenizer=tok)
    bound = Args(model=lambda p, r: torch.full((len(r),), math.nan), k=2).bind(request)
    with pytest.raises(NumericalError, match="one finite reward per text"):
        bound(StepContext(T(B)))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tok):
    """A tiny random LlamaForSequenceClassification (a reward head) over the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.5,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("reward")
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_args_end_to_end_with_a_transformers_reward_model(tuner, tiny_dirs, reward_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = {"name": "args", "model": str(reward_dir), "k": 3, "w": 1.0, "inner": "base"}
    spec["device"] = "cpu"
    res = tuner.generate("Rain", rule=spec, max_new_tokens=1, logprobs=True)[0]
    # by hand: the base's top 3, each scored by log p_M + reward("Rain" + candidate)
    tok = tuner.tokenizer
    lm = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"]).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    ids = tok("Rain")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(lm(torch.tensor([ids])).logits[0, -1, : len(tok)], -1)
        top = torch.topk(lp, 3).indices.tolist()
        texts = ["Rain" + tok.decode([t], skip_special_tokens=True) for t in top]
        rewards = [rm(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    scores = torch.tensor([lp[t].item() + r for t, r in zip(top, rewards, strict=True)])
    assert res.token_ids[0] == top[int(scores.argmax())]
    assert res.logprobs[0].logprob == pytest.approx(float(scores.log_softmax(-1).max()), abs=1e-4)
    # w = 0: plain proxy-tuned decoding, token for token
    plain = tuner.generate(PROMPTS, max_new_tokens=6)
    zero = tuner.generate(PROMPTS, max_new_tokens=6, rule={**spec, "w": 0.0, "inner": "proxy"})
    assert [r.token_ids for r in zero] == [r.token_ids for r in plain]
    steered = tuner.generate(PROMPTS, max_new_tokens=4, rule={**spec, "w": 5.0})
    assert all(r.completion_tokens == 4 for r in steered)
    with pytest.raises(ConfigError, match=r"args\.label is 1 but the reward model has 1 output"):
        tuner.generate("Rain", rule={**spec, "label": 1}, max_new_tokens=1)


# -- end to end on the tiny models ------------------------------------------------------------


def test_rules_that_reduce_to_plain_decoding_end_to_end(tuner):
    plain = [r.token_ids for r in tuner.generate(PROMPTS, max_new_tokens=8)]
    base = [r.token_ids for r in tuner.generate(PROMPTS, alpha=0.0, max_new_tokens=8)]
    v = tuner.vocab_size
    for spec, want in [
        ({"name": "rerank", "k": v}, plain),
        ({"name": "plausible", "tau": 0.0}, plain),
        ({"name": "gated", "floor": 1.0}, plain),
        ("base", base),
        ({"name": "plausible", "tau": 1.0}, base),  # only the base's best token survives
        ({"name": "mixture"}, None),
    ]:
        got = [r.token_ids for r in tuner.generate(PROMPTS, rule=spec, max_new_tokens=8)]
        if want is not None:
            assert got == want, spec
    assert [r.token_ids for r in tuner.generate(PROMPTS, max_new_tokens=8)] == plain


def test_block_list_end_to_end(tuner):
    plain = tuner.generate(PROMPTS, max_new_tokens=6)
    banned = sorted({t for r in plain for t in r.token_ids[:2]})
    out = tuner.generate(PROMPTS, max_new_tokens=6, rule={"name": "tokens", "block": banned})
    assert all(t not in banned for r in out for t in r.token_ids)


def test_context_alpha_end_to_end_per_row(tuner):
    rule = {"name": "context", "rules": [{"keyword": "FOX", "alpha": 0.0}]}
    out = tuner.generate(PROMPTS, max_new_tokens=8, rule=rule)
    base = tuner.generate(PROMPTS[0], alpha=0.0, max_new_tokens=8)[0]
    plain = tuner.generate(PROMPTS[1:], max_new_tokens=8)
    assert [r.token_ids for r in out] == [base.token_ids, *(r.token_ids for r in plain)]


def test_the_tuner_rule_and_the_logits_processor_agree(tuner):
    spec = {
        "name": "plausible",
        "tau": 0.2,
        "inner": {"name": "product", "temperatures": {"expert": 1.5}},
    }
    t = tuner.with_rule(spec)
    assert t.rule == make_rule(spec) and tuner.rule == Proxy()
    want = [r.token_ids for r in t.generate(PROMPTS, max_new_tokens=8)]
    assert want == [r.token_ids for r in tuner.generate(PROMPTS, max_new_tokens=8, rule=spec)]
    tok = tuner.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    proc = t.logits_processor(PROMPTS)
    out = tuner.base.model.model.generate(
        **enc, logits_processor=[proc], max_new_tokens=8, do_sample=False
    )
    got = out[:, enc.input_ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    assert [g[: g.index(eos) + 1] if eos in g else g for g in got] == want


def test_a_plain_function_is_a_rule(tuner):
    seen = []

    def base_only(ctx: StepContext) -> torch.Tensor:
        seen.append((ctx.step, ctx.prompt_index, [list(g) for g in ctx.generated]))
        return ctx.base

    out = tuner.generate(PROMPTS[:2], max_new_tokens=3, rule=base_only)
    base = tuner.generate(PROMPTS[:2], alpha=0.0, max_new_tokens=3)
    assert [r.token_ids for r in out] == [r.token_ids for r in base]
    assert [s[:2] for s in seen] == [(0, (0, 1)), (1, (0, 1)), (2, (0, 1))]
    assert seen[2][2] == [r.token_ids[:2] for r in out]  # each row's ids before the step
    assert make_rule(Plausible) == Plausible()  # a rule class is its defaults


def test_rule_mismatched_with_the_model_set_fails_before_any_token(tuner):
    with pytest.raises(ConfigError, match=r"1 rule\(s\)|2 rule\(s\) in 'rules' for 1 pair"):
        tuner.with_rule({"name": "pairs", "rules": ["proxy", "proxy"]})


# -- registry, specs and the edges ------------------------------------------------------------


def test_every_rule_is_described_and_round_trips_through_its_spec():
    assert set(RULES) == {
        "proxy", "product", "mixture", "nudging", "pairs", "base", "gated", "context",
        "rerank", "plausible", "union", "tokens", "args",
    }  # fmt: skip
    for item in describe():
        assert item["summary"] and item["formula"] and item["cost"], item["name"]
        assert all(s["help"] for s in item["settings"]), item["name"]
    spec = {
        "name": "plausible",
        "tau": 0.2,
        "inner": {"name": "gated", "floor": 0.5, "inner": {"name": "rerank", "k": 3}},
    }
    rule = make_rule(spec)
    assert rule.to_spec() == spec and make_rule(rule.to_spec()) == rule
    assert str(rule) == "plausible(tau=0.2, inner=gated(floor=0.5, inner=rerank(k=3)))"


def test_rule_spec_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"rule.name: unknown rule 'nope'; rules: \["):
        make_rule({"name": "nope"})
    with pytest.raises(ConfigError, match=r"rule: rule 'rerank' has no setting\(s\) \['kk'\]"):
        make_rule({"name": "rerank", "kk": 3})
    with pytest.raises(ConfigError, match=r"rule.inner.k must be an integer >= 1, got 0"):
        make_rule({"name": "plausible", "inner": {"name": "rerank", "k": 0}})
    with pytest.raises(ConfigError, match=r"rule.tau must be a finite number in \[0.0, 1.0\]"):
        make_rule({"name": "plausible", "tau": 2})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        make_rule({"tau": 0.1})


def test_rule_args_parse_and_merge():
    args = ["tau=0.2", "inner=rerank", "inner.k=5", "temperatures={expert: 0.7}", "block=[1, 2]"]
    assert parse_rule_args(args, "plausible") == {
        "name": "plausible",
        "tau": 0.2,
        "inner": {"name": "rerank", "k": 5},
        "temperatures": {"expert": 0.7},
        "block": [1, 2],
    }
    with pytest.raises(ConfigError, match="write it as key=value"):
        parse_rule_args(["tau"])
    base = {"name": "plausible", "tau": 0.1, "inner": {"name": "rerank", "k": 3}}
    assert merge_specs(base, {"inner": {"k": 5}}) == {**base, "inner": {"name": "rerank", "k": 5}}
    assert merge_specs(base, {"inner": {"name": "product"}})["inner"] == {"name": "product"}


# -- recipe and CLI ---------------------------------------------------------------------------


def recipe_text(tiny_dirs, rule: str) -> str:
    return f"""
base: {{model: "{tiny_dirs["base"]}"}}
pairs:
  - expert: {{model: "{tiny_dirs["expert"]}", prompt: chat}}
    anti_expert: {{model: "{tiny_dirs["anti"]}"}}
    alpha: 1.0
rule: {rule}
model_defaults: {{device: cpu, dtype: float32}}
generation: {{max_new_tokens: 6}}
"""


def test_recipe_rule_key(tmp_path, tiny_dirs, tuner):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_dirs, "{name: plausible, tau: 0.3, inner: product}"))
    t = ProxyTuner.from_recipe(path)
    assert t.rule == Plausible(tau=0.3, inner=Product())
    rule = {"name": "plausible", "tau": 0.3, "inner": "product"}
    want = tuner.generate(PROMPTS, max_new_tokens=6, rule=rule)
    assert [r.token_ids for r in t.generate(PROMPTS)] == [r.token_ids for r in want]
    assert parse_recipe({"base": "m", "rule": "mixture"}).rule == Mixture()


def test_recipe_rule_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"rule.tau must be a finite number"):
        parse_recipe({"base": "m", "rule": {"name": "plausible", "tau": -1}})
    with pytest.raises(ConfigError, match=r"rule: unknown rule 'proxi'; rules: \["):
        parse_recipe({"base": "m", "rule": "proxi"})
    with pytest.raises(ConfigError, match=r"rule: rule 'pairs' needs one rule per pair"):
        parse_recipe({"base": "m", "pairs": [{"expert": "e"}], "rule": {"name": "pairs"}})
    with pytest.raises(ConfigError, match=r"rule: rule 'product' reads each pair's expert"):
        parse_recipe({"base": "m", "pairs": [{"anti_expert": "a"}], "rule": "product"})


def test_cli_generate_with_a_rule(tmp_path, tiny_dirs, tuner, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_dirs, "{name: plausible, tau: 0.3}"))
    base = [r.token_ids for r in tuner.generate(PROMPTS[:2], alpha=0.0, max_new_tokens=6)]
    args = ["generate", "--recipe", str(path), "--json", *PROMPTS[:2]]
    # --rule-arg alone adjusts the recipe's rule: tau = 1 keeps only the base's best token
    assert main([*args, "--rule-arg", "tau=1.0"]) == 0
    assert [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()] == base
    # --rule starts a new rule from its defaults
    assert main([*args, "--rule", "rerank", "--rule-arg", "k=1"]) == 0
    assert [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()] == base
    assert main([*args, "--rule", "rerank", "--rule-arg", "k=0"]) == 2
    assert "error: rule.k must be an integer >= 1" in capsys.readouterr().err
    assert main([*args, "--rule-arg", "tau"]) == 2
    assert "write it as key=value" in capsys.readouterr().err


def test_cli_lists_the_rules(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for name in RULES:
        assert f"\n{name}: " in f"\n{out}"
    assert "formula: log p_M + sum_i alpha_i (log p_Ei - log p_Ai)" in out
    assert main(["rules", "plausible", "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["name"] == "plausible"
    assert {"tau", "top_p", "inner", "temperatures"} == {s["name"] for s in item["settings"]}
    assert main(["rules", "nope"]) == 2
