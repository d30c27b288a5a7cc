"""Pairs whose tokenizer differs from the base's: the explicit different-tokenizer mode."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.backends.hf import HFModel
from proxytune.cli import main
from proxytune.engine import Member, Pair
from proxytune.engine.blackbox import BlackBoxStats
from proxytune.engine.crosstok import CoverageError, CrossFeeder, CrossOptions, vocab_map
from proxytune.errors import ConfigError, VocabularyMismatchError
from proxytune.prompts import PromptFormat, TokenIds
from proxytune.recipe import parse_recipe
from proxytune.schedules import Linear
from proxytune.testing import CHAT_TEMPLATE, build_model, build_tokenizer
from proxytune.vocab import token_bytes

PROMPTS = ["The quick brown fox", "Numbers: 0 1 2"]
STEPS = 12


def permuted(tok, model, seed: int = 0):
    """The same tokenizer and model with every id (specials too) shuffled: same strings,
    different ids; embedding and head rows follow, so the model computes the same thing."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    perm = torch.randperm(len(tok), generator=torch.Generator().manual_seed(seed))  # old -> new
    data = json.loads(tok.backend_tokenizer.to_str())
    data["model"]["vocab"] = {t: int(perm[i]) for t, i in data["model"]["vocab"].items()}
    for added in data["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    new = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    new.chat_template = CHAT_TEMPLATE
    old = torch.argsort(perm)  # new id -> old id
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[old])
        twin.lm_head.weight.copy_(model.lm_head.weight[old])
    for cfg in (twin.config, twin.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = new.eos_token_id, new.pad_token_id
    twin.config.bos_token_id = new.bos_token_id
    return new, twin


def pair(expert, anti, expert_prompt: str = "chat") -> Pair:
    return Pair(
        Member("expert[0]", expert, PromptFormat(expert_prompt)), Member("anti_expert[0]", anti)
    )


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer(300)
    raw = {n: build_model(tok, seed=s) for n, s in (("base", 0), ("expert", 1), ("anti", 2))}
    models = {n: HFModel(m, tok, name=n) for n, m in raw.items()}
    ptok, pe = permuted(tok, raw["expert"])
    _, pa = permuted(tok, raw["anti"])
    twins = {"expert": HFModel(pe, ptok, name="expert*"), "anti": HFModel(pa, ptok, name="anti*")}
    big = build_tokenizer(400)  # the same text at a larger size: 100 more merges
    base400 = HFModel(build_model(big, seed=3), big, name="base400")
    return {"tok": tok, "ptok": ptok, "models": models, "twins": twins, "base400": base400}


def test_mismatched_tokenizers_are_refused_by_default(setup):
    m, t = setup["models"], setup["twins"]
    with pytest.raises(VocabularyMismatchError, match="different-tokenizer mode"):
        ProxyTuner(Member("base", m["base"]), [pair(t["expert"], t["anti"])])
    with pytest.raises(VocabularyMismatchError, match="must share one tokenizer"):
        ProxyTuner(Member("base", m["base"]), [pair(m["expert"], t["anti"])], cross_tokenizer=True)


def test_permuted_ids_give_exactly_the_same_tokenizer_result(setup):
    m, t = setup["models"], setup["twins"]
    same = ProxyTuner(Member("base", m["base"]), [pair(m["expert"], m["anti"])])
    cross = ProxyTuner(
        Member("base", m["base"]), [pair(t["expert"], t["anti"])], cross_tokenizer=True
    )
    assert cross.cross_maps[0].fast_share == 1.0 and cross.eos_token_ids == same.eos_token_ids
    stats = BlackBoxStats()
    settings = {"max_new_tokens": STEPS, "logprobs": True, "top_logprobs": 3}
    got = cross.generate(PROMPTS, stats=stats, **settings)
    want = same.generate(PROMPTS, **settings)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    for g, w in zip(got, want, strict=True):
        assert [x.logprob for x in g.logprobs] == pytest.approx(
            [x.logprob for x in w.logprobs], abs=1e-5
        )
    assert stats.mean_coverage == 1.0 and stats.text_scored == 0
    sampled = {"max_new_tokens": STEPS, "temperature": 1.0, "seed": 7, "n": 2}
    assert [r.token_ids for r in cross.generate(PROMPTS[0], **sampled)] == [
        r.token_ids for r in same.generate(PROMPTS[0], **sampled)
    ]


def test_token_id_prompts_are_refused_for_a_pair_of_another_tokenizer(setup):
    """Ids of the base's vocabulary mean nothing to the pair: refused, naming it (the server's
    token-id prompts and echo give the same reason)."""
    m, t = setup["models"], setup["twins"]
    cross = ProxyTuner(
        Member("base", m["base"]), [pair(t["expert"], t["anti"], "raw")], cross_tokenizer=True
    )
    assert cross.ids_differ == "pair 0's models read another tokenizer than the base"
    with pytest.raises(ConfigError, match=r"prompt: token-id prompts .* pair 0's models"):
        cross.generate(TokenIds([5, 6], "ab"), max_new_tokens=2)
    same = ProxyTuner(Member("base", m["base"]), [pair(m["expert"], m["anti"], "raw")])
    assert same.ids_differ is None
    ids = same.base.prompt.render("The quick", same.tokenizer)
    by_ids = same.generate(TokenIds(ids, "The quick"), max_new_tokens=4)[0]
    assert by_ids.token_ids == same.generate("The quick", max_new_tokens=4)[0].token_ids


def test_alpha_zero_reduces_to_the_base_alone(setup):
    m = setup["models"]
    base = setup["base400"]
    cross = ProxyTuner(Member("base", base), [pair(m["expert"], m["anti"])], cross_tokenizer=True)
    assert 0 in cross.cross_maps  # the 300-token vocabulary is a prefix of the 400-token one
    alone = ProxyTuner(Member("base", base)).generate(PROMPTS, max_new_tokens=STEPS)
    for alpha in (0.0, Linear(0.0, 0.0, 4)):  # a schedule at 0 still runs and maps the pair
        stats = BlackBoxStats()
        got = cross.generate(PROMPTS, alpha=alpha, max_new_tokens=STEPS, stats=stats)
        assert [r.token_ids for r in got] == [r.token_ids for r in alone]
    assert stats.text_scored > 0
    steered = cross.generate(PROMPTS, max_new_tokens=STEPS, stats=(stats := BlackBoxStats()))
    assert [r.token_ids for r in steered] != [r.token_ids for r in alone]
    assert len(stats.coverage) == stats.steps and 0.5 < min(stats.coverage) <= 1.0


def test_vocab_map_fast_path_text_path_and_specials(setup):
    big, tok = setup["base400"].tokenizer, setup["tok"]
    vmap = vocab_map(big, len(big), tok, len(tok))
    assert vmap.fast_share == pytest.approx(300 / 400)
    assert int(vmap.fast[big.eos_token_id]) == tok.eos_token_id
    assert vmap.base_ids_of([tok.eos_token_id]) == [big.eos_token_id]
    base_bytes, pair_bytes = token_bytes(big, len(big)), token_bytes(tok, len(tok))
    longer = vmap.text_ok.nonzero().view(-1).tolist()
    assert len(longer) == 100
    for t in longer:  # the text path spells a token's bytes in the pair's tokens
        pieces = vmap.pieces(t)
        assert len(pieces) >= 2 and b"".join(pair_bytes[u] for u in pieces) == base_bytes[t]
    ptok = setup["ptok"]  # a permutation: every id has its twin, specials by name
    pmap = vocab_map(tok, len(tok), ptok, len(ptok))
    assert pmap.fast_share == 1.0
    assert ptok.convert_ids_to_tokens(int(pmap.fast[tok.convert_tokens_to_ids("Ġthe")])) == "Ġthe"


def test_text_path_scores_exactly_the_pieces_it_would_feed(setup):
    """``log p(t) = sum_j log p(u_j | ctx, u_<j)`` against a fresh forward per candidate."""
    big, tok = setup["base400"].tokenizer, setup["tok"]
    expert = setup["models"]["expert"]
    vmap = vocab_map(big, len(big), tok, len(tok))
    ctx = tok("The quick brown")["input_ids"]
    state, first = expert.start([ctx, ctx[:3]])
    feeder = CrossFeeder(vmap, {0: state}, {0: first}, CrossOptions(text_candidates=4),
                         torch.device("cpu"), {0: "expert"})  # fmt: skip
    base_lp = torch.full((2, len(big)), -50.0)
    chosen = vmap.text_ok.nonzero().view(-1)[:4]
    base_lp[:, chosen] = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rows, mapped = feeder.rows(base_lp)
    assert mapped[:, chosen].all() and mapped.sum() == 2 * (300 + 4)
    for r, prefix in enumerate([ctx, ctx[:3]]):
        for t in chosen.tolist():
            pieces = vmap.pieces(t)
            want = 0.0
            for j, u in enumerate(pieces):
                with torch.no_grad():
                    logits = expert.model(torch.tensor([prefix + list(pieces[:j])])).logits
                want += float(torch.log_softmax(logits[0, -1].float(), -1)[u])
            assert float(rows[0][r, t]) == pytest.approx(want, abs=1e-4)
    # scoring left the state as it was; feeding spells a text-path token in several pair
    # tokens (row 0) and a twin as one (row 1): the same logits as a fresh prefill
    the = big.convert_tokens_to_ids("Ġthe")
    feeder.feed([int(chosen[0]), the])
    _, fresh = expert.start(
        [ctx + list(vmap.pieces(int(chosen[0]))), [*ctx[:3], int(vmap.fast[the])]]
    )
    assert torch.allclose(feeder.logits[0], fresh, atol=1e-4)


def test_low_coverage_is_refused_with_a_clear_message(setup):
    m = setup["models"]
    options = {"min_coverage": 0.999, "text_candidates": 0}
    cross = ProxyTuner(Member("base", setup["base400"]), [pair(m["expert"], m["anti"])],
                       cross_tokenizer=options)  # fmt: skip
    with pytest.raises(CoverageError, match="mapped to ids the pair could score"):
        cross.generate(PROMPTS[0], max_new_tokens=STEPS)
    assert cross.generate(PROMPTS[0], alpha=0.0, max_new_tokens=2)  # alpha 0: nothing to map


def test_options_recipe_and_refusals(setup):
    with pytest.raises(ConfigError, match="min_coverage"):
        CrossOptions(min_coverage=1.5)
    with pytest.raises(ConfigError, match="unknown setting"):
        CrossOptions.parse({"coverage": 0.2})
    assert CrossOptions.parse(False) is None and CrossOptions.parse(True) == CrossOptions()
    r = parse_recipe({"base": "b", "cross_tokenizer": {"min_coverage": 0.3, "text_candidates": 2}})
    assert r.cross_tokenizer == CrossOptions(0.3, 2)
    assert parse_recipe({"base": "b"}).cross_tokenizer is None
    m, t = setup["models"], setup["twins"]
    cross = ProxyTuner(
        Member("base", m["base"]), [pair(t["expert"], t["anti"])], cross_tokenizer=True
    )
    with pytest.raises(ConfigError, match="speculative"):
        cross.generate("x", max_new_tokens=2, speculative=2)


def test_cli_cross_tokenizer_flag(setup, tmp_path, capsys):
    tok, ptok, m, t = setup["tok"], setup["ptok"], setup["models"], setup["twins"]
    dirs = {}
    for name, model, tokenizer in (
        ("base", m["base"].model, tok),
        ("expert", t["expert"].model, ptok),
        ("anti", t["anti"].model, ptok),
    ):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    argv = ["generate", "--base", dirs["base"], "--expert", dirs["expert"]]
    argv += ["--anti-expert", dirs["anti"], "--device", "cpu", "--max-new-tokens", "6"]
    argv += ["--base-prompt", "raw", "--anti-expert-prompt", "raw"]  # the reference's formats
    assert main([*argv, PROMPTS[0]]) == 2
    assert "different-tokenizer mode" in capsys.readouterr().err
    assert main([*argv, "--cross-tokenizer", "--json", PROMPTS[0]]) == 0
    out = capsys.readouterr()
    same = ProxyTuner(Member("base", m["base"]), [pair(m["expert"], m["anti"])])
    assert json.loads(out.out)["text"] == same.generate(PROMPTS[0], max_new_tokens=6)[0].text
    assert "coverage mean 1.000" in out.err


def test_api_base_with_a_pair_of_another_tokenizer(setup):
    """Both at once: an API base (k = V) and a permuted pair equal local proxy-tuning."""
    httpx = pytest.importorskip("httpx")
    from test_api_backend import FakeVLLM

    from proxytune.backends.api import APIModel, APISpec

    tok, m, t = setup["tok"], setup["models"], setup["twins"]
    spec = APISpec(url="http://endpoint.test/v1", model="m", top_logprobs=len(tok))
    api = APIModel(spec, tok, transport=httpx.MockTransport(FakeVLLM(m["base"], tok)))
    cross = ProxyTuner(Member("base", api), [pair(t["expert"], t["anti"])], cross_tokenizer=True)
    same = ProxyTuner(Member("base", m["base"]), [pair(m["expert"], m["anti"])])
    got = cross.generate(PROMPTS, max_new_tokens=8)
    assert [r.token_ids for r in got] == [
        r.token_ids for r in same.generate(PROMPTS, max_new_tokens=8)
    ]
