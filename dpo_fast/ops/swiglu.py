"""SwiGLU ``silu(gate) * up`` with a backward that recomputes silu instead of storing it.

Saves only gate and up (which the MLP holds anyway), not silu(gate) nor the product, unlike the
autograd graph of ``act_fn(gate) * up``. Triton on CUDA tensors, a torch mirror on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .backend import select_backend


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(gate) * up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        if backend == "triton":
            from ..kernels.swiglu import swiglu_forward
            h = swiglu_forward(gate, up)
        else:
            h = (F.silu(gate.float()).to(gate.dtype).float() * up.float()).to(gate.dtype)
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        if ctx.backend == "triton":
            from ..kernels.swiglu import swiglu_backward
            dg, du = swiglu_backward(dh, gate, up)
        else:
            g, u, d = gate.float(), up.float(), dh.float()
            sg = torch.sigmoid(g)
            du = (d * g * sg).to(up.dtype)
            dg = (d * u * sg * (1.0 + g * (1.0 - sg))).to(gate.dtype)
        return dg, du, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up must have the same shape and dtype.

    backend: "triton", "torch" or None (automatic, see dpo_fast.ops.backend).
    """
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError("gate and up must be tensors")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must match in shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be floating point, got {gate.dtype}")
    backend = select_backend(gate, backend)
    return SwiGLUFunction.apply(gate, up, backend)
