"""The decoder layers' checkpoint functions as `patch()` set them, kept that way while trainers re-enable checkpointing.

Each transformers decoder layer checkpoints through its own ``_gradient_checkpointing_func``, which
``gradient_checkpointing_enable()`` replaces on every layer. Trainers call it after `patch()`: the HF
Trainer when training starts, and TRL's DPOTrainer around every reference pass (it turns checkpointing
off and on again). So `patch()` records what it wants here, and a forward pre-hook on the decoder stack puts it
back, before every call, on the layers that lost it (`refresh`: one dict read per layer):

* offloaded checkpointing (``offload_checkpointing=True``): dpo_fast.ops.offload_checkpoint;
* the recompute tail skip (``recompute_tail_skip=True``): the function in place, wrapped in
  `TailSkippingCheckpoint`.

The tail skip. Gradient checkpointing runs each decoder layer twice: in forward, keeping only its
input, and again in backward (the recompute), to rebuild the tensors its ops saved for backward. The
recompute's output is thrown away: the checkpoint back-propagates through it but never reads its
values. In a Llama-family layer the last projection, the MLP's down_proj, feeds only the residual add
that makes that output, and its backward needs its input, not its output. So in the recompute the
down_proj GEMM computes values nobody reads: 27% of a Llama-3.1-8B layer's linear FLOPs, about 7% of the
body's GEMM work in a checkpointed DPO step (reference forward, policy forward, recompute, backward).
`TailSkippingCheckpoint` hands the wrapped checkpoint a layer function that counts its calls: the first
is the forward, every later one is a recompute, and during those `recomputing()` is True. dpo_fast's
patched down_proj (marked as its layer's tail by `dpo_fast.patching.body`) then runs its LoRA op with
``output=False``: it saves what backward needs and returns an uninitialized tensor. The flag belongs to
the call, not the layer: a layer run again inside some outer recompute (an outer checkpoint around
several layers) is a first call of its own checkpoint, whose output is used, and the flag is False there.

With offloaded checkpointing the attention block's last projection, o_proj, is skipped too. Its output
only feeds the residual add that makes the mid-layer residual h (the MLP's input and residual). The
patched post_attention_layernorm parks h in host memory with the layer input during the forward
(dpo_fast.ops.offload_checkpoint.park), and in the recompute takes that h in place of its own (`mid_residual`),
whose o_proj term was skipped; the gradient goes on through the recompute's residual add. The recompute
then computes every value backward reads exactly as before, o_proj's GEMMs aside: another 8% of a
Llama-3.1-8B layer's linear FLOPs, for twice the host memory and PCIe copies of the offload alone. Without
offloading, keeping h would cost as much GPU memory as the checkpoints themselves, so it is not done.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..ops.offload_checkpoint import offloaded_checkpoint, park, parked
from ..state import RECOMPUTING, recomputing

__all__ = ["TailSkippingCheckpoint", "recomputing", "unwrapped", "install", "refresh", "uninstall", "END", "MID",
           "output_unread", "mid_residual"]

#: how dpo_fast.patching.body marks a patched projection whose recompute output may go unread:
END = "end"   # the layer's last one (down_proj): always, in a recompute
MID = "mid"   # the attention block's last one (o_proj): when the layer's forward parked the mid residual

def output_unread(tail: Optional[str]) -> bool:
    """True when a projection marked `tail` (END, MID or None) runs in a recompute that never reads its output."""
    if tail is None or not RECOMPUTING.get():
        return False
    return tail == END or parked() is not None


class _Substitute(torch.autograd.Function):
    """`value` (what the forward computed) in place of `recomputed` (unread: o_proj's term may be missing from
    it); the gradient goes to `recomputed`, through the recompute's graph."""

    @staticmethod
    def forward(ctx, recomputed: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def mid_residual(hidden: torch.Tensor) -> torch.Tensor:
    """The mid-layer residual as the post-attention norm should read it: in an offloaded layer's forward it is
    parked; in that layer's recompute, the parked one replaces `hidden` (whose o_proj term was skipped)."""
    value = parked()
    if value is None:
        park(hidden)
        return hidden
    return _Substitute.apply(hidden, value)


class _LayerCall:
    """The layer function as the checkpoint sees it: the first call is the forward, later ones recompute."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        token = RECOMPUTING.set(self.calls > 1)
        try:
            return self.function(*args, **kwargs)
        finally:
            RECOMPUTING.reset(token)


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
_RECORD = "_dpo_fast_checkpointing"       # on the decoder stack: {"offload": [layers], "tail_skip": [layers], ...}


def _decoder_stack(holder: Any) -> Any:
    """The decoder stack (e.g. LlamaModel) of a causal LM: every forward of the model goes through it."""
    return getattr(holder, holder.base_model_prefix)


def _refresh_hook(stack: Any, args: Any) -> None:
    """Forward pre-hook on the decoder stack: `refresh` before every call, whoever makes it."""
    _refresh_record(stack.__dict__.get(_RECORD))


def install(holder: Any, *, offload: Sequence[Any] = (), tail_skip: Sequence[Any] = ()) -> None:
    """Record which layers of `holder` (the causal LM) get offloaded checkpointing and which the tail skip, set
    their functions now, and put them back before every later call of the decoder stack."""
    if offload or tail_skip:
        stack = _decoder_stack(holder)
        # the hook's id, not its handle: a deep copy of the model must remove its own hook, and a handle
        # would keep pointing at the original's hook table
        hook_id = stack.register_forward_pre_hook(_refresh_hook).id
        stack.__dict__[_RECORD] = {"offload": list(offload), "tail_skip": list(tail_skip), "hook_id": hook_id}
        refresh(holder)


def refresh(holder: Any) -> None:
    """Put the recorded checkpoint functions back on layers whose function was replaced since (cheap)."""
    _refresh_record(_decoder_stack(holder).__dict__.get(_RECORD))


def _refresh_record(record: Optional[dict]) -> None:
    if record is None:
        return
    for layer in record["offload"]:
        if unwrapped(layer.__dict__.get(_FUNC)) is not offloaded_checkpoint:
            layer.__dict__[_FUNC] = offloaded_checkpoint  # the tail skip re-wraps it below
    for layer in record["tail_skip"]:
        func = layer.__dict__.get(_FUNC)
        if func is not None and not isinstance(func, TailSkippingCheckpoint):
            layer.__dict__[_FUNC] = TailSkippingCheckpoint(func)


def uninstall(holder: Any) -> None:
    """Forget the record and remove the hook; each tail-skip layer gets back the function its wrapper holds."""
    stack = _decoder_stack(holder)
    record = stack.__dict__.pop(_RECORD, None)
    if record is None:
        return
    stack._forward_pre_hooks.pop(record["hook_id"], None)
    for layer in record["tail_skip"]:
        func = layer.__dict__.get(_FUNC)
        if isinstance(func, TailSkippingCheckpoint):
            layer.__dict__[_FUNC] = func.inner
