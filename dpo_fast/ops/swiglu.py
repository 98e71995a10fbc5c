"""Gated MLP activation ``act(gate) * up`` (SwiGLU, GeGLU) with a backward that recomputes act instead of storing it.

Saves only gate and up (which the MLP holds anyway), not act(gate) nor the product, unlike the
autograd graph of ``act_fn(gate) * up``. ``activation="silu"`` is SwiGLU (Llama, Mistral, Qwen, Phi-3),
``"gelu_tanh"`` GeGLU with transformers' ``gelu_pytorch_tanh`` (Gemma). Triton on CUDA tensors, a torch
mirror on CPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import select_backend
from .tiles import softcap_slope

#: the activations `swiglu` takes
ACTIVATIONS = ("silu", "gelu_tanh")
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _torch_act(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def _torch_slope(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(g) in fp32 for fp32 g."""
    if activation == "silu":
        sg = torch.sigmoid(g)
        return sg * (1.0 + g * (1.0 - sg))
    inner = _GELU_K * (g + _GELU_C * g * g * g)
    t = torch.tanh(inner)  # 1 - t^2 below as the kernel computes it, without cancellation where t saturates
    return 0.5 * (1.0 + t) + 0.5 * g * softcap_slope(inner, 1.0) * _GELU_K * (1.0 + 3.0 * _GELU_C * g * g)


class SwiGLUFunction(torch.autograd.Function):
    """h = act(gate) * up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str, activation: str = "silu") -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        if backend == "triton":
            from ..kernels.swiglu import swiglu_forward
            h = swiglu_forward(gate, up, activation)
        else:
            h = (_torch_act(gate.float(), activation).to(gate.dtype).float() * up.float()).to(gate.dtype)
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        ctx.activation = activation
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        if ctx.backend == "triton":
            from ..kernels.swiglu import swiglu_backward
            dg, du = swiglu_backward(dh, gate, up, ctx.activation)
        else:
            g, u, d = gate.float(), up.float(), dh.float()
            du = (d * _torch_act(g, ctx.activation)).to(up.dtype)
            dg = (d * u * _torch_slope(g, ctx.activation)).to(gate.dtype)
        return dg, du, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, activation: str = "silu", backend: Optional[str] = None
           ) -> torch.Tensor:
    """act(gate) * up, elementwise; gate and up must have the same shape and dtype.

    activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, transformers' ``gelu_pytorch_tanh``).
    backend: "triton", "torch" or None (automatic, see dpo_fast.ops.backend).
    """
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError("gate and up must be tensors")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must match in shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be floating point, got {gate.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    backend = select_backend(gate, backend)
    return SwiGLUFunction.apply(gate, up, backend, activation)
