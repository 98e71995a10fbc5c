"""Which network is the DPO reference, and running it cheaply.

The rule is TRL 1.x's, for a peft model with no separate reference model: if the model has an
adapter named "ref", the reference is the model with that adapter active; otherwise it is the model
with adapters disabled (the base model). A fresh adapter therefore trains against the base model,
and continued training of an existing adapter trains against a frozen copy of its starting weights
(`dpo_fast.add_reference_adapter`). A separate `ref_model`, or an explicit `ref_adapter_name`,
overrides the rule. The reference pass runs under `torch.no_grad`, with dropout off, with
gradient checkpointing off, and never copies the base weights. With every adapter layer patched by
dpo_fast (`patch(model)`'s default), disabling the adapters is a context variable the patched layers
read, not peft's per-layer toggle and status report.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..state import is_patched_lora, lora_bypassed, unwrap_parallel
from .support import is_peft_model

#: peft's adapter layers and wrappers: what "adapters disabled" must switch off
_ADAPTER_TYPES = (BaseTunerLayer, AuxiliaryTrainingWrapper)

REF_ADAPTER_NAME = "ref"


@dataclass
class _Scan:
    """What one walk over a model's modules found for the reference pass."""

    checkpointed: List[nn.Module] = field(default_factory=list)  # gradient_checkpointing is True
    dropouts: List[nn.Module] = field(default_factory=list)      # dropout modules in training mode
    adapters: int = 0                                            # peft adapter layers / wrappers
    bypassable: bool = True                                      # every one is a patched, unmerged LoRA layer


def _scan(model: nn.Module) -> _Scan:
    """One pass over `model.modules()` (an 8B peft model has thousands: walk them once per reference pass)."""
    found = _Scan()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            found.checkpointed.append(m)
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training:
            found.dropouts.append(m)
        if isinstance(m, _ADAPTER_TYPES):
            found.adapters += 1
            if not (is_patched_lora(m) and not getattr(m, "merged", True)):
                found.bypassable = False
    return found


@contextlib.contextmanager
def _reference_setup(found: _Scan) -> Iterator[None]:
    """Checkpointing flags and dropout modules off for the block (as found by `_scan`), then restored.

    Only dropout modules are switched: switching the whole model to eval would change other layers'
    kernels (bitsandbytes' CPU backend, for one, repacks 4-bit weights for bf16 inference in eval mode).
    """
    for m in found.checkpointed:
        m.gradient_checkpointing = False
    for m in found.dropouts:
        m.training = False
    try:
        yield
    finally:
        for m in found.checkpointed:
            m.gradient_checkpointing = True
        for m in found.dropouts:
            m.training = True


@contextlib.contextmanager
def active_adapter(peft_model: nn.Module, name: str) -> Iterator[None]:
    """Activate adapter `name` for the block, restoring the previous active adapter and all requires_grad flags."""
    if name not in peft_model.peft_config:
        raise ValueError(
            f"ref_adapter_name: the model has no adapter {name!r}; it has {sorted(peft_model.peft_config)}")
    grads = [(p, p.requires_grad) for p in peft_model.parameters()]
    previous = peft_model.active_adapter
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for p, flag in grads:
            p.requires_grad_(flag)


def describe_reference(model: nn.Module, ref_model: Optional[nn.Module] = None,
                       ref_adapter_name: Optional[str] = None) -> str:
    """Which reference `reference_model` would use, in words: 'ref_model', 'adapter:<name>' or 'adapters_disabled'."""
    if ref_model is not None:
        return "ref_model"
    model = unwrap_parallel(model)
    if not is_peft_model(model):
        raise ValueError(
            "ref_model: the policy is not a peft model, so there is no adapter to disable and no 'ref' adapter; "
            "pass ref_model=..., or precomputed ref_chosen_logps/ref_rejected_logps in the batch")
    if ref_adapter_name is not None:
        return f"adapter:{ref_adapter_name}"
    if REF_ADAPTER_NAME in model.peft_config:
        return f"adapter:{REF_ADAPTER_NAME}"
    return "adapters_disabled"


@contextlib.contextmanager
def reference_model(model: nn.Module, *, ref_model: Optional[nn.Module] = None,
                    ref_adapter_name: Optional[str] = None) -> Iterator[nn.Module]:
    """Yield the module to run for the reference pass, set up as the reference (see the module docstring).

    Inside the block gradients, dropout and gradient checkpointing are off;
    all of it is restored on exit. A model inside a data-parallel wrapper is yielded with its wrapper, so
    the reference pass runs through it too (FSDP gathers the parameters it needs).
    """
    kind = describe_reference(model, ref_model, ref_adapter_name)
    target = ref_model if ref_model is not None else model
    found = _scan(target)
    model = unwrap_parallel(model)  # the peft model, for its adapter switches
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_reference_setup(found))
        if kind.startswith("adapter:"):
            stack.enter_context(active_adapter(model, kind.split(":", 1)[1]))
        elif kind == "adapters_disabled":
            # patched LoRA layers skip their adapter through a context variable; anything else through peft
            bypass = found.bypassable and found.adapters > 0 and not getattr(model, "_adapters_disabled", False)
            stack.enter_context(lora_bypassed() if bypass else model.disable_adapter())
        yield target
