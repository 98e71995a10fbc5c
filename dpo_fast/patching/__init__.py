"""All model surgery lives here: `patch`, `unpatch`, `is_patched`, `patch_report`, `add_reference_adapter`.

`patch` installs, on the causal LM (the one inside a PeftModel, like TRL does), a forward that keeps
the original behaviour for ordinary calls and adds TRL 1.x's fused-head call,
`model(..., labels=labels, fused_lm_head=True) -> FusedCausalLMOutput(log_probs=...)`, backed by
dpo_fast's fused log-prob op (`dpo_fast.patching.head`). With `body=True` it also swaps in dpo_fast's
body kernels (`dpo_fast.patching.body`). Nothing is patched on import.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .. import state
from .body import patch_body, unpatch_body
from .head import HEAD_OUTPUTS, FusedCausalLMOutput, make_fused_forward, validate_outputs
from .options import BODY_OPTIONS, BodyOptions
from .reference import REF_ADAPTER_NAME, reference_model
from .support import SUPPORTED_SUMMARY, UnsupportedModelError, check_supported, is_peft_model, unwrap_causal_lm

__all__ = [
    "patch", "unpatch", "is_patched", "patch_report", "PatchReport", "add_reference_adapter", "reference_model",
    "FusedCausalLMOutput", "HEAD_OUTPUTS", "UnsupportedModelError", "SUPPORTED_SUMMARY", "BODY_OPTIONS",
    "BodyOptions",
]


@dataclass(frozen=True)
class PatchReport:
    """What `patch` did to a model: the head outputs it serves, the body options in effect (None: the body
    is not patched) and how many modules each body switch changed (0 for a switch that found nothing)."""

    outputs: Tuple[str, ...]
    body: Optional[BodyOptions]
    counts: Dict[str, int] = field(default_factory=dict)


def is_patched(model: nn.Module) -> bool:
    """True if `model` (or the causal LM inside a PeftModel) carries dpo_fast's fused head."""
    unwrap_causal_lm(model)  # type check
    return state.head_patched(model)


def patch_report(model: nn.Module) -> Optional[PatchReport]:
    """What `patch` did to `model`, or None when it is not patched."""
    if not is_patched(model):
        return None
    record = state.record_holder(model).__dict__[state.HEAD_RECORD]
    body = state.body_record(model)
    return PatchReport(outputs=record["outputs"], body=body["options"] if body else None,
                       counts=dict(body["counts"]) if body else {})


def patch(model: nn.Module, *, outputs: Sequence[str] = ("log_probs",), body: Optional[bool] = None,
          **body_options: Any) -> nn.Module:
    """Patch `model` in place for fast DPO and return it.

    Args:
        model: a supported causal LM (see `dpo_fast.patching.support`), bare or inside a peft PeftModel.
        outputs: per-token fields a fused call returns besides `log_probs` (TRL's names, from
            `HEAD_OUTPUTS`); extra fields are metrics computed without gradient in the same sweep.
        body: also patch the decoder body with dpo_fast's kernels (default True on a first patch).
            ``body=False, prefix_sharing=True`` patches only the attention modules, for prefix sharing.
        **body_options: the switches of `BodyOptions` (`rms_norm`, `rope`, `swiglu`, `qlora_linear`,
            `nf4_dequant`, `offload_checkpointing`, `prefix_sharing`, `recompute_tail_skip`). With
            ``prefix_sharing=True``, `compute_dpo_loss` and fused calls run each pair as one row
            [prompt | chosen | rejected], so the prompt goes through the model once (same results).

    Patching a patched model again adds the requested outputs to those already served and applies the
    call's options on top of the ones in effect (the body is patched again when they change);
    ``body=False`` then removes the body patch. `patch_report(model)` tells what is in effect.
    """
    BodyOptions.check_names(body_options, "patch()")
    wanted = validate_outputs(outputs)
    causal_lm, _ = check_supported(model)
    record = causal_lm.__dict__.get(state.HEAD_RECORD)
    if record is not None and state.head_patched(model):
        record["outputs"] = tuple(dict.fromkeys(record["outputs"] + wanted))
    else:
        # Remember the instance forward we replace (e.g. TRL's own fused head), if any, to restore it.
        previous = causal_lm.__dict__.get("forward")
        record = {"outputs": tuple(dict.fromkeys(("log_probs",) + wanted)), "had_instance_forward": previous is not None,
                  "previous_forward": previous}
        causal_lm.__dict__[state.HEAD_RECORD] = record
        causal_lm.forward = make_fused_forward(causal_lm)
    current = state.body_record(model)
    current_options = current["options"] if current else None
    if body is False and body_options.get("prefix_sharing"):
        target: Optional[BodyOptions] = BodyOptions.only_prefix_sharing()  # prefix sharing needs only the attention
    elif body is False:
        target = None
    elif body is None and current_options is not None and not body_options:
        target = current_options
    else:
        target = BodyOptions.build("patch()", current_options, **body_options)
    if target != current_options:
        if target is None:
            unpatch_body(model)
        else:
            patch_body(model, target)  # undoes the previous body patch first
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: restore the forward that was there before and the original body modules."""
    causal_lm, _ = unwrap_causal_lm(model)
    record = causal_lm.__dict__.get(state.HEAD_RECORD)
    if record is None:
        return model
    if state.body_record(model) is not None:
        unpatch_body(model)
    current = causal_lm.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), state.FUSED_FORWARD_MARK, False):
        if record["had_instance_forward"]:
            causal_lm.forward = record["previous_forward"]
        else:
            del causal_lm.forward
    else:
        warnings.warn("model.forward was replaced after dpo_fast.patch; leaving the newer forward in place",
                      stacklevel=2)
    del causal_lm.__dict__[state.HEAD_RECORD]
    return model


def add_reference_adapter(model: nn.Module, source_adapter: str = "default", name: str = REF_ADAPTER_NAME
                          ) -> nn.Module:
    """Add a frozen copy of adapter `source_adapter`'s current weights as adapter `name` (default "ref").

    DPO that continues training an existing adapter (an SFT LoRA, say) then uses that copy as the
    reference (see dpo_fast.patching.reference). Only the adapter's weights are copied, never the base.
    The active adapter and the trainable parameters are left as they were.
    """
    if not is_peft_model(model):
        raise TypeError(f"model must be a peft PeftModel to hold a reference adapter, got {type(model).__name__}")
    if source_adapter not in model.peft_config:
        raise ValueError(f"source_adapter: no adapter {source_adapter!r}; the model has {sorted(model.peft_config)}")
    if name in model.peft_config:
        raise ValueError(f"name: the model already has an adapter {name!r}")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    active = model.active_adapter
    model.add_adapter(name, model.peft_config[source_adapter])
    weights = get_peft_model_state_dict(model, adapter_name=source_adapter)
    set_peft_model_state_dict(model, {k: v.detach().clone() for k, v in weights.items()}, adapter_name=name)
    model.set_adapter(active)
    marker = f".{name}."
    for n, p in model.named_parameters():
        p.requires_grad_(False if marker in n else grads.get(n, p.requires_grad))
    return model
