"""Write a ``transformers`` causal LM and its tokenizer to a GGUF file (float32 or float16).

What llama.cpp needs to run a model that proxytune built or trained: the tiny test models, and
a LoRA expert merged into its base (``proxytune train`` output, :func:`export_gguf`).
Llama and Qwen2 architectures; the tokenizer as a byte-level BPE (``gpt2`` in GGUF terms),
which is what both families use. Token ids are kept exactly, so the file's vocabulary is the
tokenizer's and the model's head rows line up.

>>> write_gguf(model, tokenizer, "tiny.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..paths import TRAIN_META
from ..specs import ModelSpec
from .hf import load_hf
from .lora_specs import resolve_adapter_dir

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
"""transformers class -> GGUF architecture this writer supports."""
DTYPES = ("float32", "float16")


def write_gguf(model: Any, tokenizer: Any, path: str | Path, dtype: str = "float32") -> Path:
    """Write ``model`` (weights as they are, in ``dtype``) and ``tokenizer`` to ``path``."""
    import gguf

    kind = type(model).__name__
    arch = ARCHITECTURES.get(kind)
    if arch is None:
        raise ConfigError(
            f"cannot write a {kind} to GGUF: supported architectures are "
            f"{sorted(ARCHITECTURES)}; convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"GGUF dtype must be one of {DTYPES}, got {dtype!r}")
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or path.stem))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16
    )
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, arch)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    for name, tensor in _tensors(model, arch, heads, kv_heads):
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if data.ndim == 1:  # norms and biases stay float32 (as llama.cpp's converter does)
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, data.astype(np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_FILE = "model.gguf"


def export_gguf(model: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """A model directory, or a trained LoRA adapter (``proxytune train`` output) merged into
    its base, written as ``OUT_DIR/model.gguf`` with its tokenizer files and the run's
    ``proxytune_train.json`` (so ``prompt: auto`` finds the format it was tuned on): a model
    the llama.cpp backend runs. Refuses to write into a directory that holds files."""
    import shutil

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{str(out)!r} is not empty; give a new directory for the export")
    spec = resolve_adapter_dir(ModelSpec(str(model), device="cpu", dtype="float32"))
    assert spec is not None
    loaded = load_hf(spec)  # an adapter is merged into the weights as it loads
    out.mkdir(parents=True, exist_ok=True)
    target = write_gguf(loaded.model, loaded.tokenizer, out / GGUF_FILE, dtype)
    loaded.tokenizer.save_pretrained(out)
    for place in (spec.adapter, spec.path):
        meta = Path(place).expanduser() / TRAIN_META if place else None
        if meta is not None and meta.is_file():
            shutil.copyfile(meta, out / TRAIN_META)
            break
    return target


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def permute_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's q/k rows from the Hugging Face rotary layout (halves) to GGUF's (pairs)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
"""A decoder layer's tensors: Hugging Face name (after ``model.layers.N.``) -> GGUF name."""
MODEL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Llama/Qwen2 weight (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``), or ``None`` for a name this writer does not know."""
    if hf_name in MODEL_TENSORS:
        return MODEL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner = LAYER_TENSORS.get(parts[3])
        return None if inner is None else f"blk.{parts[2]}.{inner}"
    return None


def permuted_rows(gguf_name: str, arch: str, heads: int, kv_heads: int) -> int | None:
    """How many heads a weight's rows are permuted over for GGUF (Llama's q and k), or
    ``None``."""
    if arch != "llama":
        return None
    if gguf_name.endswith("attn_q.weight"):
        return heads
    return kv_heads if gguf_name.endswith("attn_k.weight") else None


def _tensors(model: Any, arch: str, heads: int, kv_heads: int) -> list[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor)`` for every weight of a Llama/Qwen2 model."""
    out = []
    for hf_name, tensor in model.state_dict().items():
        name = gguf_tensor_name(hf_name)
        if name is None or (name == "output.weight" and model.config.tie_word_embeddings):
            continue
        over = permuted_rows(name, arch, heads, kv_heads)
        out.append((name, tensor if over is None else permute_heads(tensor, over)))
    return out


def _add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, arch: str) -> None:
    """The tokenizer as GGUF's byte-level BPE, padded to the model's ``n_vocab`` rows."""
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(
            f"cannot write a {data['model']['type']} tokenizer to GGUF: this writer handles "
            "byte-level BPE tokenizers (Llama 3, Qwen2, the test tokenizers)"
        )
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    special = set(tokenizer.all_special_ids)
    added = {a["id"] for a in data.get("added_tokens", [])}
    for token, index in vocab.items():
        if index < n_vocab:
            tokens[index] = token
            if index in special:
                types[index] = gguf.TokenType.CONTROL
            elif index in added:
                types[index] = gguf.TokenType.USER_DEFINED
            else:
                types[index] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
