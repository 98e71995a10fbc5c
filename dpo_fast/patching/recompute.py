"""Tell a decoder layer's checkpoint recompute from its forward, so the recompute can skip dead work.

Gradient checkpointing runs each decoder layer twice: in forward, keeping only its input, and again
in backward (the recompute), to rebuild the tensors its ops saved for backward. The recompute's
output is thrown away: the checkpoint back-propagates through it but never reads its values. In a
Llama-family layer the last projection, the MLP's down_proj, feeds only the residual add that makes
that output, and its backward needs its input, not its output. So in the recompute the down_proj
GEMM computes values nobody reads: 27% of a Llama-3.1-8B layer's linear FLOPs, about 7% of the body's
GEMM work in a checkpointed DPO step (reference forward, policy forward, recompute, backward).

`TailSkippingCheckpoint` wraps a layer's checkpoint function (transformers' per-layer
``_gradient_checkpointing_func``: torch's checkpoint, reentrant or not, or dpo_fast's offloaded one).
The layer function it hands on counts its calls: the first is the forward, every later one is a
recompute, and during those `recomputing()` is True. dpo_fast's patched down_proj (marked as its
layer's tail by `dpo_fast.patching.body`) then runs its LoRA op with ``output=False``: it saves what
backward needs and returns an uninitialized tensor. The flag belongs to the call, not the layer: a
layer run again inside some outer recompute (an outer checkpoint around several layers) is a first
call of its own checkpoint, whose output is used, and the flag is False there.
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable, Sequence

__all__ = ["TailSkippingCheckpoint", "recomputing", "unwrapped", "track_layers", "untrack_layers", "rewrap_layers"]

_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("dpo_fast_recomputing", default=False)


def recomputing() -> bool:
    """True while a layer wrapped by `TailSkippingCheckpoint` is being recomputed (its output unread)."""
    return _RECOMPUTING.get()


class _LayerCall:
    """The layer function as the checkpoint sees it: the first call is the forward, later ones recompute."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        token = _RECOMPUTING.set(self.calls > 1)
        try:
            return self.function(*args, **kwargs)
        finally:
            _RECOMPUTING.reset(token)


class TailSkippingCheckpoint:
    """A layer checkpoint function (``func(layer_function, *args, **kwargs)``) whose recomputes set `recomputing()`."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.inner(_LayerCall(function), *args, **kwargs)

    def __repr__(self) -> str:
        return f"TailSkippingCheckpoint({self.inner!r})"


def unwrapped(func: Callable[..., Any]) -> Callable[..., Any]:
    """The checkpoint function inside a `TailSkippingCheckpoint` (`func` itself if it is not one)."""
    return func.inner if isinstance(func, TailSkippingCheckpoint) else func


_FUNC = "_gradient_checkpointing_func"   # transformers' per-layer checkpoint function
_LAYERS = "_dpo_fast_tail_layers"         # on the causal LM: the layers whose checkpoint function is wrapped


def _wrap(layer: Any) -> None:
    func = layer.__dict__.get(_FUNC)
    if func is not None and not isinstance(func, TailSkippingCheckpoint):
        layer.__dict__[_FUNC] = TailSkippingCheckpoint(func)


def track_layers(holder: Any, layers: Sequence[Any]) -> None:
    """Wrap the checkpoint functions of `layers` (decoder layers whose tail dpo_fast patched) and remember
    them on `holder` (the causal LM), so `rewrap_layers` can wrap a function installed later."""
    holder.__dict__[_LAYERS] = list(layers)
    rewrap_layers(holder)


def rewrap_layers(holder: Any) -> None:
    """Wrap the checkpoint function of each tracked layer that is not wrapped (cheap: one dict read per layer).

    Checkpointing enabled after `patch()` (TRL's trainer does it in its constructor) sets a new function
    on every layer; the patched causal LM's forward calls this first, so the next step skips again.
    """
    for layer in holder.__dict__.get(_LAYERS, ()):
        _wrap(layer)


def untrack_layers(holder: Any) -> None:
    """Undo `track_layers`: each tracked layer gets back the function that was wrapped."""
    for layer in holder.__dict__.pop(_LAYERS, ()):
        func = layer.__dict__.get(_FUNC)
        if isinstance(func, TailSkippingCheckpoint):
            layer.__dict__[_FUNC] = func.inner
