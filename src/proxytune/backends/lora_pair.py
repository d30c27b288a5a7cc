"""Expert and anti-expert in one forward pass: one small model, a LoRA adapter on its expert rows.

When the expert is a LoRA adapter of the anti-expert's model (tune the small model with LoRA,
keep it untuned as the anti-expert), the pair needs one copy of the small model, not two, and
one forward per step for both roles, each adapter applied to its own rows only::

    rows 0..B-1    adapter "expert0"    -> log p_E   (W x + B A x s)
    rows B..2B-1   no adapter           -> log p_A   (W x)

(row masks on the LoRA outputs, or peft's mixed-batch ``adapter_names``: see :class:`_PeftLM`).

The decode loop knows nothing of this. It sees two :class:`LoraView` models and starts and
advances one state per role as usual. Each view prefills its own rows; when the anti-expert
starts right after its expert with the same rows (as the loop does), the two batches are
merged into one of 2B rows. From then on the first role to ask for a step runs the forward for
both and the other receives its half; the two must be given the same tokens and row choices,
as every role is in proxy-tuning (anything else raises :class:`LockstepError`).
A view started on its own (``tuner.alone("expert[0]")``, ``start_alone``) runs alone, still on
the shared weights.

:func:`pair_models` wires this into :meth:`ProxyTuner.from_specs`; the engine option
``one_pass: false`` (``--two-pass``) loads the expert as a separate merged model.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..specs import ModelSpec
from .hf import HFDecodeState, HFModel, load_hf
from .lockstep import Lockstep, LockstepError
from .lora_specs import pairable, peft_quietly, resolve_adapter_dir

__all__ = ["LockstepError", "LoraHost", "LoraView", "pair_models", "resolve_adapter_dir"]

ANTI = "__base__"
"""peft's name for "no adapter" in a mixed batch: the anti-expert's rows."""


def pair_models(
    expert: ModelSpec | None, anti: ModelSpec | None, loaded: dict[tuple[Any, ...], Any]
) -> bool:
    """Load a pairable expert/anti-expert as two views of one model into ``loaded``.

    ``loaded`` maps ``ModelSpec.load_key`` to a loaded model (the cache of
    :meth:`ProxyTuner.from_specs`). Several adapters on the same anti-expert share one host.
    Returns whether the pair runs in one pass; if not, nothing was loaded.
    """
    if not pairable(expert, anti):
        return False
    assert expert is not None and anti is not None and expert.adapter is not None
    if expert.load_key in loaded:
        return isinstance(loaded[expert.load_key], LoraView)
    held = loaded.get(anti.load_key)
    if held is not None and not isinstance(held, LoraView):
        return False  # the anti-expert is already loaded as a plain model for another role
    host = held.host if held is not None else LoraHost(anti)
    loaded[anti.load_key] = host.view(ANTI)
    loaded[expert.load_key] = host.view(host.add_adapter(expert.adapter))
    return True


# the shared model --------------------------------------------------------------------------


class _PeftLM(HFModel):
    """An :class:`HFModel` over a ``PeftModel``: each forward applies every row's adapter.

    Two equivalent mechanisms. ``masked`` (vanilla LoRA on linear layers, the usual case):
    every adapter stays active and a hook on each ``lora_B`` multiplies its output by a
    per-row 0/1 mask, so a row gets exactly ``W x + [row uses A] * B_A A_A x * s_A``; hooks are
    registered once, so a forward costs little more than the plain model's. Otherwise peft's
    mixed-batch ``adapter_names`` (which also handles DoRA, embeddings, modules_to_save).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        super().__init__(model, tokenizer, name)
        inner = inspect.signature(model.get_base_model().forward).parameters
        self._keeps_logits = "logits_to_keep" in inner  # the PeftModel signature hides it
        self.row_adapters: list[str] = []
        self.masked = False
        self.masks: dict[str, torch.Tensor] | None = None

    def forward(self, **kwargs: Any) -> torch.Tensor:
        labels = self.row_adapters
        rows = kwargs["input_ids"].shape[0]
        if len(labels) != rows:
            raise RuntimeError(f"{len(labels)} adapter names for {rows} rows")
        if not self.masked:
            kwargs["adapter_names"] = list(labels)
            return super().forward(**kwargs)
        self.masks = {
            name: torch.tensor([x == name for x in labels], device=self.device).view(-1, 1, 1)
            for name in self.model.peft_config
        }
        try:
            return super().forward(**kwargs)
        finally:
            self.masks = None

    def mask_hook(self, adapter: str) -> Any:
        """A forward hook for ``lora_B[adapter]``: zero its output on other adapters' rows."""

        def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if self.masks is None:
                return output
            return output * self.masks[adapter].to(output.dtype)

        return hook


def _maskable(model: Any) -> bool:
    """Only vanilla LoRA on ``nn.Linear`` layers, nothing else trained: masks are exact."""
    from peft.tuners.lora.layer import Linear, LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return False
        if isinstance(module, LoraLayer) and (
            type(module) is not Linear or module.lora_variant or len(module.lora_embedding_A)
        ):
            return False
    return True


class LoraHost:
    """One small model in memory, unmerged LoRA adapters on it, and views for each role."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._plain = load_hf(spec)  # weights only: the adapters are added unmerged below
        self.lm: _PeftLM | None = None
        self.adapters: dict[str, str] = {}  # adapter directory -> adapter name
        self.lock = threading.RLock()
        self._open: weakref.ref[LoraState] | None = None  # a started state awaiting its partner

    def add_adapter(self, adapter: str) -> str:
        """Load ``adapter`` (a directory) once; return its name in mixed batches."""
        from peft.tuners.lora.layer import LoraLayer

        path = str(Path(adapter).expanduser().resolve())
        if path in self.adapters:
            return self.adapters[path]
        name = f"expert{len(self.adapters)}"
        try:
            if self.lm is None:
                from peft import PeftModel

                with peft_quietly():
                    model = PeftModel.from_pretrained(self._plain.model, path, adapter_name=name)
                self.lm = _PeftLM(model.eval(), self._plain.tokenizer, self._plain.name)
            else:
                self.lm.model.load_adapter(path, adapter_name=name)
                self.lm.model.eval()
        except Exception as err:
            raise ModelLoadError(
                f"could not apply adapter {adapter!r}: {err}. Check that it was trained on "
                f"{self.spec.path!r}."
            ) from err
        self.adapters[path] = name
        model = self.lm.model
        model.base_model.set_adapter(list(self.adapters.values()), inference_mode=True)
        for module in model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_B:
                module.lora_B[name].register_forward_hook(self.lm.mask_hook(name))
        self.lm.masked = _maskable(model)
        return name

    def view(self, adapter: str) -> LoraView:
        return LoraView(self, adapter)

    # linking the two roles of one batch ---------------------------------------------------

    def started(self, state: LoraState) -> None:
        """Merge ``state`` with the state started just before it if they are the two roles of
        one batch: one adapter-on and one adapter-off, the same rows, mergeable caches."""
        with self.lock:
            prev = self._open() if self._open is not None else None
            self._open = None
            if prev is not None and _complementary(prev, state):
                _Joint(prev, state)
            else:
                self._open = weakref.ref(state)

    def forget(self, state: LoraState) -> None:
        """``state`` ran a step on its own: no later start may join it."""
        if self._open is not None and self._open() is state:
            self._open = None


def _complementary(a: LoraState, b: LoraState) -> bool:
    if a.state is None or b.state is None or len(a.labels) != len(b.labels):
        return False
    if (a.labels[0] == ANTI) == (b.labels[0] == ANTI):
        return False
    if (a.state.cache is None) != (b.state.cache is None):
        return False
    return a.state.can_extend and b.state.can_extend


class LoraView:
    """One role on a :class:`LoraHost`: its adapter on (expert) or off (anti-expert).

    Implements :class:`~proxytune.backends.base.LogitsModel`.
    """

    def __init__(self, host: LoraHost, adapter: str) -> None:
        self.host = host
        self.adapter = adapter
        path = next((p for p, n in host.adapters.items() if n == adapter), None)
        self.name = host.spec.path if path is None else f"{host.spec.path}+{path} (one pass)"

    @property
    def _lm(self) -> HFModel:
        return self.host.lm or self.host._plain

    @property
    def shared_weights(self) -> LoraHost:
        """The host both roles run on (:class:`~.base.SharesWeights`)."""
        return self.host

    @property
    def tokenizer(self) -> Any:
        return self._lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self._lm.device

    @property
    def vocab_width(self) -> int:
        return self._lm.vocab_width

    @property
    def context_length(self) -> int | None:
        return self._lm.context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._lm.eos_token_ids

    def start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[LoraState, torch.Tensor]:
        return self._start(prompts, use_cache, link=True)

    def start_alone(
        self, prompts: Sequence[Sequence[int]], use_cache: bool = True
    ) -> tuple[LoraState, torch.Tensor]:
        """A state that never joins the other role's batch (it will not move in lockstep,
        like speculative decoding's drafter)."""
        return self._start(prompts, use_cache, link=False)

    def _start(
        self, prompts: Sequence[Sequence[int]], use_cache: bool, link: bool
    ) -> tuple[LoraState, torch.Tensor]:
        host = self.host
        if host.lm is None:
            raise RuntimeError("a LoraHost needs an adapter before it can run")
        labels = [self.adapter] * len(prompts)
        with host.lock:
            host.lm.row_adapters = labels
            hf_state, logits = host.lm.start(prompts, use_cache=use_cache)
        state = LoraState(host, labels, hf_state)
        if link:
            host.started(state)
        return state, logits


class LoraState:
    """The :class:`~proxytune.backends.base.DecodeState` of one role: alone, or half a joint.

    Besides ``advance``/``keep`` it offers what speculative decoding and continuous batching
    use on :class:`~proxytune.backends.hf.HFDecodeState`: ``rollback``, ``can_extend``,
    ``extend`` and ``compact``.
    """

    def __init__(self, host: LoraHost, labels: list[str], state: HFDecodeState) -> None:
        self.host = host
        self.labels = labels
        self.state: HFDecodeState | None = state
        self.joint: _Joint | None = None
        self.half = 0

    @property
    def lockstep_key(self) -> Any:
        """What the two halves' ``extend`` arguments share (:func:`~.lockstep.same_call`)."""
        return self.joint

    def _alone(self) -> HFDecodeState:
        self.host.forget(self)
        assert self.state is not None
        self.host.lm.row_adapters = self.labels  # type: ignore[union-attr]
        return self.state

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.joint is not None:
            return self.joint.call(self.half, "advance", tokens)
        with self.host.lock:
            return self._alone().advance(tokens)

    def keep(self, rows: torch.Tensor) -> None:
        if self.joint is not None:
            self.joint.call(self.half, "keep", rows)
            return
        self._alone().keep(rows)
        self.labels = [self.labels[i] for i in rows.tolist()]

    def rollback(self, drop: torch.Tensor) -> None:
        """Forget the last ``drop[r]`` ids of each row (speculative decoding)."""
        if self.joint is not None:
            self.joint.call(self.half, "rollback", torch.as_tensor(drop).view(-1))
            return
        self._alone().rollback(drop)  # type: ignore[attr-defined]

    @property
    def can_extend(self) -> bool:
        state = self.joint.merged if self.joint is not None else self.state
        return bool(getattr(state, "can_extend", False))

    def extend(self, other: LoraState) -> None:
        """Append the rows of ``other`` (started on the same view) to this batch."""
        if self.joint is not None:
            self.joint.call(self.half, "extend", other)
            return
        if other.joint is not None or other.state is None:
            raise LockstepError("a lone role's batch can only be extended by a lone batch")
        self._alone().extend(other.state)  # type: ignore[attr-defined]
        self.labels = self.labels + other.labels

    def compact(self) -> None:
        if self.joint is not None:
            self.joint.call(self.half, "compact", None)
        elif hasattr(self.state, "compact"):
            self._alone().compact()  # type: ignore[attr-defined]


MAX_LAG = 8
"""Operations one role of a joint may run ahead of the other before that counts as an error."""


class _Joint(Lockstep):
    """Two roles' rows in one batch (first role's rows, then the second's), each operation run
    once for both (:class:`~.lockstep.Lockstep`) with each row's adapter set."""

    def __init__(self, first: LoraState, second: LoraState) -> None:
        assert first.state is not None and second.state is not None
        super().__init__(
            2,
            MAX_LAG,
            "a one-pass LoRA pair",
            "load them as two models (engine option one_pass: false)",
        )
        self.host = first.host
        self.merged = first.state
        self.merged.extend(second.state)  # type: ignore[attr-defined]
        self.labels = first.labels + second.labels
        self.rows = len(first.labels)  # per role
        for half, role in enumerate((first, second)):
            role.state, role.joint, role.half = None, self, half

    def run(self, op: str, arg: Any) -> Any:
        with self.host.lock:
            self.host.lm.row_adapters = self.labels  # type: ignore[union-attr]
            return super().run(op, arg)

    def _advance(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(self.merged.ids.device).view(self.rows, -1)
        out = self.merged.advance(torch.cat([tokens, tokens]))  # (2B, k, W)
        return out[: self.rows], out[self.rows :]

    def _reorder(self, index: list[int], rows: int) -> None:
        self.merged.keep(torch.tensor(index, device=self.merged.ids.device))
        self.labels = [self.labels[i] for i in index]
        self.rows = rows

    def _keep(self, rows: torch.Tensor) -> tuple[None, None]:
        kept = rows.tolist()
        self._reorder(kept + [i + self.rows for i in kept], len(kept))
        return None, None

    def _rollback(self, drop: torch.Tensor) -> tuple[None, None]:
        self.merged.rollback(drop.repeat(2))  # type: ignore[attr-defined]
        return None, None

    def _compact(self, _: None) -> tuple[None, None]:
        if hasattr(self.merged, "compact"):
            self.merged.compact()
        return None, None

    def _extend(self, other: LoraState) -> tuple[None, None]:
        new = other.joint
        if new is None or new is self or new.labels[0] != self.labels[0] or new.pending[0]:
            raise LockstepError("a one-pass batch can only be extended by another one-pass batch")
        a, b = self.rows, new.rows
        self.merged.extend(new.merged)  # type: ignore[attr-defined]
        self.labels = self.labels + new.labels  # [A first, A second, B first, B second]
        order = [
            *range(a),
            *range(2 * a, 2 * a + b),
            *range(a, 2 * a),
            *range(2 * a + b, 2 * (a + b)),
        ]
        self._reorder(order, a + b)
        return None, None
