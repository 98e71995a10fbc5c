"""TRL 1.x's fused-head call contract on a patched causal LM.

``model(..., labels=labels, fused_lm_head=True)`` returns a `FusedCausalLMOutput` whose `log_probs`
has shape [batch, seq_len - 1] (or [batch, seq_len] with pre-shifted `shift_labels`) and is 0.0 where
the label is -100, computed by `dpo_fast.forward.run_fused_head` without the [tokens, vocab] logits
(under `torch.no_grad` the head takes its forward-only path: the reference pass). Without
``fused_lm_head=True`` the original forward runs, so logits and generation are unchanged.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import state
from ..forward import HEAD_OUTPUTS, REQUEST_KWARG, FusedRequest, run_fused_head, validate_outputs

__all__ = ["FusedCausalLMOutput", "make_fused_forward", "HEAD_OUTPUTS", "validate_outputs"]


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


def make_fused_forward(causal_lm: nn.Module) -> Callable[..., Any]:
    """Build the bound forward that `patch` installs on `causal_lm` (TRL's fused-head call contract).

    State is read from the head record on `causal_lm` on each call (so a deep copy of the model works):
    "outputs", the per-token fields to compute, and "previous_forward", the instance forward that was
    replaced (None: the class's forward), which serves every call without `fused_lm_head=True`.
    A `dpo_fast.forward.FusedRequest` under the private keyword REQUEST_KWARG (dpo_fast's own callers)
    overrides the outputs and the prefix-sharing decision for that call.
    """

    # Keep the class forward's signature: `generate` validates model kwargs against it.
    @functools.wraps(type(causal_lm).forward)
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        record = self.__dict__[state.HEAD_RECORD]
        request = kwargs.pop(REQUEST_KWARG, None) or FusedRequest()
        if not fused_lm_head:
            for key, val in (("labels", labels), ("shift_labels", shift_labels),
                             ("num_items_in_batch", num_items_in_batch)):
                if val is not None:
                    kwargs[key] = val
            previous = record["previous_forward"]
            if previous is None:
                return type(self).forward(self, *args, **kwargs)
            return previous(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("output_router_logits: mixture-of-experts models are not supported by dpo_fast")
        res = run_fused_head(self, *args, labels=labels, shift_labels=shift_labels,
                             outputs=request.outputs or record["outputs"], prefix_sharing=request.prefix_sharing,
                             **kwargs)
        mask = res["label_mask"]
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -res["log_probs"].sum() / denom
        return FusedCausalLMOutput(loss=loss, **res)

    setattr(forward, state.FUSED_FORWARD_MARK, True)
    return types.MethodType(forward, causal_lm)
