"""RMSNorm with a hand-written backward that keeps only the input and one fp32 rstd per row.

Numerics follow transformers. By default LlamaRMSNorm's: statistics in fp32, the normalised row cast
back to the input dtype, then multiplied by the weight (the output dtype is the promotion of the
weight's and the input's dtypes, as in ``weight * x.to(input_dtype)``). With ``offset=1.0,
scale_in_fp32=True`` GemmaRMSNorm's (Gemma, Gemma 2, Gemma 3, whose weights are stored centred on 0):
``(x_normalised_fp32 * (1 + weight.float())).to(x.dtype)``, the scale applied in fp32 and one cast at
the end. Triton on CUDA tensors, a torch mirror of the same forward/backward on CPU (see
`dpo_fast.ops.backend`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .backend import select_backend


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be 1-D with x.shape[-1]={x.shape[-1]} entries, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")


def _torch_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                   offset: float, scale_in_fp32: bool):
    xf = x2d.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    if scale_in_fp32:  # Gemma: (x * rstd * (offset + w)) in fp32, one cast
        return ((xf * rstd[:, None]) * (weight.float() + offset)).to(out_dtype), rstd
    xn = (xf * rstd[:, None]).to(x2d.dtype)
    if offset:
        return ((weight.float() + offset) * xn.float()).to(out_dtype), rstd
    return (weight.to(out_dtype) * xn.to(out_dtype)).to(out_dtype), rstd


def _torch_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                    compute_dw: bool, offset: float):
    xh = x2d.float() * rstd[:, None]
    dy = dy2d.float()
    g = dy * (weight.float() + offset)
    c = (g * xh).mean(-1, keepdim=True)
    dx = ((g - xh * c) * rstd[:, None]).to(x2d.dtype)
    return dx, ((dy * xh).sum(0) if compute_dw else None)


class RMSNormFunction(torch.autograd.Function):
    """y = (offset + weight) * round_to_input_dtype(x * rstd), or round(x * rstd * (offset + weight)) with
    scale_in_fp32; saves x and rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str, offset: float = 0.0,
                scale_in_fp32: bool = False) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        out_dtype = x.dtype if scale_in_fp32 else torch.promote_types(x.dtype, weight.dtype)
        if backend == "triton":
            from ..kernels.rms_norm import rms_norm_forward
            y, rstd = rms_norm_forward(x2d, weight.contiguous(), float(eps), out_dtype, offset, scale_in_fp32)
        else:
            y, rstd = _torch_forward(x2d, weight, eps, out_dtype, offset, scale_in_fp32)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.backend = backend
        ctx.offset = offset
        ctx.shape = shape
        return y  # 2-D; reshaped by the caller (views made inside a Function forbid later in-place ops)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        compute_dw = ctx.needs_input_grad[1]
        if ctx.backend == "triton":
            from ..kernels.rms_norm import rms_norm_backward
            dx, dw = rms_norm_backward(dy2d, x2d, weight.contiguous(), rstd, compute_dw, ctx.offset)
        else:
            dx, dw = _torch_backward(dy2d, x2d, weight, rstd, compute_dw, ctx.offset)
        dx = dx.view(ctx.shape) if ctx.needs_input_grad[0] else None  # x's shape (x2d was saved)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             scale_in_fp32: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` with learnable (or frozen) ``weight``.

    Defaults: LlamaRMSNorm. ``offset=1.0, scale_in_fp32=True``: GemmaRMSNorm (Gemma 1/2/3), whose scale is
    ``1 + weight`` applied to the fp32 normalised row before the one cast to ``x``'s dtype (the output
    then has ``x``'s dtype, not the promotion of ``x``'s and ``weight``'s).
    backend: "triton", "torch" or None (automatic: Triton for CUDA tensors, see ops.backend).
    """
    _check(x, weight)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset}")
    backend = select_backend(x, backend)
    return RMSNormFunction.apply(x, weight, eps, backend, float(offset), bool(scale_in_fp32)).view(x.shape)
