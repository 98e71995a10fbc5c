"""The model families `dpo_fast.patch` supports, and what each one's modeling code does that dpo_fast must reproduce.

One table, read by the support check (`dpo_fast.patching.support`), the body patch
(`dpo_fast.patching.body`: which module classes to swap and how), the fused head (`dpo_fast.forward`:
final-logit softcapping) and the packing policy (attention softcapping, length-dependent rotary
scaling). A leaf module: it imports nothing from dpo_fast, so every layer can read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class Family:
    """One transformers architecture family.

    name: as the README's support table says it. prefix: the class-name prefix of its modules
    (``{prefix}ForCausalLM``, ``{prefix}RMSNorm``, ``{prefix}MLP``, ``{prefix}Attention``,
    ``{prefix}DecoderLayer``). model_type: its causal LM's ``config.model_type``.
    gemma_norm: its RMSNorm scales by ``1 + w`` in fp32 and casts once (GemmaRMSNorm), not Llama's
    ``w * x_normalised.to(dtype)``.
    fused_gate_up: its MLP has one ``gate_up_proj`` whose output the forward chunks into gate and up (Phi-3).
    tail_skip: in its decoder layer the MLP's down_proj output, and the attention's o_proj output, feed only
    the residual adds, so a checkpoint recompute may skip them (`dpo_fast.patching.checkpointing`). Gemma 2
    and 3 normalise both outputs first (post-attention / post-feedforward norms, whose backward reads them).
    final_logit_softcap: its causal LM's forward caps the logits, ``c * tanh(z / c)`` with
    ``c = config.final_logit_softcapping`` (when set).
    """

    name: str
    prefix: str
    model_type: str
    gemma_norm: bool = False
    fused_gate_up: bool = False
    tail_skip: bool = True
    final_logit_softcap: bool = False

    @property
    def causal_lm(self) -> str:
        return f"{self.prefix}ForCausalLM"


FAMILIES: Tuple[Family, ...] = (
    Family("Llama", "Llama", "llama"),
    Family("Mistral", "Mistral", "mistral"),
    Family("Qwen2", "Qwen2", "qwen2"),
    Family("Qwen3", "Qwen3", "qwen3"),
    Family("Gemma", "Gemma", "gemma", gemma_norm=True),
    Family("Gemma 2", "Gemma2", "gemma2", gemma_norm=True, tail_skip=False, final_logit_softcap=True),
    Family("Gemma 3 (text)", "Gemma3", "gemma3_text", gemma_norm=True, tail_skip=False, final_logit_softcap=True),
    Family("Phi-3 / Phi-4", "Phi3", "phi3", fused_gate_up=True),
)

_BY_CLASS: Dict[str, Family] = {f.causal_lm: f for f in FAMILIES}

#: module class name -> (family, role); roles: "norm", "mlp", "attention", "layer"
MODULE_CLASSES: Dict[str, Tuple[Family, str]] = {
    f"{f.prefix}{suffix}": (f, role)
    for f in FAMILIES
    for suffix, role in (("RMSNorm", "norm"), ("MLP", "mlp"), ("Attention", "attention"), ("DecoderLayer", "layer"))
}


def family_of(causal_lm: Any) -> Optional[Family]:
    """The family of a causal LM (by its class and config.model_type), or None when it is not supported."""
    family = _BY_CLASS.get(type(causal_lm).__name__)
    model_type = getattr(getattr(causal_lm, "config", None), "model_type", None)
    return family if family is not None and family.model_type == model_type else None


def module_role(module: Any) -> Tuple[Optional[Family], Optional[str]]:
    """(family, role) of a decoder module by its class name ("norm", "mlp", "attention", "layer"), or (None, None)."""
    return MODULE_CLASSES.get(type(module).__name__, (None, None))


def text_config(config: Any) -> Any:
    """The language model's config (itself for text-only models)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def final_logit_softcap(causal_lm: Any) -> Optional[float]:
    """c when the causal LM's own forward caps its logits to ``c * tanh(z / c)`` (Gemma 2, Gemma 3), else None."""
    family = family_of(causal_lm)
    if family is None or not family.final_logit_softcap:
        return None
    cap = getattr(text_config(causal_lm.config), "final_logit_softcapping", None)
    return float(cap) if cap else None


def attention_softcap(config: Any) -> Optional[float]:
    """The attention-score softcapping of a config (Gemma 2's ``attn_logit_softcapping``), or None."""
    cap = getattr(text_config(config), "attn_logit_softcapping", None)
    return float(cap) if cap else None


def rope_parameter_sets(config: Any) -> Tuple[Dict[str, Any], ...]:
    """The rotary parameter dicts of a config: one, or one per layer type (Gemma 3's sliding / full layers)."""
    params = getattr(text_config(config), "rope_parameters", None)
    if not isinstance(params, dict):
        return ()
    if "rope_type" in params or "rope_theta" in params:
        return (params,)
    return tuple(p for p in params.values() if isinstance(p, dict))
