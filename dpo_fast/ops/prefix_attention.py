"""Causal attention over packed preference rows ``[prompt | chosen | rejected]`` (prefix sharing).

A packed row holds a pair's shared prompt once, then the chosen completion, then the rejected one.
Prompt and chosen tokens attend causally to what precedes them; rejected tokens must see the prompt
and the rejected tokens before them, never the chosen ones. A dense mask of that shape would force
SDPA off its flash/cuDNN kernels (they only take ``is_causal``), so the attention is two causal
calls instead, both eligible for the fast kernels:

  A. the first ``max(n_chosen)`` positions, causal: exact for every prompt and chosen query;
  B. per row the gathered view ``[prompt | rejected]``, causal: exact for the rejected queries;

and each rejected position takes its output from B. Gradients reach the prompt's keys and values
from both calls. The work is that of attention over the unshared rows (the prompt's queries are
attended twice, as they would be unshared), while every GEMM of the layer runs on the shared rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

#: The keyword under which the layout travels from the model call to the attention function.
PREFIX_KWARG = "dpo_fast_prefix"


@dataclass(frozen=True)
class PrefixLayout:
    """Where the rejected tokens of each packed row are (built by `dpo_fast.prefix_sharing.pack_pairs`).

    length: L, the packed row length; len_a: max chosen row length (prompt + chosen); len_b: max
    rejected row length (prompt + rejected); gather_b [B, len_b]: packed position of each token of
    the ``[prompt | rejected]`` view; is_rejected [B, L]: True at rejected positions;
    combine_index [B, L]: for those, the position in the view B (0 elsewhere).
    """

    length: int
    len_a: int
    len_b: int
    gather_b: torch.Tensor
    is_rejected: torch.Tensor
    combine_index: torch.Tensor


def _causal(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
            scaling: Optional[float]) -> torch.Tensor:
    """transformers' SDPA attention without a mask (is_causal, GQA handled as transformers does): [B, S, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
    return out


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] -> x[b, :, index[b, s], :] of shape [B, H, S, D]."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def prefix_shared_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """An AttentionInterface function: query [B, H, L, D], key/value [B, Hkv, L, D] -> ([B, L, H, D], None).

    The layout comes in ``kwargs[PREFIX_KWARG]``; ``attention_mask`` (the packed rows' padding mask
    transformers built) is not needed: padding sits at the end of each row, after every real token.
    A sliding window (``kwargs["sliding_window"]``) is exact only for rows no longer than it, and
    attention-score softcapping (``kwargs["softcap"]``) is not reproduced: both are errors here
    (`dpo_fast.forward.plan_packing` runs such calls unshared before they get here).
    """
    layout: PrefixLayout = kwargs.get(PREFIX_KWARG)
    if not isinstance(layout, PrefixLayout):
        raise ValueError(f"prefix-shared attention needs a PrefixLayout in {PREFIX_KWARG!r}")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"prefix-shared attention does not cap attention scores (softcap={kwargs['softcap']}); "
                         "run this model without prefix sharing")
    window = kwargs.get("sliding_window")
    if window is not None and max(layout.len_a, layout.len_b) > window:
        raise ValueError(f"prefix-shared attention: rows of {max(layout.len_a, layout.len_b)} tokens exceed the "
                         f"sliding window ({window}); run this call without prefix sharing")
    if query.shape[2] != layout.length or key.shape[2] != layout.length:
        raise ValueError(f"prefix-shared attention: layout is for rows of {layout.length} tokens, got query "
                         f"{query.shape[2]} and key {key.shape[2]} (a key/value cache is not supported)")
    a = layout.len_a
    out_a = _causal(module, query[:, :, :a], key[:, :, :a], value[:, :, :a], dropout, scaling)
    out_b = _causal(module, _gather_seq(query, layout.gather_b), _gather_seq(key, layout.gather_b),
                    _gather_seq(value, layout.gather_b), dropout, scaling)
    if a < layout.length:
        out_a = F.pad(out_a, (0, 0, 0, 0, 0, layout.length - a))
    _, _, h, d = out_b.shape
    rejected = out_b.gather(1, layout.combine_index[:, :, None, None].expand(-1, -1, h, d))
    return torch.where(layout.is_rejected[:, :, None, None], rejected, out_a), None
