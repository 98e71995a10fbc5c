"""Online-softmax update over one [rows, vocab-chunk] tile of fp32 logits.

The fused head computes logits chunk by chunk (a GEMM per chunk, fp32 output) and calls this
kernel on each chunk. Per row it keeps the running max `m` and the running sum
`s = sum exp(z - m)` (FlashAttention-style rescaling), picks up the label's logit when the label
falls in this chunk, and optionally:

* writes ``P = exp(z - m_new)`` with the label column zeroed, plus ``alpha = exp(m_old - m_new)``,
  so the caller can accumulate the expected embedding ``E <- alpha * E + P @ W_chunk`` in fp32
  (the one-pass frozen-weight backward, docs/design.md, "The fused head"), and keeps the running
  sum of P, ``s_excl``: ``1 - p_label = s_excl / s`` without the cancellation of
  ``1 - exp(logp)`` on confident tokens;
* accumulates per-token statistics for metrics in the same pass: ``sum exp(z-m) * z`` (entropy),
  ``sum z`` (mean logit), the running argmax, and ``sum exp(2(z-m))`` (log sum p^2 for WPO).

With ``SOFTCAP`` the softmax is over the capped logits ``zc = c * tanh(z / c)``: the running max
``m`` (and the argmax) stay on the raw logits z, which order the same way, and the exponentials
are shifted by ``cap(m)``; the label logit is stored raw (the caller caps it and takes its
slope); the statistics use zc; and P is ``exp(zc - cap(m_new)) * dzc/dz`` (label column zeroed),
the chain rule through tanh that the frozen-head backward needs, while ``s_excl`` stays the plain
sum of the non-label exponentials. Without it the kernel compiles exactly as before.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dpo_fast.kernels.softcap import softcap_and_slope


@triton.jit
def _online_softmax_tile_kernel(
    z_ptr, z_stride,
    labels_ptr,
    m_ptr, s_ptr, label_logit_ptr,
    p_ptr, p_stride, alpha_ptr, sx_ptr,
    sez_ptr, sz_ptr, amax_ptr, se2_ptr,
    v0, n_cols, cap,
    WRITE_P: tl.constexpr,
    STATS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    label = tl.load(labels_ptr + row)
    local_label = label - v0

    # Pass 1: the tile's max (and its first argmax) for a stable rescale.
    tile_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    tile_arg = tl.zeros((BLOCK_V,), tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf"))
        better = z > tile_max
        tile_arg = tl.where(better, cols.to(tl.int64), tile_arg)
        tile_max = tl.where(better, z, tile_max)
    t_max = tl.max(tile_max, 0)
    # smallest column index attaining the max (deterministic argmax, like torch.argmax)
    t_arg = tl.min(tl.where(tile_max == t_max, tile_arg, n_cols), 0)

    m_old = tl.load(m_ptr + row)
    m_new = tl.maximum(m_old, t_max)
    if SOFTCAP:
        shift_old, _ = softcap_and_slope(m_old, cap)
        shift, _ = softcap_and_slope(m_new, cap)
        alpha = tl.exp(shift_old - shift)
    else:
        shift = m_new
        alpha = tl.exp(m_old - m_new)

    # Pass 2: exponentials, sums, optional P and statistics.
    acc_s = tl.zeros((BLOCK_V,), tl.float32)
    acc_sx = tl.zeros((BLOCK_V,), tl.float32)
    acc_ez = tl.zeros((BLOCK_V,), tl.float32)
    acc_z = tl.zeros((BLOCK_V,), tl.float32)
    acc_e2 = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        z = tl.load(z_row + cols, mask=valid, other=float("-inf"))
        if SOFTCAP:
            z, slope = softcap_and_slope(z, cap)
            e = tl.where(valid, tl.exp(z - shift), 0.0)  # cap(-inf) = -c: mask explicitly
        else:
            e = tl.exp(z - m_new)
        acc_s += e
        if WRITE_P:
            p = tl.where(cols == local_label, 0.0, e)
            acc_sx += p
            if SOFTCAP:
                p = p * slope
            tl.store(p_ptr + row * p_stride + cols, p.to(p_ptr.dtype.element_ty), mask=valid)
        if STATS:
            z0 = tl.where(valid, z, 0.0)
            acc_ez += e * z0
            acc_z += z0
            acc_e2 += e * e

    s_new = tl.load(s_ptr + row) * alpha + tl.sum(acc_s, 0)
    tl.store(m_ptr + row, m_new)
    tl.store(s_ptr + row, s_new)
    if WRITE_P:
        tl.store(alpha_ptr + row, alpha)
        tl.store(sx_ptr + row, tl.load(sx_ptr + row) * alpha + tl.sum(acc_sx, 0))

    in_tile = (local_label >= 0) & (local_label < n_cols)
    safe_label = tl.where(in_tile, local_label, 0)
    zl = tl.load(z_row + safe_label)
    old_ll = tl.load(label_logit_ptr + row)
    tl.store(label_logit_ptr + row, tl.where(in_tile, zl, old_ll))

    if STATS:
        tl.store(sez_ptr + row, tl.load(sez_ptr + row) * alpha + tl.sum(acc_ez, 0))
        tl.store(sz_ptr + row, tl.load(sz_ptr + row) + tl.sum(acc_z, 0))
        tl.store(se2_ptr + row, tl.load(se2_ptr + row) * alpha * alpha + tl.sum(acc_e2, 0))
        old_arg = tl.load(amax_ptr + row)
        tl.store(amax_ptr + row, tl.where(t_max > m_old, t_arg + v0, old_arg))


def online_softmax_tile(
    z: torch.Tensor,
    labels: torch.Tensor,
    v0: int,
    m: torch.Tensor,
    s: torch.Tensor,
    label_logit: torch.Tensor,
    p_out: Optional[torch.Tensor] = None,
    alpha_out: Optional[torch.Tensor] = None,
    stats: Optional[dict] = None,
    s_excl: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> None:
    """Update the running (m, s, label_logit[, s_excl][, stats]) with tile ``z`` in place.

    z: [n, c] fp32 logits of vocabulary ids [v0, v0 + c); labels: [n] int64 global ids.
    p_out ([n, c], any float dtype) and alpha_out ([n] fp32) are written when given; then s_excl
    ([n] fp32, the running sum of exp(z - m) over the non-label columns) is updated too.
    stats, when given, holds fp32 'sum_ez', 'sum_z', 'sum_e2' and int64 'argmax' tensors of [n].
    softcap (a positive float, or None): softmax over c * tanh(z / c), as in the module docstring.
    """
    n, c = z.shape
    if n == 0:
        return
    assert z.dtype == torch.float32 and z.stride(1) == 1
    write_p = p_out is not None
    if write_p:
        assert alpha_out is not None and s_excl is not None and p_out.stride(1) == 1
    dummy = m
    block_v = min(triton.next_power_of_2(c), 4096 if z.is_cuda else 256)
    _online_softmax_tile_kernel[(n,)](
        z, z.stride(0),
        labels,
        m, s, label_logit,
        p_out if write_p else dummy, p_out.stride(0) if write_p else 0, alpha_out if write_p else dummy,
        s_excl if write_p else dummy,
        stats["sum_ez"] if stats else dummy, stats["sum_z"] if stats else dummy,
        stats["argmax"] if stats else labels, stats["sum_e2"] if stats else dummy,
        v0, c, float(softcap) if softcap else 1.0,
        WRITE_P=write_p, STATS=stats is not None, SOFTCAP=bool(softcap), BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
