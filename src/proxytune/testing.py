"""Tiny models and tokenizers for tests, examples and offline smoke runs.

Everything here is built on the fly (a BPE tokenizer trained in well under a second, a
random-weight Llama of a few thousand parameters), so it needs no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .vocab import byte_level_encoder

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Proxy tuning steers a large model with a small tuned expert and its untuned twin.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is two plus three? Answer: five.",
    "Rain falls on the quiet town; the river runs to the sea.",
    "Lists, loops and functions: the basics of programming in Python.",
    "Once upon a time there was a small robot who loved to read books.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000",
] * 4


def build_tokenizer(vocab_size: int = 300, corpus: list[str] | None = None) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with chat tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    return _wrapped(tok)


def _wrapped(tok: Any) -> Any:
    """A ``tokenizers`` tokenizer as the test models' fast tokenizer (specials, chat
    template)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_char_tokenizer(for_gguf: bool = False) -> Any:
    """Byte-level BPE with no merges over ASCII: every text is one token per character, so a
    text re-tokenizes to exactly the ids it came from (an endpoint's text path is exact).

    ``for_gguf``: llama.cpp refuses a BPE vocabulary without merges, so one merge is added
    that never applies (``a`` + ``0``: the byte-level pre-tokenizer always splits a letter
    from a digit); its token ``a0`` is never produced by tokenizing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    enc = byte_level_encoder()
    chars = [enc[b] for b in (9, 10, *range(32, 127))]
    merges = [("a", "0")] if for_gguf else []
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _wrapped(tok)


def build_model(
    tokenizer: Any,
    seed: int = 0,
    head_padding: int = 0,
    hidden: int = 32,
    layers: int = 2,
    context: int = 256,
    init_std: float = 0.5,
) -> Any:
    """A random-weight ``LlamaForCausalLM`` over ``tokenizer`` (head ``head_padding`` rows wider).

    A large ``init_std`` makes the random distributions peaked, so greedy decoding is far
    from ties and its output is a stable fingerprint of the weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + head_padding,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(path: str | Path, seed: int = 0, head_padding: int = 0, **kw: Any) -> Path:
    """Build and save a tiny model and its tokenizer (safetensors) into ``path``."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, head_padding=head_padding, **kw)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cpu_tuner(
    base: str | Path,
    expert: str | Path | None,
    anti_expert: str | Path | None,
    expert_prompt: str = "raw",
) -> Any:
    """A ``ProxyTuner`` of saved tiny models on the CPU in float32: alpha 1, base and
    anti-expert on the raw prompt format, the expert on ``expert_prompt``."""
    # lazy: torch, only when a test builds a tuner
    from .tuner import ProxyTuner

    return ProxyTuner.from_pretrained(
        str(base),
        expert=None if expert is None else str(expert),
        anti_expert=None if anti_expert is None else str(anti_expert),
        alpha=1.0,
        base_prompt="raw",
        expert_prompt=expert_prompt,
        anti_expert_prompt="raw",
        device="cpu",
        dtype="float32",
    )


def save_tiny_lora(model_dir: str | Path, path: str | Path, seed: int = 0) -> Path:
    """Save a random LoRA adapter (every linear layer, rank 4, non-zero ``B``: it changes the
    model) for the model in ``model_dir`` into ``path``; the global RNG is left untouched."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # lazy: torch, as with transformers above
    from .backends.lora_specs import peft_quietly

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        with peft_quietly():
            get_peft_model(model, lora).save_pretrained(path)
    return Path(path)
