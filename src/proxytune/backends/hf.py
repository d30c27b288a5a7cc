"""Hugging Face ``transformers`` backend: any causal LM that ``from_pretrained`` loads."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..embedded import ensure_embedded
from ..errors import ConfigError, ModelLoadError
from ..paths import need_dir
from ..specs import ModelSpec
from .base import end_ids
from .lora_specs import peft_quietly
from .quantize import (
    BNB_METHODS,
    METHODS,
    bnb_config,
    check_bnb4_cpu_shapes,
    quantize_model,
    repacks_4bit_on_cpu,
    weight_bytes,
)


def pick_device(device: str) -> torch.device:
    """Resolve ``auto`` to cuda, then mps, then cpu; check that an explicit device exists."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for, but MPS is not available here; use cpu")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Resolve ``auto`` to bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_source(path: str) -> tuple[str, str | None]:
    """Split a user path into ``(directory or hub id, gguf file name or None)``.

    ``embedded:NAME`` resolves to the converted embedded model (fetched on first use).
    """
    if path.startswith("embedded:"):
        return str(ensure_embedded(path.removeprefix("embedded:"))), None
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix == ".gguf":
            return str(local.parent), local.name
        raise ModelLoadError(
            f"{path!r} is a file but not a .gguf file; pass the model's directory instead"
        )
    if local.is_dir():
        return str(local), None
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        raise ModelLoadError(
            f"model path {path!r} does not exist. Pass an existing local directory, a .gguf "
            "file, a Hugging Face hub id (org/name), or 'embedded:NAME' for a bundled model."
        )
    return path, None


def load_hf(spec: ModelSpec) -> HFModel:
    """Load tokenizer and weights for ``spec`` (safetensors unless ``allow_pickle``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_source(spec.path)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    bnb = spec.quantize in BNB_METHODS
    if bnb and gguf_file is not None:
        raise ConfigError(
            f"quantize={spec.quantize!r} quantizes safetensors weights while loading; "
            f"{spec.path!r} is a GGUF file: convert it first (the embedded models are)"
        )
    common: dict[str, Any] = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
    }
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as err:
        raise ModelLoadError(_load_hint(spec.path, "tokenizer", err)) from err
    weights: dict[str, Any] = {}
    if gguf_file is None and not spec.allow_pickle:
        weights["use_safetensors"] = True
    if bnb:
        weights["quantization_config"] = bnb_config(spec.quantize, dtype)
        if spec.quantize == "bnb4" and device.type == "cpu" and repacks_4bit_on_cpu():
            check_bnb4_cpu_shapes(_skeleton(source, common), spec.path)
        weights["device_map"] = {"": str(device)}  # bitsandbytes places the weights itself
    spread = spec.max_memory is not None
    if spread:
        if bnb or spec.adapter is not None or spec.quantize is not None:
            raise ConfigError(
                "max_memory (layers spread over devices) does not combine with quantize or an "
                "adapter here; merge the adapter first (or drop max_memory)"
            )
        weights.update(_spread(spec.max_memory))  # type: ignore[arg-type]
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common, **weights)
    except Exception as err:
        raise ModelLoadError(_load_hint(spec.path, "model", err)) from err
    if spec.adapter is not None:
        model = _apply_adapter(model, spec.adapter, merge=not bnb)
    if not (bnb or spread):
        model.to(device)
    model.eval()
    if spec.quantize in METHODS:
        model = quantize_model(model, spec.quantize, device)
    return HFModel(
        model, tokenizer, name=spec.path if not spec.adapter else f"{spec.path}+{spec.adapter}"
    )


def _skeleton(source: str, common: dict[str, Any]) -> Any:
    """The model's modules on the meta device: its shapes, no weights read or memory used."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, **common)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=common["trust_remote_code"]
            )
    except Exception as err:
        raise ModelLoadError(_load_hint(source, "model", err)) from err


def _spread(max_memory: dict[str, str]) -> dict[str, Any]:
    """``from_pretrained`` arguments that place layers with accelerate's ``device_map="auto"``
    under ``max_memory`` (GPU indices as ints, ``cpu``, and ``disk``: a temporary offload
    folder for what fits nowhere)."""
    import tempfile

    limits: dict[Any, str] = {}
    for key, size in max_memory.items():
        limits[int(key) if key.isdigit() else key] = size
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key in limits:
        if isinstance(key, int) and key >= gpus:
            raise ConfigError(f"max_memory names GPU {key}, which this machine does not have")
    out: dict[str, Any] = {"device_map": "auto", "max_memory": limits}
    if "disk" in limits:
        out["offload_folder"] = tempfile.mkdtemp(prefix="proxytune-offload-")
    return out


def input_device(model: Any) -> torch.device:
    """Where a model takes its inputs: its parameters' device, or for a model spread by
    accelerate (``hf_device_map``), the first device that holds layers (not the disk)."""
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        for where in mapping.values():
            if where not in ("disk", "meta"):
                return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
        return torch.device("cpu")
    return next(model.parameters()).device


def _apply_adapter(model: Any, adapter: str, merge: bool = True) -> Any:
    """``model`` with the LoRA ``adapter``: merged into float weights, or kept as side layers
    over quantized ones (``merge=False``; merging would round the update into 4/8 bits)."""
    need_dir(adapter, "adapter directory", ModelLoadError)
    from peft import PeftModel

    try:
        with peft_quietly():
            peft_model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()))
        return peft_model.merge_and_unload() if merge else peft_model
    except Exception as err:
        raise ModelLoadError(
            f"could not apply adapter {adapter!r}: {err}. Check that it was trained on this "
            "base model."
        ) from err


def _load_hint(path: str, what: str, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "safetensors" in text.lower() or "use_safetensors" in text:
        return (
            f"could not load the {what} of {path!r}: no safetensors weights found ({text}). "
            "Pickle (.bin) weights can run code when loaded: convert them to safetensors, or, "
            "if you trust the source, allow pickle: --allow-pickle (proxytune serve's admin "
            "API, proxytune train), allow_pickle: true (a recipe's model) or allow_pickle=True "
            "(Python)."
        )
    return (
        f"could not load the {what} of {path!r}: {text}. Pass an existing local directory, a "
        ".gguf file or a reachable hub id (machines without internet can only use local "
        "models; `proxytune setup` installs the embedded default)."
    )


def cache_argument(model: Any) -> str:
    """The keyword under which ``model``'s forward takes its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes
    in 5.40): ``cache`` where the forward declares it and not the old name, else
    ``past_key_values`` (older transformers, remote code, a forward that takes ``**kwargs``
    only). A peft wrapper's forward hides the names: its base model's forward decides.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


class HFModel:
    """A loaded ``transformers`` causal LM and its tokenizer (:class:`LogitsModel`)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = input_device(model)
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        self._cache_arg = cache_argument(model)
        head = model.get_output_embeddings()
        self._width = (
            int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        )
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (self.eos_token_ids or (0,))[0]

    @property
    def vocab_width(self) -> int:
        return self._width

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (:class:`~.base.KnowsWeightBytes`)."""
        return weight_bytes(self.model)

    @property
    def context_length(self) -> int | None:
        cfg = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        gen = getattr(self.model, "generation_config", None)
        return end_ids(getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id)

    def forward(self, *, keep: int, cache: Any = None, **kwargs: Any) -> torch.Tensor:
        """Run the model and return float32 logits of the last ``keep`` positions; ``cache``
        (a ``DynamicCache``) goes in under the name the model takes (:func:`cache_argument`)."""
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._keeps_logits:
            kwargs["logits_to_keep"] = keep
        with torch.inference_mode():
            logits = self.model(**kwargs).logits
        return logits[:, -keep:].float()

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[HFDecodeState, torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token for the model to start from")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding, as generate() does
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        state = HFDecodeState(
            self, ids.to(self.device), mask.to(self.device), positions.to(self.device), use_cache
        )
        return state, state.prefill()


class HFDecodeState:
    """Left-padded ids, attention mask, positions and a ``DynamicCache`` for one batch."""

    def __init__(
        self,
        lm: HFModel,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        use_cache: bool,
    ) -> None:
        from transformers import DynamicCache

        self.lm = lm
        self.ids, self.mask, self.positions = ids, mask, positions
        self.cache = DynamicCache(config=lm.model.config) if use_cache else None

    def prefill(self) -> torch.Tensor:
        logits = self.lm.forward(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=self.cache is not None,
            keep=1,
        )
        return logits[:, -1]

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.lm.device).view(self.ids.shape[0], -1)
        k = tokens.shape[1]
        steps = torch.arange(1, k + 1, device=self.lm.device)
        new_positions = self.positions[:, -1:] + steps
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.positions = torch.cat([self.positions, new_positions], dim=1)
        if self.cache is None:  # full recomputation
            return self.lm.forward(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=self.positions,
                use_cache=False,
                keep=k,
            )
        return self.lm.forward(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=new_positions,
            cache=self.cache,
            use_cache=True,
            keep=k,
        )

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.lm.device)
        self.ids, self.mask, self.positions = self.ids[rows], self.mask[rows], self.positions[rows]
        if self.cache is not None:
            self.cache.batch_select_indices(rows)

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last ``drop[r]`` ids of each row (speculative decoding's rejected drafts).

        Columns that every row drops are cut (``DynamicCache.crop``, which in transformers 5
        takes minus the number of positions to remove). A row that drops ``e`` more is rotated
        ``e`` columns right, so that its kept ids stay flush with the last column (where
        :meth:`advance` continues) and the dropped ones become masked left padding;
        :meth:`compact` then cuts columns that are padding in every row.
        """
        drop = torch.as_tensor(drop, dtype=torch.long).view(-1).cpu()
        if drop.numel() != self.ids.shape[0] or bool((drop < 0).any()):
            raise ValueError(f"rollback needs one count >= 0 per row, got {drop.tolist()}")
        if self.cache is not None and not self.can_extend:
            raise NotImplementedError(
                f"the cache of {self.lm.name!r} has layers that cannot be rolled back"
            )
        common = int(drop.min()) if drop.numel() else 0
        if common > 0:
            self.ids, self.mask = self.ids[:, :-common], self.mask[:, :-common]
            self.positions = self.positions[:, :-common]
            if self.cache is not None:
                self.cache.crop(-common)
        extra = (drop - common).to(self.lm.device)
        if not bool(extra.any()):
            return
        width = self.ids.shape[1]
        cols = torch.arange(width, device=self.lm.device)
        src = (cols - extra[:, None]) % width  # (B, W): new column j reads old column j - e
        pad = cols < extra[:, None]  # (B, W): the rotated-in dropped ids
        self.ids = self.ids.gather(1, src).masked_fill(pad, self.lm.pad_id)
        self.mask = self.mask.gather(1, src).masked_fill(pad, 0)
        self.positions = self.positions.gather(1, src).masked_fill(pad, 0)
        if self.cache is not None:
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                    continue
                index = src[:, None, :, None].expand_as(layer.keys)  # keys: (B, H, W, D)
                layer.keys = layer.keys.gather(2, index)
                layer.values = layer.values.gather(2, index)
        self.compact()

    # continuous batching (the server's scheduler) ------------------------------------------

    @property
    def can_extend(self) -> bool:
        """Whether :meth:`extend` can merge another batch into this one: every cache layer is
        a plain growing ``DynamicLayer`` (sliding-window or linear-attention layers are not)."""
        if self.cache is None:
            return True
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def extend(self, other: HFDecodeState) -> None:
        """Append the rows of ``other`` (the same model, prefilled on its own) to this batch.

        Both batches are left-padded to the longer one (padding is masked out and has no
        position), then stacked: ``(B1, T1) + (B2, T2) -> (B1 + B2, max(T1, T2))``.
        """
        if other.lm is not self.lm or (other.cache is None) != (self.cache is None):
            raise ValueError("extend() needs a state of the same model with the same cache use")
        if not (self.can_extend and other.can_extend):
            raise NotImplementedError(
                f"the cache of {self.lm.name!r} has layers that cannot be merged"
            )
        width = max(self.ids.shape[1], other.ids.shape[1])

        def stack(a: torch.Tensor, b: torch.Tensor, fill: int, dim: int) -> torch.Tensor:
            def pad(t: torch.Tensor) -> torch.Tensor:
                missing = width - t.shape[dim]
                if missing == 0:
                    return t
                shape = list(t.shape)
                shape[dim] = missing
                return torch.cat([t.new_full(shape, fill), t], dim=dim)

            return torch.cat([pad(a), pad(b)], dim=0)

        self.ids = stack(self.ids, other.ids, self.lm.pad_id, 1)
        self.mask = stack(self.mask, other.mask, 0, 1)
        self.positions = stack(self.positions, other.positions, 0, 1)
        if self.cache is not None:
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
                mine.keys = stack(mine.keys, theirs.keys, 0, -2)
                mine.values = stack(mine.values, theirs.values, 0, -2)

    def compact(self) -> None:
        """Drop leading columns that are padding in every row (left behind by rows that left)."""
        live = self.mask.any(dim=0)
        first = int(live.to(torch.int8).argmax()) if bool(live.any()) else 0
        if first == 0:
            return
        self.ids, self.mask = self.ids[:, first:], self.mask[:, first:]
        self.positions = self.positions[:, first:]
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
