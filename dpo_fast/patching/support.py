"""What `dpo_fast.patch` supports, and one place that says so when a model falls outside it.

Supported: the transformers causal LMs of `dpo_fast.families` (Llama, Mistral, Qwen2, Qwen3 dense,
Gemma, Gemma 2, Gemma 3 text, Phi-3 / Phi-4), tied or untied embeddings, bare or wrapped by a peft
`PeftModel` with LoRA adapters, in fp32/bf16/fp16, with base weights unquantized or quantized by
bitsandbytes (4-bit nf4/fp4, with or without double quantization, or 8-bit). The LM head itself must
be a plain (unquantized, LoRA-free) linear layer, which is what transformers and peft produce by
default for these models, and the logits must be what the fused head computes: no logit scaling, and
final-logit softcapping only where the model's own forward applies it (Gemma 2 and 3).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from ..errors import UserError
from ..families import FAMILIES, family_of, text_config
from ..state import unwrap_parallel

SUPPORTED_MODEL_TYPES: Tuple[str, ...] = tuple(f.model_type for f in FAMILIES)
SUPPORTED_CLASSES: Tuple[str, ...] = tuple(f.causal_lm for f in FAMILIES)
SUPPORTED_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_QUANTIZATION = "none, bitsandbytes 4-bit (nf4/fp4, optional double quant), bitsandbytes 8-bit"
SUPPORTED_PEFT = "none, or a peft PeftModel with LoRA adapters"

SUPPORTED_SUMMARY = (
    f"dpo_fast supports causal LMs {', '.join(SUPPORTED_CLASSES)} (config.model_type in "
    f"{list(SUPPORTED_MODEL_TYPES)}), bare or wrapped by peft ({SUPPORTED_PEFT}); dtypes fp32/bf16/fp16; "
    f"base-weight quantization: {SUPPORTED_QUANTIZATION}; with gradient checkpointing on or off; "
    "with an unquantized, LoRA-free lm_head and no logit scaling (final-logit softcapping on Gemma 2 / 3 only)."
)

# Config attributes that change the logits in ways the fused head does not reproduce (softcapping is
# reproduced for the families whose forward applies it: `dpo_fast.families.final_logit_softcap`).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


class UnsupportedModelError(TypeError, UserError):
    """Raised for a model `dpo_fast.patch` cannot handle; the message lists what is supported.

    A TypeError (the model is of the wrong kind) and a `UserError` (the command line prints it as one line).
    """


def _unsupported(reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{reason}. {SUPPORTED_SUMMARY}")


def is_peft_model(model: Any) -> bool:
    """True for a peft `PeftModel`."""
    return isinstance(model, PeftModel)


def unwrap_causal_lm(model: Any) -> Tuple[nn.Module, Optional[nn.Module]]:
    """Return (causal_lm, peft_model_or_None) for a bare causal LM or a PeftModel around one, inside any
    data-parallel wrapper (DDP, FSDP1, torch.compile; see `dpo_fast.state.unwrap_parallel`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}. {SUPPORTED_SUMMARY}")
    model = unwrap_parallel(model)
    if is_peft_model(model):
        return model.get_base_model(), model
    return model, None


def _check_peft(peft_model: nn.Module) -> None:
    for name, cfg in peft_model.peft_config.items():
        if not isinstance(cfg, LoraConfig):
            raise _unsupported(f"peft adapter {name!r} is a {type(cfg).__name__}, not LoRA")


def _check_quantization(causal_lm: nn.Module) -> None:
    qcfg = getattr(causal_lm.config, "quantization_config", None)
    if qcfg is None:
        return
    method = getattr(qcfg, "quant_method", None)
    if method is None and isinstance(qcfg, dict):
        method = qcfg.get("quant_method")
    method = getattr(method, "value", method)
    if method != "bitsandbytes":
        raise _unsupported(f"quantization method {method!r} is not supported")


def check_lm_head(causal_lm: nn.Module) -> nn.Linear:
    """Return the LM head if it is a plain linear layer the fused head can read, else raise."""
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise _unsupported(f"{type(causal_lm).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise _unsupported("LoRA on lm_head is not supported (leave lm_head out of target_modules)")
    if type(head) is not nn.Linear:
        raise _unsupported(f"lm_head is a {type(head).__name__}; it must be an unquantized torch.nn.Linear")
    if head.weight.dtype not in SUPPORTED_DTYPES:
        raise _unsupported(f"lm_head weight dtype {head.weight.dtype} is not supported")
    return head


def architecture_problem(model_type: Any, class_name: Optional[str]) -> Optional[str]:
    """Why a model of this config.model_type / class is outside dpo_fast's families, or None when it is in."""
    if model_type in SUPPORTED_MODEL_TYPES and (class_name is None or class_name in SUPPORTED_CLASSES):
        return None
    return f"unsupported architecture {class_name or '?'} (model_type={model_type!r})"


def check_config_supported(config: Any, architectures: Optional[Sequence[str]] = None) -> None:
    """Raise UnsupportedModelError when a model config (a PretrainedConfig or its dict) names an
    architecture outside `FAMILIES`; checks what loading the weights would only tell later."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    archs = architectures if architectures is not None else (get("architectures") or [])
    problem = architecture_problem(get("model_type"), archs[0] if archs else None)
    if problem:
        raise _unsupported(problem)


def check_supported(model: Any) -> Tuple[nn.Module, Optional[nn.Module]]:
    """Validate `model` and return (causal_lm, peft_model_or_None); raise UnsupportedModelError otherwise."""
    causal_lm, peft_model = unwrap_causal_lm(model)
    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = type(causal_lm).__name__
    family = family_of(causal_lm)
    if family is None:
        raise _unsupported(f"unsupported architecture {cls} (model_type={model_type!r})")
    text = text_config(config)
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(text, attr, None)
        if attr == "final_logit_softcapping" and family.final_logit_softcap:
            continue  # the fused head caps the logits as the model's forward does
        if value not in (None, 1, 1.0):
            raise _unsupported(f"config.{attr}={value!r} changes the logits")
    if getattr(text, "use_bidirectional_attention", False):
        raise _unsupported("config.use_bidirectional_attention=True: the model is not a causal LM")
    if peft_model is not None:
        _check_peft(peft_model)
    _check_quantization(causal_lm)
    check_lm_head(causal_lm)
    return causal_lm, peft_model
