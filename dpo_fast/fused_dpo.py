"""`fused_linear_dpo_loss`: the one-call DPO head for callers who hold hidden states.

hidden [2B, T, d] (the B chosen rows first) and labels [2B, T] (-100 outside the completions,
already aligned: labels[r, t] is the token predicted from hidden[r, t]) go through the fused
vocabulary sweep of `linear_log_probs`; per-sequence log-probs are a segmented sum over the
compacted valid tokens; the loss family of `dpo_fast.losses` turns them into the loss. The
metric statistics (mean logit, entropy, argmax accuracy) come from the same sweep.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from dpo_fast.loss_options import check_ld_alpha
from dpo_fast.losses import (
    as_loss_types,
    dpo_loss,
    needs_reference,
    preference_metrics,
    reduce_sequence_logps,
    wpo_weights,
)
from dpo_fast.ops.linear_log_probs import compacted_log_probs, scatter_valid


def _segment_sum(values: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    return torch.zeros(n_segments, device=values.device, dtype=values.dtype).index_add(0, segments, values)


def sequence_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    average: bool = False,
    ld_alpha: Optional[float] = None,
    stats: bool = False,
) -> Dict[str, torch.Tensor]:
    """Per-row summed (or averaged / LD-DPO-weighted) label log-probs of hidden [R, T, d].

    Returns a dict with ``logps`` [R] (differentiable), ``lengths`` [R] (int64),
    ``plain_logps`` [R] (plain sums, for the SFT term), and with ``stats`` the per-row sums of
    the per-token statistics (``mean_logit``, ``entropy``, ``argmax_hits``, no gradient) plus
    ``token_logps`` / ``log_sum_p2`` in dense [R, T] form for WPO weighting.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [2B, T, d], got shape {tuple(hidden.shape)}")
    check_ld_alpha(ld_alpha, average)
    rows, t = labels.shape if labels.dim() == 2 else (None, None)
    if rows is None:
        raise ValueError(f"labels must be [2B, T], got shape {tuple(labels.shape)}")
    logp, idx, extra = compacted_log_probs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, stats=stats)
    seg = torch.div(idx, t, rounding_mode="floor")
    lengths = torch.bincount(seg, minlength=rows)
    plain = _segment_sum(logp, seg, rows)
    out: Dict[str, torch.Tensor] = {"lengths": lengths, "plain_logps": plain}
    if ld_alpha is not None:
        # LD-DPO needs each token's position inside its completion: use the shared dense reducer.
        mask = labels != ignore_index
        c, r, _, _ = reduce_sequence_logps(scatter_valid(logp, idx, labels.shape), mask, ld_alpha=ld_alpha)
        out["logps"] = torch.cat([c, r])
    elif average:
        out["logps"] = plain / lengths.clamp(min=1).to(plain.dtype)
    else:
        out["logps"] = plain
    if stats:
        with torch.no_grad():
            labels_valid = labels.reshape(-1).index_select(0, idx).long()
            out["mean_logit"] = _segment_sum(extra["mean_logit"], seg, rows)
            out["entropy"] = _segment_sum(extra["entropy"], seg, rows)
            out["argmax_hits"] = _segment_sum((extra["argmax"] == labels_valid).float(), seg, rows)
            out["token_logps"] = scatter_valid(logp.detach(), idx, labels.shape)
            out["log_sum_p2"] = scatter_valid(extra["log_sum_p2"], idx, labels.shape)
    return out


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
    ignore_index: int = -100,
    average_log_prob: bool = False,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    compute_metrics: bool = True,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DPO loss straight from hidden states: returns (loss, metrics with TRL's names).

    The reference log-probs come from ``ref_chosen_logps``/``ref_rejected_logps`` if given,
    else from ``ref_hidden`` (with ``ref_weight``/``ref_bias``, default the policy's) in a
    forward-only sweep under no_grad; they are not needed for reference-free losses.
    ``compute_metrics`` adds logits/chosen, logits/rejected, entropy and mean_token_accuracy,
    computed in the same vocabulary sweep; ``use_weighting`` applies WPO pair weights.
    Extra keyword arguments go to `dpo_fast.losses.dpo_loss` (label_smoothing, loss_weights, ...).
    """
    if labels.dim() != 2 or labels.shape[0] == 0 or labels.shape[0] % 2:
        raise ValueError(
            f"labels must be [2B, T] with the B chosen rows first (an even, non-zero row count), got shape {tuple(labels.shape)}"
        )
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden must be [2B, T, d] matching labels {tuple(labels.shape)}, got {tuple(hidden.shape)}")
    b = labels.shape[0] // 2
    stats = compute_metrics or use_weighting
    pol = sequence_log_probs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index,
        average=average_log_prob, ld_alpha=ld_alpha, stats=stats,
    )
    chosen, rejected = pol["logps"][:b], pol["logps"][b:]
    chosen_len, rejected_len = pol["lengths"][:b], pol["lengths"][b:]

    types = as_loss_types(loss_type)
    need_ref = needs_reference(types, bool(loss_kwargs.get("reference_free", False)))
    if ref_chosen_logps is None and ref_rejected_logps is None and ref_hidden is not None and need_ref:
        if ref_hidden.shape[:2] != labels.shape:
            raise ValueError(f"ref_hidden must be [2B, T, d] matching labels, got {tuple(ref_hidden.shape)}")
        with torch.no_grad():
            ref = sequence_log_probs(
                ref_hidden, ref_weight if ref_weight is not None else weight, labels,
                bias=ref_bias if ref_bias is not None else (bias if ref_weight is None else None),
                ignore_index=ignore_index, average=average_log_prob, ld_alpha=ld_alpha,
            )["logps"]
        ref_chosen_logps, ref_rejected_logps = ref[:b], ref[b:]
    elif (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None and need_ref:
        raise ValueError(
            "the reference log-probs are missing: pass ref_chosen_logps/ref_rejected_logps or ref_hidden, "
            "or use reference_free=True / a reference-free loss type"
        )

    if "sft" in types and "chosen_nll" not in loss_kwargs:
        # mean NLL per chosen completion token from plain sums (LD-DPO / averaging do not apply to it)
        loss_kwargs["chosen_nll"] = -pol["plain_logps"][:b].sum() / chosen_len.sum().clamp(min=1)
    if use_weighting:
        mask = labels != ignore_index
        loss_kwargs["sample_weights"] = wpo_weights(pol["token_logps"], pol["log_sum_p2"], mask)

    if average_log_prob:
        # the log-probs are already per-token means: length-normalising types must not divide again
        chosen_len, rejected_len = torch.ones_like(chosen_len), torch.ones_like(rejected_len)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=types if len(types) > 1 else types[0],
        chosen_lengths=chosen_len, rejected_lengths=rejected_len, **loss_kwargs,
    )
    loss = losses.mean()
    metrics = preference_metrics(chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
    if compute_metrics:
        metrics.update(_head_metrics(pol, b))
    return loss, metrics


def _head_metrics(pol: Dict[str, torch.Tensor], b: int) -> Dict[str, float]:
    """TRL's logits/chosen, logits/rejected (mean logit over completion tokens), entropy, token accuracy."""
    lengths = pol["lengths"].to(torch.float32)
    n_chosen, n_rejected, n_all = lengths[:b].sum(), lengths[b:].sum(), lengths.sum()
    values = torch.stack(
        [
            pol["mean_logit"][:b].sum() / n_chosen.clamp(min=1),
            pol["mean_logit"][b:].sum() / n_rejected.clamp(min=1),
            pol["entropy"].sum() / n_all.clamp(min=1),
            pol["argmax_hits"].sum() / n_all.clamp(min=1),
        ]
    ).tolist()
    return dict(zip(("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"), values))
