"""Quantized small models: int8 linear layers on the CPU, batch-invariant.

``ModelSpec(quantize="int8")`` (in a recipe: ``quantize: int8`` under a model) replaces every
``nn.Linear`` of the transformer blocks by an :class:`Int8Linear`: int8 weights with one scale
per output row, activations quantized to 8 bits on the fly, int32 accumulation (PyTorch's
fbgemm/onednn dynamic-quantized kernel). The output head stays in float: proxy-tuning subtracts
the expert's and anti-expert's log-probs, and rounding in the head would go straight into that
offset. Embeddings stay in float too.

Why not plain ``torch.ao.quantization.quantize_dynamic``: its kernel picks ONE activation scale
for the whole input tensor, so a row's output depends on the other rows of the batch and on
the other positions of the same forward. Then batched != alone, and speculative decoding's
verifier (k+1 positions in one forward) would score a position differently from the plain
loop (one position), breaking exactness. :class:`Int8Linear` divides each row by its own
largest magnitude and pins the tensor's range to [-1, 1] with one extra row, so the kernel's
scale is the same for every call and each row is quantized on its own scale: integer
accumulation is exact, so a row's output is bit for bit the same whatever else is in the batch
(and the rounding error is smaller than with one scale for all rows). Measured effect on
speed, memory and output: docs/speed.md.

``quantize="bnb8"`` / ``"bnb4"`` load the model through bitsandbytes instead (LLM.int8 8-bit
weights, or 4-bit NF4 with double quantization), on CUDA or, with bitsandbytes >= 0.45, on the
CPU: :func:`bnb_config` builds transformers' ``BitsAndBytesConfig``; the output head stays in
float here too. On a CPU with AVX-512 BF16, bitsandbytes repacks each 4-bit weight for its CPU
kernel at the first forward, which needs whole blocks (:data:`BNB4_CPU_BLOCKS`);
:func:`check_bnb4_cpu_shapes` refuses a model that does not fill them before it loads.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

METHODS = ("int8",)
"""Applied after loading, by :func:`quantize_model`."""
BNB_METHODS = ("bnb8", "bnb4")
"""Applied while loading, by transformers' bitsandbytes integration (:func:`bnb_config`)."""


class Int8Linear(nn.Module):
    """``y = x W^T + b``, ``W`` int8 per output row, ``x`` quantized per row, ``(..., in)`` ->
    ``(..., out)``; a row's result does not depend on the other rows."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors: deprecated in favour of torchao
            warnings.simplefilter("ignore")
            self.inner = DynamicLinear(w.shape[1], w.shape[0], bias_=False, dtype=torch.qint8)
            qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
            self.inner.set_weight_bias(qweight, None)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        pin = torch.zeros(1, w.shape[1])
        pin[0, 0], pin[0, -1] = 1.0, -1.0  # fixes the kernel's activation range at [-1, 1]
        self.register_buffer("pin", pin, persistent=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        scale = flat.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (N, 1), per row
        y = self.inner(torch.cat([flat / scale, self.pin]))[:-1] * scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_model(model: Any, method: str, device: torch.device) -> Any:
    """Swap ``model``'s linear layers (not the output head) for :class:`Int8Linear`, in place."""
    if method not in METHODS:
        raise ConfigError(f"quantize must be one of {METHODS}, got {method!r}")
    if device.type != "cpu":
        raise ConfigError(
            f"quantize={method!r} is CPU-only (int8 CPU kernels), but the model is on {device}; "
            "load it with device='cpu' or leave quantize unset"
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines and (
        "onednn" not in torch.backends.quantized.supported_engines
    ):
        raise ConfigError("this PyTorch build has no int8 CPU kernels (fbgemm or onednn)")
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(module, name, Int8Linear(child))
    # The float weights that stay (embeddings, head, norms) may still be views of the
    # memory-mapped checkpoint, which would keep every page read above resident: copy them.
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def bnb_config(method: str, dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``method`` (``bnb8`` or ``bnb4``); 4-bit
    layers compute in ``dtype``. Raises a :class:`ConfigError` naming the fix when
    bitsandbytes is not installed."""
    if method not in BNB_METHODS:
        raise ConfigError(f"bitsandbytes quantization is one of {BNB_METHODS}, got {method!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"quantize={method!r} needs bitsandbytes: pip install bitsandbytes (or "
            "'proxytune[bnb]'), or use quantize='int8' on the CPU"
        ) from err
    from transformers import BitsAndBytesConfig

    if method == "bnb8":
        _once(logging.getLogger("bitsandbytes.autograd._functions"), "inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


BNB4_CPU_BLOCKS = (32, 64)
"""(output rows, inputs) every 4-bit layer must be a multiple of where bitsandbytes repacks
its weights for the AVX-512 BF16 CPU kernel (``_convert_weight_packed_for_cpu``: 32 rows per
block; one absmax per 64 inputs, the 4-bit quantization block)."""


def repacks_4bit_on_cpu() -> bool:
    """Whether bitsandbytes repacks 4-bit weights on this CPU (its AVX-512 BF16 path)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def check_bnb4_cpu_shapes(skeleton: Any, path: str) -> None:
    """Refuse ``quantize="bnb4"`` on a CPU where bitsandbytes repacks 4-bit weights when a
    linear layer of ``skeleton`` (the model's modules, e.g. on the meta device) does not fill
    whole blocks: bitsandbytes would fail at the first forward, in the middle of generation."""
    rows, inputs = BNB4_CPU_BLOCKS
    head = skeleton.get_output_embeddings()  # stays in float
    bad = [
        f"{name} ({m.out_features} x {m.in_features})"
        for name, m in skeleton.named_modules()
        if isinstance(m, nn.Linear) and m is not head
        and (m.out_features % rows or m.in_features % inputs)
    ]  # fmt: skip
    if bad:
        raise ConfigError(
            f"quantize='bnb4' on this CPU (AVX-512 BF16): bitsandbytes repacks 4-bit weights in "
            f"blocks of {rows} output rows and {inputs} inputs, which {len(bad)} layer(s) of "
            f"{path!r} do not fill, e.g. {bad[0]}; use quantize='bnb8' or 'int8', or a GPU"
        )


class _OnceFilter(logging.Filter):
    """Lets the first record containing ``text`` through, drops the repeats."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        first, self.seen = not self.seen, True
        return first


def _once(logger: logging.Logger, text: str) -> None:
    """Log ``logger``'s messages containing ``text`` once per process, not once per forward
    (bitsandbytes' 8-bit layers warn on every call whose input is not float16)."""
    if not any(isinstance(f, _OnceFilter) and f.text == text for f in logger.filters):
        logger.addFilter(_OnceFilter(text))


def weight_bytes(model: Any) -> int:
    """Bytes of the model's weights as stored: int8 weights at 1 byte, bitsandbytes 4-bit
    weights at their packed size (for reports)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    total = 0
    for module in model.modules():
        if isinstance(module, DynamicLinear):  # int8 weights, 1 byte each (not unpacked)
            total += module.in_features * module.out_features
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
