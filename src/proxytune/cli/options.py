"""Options shared by the commands, declared once, and the tuner they build.

Each group is a set of ``Annotated`` aliases; a command takes the ones it needs as parameters
(typer names the option after the parameter: ``base_prompt`` -> ``--base-prompt``), packs the
model options into :class:`ModelOptions` and calls :func:`build_tuner`.

- model selection: ``--recipe``, ``--base``, ``--expert``, ``--anti-expert``, ``--alpha``,
  ``--base-prompt``/``--expert-prompt``/``--anti-expert-prompt``, ``--device``, ``--dtype``,
  ``--trust-remote-code``; an API base: ``--base-url`` and its settings; different tokenizers:
  ``--cross-tokenizer``, ``--min-coverage``;
- decoding settings: ``--max-new-tokens``, ``--temperature``, ``--top-k``, ... ``--cache``;
- engine options (:class:`~proxytune.config.EngineOptions`): ``--overlap``, ``--speculative``,
  ``--stacked``, ``--prefix-cache``, ``--one-pass/--two-pass``, ``--candidates/--no-candidates``
  (``generate`` and ``eval``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..tuner import ProxyTuner

Opt = typer.Option
MODELS = "Models"
DECODING = "Decoding"
ENGINE = "Engine (same output, other speed)"
API = "A base behind an API"

# model selection ----------------------------------------------------------------------------

RecipeOption = Annotated[
    str | None, Opt(help="Recipe file (YAML/TOML), or 'default'.", rich_help_panel=MODELS)
]
BaseOption = Annotated[
    str | None, Opt(help="Base model: hub id, directory or .gguf.", rich_help_panel=MODELS)
]
ExpertOption = Annotated[
    list[str] | None,
    Opt(help="Expert model (repeat for several pairs).", rich_help_panel=MODELS),
]
AntiExpertOption = Annotated[
    list[str] | None, Opt(help="Anti-expert model (repeat).", rich_help_panel=MODELS)
]
AlphaOption = Annotated[
    list[str] | None,
    Opt(
        help="Alpha: once for all pairs, or once per pair (repeat --alpha, or '0.5,1').",
        rich_help_panel=MODELS,
    ),
]
SweepAlphaOption = Annotated[
    list[str] | None,
    Opt(
        help="Alphas of the proxy systems: repeat --alpha, or '0,0.5,1', or a range '0:2:0.25'.",
        rich_help_panel=MODELS,
    ),
]
PROMPT_HELP = (
    "auto | raw | chat | a '{prompt}' template (auto: a trained expert's own format, else chat "
    "if the tokenizer has a chat template, else raw)."
)
PromptOption = Annotated[str, Opt(help=PROMPT_HELP, rich_help_panel=MODELS)]
DeviceOption = Annotated[
    str | None, Opt(help="auto | cpu | cuda | cuda:N | mps", rich_help_panel=MODELS)
]
DtypeOption = Annotated[
    str | None, Opt(help="auto | float32 | bfloat16 | float16", rich_help_panel=MODELS)
]
BackendOption = Annotated[
    str | None,
    Opt(
        help="auto (llama.cpp for a GGUF where llama-cpp-python is installed) | transformers | "
        "llamacpp, for every model (default: each model's own, auto)",
        rich_help_panel=MODELS,
    ),
]
ThreadsOption = Annotated[
    str | None,
    Opt(
        help="CPU threads of llama.cpp models: N | auto (default: the cores, split between "
        "models that decode at once with --overlap).",
        rich_help_panel=MODELS,
    ),
]
GpuLayersOption = Annotated[
    int | None,
    Opt(
        help="Layers of llama.cpp models on the GPU (default: all where llama.cpp has CUDA, "
        "else 0).",
        rich_help_panel=MODELS,
    ),
]
TrustRemoteCodeOption = Annotated[
    bool, Opt(help="Run model code from the hub.", rich_help_panel=MODELS)
]
CrossTokenizerOption = Annotated[
    bool, Opt(help="Allow pairs whose tokenizer differs from the base's.", rich_help_panel=MODELS)
]
MinCoverageOption = Annotated[
    float | None,
    Opt(help="Different tokenizers: refuse below this mapped mass.", rich_help_panel=MODELS),
]

# a base behind an OpenAI-compatible API -------------------------------------------------------

BaseUrlOption = Annotated[
    str | None,
    Opt(help="Base behind an OpenAI-compatible API (http://host:port/v1).", rich_help_panel=API),
]
BaseModelOption = Annotated[
    str | None, Opt(help="The model name the --base-url serves.", rich_help_panel=API)
]
BaseTopLogprobsOption = Annotated[
    int | None,
    Opt(help="API candidates per token (default: --top-logprobs, else 20).", rich_help_panel=API),
]
BaseTokenizerOption = Annotated[
    str | None, Opt(help="The API model's tokenizer (default: the pair's).", rich_help_panel=API)
]
ApiKeyEnvOption = Annotated[
    str, Opt(help="Environment variable holding the API key.", rich_help_panel=API)
]
BaseChunkOption = Annotated[
    str,
    Opt(
        help="Tokens the API drafts per call while the proxy agrees: auto | N.", rich_help_panel=API
    ),
]
BaseEndpointOption = Annotated[
    str,
    Opt(
        help="The API route: completions (token ids, exact) | chat (the reply continued).",
        rich_help_panel=API,
    ),
]
BaseSamplesOption = Annotated[
    int | None,
    Opt(
        help="Last resort for an API without log-probs: estimate from N samples/token.",
        rich_help_panel=API,
    ),
]

# decoding settings ----------------------------------------------------------------------------

MaxNewTokensOption = Annotated[int | None, Opt(rich_help_panel=DECODING)]
TemperatureOption = Annotated[float | None, Opt(help="0 = greedy.", rich_help_panel=DECODING)]
TopKOption = Annotated[int | None, Opt(rich_help_panel=DECODING)]
TopPOption = Annotated[float | None, Opt(rich_help_panel=DECODING)]
MinPOption = Annotated[float | None, Opt(rich_help_panel=DECODING)]
RepetitionPenaltyOption = Annotated[float | None, Opt(rich_help_panel=DECODING)]
StopOption = Annotated[
    list[str] | None, Opt(help="Stop string (repeatable).", rich_help_panel=DECODING)
]
SeedOption = Annotated[int | None, Opt(help="Sampling seed.", rich_help_panel=DECODING)]
NOption = Annotated[int | None, Opt(help="Samples per prompt.", rich_help_panel=DECODING)]
TopLogprobsOption = Annotated[
    int | None, Opt(help="Return log-probs with K alternatives.", rich_help_panel=DECODING)
]
CacheOption = Annotated[
    bool,
    Opt(
        "--cache/--no-cache",
        help="KV caches (--no-cache recomputes every step: debugging).",
        rich_help_panel=DECODING,
    ),
]
RuleOption = Annotated[
    str | None,
    Opt(
        help="Steering rule (see `proxytune rules`); default: the recipe's.",
        rich_help_panel=DECODING,
    ),
]
RuleArgOption = Annotated[
    list[str] | None,
    Opt(
        help="Rule setting key=value (repeatable; inner.k=5 reaches inside).",
        rich_help_panel=DECODING,
    ),
]

# engine options -------------------------------------------------------------------------------

OverlapOption = Annotated[
    bool | None,
    Opt(
        "--overlap/--no-overlap",
        help="Run the models' forwards at once where they can (default: the recipe's).",
        rich_help_panel=ENGINE,
    ),
]
SpeculativeOption = Annotated[
    str | None,
    Opt(
        metavar="K|auto",
        help="Speculative decoding: the expert drafts K tokens (or 'auto'); 0 = off. In the "
        "server: one loop per request instead of continuous batching.",
        rich_help_panel=ENGINE,
    ),
]
StackedOption = Annotated[
    bool | None,
    Opt(
        "--stacked/--no-stacked",
        help="Roles that share one loaded model run in one forward.",
        rich_help_panel=ENGINE,
    ),
]
PrefixCacheOption = Annotated[
    bool | None,
    Opt(
        "--prefix-cache/--no-prefix-cache",
        help="Prefill repeated prompt prefixes once per model.",
        rich_help_panel=ENGINE,
    ),
]
OnePassOption = Annotated[
    bool | None,
    Opt(
        "--one-pass/--two-pass",
        help="A LoRA expert of its anti-expert's model runs in the same forward (default: on).",
        rich_help_panel=ENGINE,
    ),
]
CandidatesOption = Annotated[
    bool | None,
    Opt(
        "--candidates/--no-candidates",
        help="Where the rule only re-ranks the base's candidates (rerank, plausible), llama.cpp "
        "pair models score those ids only (default: on; the plain loop of generate and eval).",
        rich_help_panel=ENGINE,
    ),
]


def engine_overrides(
    *,
    overlap: bool | None = None,
    speculative: str | None = None,
    stacked: bool | None = None,
    prefix_cache: bool | None = None,
    one_pass: bool | None = None,
    candidates: bool | None = None,
) -> dict[str, Any]:
    """The engine options given on the command line (``None``: the recipe's, else the
    default), checked now, before any model loads. ``--speculative 0`` turns a recipe's off."""
    from ..config import EngineOptions

    given = {
        "overlap": overlap,
        "speculative": speculative,
        "stacked": stacked,
        "prefix_cache": prefix_cache,
        "one_pass": one_pass,
        "candidates": candidates,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    EngineOptions().updated(**overrides)  # raises ConfigError naming a bad value
    return overrides


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


# the models and the tuner -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    """What the model options of a command name: the models, their roles and formats, how to
    load them, and engine option overrides."""

    recipe: str | None = None
    base: str | None = None
    experts: tuple[str, ...] = ()
    anti_experts: tuple[str, ...] = ()
    alphas: tuple[float, ...] = ()
    base_prompt: str = "auto"
    expert_prompt: str = "auto"
    anti_expert_prompt: str = "auto"
    device: str | None = None
    dtype: str | None = None
    backend: str | None = None
    threads: int | str | None = None
    """llama.cpp threads: N or ``auto`` (:func:`~proxytune.specs.parse_threads`)."""
    gpu_layers: int | None = None
    trust_remote_code: bool = False
    base_api: Any = None
    """An :class:`~proxytune.backends.api.APISpec` standing for ``--base``."""
    cross_tokenizer: Any = None
    """The different-tokenizer mode (overrides the recipe's); ``None``: the recipe's, or off."""
    engine: Mapping[str, Any] = field(default_factory=dict)
    """Engine option overrides (:func:`engine_overrides`)."""

    @property
    def uses_recipe(self) -> bool:
        """A recipe (the embedded default when no model is named) rather than models."""
        return self.base_api is None and (self.recipe is not None or self.base is None)


def build_tuner(models: ModelOptions) -> ProxyTuner:
    """Load the tuner ``models`` describes: a recipe (``--alpha`` overriding its pairs'), or a
    base and pairs named one by one (or a base behind an API)."""
    from ..config import EngineOptions
    from ..recipe import default_recipe_path, load_recipe
    from ..specs import ModelSpec
    from ..tuner import ProxyTuner

    experts, antis, alphas = list(models.experts), list(models.anti_experts), list(models.alphas)
    if models.base_api is not None and (models.base is not None or models.recipe is not None):
        raise typer.BadParameter("give --base-url or --base/--recipe, not both")
    if models.uses_recipe:
        if experts or antis:
            raise typer.BadParameter("--expert/--anti-expert need --base (or use --recipe alone)")
        recipe = models.recipe
        path = default_recipe_path() if recipe in (None, "default") else Path(recipe)
        r = load_recipe(
            path,
            device=models.device,
            dtype=models.dtype,
            backend=models.backend,
            threads=models.threads,
            gpu_layers=models.gpu_layers,
        )
        if alphas:
            if len(alphas) not in (1, len(r.pairs)):
                raise typer.BadParameter(f"give one --alpha or one per pair ({len(r.pairs)})")
            values = alphas * len(r.pairs) if len(alphas) == 1 else alphas
            r.pairs[:] = [(e, a, v) for (e, a, _), v in zip(r.pairs, values, strict=True)]
        if models.cross_tokenizer is not None:
            r = replace(r, cross_tokenizer=models.cross_tokenizer)
        return ProxyTuner.from_recipe(r, **models.engine)
    if experts and antis and len(experts) != len(antis):
        raise typer.BadParameter(
            f"{len(experts)} --expert but {len(antis)} --anti-expert: give them in pairs, "
            "or only one kind for expert-only / anti-expert-only pairs"
        )
    n_pairs = max(len(experts), len(antis))
    if alphas and len(alphas) not in (1, n_pairs):
        raise typer.BadParameter(f"give one --alpha or one per pair ({n_pairs})")
    values = (alphas or [1.0]) * n_pairs if len(alphas) <= 1 else alphas
    load = {
        "device": models.device or "auto",
        "dtype": models.dtype or "auto",
        "backend": models.backend or "auto",
        "threads": models.threads,
        "gpu_layers": models.gpu_layers,
        "trust_remote_code": models.trust_remote_code,
    }
    pairs = []
    for i in range(n_pairs):
        e = ModelSpec(experts[i], prompt=models.expert_prompt, **load) if experts else None
        a = ModelSpec(antis[i], prompt=models.anti_expert_prompt, **load) if antis else None
        pairs.append((e, a, values[i]))
    base = models.base_api
    if base is None:
        base = ModelSpec(models.base, prompt=models.base_prompt, **load)  # type: ignore[arg-type]
    return ProxyTuner.from_specs(
        base,
        pairs,
        cross_tokenizer=models.cross_tokenizer,
        options=EngineOptions().updated(**models.engine),
    )


def api_base(
    url: str | None,
    *,
    model: str | None,
    top_logprobs: int | None,
    tokenizer: str | None,
    api_key_env: str,
    chunk: str,
    samples: int | None,
    prompt: str,
    endpoint: str = "completions",
) -> Any:
    """The ``--base-url`` options as an :class:`~proxytune.backends.api.APISpec` (or None)."""
    if url is None:
        if model is not None:
            raise typer.BadParameter("--base-model needs --base-url")
        return None
    if model is None:
        raise typer.BadParameter("--base-url needs --base-model (the name the endpoint serves)")
    from ..extras import require

    require("httpx", "server", "a base behind an API (--base-url)")
    from ..backends.api import DEFAULT_TOP_LOGPROBS, APISpec

    options: dict[str, Any] = {
        "url": url,
        "model": model,
        "top_logprobs": top_logprobs or DEFAULT_TOP_LOGPROBS,
        "tokenizer": tokenizer,
        "api_key_env": api_key_env,
        "chunk": int(chunk) if chunk.isdigit() else chunk,
        "prompt": prompt,
        "endpoint": endpoint,
    }
    if samples is not None:
        options.update(logprobs="sampled", samples=samples)
    return APISpec(**options)


def cross_mode(cross_tokenizer: bool, min_coverage: float | None) -> Any:
    """``--cross-tokenizer`` / ``--min-coverage`` as the tuner's ``cross_tokenizer`` (``None``:
    not given)."""
    if cross_tokenizer or min_coverage is not None:
        return {} if min_coverage is None else {"min_coverage": min_coverage}
    return None


def rule_spec(tuner: ProxyTuner, name: str | None, args: Sequence[str]) -> dict[str, Any] | None:
    """``--rule`` and ``--rule-arg``: a new rule, settings laid over the tuner's rule, or
    ``None`` when neither is given."""
    from ..rules import merge_specs, parse_rule_args, spec_of

    if name is None and not args:
        return None
    if name is not None:
        return parse_rule_args(list(args), name)
    return merge_specs(spec_of(tuner.rule), parse_rule_args(list(args)))


def prompt_formats(tuner: ProxyTuner) -> dict[str, str]:
    """The prompt format each model got, by role (``{"base": "raw", "expert[0]": "chat"}``):
    ``auto`` as resolved when the models loaded."""
    return {m.role: m.prompt.label for m in tuner.members}


def sampling_settings(**given: Any) -> dict[str, Any]:
    """Decoding settings given on the command line, ``None`` (not given) left out; ``stop``
    as a tuple."""
    if given.get("stop") is not None:
        given["stop"] = tuple(given["stop"]) or None
    return {k: v for k, v in given.items() if v is not None}
