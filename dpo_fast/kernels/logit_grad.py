"""Gradient of per-token log-probs with respect to one tile of logits.

For the trainable-weight backward (two-pass recompute form): given fp32 logits z of
vocabulary ids [v0, v0 + c), the final log-sum-exp and the upstream gradient g per row, write
``G = g * (onehot(label) - exp(z - lse))`` in the GEMM input dtype. The caller then forms
``grad_h += G @ W_chunk`` and ``grad_W_chunk += G^T @ h`` with fp32 accumulation.

With final-logit softcapping (``zc = c * tanh(z / c)``, lse over zc) the chain rule through tanh
gives ``G = g * (onehot(label) - exp(zc - lse)) * (1 - tanh(z / c)^2)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dpo_fast.kernels.softcap import softcap_and_slope


@triton.jit
def _logit_grad_kernel(
    z_ptr, z_stride, g_out_ptr, g_out_stride,
    labels_ptr, lse_ptr, grad_ptr,
    v0, n_cols, cap,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        z = tl.load(z_ptr + row * z_stride + cols, mask=valid, other=float("-inf"))
        if SOFTCAP:
            z, slope = softcap_and_slope(z, cap)
            grad = g * (tl.where(cols == label, 1.0, 0.0) - tl.exp(z - lse)) * slope
        else:
            p = tl.exp(z - lse)
            grad = g * (tl.where(cols == label, 1.0, 0.0) - p)
        tl.store(g_out_ptr + row * g_out_stride + cols, grad.to(g_out_ptr.dtype.element_ty), mask=valid)


def logit_grad_tile(
    z: torch.Tensor, labels: torch.Tensor, v0: int, lse: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Write g * (onehot - softmax) for tile ``z`` ([n, c] fp32) into ``out`` ([n, c]) and return it.

    With ``softcap`` the softmax is over c * tanh(z / c) and the product carries its slope.
    """
    n, c = z.shape
    if n == 0:
        return out
    assert z.dtype == torch.float32 and z.stride(1) == 1 and out.stride(1) == 1
    block_v = min(triton.next_power_of_2(c), 4096 if z.is_cuda else 256)
    _logit_grad_kernel[(n,)](
        z, z.stride(0), out, out.stride(0), labels, lse, grad, v0, c, float(softcap) if softcap else 1.0,
        SOFTCAP=bool(softcap), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return out
