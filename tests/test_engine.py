"""The engine's shape: layers, one preparation, engine options, the same checks in every loop."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

import proxytune
from proxytune import EngineOptions, ProxyTuner
from proxytune.backends.hf import HFModel
from proxytune.backends.prefix import PrefixCachingModel
from proxytune.backends.quantize import weight_bytes
from proxytune.engine import Member, Pair, prepare
from proxytune.engine.capabilities import weight_size
from proxytune.engine.speculative import SpeculativeStats
from proxytune.errors import ConfigError, NumericalError, PromptTooLongError
from proxytune.prompts import PromptFormat
from proxytune.recipe import parse_recipe
from proxytune.testing import build_model, build_tokenizer

PACKAGE = Path(proxytune.__file__).parent
PROMPTS = ["The quick brown fox", "Numbers: 0 1 2"]


def imported_packages(path: Path) -> set[str]:
    """The ``proxytune`` subpackages/modules a module imports (first name below proxytune)."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parts[:-1]  # the module's package, below proxytune
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from the module's package
                base = list(here[: len(here) - (node.level - 1)])
                parts = base + (node.module.split(".") if node.module else [])
                names = parts[:1] or [alias.name for alias in node.names]
                found.update(names)
            elif node.module and node.module.startswith("proxytune."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("proxytune."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        (
            "backends",
            {"engine", "generation", "overlap", "rules", "sampling", "tuner", "server", "cli"},
        ),
        ("engine", {"tuner", "server", "cli"}),
        ("rules", {"engine", "tuner", "server", "cli"}),
    ],
)
def test_each_layer_imports_nothing_above_it(layer, forbidden):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = imported_packages(path) & forbidden
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


FOUNDATION = {
    "arithmetic", "config", "embedded", "errors", "extras", "jsontext", "paths",
    "prompts", "results", "sampling", "schedules", "specs", "vocab",
}  # fmt: skip
"""Top-level modules every layer may import: they import nothing but each other."""


@pytest.mark.parametrize("name", sorted(FOUNDATION))
def test_the_foundation_imports_nothing_but_itself(name):
    bad = imported_packages(PACKAGE / f"{name}.py") - FOUNDATION
    assert not bad, f"{name}.py imports {sorted(bad)}"


def test_backends_import_only_the_foundation():
    """Also inside functions (``ast.walk`` reads every import): a backend does not reach up
    for the engine's helpers (``crosstok``) or anything above."""
    for path in sorted((PACKAGE / "backends").rglob("*.py")):
        bad = imported_packages(path) - FOUNDATION - {"backends"}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def lazy_imports(path: Path) -> list[tuple[int, bool]]:
    """Each import of proxytune's own inside a function of ``path``: its line, and whether it
    says why (``# lazy: ...`` on the line above it or above its run of imports)."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("proxytune")
            ):
                above = node.lineno - 2
                while above >= 0 and lines[above].lstrip().startswith(("from ", "import ")):
                    above -= 1
                found.append((node.lineno, lines[above].lstrip().startswith("# lazy: ")))
    return found


def test_imports_inside_functions_are_few_and_each_says_why():
    """The rest are at the top of their module (docs/architecture.md)."""
    found = {p: lazy_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
    silent = [f"{p.relative_to(PACKAGE)}:{n}" for p, f in found.items() for n, why in f if not why]
    assert not silent, f"imports inside functions without a '# lazy:' reason: {silent}"
    assert sum(len(f) for f in found.values()) <= 40


@pytest.fixture(scope="module")
def models():
    tok = build_tokenizer(300)
    return {
        name: HFModel(build_model(tok, seed=seed), tok, name=name)
        for name, seed in (("base", 0), ("expert", 1), ("anti", 2))
    }


def test_the_drafter_cost_prior_reads_weight_bytes_through_wrappers(models):
    """The speculative prior's sizes: a transformers model's bytes, also behind the prefix
    cache's wrapper (its attributes come through ``__getattr__``); 1 where a model says none."""
    lm = models["base"]
    assert weight_size(lm) == weight_bytes(lm.model) > 1
    assert weight_size(PrefixCachingModel(lm)) == weight_size(lm)
    assert weight_size(object()) == 1.0


def tuner_of(models, **kw) -> ProxyTuner:
    pair = Pair(
        Member("expert[0]", models["expert"], PromptFormat("chat")),
        Member("anti_expert[0]", models["anti"]),
    )
    return ProxyTuner(Member("base", models["base"]), [pair], **kw)


def test_prepare_checks_once_for_every_loop(models):
    t = tuner_of(models)
    with pytest.raises(ConfigError, match="no prompts given"):
        t.prepare([])
    request = t.prepare(PROMPTS, max_new_tokens=5, n=2)
    assert [m.role for m in request.members] == ["base", "expert[0]", "anti_expert[0]"]
    assert len(request.rows()) == 4 and request.steered
    limit = models["base"].context_length
    rooms = [limit - len(ids) for ids in request.rendered["base"]]
    assert request.rooms == [
        min(r, limit - len(e), limit - len(a))
        for r, e, a in zip(
            rooms, request.rendered["expert[0]"], request.rendered["anti_expert[0]"], strict=True
        )
    ]
    alone = t.prepare(PROMPTS, alpha=0.0)  # the proxy rule skips a pair whose alpha is 0
    assert [m.role for m in alone.members] == ["base"] and not alone.steered
    with pytest.raises(PromptTooLongError, match="whose context holds"):
        t.prepare("word " * (limit + 5))


def test_prepared_runs_the_same_in_every_loop(models):
    t = tuner_of(models)

    def by_row(steps) -> dict[int, list[int]]:
        rows: dict[int, list[int]] = {}
        for updates in steps:
            for u in updates:
                rows.setdefault(u.row, []).append(u.token_id)
        return rows

    request = t.prepare(PROMPTS, max_new_tokens=10)
    plain = by_row(t.run(request))
    assert plain == by_row(t.steps(PROMPTS, max_new_tokens=10))
    stats = SpeculativeStats()
    assert by_row(t.run(request, speculative=2, stats=stats)) == plain and stats.proposed > 0


def test_a_nan_model_is_named_in_the_black_box_loop_too(models):
    """The black-box loop checks every model's logits as the plain loop does, so a broken
    model is reported as a model problem, not as the rule's."""

    def nan_copy(model: HFModel) -> HFModel:
        broken = copy.deepcopy(model.model)
        with torch.no_grad():
            broken.lm_head.weight.fill_(float("nan"))
        return HFModel(broken, model.tokenizer, name="nan-base")

    big = build_tokenizer(400)  # another tokenizer: the pair runs in the black-box loop
    nan_big = nan_copy(HFModel(build_model(big, seed=3), big, name="base400"))
    pair = Pair(Member("expert[0]", models["expert"]), Member("anti_expert[0]", models["anti"]))
    cross = ProxyTuner(Member("base", nan_big), [pair], cross_tokenizer=True)
    assert cross.blackbox
    with pytest.raises(NumericalError, match="model 'base \\(nan-base\\)' produced NaN"):
        cross.generate(PROMPTS, max_new_tokens=3)
    plain = tuner_of({**models, "base": nan_copy(models["base"])})
    with pytest.raises(NumericalError, match="model 'base \\(nan-base\\)' produced NaN"):
        plain.generate(PROMPTS, max_new_tokens=3)


def test_engine_options_one_way_everywhere(models):
    assert EngineOptions.parse(None) == EngineOptions()
    assert EngineOptions.parse({"speculative": 0}).speculative is None
    with pytest.raises(ConfigError, match="unknown engine option"):
        EngineOptions.parse({"overlapp": True})
    with pytest.raises(ConfigError, match="do not compose"):
        EngineOptions(stacked=True, prefix_cache=True)
    with pytest.raises(ConfigError, match="draft length"):
        EngineOptions(speculative="fast")
    r = parse_recipe({"base": "x", "engine": {"overlap": True, "speculative": "auto"}})
    assert r.engine == EngineOptions(overlap=True, speculative="auto")
    with pytest.raises(ConfigError, match="moved under 'engine'"):
        parse_recipe({"base": "x", "overlap": True})
    with pytest.raises(ConfigError, match="engine: unknown engine option"):
        parse_recipe({"base": "x", "engine": {"fast": True}})

    t = tuner_of(models)
    assert t.options == EngineOptions() and not t.overlap
    fast = t.with_options(overlap=True, speculative=3)
    assert fast.overlap and t.options == EngineOptions()  # a copy: the original is unchanged
    with pytest.raises(ConfigError, match="applies when the models load"):
        t.with_options(one_pass=False)
    stats = SpeculativeStats()
    want = t.generate(PROMPTS, max_new_tokens=8)
    got = fast.generate(PROMPTS, max_new_tokens=8, stats=stats)  # speculative by default
    assert [r.token_ids for r in got] == [r.token_ids for r in want] and stats.proposed > 0
    plain = fast.generate(PROMPTS, max_new_tokens=8, speculative=0, stats=SpeculativeStats())
    assert [r.token_ids for r in plain] == [r.token_ids for r in want]


def test_low_level_prepare_and_loops_agree(models):
    """``engine.prepare`` + ``engine.decode`` is what the tuner runs."""
    from proxytune.config import GenerationConfig
    from proxytune.engine import decode

    t = tuner_of(models)
    config = GenerationConfig(max_new_tokens=6)
    request = prepare(t.base, t.pairs, PROMPTS, config, t.vocab_size, t.eos_token_ids)
    got = [u.token_id for ups in decode(request) for u in ups]
    assert got == [u.token_id for ups in t.steps(PROMPTS, config=config) for u in ups]


def test_checked_scores_names_nan_and_empty_rows_and_passes_good_ones():
    from proxytune.engine.step import checked_scores
    from proxytune.errors import NumericalError
    from proxytune.rules import StepContext

    def ctx(scores: torch.Tensor) -> StepContext:
        n = scores.shape[0]
        return StepContext(
            base=scores, pairs=(), alphas=(), step=4, prompt_index=(0,) * n, generated=[[]] * n
        )

    good = torch.tensor([[0.0, float("-inf")], [float("inf"), 1.0]])
    assert checked_scores(lambda c: c.base, ctx(good)) is good
    nan = torch.tensor([[0.0, 1.0], [float("nan"), 1.0]])
    with pytest.raises(NumericalError, match="hold NaN at step 4"):
        checked_scores(lambda c: c.base, ctx(nan))
    empty = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])
    with pytest.raises(NumericalError, match="no possible token for row 1 at step 4"):
        checked_scores(lambda c: c.base, ctx(empty))
