"""`compute_dpo_loss`: one DPO loss evaluation on a preference batch, with dpo_fast's fused head.

The batch uses TRL's preference-collator layout (DESIGN.md section 4): `input_ids` [2B, T] with the
B chosen rows first and the B rejected rows after, `attention_mask` and `completion_mask` [2B, T]
(1 on completion tokens), and optionally `ref_chosen_logps` / `ref_rejected_logps` [B], which then
replace the reference pass. As in TRL, token t is scored from position t-1, so the first column of
`completion_mask` never counts. Chosen and rejected go through the policy in one forward.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from dpo_fast.patching import is_patched, reference_model
from dpo_fast.patching.head import IGNORE_INDEX, backbone_hidden, fused_token_log_probs
from dpo_fast.patching.support import check_supported

_MODEL_KEYS = ("input_ids", "attention_mask")


def _validate_batch(batch: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the preference batch and return (input_ids, attention_mask, completion_mask)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping (TRL's preference-collator output), got {type(batch).__name__}")
    for key in ("input_ids", "completion_mask"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; it needs input_ids, attention_mask, completion_mask")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"batch['input_ids'] must be an integer tensor [2B, T], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    rows, length = input_ids.shape
    if rows == 0 or rows % 2:
        raise ValueError(f"batch['input_ids'] must have an even, non-zero number of rows (B chosen then B rejected), "
                         f"got {rows}")
    if length < 2:
        raise ValueError(f"batch['input_ids'] needs at least 2 columns to score a next token, got {length}")
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    completion_mask = batch["completion_mask"]
    for key, val in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != (rows, length):
            raise ValueError(f"batch[{key!r}] must have input_ids' shape {(rows, length)}, got "
                             f"{tuple(getattr(val, 'shape', ()))}")
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        val = batch.get(key)
        if val is not None and (not isinstance(val, torch.Tensor) or tuple(val.shape) != (rows // 2,)):
            raise ValueError(f"batch[{key!r}] must have shape ({rows // 2},), got {tuple(getattr(val, 'shape', ()))}")
    if (batch.get("ref_chosen_logps") is None) != (batch.get("ref_rejected_logps") is None):
        raise ValueError("batch must carry both ref_chosen_logps and ref_rejected_logps, or neither")
    return input_ids, attention_mask, completion_mask


def token_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [2B, T-1] of the next-token `labels` (unshifted, -100 = not scored).

    A patched model is called through its forward (TRL's fused-head contract); an unpatched supported
    model runs the same fused head directly on its backbone, so patching is not required here.
    """
    if is_patched(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                     use_cache=False).log_probs
    causal_lm, _ = check_supported(model)
    return fused_token_log_probs(causal_lm, input_ids=input_ids, attention_mask=attention_mask,
                                 labels=labels)["log_probs"]


def sequence_logps(model: nn.Module, batch: Mapping[str, Any], *, average_log_prob: bool = False,
                   ld_alpha: Optional[float] = None, prefix_sharing: Optional[bool] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs [B], [B] of a preference batch under `model`.

    The same reduction `compute_dpo_loss` uses (completion tokens only, next-token alignment), for
    callers that need the numbers alone: precomputing reference log-probs, evaluation.
    `prefix_sharing` as in `compute_dpo_loss`.
    """
    from dpo_fast.losses import reduce_sequence_logps
    from dpo_fast.patching.head import head_log_probs

    input_ids, attention_mask, completion_mask = _validate_batch(batch)
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    packed = _pack(input_ids, attention_mask, completion_mask, _prefix_sharing(model, prefix_sharing))
    hidden, weight, bias = _hidden_and_head(model, input_ids, attention_mask, packed)
    per_token = head_log_probs(hidden, weight, bias, labels[:, 1:].to(hidden.device))["log_probs"]
    chosen, rejected, _, _ = reduce_sequence_logps(per_token, completion_mask[:, 1:].to(torch.bool),
                                                   average=average_log_prob, ld_alpha=ld_alpha)
    return chosen, rejected


def _prefix_sharing(model: nn.Module, requested: Optional[bool]) -> bool:
    """Whether to pack pairs: `requested`, or (None) whether `model` was patched with prefix_sharing=True."""
    from dpo_fast.patching.body import prefix_sharing_enabled

    enabled = prefix_sharing_enabled(model)
    if requested and not enabled:
        raise ValueError("prefix_sharing=True needs a model patched with dpo_fast.patch(model, prefix_sharing=True)")
    return enabled if requested is None else bool(requested)


def _hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     packed: Optional[Any] = None):
    """Last hidden states [R, T-1, d] (position t predicts token t+1) and the lm_head's weight and bias.

    With `packed` (a `dpo_fast.prefix_sharing.PackedPairs` of this batch) the backbone runs on the
    packed rows; the hidden states come back in the unshared layout.
    """
    causal_lm, _ = check_supported(model)
    if packed is None:
        hidden, head = backbone_hidden(causal_lm, input_ids=input_ids, attention_mask=attention_mask)
    else:
        from dpo_fast.prefix_sharing import shared_prefix_hidden

        hidden, head = shared_prefix_hidden(causal_lm, packed)
    return hidden[:, :-1], head.weight, head.bias


def _pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, share: bool):
    """The batch packed one row per pair (`dpo_fast.prefix_sharing.pack_pairs`) when `share`, else None."""
    if not share:
        return None
    from dpo_fast.prefix_sharing import pack_pairs

    return pack_pairs(input_ids, attention_mask, completion_mask)


def compute_dpo_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    ref_model: Optional[nn.Module] = None,
    ref_adapter_name: Optional[str] = None,
    beta: float = 0.1,
    loss_type: Any = "sigmoid",
    average_log_prob: bool = False,
    ld_alpha: Optional[float] = None,
    prefix_sharing: Optional[bool] = None,
    **loss_kwargs: Any,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DPO loss (mean over pairs) and metrics with TRL's names for one preference batch.

    Chosen and rejected rows go through the policy in one forward; the reference (unless the batch
    carries ref_chosen_logps / ref_rejected_logps, or the loss is reference-free) in one forward
    under no_grad with the forward-only head. Both hidden states go to `fused_linear_dpo_loss`.

    Args:
        model: the policy, a supported causal LM (patched or not), bare or a peft LoRA model.
        batch: TRL preference-collator layout (see the module docstring).
        ref_model, ref_adapter_name: override the reference rule of dpo_fast.patching.reference
            ("ref" adapter if present, else adapters disabled).
        beta, loss_type, **loss_kwargs: passed to `dpo_fast.losses.dpo_loss` (through
            `fused_linear_dpo_loss`: use_weighting, compute_metrics, label_smoothing, ...).
        average_log_prob, ld_alpha: how per-token log-probs become sequence log-probs.
        prefix_sharing: run each pair as one row [prompt | chosen | rejected], so the prompt goes
            through the body once (`dpo_fast.prefix_sharing`; same loss and gradients). None: on when
            the model was patched with ``prefix_sharing=True``; True needs that patch.

    Returns:
        (loss, metrics): loss is a scalar tensor with grad; metrics maps TRL's names
        (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
        logps/rejected, logits/chosen, logits/rejected, entropy, mean_token_accuracy) to floats.
    """
    from dpo_fast.fused_dpo import fused_linear_dpo_loss
    from dpo_fast.losses import needs_reference

    input_ids, attention_mask, completion_mask = _validate_batch(batch)
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)[:, 1:]
    empty = (labels == IGNORE_INDEX).all(dim=1).nonzero().flatten().tolist()
    if empty:
        warnings.warn(f"compute_dpo_loss: rows {empty} have no completion token to score (completion_mask is zero "
                      "after the first column); they contribute a log-prob of 0", stacklevel=2)
    packed = _pack(input_ids, attention_mask, completion_mask, _prefix_sharing(model, prefix_sharing))
    hidden, weight, bias = _hidden_and_head(model, input_ids, attention_mask, packed)
    labels = labels.to(hidden.device)

    ref = {}
    if batch.get("ref_chosen_logps") is not None:
        ref["ref_chosen_logps"] = batch["ref_chosen_logps"].to(hidden.device, torch.float32)
        ref["ref_rejected_logps"] = batch["ref_rejected_logps"].to(hidden.device, torch.float32)
    elif needs_reference(loss_type, bool(loss_kwargs.get("reference_free", False))):
        with reference_model(model, ref_model=ref_model, ref_adapter_name=ref_adapter_name) as ref_net:
            ref_packed = packed if ref_model is None or _prefix_sharing(ref_net, None) else None
            ref_hidden, ref_weight, ref_bias = _hidden_and_head(ref_net, input_ids, attention_mask, ref_packed)
        ref.update(ref_hidden=ref_hidden.to(hidden.device), ref_weight=ref_weight.to(hidden.device),
                   ref_bias=None if ref_bias is None else ref_bias.to(hidden.device))
    return fused_linear_dpo_loss(
        hidden, weight, labels, beta=beta, loss_type=loss_type, average_log_prob=average_log_prob,
        ld_alpha=ld_alpha, **ref, **loss_kwargs,
    )
