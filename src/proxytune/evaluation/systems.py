"""Systems under evaluation: one model set, decoded one way.

The same loaded models serve every system: the base alone, the expert alone, the
proxy-tuned base at each alpha (and rule), and optionally a directly tuned model loaded as
its own tuner. A system answers the two requests a task makes: generate, and score a
continuation (:mod:`.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..rules import spec_of
from .scoring import ContinuationScore, score

if TYPE_CHECKING:
    from ..tuner import ProxyTuner

ROLES = ("base", "expert", "proxy", "tuned", "other")


@dataclass
class System:
    """A named way of decoding: ``tuner`` with ``alpha`` and ``rule`` (``None``: the tuner's)."""

    name: str
    tuner: ProxyTuner
    role: str = "proxy"
    """``base``, ``expert``, ``proxy``, ``tuned`` (the reference for gap closed) or ``other``."""
    alpha: Any = None
    rule: Any = None
    prefix: str = ""
    """Text put before every prompt (a few-shot prompt's worked examples)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"system role must be one of {ROLES}, got {self.role!r}")

    def _steering(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.rule is not None:
            out["rule"] = self.rule
        return out

    def _prompts(self, prompts: Sequence[str]) -> list[str]:
        return [self.prefix + p for p in prompts]

    def generate(self, prompts: Sequence[str], **settings: Any) -> list[Any]:
        return self.tuner.generate(self._prompts(prompts), **self._steering(), **settings)

    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
    ) -> list[ContinuationScore]:
        return score(
            self.tuner,
            self._prompts(prompts),
            continuations,
            **self._steering(),
            batch_size=batch_size,
        )

    def describe(self) -> dict[str, Any]:
        """What produced this system's results (saved beside them; compared on resume)."""
        prefix = {"prefix": self.prefix} if self.prefix else {}  # older results have none
        return {
            **prefix,
            "name": self.name,
            "role": self.role,
            "alpha": _plain(self.alpha),
            "rule": _rule_spec(self.rule if self.rule is not None else self.tuner.rule),
            "models": [
                {"role": m.role, "model": m.model.name, "prompt": repr(m.prompt)}
                for m in self.tuner.members
            ],
            "pair_alphas": [repr(p.alpha) for p in self.tuner.pairs],
        }


def standard_systems(
    tuner: ProxyTuner,
    alphas: Sequence[float] | None = None,
    include: Sequence[str] = ("base", "expert", "proxy"),
    tuned: Any = None,
    rule: Any = None,
) -> list[System]:
    """The usual comparison: ``base`` alone, ``expert`` alone (each pair's, ``expert[i]`` past
    the first), ``proxy`` at the tuner's alpha or ``proxy@A`` per alpha in ``alphas``, and
    ``tuned`` when a directly tuned tuner is given."""
    unknown = sorted(set(include) - {"base", "expert", "proxy"})
    if unknown:
        raise ConfigError(f"unknown system(s) {unknown}; choose from base, expert, proxy")
    out: list[System] = []
    if "base" in include:
        out.append(System("base", tuner.alone("base"), "base"))
    if "expert" in include:
        for i, pair in enumerate(tuner.pairs):
            member = pair.expert or pair.anti_expert
            name = "expert" if i == 0 else f"expert[{i}]"
            out.append(System(name, tuner.alone(member.role), "expert"))
    if "proxy" in include and tuner.pairs:
        if not alphas:
            out.append(System("proxy", tuner, "proxy", None, rule))
        for a in alphas or ():
            out.append(System(f"proxy@{a:g}", tuner, "proxy", float(a), rule))
    if tuned is not None:
        out.append(System("tuned", tuned, "tuned"))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"system names must be unique, got {names}")
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _rule_spec(rule: Any) -> Any:
    try:
        return _plain_tree(spec_of(rule))
    except Exception:  # a rule without a spec (a bare function): its repr
        return repr(rule)


def _plain_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain_tree(v) for k, v in value.items()}
    return _plain(value)
