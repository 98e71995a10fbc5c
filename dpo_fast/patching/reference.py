"""Which network is the DPO reference, and running it cheaply.

The rule is TRL 1.x's, for a peft model with no separate reference model: if the model has an
adapter named "ref", the reference is the model with that adapter active; otherwise it is the model
with adapters disabled (the base model). A fresh adapter therefore trains against the base model,
and continued training of an existing adapter trains against a frozen copy of its starting weights
(`dpo_fast.add_reference_adapter`). A separate `ref_model`, or an explicit `ref_adapter_name`,
overrides the rule. The reference pass runs under `torch.no_grad`, with dropout off, with
gradient checkpointing off, and never copies the base weights.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from torch import nn

from .support import is_peft_model

REF_ADAPTER_NAME = "ref"


@contextlib.contextmanager
def gradient_checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Turn off every module's `gradient_checkpointing` flag for the block, then restore it exactly."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Put the dropout modules (LoRA's included) in eval mode for the block, then restore them.

    Only dropout modules are switched: switching the whole model to eval would change other layers'
    kernels (bitsandbytes' CPU backend, for one, repacks 4-bit weights for bf16 inference in eval mode).
    """
    switched: List[nn.Module] = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
                                 and m.training]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
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
    all of it is restored on exit.
    """
    kind = describe_reference(model, ref_model, ref_adapter_name)
    target = ref_model if ref_model is not None else model
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(gradient_checkpointing_off(target))
        stack.enter_context(dropout_off(target))
        if kind.startswith("adapter:"):
            stack.enter_context(active_adapter(model, kind.split(":", 1)[1]))
        elif kind == "adapters_disabled":
            stack.enter_context(model.disable_adapter())
        yield target
