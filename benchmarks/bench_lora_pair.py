"""One-pass LoRA pair vs two models: memory and tokens/s, side by side.

    python benchmarks/bench_lora_pair.py                       # embedded Qwen 0.5B if set up
    python benchmarks/bench_lora_pair.py --small tiny          # a tiny random model (seconds)
    python benchmarks/bench_lora_pair.py --adapter OUT --base BIG --batch 4 --new-tokens 32

The expert is the small model plus a LoRA adapter (``--adapter``, or a random one of the
``proxytune train --lora`` shape: r=16 on every linear layer), the anti-expert the small model.
Each path runs in its own process, so memory numbers do not mix:

- two-model: the expert loaded as a second model, the adapter merged into its weights;
- one-pass: the small model once, the adapter unmerged, both roles in one batched forward.

"pair" times the expert and anti-expert alone, stepped as the decode loop steps them (greedy
on the expert, teacher-forcing both); "proxy" times full proxy-tuned generation with ``--base``.
Weights are the bytes of distinct parameter tensors; peak RSS is the process's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED_SMALL = Path("~/.cache/proxytune/models/qwen2.5-coder-0.5b-instruct").expanduser()
PROMPTS = [
    "Write a Python function that reverses a string.",
    "Explain what a hash map is in one paragraph.",
    "def fibonacci(n):",
    "List three uses of the Rust borrow checker.",
]


def default_small() -> str:
    ready = (EMBEDDED_SMALL / ".proxytune-ready").is_file()
    return str(EMBEDDED_SMALL) if ready else "tiny"


def make_tiny(root: Path, seed: int, name: str = "tiny") -> str:
    from proxytune.testing import save_tiny_model

    return str(save_tiny_model(root / name, seed=seed, hidden=64, layers=4))


def make_adapter(small: str, root: Path) -> str:
    """A LoRA adapter of the shape ``proxytune train --lora`` makes, with small random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)  # non-zero, so the expert differs from the anti-expert
    out = root / "adapter"
    peft_model.save_pretrained(out)
    return str(out)


def weight_bytes(models: list) -> int:
    seen: dict[int, int] = {}
    for lm in models:
        for p in lm.model.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> dict:
    """Load one path, time it, report (runs in its own process)."""
    import torch

    from proxytune import ModelSpec, ProxyTuner
    from proxytune.backends.hf import load_hf
    from proxytune.backends.lora_pair import LoraView, pair_models

    opts = {"device": args.device, "dtype": args.dtype}
    small = ModelSpec(args.small, prompt="raw", **opts)
    expert = ModelSpec(args.small, adapter=args.adapter, prompt="raw", **opts)
    one_pass = args.worker == "one-pass"
    t0 = time.perf_counter()
    tuner = None
    if args.base:
        base = ModelSpec(args.base, prompt="raw", **opts)
        tuner = ProxyTuner.from_specs(base, [(expert, small, 1.0)], options={"one_pass": one_pass})
        e, a = tuner.pairs[0].expert.model, tuner.pairs[0].anti_expert.model
    elif one_pass:
        loaded: dict = {}
        assert pair_models(expert, small, loaded)
        e, a = loaded[expert.load_key], loaded[small.load_key]
    else:
        e, a = load_hf(expert), load_hf(small)
    load_s = time.perf_counter() - t0
    assert isinstance(e, LoraView) == one_pass
    pair = [e.host.lm] if one_pass else [e, a]
    tok = e.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[: args.batch]]
    prompts = (prompts * args.batch)[: args.batch]
    device = e.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_pair(n: int) -> list[list[int]]:
        se, le = e.start(prompts)
        sa, _ = a.start(prompts)
        out = []
        for _ in range(n):
            nxt = le.argmax(-1, keepdim=True)  # greedy on the expert, fed to both roles
            out.append(nxt.view(-1).tolist())
            le = se.advance(nxt)[:, -1]
            sa.advance(nxt)
        return out

    run_pair(2)  # warm-up
    pair_s = float("inf")
    for _ in range(args.repeats):  # best of: the machine may be shared
        sync()
        t0 = time.perf_counter()
        tokens = run_pair(args.new_tokens)
        sync()
        pair_s = min(pair_s, time.perf_counter() - t0)
    result = {
        "path": args.worker,
        "load_s": load_s,
        "pair_weights": weight_bytes(pair),
        "pair_tok_s": args.batch * args.new_tokens / pair_s,
        "pair_tokens": tokens,
    }
    if tuner is not None:
        kw = {"max_new_tokens": args.new_tokens, "ignore_eos": True}
        tuner.generate(PROMPTS[: args.batch], max_new_tokens=2)
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            res = tuner.generate((PROMPTS * args.batch)[: args.batch], **kw)
            sync()
            best = min(best, time.perf_counter() - t0)
        result["proxy_tok_s"] = sum(len(r.token_ids) for r in res) / best
        result["proxy_tokens"] = [r.token_ids for r in res]
        result["all_weights"] = weight_bytes(
            [m.model.host.lm if isinstance(m.model, LoraView) else m.model for m in tuner.members]
        )
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    result["peak_rss"] = peak_rss_bytes()
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", default=None, help="anti-expert model dir ('tiny': a tiny one)")
    ap.add_argument("--adapter", default=None, help="LoRA adapter dir (default: random)")
    ap.add_argument("--base", default=None, help="base model dir: also time proxy generation")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", action="store_true", help="print the raw results")
    ap.add_argument("--worker", choices=["one-pass", "two-model"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.small = args.small or default_small()
        if args.small == "tiny":
            args.small = make_tiny(root, seed=2)
        if args.base == "tiny":
            args.base = make_tiny(root, seed=0, name="tiny-base")
        args.adapter = args.adapter or make_adapter(args.small, root)
        results = {}
        for path in ("two-model", "one-pass"):
            cmd = [sys.executable, __file__, "--worker", path, "--small", args.small]
            cmd += ["--adapter", args.adapter, "--batch", str(args.batch)]
            cmd += ["--new-tokens", str(args.new_tokens), "--device", args.device]
            cmd += ["--repeats", str(args.repeats)]
            cmd += ["--dtype", args.dtype] + (["--base", args.base] if args.base else [])
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    two, one = results["two-model"], results["one-pass"]
    same = two["pair_tokens"] == one["pair_tokens"] and two.get("proxy_tokens") == one.get(
        "proxy_tokens"
    )
    if args.json:
        print(json.dumps(results, indent=2))
    print(f"small model: {args.small}")
    print(
        f"batch {args.batch}, {args.new_tokens} new tokens, device {args.device}, "
        f"best of {args.repeats}"
    )
    rows = [("pair weights", "pair_weights", gib), ("pair tokens/s", "pair_tok_s", "{:.2f}".format)]
    if args.base:
        rows += [("all weights (with base)", "all_weights", gib)]
        rows += [("proxy tokens/s (with base)", "proxy_tok_s", "{:.2f}".format)]
    rows += [("peak RSS", "peak_rss", gib), ("load time (s)", "load_s", "{:.1f}".format)]
    if "cuda_peak" in one:
        rows += [("CUDA peak", "cuda_peak", gib)]
    print(f"| {'':28} | {'two models':>12} | {'one pass':>12} | {'ratio':>6} |")
    print(f"|{'-' * 30}|{'-' * 14}|{'-' * 14}|{'-' * 8}|")
    for label, key, fmt in rows:
        ratio = one[key] / two[key] if two[key] else float("nan")
        print(f"| {label:28} | {fmt(two[key]):>12} | {fmt(one[key]):>12} | {ratio:6.2f} |")
    print(f"identical tokens on both paths: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
