"""Prefix sharing: pack each preference pair as one row ``[prompt | chosen | rejected]``.

In TRL's layout the chosen and rejected rows of a pair repeat the prompt, so the body computes it
twice. `pack_pairs` keeps it once: the shared prefix of the two rows (tokens equal in both and
outside both completions), then the chosen row's remaining tokens, then the rejected row's. Position
ids restart after the prompt for the rejected tokens, and the attention
(`dpo_fast.ops.prefix_attention`) keeps the rejected tokens from seeing the chosen ones, so every
hidden state equals the unshared one. `PackedPairs.unshared_index` maps the packed positions back to
the unshared [2B, T] layout (`dpo_fast.forward.backbone_hidden` gathers the hidden states with it), so
everything after the body (the fused head, the loss, the metrics) is unchanged. The last prompt
position scores the first token of both completions; its gradient is the sum of the two, as it is the
sum of two rows unshared. This module only packs; `dpo_fast.forward.plan_packing` decides when.
See docs/design.md, "Prefix sharing".

Rows must be right-padded (TRL's collator layout), with completion_mask 0 on padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .families import attention_softcap, rope_parameter_sets, text_config
from .ops.prefix_attention import PrefixLayout


@dataclass(frozen=True)
class PackedPairs:
    """A preference batch as B packed rows, and the map back to the 2B unshared rows.

    input_ids, position_ids, attention_mask: [B, L], the packed rows (right-padded);
    unshared_index [2B * T]: flat index into the packed [B * L] positions of each unshared
    position (padding maps to its row's first position); rows, length: 2B and T of the unshared
    batch; shared_tokens: prompt tokens computed once instead of twice (summed over pairs);
    attention: the layout the attention function needs.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    unshared_index: torch.Tensor
    rows: int
    length: int
    shared_tokens: int
    attention: PrefixLayout
    max_position: int = -1

    @property
    def packed_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _first(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True in a 1-d bool tensor, -1 if none (a device tensor: no sync)."""
    return torch.where(mask.any(), mask.long().argmax(), -1)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> PackedPairs:
    """Pack a TRL preference batch ([2B, T], chosen rows first) into B rows [prompt | chosen | rejected].

    Raises ValueError for a layout it cannot share exactly: rows that are not right-padded, or a
    completion_mask that marks padding.
    """
    rows, t = input_ids.shape
    if rows == 0 or rows % 2 or attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(f"pack_pairs: need input_ids, attention_mask, completion_mask of one shape [2B, T], got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}")
    b = rows // 2
    dev = input_ids.device
    am = attention_mask.to(dev).bool()
    cm = completion_mask.to(dev).bool()
    n = am.sum(1)
    col = torch.arange(t, device=dev)
    not_right_padded = (am != (col[None] < n[:, None])).any(1)
    scored_padding = (cm & ~am).any(1)
    eq = (input_ids[:b] == input_ids[b:]) & am[:b] & am[b:] & ~cm[:b] & ~cm[b:]
    shared = eq.long().cumprod(1).sum(1)                      # P_i: the pair's shared prompt
    n_c, n_r = n[:b], n[b:]
    c_len = n_c - shared                                     # chosen tokens after the prompt
    row_len = n_c + n_r - shared                             # packed row length
    # the largest packed position id: a row shorter than the longest has a padding column at L - 1 (position
    # L - 1); a full row's positions end at max(n_c, n_r) - 1 (the rejected ones restart after the prompt)
    longest = row_len.max()
    max_position = torch.where(row_len == longest, torch.maximum(n_c, n_r) - 1, longest - 1).max()
    sizes = torch.stack([longest, n_c.max(), n_r.max(), shared.sum(), _first(not_right_padded),
                         _first(scored_padding), max_position]).tolist()   # one host sync for every size and check
    length, len_a, len_b = (max(int(v), 1) for v in sizes[:3])
    n_shared, bad_pad, bad_scored, max_position = sizes[3:]
    if bad_pad >= 0:
        raise ValueError(f"prefix sharing needs right-padded rows (attention_mask 1...1 0...0); row {bad_pad} is "
                         "not (left padding or holes): pad on the right, or turn prefix sharing off")
    if bad_scored >= 0:
        raise ValueError(f"completion_mask is 1 on padding (attention_mask 0) in row {bad_scored}: padding "
                         "tokens cannot be scored")

    p = torch.arange(length, device=dev)
    is_rej = (p[None] >= n_c[:, None]) & (p[None] < row_len[:, None])           # [B, L]
    src = torch.where(is_rej, p[None] - c_len[:, None], p[None]).clamp(max=t - 1)
    ids = torch.where(is_rej, input_ids[b:].gather(1, src), input_ids[:b].gather(1, src))
    positions = torch.where(is_rej, p[None] - c_len[:, None], p[None])
    packed_mask = (p[None] < row_len[:, None]).to(attention_mask.dtype)

    # unshared row r (pair r % B), column j -> packed position of the same token (rejected suffix shifted by C_i)
    pair = torch.arange(rows, device=dev) % b
    offset = torch.cat([torch.zeros_like(c_len), c_len])[:, None]
    prompt = torch.cat([n_c, shared])[:, None]
    packed_col = torch.where(col[None] >= prompt, col[None] + offset, col[None])
    packed_col = torch.where(col[None] < n[:, None], packed_col, 0)
    unshared_index = (pair[:, None] * length + packed_col).reshape(-1)

    s = torch.arange(len_b, device=dev)
    gather_b = torch.where(s[None] >= shared[:, None], s[None] + c_len[:, None], s[None]).clamp(max=length - 1)
    combine = torch.where(is_rej, p[None] - c_len[:, None], 0).clamp(max=len_b - 1)
    layout = PrefixLayout(length=length, len_a=len_a, len_b=len_b, gather_b=gather_b, is_rejected=is_rej,
                          combine_index=combine)
    return PackedPairs(input_ids=ids, position_ids=positions, attention_mask=packed_mask,
                       unshared_index=unshared_index, rows=rows, length=t, shared_tokens=n_shared, attention=layout,
                       max_position=max(int(max_position), 0))


def window_problem(causal_lm: nn.Module, packed: PackedPairs) -> Optional[str]:
    """Why the packed rows cannot run on this model (a sliding window shorter than a row), or None.

    The two causal calls of the packed attention have no window; rows no longer than the window
    never reach it.
    """
    config = causal_lm.config
    window = getattr(config, "sliding_window", None)
    longest = max(packed.attention.len_a, packed.attention.len_b)
    if window and getattr(config, "use_sliding_window", True) and longest > window:
        return (f"prefix sharing: rows of {longest} tokens exceed the model's sliding window ({window}); turn "
                "prefix sharing off for this model")
    return None


def rope_problem(causal_lm: nn.Module, packed: PackedPairs) -> Optional[str]:
    """Why the packed rows would get other rotary angles than the unshared ones, or None.

    Rotary scalings whose frequencies depend on the call's length (``max(position_ids) + 1``) see the
    packed rows' length instead of the unshared T: LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) switches
    to its long factors above ``original_max_position_embeddings``, dynamic NTK rescales above
    ``max_position_embeddings``. Packing is exact when both lengths fall on the same side (LongRoPE), or
    both below the threshold or equal (dynamic).
    """
    unshared, shared = packed.length, packed.max_position + 1
    if unshared == shared:
        return None
    for params in rope_parameter_sets(causal_lm.config):
        kind = str(params.get("rope_type", "default"))
        if kind == "longrope":
            limit = params.get("original_max_position_embeddings",
                               getattr(text_config(causal_lm.config), "original_max_position_embeddings", None))
            if limit is not None and (unshared > limit) != (shared > limit):
                return (f"LongRoPE switches factors above {limit} tokens and the packed rows ({shared}) and the "
                        f"unshared ones ({unshared}) fall on different sides")
        elif "dynamic" in kind:
            limit = getattr(text_config(causal_lm.config), "max_position_embeddings", None)
            if limit is None or max(unshared, shared) >= limit:
                return (f"dynamic rotary scaling depends on the call's length beyond {limit} tokens, and the packed "
                        f"rows ({shared}) and the unshared ones ({unshared}) differ")
    return None


def attention_problem(causal_lm: nn.Module) -> Optional[str]:
    """Why no call of this model can run packed, or None: its attention does what the packed attention's two
    causal SDPA calls do not (Gemma 2's attention-score softcapping)."""
    cap = attention_softcap(causal_lm.config)
    if cap is not None:
        return (f"the model caps its attention scores (config.attn_logit_softcapping={cap:g}), which the packed "
                "attention does not")
    return None


def savings(packed: PackedPairs) -> Optional[float]:
    """Fraction of the unshared batch's real tokens that prefix sharing does not compute."""
    total = packed.packed_tokens + packed.shared_tokens
    return packed.shared_tokens / total if total else None
