"""What every named rule shares: validated settings, the registry, calibration, helpers.

A rule is immutable, validated settings (a frozen dataclass, safe to share between requests
and threads) plus a ``step`` on a :class:`~proxytune.rules.context.StepContext`. Per-request
state (token ids of strings, per-prompt alphas, a loaded reward model) lives in the object
that :meth:`RuleBase.bind` returns, never in the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any, ClassVar

import torch

from ..arithmetic import Alpha
from ..config import MIN_TEMPERATURE
from ..errors import ConfigError, NumericalError
from .context import Combiner, Request, Rule, Sides, StepContext
from .settings import mapping_of, number, role_key, setting

MAX_RULE_TEMPERATURE = 1e4
"""The largest per-model temperature: past it a model is uniform anyway, and a float32
``-inf / T`` for ``T`` that overflows to inf is NaN (the smallest is the decoding temperature's,
:data:`~proxytune.config.MIN_TEMPERATURE`: below it ``log p / T`` overflows)."""

# -- helpers shared by the rules ------------------------------------------------------------


def is_zero(alpha: Alpha) -> bool:
    """True when ``alpha`` is exactly 0 for every row (the pair contributes nothing)."""
    if isinstance(alpha, torch.Tensor):
        return not bool(alpha.any())
    return alpha == 0


def row_alpha(alpha: Alpha, rows: int, device: torch.device) -> torch.Tensor:
    """A scalar or per-row alpha as a ``(B, 1)`` float32 tensor."""
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device, torch.float32).reshape(rows, 1)
    return torch.full((rows, 1), float(alpha), device=device)


def require_tokens(scores: torch.Tensor, rule: object, step: int, hint: str) -> torch.Tensor:
    """Return ``scores``, or raise :class:`NumericalError` if a row has no possible token."""
    empty = torch.isneginf(scores).all(dim=-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise NumericalError(
            f"rule {rule} left no possible token for row {row} at step {step}: {hint}"
        )
    return scores


def temperature_of(temperatures: Mapping[str, float], role: str, pair: int | None) -> float:
    """The temperature of ``role`` (``expert[i]`` wins over ``expert``); 1 if unset."""
    if pair is not None and f"{role}[{pair}]" in temperatures:
        return temperatures[f"{role}[{pair}]"]
    return temperatures.get(role, 1.0)


def calibrate(ctx: StepContext, temperatures: Mapping[str, float]) -> StepContext:
    """Per-model temperature before combining: ``lp_m <- log_softmax(lp_m / T_m)``, ``(B, V)``.

    A sharp model (small entropy) otherwise dominates a sum of log-probs; ``T > 1`` flattens
    it, ``T < 1`` sharpens it. ``T = 1`` leaves a model bit for bit unchanged.
    """
    if not temperatures:
        return ctx

    def cal(lp: torch.Tensor | None, role: str, pair: int | None) -> torch.Tensor | None:
        t = temperature_of(temperatures, role, pair)
        if lp is None or t == 1.0:
            return lp
        return torch.log_softmax(lp / t, dim=-1)

    base = cal(ctx.base, "base", None)
    assert base is not None
    pairs = tuple(
        (cal(e, "expert", i), cal(a, "anti_expert", i)) for i, (e, a) in enumerate(ctx.pairs)
    )
    return replace(ctx, base=base, pairs=pairs)


def only_pair(ctx: StepContext, i: int) -> StepContext:
    """``ctx`` with every pair but ``i`` removed (kept in place as ``(None, None)``, alpha 0)."""
    pairs = tuple(p if j == i else (None, None) for j, p in enumerate(ctx.pairs))
    alphas = tuple(a if j == i else 0.0 for j, a in enumerate(ctx.alphas))
    return replace(ctx, pairs=pairs, alphas=alphas)


# -- the registry ---------------------------------------------------------------------------

RULES: dict[str, type[RuleBase]] = {}
"""Every named rule, by name (filled as the rule modules are imported)."""


def register(cls: type[RuleBase]) -> type[RuleBase]:
    """Class decorator: make ``cls`` selectable by ``cls.name``."""
    if cls.name in RULES:
        raise ValueError(f"rule name {cls.name!r} is registered twice")
    RULES[cls.name] = cls
    return cls


def make_rule(spec: Any = None, where: str = "rule") -> Rule:
    """A rule from a name, a ``{name: ..., **settings}`` mapping, a rule, or a step function.

    ``None`` is the paper's rule (``proxy``). Errors name ``where`` and the offending key.

    >>> str(make_rule({"name": "plausible", "tau": 0.2, "inner": {"name": "rerank", "k": 3}}))
    'plausible(tau=0.2, inner=rerank(k=3))'
    """
    if spec is None:
        return RULES["proxy"]()
    if isinstance(spec, type) and issubclass(spec, RuleBase):
        return spec()
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        return _rule_class(spec, where)()
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ConfigError(f"{where} needs a 'name'; rules: {sorted(RULES)}", param=where)
        settings = {k: v for k, v in spec.items() if k != "name"}
        return _rule_class(spec["name"], f"{where}.name").from_settings(settings, where)
    if callable(spec):
        return FunctionRule(spec)
    raise ConfigError(
        f"{where} must be a rule name, a mapping with a 'name', or a rule; got {spec!r}",
        param=where,
    )


def _rule_class(name: Any, where: str) -> type[RuleBase]:
    if not isinstance(name, str):
        raise ConfigError(
            f"{where} must be a rule name (a string), got {type(name).__name__}", param=where
        )
    if name not in RULES:
        raise ConfigError(f"{where}: unknown rule {name!r}; rules: {sorted(RULES)}", param=where)
    return RULES[name]


def rule_spec(value: Any, where: str) -> Rule:
    """Settings converter for a nested rule (``inner``, ``rules[i]``)."""
    return make_rule(value, where)


def spec_of(value: Any) -> Any:
    """A named rule as its spec (what :func:`make_rule` takes back); other values unchanged."""
    return value.to_spec() if isinstance(value, RuleBase) else value


MAX_RULE_DEPTH = 16
"""How deeply a request's rule may nest (mappings and lists, counting the rule itself)."""
MAX_RULE_ITEMS = 2000
"""How many keys and values a request's rule may hold in all."""


def check_rule_size(spec: Any, where: str = "rule") -> None:
    """Refuse a rule spec nested deeper than :data:`MAX_RULE_DEPTH` or holding more than
    :data:`MAX_RULE_ITEMS` values, before anything is built from it (iteratively: a spec
    nested thousands deep must not exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(spec, 1)]
    items = 0
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: list[Any] = [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple):
            children = list(value)
        else:
            continue
        if depth > MAX_RULE_DEPTH:
            raise ConfigError(
                f"{where} is nested more than {MAX_RULE_DEPTH} levels deep (mappings and "
                "lists); flatten it",
                param=where,
            )
        items += len(children)
        if items > MAX_RULE_ITEMS:
            raise ConfigError(
                f"{where} holds more than {MAX_RULE_ITEMS} keys and values", param=where
            )
        stack.extend((c, depth + 1) for c in children)


def _copy_plain(value: Any) -> Any:
    """A copy of the dicts and lists in ``value`` (anything else shared)."""
    if isinstance(value, dict):
        return {k: _copy_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_plain(v) for v in value]
    return value


# -- the common base of every named rule ----------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RuleBase:
    """Settings as validated dataclass fields, plus the bind/step plumbing.

    Subclasses set ``name``, ``summary`` (one line), ``formula`` and ``cost``, declare their
    settings with :func:`~proxytune.rules.settings.setting`, and implement :meth:`step`
    (and, if they need per-request work, :meth:`prepare`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    cost: ClassVar[str] = ""

    temperatures: Mapping[str, float] = setting(
        dict,
        "per-model temperature before combining, e.g. {expert: 0.7}; keys base, expert, "
        f"anti_expert, expert[i], anti_expert[i]; each in [{MIN_TEMPERATURE:g}, "
        f"{MAX_RULE_TEMPERATURE:g}]",
        mapping_of(role_key, number(MIN_TEMPERATURE, MAX_RULE_TEMPERATURE)),
        factory=True,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            convert = f.metadata.get("convert")
            if convert is not None:
                value = convert(getattr(self, f.name), f"{self.name}.{f.name}")
                object.__setattr__(self, f.name, value)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str = "rule") -> RuleBase:
        """Build from a settings mapping; unknown keys and bad values name their key."""
        known = {f.name: f for f in fields(cls) if "convert" in f.metadata}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: rule {cls.name!r} has no setting(s) {unknown}; its settings: "
                f"{sorted(known)}",
                param=where,
            )
        values = {k: known[k].metadata["convert"](v, f"{where}.{k}") for k, v in settings.items()}
        return cls(**values)

    @classmethod
    def _settings(cls) -> list[Any]:
        """The setting fields: the rule's own first, then ``inner``, then ``temperatures``."""
        own = [f for f in fields(cls) if "convert" in f.metadata]
        last = {"inner": 1, "temperatures": 2}
        return sorted(own, key=lambda f: last.get(f.name, 0))

    @classmethod
    def settings_help(cls) -> list[tuple[str, Any, str]]:
        """``(setting, default, help)`` of every setting, for ``proxytune rules``."""
        out = []
        for f in cls._settings():
            default = f.default_factory() if callable(f.default_factory) else f.default
            out.append((f.name, spec_of(default), f.metadata["help"]))
        return out

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults (nested rules as rules)."""
        defaults = {name: default for name, default, _ in self.settings_help()}
        out = {}
        for f in self._settings():
            value = getattr(self, f.name)
            plain = value._spec if isinstance(value, RuleBase) else value
            if plain != defaults[f.name]:
                out[f.name] = value
        return out

    @cached_property
    def _spec(self) -> dict[str, Any]:
        """:meth:`to_spec`, built once per rule (nested rules reuse their own): a rule is
        immutable, and rebuilding a nested rule's spec at every level costs 2^depth."""
        spec: dict[str, Any] = {"name": self.name}
        for key, value in self.changed().items():
            value = value._spec if isinstance(value, RuleBase) else value
            spec[key] = list(value) if isinstance(value, tuple) else value
        return spec

    def to_spec(self) -> dict[str, Any]:
        """``{name: ..., **settings that differ from the defaults}``, plain data."""
        return _copy_plain(self._spec)

    @cached_property
    def _text(self) -> str:
        args = ", ".join(
            f"{k}={v}" if isinstance(v, Rule) else f"{k}={v!r}" for k, v in self.changed().items()
        )
        return f"{self.name}({args})" if args else self.name

    def __str__(self) -> str:
        return self._text

    # the protocol ---------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Validate the settings against the model set (pair count, sides present)."""
        n = len(request.pairs)
        for key in self.temperatures:
            if "[" not in key:
                continue
            role, index = key[:-1].split("[")
            if int(index) >= n:
                raise ConfigError(
                    f"{self.name}.temperatures names {key!r} but there are {n} pair(s)"
                )
            if not getattr(request.pairs[int(index)], role):
                raise ConfigError(
                    f"{self.name}.temperatures names {key!r} but pair {index} has no {role}"
                )

    def needs(self, request: Request) -> tuple[Sides, ...]:
        """Default: both sides of every pair whose alpha is not constantly 0."""
        self.check(request)
        return tuple(
            (p.expert and not p.always_off, p.anti_expert and not p.always_off)
            for p in request.pairs
        )

    def bind(self, request: Request) -> Combiner:
        self.check(request)
        return Bound(self, self.prepare(request), self.candidate_only(request))

    def prepare(self, request: Request) -> Any:
        """Per-request state handed to every :meth:`step` (default: none)."""
        return None

    def step(self, ctx: StepContext, state: Any) -> torch.Tensor:
        """``(B, V)`` scores from the (already calibrated) ``ctx``."""
        raise NotImplementedError

    # candidate scoring: rules that only re-rank the base's candidates --------------------------

    def pointwise(self) -> bool:
        """Whether the score of each token reads the pair models at that token only, and only
        up to a per-row constant: adding ``c`` to every log-prob of a row of a pair model moves
        every score of that row by one amount (the proxy formula, a product of experts, token
        biases). Default: no."""
        return False

    def candidate_only(self, request: Request) -> bool:
        """Whether this rule scores every token outside :meth:`candidates` ``-inf`` whatever the
        pairs say, and is :meth:`pointwise` inside: then the pair models are needed only at the
        candidates, and only up to a per-row constant (their logits there, unnormalised), which
        cancels in the sampling distribution. Default: no."""
        return False

    def candidates(self, base: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` bool: the only tokens this rule can choose, from the (calibrated) base's
        ``(B, V)`` log-probs alone; called only where :meth:`candidate_only` holds."""
        raise NotImplementedError

    def __call__(self, ctx: StepContext, request: Request | None = None) -> torch.Tensor:
        """Bind and run in one go, for tensors at hand (tests, notebooks)."""
        return self.bind(request or Request.infer(ctx))(ctx)


@dataclass(frozen=True)
class Bound:
    """A rule bound to one request: calibrates, then runs the rule's step."""

    rule: RuleBase
    state: Any = None
    candidate_only: bool = False
    """:meth:`RuleBase.candidate_only` for this request."""

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        return self.rule.step(calibrate(ctx, self.rule.temperatures), self.state)

    def candidates(self, base: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` bool: the tokens the rule can choose at this step, from the base's
        ``(B, V)`` log-probs (calibrated as the rule's step calibrates them)."""
        return self.rule.candidates(calibrate(StepContext(base), self.rule.temperatures).base)

    @property
    def label(self) -> str:
        return str(self.rule)


@dataclass(frozen=True)
class FunctionRule:
    """A plain step function ``StepContext -> (B, V)`` used as a rule (reads every model)."""

    fn: Combiner

    def needs(self, request: Request) -> tuple[Sides, ...]:
        return tuple(
            (p.expert and not p.always_off, p.anti_expert and not p.always_off)
            for p in request.pairs
        )

    def bind(self, request: Request) -> Combiner:
        return self.fn

    def __str__(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))
