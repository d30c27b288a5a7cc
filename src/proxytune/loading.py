"""Loading a model set: every model once (roles with the same load settings share weights),
pairs that run in one pass, an API base last, and the wrappers the engine options ask for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .backends.api import APISpec, load_api_model
from .backends.load import load_model
from .backends.lora_pair import pair_models
from .backends.lora_specs import resolve_adapter_dir
from .backends.prefix import cache_prefixes
from .backends.stacked import stack_shared
from .config import EngineOptions
from .engine.members import Member, Pair
from .prompts import resolve_prompt
from .schedules import as_schedule
from .specs import ModelSpec

__all__ = ["load_member", "load_models", "load_pair", "wrap_models"]


def load_models(
    base: ModelSpec | APISpec,
    pairs: Sequence[tuple[ModelSpec | None, ModelSpec | None, Any]],
    cache: dict[tuple[Any, ...], Any],
    one_pass: bool,
) -> tuple[Member, list[Pair]]:
    """The base and the pairs loaded through ``cache`` (``ModelSpec.load_key`` -> model).

    Unfinished training runs are refused before any model loads; ``one_pass``: an expert
    that is a LoRA adapter of its anti-expert's model shares it (:func:`load_pair`). An API
    base is built last: it may borrow a pair's tokenizer."""
    for spec in (base, *(m for pair in pairs for m in pair[:2])):
        if isinstance(spec, ModelSpec):
            resolve_adapter_dir(spec)  # refuses an unfinished training run
    base_member = None if isinstance(base, APISpec) else load_member("base", base, cache)
    built = [load_pair(i, e, a, alpha, cache, one_pass) for i, (e, a, alpha) in enumerate(pairs)]
    if base_member is None:
        assert isinstance(base, APISpec)
        local = [m.model for p in built for m in p.members]
        api = load_api_model(base, local, cache)
        base_member = Member("base", api, resolve_prompt(base.prompt, base, api.tokenizer))
    return base_member, built


def load_member(
    role: str, spec: ModelSpec | None, cache: dict[tuple[Any, ...], Any]
) -> Member | None:
    """``spec`` loaded into ``role`` (weights shared through ``cache`` by load settings); a
    trained adapter directory may stand alone as a model path; prompt ``auto`` resolved."""
    spec = resolve_adapter_dir(spec)
    if spec is None:
        return None
    if spec.load_key not in cache:
        cache[spec.load_key] = load_model(spec)
    model = cache[spec.load_key]
    return Member(role, model, resolve_prompt(spec.prompt, spec, model.tokenizer))


def load_pair(
    index: int,
    expert: ModelSpec | None,
    anti_expert: ModelSpec | None,
    alpha: Any,
    cache: dict[tuple[Any, ...], Any],
    one_pass: bool = False,
    name: str | None = None,
) -> Pair:
    """Pair ``index`` loaded (:func:`load_member`); ``one_pass``: an expert that is a LoRA
    adapter of its anti-expert's model shares it and runs in the same forward pass."""
    if one_pass:
        pair_models(resolve_adapter_dir(expert), resolve_adapter_dir(anti_expert), cache)
    return Pair(
        load_member(f"expert[{index}]", expert, cache),
        load_member(f"anti_expert[{index}]", anti_expert, cache),
        as_schedule(alpha, f"alpha of pair {index}"),
        name,
    )


def wrap_models(
    base: Member, pairs: list[Pair], options: EngineOptions
) -> tuple[Member, list[Pair]]:
    """The members with the model wrappers ``options`` ask for (stacked roles, prefix cache)."""
    if not (options.stacked or options.prefix_cache):
        return base, pairs
    members = [base, *(m for p in pairs for m in (p.expert, p.anti_expert) if m is not None)]
    models = [m.model for m in members]
    if options.stacked:
        wrapped = stack_shared(models)
    else:
        wrapped = cache_prefixes(models, options.prefix_min_tokens)
    swap = {id(m): replace(m, model=w) for m, w in zip(members, wrapped, strict=True)}

    def side(m: Member | None) -> Member | None:
        return None if m is None else swap[id(m)]

    return swap[id(base)], [
        replace(p, expert=side(p.expert), anti_expert=side(p.anti_expert)) for p in pairs
    ]
