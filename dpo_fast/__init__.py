"""dpo_fast: DPO for QLoRA models (Llama family, Gemma, Phi-3) without materializing the [tokens, vocab] logits.

Nothing is patched on import. Public names are imported lazily so that `import dpo_fast`
stays cheap and importing it never touches transformers or triton.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# before anything imports bitsandbytes (peft does): keep its probe for an optional package quiet
from dpo_fast._bnb import quiet_optional_kernel_probe as _quiet_bnb_probe  # noqa: E402

_quiet_bnb_probe()

# public name -> module that defines it
_EXPORTS = {
    "linear_log_probs": "dpo_fast.ops.linear_log_probs",
    "dpo_loss": "dpo_fast.losses",
    "LOSS_TYPES": "dpo_fast.losses",
    "LossOptions": "dpo_fast.loss_options",
    "reduce_sequence_logps": "dpo_fast.losses",
    "preference_metrics": "dpo_fast.losses",
    "fused_linear_dpo_loss": "dpo_fast.fused_dpo",
    "patch": "dpo_fast.patching",
    "unpatch": "dpo_fast.patching",
    "is_patched": "dpo_fast.patching",
    "patch_report": "dpo_fast.patching",
    "add_reference_adapter": "dpo_fast.patching",
    "compute_dpo_loss": "dpo_fast.dpo",
    "load_preference_rows": "dpo_fast.data",
    "tokenize_pairs": "dpo_fast.data",
    "PreferenceCollator": "dpo_fast.data",
    "train": "dpo_fast.train",
    "TrainConfig": "dpo_fast.train",
    "DPOFastTrainer": "dpo_fast.train",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpo_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
