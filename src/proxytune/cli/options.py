"""Options shared by the commands, declared once as option groups, and the tuner they build.

An option group is a frozen dataclass whose fields are ``Annotated`` typer options (each
field carries its help and panel); a command takes a group as one parameter and
:func:`grouped` shows typer the group's fields as options (typer names each after its field:
``base_prompt`` -> ``--base-prompt``), so a command's signature holds only its own flags.

- :class:`ModelOptions`: which models (``--recipe``, ``--base``, ``--expert``,
  ``--anti-expert``, ``--alpha``, ``--base-prompt``/``--expert-prompt``/``--anti-expert-prompt``);
- :class:`LoadOptions`: how they load (``--device``, ``--dtype``, ``--backend``, ``--threads``,
  ``--gpu-layers``, ``--trust-remote-code``);
- :class:`SamplingOptions`: decoding settings (``--max-new-tokens``, ... ``--cache``);
- :class:`SteeringOptions`: ``--rule``, ``--rule-arg``;
- :class:`EngineFlags`: engine options (:class:`~proxytune.config.EngineOptions`):
  ``--overlap``, ``--speculative``, ``--stacked``, ``--prefix-cache``, ``--one-pass/--two-pass``;
  :class:`PlainEngineFlags` adds ``--candidates/--no-candidates`` (``generate`` and ``eval``,
  the plain loop's commands);
- :class:`BlackBoxOptions`: a base behind an API (``--base-url`` and its settings) and pairs
  of other tokenizers (``--cross-tokenizer``, ``--min-coverage``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_type_hints

import typer

from ..config import EngineOptions, GenerationConfig
from ..errors import ConfigError
from ..extras import require
from ..specs import ModelSpec

if TYPE_CHECKING:
    from ..tuner import ProxyTuner

Opt = typer.Option
MODELS = "Models"
DECODING = "Decoding"
ENGINE = "Engine (same output, other speed)"
API = "A base behind an API"
ModelsOpt = functools.partial(Opt, rich_help_panel=MODELS)
DecodingOpt = functools.partial(Opt, rich_help_panel=DECODING)
EngineOpt = functools.partial(Opt, rich_help_panel=ENGINE)
ApiOpt = functools.partial(Opt, rich_help_panel=API)
F = TypeVar("F", bound=Callable[..., Any])


def grouped(command: F) -> F:
    """``command`` as typer sees it: each parameter typed by an option group (a dataclass)
    becomes the group's fields, in place, and the command is called with the group built.

    >>> @grouped
    ... def run(load: LoadOptions, quiet: bool = False) -> str:
    ...     return f"{load.device} {quiet}"
    >>> list(inspect.signature(run).parameters)[:3]
    ['device', 'dtype', 'backend']
    >>> run(device="cpu", dtype=None, backend=None, threads=None, gpu_layers=None,
    ...     trust_remote_code=False, quiet=True)
    'cpu True'
    """
    hints = get_type_hints(command, include_extras=True)
    groups: dict[str, Any] = {}
    params: list[inspect.Parameter] = []
    for param in inspect.signature(command).parameters.values():
        hint = hints.get(param.name, param.annotation)
        if not (isinstance(hint, type) and is_dataclass(hint)):
            params.append(param.replace(kind=param.KEYWORD_ONLY, annotation=hint))
            continue
        groups[param.name] = hint
        types = get_type_hints(hint, include_extras=True)
        for f in fields(hint):
            default = param.empty if f.default is MISSING else f.default
            kind = inspect.Parameter.KEYWORD_ONLY
            params.append(
                inspect.Parameter(f.name, kind, default=default, annotation=types[f.name])
            )
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: two options of one name in {names}")

    @functools.wraps(command)
    def run(**given: Any) -> Any:
        for name, group in groups.items():
            given[name] = group(**{f.name: given.pop(f.name) for f in fields(group)})
        return command(**given)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run  # type: ignore[return-value]


# options of more than one group, or of a group and a command -------------------------------

PROMPT_HELP = (
    "auto | raw | chat | a '{prompt}' template (auto: a trained expert's own format, else chat "
    "if the tokenizer has a chat template, else raw)."
)
PromptOption = Annotated[str, ModelsOpt(help=PROMPT_HELP)]
DeviceOption = Annotated[str | None, ModelsOpt(help="auto | cpu | cuda | cuda:N | mps")]
DtypeOption = Annotated[str | None, ModelsOpt(help="auto | float32 | bfloat16 | float16")]
MaxNewTokensOption = Annotated[int | None, DecodingOpt()]
TemperatureOption = Annotated[float | None, DecodingOpt(help="0 = greedy.")]
StopOption = Annotated[list[str] | None, DecodingOpt(help="Stop string (repeatable).")]
SeedOption = Annotated[int | None, DecodingOpt(help="Sampling seed.")]


# model selection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    """Which models: a recipe (the embedded default when no model is named), or a base and
    pairs named one by one; the pairs' alphas and every model's prompt format."""

    recipe: Annotated[str | None, ModelsOpt(help="Recipe file (YAML/TOML), or 'default'.")] = None
    base: Annotated[str | None, ModelsOpt(help="Base model: hub id, directory or .gguf.")] = None
    expert: Annotated[
        list[str] | None, ModelsOpt(help="Expert model (repeat for several pairs).")
    ] = None
    anti_expert: Annotated[list[str] | None, ModelsOpt(help="Anti-expert model (repeat).")] = None
    alpha: Annotated[
        list[str] | None,
        ModelsOpt(help="Alpha: once for all pairs, or once per pair (repeat --alpha, or '0.5,1')."),
    ] = None
    base_prompt: PromptOption = "auto"
    expert_prompt: PromptOption = "auto"
    anti_expert_prompt: PromptOption = "auto"

    def __post_init__(self) -> None:
        parse_alphas(self.alpha)  # a bad --alpha is refused before anything runs

    @property
    def alphas(self) -> list[float]:
        """The pairs' alphas (``--alpha``, parsed)."""
        return parse_alphas(self.alpha)


@dataclass(frozen=True)
class SweepModelOptions(ModelOptions):
    """``eval``'s models: its ``--alpha`` names the proxy systems' alphas (:attr:`sweep`),
    and the pairs keep their own."""

    alpha: Annotated[
        list[str] | None,
        ModelsOpt(
            help="Alphas of the proxy systems: repeat --alpha, or '0,0.5,1', or a range '0:2:0.25'."
        ),
    ] = None

    @property
    def alphas(self) -> list[float]:
        return []

    @property
    def sweep(self) -> list[float]:
        """The proxy systems' alphas, each once."""
        return parse_alphas(self.alpha, unique=True)


@dataclass(frozen=True)
class LoadOptions:
    """How every model loads (``None``: the recipe's, else ``auto``)."""

    device: DeviceOption = None
    dtype: DtypeOption = None
    backend: Annotated[
        str | None,
        ModelsOpt(
            help="auto (llama.cpp for a GGUF where llama-cpp-python is installed) | "
            "transformers | llamacpp, for every model (default: each model's own, auto)"
        ),
    ] = None
    threads: Annotated[
        str | None,
        ModelsOpt(
            help="CPU threads of llama.cpp models: N | auto (default: the cores, split between "
            "models that decode at once with --overlap)."
        ),
    ] = None
    """llama.cpp threads: N or ``auto`` (:func:`~proxytune.specs.parse_threads`)."""
    gpu_layers: Annotated[
        int | None,
        ModelsOpt(
            help="Layers of llama.cpp models on the GPU (default: all where llama.cpp has "
            "CUDA, else 0)."
        ),
    ] = None
    trust_remote_code: Annotated[bool, ModelsOpt(help="Run model code from the hub.")] = False


# decoding settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding settings (``None``: the tuner's default)."""

    max_new_tokens: MaxNewTokensOption = None
    temperature: TemperatureOption = None
    top_k: Annotated[int | None, DecodingOpt()] = None
    top_p: Annotated[float | None, DecodingOpt()] = None
    min_p: Annotated[float | None, DecodingOpt()] = None
    repetition_penalty: Annotated[float | None, DecodingOpt()] = None
    stop: StopOption = None
    seed: SeedOption = None
    n: Annotated[int | None, DecodingOpt(help="Samples per prompt.")] = None
    top_logprobs: Annotated[
        int | None, DecodingOpt(help="Return log-probs with K alternatives.")
    ] = None
    cache: Annotated[
        bool,
        DecodingOpt(
            "--cache/--no-cache", help="KV caches (--no-cache recomputes every step: debugging)."
        ),
    ] = True

    def settings(self) -> dict[str, Any]:
        """The settings given, as ``generate`` keywords, checked now, before any model loads."""
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        given.pop("top_logprobs"), given.pop("cache")
        settings = sampling_settings(**given, use_cache=None if self.cache else False)
        if self.top_logprobs is not None:
            settings.update(logprobs=True, top_logprobs=self.top_logprobs)
        GenerationConfig().updated(**settings)  # bad settings: one line, before any model loads
        return settings


def sampling_settings(**given: Any) -> dict[str, Any]:
    """Decoding settings given on the command line, ``None`` (not given) left out; ``stop``
    as a tuple."""
    if given.get("stop") is not None:
        given["stop"] = tuple(given["stop"]) or None
    return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class SteeringOptions:
    """The steering rule: the tuner's, another, or the tuner's with other settings."""

    rule: Annotated[
        str | None,
        DecodingOpt(help="Steering rule (see `proxytune rules`); default: the recipe's."),
    ] = None
    rule_arg: Annotated[
        list[str] | None,
        DecodingOpt(help="Rule setting key=value (repeatable; inner.k=5 reaches inside)."),
    ] = None

    def spec(self, tuner: ProxyTuner) -> dict[str, Any] | None:
        """``--rule`` and ``--rule-arg``: a new rule, settings laid over the tuner's rule, or
        ``None`` when neither is given."""
        # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
        from ..rules import merge_specs, parse_rule_args, spec_of

        args = list(self.rule_arg or ())
        if self.rule is None and not args:
            return None
        if self.rule is not None:
            return parse_rule_args(args, self.rule)
        return merge_specs(spec_of(tuner.rule), parse_rule_args(args))


# engine options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineFlags:
    """Engine options given on the command line (``None``: the recipe's, else the default)."""

    overlap: Annotated[
        bool | None,
        EngineOpt(
            "--overlap/--no-overlap",
            help="Run the models' forwards at once where they can (default: the recipe's).",
        ),
    ] = None
    speculative: Annotated[
        str | None,
        EngineOpt(
            metavar="K|auto",
            help="Speculative decoding: the expert drafts K tokens (or 'auto'); 0 = off. In the "
            "server: one loop per request instead of continuous batching.",
        ),
    ] = None
    stacked: Annotated[
        bool | None,
        EngineOpt(
            "--stacked/--no-stacked", help="Roles that share one loaded model run in one forward."
        ),
    ] = None
    prefix_cache: Annotated[
        bool | None,
        EngineOpt(
            "--prefix-cache/--no-prefix-cache",
            help="Prefill repeated prompt prefixes once per model.",
        ),
    ] = None
    one_pass: Annotated[
        bool | None,
        EngineOpt(
            "--one-pass/--two-pass",
            help="A LoRA expert of its anti-expert's model runs in the same forward (default: on).",
        ),
    ] = None

    def overrides(self) -> dict[str, Any]:
        """The options given, checked now, before any model loads (``--speculative 0`` turns
        a recipe's off)."""
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        overrides = {k: v for k, v in given.items() if v is not None}
        EngineOptions().updated(**overrides)  # raises ConfigError naming a bad value
        return overrides


@dataclass(frozen=True)
class PlainEngineFlags(EngineFlags):
    """:class:`EngineFlags` and the plain loop's own option (``generate`` and ``eval``)."""

    candidates: Annotated[
        bool | None,
        EngineOpt(
            "--candidates/--no-candidates",
            help="Where the rule only re-ranks the base's candidates (rerank, plausible), "
            "llama.cpp pair models score those ids only (default: on; the plain loop of generate "
            "and eval).",
        ),
    ] = None


# a base behind an OpenAI-compatible API, pairs of other tokenizers ----------------------------


@dataclass(frozen=True)
class BlackBoxOptions:
    """A base behind an API (``--base-url``) and pairs whose tokenizer differs from the
    base's: the models the black-box loop runs."""

    base_url: Annotated[
        str | None, ApiOpt(help="Base behind an OpenAI-compatible API (http://host:port/v1).")
    ] = None
    base_model: Annotated[str | None, ApiOpt(help="The model name the --base-url serves.")] = None
    base_top_logprobs: Annotated[
        int | None, ApiOpt(help="API candidates per token (default: --top-logprobs, else 20).")
    ] = None
    base_tokenizer: Annotated[
        str | None, ApiOpt(help="The API model's tokenizer (default: the pair's).")
    ] = None
    api_key_env: Annotated[str, ApiOpt(help="Environment variable holding the API key.")] = (
        "OPENAI_API_KEY"
    )
    base_chunk: Annotated[
        str, ApiOpt(help="Tokens the API drafts per call while the proxy agrees: auto | N.")
    ] = "auto"
    base_samples: Annotated[
        int | None,
        ApiOpt(help="Last resort for an API without log-probs: estimate from N samples/token."),
    ] = None
    base_endpoint: Annotated[
        str,
        ApiOpt(help="The API route: completions (token ids, exact) | chat (the reply continued)."),
    ] = "completions"
    cross_tokenizer: Annotated[
        bool, ModelsOpt(help="Allow pairs whose tokenizer differs from the base's.")
    ] = False
    min_coverage: Annotated[
        float | None, ModelsOpt(help="Different tokenizers: refuse below this mapped mass.")
    ] = None

    def api_spec(self, top_logprobs: int | None, prompt: str) -> Any:
        """The ``--base-url`` options as an :class:`~proxytune.backends.api.APISpec` (or
        None); ``top_logprobs``: the default of ``--base-top-logprobs``."""
        if self.base_url is None:
            if self.base_model is not None:
                raise typer.BadParameter("--base-model needs --base-url")
            return None
        if self.base_model is None:
            raise typer.BadParameter("--base-url needs --base-model (the name the endpoint serves)")

        require("httpx", "server", "a base behind an API (--base-url)")
        # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
        from ..backends.api import DEFAULT_TOP_LOGPROBS, APISpec

        chunk = self.base_chunk
        options: dict[str, Any] = {
            "url": self.base_url,
            "model": self.base_model,
            "top_logprobs": self.base_top_logprobs or top_logprobs or DEFAULT_TOP_LOGPROBS,
            "tokenizer": self.base_tokenizer,
            "api_key_env": self.api_key_env,
            "chunk": int(chunk) if chunk.isdigit() else chunk,
            "prompt": prompt,
            "endpoint": self.base_endpoint,
        }
        if self.base_samples is not None:
            options.update(logprobs="sampled", samples=self.base_samples)
        return APISpec(**options)

    def cross_mode(self) -> Any:
        """``--cross-tokenizer`` / ``--min-coverage`` as the tuner's ``cross_tokenizer``
        (``None``: not given)."""
        if self.cross_tokenizer or self.min_coverage is not None:
            return {} if self.min_coverage is None else {"min_coverage": self.min_coverage}
        return None


# alphas -----------------------------------------------------------------------------------------


def parse_alphas(values: Sequence[str] | str | None, *, unique: bool = False) -> list[float]:
    """Every ``--alpha`` value: repeated options, each a number, a comma list (``0,0.5,1``) or a
    range ``start:stop:step`` (stop included); ``unique`` drops repeats (an alpha sweep).

    >>> parse_alphas(["0", "0.5,1", "1:2:0.5"])
    [0.0, 0.5, 1.0, 1.0, 1.5, 2.0]
    >>> parse_alphas(["0,1", "1"], unique=True)
    [0.0, 1.0]
    """
    if isinstance(values, str):
        values = [values]
    out: list[float] = []
    for text in values or ():
        for part in text.split(","):
            part = part.strip()
            try:
                if ":" in part:
                    start, stop, step = (float(x) for x in part.split(":"))
                    if step <= 0 or stop < start:
                        raise ValueError
                    count = math.floor((stop - start) / step + 1e-9) + 1
                    out += [round(start + i * step, 10) for i in range(count)]
                elif part:
                    out.append(float(part))
            except ValueError:
                raise ConfigError(
                    f"--alpha {text!r}: give numbers separated by commas (0,0.5,1) or a range "
                    "start:stop:step with step > 0 (0:2:0.5)"
                ) from None
        if any(not math.isfinite(v) for v in out):
            raise ConfigError(f"--alpha {text!r}: every alpha must be finite")
    return list(dict.fromkeys(out)) if unique else out


# the tuner ------------------------------------------------------------------------------------


def build_tuner(
    models: ModelOptions,
    load: LoadOptions | None = None,
    *,
    engine: Mapping[str, Any] | None = None,
    base_api: Any = None,
    cross_tokenizer: Any = None,
    steering: SteeringOptions | None = None,
) -> ProxyTuner:
    """Load the tuner the options describe: a recipe (``--alpha`` overriding its pairs'), or a
    base and pairs named one by one, or a base behind an API (``base_api``, an
    :class:`~proxytune.backends.api.APISpec`); ``engine``: engine option overrides
    (:meth:`EngineFlags.overrides`); ``cross_tokenizer``: the different-tokenizer mode
    (``None``: the recipe's, or off); under ``steering``'s rule. Picklable with its
    arguments: what each Ray actor runs."""
    # lazy: torch and yaml stay off the CLI's start (`proxytune --help` imports it all)
    from ..recipe import default_recipe_path, load_recipe
    from ..tuner import ProxyTuner

    load, engine = load or LoadOptions(), engine or {}
    experts, antis = list(models.expert or ()), list(models.anti_expert or ())
    alphas = models.alphas
    if base_api is not None and (models.base is not None or models.recipe is not None):
        raise typer.BadParameter("give --base-url or --base/--recipe, not both")
    if base_api is None and (models.recipe is not None or models.base is None):
        if experts or antis:
            raise typer.BadParameter("--expert/--anti-expert need --base (or use --recipe alone)")
        recipe = models.recipe
        path = default_recipe_path() if recipe in (None, "default") else Path(recipe)
        overrides = {f.name: getattr(load, f.name) for f in fields(load)}
        overrides.pop("trust_remote_code")
        r = load_recipe(path, **overrides)
        if alphas:
            if len(alphas) not in (1, len(r.pairs)):
                raise typer.BadParameter(f"give one --alpha or one per pair ({len(r.pairs)})")
            values = alphas * len(r.pairs) if len(alphas) == 1 else alphas
            r.pairs[:] = [(e, a, v) for (e, a, _), v in zip(r.pairs, values, strict=True)]
        if cross_tokenizer is not None:
            r = replace(r, cross_tokenizer=cross_tokenizer)
        return _steered(ProxyTuner.from_recipe(r, **engine), steering)
    if experts and antis and len(experts) != len(antis):
        raise typer.BadParameter(
            f"{len(experts)} --expert but {len(antis)} --anti-expert: give them in pairs, "
            "or only one kind for expert-only / anti-expert-only pairs"
        )
    n_pairs = max(len(experts), len(antis))
    if alphas and len(alphas) not in (1, n_pairs):
        raise typer.BadParameter(f"give one --alpha or one per pair ({n_pairs})")
    values = (alphas or [1.0]) * n_pairs if len(alphas) <= 1 else alphas
    spec = functools.partial(
        ModelSpec,
        device=load.device or "auto",
        dtype=load.dtype or "auto",
        backend=load.backend or "auto",
        threads=load.threads,
        gpu_layers=load.gpu_layers,
        trust_remote_code=load.trust_remote_code,
    )
    pairs = [
        (
            spec(experts[i], prompt=models.expert_prompt) if experts else None,
            spec(antis[i], prompt=models.anti_expert_prompt) if antis else None,
            values[i],
        )
        for i in range(n_pairs)
    ]
    base = base_api if base_api is not None else spec(models.base, prompt=models.base_prompt)
    options = EngineOptions().updated(**engine)
    tuner = ProxyTuner.from_specs(base, pairs, cross_tokenizer=cross_tokenizer, options=options)
    return _steered(tuner, steering)


def _steered(tuner: ProxyTuner, steering: SteeringOptions | None) -> ProxyTuner:
    """``tuner`` under ``steering``'s rule (itself when no rule is given)."""
    rule = None if steering is None else steering.spec(tuner)
    return tuner if rule is None else tuner.with_rule(rule)


def prompt_formats(tuner: ProxyTuner) -> dict[str, str]:
    """The prompt format each model got, by role (``{"base": "raw", "expert[0]": "chat"}``):
    ``auto`` as resolved when the models loaded."""
    return {m.role: m.prompt.label for m in tuner.members}
