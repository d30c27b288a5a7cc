"""``ProxyTuner``: the public entry point that ties models, roles and the decode loop."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .arithmetic import combine_proxy
from .backends.base import LogitsModel
from .config import GenerationConfig
from .errors import ConfigError
from .generation import Combiner, Member, Pair, decode
from .prompts import Prompt, PromptFormat
from .results import GenerationResult, StepUpdate, TokenLogprob
from .schedules import Schedule, as_schedule
from .specs import ModelSpec
from .vocab import shared_vocab_size

AlphaSpec = float | Schedule | Mapping[str, Any]


class ProxyTuner:
    """A base model steered by expert/anti-expert pairs.

    >>> tuner = ProxyTuner.from_pretrained("big-base", expert="small-chat",
    ...                                    anti_expert="small-base", alpha=1.0)  # doctest: +SKIP
    >>> tuner.generate("Write a haiku about rain.", max_new_tokens=40)[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        base: Member,
        pairs: Sequence[Pair] = (),
        defaults: GenerationConfig | None = None,
        combine: Combiner | None = None,
    ) -> None:
        self.base = base
        self.pairs = list(pairs)
        self.defaults = defaults or GenerationConfig()
        self.combine = combine
        roles = [m.role for m in self.members]
        if len(set(roles)) != len(roles):
            raise ConfigError(f"model roles must be unique, got {roles}")
        self.vocab_size = shared_vocab_size(
            [
                (f"{m.role} ({m.model.name})", m.model.tokenizer, m.model.vocab_width)
                for m in self.members
            ]
        )

    @property
    def members(self) -> list[Member]:
        return [self.base, *(m for p in self.pairs for m in p.members)]

    @property
    def tokenizer(self) -> Any:
        return self.base.model.tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a row: every member's end-of-sequence ids."""
        ids = [i for m in self.members for i in m.model.eos_token_ids]
        return tuple(i for i in dict.fromkeys(ids) if i < self.vocab_size)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        base: str | ModelSpec,
        expert: str | ModelSpec | None = None,
        anti_expert: str | ModelSpec | None = None,
        alpha: AlphaSpec = 1.0,
        *,
        base_prompt: str | PromptFormat = "raw",
        expert_prompt: str | PromptFormat = "chat",
        anti_expert_prompt: str | PromptFormat = "raw",
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **defaults: Any,
    ) -> ProxyTuner:
        """Load one base and (optionally) one pair; the expert sees its chat template by default.

        For several pairs, build :class:`~proxytune.recipe.Recipe` or use :meth:`from_specs`.
        """
        opts = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
        base_spec = ModelSpec.parse(base, prompt=PromptFormat.parse(base_prompt), **opts)
        pairs = []
        if expert is not None or anti_expert is not None:
            e = (
                None
                if expert is None
                else ModelSpec.parse(expert, prompt=PromptFormat.parse(expert_prompt), **opts)
            )
            a = (
                None
                if anti_expert is None
                else ModelSpec.parse(
                    anti_expert, prompt=PromptFormat.parse(anti_expert_prompt), **opts
                )
            )
            pairs.append((e, a, alpha))
        return cls.from_specs(base_spec, pairs, GenerationConfig().updated(**defaults))

    @classmethod
    def from_specs(
        cls,
        base: ModelSpec,
        pairs: Sequence[tuple[ModelSpec | None, ModelSpec | None, AlphaSpec]] = (),
        defaults: GenerationConfig | None = None,
        loaded: dict[tuple[Any, ...], LogitsModel] | None = None,
    ) -> ProxyTuner:
        """Load every model once (roles with the same load settings share weights)."""
        from .backends.hf import load_hf

        cache = loaded if loaded is not None else {}

        def member(role: str, spec: ModelSpec | None) -> Member | None:
            if spec is None:
                return None
            if spec.load_key not in cache:
                cache[spec.load_key] = load_hf(spec)
            return Member(role, cache[spec.load_key], spec.prompt)

        base_member = member("base", base)
        assert base_member is not None
        built = [
            Pair(
                member(f"expert[{i}]", e),
                member(f"anti_expert[{i}]", a),
                as_schedule(alpha, f"alpha of pair {i}"),
            )
            for i, (e, a, alpha) in enumerate(pairs)
        ]
        return cls(base_member, built, defaults)

    @classmethod
    def from_recipe(cls, recipe: Any) -> ProxyTuner:
        """From a :class:`~proxytune.recipe.Recipe` or the path of a YAML/TOML recipe file."""
        from .recipe import Recipe, load_recipe

        r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        return cls.from_specs(r.base, r.pairs, r.generation)

    def alone(self, role: str = "base") -> ProxyTuner:
        """The model of ``role`` (``base``, ``expert[0]``, ...) decoding on its own prompt."""
        for m in self.members:
            if m.role == role:
                return ProxyTuner(replace(m, role="base"), (), self.defaults)
        raise ConfigError(f"no model in role {role!r}; roles: {[m.role for m in self.members]}")

    # generation -----------------------------------------------------------------------------

    def config(self, **settings: Any) -> GenerationConfig:
        """The tuner's defaults with ``settings`` applied (validated)."""
        return self.defaults.updated(**settings)

    def steps(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        config: GenerationConfig | None = None,
        **settings: Any,
    ) -> Iterator[list[StepUpdate]]:
        """Low-level streaming: every step's new token of every live row."""
        cfg = config.updated(**settings) if config is not None else self.config(**settings)
        pairs = self._pairs_with(alpha)
        return decode(
            self.base,
            pairs,
            _as_prompt_list(prompts),
            cfg,
            self.vocab_size,
            cfg.eos_token_ids if cfg.eos_token_ids is not None else self.eos_token_ids,
            combine=self.combine or combine_proxy,
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        **settings: Any,
    ) -> list[GenerationResult]:
        """Generate for each prompt (``n`` samples each, prompt-major order)."""
        prompt_list = _as_prompt_list(prompts)
        cfg = self.config(**settings)
        text: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        lps: dict[int, list[TokenLogprob]] = {}
        done: dict[int, StepUpdate] = {}
        for updates in self.steps(prompt_list, alpha, cfg):
            for u in updates:
                text.setdefault(u.row, []).append(u.delta)
                ids.setdefault(u.row, []).append(u.token_id)
                if u.logprob is not None:
                    lps.setdefault(u.row, []).append(u.logprob)
                if u.finish_reason is not None:
                    done[u.row] = u
        base_lengths = [len(self.base.prompt.render(p, self.tokenizer)) for p in prompt_list]
        return [
            GenerationResult(
                text="".join(text[row]),
                token_ids=ids[row],
                finish_reason=last.finish_reason or "",
                prompt_tokens=base_lengths[last.prompt_index],
                completion_tokens=len(ids[row]),
                prompt_index=last.prompt_index,
                sample_index=last.sample_index,
                stop_reason=last.stop_reason,
                logprobs=lps.get(row) if cfg.logprobs else None,
            )
            for row, last in sorted(done.items())
        ]

    def stream(
        self, prompt: Prompt, alpha: AlphaSpec | Sequence[AlphaSpec] | None = None, **settings: Any
    ) -> Iterator[str]:
        """Text deltas of one prompt as they become stable (stop strings never leak)."""
        cfg = self.config(**settings)
        if cfg.n != 1:
            raise ConfigError("stream() produces one sequence; use steps() for n > 1")
        for updates in self.steps([prompt], alpha, cfg):
            for u in updates:
                if u.delta:
                    yield u.delta

    def logits_processor(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
    ) -> Any:
        """A ``LogitsProcessor`` that proxy-tunes ``self.base``'s own ``model.generate``."""
        from .processor import ProxyLogitsProcessor

        return ProxyLogitsProcessor(
            self._pairs_with(alpha),
            _as_prompt_list(prompts),
            self.vocab_size,
            self.combine or combine_proxy,
        )

    def _pairs_with(self, alpha: AlphaSpec | Sequence[AlphaSpec] | None) -> list[Pair]:
        """The pairs with a per-call alpha: one value for all pairs, or one per pair."""
        if alpha is None:
            return self.pairs
        if not self.pairs:
            raise ConfigError("alpha was given but this tuner has no expert/anti-expert pair")
        if isinstance(alpha, Sequence) and not isinstance(alpha, (str, Mapping)):
            if len(alpha) != len(self.pairs):
                raise ConfigError(f"{len(alpha)} alphas given for {len(self.pairs)} pairs")
            values = list(alpha)
        else:
            values = [alpha] * len(self.pairs)
        return [
            replace(p, alpha=as_schedule(v, f"alpha of pair {i}"))  # type: ignore[arg-type]
            for i, (p, v) in enumerate(zip(self.pairs, values, strict=True))
        ]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or a chat) or a list of prompts -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and isinstance(items[0], Mapping):  # a single chat
        return [items]  # type: ignore[list-item]
    for i, p in enumerate(items):
        if not isinstance(p, (str, list, tuple)):
            raise ConfigError(f"prompt {i} must be a string or a list of messages, got {type(p)}")
    return items
