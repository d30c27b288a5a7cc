"""``ProxyTuner``: the public entry point that ties models, roles and the decode loop."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .backends.api import APISpec
from .backends.base import LogitsModel
from .config import EngineOptions, GenerationConfig
from .engine.blackbox import blackbox_decode
from .engine.capabilities import is_top_k_only
from .engine.crosstok import CrossOptions, check_vocabularies
from .engine.members import Member, Pair
from .engine.overlap import can_overlap
from .engine.plain import decode
from .engine.prepare import Prepared, prepare
from .engine.processor import ProxyLogitsProcessor
from .engine.speculative import speculative_decode
from .errors import ConfigError, ProxyTuneError
from .loading import load_models, wrap_models
from .prompts import Prompt, PromptFormat, TokenIds
from .recipe import Recipe, load_recipe
from .results import GenerationResult, StepUpdate, TokenLogprob
from .rules import Request, Rule, RuleBase, make_rule
from .schedules import Schedule, as_schedule
from .specs import ModelSpec

AlphaSpec = float | Schedule | Mapping[str, Any]
RuleSpec = str | Mapping[str, Any] | Rule | None
"""A rule name, ``{name: ..., **settings}``, a :class:`~proxytune.rules.Rule`, or a step
function ``StepContext -> (B, V)``; ``None`` is the paper's ``proxy`` rule."""
OptionsSpec = EngineOptions | Mapping[str, Any] | None
"""Engine options (:class:`~proxytune.config.EngineOptions`) or a mapping of them."""
PROBE_PROMPTS: tuple[Prompt, ...] = ("Hello", [{"role": "user", "content": "Hello"}])
"""What :meth:`ProxyTuner.check_ready` renders and scores: a text and a chat."""


class ProxyTuner:
    """A base model steered by expert/anti-expert pairs.

    >>> tuner = ProxyTuner.from_pretrained("big-base", expert="small-chat",
    ...                                    anti_expert="small-base", alpha=1.0)  # doctest: +SKIP
    >>> tuner.generate("Write a haiku about rain.", max_new_tokens=40)[0].text  # doctest: +SKIP
    >>> tuner.generate("...", rule={"name": "plausible", "tau": 0.1})  # doctest: +SKIP

    ``options``: how the engine runs the models (:class:`~proxytune.config.EngineOptions`:
    overlap, speculative, stacked, prefix cache, one-pass LoRA pair); none changes the output.
    """

    def __init__(
        self,
        base: Member,
        pairs: Sequence[Pair] = (),
        defaults: GenerationConfig | None = None,
        rule: RuleSpec = None,
        *,
        cross_tokenizer: bool | Mapping[str, Any] | CrossOptions | None = False,
        options: OptionsSpec = None,
    ) -> None:
        self.options = EngineOptions.parse(options)
        """How the engine runs the models; change with :meth:`with_options`."""
        self._loaded = (base, list(pairs))
        self.base, self.pairs = wrap_models(base, list(pairs), self.options)
        self.defaults = defaults or GenerationConfig()
        roles = [m.role for m in self.members]
        if len(set(roles)) != len(roles):
            raise ConfigError(f"model roles must be unique, got {roles}")
        self.cross_options = CrossOptions.parse(cross_tokenizer)
        """The different-tokenizer mode (``None``: off, mismatched tokenizers are refused)."""
        self.vocab_size, self.cross_maps = check_vocabularies(
            self.base, self.pairs, self.cross_options
        )
        """Pair index -> :class:`~proxytune.engine.crosstok.VocabMap` for pairs of another
        tokenizer."""
        self.rule = self._checked_rule(rule)

    @property
    def overlap(self) -> bool:
        """Whether the models' forwards run at once by default (``options.overlap``)."""
        return self.options.overlap

    def with_rule(self, rule: RuleSpec) -> ProxyTuner:
        """The same models and defaults under another rule (nothing is reloaded)."""
        other = copy.copy(self)
        other.rule = self._checked_rule(rule)
        return other

    def with_options(self, options: OptionsSpec = None, **changes: Any) -> ProxyTuner:
        """The same models under other engine options (``options`` and/or single ``changes``
        such as ``overlap=True``); nothing is reloaded. ``one_pass`` applies when models load:
        give it to :meth:`from_specs` or :meth:`from_recipe` instead."""
        new = (self.options if options is None else EngineOptions.parse(options)).updated(**changes)
        if new.one_pass != self.options.one_pass:
            raise ConfigError(
                "the one_pass engine option applies when the models load; pass it to "
                "from_specs()/from_recipe() (or --two-pass on the command line)"
            )
        other = copy.copy(self)
        other.options = new
        if new.wraps_models != self.options.wraps_models:
            other.base, other.pairs = wrap_models(*self._loaded, new)
        return other

    def _checked_rule(self, rule: RuleSpec) -> Rule:
        """``rule`` as a :class:`~proxytune.rules.Rule`, checked against this model set (not
        its alphas: a call may give others; :meth:`prepare` checks the alphas it runs)."""
        built = make_rule(rule)
        if isinstance(built, RuleBase):
            built.check(
                Request(
                    pairs=tuple(replace(p.info, alpha_range=None) for p in self.pairs),
                    vocab_size=self.vocab_size,
                    tokenizer=self.tokenizer,
                    eos_token_ids=self.eos_token_ids,
                )
            )
        return built

    @property
    def members(self) -> list[Member]:
        return [self.base, *(m for p in self.pairs for m in p.members)]

    @property
    def tokenizer(self) -> Any:
        return self.base.model.tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a row: every member's end-of-sequence ids (a pair of another
        tokenizer's, as the base ids that are its twins)."""
        ids = list(self.base.model.eos_token_ids)
        for i, p in enumerate(self.pairs):
            for m in p.members:
                own = m.model.eos_token_ids
                ids += self.cross_maps[i].base_ids_of(own) if i in self.cross_maps else own
        return tuple(i for i in dict.fromkeys(ids) if i < self.vocab_size)

    @property
    def ids_differ(self) -> str | None:
        """Why the models cannot all read one list of the base's token ids (token-id prompts,
        the server's ``echo``), or ``None``: each model's prompt format is checked apart."""
        if self.cross_maps:
            return f"pair {min(self.cross_maps)}'s models read another tokenizer than the base"
        if is_top_k_only(self.base.model):
            return "the base is an API model, which is sent text"
        return None

    @property
    def blackbox(self) -> bool:
        """Whether generation runs the black-box loop: an API base (top-k only) or a pair of
        another tokenizer (:mod:`proxytune.engine.blackbox`)."""
        return bool(self.cross_maps) or is_top_k_only(self.base.model)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        base: str | ModelSpec,
        expert: str | ModelSpec | None = None,
        anti_expert: str | ModelSpec | None = None,
        alpha: AlphaSpec = 1.0,
        *,
        base_prompt: str | PromptFormat = "auto",
        expert_prompt: str | PromptFormat = "auto",
        anti_expert_prompt: str | PromptFormat = "auto",
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        rule: RuleSpec = None,
        cross_tokenizer: bool | Mapping[str, Any] | CrossOptions | None = False,
        options: OptionsSpec = None,
        **defaults: Any,
    ) -> ProxyTuner:
        """Load one base and (optionally) one pair; every prompt format defaults to ``auto``
        (:func:`~proxytune.prompts.resolve_prompt`: a trained expert's own format, else the chat
        template when the model has one, else raw).

        ``rule`` selects the steering rule (:mod:`proxytune.rules`); ``cross_tokenizer``
        allows a pair whose tokenizer differs from the base's (:mod:`proxytune.engine.crosstok`);
        ``defaults`` are generation settings. For several pairs, build
        :class:`~proxytune.recipe.Recipe` or use :meth:`from_specs`.
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
        return cls.from_specs(
            base_spec,
            pairs,
            GenerationConfig().updated(**defaults),
            rule=rule,
            cross_tokenizer=cross_tokenizer,
            options=options,
        )

    @classmethod
    def from_api(
        cls,
        url: str,
        model: str,
        expert: str | ModelSpec | None = None,
        anti_expert: str | ModelSpec | None = None,
        alpha: AlphaSpec = 1.0,
        *,
        top_logprobs: int = 20,
        expert_prompt: str | PromptFormat = "auto",
        anti_expert_prompt: str | PromptFormat = "auto",
        device: str = "auto",
        dtype: str = "auto",
        rule: RuleSpec = None,
        cross_tokenizer: bool | Mapping[str, Any] | CrossOptions | None = False,
        base_options: Mapping[str, Any] | None = None,
        options: OptionsSpec = None,
        **defaults: Any,
    ) -> ProxyTuner:
        """A base behind an OpenAI-compatible completions endpoint, steered by a local pair.

        ``base_options``: more :class:`~proxytune.backends.api.APISpec` settings (``tokenizer``,
        ``chunk``, ``api_key_env``, ``logprobs``, ``prompt`` (default ``auto``), ...). The API
        key is read from the environment variable ``api_key_env`` (default ``OPENAI_API_KEY``).

        >>> tuner = ProxyTuner.from_api("http://127.0.0.1:8000/v1", "llama-70b",
        ...                             expert="7b-chat", anti_expert="7b")  # doctest: +SKIP
        """
        settings = {"prompt": "auto", **dict(base_options or {})}
        spec = APISpec(url=url, model=model, top_logprobs=top_logprobs, **settings)

        def side(model: str | ModelSpec | None, fmt: str | PromptFormat) -> ModelSpec | None:
            if model is None:
                return None
            return ModelSpec.parse(
                model, prompt=PromptFormat.parse(fmt), device=device, dtype=dtype
            )

        pairs = []
        if expert is not None or anti_expert is not None:
            pairs.append(
                (side(expert, expert_prompt), side(anti_expert, anti_expert_prompt), alpha)
            )
        return cls.from_specs(
            spec,  # type: ignore[arg-type]
            pairs,
            GenerationConfig().updated(**defaults),
            rule=rule,
            cross_tokenizer=cross_tokenizer,
            options=options,
        )

    @classmethod
    def from_specs(
        cls,
        base: ModelSpec,
        pairs: Sequence[tuple[ModelSpec | None, ModelSpec | None, AlphaSpec]] = (),
        defaults: GenerationConfig | None = None,
        loaded: dict[tuple[Any, ...], LogitsModel] | None = None,
        rule: RuleSpec = None,
        cross_tokenizer: bool | Mapping[str, Any] | CrossOptions | None = False,
        options: OptionsSpec = None,
    ) -> ProxyTuner:
        """Load every model once (roles with the same load settings share weights).

        An expert that is a LoRA adapter of its anti-expert's model shares that model and runs
        in the same forward pass (:mod:`proxytune.backends.lora_pair`) unless the engine option
        ``one_pass`` is off (or ``cross_tokenizer`` is set: that mode rolls pair states back). A
        trained adapter directory may stand alone as a model path. ``base`` may be an
        :class:`~proxytune.backends.api.APISpec` (a base behind an API). A prompt format
        ``auto`` is resolved here, once per model (:func:`~proxytune.prompts.resolve_prompt`).
        """
        engine_options = EngineOptions.parse(options)
        one_pass = engine_options.one_pass and not CrossOptions.parse(cross_tokenizer)
        cache = loaded if loaded is not None else {}
        base_member, built = load_models(base, pairs, cache, one_pass)
        return cls(
            base_member,
            built,
            defaults,
            rule,
            cross_tokenizer=cross_tokenizer,
            options=engine_options,
        )

    @classmethod
    def from_recipe(cls, recipe: Any, **options: Any) -> ProxyTuner:
        """From a :class:`~proxytune.recipe.Recipe` or the path of a YAML/TOML recipe file;
        ``options``: engine options that override the recipe's ``engine:``."""
        r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        return cls.from_specs(
            r.base,
            r.pairs,
            r.generation,
            rule=r.rule,
            cross_tokenizer=r.cross_tokenizer,
            options=r.engine.updated(**options),
        )

    def alone(self, role: str = "base") -> ProxyTuner:
        """The model of ``role`` (``base``, ``expert[0]``, ...) decoding on its own prompt."""
        for m in self.members:
            if m.role == role:
                return ProxyTuner(replace(m, role="base"), (), self.defaults)
        raise ConfigError(f"no model in role {role!r}; roles: {[m.role for m in self.members]}")

    def with_pairs(self, pairs: Sequence[Pair]) -> ProxyTuner:
        """The same base, defaults, rule and options with other (loaded) pairs, checked as any
        new tuner is (vocabularies, the rule); pairs without a name are named by index.
        ``stacked`` and ``prefix_cache`` wrap every model together: then pairs cannot change."""
        if self.options.stacked or self.options.prefix_cache:
            raise ConfigError(
                "pairs cannot change while the stacked or prefix_cache engine option wraps the "
                "models; serve without them to swap pairs live"
            )
        named = [replace(p, name=p.name or str(i)) for i, p in enumerate(pairs)]
        return ProxyTuner(
            self._loaded[0],
            named,
            self.defaults,
            self.rule,
            cross_tokenizer=self.cross_options,
            options=self.options,
        )

    def adopt(self, other: ProxyTuner) -> None:
        """Become ``other`` (a :meth:`with_pairs` of this tuner) at once, in place: every holder
        of this tuner sees the new pairs; decodes already running keep the ones they started
        with."""
        with _SWAP:
            self.__dict__.update(other.__dict__)

    def snapshot(self) -> ProxyTuner:
        """A consistent shallow copy of the model set, safe to read while another thread
        calls :meth:`adopt`."""
        with _SWAP:
            return copy.copy(self)

    def check_ready(self, step: bool = True) -> None:
        """Refuse a model set that would fail every request, before it serves one: each
        model renders a text and a chat probe prompt in its prompt format, then (``step``)
        one greedy step is scored on both (every model's forward, the rule, the alphas).
        Raises :class:`~proxytune.errors.ConfigError` naming the model and the reason."""
        for m in self.members:
            for prompt in PROBE_PROMPTS:
                try:
                    m.prompt.render(prompt, m.model.tokenizer)
                except ConfigError as err:
                    raise ConfigError(
                        f"the {m.role} ({m.model.name}) cannot read a prompt: {err}"
                    ) from None
        if not step:
            return
        try:
            for _ in self.steps(PROBE_PROMPTS, max_new_tokens=1, temperature=0, speculative=0):
                pass  # one step: every row ends at its first token
        except Exception as err:  # the rule, the alphas, or a model's forward
            what = "" if isinstance(err, ProxyTuneError) else f"{type(err).__name__}: "
            raise ConfigError(f"one decoding step on a probe prompt failed: {what}{err}") from None

    # generation -----------------------------------------------------------------------------

    def config(self, **settings: Any) -> GenerationConfig:
        """The tuner's defaults with ``settings`` applied (validated)."""
        return self.defaults.updated(**settings)

    def prepare(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        config: GenerationConfig | None = None,
        *,
        rule: RuleSpec = None,
        **settings: Any,
    ) -> Prepared:
        """Check, bind and render one call (:func:`~proxytune.engine.prepare.prepare`); the
        models do not run. ``alpha``, ``rule`` and ``settings`` as in :meth:`steps`."""
        cfg = config.updated(**settings) if config is not None else self.config(**settings)
        eos = cfg.eos_token_ids if cfg.eos_token_ids is not None else self.eos_token_ids
        chosen = self.rule if rule is None else self._checked_rule(rule)
        pairs = self._pairs_with(alpha)
        prompt_list = _as_prompt_list(prompts)
        why = self.ids_differ
        if why is not None and any(isinstance(p, TokenIds) for p in prompt_list):
            raise ConfigError(
                f"prompt: token-id prompts are read verbatim by every model, but {why}; "
                "send the prompt as text",
                param="prompt",
            )
        return prepare(self.base, pairs, prompt_list, cfg, self.vocab_size, eos, chosen)

    def run(
        self,
        prepared: Prepared,
        *,
        speculative: int | str | None = None,
        stats: Any = None,
        overlap: bool | None = None,
    ) -> Iterator[list[StepUpdate]]:
        """Decode a :meth:`prepare` d call in the loop these models need (plain, speculative
        or black-box); ``speculative``, ``stats`` and ``overlap`` as in :meth:`steps`."""
        draft = self.options.speculative if speculative is None else speculative
        if self.blackbox:
            if draft:
                raise ConfigError(
                    "speculative decoding needs full logits from a base of the pair's "
                    "tokenizer; an API base or a pair of another tokenizer runs the plain "
                    "black-box loop (leave speculative unset)"
                )
            return blackbox_decode(
                prepared, cross=self.cross_maps, options=self.cross_options, stats=stats
            )
        concurrent = self.options.overlap if overlap is None else bool(overlap)
        concurrent = concurrent and can_overlap([m.model for m in self.members])
        if draft:
            return speculative_decode(prepared, k=draft, stats=stats, overlap=concurrent)
        return decode(prepared, overlap=concurrent, candidates=self.options.candidates)

    def steps(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        config: GenerationConfig | None = None,
        *,
        rule: RuleSpec = None,
        speculative: int | str | None = None,
        stats: Any = None,
        overlap: bool | None = None,
        **settings: Any,
    ) -> Iterator[list[StepUpdate]]:
        """Low-level streaming: every step's new token of every live row.

        ``rule`` (here and in :meth:`generate`, :meth:`stream`) overrides the tuner's rule for
        this call only. ``speculative``: a draft length or ``"auto"`` for speculative proxy
        decoding (:mod:`proxytune.engine.speculative`; same output distribution, fewer base
        forwards; default: ``options.speculative``); ``stats``: a
        :class:`~proxytune.engine.speculative.SpeculativeStats` it fills in (or, for an API
        base or a pair of another tokenizer, a
        :class:`~proxytune.engine.blackbox.BlackBoxStats`: calls, tokens, coverage).
        ``overlap``: run the models' forwards at once where they can (default:
        ``options.overlap``). Everything is checked here; the models run as the iterator is
        consumed.
        """
        prepared = self.prepare(prompts, alpha, config, rule=rule, **settings)
        return self.run(prepared, speculative=speculative, stats=stats, overlap=overlap)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        *,
        rule: RuleSpec = None,
        speculative: int | str | None = None,
        stats: Any = None,
        overlap: bool | None = None,
        on_step: Callable[[list[StepUpdate]], None] | None = None,
        **settings: Any,
    ) -> list[GenerationResult]:
        """Generate for each prompt (``n`` samples each, prompt-major order); ``speculative``,
        ``stats`` and ``overlap`` as in :meth:`steps`; ``on_step`` sees each step's updates as
        they come (progress bars)."""
        prompt_list = _as_prompt_list(prompts)
        cfg = self.config(**settings)
        text: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        lps: dict[int, list[TokenLogprob]] = {}
        done: dict[int, StepUpdate] = {}
        steps = self.steps(
            prompt_list,
            alpha,
            cfg,
            rule=rule,
            speculative=speculative,
            stats=stats,
            overlap=overlap,
        )
        for updates in steps:
            if on_step is not None:
                on_step(updates)
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
        self,
        prompt: Prompt,
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        *,
        rule: RuleSpec = None,
        **settings: Any,
    ) -> Iterator[str]:
        """Text deltas of one prompt as they become stable (stop strings never leak)."""
        cfg = self.config(**settings)
        if cfg.n != 1:
            raise ConfigError("stream() produces one sequence; use steps() for n > 1")
        for updates in self.steps([prompt], alpha, cfg, rule=rule):
            for u in updates:
                if u.delta:
                    yield u.delta

    def logits_processor(
        self,
        prompts: Prompt | Sequence[Prompt],
        alpha: AlphaSpec | Sequence[AlphaSpec] | None = None,
        *,
        rule: RuleSpec = None,
    ) -> Any:
        """A ``LogitsProcessor`` that proxy-tunes ``self.base``'s own ``model.generate``."""
        if self.blackbox:
            raise ConfigError(
                "a LogitsProcessor runs inside the base's own generate(): it needs a local base "
                "and one shared vocabulary (not an API base or a pair of another tokenizer)"
            )
        return ProxyLogitsProcessor(
            self._pairs_with(alpha),
            _as_prompt_list(prompts),
            self.vocab_size,
            self.rule if rule is None else self._checked_rule(rule),
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
            device=self.base.model.device,
        )

    def _pairs_with(self, alpha: AlphaSpec | Sequence[AlphaSpec] | None) -> list[Pair]:
        """The pairs with a per-call alpha: one value for all pairs, or one per pair."""
        if alpha is None:
            return self.pairs
        if not self.pairs:
            raise ConfigError(
                "alpha was given but this tuner has no expert/anti-expert pair", param="alpha"
            )
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


_SWAP = threading.Lock()
"""Makes :meth:`ProxyTuner.adopt` and :meth:`ProxyTuner.snapshot` atomic."""


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or a chat) or a list of prompts -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and isinstance(items[0], Mapping):  # a single chat
        return [items]  # type: ignore[list-item]
    for i, p in enumerate(items):
        if not isinstance(p, (str, list, tuple)):
            raise ConfigError(
                f"prompt {i} must be a string or a list of messages, got {type(p)}", param="prompt"
            )
    return items
