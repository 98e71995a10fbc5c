"""RMSNorm forward and backward over the rows of a [N, D] matrix (LlamaRMSNorm and GemmaRMSNorm).

Forward, per row: ``rstd = 1/sqrt(mean(x^2) + eps)`` in fp32 and the scale ``s = offset + w`` in fp32.
Llama's rounding (SCALE_FP32 off): ``y = s * round(x * rstd)``, where ``round`` casts to the input
dtype first, exactly as transformers does (it normalises in fp32, casts back, then multiplies by the
weight). Gemma's (SCALE_FP32 on, offset 1): ``y = round(x * rstd * s)``, the scale applied in fp32
and one cast at the end. Only ``x`` and ``rstd`` are kept for backward.

Backward, per row with ``xh = x * rstd`` and ``g = dy * s``:
``dx = rstd * (g - xh * mean(g * xh))``; ``dw = sum_rows dy * xh`` is accumulated per program in
fp32 and the [programs, D] partial sums are added up by the caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, x_stride, w_ptr, y_ptr, y_stride, rstd_ptr,
    n_cols, eps, offset,
    SCALE_FP32: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    xn = x * rstd
    if not SCALE_FP32:
        # Llama: the normalised row is cast to the input dtype before the weight multiply
        xn = xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + row * y_stride + cols, (xn * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, dy_stride, x_ptr, x_stride, w_ptr, rstd_ptr, dx_ptr, dx_stride, dw_ptr,
    n_rows, n_cols, rows_per_program, offset,
    COMPUTE_DW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    start64 = row_start.to(tl.int64)
    x_row = x_ptr + start64 * x_stride
    dy_row = dy_ptr + start64 * dy_stride
    dx_row = dx_ptr + start64 * dx_stride
    rstd_row = rstd_ptr + start64
    for _ in range(row_start, row_end):
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_row)
        xh = x * rstd
        g = dy * w
        c = tl.sum(g * xh, axis=0) / n_cols
        dx = (g - xh * c) * rstd
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * xh
        x_row += x_stride
        dy_row += dy_stride
        dx_row += dx_stride
        rstd_row += 1
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def _block(d: int) -> int:
    return max(triton.next_power_of_2(d), 16)


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                     offset: float = 0.0, scale_in_fp32: bool = False):
    """y [N, D] (out_dtype) and rstd [N] fp32 for a row-major x2d [N, D]; the scale is offset + weight."""
    n, d = x2d.shape
    y = torch.empty((n, d), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x2d.device)
    if n == 0:
        return y, rstd
    block = _block(d)
    _rms_norm_fwd_kernel[(n,)](
        x2d, x2d.stride(0), weight, y, y.stride(0), rstd, d, eps, float(offset),
        SCALE_FP32=bool(scale_in_fp32), BLOCK=block, num_warps=min(max(block // 256, 1), 16),
    )
    return y, rstd


def rms_norm_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      compute_dw: bool, offset: float = 0.0):
    """dx [N, D] (x's dtype) and, when compute_dw, dw [D] fp32."""
    n, d = x2d.shape
    dx = torch.empty_like(x2d)
    if n == 0:
        return dx, (torch.zeros(d, dtype=torch.float32, device=x2d.device) if compute_dw else None)
    if x2d.is_cuda:
        programs = min(n, 4 * torch.cuda.get_device_properties(x2d.device).multi_processor_count)
    else:
        programs = min(n, 4)
    rows_per_program = triton.cdiv(n, programs)
    programs = triton.cdiv(n, rows_per_program)
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x2d.device) if compute_dw else dx
    block = _block(d)
    _rms_norm_bwd_kernel[(programs,)](
        dy2d, dy2d.stride(0), x2d, x2d.stride(0), weight, rstd, dx, dx.stride(0), dw_partial,
        n, d, rows_per_program, float(offset),
        COMPUTE_DW=compute_dw, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
    )
    return dx, (dw_partial.sum(0) if compute_dw else None)
