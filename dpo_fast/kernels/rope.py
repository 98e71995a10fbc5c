"""Rotary position embedding applied to q and k in one launch (forward and backward).

q is [B, Hq, T, D] and k is [B, Hk, T, D], any strides with a unit last stride (the transposed
views LlamaAttention makes are fine); cos/sin are [Bc, T, D] with Bc in {1, B}. With the halves
x = [x1, x2], c = [c1, c2], s = [s1, s2] (transformers' ``x*cos + rotate_half(x)*sin``):

    forward:  y1 = x1*c1 - x2*s1,   y2 = x2*c2 + x1*s2
    backward: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1   (rotation by -theta)

One program per (batch, position) handles every head of q and of k, so cos/sin are read once.
Each program reads both halves before writing, so ``out`` may alias the input (in place).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, sb, sh, st, osb, osh, ost, b, t, n_heads, half, c1, c2, s1, s2,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    base = x_ptr + b * sb + t * st + heads * sh + dims
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    obase = o_ptr + b * osb + t * ost + heads * osh + dims
    tl.store(obase, y1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + half, y2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, qsb, qsh, qst, qo_ptr, qosb, qosh, qost,
    k_ptr, ksb, ksh, kst, ko_ptr, kosb, kosh, kost,
    cos_ptr, sin_ptr, csb, cst,
    seq_len, n_q_heads, n_k_heads, half,
    BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < half
    cbase = b * csb + t * cst + dims
    c1 = tl.load(cos_ptr + cbase, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cbase + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cbase, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cbase + half, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, qsb, qsh, qst, qosb, qosh, qost, b, t, n_q_heads, half, c1, c2, s1, s2,
                  BACKWARD, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, ksb, ksh, kst, kosb, kosh, kost, b, t, n_k_heads, half, c1, c2, s1, s2,
                  BACKWARD, BLOCK_HK, BLOCK_D)


def rope_apply(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
               q_out: torch.Tensor, k_out: Optional[torch.Tensor], backward: bool = False) -> None:
    """Write the rotated q, k (or, with backward=True, the gradients rotated back) into q_out, k_out.

    q, q_out: [B, Hq, T, D]; k, k_out: [B, Hk, T, D] or both None; cos, sin: [Bc, T, D] with the
    same strides, Bc in {1, B}; every last stride must be 1. Outputs may alias the inputs.
    """
    bsz, n_q, seq, dim = q.shape
    if k is None:
        k, k_out, n_k = q, q_out, 0
    else:
        n_k = k.shape[1]
    if bsz * seq == 0:
        return
    half = dim // 2
    csb = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(bsz * seq,)](
        q, q.stride(0), q.stride(1), q.stride(2), q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2), k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos, sin, csb, cos.stride(1),
        seq, n_q, n_k, half,
        BACKWARD=backward,
        BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HK=max(triton.next_power_of_2(n_k), 1),
        BLOCK_D=max(triton.next_power_of_2(half), 2),
        num_warps=4,
    )
