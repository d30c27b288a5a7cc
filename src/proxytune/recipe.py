"""Recipe files (YAML or TOML): models, roles, prompt formats, alphas and decoding defaults.

Example (``recipes/default.yaml`` is the embedded default)::

    base: {model: path/or/hub-id, prompt: raw}
    pairs:
      - expert: {model: small-tuned, prompt: chat}
        anti_expert: {model: small-untuned, prompt: raw}
        alpha: 1.0            # or {schedule: linear, start: 0, end: 1, steps: 32}
    rule: {name: plausible, tau: 0.1}   # optional: a steering rule (`proxytune rules`)
    cross_tokenizer: false               # true / {min_coverage: 0.5}: pairs of another tokenizer
    engine: {overlap: true}              # engine options (EngineOptions; docs/speed.md)
    model_defaults: {device: auto, dtype: auto}
    generation: {max_new_tokens: 128, temperature: 0}

A base behind an OpenAI-compatible endpoint (top-k log-probs; docs/black-box.md)::

    base: {url: http://host:8000/v1, model: NAME, top_logprobs: 20, api_key_env: OPENAI_API_KEY}
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import EngineOptions, GenerationConfig
from .errors import ConfigError
from .paths import need_file
from .schedules import Constant, as_schedule
from .specs import ModelSpec

TOP_LEVEL = {
    "base",
    "pairs",
    "rule",
    "model_defaults",
    "generation",
    "name",
    "description",
    "cross_tokenizer",
    "engine",
}
PAIR_KEYS = {"expert", "anti_expert", "alpha"}


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: ready for :meth:`ProxyTuner.from_recipe`."""

    base: Any
    """A :class:`ModelSpec`, or an :class:`~proxytune.backends.api.APISpec` (``url:`` given)."""
    pairs: list[tuple[ModelSpec | None, ModelSpec | None, Any]] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name: str = "recipe"
    description: str = ""
    rule: Any = None
    """The steering rule (a :class:`~proxytune.rules.Rule`); ``None`` is the paper's."""
    cross_tokenizer: Any = None
    """The different-tokenizer mode (a :class:`~proxytune.engine.crosstok.CrossOptions`) or
    ``None``."""
    engine: EngineOptions = field(default_factory=EngineOptions)
    """How the engine runs the models (overlap, speculative, stacked, prefix cache, one pass)."""


def default_recipe_path() -> Path:
    """The recipe of the embedded default model set, shipped inside the package."""
    return Path(str(resources.files("proxytune") / "recipes" / "default.yaml"))


def load_recipe(path: str | Path, **model_overrides: Any) -> Recipe:
    """Read a ``.yaml``/``.yml``/``.toml`` recipe; ``model_overrides`` (device, dtype) win."""
    path = need_file(path, "recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text: {err}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid {path.suffix[1:]}: {err}") from err
    return parse_recipe(data or {}, name=path.stem, **model_overrides)


def parse_recipe(data: Mapping[str, Any], name: str = "recipe", **model_overrides: Any) -> Recipe:
    """Validate a recipe mapping; every error names the offending key."""
    if not isinstance(data, Mapping):
        raise ConfigError("a recipe must be a mapping with at least a 'base' key")
    if "overlap" in data:
        raise ConfigError(
            "recipe key 'overlap' moved under 'engine': write engine: {overlap: "
            f"{str(data['overlap']).lower()}}}"
        )
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {unknown}; known: {sorted(TOP_LEVEL)}")
    if "base" not in data:
        raise ConfigError("a recipe needs a 'base' model")
    defaults = {
        **dict(data.get("model_defaults") or {}),
        **{k: v for k, v in model_overrides.items() if v is not None},
    }
    try:
        base = _base(data["base"], defaults)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    pairs = []
    for i, pair in enumerate(data.get("pairs") or []):
        if not isinstance(pair, Mapping):
            raise ConfigError(f"pairs[{i}] must be a mapping with expert/anti_expert/alpha")
        bad = sorted(set(pair) - PAIR_KEYS)
        if bad:
            raise ConfigError(f"pairs[{i}]: unknown key(s) {bad}; known: {sorted(PAIR_KEYS)}")
        expert = _side(pair.get("expert"), defaults)
        anti = _side(pair.get("anti_expert"), defaults)
        if expert is None and anti is None:
            raise ConfigError(f"pairs[{i}] needs an expert, an anti_expert, or both")
        alpha = pair.get("alpha", 1.0)
        as_schedule(alpha, f"pairs[{i}].alpha")  # validate now, not at the first token
        pairs.append((expert, anti, alpha))
    try:
        engine = EngineOptions.parse(data.get("engine"))
    except ConfigError as err:
        raise ConfigError(f"engine: {err}") from None
    gen = data.get("generation") or {}
    if not isinstance(gen, Mapping):
        raise ConfigError("'generation' must be a mapping of decoding settings")
    return Recipe(
        base=base,
        pairs=pairs,
        generation=GenerationConfig().updated(**dict(gen)),
        name=str(data.get("name", name)),
        description=str(data.get("description", "")),
        rule=_rule(data.get("rule"), pairs),
        cross_tokenizer=_cross(data.get("cross_tokenizer")),
        engine=engine,
    )


def _base(spec: Any, defaults: Mapping[str, Any]) -> Any:
    """A local model, or an API base when the mapping names a ``url``."""
    if isinstance(spec, Mapping) and "url" in spec:
        # lazy: torch, only for an API base (a recipe is parsed before models load)
        from .backends.api import APISpec

        return APISpec.parse(spec)
    return ModelSpec.parse(spec, **defaults)


def _cross(spec: Any) -> Any:
    if spec is None or spec is False:
        return None
    # lazy: torch, only when the mode is asked for
    from .engine.crosstok import CrossOptions

    return CrossOptions.parse(spec)


def _rule(spec: Any, pairs: list[tuple[Any, Any, Any]]) -> Any:
    """The recipe's ``rule:`` (a name or ``{name: ..., **settings}``), checked against its
    pairs now, before any model loads."""
    if spec is None:
        return None
    # lazy: torch, only when a rule is named
    from .rules import PairInfo, Request, RuleBase, make_rule

    rule = make_rule(spec, where="rule")
    if isinstance(rule, RuleBase):
        infos = [
            PairInfo(e is not None, a is not None, as_schedule(alpha) == Constant(0.0))
            for e, a, alpha in pairs
        ]
        try:
            rule.check(Request(pairs=tuple(infos)))
        except ConfigError as err:
            raise ConfigError(f"rule: {err}") from None
    return rule


def _side(spec: Any, defaults: Mapping[str, Any]) -> ModelSpec | None:
    return None if spec is None else ModelSpec.parse(spec, **defaults)
