"""A PEFT LoRA adapter (``proxytune train`` output) as a llama.cpp LoRA GGUF.

llama.cpp applies such a file to a context of its base model (``llama_adapter_lora_init``):
the base's weights stay as they are (quantized or not) and the expert is the base plus
``scale * B A x`` on each adapted layer, as in peft. Each ``lora_A`` / ``lora_B`` matrix is
written unchanged under the base tensor's GGUF name (``blk.3.attn_q.weight.lora_a``), with
Llama's q/k rows permuted as for the weights; the scale travels as ``adapter.lora.alpha``
(llama.cpp multiplies by ``alpha / r``). Conversions are cached under the proxytune cache,
keyed by the adapter's bytes, so the adapter directory is never written to.

>>> lora_gguf("runs/expert", arch="qwen2", heads=14, kv_heads=2)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ..embedded import default_cache_dir
from ..errors import ConfigError
from .gguf_write import ARCHITECTURES, gguf_tensor_name, permute_heads, permuted_rows

FORMAT = 1
"""Bumped when the written file changes, so that cached conversions are redone."""
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def lora_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, checked to be a LoRA llama.cpp can apply;
    a :class:`ConfigError` names what it cannot (and the way round: transformers)."""
    root = Path(adapter_dir).expanduser()
    try:
        config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(root)!r} is not a readable LoRA adapter ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{str(root / CONFIG)!r} is not a JSON object")
    unsupported = [
        (str(config.get("peft_type", "")).upper() != "LORA", "it is not a LoRA adapter"),
        (bool(config.get("use_dora")), "DoRA"),
        (bool(config.get("modules_to_save")), "modules_to_save"),
        (config.get("bias", "none") != "none" or bool(config.get("lora_bias")), "LoRA biases"),
        (bool(config.get("rank_pattern")) or bool(config.get("alpha_pattern")), "per-layer ranks"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(
                f"llama.cpp cannot apply the adapter {str(root)!r} ({what}); load it with "
                "backend: transformers"
            )
    if not (root / WEIGHTS).is_file():
        raise ConfigError(f"{str(root)!r} has no {WEIGHTS}; save the adapter as safetensors")
    return config


def lora_gguf(
    adapter_dir: str | Path, arch: str, heads: int, kv_heads: int, cache: Path | None = None
) -> Path:
    """The adapter as a LoRA GGUF for a base of ``arch`` (``qwen2``, ``llama``) with
    ``heads`` / ``kv_heads`` attention heads: written once, then taken from the cache."""
    root = Path(adapter_dir).expanduser()
    config = lora_config(root)
    if arch not in ARCHITECTURES.values():
        raise ConfigError(
            f"llama.cpp LoRA adapters are written for {sorted(ARCHITECTURES.values())} "
            f"bases, not {arch!r}; load the adapter with backend: transformers"
        )
    digest = hashlib.sha256(f"{FORMAT} {arch} {heads} {kv_heads}".encode())
    for name in (CONFIG, WEIGHTS):
        digest.update((root / name).read_bytes())
    folder = (cache or default_cache_dir()) / "lora-gguf"
    target = folder / f"{digest.hexdigest()[:32]}.gguf"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    try:
        write_lora_gguf(root, config, partial, arch, heads, kv_heads)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def write_lora_gguf(
    root: Path, config: dict[str, Any], path: Path, arch: str, heads: int, kv_heads: int
) -> None:
    """Write the adapter in ``root`` (its checked ``config``) to ``path``."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    rank = int(config["r"])
    # llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r)
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, tensor in sorted(load_file(str(root / WEIGHTS)).items()):
        name, part = _lora_name(key, root)
        data = tensor.float()
        over = permuted_rows(name, arch, heads, kv_heads)
        if over is not None and part == "lora_b":  # B's rows are the weight's output rows
            data = permute_heads(data, over)
        writer.add_tensor(f"{name}.{part}", data.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _lora_name(key: str, root: Path) -> tuple[str, str]:
    """``base_model.model.model.layers.0.mlp.up_proj.lora_A.weight`` ->
    ``("blk.0.ffn_up.weight", "lora_a")``."""
    stem = key.removeprefix("base_model.model.")
    for marker, part in ((".lora_A.", "lora_a"), (".lora_B.", "lora_b")):
        if marker in stem:
            module, _, _ = stem.partition(marker)
            name = gguf_tensor_name(f"{module}.weight")
            if name is not None and name not in ("token_embd.weight", "output.weight"):
                return name, part
    raise ConfigError(
        f"llama.cpp cannot apply the adapter {str(root)!r}: it adapts {key!r}, which is not "
        "a linear layer of a decoder block; load it with backend: transformers"
    )
