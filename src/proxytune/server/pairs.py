"""Live pairs: load, replace and unload expert/anti-expert pairs while the server serves.

A change is made in two halves: the models load on a thread of their own (:meth:`LivePairs.load`,
the running batch keeps decoding), then the new pair set is swapped in between two decode steps
on the scheduler's worker (:meth:`LivePairs.apply`, through ``Scheduler.call``). Requests already
prepared keep the pairs they started with (their rows hold their own members), new ones get the
new set. A pair that fails to load changes nothing. Once the last request on an unloaded pair
finishes, nothing refers to its models any more and their memory is freed.

Every path is checked against the server's model roots (``--model-root``): a model directory, a
GGUF file, a LoRA adapter directory (from ``proxytune train``) and the base an adapter names
must all lie under one; pickled weights and remote code load only where the server was started
allowing them.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.lora_specs import resolve_adapter_dir
from ..engine.members import Pair
from ..errors import ConfigError, ProxyTuneError
from ..loading import load_pair
from ..schedules import Constant
from ..specs import ModelSpec
from .protocol import _Strict

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


class PathRefused(ProxyTuneError):
    """A path outside the model roots, or weights the server does not load (HTTP 403)."""


class PairLoad(_Strict):
    """What a client asks to load (``PUT /admin/pairs/{name}``): model paths (under a
    ``--model-root``) and settings."""

    expert: str | None = None
    anti_expert: str | None = None
    alpha: Any = 1.0
    expert_prompt: str = "auto"
    anti_expert_prompt: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"


def describe(index: int, pair: Pair) -> dict[str, Any]:
    """A pair as ``GET /admin/pairs`` lists it."""

    def side(m: Any) -> dict[str, str] | None:
        return None if m is None else {"model": m.model.name, "prompt": m.prompt.label}

    alpha = pair.alpha.alpha if isinstance(pair.alpha, Constant) else repr(pair.alpha)
    return {
        "index": index,
        "name": pair.name or str(index),
        "expert": side(pair.expert),
        "anti_expert": side(pair.anti_expert),
        "alpha": alpha,
    }


class LivePairs:
    """The served tuner's pairs, changed by name. Not thread-safe: the admin routes serialize
    changes (one at a time), the scheduler's worker applies them."""

    def __init__(
        self,
        tuner: ProxyTuner,
        roots: Sequence[str] = (),
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        self.tuner = tuner
        self.roots = tuple(Path(r).expanduser().resolve() for r in roots)
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self._cache: dict[tuple[Any, ...], Any] = {}
        """Models this registry loaded, by load settings (shared by pairs that reuse them)."""
        wrapped = tuner.options.stacked or tuner.options.prefix_cache
        if any(p.name is None for p in tuner.pairs) and not wrapped:
            tuner.adopt(tuner.with_pairs(tuner.pairs))  # names the pairs "0", "1", ...

    # reading ----------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [p.name or str(i) for i, p in enumerate(self.tuner.pairs)]

    def listing(self) -> list[dict[str, Any]]:
        return [describe(i, p) for i, p in enumerate(self.tuner.pairs)]

    # changing ---------------------------------------------------------------------------------

    def load(self, name: str, request: PairLoad) -> ProxyTuner:
        """The served tuner with pair ``name`` loaded (replacing a pair of that name, else
        appended), not yet applied: slow, run it off the worker thread. Raises
        :class:`PathRefused` or the loader's error; the running set is not touched."""
        check_name(name)
        self.tuner.with_pairs(self.tuner.pairs)  # refuses wrapped models before any loading
        if request.expert is None and request.anti_expert is None:
            raise ConfigError("a pair needs an expert, an anti-expert, or both")
        pairs = list(self.tuner.pairs)
        index = self.names.index(name) if name in self.names else len(pairs)
        expert = self._spec(request.expert, request.expert_prompt, request, "expert")
        anti = self._spec(request.anti_expert, request.anti_expert_prompt, request, "anti_expert")
        one_pass = self.tuner.options.one_pass and not self.tuner.cross_options
        before = dict(self._cache)
        try:
            pair = load_pair(index, expert, anti, request.alpha, self._cache, one_pass, name)
            pairs[index : index + 1] = [pair]
            return self._checked(pairs)
        except BaseException:
            self._cache = before  # a half-loaded pair keeps nothing alive
            raise

    def without(self, name: str) -> ProxyTuner:
        """The served tuner with pair ``name`` unloaded (later pairs move down one index)."""
        if name not in self.names:
            raise KeyError(name)
        index = self.names.index(name)
        kept = self.tuner.pairs[:index] + self.tuner.pairs[index + 1 :]
        return self._checked([renumbered(p, i) for i, p in enumerate(kept)])

    def apply(self, new: ProxyTuner) -> None:
        """Check ``new`` end to end (:meth:`~proxytune.tuner.ProxyTuner.check_ready`: every
        model renders a probe prompt, one step is scored), then swap its pairs in (on the
        scheduler's worker, between two steps) and forget models no pair uses any more. A
        set that fails the check raises its :class:`~proxytune.errors.ConfigError` and
        changes nothing."""
        try:
            new.check_ready()
            self.tuner.adopt(new)
        finally:
            used = {id(m.model) for m in self.tuner.members}
            self._cache = {k: m for k, m in self._cache.items() if id(m) in used}
            gc.collect()

    # checks -----------------------------------------------------------------------------------

    def _spec(
        self, path: str | None, prompt: str, request: PairLoad, side: str
    ) -> ModelSpec | None:
        if path is None:
            return None
        spec = ModelSpec(
            path=self._inside(path, side),
            prompt=prompt,  # type: ignore[arg-type]
            device=str(self.tuner.base.model.device),
            dtype=request.dtype,
            backend=request.backend,
            allow_pickle=self.allow_pickle,
            trust_remote_code=self.trust_remote_code,
        )
        resolved = resolve_adapter_dir(spec)
        assert resolved is not None
        if resolved.adapter is not None:  # an adapter directory: its base must be allowed too
            base = resolved.path
            if base != self.tuner.base.model.name:
                self._inside(base, f"{side}'s adapter base")
            if (
                not self.allow_pickle
                and not (Path(resolved.adapter) / "adapter_model.safetensors").is_file()
            ):
                raise PathRefused(
                    f"{side}: the adapter {path!r} has no adapter_model.safetensors; the server "
                    "loads pickled weights only when started with --allow-pickle"
                )
            spec = resolved
        return spec

    def _inside(self, path: str, what: str) -> str:
        """``path`` resolved, if it lies under a model root; else :class:`PathRefused`."""
        if not self.roots:
            raise PathRefused(
                "this server loads no models at run time: start it with --model-root DIR "
                "(repeatable) to allow the admin API to load from DIR"
            )
        if "\x00" in path:
            raise ConfigError(f"{what}: the path {path!r} holds a NUL character; give a plain path")
        local = Path(path).expanduser()
        if not local.is_absolute():
            raise PathRefused(f"{what}: give an absolute path under a --model-root, got {path!r}")
        real = local.resolve()
        if not any(real.is_relative_to(root) for root in self.roots):
            raise PathRefused(
                f"{what}: {path!r} is outside the server's model roots; put it under one of "
                f"the --model-root directories or restart the server with --model-root for it"
            )
        if not real.exists():
            raise ConfigError(f"{what}: {path!r} does not exist")
        return str(real)

    def _checked(self, pairs: list[Pair]) -> ProxyTuner:
        """The tuner ``pairs`` make (checked); a server that decodes locally cannot switch to
        the black-box loop (a pair of another tokenizer) at run time."""
        new = self.tuner.with_pairs(pairs)
        if new.blackbox != self.tuner.blackbox:
            raise ConfigError(
                "the new pair reads another tokenizer than the base, which needs the black-box "
                "loop; this server decodes locally: restart it with that pair instead"
            )
        return new


def renumbered(pair: Pair, index: int) -> Pair:
    """``pair`` at ``index``: its members' roles follow its new position."""

    def side(m: Any, role: str) -> Any:
        return None if m is None else dataclasses.replace(m, role=f"{role}[{index}]")

    return dataclasses.replace(
        pair, expert=side(pair.expert, "expert"), anti_expert=side(pair.anti_expert, "anti_expert")
    )


def check_name(name: str) -> None:
    """Pair names are short labels (they appear in URLs and metric labels); a name that
    starts with '.' (``.``, ``..``) reads as a path segment and is refused."""
    if (
        not (0 < len(name) <= 64)
        or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
        or name.startswith(".")
    ):
        raise ConfigError(
            f"pair name {name!r}: use 1 to 64 ASCII letters, digits, '-', '_' or '.', not "
            "starting with '.'"
        )
