"""TRL integration: one line makes TRL 1.x's trainers use dpo_fast's fused head.

    import dpo_fast.integrations.trl
    dpo_fast.integrations.trl.enable()      # before building trl.DPOTrainer / trl.SFTTrainer
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, ...)

TRL 1.x trainers call `add_fused_lm_head(model, ...)` in `__init__` (on the causal LM inside a
PeftModel) and then score tokens with `model(..., labels=labels, fused_lm_head=True)`. `enable`
swaps that function, in the trainer modules that import it, for one that runs `dpo_fast.patch`, which
serves the same call contract with dpo_fast's head (one vocabulary sweep per forward, elementwise
backward, forward-only reference pass). Everything else stays TRL's: dataset handling, the reference
rule ("ref" adapter, else adapters disabled, or `precompute_ref_log_probs`), the loss formulas,
logging and checkpoints. DPOTrainer's loss formulas are inline in its `_compute_loss`, so they are
not swapped. Models dpo_fast does not support, and TRL options it does not implement (a sampling
temperature other than 1, `cast_lm_head_to_fp32`), fall back to TRL's own head, with a warning.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

from dpo_fast.patching import BodyOptions, UnsupportedModelError, patch

#: Trainer modules whose `add_fused_lm_head` is replaced.
TRAINER_MODULES: Tuple[str, ...] = ("trl.trainer.dpo_trainer", "trl.trainer.sft_trainer")
MIN_TRL, MAX_TRL_EXCLUSIVE = "1.0.0", "2.0.0"

_originals: Dict[str, Callable[..., Any]] = {}
_patch_options: Dict[str, Any] = {}


def _check_trl() -> Any:
    """Import trl and check that it is a version whose fused-head contract we implement."""
    try:
        import trl
    except ImportError as exc:
        raise ImportError("dpo_fast.integrations.trl needs trl: pip install 'trl>=1.0,<2'") from exc
    from packaging.version import Version

    version = Version(trl.__version__)
    supported = f"trl>={MIN_TRL},<{MAX_TRL_EXCLUSIVE} with a fused LM head (trl.trainer.utils.add_fused_lm_head)"
    if not (Version(MIN_TRL) <= version < Version(MAX_TRL_EXCLUSIVE)):
        raise RuntimeError(f"trl {trl.__version__} is not supported by dpo_fast.integrations.trl; supported: {supported}")
    for name in TRAINER_MODULES:
        module = importlib.import_module(name)
        if not callable(getattr(module, "add_fused_lm_head", None)):
            raise RuntimeError(f"trl {trl.__version__} is not supported by dpo_fast.integrations.trl ({name} has no "
                               f"add_fused_lm_head); supported: {supported}")
    return trl


def _make_replacement(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_fused_lm_head(model: Any, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                          outputs: Tuple[str, ...] = ("log_probs",)) -> None:
        """dpo_fast's stand-in for trl's `add_fused_lm_head` (same signature)."""
        reason: Optional[str] = None
        if temperature != 1.0:
            reason = f"temperature={temperature}"
        elif cast_lm_head_to_fp32:
            reason = "cast_lm_head_to_fp32=True"
        if reason is None:
            try:
                patch(model, outputs=outputs, **_patch_options)
                return None
            except UnsupportedModelError as exc:
                reason = str(exc)
        warnings.warn(f"dpo_fast: using TRL's own fused head for {type(model).__name__} ({reason})", stacklevel=2)
        return original(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)

    add_fused_lm_head._dpo_fast = True  # type: ignore[attr-defined]
    return add_fused_lm_head


def enable(*, body: bool = True, **patch_options: Any) -> None:
    """Make TRL trainers built from now on use dpo_fast's fused head. Idempotent.

    Options are those of `dpo_fast.patch` (`body`, `rms_norm`, `rope`, `swiglu`, `qlora_linear`, `nf4_dequant`,
    `offload_checkpointing`, `prefix_sharing`, `recompute_tail_skip`). With ``prefix_sharing=True``,
    DPOTrainer's policy and reference calls run each chosen/rejected pair as one row
    [prompt | chosen | rejected]. With ``offload_checkpointing=True``, TRL's gradient checkpointing
    offloads each layer's input (TRL re-enables checkpointing around every reference pass; the patched
    model puts dpo_fast's function back on its next call, dpo_fast.patching.checkpointing).
    Raises RuntimeError for an unsupported trl version.
    """
    BodyOptions.check_names(patch_options, "enable()")
    _check_trl()
    _patch_options.clear()
    _patch_options.update(body=body, **patch_options)
    for name in TRAINER_MODULES:
        module = importlib.import_module(name)
        current = module.add_fused_lm_head
        if getattr(current, "_dpo_fast", False):
            continue
        _originals[name] = current
        module.add_fused_lm_head = _make_replacement(current)


def disable() -> None:
    """Give TRL its own fused head back for trainers built from now on (already-built ones keep theirs)."""
    for name, original in list(_originals.items()):
        importlib.import_module(name).add_fused_lm_head = original
        del _originals[name]


def is_enabled() -> bool:
    """True while `enable` is in effect."""
    return bool(_originals)
