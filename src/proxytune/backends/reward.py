"""A reward model on ``transformers``: a sequence-classification head that scores
``prompt + response`` (the ``args`` rule's scorer, :mod:`proxytune.rules.reward`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ModelLoadError
from ..prompts import Prompt, as_messages, raw_text
from .hf import pick_device, pick_dtype, resolve_source

__all__ = ["HFRewardModel", "load_reward_model"]


class HFRewardModel:
    """A ``transformers`` sequence-classification model that scores ``prompt + response``."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.num_labels = int(model.config.num_labels)
        if tokenizer.pad_token is None:  # batching needs a pad token, and the head needs its id
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.truncation_side = "left"  # keep the end of the response, where t is
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = limit if isinstance(limit, int) and limit > 0 else None

    def render(self, prompt: Prompt, response: str, format: str) -> str:
        """``text``: the raw prompt followed by the response; ``chat``: the chat template."""
        if format == "text":
            return raw_text(prompt) + response
        messages = [*as_messages(prompt), {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        format: str = "text",
        label: int = 0,
        batch_size: int = 16,
    ) -> torch.Tensor:
        texts = [self.render(p, r, format) for p, r in zip(prompts, responses, strict=True)]
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(self.device)
            enc.pop("token_type_ids", None)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()  # (n, num_labels)
            out.append(logits[:, label])
        return torch.cat(out) if out else torch.zeros(0)


@functools.lru_cache(maxsize=2)
def load_reward_model(path: str, device: str = "auto", dtype: str = "auto") -> HFRewardModel:
    """Load (once per process) a reward model: a directory, hub id or ``embedded:NAME``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source, gguf = resolve_source(path)
    if gguf is not None:
        raise ModelLoadError(f"reward model {path!r}: GGUF files hold no reward head")
    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=pick_dtype(dtype, dev), use_safetensors=True
        )
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(
            f"could not load the reward model {path!r}: {first}. It must be a sequence-"
            "classification checkpoint (a reward head) in safetensors."
        ) from err
    return HFRewardModel(model.to(dev).eval(), tok, path)
