"""`compute_dpo_loss`: one DPO loss evaluation on a preference batch, with dpo_fast's fused head.

It reads: validate the batch -> the policy's per-token log-probs -> the reference's sequence log-probs
-> the loss. The batch uses TRL's preference-collator layout (docs/design.md, "Data layout"):
`input_ids` [2B, T] with the B chosen rows first and the B rejected rows after, `attention_mask` and
`completion_mask` [2B, T] (1 on completion tokens), and optionally `ref_chosen_logps` /
`ref_rejected_logps` [B], which then replace the reference pass. As in TRL, token t is scored from
position t-1, so the first column of `completion_mask` never counts. Chosen and rejected go through
the policy in one forward (`dpo_fast.forward`).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .forward import IGNORE_INDEX, completion_labels, preference_tensors, token_outputs
from .fused_dpo import head_outputs_needed, preference_loss
from .losses import needs_reference, reduce_sequence_logps
from .patching.reference import reference_model
from .patching.support import check_supported
from .state import is_wrapped_for_data_parallel

_warned_unsynchronised = False


def _warn_if_unsynchronised(model: nn.Module) -> None:
    """Warn once when gradients would silently differ across processes: several processes, a gradient to
    compute, and a model that no data-parallel wrapper synchronises."""
    global _warned_unsynchronised
    if _warned_unsynchronised or not torch.is_grad_enabled() or is_wrapped_for_data_parallel(model):
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return
    if not any(p.requires_grad for p in model.parameters()):
        return
    _warned_unsynchronised = True
    warnings.warn(f"compute_dpo_loss: {torch.distributed.get_world_size()} processes train, but the model is not "
                  "wrapped for data parallelism, so each process keeps its own gradients. Pass the "
                  "DistributedDataParallel (or FSDP) model itself, not its .module, or wrap it first "
                  "(accelerate's prepare does).", stacklevel=3)


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
    under no_grad with the forward-only head.

    Args:
        model: the policy, a supported causal LM (patched or not), bare or a peft LoRA model.
        batch: TRL preference-collator layout (see the module docstring).
        ref_model, ref_adapter_name: override the reference rule of dpo_fast.patching.reference
            ("ref" adapter if present, else adapters disabled).
        beta, loss_type, **loss_kwargs: passed to `dpo_fast.losses.dpo_loss` (through
            `dpo_fast.fused_dpo.preference_loss`: use_weighting, compute_metrics, label_smoothing, ...).
        average_log_prob, ld_alpha: how per-token log-probs become sequence log-probs.
        prefix_sharing: run each pair as one row [prompt | chosen | rejected], so the prompt goes
            through the body once (same loss and gradients). None: as the model was patched
            (``patch(model, prefix_sharing=True)``); True needs that patch; a batch that cannot be
            packed runs unshared with a warning (`dpo_fast.forward.plan_packing`).

    Returns:
        (loss, metrics): loss is a scalar tensor with grad; metrics maps TRL's names
        (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
        logps/rejected, logits/chosen, logits/rejected, entropy, mean_token_accuracy) to floats.
    """
    causal_lm, _ = check_supported(model)
    _warn_if_unsynchronised(model)
    input_ids, attention_mask, completion_mask = preference_tensors(
        batch, vocab_size=causal_lm.get_input_embeddings().num_embeddings)
    labels = completion_labels(input_ids, completion_mask)
    empty = (labels[:, 1:] == IGNORE_INDEX).all(dim=1).nonzero().flatten().tolist()
    if empty:
        warnings.warn(f"compute_dpo_loss: rows {empty} have no completion token to score (completion_mask is zero "
                      "after the first column); they contribute a log-prob of 0", stacklevel=2)
    outputs = head_outputs_needed(loss_kwargs.get("compute_metrics", True), loss_kwargs.get("use_weighting", False))
    policy = token_outputs(model, input_ids, attention_mask, labels, outputs=outputs, prefix_sharing=prefix_sharing)
    device = policy["log_probs"].device

    ref: Dict[str, torch.Tensor] = {}
    if batch.get("ref_chosen_logps") is not None:
        ref = {key: batch[key].to(device, torch.float32) for key in ("ref_chosen_logps", "ref_rejected_logps")}
    elif needs_reference(loss_type, bool(loss_kwargs.get("reference_free", False))):
        with reference_model(model, ref_model=ref_model, ref_adapter_name=ref_adapter_name) as ref_net:
            # the policy's own network shares as the policy does; a separate model as it was patched
            ref_logp = token_outputs(ref_net, input_ids, attention_mask, labels,
                                     prefix_sharing=prefix_sharing if ref_model is None else None)["log_probs"]
        chosen, rejected, _, _ = reduce_sequence_logps(ref_logp.to(device), policy["label_mask"],
                                                       average=average_log_prob, ld_alpha=ld_alpha)
        ref = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    return preference_loss(policy, beta=beta, loss_type=loss_type, average_log_prob=average_log_prob,
                           ld_alpha=ld_alpha, **ref, **loss_kwargs)
