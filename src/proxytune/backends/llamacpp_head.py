"""Candidate scoring on llama.cpp: stop a decode at the final norm, then apply the output
matrix at chosen ids only, with the logits llama.cpp would have computed there.

A rule that only re-ranks the base's top k (``rerank``) needs a pair model's logits at those
k ids, not at all ~150k: the output matrix is then most of what is skipped (on the embedded
0.5B, 151936 x 896 of its ~0.49 G multiply-adds per token, and 145 MB of Q8_0 read per
decode). :class:`NormTap` is llama.cpp's eval callback (``cb_eval``, called for each graph
node with ``ask`` set to ask whether the node is wanted, then once it is computed): it copies
the final norm's output (the node ``result_norm``, ``(outputs, H)``) and, returning false,
ends the graph there. :class:`OutputHead` reads the rows of the ids asked for from the GGUF
file (a memory map) and multiplies.

llama.cpp's CPU matrix product does not multiply the float activation by the dequantized
weights: it first rounds the activation to the weight's *dot type* (Q8_0 for Q4_0 / Q5_0 /
Q8_0 weights, Q8_K for the K-quants, float16 for float16 weights) and multiplies those. Doing
the same here gives llama.cpp's logits at the ids asked for to about 1e-6 (measured on the
embedded 0.5B's Q8_0 head), where the float product differs by up to 0.04. Only the rows of
the ids asked for are read from the file (a memory map) and dequantized.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PLAIN_HEADS = frozenset({"llama", "qwen2", "qwen3"})
"""Architectures whose logits are the final norm's output times the output matrix, nothing
after it (no soft-capping, no logit scale)."""
QK8_0 = 32
QK_K = 256


def q8_0_values(x: np.ndarray) -> np.ndarray:
    """``(N, d)`` float32 rows as ggml's x86 ``quantize_row_q8_0`` rounds them (blocks of 32:
    scale ``max|x| / 127`` kept in float16, ``round(x * 127 / max|x|)`` half to even), as the
    values the products then see, float64."""
    blocks = x.astype(np.float32).reshape(-1, QK8_0)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.round(blocks * inv)
    d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float64)
    return (q * d).reshape(x.shape)


def q8_k_values(x: np.ndarray) -> np.ndarray:
    """``(N, d)`` float32 rows as ggml's ``quantize_row_q8_K`` rounds them (blocks of 256:
    ``iscale = -127 / v`` with ``v`` the block's first largest-magnitude value, ints capped at
    127, scale ``1 / iscale`` in float32), float64."""
    blocks = x.astype(np.float32).reshape(-1, QK_K)
    first = np.abs(blocks).argmax(axis=1)
    peak = blocks[np.arange(len(blocks)), first][:, None]  # signed
    with np.errstate(divide="ignore"):
        iscale = np.where(peak != 0, np.float32(-127.0) / peak, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.round(blocks * iscale), 127.0)
    with np.errstate(divide="ignore"):
        d = np.where(iscale != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    return (q * d.astype(np.float64)).reshape(x.shape)


def f16_values(x: np.ndarray) -> np.ndarray:
    """``(N, d)`` rows rounded to float16 (the dot type of float16 weights), float64."""
    return x.astype(np.float16).astype(np.float64)


def f32_values(x: np.ndarray) -> np.ndarray:
    """``(N, d)`` rows as they are (float32 weights take float32 activations), float64."""
    return x.astype(np.float64)


DOT_TYPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": f32_values,
    "F16": f16_values,
    "Q4_0": q8_0_values,
    "Q5_0": q8_0_values,
    "Q8_0": q8_0_values,
    **{f"Q{b}_K": q8_k_values for b in (2, 3, 4, 5, 6)},
}
"""Output-matrix type -> how llama.cpp's CPU product rounds the activation for it. Other types
(Q4_1, Q5_1, the IQ types, BF16) are not scored here: their models keep full logits."""


RESULT_NORM = b"result_norm"
"""The name llama.cpp's graphs give the final norm's output (the output matrix's input)."""
LIBRARY = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def ggml_library(lc: Any) -> Any | None:
    """``libggml-base`` beside ``llama_cpp``'s own library, with the few functions used here
    declared; ``None`` where this build has no such file (then nothing is scored here)."""
    path = Path(lc.__file__).parent / "lib" / LIBRARY.get(sys.platform, "libggml-base.so")
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    declare = {
        "ggml_get_name": (ctypes.c_char_p, [ctypes.c_void_p]),
        "ggml_nelements": (ctypes.c_int64, [ctypes.c_void_p]),
        "ggml_backend_tensor_get": (
            None,
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        ),
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _GgufInitParams]),
        "gguf_find_key": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
        "gguf_find_tensor": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
        "gguf_get_tensor_offset": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_size": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_data_offset": (ctypes.c_size_t, [ctypes.c_void_p]),
        "gguf_free": (None, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in declare.items():
        function = getattr(lib, name, None)
        if function is None:
            return None
        function.restype, function.argtypes = restype, argtypes
    return lib


class NormTap:
    """The eval callback of one llama.cpp context. While :attr:`active`, each decode's
    final-norm output is copied into :attr:`rows` and the graph ends there (llama.cpp's logits
    buffer is then left as it was: read :attr:`rows` instead). Otherwise every node is refused
    at once and the graph runs whole, as without a callback (one Python call per node)."""

    def __init__(self, lc: Any, lib: Any, width: int) -> None:
        self.lib, self.width = lib, width
        self.active = False
        self.rows: list[np.ndarray] = []
        self.callback = lc.ggml_backend_sched_eval_callback(self._eval)
        """Kept alive as long as the context that calls it."""

    def _eval(self, tensor: int, ask: bool, _data: Any) -> bool:
        if not self.active:
            return False  # asked: not wanted, so the graph is computed in one piece
        if ask:
            return self.lib.ggml_get_name(tensor) == RESULT_NORM
        n = int(self.lib.ggml_nelements(tensor))
        out = np.empty((n // self.width, self.width), dtype=np.float32)
        self.lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        self.rows.append(out)
        return False  # ends the graph: the output matrix is never applied

    def take(self) -> np.ndarray:
        """The rows copied since the last call, ``(outputs, H)``."""
        rows, self.rows = self.rows, []
        if not rows:
            return np.zeros((0, self.width), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)


class OutputHead:
    """The output matrix of a GGUF file (``output.weight``, or ``token_embd.weight`` where the
    head is tied, as llama.cpp falls back), read by row from a memory map of the file. Not
    :attr:`supported` for a file with an output bias, or one shard of a split GGUF."""

    def __init__(self, lib: Any, path: str | Path, rows: int, width: int) -> None:
        from gguf import GGMLQuantizationType

        self.lib, self.width = lib, width
        self.type = ""
        self._kind: Any = None
        self._data: np.ndarray | None = None
        ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
        if not ctx:
            return
        try:
            if lib.gguf_find_key(ctx, b"split.count") >= 0:
                return  # one shard of several: the output matrix may be in another file
            if lib.gguf_find_tensor(ctx, b"output.bias") >= 0:
                return  # a bias added after the product (qwen2 reads one where present)
            index = -1
            for name in (b"output.weight", b"token_embd.weight"):
                index = int(lib.gguf_find_tensor(ctx, name))
                if index >= 0:
                    break
            if index < 0:
                return
            try:
                kind = GGMLQuantizationType(int(lib.gguf_get_tensor_type(ctx, index)))
            except ValueError:  # a type newer than this gguf package
                return
            start = int(lib.gguf_get_data_offset(ctx))
            offset = start + int(lib.gguf_get_tensor_offset(ctx, index))
            size = int(lib.gguf_get_tensor_size(ctx, index))
        finally:
            lib.gguf_free(ctx)
        self.type, self._kind = kind.name, kind
        if kind.name in ("F32", "F16"):
            dtype: Any = np.float32 if kind.name == "F32" else np.float16
            self._data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(rows, width))
        else:
            shape = (rows, size // rows)
            self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)

    @property
    def supported(self) -> bool:
        """Whether :meth:`logits` reproduces llama.cpp's product for this matrix's type."""
        return self._data is not None and self.type in DOT_TYPES

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The ``(n, H)`` float64 rows of ``ids``, dequantized."""
        from gguf.quants import dequantize

        assert self._data is not None
        data = np.asarray(self._data[ids])
        if self.type in ("F32", "F16"):
            return data.astype(np.float64)
        return dequantize(data, self._kind).astype(np.float64)

    def logits(self, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``(N, H)`` final-norm outputs and ``(n,)`` ids -> ``(N, n)`` float32 logits."""
        x = DOT_TYPES[self.type](np.ascontiguousarray(hidden, dtype=np.float32))
        return (x @ self.rows(ids).T).astype(np.float32)
