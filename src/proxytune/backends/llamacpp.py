"""llama.cpp backend: GGUF models on CPUs through ``llama-cpp-python``'s C API.

The same protocol as the transformers backend (:class:`~.base.LogitsModel`), so every loop runs
on it unchanged. One llama.cpp *context* per loaded model holds the KV cache of every row of
every role on that model: each row is a *sequence* of the context, so

- a step of ``B`` rows is one ``llama_decode`` of ``B`` tokens (``B x k`` when verifying drafts),
  and the full next-token logits of each row are read from the context;
- dropping a row (``keep``), forgetting rejected drafts (``rollback``) and joining rows to a
  running batch (``extend``) are cache edits on sequences (``llama_memory_seq_rm``), with no
  copying;
- roles that name the same GGUF (the embedded default's expert and anti-expert) share one
  model and one context: the weights are loaded once, and states started one after the other
  with the same number of rows form a *group*: when one of them is advanced, its partners' rows
  are decoded in the same ``llama_decode`` with the same tokens, and a partner that then asks
  for exactly those tokens gets its logits without a forward (proxy-tuning feeds every role the
  same ids). A partner that asks for other tokens has that speculative work rolled back first,
  so the output never depends on the grouping.

A state started by :meth:`LlamaCppModel.start_hidden` returns the final norm's outputs instead
of logits: its decodes stop before the output matrix, and the engine scores the few ids a rule
re-ranks (:mod:`.llamacpp_head`).

Prompts are prefilled in chunks of at most ``n_batch`` tokens over all rows. The ids come from
the Hugging Face tokenizer (the one the GGUF carries, or the model directory's), as for the
other backends; llama.cpp's own tokenizer is never used, so both backends read the same ids.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..embedded import embedded_gguf
from ..errors import ConfigError, ModelLoadError, ProxyTuneError
from ..extras import require
from ..specs import ModelSpec, available_cores
from .base import end_ids
from .gguf_lora import lora_gguf
from .llamacpp_head import PLAIN_HEADS, NormTap, OutputHead, ggml_library
from .llamacpp_prompts import DEFAULT_BUDGET, Prefilled, PromptCache, common_prefix

INSTALL = "pip install 'proxytune[llamacpp]' (builds llama.cpp from source: about 6 minutes)"
KV_CELLS = 4096
"""Default KV cache cells of a context, shared by all its sequences (rows of every role);
a model's ``kv_cells`` option sets it."""
MAX_SEQUENCES = 64
"""Rows a context holds at once (all roles on the model together)."""
N_BATCH = 512
"""Most tokens one ``llama_decode`` takes (prefill runs in chunks of this)."""
OUTPUTS_PER_ROW = 16
"""Logit rows reserved per sequence: a speculative verification scores up to ``K + 1``."""
MAX_OUTPUTS = 64
"""Logit rows one decode may return (``MAX_OUTPUTS x vocabulary`` float32 are reserved)."""
FLOAT_FILE_TYPES = (0, 1)
"""GGUF file types of float32 / float16 weights: their KV cache is kept in float32 (quantized
models keep llama.cpp's float16 cache)."""


ALL_LAYERS = 1_000_000
"""``n_gpu_layers`` that offloads every layer of any model."""


def gpu_layers_for(asked: int | None, offload: bool) -> int:
    """The ``n_gpu_layers`` to load with: ``asked``, or every layer where this llama.cpp can
    offload to a GPU (``offload``) and none where it cannot; a positive ``asked`` on a CPU-only
    build is refused.

    >>> gpu_layers_for(None, False), gpu_layers_for(None, True), gpu_layers_for(4, True)
    (0, 1000000, 4)
    """
    if asked is None:
        return ALL_LAYERS if offload else 0
    if asked > 0 and not offload:
        raise ConfigError(
            f"gpu_layers={asked} needs llama.cpp built for a GPU, but this llama-cpp-python is "
            "CPU-only; reinstall it with CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall "
            "--no-cache-dir llama-cpp-python, or set gpu_layers: 0"
        )
    return asked


class LlamaCppError(ProxyTuneError, RuntimeError):
    """llama.cpp refused an operation (a full KV cache, too many rows)."""


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` package, or a one-line error that says how to install it."""
    return require(
        "llama_cpp",
        "llamacpp",
        "the llama.cpp backend",
        package="llama-cpp-python",
        hint="pip builds it from source the first time (about 6 minutes on 2 cores)",
    )


def available() -> bool:
    """Whether ``llama-cpp-python`` can be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


_init_lock = threading.Lock()
_quiet: Any = None
"""The log callback that keeps llama.cpp's progress lines off stderr (kept alive here)."""


def _backend_init(lc: Any) -> None:
    global _quiet
    with _init_lock:
        if _quiet is None:
            _quiet = lc.llama_log_callback(lambda level, text, data: None)
            lc.llama_log_set(_quiet, ctypes.c_void_p(0))
            lc.llama_backend_init()


class _Weights:
    """A GGUF file's weights loaded once per process: roles and adapters on the same file
    share them (each in its own context). Freed when the last context lets go."""

    _loaded: ClassVar[weakref.WeakValueDictionary[str, _Weights]] = weakref.WeakValueDictionary()
    _lock = threading.Lock()

    def __init__(self, lc: Any, path: str, gpu_layers: int = 0) -> None:
        self.lc, self.path = lc, path
        params = lc.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        # read the weights in, not mapped: on CPUs llama.cpp repacks most quantized weights
        # into its own buffers, and a mapping keeps the file's pages resident beside those
        # copies (the embedded default: 2.9 GiB resident mapped, 2.4 read; docs/speed.md)
        params.load_mode = lc.LLAMA_LOAD_MODE_NONE
        self.model = lc.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise ModelLoadError(
                f"llama.cpp could not load {path!r}: not a GGUF model it supports "
                "(check the file, or load it with backend: transformers)"
            )
        self.adapters: dict[str, Any] = {}
        """LoRA GGUF path -> llama.cpp adapter (freed with the weights)."""

    @classmethod
    def load(cls, lc: Any, path: str, gpu_layers: int = 0) -> _Weights:
        key = f"{os.path.realpath(path)}|{gpu_layers}"
        with cls._lock:
            weights = cls._loaded.get(key)
            if weights is None:
                weights = cls._loaded[key] = cls(lc, path, gpu_layers)
            return weights

    def metadata(self, key: str) -> str | None:
        """A string from the file's metadata (``general.architecture``), or ``None``."""
        buffer = ctypes.create_string_buffer(256)
        size = self.lc.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        return None if size < 0 else buffer.value.decode("utf-8", "replace")

    def adapter(self, path: Path) -> Any:
        """The LoRA GGUF at ``path`` loaded for these weights (once)."""
        key = str(path)
        with self._lock:
            if key not in self.adapters:
                handle = self.lc.llama_adapter_lora_init(self.model, key.encode())
                if not handle:
                    raise ModelLoadError(
                        f"llama.cpp could not load the LoRA adapter {key!r} for {self.path!r} "
                        "(was it trained on this base model?)"
                    )
                self.adapters[key] = handle
            return self.adapters[key]

    def __del__(self) -> None:
        try:  # noqa: SIM105 (module globals such as contextlib may be gone at shutdown)
            self.lc.llama_model_free(self.model)  # frees its adapters too
        except Exception:
            pass


class _Context:
    """One llama.cpp context over a model: a KV cache, a pool of sequence ids, a batch."""

    def __init__(
        self,
        lc: Any,
        weights: _Weights,
        n_vocab: int,
        threads: int,
        exact: bool,
        cells: int,
        adapter: Path | None = None,
    ) -> None:
        self.lc = lc
        params = lc.llama_context_default_params()
        params.n_ctx = cells
        self.cells = cells
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = MAX_SEQUENCES
        params.n_outputs_max_per_seq = OUTPUTS_PER_ROW
        params.n_outputs_max = MAX_OUTPUTS
        self.threads = threads
        """The threads it decodes with now (:meth:`set_threads`; a new context starts so)."""
        if exact:  # float weights: float32 attention, so logits match the transformers backend
            params.type_k = params.type_v = lc.GGML_TYPE_F32
            params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel is f16
        if hasattr(params, "kv_unified"):
            params.kv_unified = True  # one cache for every sequence, not n_ctx / n_seq each
        self.weights = weights
        """Kept alive as long as the context: the weights it runs on."""
        self.params = params
        self.adapter = adapter
        self.tap: NormTap | None = None
        """The eval callback that stops decodes at the final norm, once installed."""
        self._open()
        self.n_vocab = n_vocab
        self.free = list(range(MAX_SEQUENCES))
        self.batch = lc.llama_batch_init(N_BATCH, 0, 1)
        self.lock = threading.RLock()
        """One decode at a time (roles on the same model may run in different threads)."""
        self.last_started: weakref.ref[LlamaCppState] | None = None
        """The state started last: the next one may join its group."""

    def _open(self) -> None:
        """Create the llama.cpp context from :attr:`params` with :attr:`threads` (and apply the
        adapter)."""
        lc = self.lc
        self.params.n_threads = self.params.n_threads_batch = self.threads
        self.ctx = lc.llama_init_from_model(self.weights.model, self.params)
        if not self.ctx:
            raise ModelLoadError("llama.cpp could not create a context for the model")
        if self.adapter is not None:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(self.weights.adapter(self.adapter))
            if lc.llama_set_adapters_lora(self.ctx, handles, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise ModelLoadError(f"llama.cpp could not apply the LoRA adapter {self.adapter}")
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_batch = min(N_BATCH, int(lc.llama_n_batch(self.ctx)))
        """Tokens per decode: llama.cpp lowers the batch to a small cache's size."""

    def install_tap(self, make: Callable[[], NormTap]) -> bool:
        """Give the context the eval callback ``make()`` builds (a :class:`NormTap`), once.
        llama.cpp takes it only when a context is created, so the context is made anew: only
        while it holds no rows (False otherwise). Until then its decodes run without one."""
        with self.lock:
            if self.tap is not None:
                return True
            if len(self.free) < MAX_SEQUENCES:
                return False
            tap = make()
            self.lc.llama_free(self.ctx)
            self.params.cb_eval = tap.callback
            self.tap = tap
            self._open()
            self.last_started = None
            return True

    def __del__(self) -> None:
        """Free the batch and the context; the weights go when nothing holds them (a state
        that outlives its :class:`LlamaCppModel` never sees freed weights)."""
        try:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
        except Exception:  # interpreter shutdown
            pass

    def set_threads(self, threads: int) -> None:
        """Decode (and prefill) with ``threads`` threads from the next decode on."""
        with self.lock:
            if threads != self.threads:
                self.lc.llama_set_n_threads(self.ctx, threads, threads)
                self.threads = threads

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise LlamaCppError(
                f"{n} more rows asked for, but this llama.cpp context holds {MAX_SEQUENCES} rows "
                f"at once ({len(self.free)} free); use smaller batches"
            )
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def release(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            self.lc.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free.extend(seqs)

    def share(self, source: int, targets: Sequence[int], length: int) -> None:
        """Give each sequence of ``targets`` the first ``length`` cells of ``source`` (the
        cells are shared, not copied: one KV cache for every sequence)."""
        for seq in targets:
            self.lc.llama_memory_seq_cp(self.memory, source, seq, 0, length)

    def truncate(self, seq: int, length: int) -> None:
        if not self.lc.llama_memory_seq_rm(self.memory, seq, length, -1):
            raise LlamaCppError(f"llama.cpp could not roll sequence {seq} back to {length}")

    def save(self, seq: int) -> bytes:
        """The state bytes of sequence ``seq`` (its keys and values)."""
        with self.lock:
            size = int(self.lc.llama_state_seq_get_size(self.ctx, seq))
            buffer = (ctypes.c_uint8 * size)()
            written = int(self.lc.llama_state_seq_get_data(self.ctx, buffer, size, seq))
            return bytes(memoryview(buffer)[:written])

    def restore(self, seq: int, state: bytes) -> bool:
        """Load ``state`` (from :meth:`save`) into the empty sequence ``seq``; False where the
        cache has no room for it (the sequence is left empty)."""
        with self.lock:
            buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if int(self.lc.llama_state_seq_set_data(self.ctx, buffer, len(state), seq)) > 0:
                return True
            self.lc.llama_memory_seq_rm(self.memory, seq, -1, -1)  # nothing half-restored
            return False

    def decode(
        self, entries: Sequence[tuple[int, int, int, bool]], hidden: bool = False
    ) -> np.ndarray:
        """Decode ``(token, position, sequence, wants logits)`` entries (in chunks of
        ``N_BATCH`` with at most ``MAX_OUTPUTS`` logit rows); returns the logits of the entries
        that want them, in order, ``(n, n_vocab)`` float32, or with ``hidden`` their final
        norm's outputs, ``(n, H)``, the output matrix not applied."""
        out = []
        with self.lock:
            tap = self.tap
            if hidden and tap is None:
                raise LlamaCppError("hidden states asked of a context without its eval callback")
            for chunk in _chunks(entries, self.n_batch):
                batch = self.batch
                for i, (token, pos, seq, logits) in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = logits
                batch.n_tokens = len(chunk)
                if tap is not None:
                    tap.active = hidden
                    tap.take()
                status = self.lc.llama_decode(self.ctx, batch)
                if status != 0:
                    raise LlamaCppError(
                        f"llama_decode failed (status {status}): the KV cache of {self.cells} "
                        "cells is full; use fewer or shorter rows, or raise the model's "
                        "kv_cells option"
                    )
                wanted = sum(1 for e in chunk if e[3])
                if wanted and hidden:
                    assert tap is not None
                    rows = tap.take()
                    if rows.shape[0] != wanted:
                        raise LlamaCppError(
                            f"llama.cpp's final norm gave {rows.shape[0]} rows for {wanted} "
                            "outputs; run this model without candidate scoring (engine option "
                            "candidates: false)"
                        )
                    out.append(rows)
                elif wanted:
                    pointer = self.lc.llama_get_logits(self.ctx)
                    array = np.ctypeslib.as_array(
                        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                        shape=(wanted, self.n_vocab),
                    )
                    out.append(array.copy())
            if tap is not None:
                tap.active = False
        if not out:
            width = tap.width if hidden and tap is not None else self.n_vocab
            return np.zeros((0, width), dtype=np.float32)
        return np.concatenate(out) if len(out) > 1 else out[0]


def _chunks(
    entries: Sequence[tuple[int, int, int, bool]], size: int = N_BATCH
) -> list[Sequence[tuple[int, int, int, bool]]]:
    """Split ``entries`` into decodes of at most ``size`` tokens and ``MAX_OUTPUTS`` logit
    rows."""
    chunks, start, outputs = [], 0, 0
    for i, entry in enumerate(entries):
        if i - start == size or (entry[3] and outputs == MAX_OUTPUTS):
            chunks.append(entries[start:i])
            start, outputs = i, 0
        outputs += entry[3]
    chunks.append(entries[start:])
    return chunks


class _Group:
    """States of one context that are fed the same tokens in lockstep: one decode for all."""

    def __init__(self) -> None:
        self.states: weakref.WeakSet[LlamaCppState] = weakref.WeakSet()
        self.pending: weakref.WeakKeyDictionary[LlamaCppState, tuple[list[list[int]], Any]] = (
            weakref.WeakKeyDictionary()
        )
        """State -> (tokens decoded for it by a partner, their logits)."""


class LlamaCppModel:
    """A GGUF model run by llama.cpp, behind :class:`~proxytune.backends.base.LogitsModel`."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        name: str,
        threads: int | None = None,
        kv_cells: int | None = None,
        adapter: str | Path | None = None,
        gpu_layers: int | None = None,
        generation_eos: Any = None,
    ) -> None:
        """``generation_eos``: the ``eos_token_id`` of a ``generation_config.json`` (where the
        transformers backend stops too); ``None``: the GGUF vocabulary's EOS and EOT."""
        lc = llama_cpp_module()
        _backend_init(lc)
        self.lc = lc
        self.path = str(path)
        self.gpu_layers = gpu_layers_for(gpu_layers, bool(lc.llama_supports_gpu_offload()))
        """Layers llama.cpp runs on the GPU (their logits still come back to the host)."""
        weights = _Weights.load(lc, self.path, self.gpu_layers)
        self._model = weights.model
        lora = None if adapter is None else _lora_file(weights, adapter)
        vocab = lc.llama_model_get_vocab(self._model)
        self._vocab_width = int(lc.llama_vocab_n_tokens(vocab))
        self._n_ctx_train = int(lc.llama_model_n_ctx_train(self._model))
        if generation_eos is None:
            generation_eos = [int(lc.llama_vocab_eos(vocab)), int(lc.llama_vocab_eot(vocab))]
        ends = end_ids(generation_eos, tokenizer.eos_token_id)
        self._eos = tuple(sorted(i for i in ends if 0 <= i < self._vocab_width))
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device("cpu")
        self.threads = threads or available_cores()
        """Decode threads when running alone: the count given, else every core available."""
        self.shares_cores = threads is None
        """Whether :mod:`~proxytune.engine.overlap` may split the cores with the contexts decoding
        beside this one (its threads were left ``auto``)."""
        # the cores are ggml's: torch's vocabulary-wide work between decodes (a few passes over
        # ~150k floats) is faster on one thread than on several that wait for ggml's threads
        torch.set_num_threads(1)
        float_weights = int(lc.llama_model_ftype(self._model)) in FLOAT_FILE_TYPES
        self.kv_cells = kv_cells or KV_CELLS
        self.context = _Context(
            lc, weights, self._vocab_width, self.threads, float_weights, self.kv_cells, lora
        )
        self.prompts: PromptCache | None = None
        """Prefilled prompts restored instead of prefilled again (:meth:`cache_prompts`)."""

    def cache_prompts(self, min_tokens: int = 1, budget: int = DEFAULT_BUDGET) -> None:
        """Keep prefilled prompts of at least ``min_tokens`` ids (within ``budget`` bytes) to
        restore them when they come again (:mod:`.llamacpp_prompts`); the engine option
        ``prefix_cache`` turns it on."""
        if self.prompts is None:
            self.prompts = PromptCache(budget, min_tokens)

    @property
    def thread_cost(self) -> float:
        """The cost of one decode, for splitting cores: the bytes of the weights it reads."""
        return float(self.lc.llama_model_size(self._model))

    def use_threads(self, threads: int | None) -> None:
        """Decode with ``threads`` threads from now on (``None``: :attr:`threads` again)."""
        self.context.set_threads(threads or self.threads)

    @property
    def decode_threads(self) -> int:
        """The threads the context decodes with now (read back from llama.cpp)."""
        return int(self.lc.llama_n_threads(self.context.ctx))

    @property
    def vocab_width(self) -> int:
        return self._vocab_width

    @property
    def context_length(self) -> int | None:
        cells = self.kv_cells
        return min(self._n_ctx_train, cells) if self._n_ctx_train > 0 else cells

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[LlamaCppState, torch.Tensor]:
        """Prefill ``prompts``; a state started right after another of this model with as
        many rows (before either advanced) joins its group."""
        return self._start(prompts, use_cache, hidden=False)

    @property
    def scores_candidates(self) -> bool:
        """Whether this model can be scored at chosen ids only: on the CPU, without an
        adapter, an architecture whose logits are the plain output product, and an output
        matrix type whose product :mod:`.llamacpp_head` reproduces."""
        return self.output_head is not None

    @cached_property
    def output_head(self) -> OutputHead | None:
        """The output matrix as :meth:`candidate_logits` reads it (looked up once; ``None``:
        this model cannot be scored at chosen ids)."""
        plain = self.context.weights.metadata("general.architecture") in PLAIN_HEADS
        if not plain or self.gpu_layers != 0 or self.context.adapter is not None:
            return None
        lib = ggml_library(self.lc)
        if lib is None:
            return None
        width = int(self.lc.llama_model_n_embd(self._model))
        head = OutputHead(lib, self.path, self._vocab_width, width)
        return head if head.supported else None

    def start_hidden(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[LlamaCppState, torch.Tensor]:
        """As :meth:`start`, on a state whose decodes stop at the final norm and return its
        outputs, ``(B, H)`` here; a plain state where this model cannot, or its context holds
        rows of plain states (it gets its eval callback only when empty: :meth:`_Context.
        install_tap`)."""
        head = self.output_head
        if head is None:
            return self.start(prompts, use_cache)
        if not self.context.install_tap(lambda: NormTap(self.lc, head.lib, head.width)):
            return self.start(prompts, use_cache)
        return self._start(prompts, use_cache, hidden=True)

    def candidate_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` final-norm outputs, ``(n,)`` ids -> ``(N, n)`` logits at ids (llama.cpp's
        own to about 1e-6: :class:`~.llamacpp_head.OutputHead`)."""
        head = self.output_head
        assert head is not None
        return torch.from_numpy(head.logits(hidden.numpy(), ids.numpy()))

    def _start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool, hidden: bool
    ) -> tuple[LlamaCppState, torch.Tensor]:
        state = LlamaCppState(self, [list(p) for p in prompts], use_cache, hidden)
        with self.context.lock:
            last = self.context.last_started() if self.context.last_started else None
            if (
                last is not None
                and use_cache
                and last.use_cache
                and last.hidden == hidden
                and not last.advanced
                and len(last.ids) == len(prompts)
            ):
                state.group = last.group or _Group()
                last.group = state.group
                state.group.states.update((last, state))
            self.context.last_started = weakref.ref(state)
        return state, state.prefill()

    def start_alone(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[LlamaCppState, torch.Tensor]:
        """A state that never joins a group (speculative decoding's drafter runs ahead)."""
        state = LlamaCppState(self, [list(p) for p in prompts], use_cache)
        return state, state.prefill()


class _Rows:
    """The sequences a state owns; given back to the context when the state is dropped."""

    def __init__(self, context: _Context, seqs: list[int]) -> None:
        self.context, self.seqs = context, seqs

    def release(self) -> None:
        if self.seqs:
            self.context.release(self.seqs)
            self.seqs = []


class LlamaCppState:
    """Rows in flight on one :class:`LlamaCppModel`: one context sequence per row.

    Implements ``advance``/``keep`` and the optional ``rollback`` and ``extend``/``compact``;
    with ``hidden``, every output is the final norm's ``H`` values instead of ``W`` logits.
    """

    def __init__(
        self, model: LlamaCppModel, prompts: list[list[int]], use_cache: bool, hidden: bool = False
    ) -> None:
        self.model = model
        self.hidden = hidden
        self.context = model.context
        self.use_cache = use_cache
        self.ids = prompts
        """Each row's ids so far (prompt and fed tokens)."""
        self.cached = [0] * len(prompts)
        """Per row: how many of its ids the context holds."""
        self.rows = _Rows(self.context, self.context.take(len(prompts)))
        weakref.finalize(self, _Rows.release, self.rows)
        self.group: _Group | None = None
        self.advanced = False

    @property
    def seqs(self) -> list[int]:
        return self.rows.seqs

    def prefill(self) -> torch.Tensor:
        """Decode every row's ids not yet in the cache; the last position's logits ``(B, W)``.
        With the model's :attr:`~LlamaCppModel.prompts` cache, a prompt prefilled before is
        restored from it, and the others are kept there."""
        cache = self.model.prompts if self.use_cache else None
        if cache is None:
            logits = torch.from_numpy(self.context.decode(self._entries(1), self.hidden))
            return logits.view(len(self.ids), -1)
        with self.context.lock:
            found = [self._restored(cache, i) for i in range(len(self.ids))]
            missed = [i for i, entry in enumerate(found) if entry is None]
            cache.shared_tokens += self._share_preamble(missed, cache.min_tokens)
            entries = self._entries(1, missed)
            outputs = self.context.decode(entries, self.hidden) if entries else []
            decoded = dict(zip(missed, outputs, strict=True))
            for i, output in decoded.items():
                key = tuple(self.ids[i])
                if cache.wants(key):
                    state = self.context.save(self.seqs[i])
                    cache.put(key, self.hidden, Prefilled(state, output.copy()))
        rows = [decoded[i] if entry is None else entry.output for i, entry in enumerate(found)]
        return torch.from_numpy(np.stack(rows))

    def _share_preamble(self, rows: list[int], min_tokens: int) -> int:
        """Prefill the ids that every row at ``rows`` starts with (a few-shot preamble: at least
        ``min_tokens`` of them, and not a whole prompt) once, in the first row's sequence, and
        share those cells with the other rows' sequences; the ids this saved prefilling."""
        prompts = [self.ids[i] for i in rows]
        if len(rows) < 2 or any(self.cached[i] for i in rows):
            return 0
        length = min(len(common_prefix(prompts)), min(len(p) for p in prompts) - 1)
        if length < min_tokens:
            return 0
        first = self.seqs[rows[0]]
        self.context.decode([(prompts[0][pos], pos, first, False) for pos in range(length)])
        self.context.share(first, [self.seqs[i] for i in rows[1:]], length)
        for i in rows:
            self.cached[i] = length
        return length * (len(rows) - 1)

    def _restored(self, cache: PromptCache, i: int) -> Prefilled | None:
        """Row ``i``'s prompt restored from ``cache`` into its sequence (recorded as cached);
        ``None`` where it is not there (or the KV cache has no room for it)."""
        key = tuple(self.ids[i])
        entry = cache.get(key, self.hidden) if cache.wants(key) else None
        if entry is None or not self.context.restore(self.seqs[i], entry.state):
            return None
        self.cached[i] = len(key)
        cache.restored_tokens += len(key)
        return entry

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        new = tokens.tolist()
        k = len(new[0]) if new else 0
        self.advanced = True
        with self.context.lock:
            ready = self._take_pending(new)
            if ready is not None:
                return ready
            partners = self._partners()
            for row, more in zip(self.ids, new, strict=True):
                row.extend(more)
            plan = [(self, self._entries(k))]
            for partner in partners:
                plan.append((partner, partner._entries_for(new)))
            entries = [e for _, es in plan for e in es]
            logits = torch.from_numpy(self.context.decode(entries, self.hidden))
            outs = logits.split([len(self.ids) * k] * len(plan))
            for partner, out in zip(partners, outs[1:], strict=True):
                self.group.pending[partner] = (new, out.view(len(partner.ids), k, -1))  # type: ignore[union-attr]
            return outs[0].view(len(self.ids), k, -1)

    def _partners(self) -> list[LlamaCppState]:
        """Group members that can take the same tokens in this decode."""
        if self.group is None or not self.use_cache:
            return []
        return [
            s
            for s in self.group.states
            if s is not self and s not in self.group.pending and len(s.ids) == len(self.ids)
            and s.hidden == self.hidden and s.seqs
            and all(c == len(r) for c, r in zip(s.cached, s.ids, strict=True))
        ]  # fmt: skip

    def _entries_for(self, new: list[list[int]]) -> list[tuple[int, int, int, bool]]:
        """Entries that feed ``new`` after this state's ids (they stay pending, unrecorded)."""
        return [
            (token, len(row) + j, seq, True)
            for row, seq, more in zip(self.ids, self.seqs, new, strict=True)
            for j, token in enumerate(more)
        ]

    def _take_pending(self, new: list[list[int]] | None) -> torch.Tensor | None:
        """The logits a partner already decoded for exactly ``new`` (recorded as fed), or
        ``None``; work decoded for other tokens is rolled back first."""
        done = None if self.group is None else self.group.pending.pop(self, None)
        if done is None:
            return None
        if done[0] == new:
            for i, (row, more) in enumerate(zip(self.ids, new, strict=True)):
                row.extend(more)
                self.cached[i] = len(row)
            return done[1]
        for row, seq in zip(self.ids, self.seqs, strict=True):
            self.context.truncate(seq, len(row))
        return None

    def _discard_pending(self) -> None:
        """Roll back what a partner decoded for this state (before keep, rollback, extend)."""
        self._take_pending(None)

    def _entries(
        self, k: int, rows: Sequence[int] | None = None
    ) -> list[tuple[int, int, int, bool]]:
        """Decode entries for every id not yet cached (all of them without a cache), with
        logits for each row's last ``k`` (of the rows at ``rows``, default all); records them
        as cached."""
        if not self.use_cache:  # recompute: every row from its first id
            for i, seq in enumerate(self.seqs):
                self.context.truncate(seq, 0)
                self.cached[i] = 0
        entries = []
        for i in range(len(self.ids)) if rows is None else rows:
            row, seq = self.ids[i], self.seqs[i]
            if len(row) - self.cached[i] < k:
                raise LlamaCppError("a row was rolled back past the ids it is asked to score")
            for pos in range(self.cached[i], len(row)):
                entries.append((row[pos], pos, seq, pos >= len(row) - k))
            self.cached[i] = len(row)
        return entries

    def keep(self, rows: torch.Tensor) -> None:
        self._discard_pending()
        index = [int(i) for i in rows.tolist()]
        kept = set(index)
        self.context.release([s for i, s in enumerate(self.seqs) if i not in kept])
        self.rows.seqs = [self.seqs[i] for i in index]
        self.ids = [self.ids[i] for i in index]
        self.cached = [self.cached[i] for i in index]

    def rollback(self, drop: torch.Tensor) -> None:
        self._discard_pending()
        for i, n in enumerate(drop.tolist()):
            if n:
                length = len(self.ids[i]) - int(n)
                self.context.truncate(self.seqs[i], length)
                del self.ids[i][length:]
                self.cached[i] = min(self.cached[i], length)

    @property
    def can_extend(self) -> bool:
        return True

    def extend(self, other: LlamaCppState) -> None:
        """Append the rows of ``other`` (a state of the same model); ``other`` is emptied."""
        if other.context is not self.context or other.hidden != self.hidden:
            raise ConfigError(
                "only states of the same llama.cpp model, both on logits or both on hidden "
                "states, can be merged"
            )
        self._discard_pending()
        other._discard_pending()
        self.rows.seqs = self.seqs + other.seqs
        self.ids += other.ids
        self.cached += other.cached
        other.rows.seqs, other.ids, other.cached = [], [], []

    def compact(self) -> None:
        """Nothing to do: dropped rows' cache cells were freed when they were dropped."""


def _lora_file(weights: _Weights, adapter: str | Path) -> Path:
    """A PEFT LoRA adapter directory as a llama.cpp LoRA GGUF for ``weights``."""
    arch = weights.metadata("general.architecture") or "?"
    lc = weights.lc
    heads = int(lc.llama_model_n_head(weights.model))
    kv_heads = int(lc.llama_model_n_head_kv(weights.model))
    return lora_gguf(adapter, arch, heads, kv_heads)


GGUF_IN_DIRECTORY = "model.gguf"
"""The GGUF a model directory may hold next to its weights (``proxytune setup`` and
``proxytune export`` write it)."""


def gguf_of(path: str) -> Path | None:
    """The GGUF file a model path names: a ``.gguf`` file, a directory's ``model.gguf``, or
    the GGUF that ``proxytune setup`` keeps for an ``embedded:NAME`` model; ``None`` if there
    is none."""
    if path.startswith("embedded:"):
        kept = embedded_gguf(path.removeprefix("embedded:"))
        return kept if kept.is_file() else None
    local = Path(path).expanduser()
    if local.is_dir():
        local = local / GGUF_IN_DIRECTORY
        return local if local.is_file() else None
    return local if local.suffix == ".gguf" and local.is_file() else None


def load_llamacpp(spec: ModelSpec) -> LlamaCppModel:
    """Load a GGUF file with llama.cpp and its Hugging Face tokenizer (the tokenizer files in
    the file's directory where there are some, else the one the GGUF carries); a LoRA
    ``adapter`` runs as a llama.cpp adapter on the file's weights (shared with the roles that
    run the file plain)."""
    from transformers import AutoTokenizer

    if spec.quantize is not None:
        raise ConfigError(
            f"quantize={spec.quantize!r} applies to the transformers backend; a GGUF file "
            "carries its own quantization"
        )
    gguf = gguf_of(spec.path)
    if gguf is None:
        if spec.path.startswith("embedded:"):
            raise ConfigError(
                f"{spec.path} has no GGUF kept for llama.cpp (set up before they were kept); "
                "run `proxytune setup` once more, or use backend: transformers"
            )
        raise ConfigError(
            f"the llama.cpp backend needs a .gguf file or a directory with {GGUF_IN_DIRECTORY}, "
            f"got {spec.path!r}; give the file (`proxytune export` writes one) or use "
            "backend: transformers"
        )
    folder = gguf.parent
    try:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    except Exception as err:
        raise ModelLoadError(f"could not load the tokenizer of {spec.path!r}: {err}") from err
    name = spec.path.removeprefix("embedded:")
    if spec.adapter is not None:
        name = f"{name}+{Path(spec.adapter).name}"
    return LlamaCppModel(
        gguf,
        tokenizer,
        name,
        spec.threads,
        spec.kv_cells,
        spec.adapter,
        spec.gpu_layers,
        generation_eos=_generation_eos(folder),
    )


def _generation_eos(folder: Path) -> Any:
    """The ``eos_token_id`` of a ``generation_config.json`` beside the GGUF, or ``None``."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder)).eos_token_id
    except OSError:  # no generation config there
        return None
