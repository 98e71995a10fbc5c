"""The fused LM head: per-token log-probs of the next-token labels without the [tokens, vocab] logits.

`fused_token_log_probs` runs the backbone, keeps only the positions whose label is scored, and hands
them to `dpo_fast.ops.linear_log_probs` (under `torch.no_grad` that op takes its forward-only path,
which is what the reference pass uses). `make_fused_forward` wraps it in the call contract TRL 1.x
uses for its own fused head, `model(..., labels=labels, fused_lm_head=True)`, returning a
`FusedCausalLMOutput` whose `log_probs` has shape [batch, seq_len - 1] (or [batch, seq_len] with
pre-shifted `shift_labels`) and is 0.0 where the label is -100. Without `fused_lm_head=True` the
original forward runs, so logits and generation are unchanged.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers.utils import ModelOutput

from .checkpointing import refresh as refresh_checkpointing

IGNORE_INDEX = -100
#: Per-token fields the head can return (TRL's names). `log_probs` is always computed.
HEAD_OUTPUTS: Tuple[str, ...] = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """What a fused call returns; the fields and their meaning follow TRL 1.x's `FusedCausalLMOutput`.

    Per-token fields are zero where the label is -100; fields not requested are None. `loss` is the
    summed negative log-likelihood divided by `num_items_in_batch` (or the number of scored tokens).
    `entropy`, `log_sum_sq_probs`, `mean_logits` and `is_top1` are metrics, computed without gradient.
    """

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def validate_outputs(outputs: Sequence[str]) -> Tuple[str, ...]:
    """Check a requested set of head outputs against HEAD_OUTPUTS."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in HEAD_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: unknown head output(s) {unknown}; choose from {list(HEAD_OUTPUTS)}")
    return outputs


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack (e.g. LlamaModel) under a causal LM, looked up per call (peft may wrap it)."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


# TRL's name for each per-token statistic -> the name `linear_log_probs_with_stats` gives it.
_STAT_NAMES = {"entropy": "entropy", "mean_logits": "mean_logit", "log_sum_sq_probs": "log_sum_p2"}


def head_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   labels: torch.Tensor, outputs: Sequence[str] = ("log_probs",)) -> Dict[str, torch.Tensor]:
    """Per-token outputs for aligned hidden [B, S, d] and labels [B, S] (labels[i] predicted from hidden[i]).

    `log_probs` is differentiable (fp32); the statistics other outputs need (`entropy`, `mean_logits`,
    `log_sum_sq_probs`, `is_top1`) come from the same vocabulary sweep, without gradient. Only positions
    whose label is not -100 are projected; every returned tensor has labels' shape and is 0 elsewhere.
    """
    from dpo_fast.ops.linear_log_probs import linear_log_probs_with_stats

    labels = labels.to(hidden.device)
    mask = labels != IGNORE_INDEX
    extras = [o for o in outputs if o != "log_probs"]
    log_probs, stats = linear_log_probs_with_stats(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX,
                                                   stats=bool(extras))
    result = {"log_probs": log_probs}
    for key in extras:
        if key == "is_top1":
            result[key] = (stats["argmax"] == labels) & mask
        else:
            result[key] = stats[_STAT_NAMES[key]]
    result["label_mask"] = mask
    return result


def backbone_hidden(causal_lm: nn.Module, *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, nn.Module]:
    """Run only the decoder stack: (last hidden states [B, T, d] on the head's device, the lm_head module)."""
    kwargs["use_cache"] = False
    # checkpointing re-enabled after patch() (TRL does it around every reference pass) gets back the
    # checkpoint functions patch() set: offloading, the recompute tail skip
    refresh_checkpointing(causal_lm)
    hidden = backbone_of(causal_lm)(*args, **kwargs).last_hidden_state
    head = causal_lm.get_output_embeddings()
    return hidden.to(head.weight.device), head


def _packed_pairs(causal_lm: nn.Module, args: tuple, kwargs: Dict[str, Any], labels: Optional[torch.Tensor],
                  shift_labels: Optional[torch.Tensor]) -> Optional[Any]:
    """The call's rows packed in pairs (row i with row B + i, TRL's [chosen; rejected] order) when the model
    was patched with prefix_sharing=True and the call is a plain right-padded batch; else None.

    Packing is exact for any two rows (they share only their common unscored prefix, which may be
    empty), so a layout it cannot take simply runs unshared.
    """
    from dpo_fast.patching.body import prefix_sharing_enabled

    if args or labels is None or shift_labels is not None or not prefix_sharing_enabled(causal_lm):
        return None
    if set(kwargs) - {"input_ids", "attention_mask", "use_cache"}:
        return None  # position_ids (padding-free), inputs_embeds, caches...: run as given
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] % 2 or labels.shape != ids.shape:
        return None
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    from dpo_fast.prefix_sharing import pack_pairs, window_problem

    try:
        packed = pack_pairs(ids, mask, labels.to(ids.device) != IGNORE_INDEX)
    except ValueError:
        return None
    return None if window_problem(causal_lm, packed) else packed


def fused_token_log_probs(causal_lm: nn.Module, *args: Any, labels: torch.Tensor,
                          shift_labels: Optional[torch.Tensor] = None,
                          outputs: Sequence[str] = ("log_probs",), **kwargs: Any) -> Dict[str, torch.Tensor]:
    """Run the backbone of `causal_lm` and score the next-token labels with the fused head.

    `labels` are unshifted (as for `model(..., labels=...)`): the result has shape [B, T-1]. With
    `shift_labels` (already aligned with the positions), the result has shape [B, T]. A model patched
    with prefix_sharing=True runs rows i and B + i as one packed row when it can (`_packed_pairs`).
    """
    packed = _packed_pairs(causal_lm, args, kwargs, labels, shift_labels)
    if packed is not None:
        from dpo_fast.prefix_sharing import shared_prefix_hidden

        hidden, head = shared_prefix_hidden(causal_lm, packed)
    else:
        hidden, head = backbone_hidden(causal_lm, *args, **kwargs)
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels: fused_lm_head=True needs labels (or shift_labels)")
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match the input's {tuple(hidden.shape[:2])}")
        hidden, aligned = hidden[:, :-1], labels[:, 1:]
    else:
        if shift_labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"shift_labels: shape {tuple(shift_labels.shape)} does not match the input's {tuple(hidden.shape[:2])}")
        aligned = shift_labels
    return head_log_probs(hidden, head.weight, head.bias, aligned, outputs)


def make_fused_forward(causal_lm: nn.Module) -> Callable[..., Any]:
    """Build the bound forward that `patch` installs on `causal_lm` (TRL's fused-head call contract).

    State is read from `causal_lm._dpo_fast_patch` on each call (so a deep copy of the model works):
    "outputs", the per-token fields to compute, and "previous_forward", the instance forward that was
    replaced (None: the class's forward), which serves every call without `fused_lm_head=True`.
    """

    # Keep the class forward's signature: `generate` validates model kwargs against it.
    @functools.wraps(type(causal_lm).forward)
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        state = self._dpo_fast_patch
        if not fused_lm_head:
            refresh_checkpointing(self)  # as in backbone_hidden
            for key, val in (("labels", labels), ("shift_labels", shift_labels),
                             ("num_items_in_batch", num_items_in_batch)):
                if val is not None:
                    kwargs[key] = val
            previous = state["previous_forward"]
            if previous is None:
                return type(self).forward(self, *args, **kwargs)
            return previous(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("output_router_logits: mixture-of-experts models are not supported by dpo_fast")
        res = fused_token_log_probs(self, *args, labels=labels, shift_labels=shift_labels,
                                    outputs=state["outputs"], **kwargs)
        mask = res["label_mask"]
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -res["log_probs"].sum() / denom
        return FusedCausalLMOutput(loss=loss, **res)

    forward._dpo_fast_fused = True  # type: ignore[attr-defined]
    return types.MethodType(forward, causal_lm)
