"""lm-evaluation-harness model type ``proxytune``: every harness task on a proxy-tuned model.

The harness asks a model three kinds of question; each maps onto proxytune once:

- ``loglikelihood(context, continuation)`` -> :func:`.scoring.score` (teacher-forced, the
  combined distribution, every model on its own prompt format);
- ``loglikelihood_rolling(text)`` -> :func:`.scoring.score_rolling` (lm-eval's windows);
- ``generate_until(context, gen_kwargs)`` -> :meth:`ProxyTuner.generate` with ``until`` as
  stop strings.

With lm-eval installed (``pip install lm-eval``; it is not a proxytune dependency), importing
this module registers the model type::

    python -m proxytune.evaluation.lm_eval_adapter --model proxytune \\
        --model_args recipe=default,alpha=0.5 --tasks arc_easy

or from Python: ``lm_eval.simple_evaluate(model=ProxyTuneLM(tuner=tuner, alpha=0.5), ...)``.
Without lm-eval the class still works on any object with an ``args`` tuple (the harness's
``Instance``), which is how the tests drive it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..extras import MissingExtraError, require
from ..recipe import default_recipe_path, load_recipe
from ..tuner import ProxyTuner
from .scoring import score, score_rolling

try:  # the harness is optional
    from lm_eval.api.model import LM as _Base

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object  # type: ignore[assignment,misc]
    HAVE_LM_EVAL = False


class _NoCache:
    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        pass


class ProxyTuneLM(_Base):  # type: ignore[misc,valid-type]
    """A :class:`~proxytune.ProxyTuner` as an lm-eval model.

    Args:
        tuner: a loaded tuner; otherwise one is built from ``recipe`` (a path or ``default``)
            or from ``base`` / ``expert`` / ``anti_expert`` paths.
        alpha: steering strength (``None``: the tuner's).
        rule: a rule name (``None``: the tuner's).
        system: ``proxy`` (default), ``base`` or ``expert``: which system answers.
        batch_size: rows scored or generated together.
        max_gen_toks: default ``max_new_tokens`` for ``generate_until``.
    """

    def __init__(
        self,
        tuner: ProxyTuner = None,
        recipe: str | None = None,
        base: str | None = None,
        expert: str | None = None,
        anti_expert: str | None = None,
        alpha: float | str | None = None,
        rule: str | None = None,
        system: str = "proxy",
        batch_size: int | str | None = 8,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str | None = None,
        progress: bool = True,
        **ignored: Any,
    ) -> None:
        if HAVE_LM_EVAL:
            super().__init__()
        else:
            self._rank, self._world_size = 0, 1
            self.cache_hook = _NoCache()
        if tuner is None:
            tuner = _build(recipe, base, expert, anti_expert, device, dtype)
        if system == "base":
            tuner = tuner.alone("base")
        elif system == "expert":
            first = tuner.pairs[0]
            tuner = tuner.alone((first.expert or first.anti_expert).role)
        elif system != "proxy":
            raise ConfigError(f"system must be proxy, base or expert, got {system!r}")
        self.tuner = tuner
        self.steering: dict[str, Any] = {}
        if alpha is not None and system == "proxy":
            self.steering["alpha"] = float(alpha)
        if rule is not None and system == "proxy":
            self.steering["rule"] = rule
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress

    # the three request types -------------------------------------------------------------

    def loglikelihood(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy?)`` per request."""
        pairs = [split_whitespace(*req.args) for req in requests]
        out: list[tuple[float, bool]] = []
        for start in self._batches(len(pairs), "loglikelihood", disable_tqdm):
            chunk = pairs[start : start + self.batch_size]
            scored = score(
                self.tuner,
                [c for c, _ in chunk],
                [x for _, x in chunk],
                batch_size=self.batch_size,
                **self.steering,
            )
            for req, s in zip(requests[start : start + len(chunk)], scored, strict=True):
                result = (s.logprob, s.greedy)
                self.cache_hook.add_partial("loglikelihood", req.args, result)
                out.append(result)
        return out

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """The log-likelihood of each whole text (for perplexity)."""
        out: list[float] = []
        for start in self._batches(len(requests), "loglikelihood_rolling", disable_tqdm):
            chunk = requests[start : start + self.batch_size]
            values = score_rolling(
                self.tuner,
                [req.args[0] for req in chunk],
                batch_size=self.batch_size,
                **self.steering,
            )
            for req, v in zip(chunk, values, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, v)
                out.append(v)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate after each context until one of ``until`` (cut before it) or the limit."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(
            total=len(requests),
            desc="generate_until",
            disable=disable_tqdm or not self.progress,
        )
        for rows in groups.values():
            settings = self.generation_settings(requests[rows[0]].args[1])
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                results = self.tuner.generate(
                    [requests[i].args[0] for i in chunk], **self.steering, **settings
                )
                for i, r in zip(chunk, results, strict=True):
                    out[i] = r.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
                bar.update(len(chunk))
        bar.close()
        return [t or "" for t in out]

    def generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lm-eval's ``gen_kwargs`` as proxytune settings (greedy unless ``do_sample``)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        settings: dict[str, Any] = {
            "stop": tuple(u for u in until if u),
            "max_new_tokens": int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
        }
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        settings["temperature"] = temperature if sample or temperature > 0 else 0.0
        for key in ("top_p", "top_k", "seed"):
            if key in kwargs:
                settings[key] = kwargs.pop(key)
        return settings

    # lm-eval plumbing ----------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tuner.tokenizer, "name_or_path", "proxytune")

    def _batches(self, total: int, desc: str, disable: bool) -> Any:
        starts = range(0, total, self.batch_size)
        return tqdm(starts, desc=desc, disable=disable or not self.progress or total == 0)


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context to the continuation, as lm-eval's HF model does
    (tokenizers attach a space to the word after it).

    >>> split_whitespace("Q: 2+2? A: ", "4")
    ('Q: 2+2? A:', ' 4')
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def _build(
    recipe: str | None,
    base: str | None,
    expert: str | None,
    anti_expert: str | None,
    device: str | None,
    dtype: str | None,
) -> Any:
    if base is not None:
        return ProxyTuner.from_pretrained(
            base,
            expert=expert,
            anti_expert=anti_expert,
            device=device or "auto",
            dtype=dtype or "auto",
        )
    path = default_recipe_path() if recipe in (None, "default") else recipe
    return ProxyTuner.from_recipe(load_recipe(path, device=device, dtype=dtype))


def register() -> bool:
    """Register ``proxytune`` as an lm-eval model type; ``False`` if lm-eval is missing."""
    if not HAVE_LM_EVAL:
        return False
    from lm_eval.api import registry

    if len(registry.model_registry) == 0:  # let lm-eval load its own models first
        import lm_eval.models  # noqa: F401
    try:
        if registry.get_model("proxytune") is ProxyTuneLM:
            return True
    except ValueError:
        pass
    registry.register_model("proxytune")(ProxyTuneLM)
    return True


register()


def main(argv: list[str] | None = None) -> int:
    """``lm_eval`` with the ``proxytune`` model type registered."""
    try:
        harness = require("lm_eval.__main__", None, "the lm-eval harness", package="lm-eval")
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cli_evaluate = harness.cli_evaluate

    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
