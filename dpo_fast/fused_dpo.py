"""The DPO head: per-token head outputs -> sequence log-probs -> loss and TRL's metrics.

`preference_loss` is the one place where per-token outputs of the fused head (from
`dpo_fast.forward.head_outputs`: log-probs and, from the same vocabulary sweep, the statistics TRL
logs) become the loss: sequence log-probs by `dpo_fast.losses.reduce_sequence_logps` (sums, means or
LD-DPO weights), then the loss family of `dpo_fast.losses`. `compute_dpo_loss` feeds it from a model;
`fused_linear_dpo_loss` from hidden states, for callers that run their own backbone.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .forward import IGNORE_INDEX, METRIC_OUTPUTS, head_outputs
from .losses import as_loss_types, dpo_loss, needs_reference, preference_metrics, reduce_sequence_logps, wpo_weights


def head_outputs_needed(compute_metrics: bool, use_weighting: bool) -> Tuple[str, ...]:
    """The per-token head outputs `preference_loss` reads for these settings."""
    outputs = METRIC_OUTPUTS if compute_metrics else ("log_probs",)
    return outputs + (("log_sum_sq_probs",) if use_weighting else ())


def preference_loss(
    token: Mapping[str, torch.Tensor],
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    average_log_prob: bool = False,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    compute_metrics: bool = True,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DPO loss (mean over pairs) and metrics with TRL's names from the policy's per-token head outputs.

    token: `head_outputs` of the policy over [2B, S] aligned labels (the B chosen rows first), with the
    outputs `head_outputs_needed` names. ref_chosen_logps / ref_rejected_logps: [B] reference sequence
    log-probs, reduced the same way; not needed for reference-free losses. Other keywords go to
    `dpo_fast.losses.dpo_loss` (label_smoothing, loss_weights, ...).
    """
    logp, mask = token["log_probs"], token["label_mask"]
    b = logp.shape[0] // 2
    chosen, rejected, chosen_len, rejected_len = reduce_sequence_logps(logp, mask, average=average_log_prob,
                                                                       ld_alpha=ld_alpha)
    types = as_loss_types(loss_type)
    need_ref = needs_reference(types, bool(loss_kwargs.get("reference_free", False)))
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None and need_ref:
        raise ValueError(
            "the reference log-probs are missing: pass ref_chosen_logps/ref_rejected_logps or ref_hidden, "
            "or use reference_free=True / a reference-free loss type"
        )
    if "sft" in types and "chosen_nll" not in loss_kwargs:
        # mean NLL per chosen completion token from plain sums (LD-DPO / averaging do not apply to it)
        loss_kwargs["chosen_nll"] = -(logp[:b] * mask[:b]).sum() / chosen_len.sum().clamp(min=1)
    if use_weighting:
        loss_kwargs["sample_weights"] = wpo_weights(logp.detach(), token["log_sum_sq_probs"], mask)
    if average_log_prob:
        # the log-probs are already per-token means: length-normalising types must not divide again
        chosen_len, rejected_len = torch.ones_like(chosen_len), torch.ones_like(rejected_len)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=types if len(types) > 1 else types[0],
        chosen_lengths=chosen_len, rejected_lengths=rejected_len, **loss_kwargs,
    )
    metrics = preference_metrics(chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
    if compute_metrics:
        metrics.update(_head_metrics(token, b))
    return losses.mean(), metrics


def _head_metrics(token: Mapping[str, torch.Tensor], b: int) -> Dict[str, float]:
    """TRL's logits/chosen, logits/rejected (mean logit over completion tokens), entropy, token accuracy."""
    with torch.no_grad():
        counts = token["label_mask"].sum(dim=1).to(torch.float32)
        n_chosen, n_rejected, n_all = (c.clamp(min=1) for c in (counts[:b].sum(), counts[b:].sum(), counts.sum()))
        mean_logits = token["mean_logits"]
        values = torch.stack([mean_logits[:b].sum() / n_chosen, mean_logits[b:].sum() / n_rejected,
                              token["entropy"].sum() / n_all, token["is_top1"].sum() / n_all]).tolist()
    return dict(zip(("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"), values))


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    ignore_index: int = IGNORE_INDEX,
    average_log_prob: bool = False,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    compute_metrics: bool = True,
    softcap: Optional[float] = None,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DPO loss straight from hidden states: returns (loss, metrics with TRL's names).

    hidden [2B, T, d] (the B chosen rows first) and labels [2B, T] (`ignore_index` outside the
    completions, already aligned: labels[r, t] is the token predicted from hidden[r, t]). The reference
    log-probs come from ``ref_chosen_logps``/``ref_rejected_logps`` if given, else from ``ref_hidden``
    (with ``ref_weight``/``ref_bias``, default the policy's) in a forward-only sweep under no_grad; they
    are not needed for reference-free losses. ``compute_metrics`` adds logits/chosen, logits/rejected,
    entropy and mean_token_accuracy, computed in the same vocabulary sweep; ``use_weighting`` applies WPO
    pair weights. ``softcap`` (c, or None) caps the policy's and the reference's logits to
    ``c * tanh(z / c)`` before the softmax, as Gemma 2's ``final_logit_softcapping`` (pass the model's
    value: `dpo_fast.families.final_logit_softcap(model)`). Extra keyword arguments go to
    `dpo_fast.losses.dpo_loss` (label_smoothing, ...).
    """
    if labels.dim() != 2 or labels.shape[0] == 0 or labels.shape[0] % 2:
        raise ValueError(
            f"labels must be [2B, T] with the B chosen rows first (an even, non-zero row count), got shape {tuple(labels.shape)}"
        )
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden must be [2B, T, d] matching labels {tuple(labels.shape)}, got {tuple(hidden.shape)}")
    if ignore_index != IGNORE_INDEX:
        if bool((labels == IGNORE_INDEX).any()):
            raise ValueError(f"labels hold {IGNORE_INDEX}, which is neither a token id nor ignore_index={ignore_index}")
        labels = labels.masked_fill(labels == ignore_index, IGNORE_INDEX)
    token = head_outputs(hidden, weight, bias, labels, head_outputs_needed(compute_metrics, use_weighting),
                         softcap=softcap)
    need_ref = needs_reference(as_loss_types(loss_type), bool(loss_kwargs.get("reference_free", False)))
    if ref_chosen_logps is None and ref_rejected_logps is None and ref_hidden is not None and need_ref:
        if ref_hidden.shape[:2] != labels.shape:
            raise ValueError(f"ref_hidden must be [2B, T, d] matching labels, got {tuple(ref_hidden.shape)}")
        with torch.no_grad():
            head_weight = weight if ref_weight is None else ref_weight
            head_bias = ref_bias if ref_bias is not None else (bias if ref_weight is None else None)
            ref_logp = head_outputs(ref_hidden, head_weight, head_bias, labels, softcap=softcap)["log_probs"]
            ref_chosen_logps, ref_rejected_logps, _, _ = reduce_sequence_logps(
                ref_logp, token["label_mask"], average=average_log_prob, ld_alpha=ld_alpha)
    return preference_loss(token, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                           beta=beta, loss_type=loss_type, average_log_prob=average_log_prob, ld_alpha=ld_alpha,
                           use_weighting=use_weighting, compute_metrics=compute_metrics, **loss_kwargs)
