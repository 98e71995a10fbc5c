"""Patch state shared across layers: the context variables and per-model records `patch` relies on.

Body patching, the checkpoint wrappers, the offloaded checkpoint and the reference pass talk to each
other through a few flags that belong to the current call, not to a module: context variables, so
that a flag set for one forward (the reference pass, a layer's recompute) never leaks into another
thread or into a call outside the block. They all live here, in a leaf module with no imports from
the rest of the package, so that every layer can import it at module level.

Per-model records are plain dicts stored in the instance ``__dict__`` of the causal LM (the model
inside a peft wrapper), under the keys below: they travel with ``copy.deepcopy`` and never touch
parameters, buffers or state-dict keys.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import torch

# ------------------------------------------------------------------------------------------ per call
#: inside a patched attention module's forward: use dpo_fast's rotary kernel (the module's own choice)
ROPE_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("dpo_fast_rope_active", default=False)
#: every patched LoRA layer runs its base layer only (the reference pass with adapters disabled)
LORA_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("dpo_fast_lora_off", default=False)
#: a decoder layer is being recomputed by its checkpoint (its tail projections' outputs go unread)
RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("dpo_fast_recomputing", default=False)
#: the parked inputs of the layer whose offloaded checkpoint forward is running (`park` adds to them)
OFFLOAD_FORWARD: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar("dpo_fast_offload_forward",
                                                                                default=None)
#: during an offloaded layer's recompute: the tensor its forward parked, back on the device
OFFLOAD_RELOADED: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar(
    "dpo_fast_offload_reloaded", default=None)

# ------------------------------------------------------------------------------------------ per model
#: on the causal LM: the fused head's record (requested outputs, the forward it replaced, the body options)
HEAD_RECORD = "_dpo_fast_patch"
#: on the causal LM: what the body patch did (counts per switch, rotary owners, checkpointing settings)
BODY_RECORD = "_dpo_fast_body"
#: marks the forward function dpo_fast installs on a causal LM (`head_patched`)
FUSED_FORWARD_MARK = "_dpo_fast_fused"
#: marks the bound forward functions dpo_fast installs on LoRA layers (`is_patched_lora`)
LORA_FORWARD_MARK = "_dpo_fast_lora_forward"


@contextlib.contextmanager
def lora_bypassed() -> Iterator[None]:
    """For the block, every LoRA layer dpo_fast patched runs its base layer only (adapters disabled).

    O(1), where peft's `disable_adapter()` walks and toggles every layer and reports the model's status,
    during which the GPU waits. Only valid when every adapter layer of the model is a patched, unmerged
    LoRA layer: `dpo_fast.patching.reference` checks that.
    """
    token = LORA_OFF.set(True)
    try:
        yield
    finally:
        LORA_OFF.reset(token)


def recomputing() -> bool:
    """True while a decoder layer wrapped by the recompute tail skip is being recomputed."""
    return RECOMPUTING.get()


def is_patched_lora(module: torch.nn.Module) -> bool:
    """True for a peft LoRA layer whose forward is dpo_fast's (so `lora_bypassed` disables its adapter).

    Looks under accelerate's hooks too (they keep the wrapped forward in ``_old_forward``).
    """
    for attr in ("_old_forward", "forward"):
        func = getattr(module.__dict__.get(attr), "__func__", None)
        if getattr(func, LORA_FORWARD_MARK, False):
            return True
    return False


def _wrapper_types() -> tuple:
    """torch's module wrappers that hold the model as ``.module``: DDP, DataParallel, FSDP1."""
    types: list = [torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel]
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    return tuple(types)


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside data-parallel wrappers (DDP, DataParallel, FSDP1: ``.module``) and torch.compile
    (``._orig_mod``). FSDP2's `fully_shard` changes a module in place: it is returned as it is."""
    wrappers = _wrapper_types()
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif "_orig_mod" in model._modules:
            model = model._modules["_orig_mod"]
        else:
            return model


def is_wrapped_for_data_parallel(model: torch.nn.Module) -> bool:
    """True when gradients computed through `model` are synchronised across processes: a DDP or FSDP1 wrapper
    (possibly under torch.compile), or a module sharded by FSDP2's `fully_shard`."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return True
    inner = model._modules.get("_orig_mod", model)
    return isinstance(inner, _wrapper_types()) and not isinstance(inner, torch.nn.DataParallel)


def record_holder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the per-model records: the causal LM, inside any data-parallel wrapper and
    peft wrapper."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_parallel(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def head_patched(model: torch.nn.Module) -> bool:
    """True if `model` (or the causal LM inside a peft wrapper) carries dpo_fast's fused head."""
    holder = record_holder(model)
    func = getattr(holder.__dict__.get("forward"), "__func__", None)
    return HEAD_RECORD in holder.__dict__ and getattr(func, FUSED_FORWARD_MARK, False)


def body_record(model: torch.nn.Module) -> Optional[dict]:
    """The body patch's record (see BODY_RECORD), or None when the body is not patched."""
    return record_holder(model).__dict__.get(BODY_RECORD)


def prefix_sharing_enabled(model: torch.nn.Module) -> bool:
    """True when the body patch let the attention modules of `model` take packed pairs."""
    record = body_record(model)
    return bool(record and record["counts"].get("prefix_sharing"))
