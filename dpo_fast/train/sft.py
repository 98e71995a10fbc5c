"""The SFT stage: next-token NLL of the chosen completions, from the same preference data.

A preference batch (TRL's collator layout, B chosen rows then B rejected rows) is cut to its
chosen half; labels are the chosen completion tokens (prompt and padding are -100), scored with
dpo_fast's fused head so the [tokens, vocab] logits never exist.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from dpo_fast.forward import IGNORE_INDEX, token_log_probs


def chosen_half(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The chosen rows of a preference batch (the first half of input_ids / masks)."""
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"batch: input_ids has an odd number of rows ({n}); expected B chosen + B rejected")
    b = n // 2
    return {k: batch[k][:b] for k in ("input_ids", "attention_mask", "completion_mask") if k in batch}


def sft_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """input_ids on completion tokens, -100 on prompt and padding."""
    keep = completion_mask.bool() & attention_mask.bool()
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def sft_loss(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(mean NLL per chosen completion token, metrics) for a preference batch."""
    half = chosen_half(batch)
    if "completion_mask" not in half:
        raise ValueError("batch: missing completion_mask")
    labels = sft_labels(half["input_ids"], half["attention_mask"], half["completion_mask"])
    logps = token_log_probs(model, half["input_ids"], half["attention_mask"], labels)
    mask = labels[:, 1:] != IGNORE_INDEX
    count = mask.sum()
    if int(count) == 0:
        raise ValueError("batch: no completion tokens to train on")
    loss = -(logps * mask).sum() / count
    metrics = {"loss": loss.detach(), "logps/chosen": (logps.detach().sum(-1)).mean(),
               "num_tokens": count.detach().float()}
    return loss, metrics


def scored_tokens(batch: Dict[str, torch.Tensor]) -> float:
    """How many tokens `sft_loss` averages over in this batch (what its mean is a mean of)."""
    half = chosen_half(batch)
    return float((half["completion_mask"].bool() & half["attention_mask"].bool())[:, 1:].sum())
