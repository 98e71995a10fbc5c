"""All model surgery lives here: `patch`, `unpatch`, `is_patched`, `add_reference_adapter`.

`patch` installs, on the causal LM (the one inside a PeftModel, like TRL does), a forward that keeps
the original behaviour for ordinary calls and adds TRL 1.x's fused-head call,
`model(..., labels=labels, fused_lm_head=True) -> FusedCausalLMOutput(log_probs=...)`, backed by
dpo_fast's fused log-prob op. With `body=True` it also swaps in dpo_fast's Llama body kernels
(dpo_fast.patching.body) when that module is available. Nothing is patched on import.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Optional, Sequence

from torch import nn

from .head import HEAD_OUTPUTS, FusedCausalLMOutput, make_fused_forward, validate_outputs
from .reference import REF_ADAPTER_NAME, reference_model
from .support import SUPPORTED_SUMMARY, UnsupportedModelError, check_supported, is_peft_model, unwrap_causal_lm

__all__ = [
    "patch", "unpatch", "is_patched", "add_reference_adapter", "reference_model", "FusedCausalLMOutput",
    "HEAD_OUTPUTS", "UnsupportedModelError", "SUPPORTED_SUMMARY", "BODY_OPTIONS",
]

#: Options forwarded to dpo_fast.patching.body.patch_body, with their defaults.
BODY_OPTIONS = {"rms_norm": True, "rope": True, "swiglu": True, "qlora_linear": True, "nf4_dequant": True,
                "offload_checkpointing": False, "prefix_sharing": False, "recompute_tail_skip": True}
_STATE = "_dpo_fast_patch"


def _body_module() -> Optional[Any]:
    """dpo_fast.patching.body if it is present (it is optional for the head and for TRL users)."""
    try:
        return importlib.import_module("dpo_fast.patching.body")
    except ModuleNotFoundError as exc:
        if exc.name != "dpo_fast.patching.body":
            raise
        return None


def is_patched(model: nn.Module) -> bool:
    """True if `model` (or the causal LM inside a PeftModel) carries dpo_fast's fused head."""
    causal_lm, _ = unwrap_causal_lm(model)
    state = causal_lm.__dict__.get(_STATE)
    fwd = causal_lm.__dict__.get("forward")
    return state is not None and getattr(getattr(fwd, "__func__", None), "_dpo_fast_fused", False)


def patch(model: nn.Module, *, outputs: Sequence[str] = ("log_probs",), body: bool = True, **body_options: Any
          ) -> nn.Module:
    """Patch `model` in place for fast DPO and return it.

    Args:
        model: a supported causal LM (see `dpo_fast.patching.support`), bare or inside a peft PeftModel.
        outputs: per-token fields a fused call returns besides `log_probs` (TRL's names, from
            `HEAD_OUTPUTS`); extra fields are metrics computed without gradient in the same sweep.
        body: also patch the decoder body with dpo_fast's kernels, when dpo_fast.patching.body exists.
            ``body=False, prefix_sharing=True`` patches only the attention modules, for prefix sharing.
        **body_options: passed to `patch_body` (`rms_norm`, `rope`, `swiglu`, `qlora_linear`, `nf4_dequant`,
            `offload_checkpointing`, `prefix_sharing`, `recompute_tail_skip`). With ``prefix_sharing=True``,
            `compute_dpo_loss` runs each pair as one row [prompt | chosen | rejected], so the prompt
            goes through the model once instead of twice (same loss and gradients).

    Patching again is harmless: the requested outputs are added to those already served.
    """
    unknown = sorted(set(body_options) - set(BODY_OPTIONS))
    if unknown:
        raise TypeError(f"patch() got unknown option(s) {unknown}; body options are {sorted(BODY_OPTIONS)}")
    wanted = validate_outputs(outputs)
    causal_lm, _ = check_supported(model)
    state = causal_lm.__dict__.get(_STATE)
    if state is not None and is_patched(model):
        state["outputs"] = tuple(dict.fromkeys(state["outputs"] + wanted))
    else:
        # Remember the instance forward we replace (e.g. TRL's own fused head), if any, to restore it.
        previous = causal_lm.__dict__.get("forward")
        state = {"outputs": tuple(dict.fromkeys(("log_probs",) + wanted)), "had_instance_forward": previous is not None,
                 "previous_forward": previous, "body": False}
        setattr(causal_lm, _STATE, state)
        causal_lm.forward = make_fused_forward(causal_lm)
    if not body and body_options.get("prefix_sharing"):
        # prefix sharing needs only the attention modules: patch them alone, every kernel off
        body, body_options = True, {**{k: False for k in BODY_OPTIONS}, "prefix_sharing": True}
    if body and not state["body"]:
        module = _body_module()
        if module is None:
            warnings.warn("dpo_fast.patching.body is not available: only the fused head was patched", stacklevel=2)
        else:
            module.patch_body(model, **{**BODY_OPTIONS, **body_options})
            state["body"] = True
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: restore the forward that was there before and the original body modules."""
    causal_lm, _ = unwrap_causal_lm(model)
    state = causal_lm.__dict__.get(_STATE)
    if state is None:
        return model
    if state["body"]:
        _body_module().unpatch_body(model)
    current = causal_lm.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), "_dpo_fast_fused", False):
        if state["had_instance_forward"]:
            causal_lm.forward = state["previous_forward"]
        else:
            del causal_lm.forward
    else:
        warnings.warn("model.forward was replaced after dpo_fast.patch; leaving the newer forward in place",
                      stacklevel=2)
    delattr(causal_lm, _STATE)
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
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

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
