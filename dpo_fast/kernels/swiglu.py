"""Gated MLP activations ``h = act(gate) * up``, forward and a backward that recomputes act from gate.

Two activations (the ACT constexpr): SwiGLU, ``act = silu`` (Llama, Mistral, Qwen, Phi-3), and
GeGLU, ``act = gelu_tanh`` (Gemma's ``gelu_pytorch_tanh``: ``0.5 g (1 + tanh(k (g + 0.044715 g^3)))``,
``k = sqrt(2 / pi)``). Elementwise over flat contiguous buffers, in fp32 registers. The forward
rounds act(gate) to the storage dtype before the product, as transformers' ``act_fn(gate_proj(x)) *
up_proj(x)`` does. Backward: ``d_up = dh * act(g)``, ``d_gate = dh * up * act'(g)`` with

    silu'(g)      = sg * (1 + g * (1 - sg)),  sg = sigmoid(g)
    gelu_tanh'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 * 0.044715 g^2),  t = tanh(k (g + 0.044715 g^3))

tanh and ``1 - tanh^2`` come from `dpo_fast.kernels.softcap.softcap_and_slope` (cap 1), accurate where
tanh saturates (the Triton interpreter has no tanh).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softcap import softcap_and_slope

#: the ACT constexpr of each activation name
ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}
_GELU_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _act_and_slope(g, ACT: tl.constexpr):
    """(act(g), act'(g)) of an fp32 block."""
    if ACT == 0:
        sg = tl.sigmoid(g)
        return g * sg, sg * (1.0 + g * (1.0 - sg))
    else:
        t, one_minus_t2 = softcap_and_slope(_GELU_K * (g + _GELU_C * g * g * g), 1.0)
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * one_minus_t2 * _GELU_K * (1.0 + 3.0 * _GELU_C * g * g)
        return act, slope


@triton.jit
def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_slope(g, ACT)
    act = act.to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, slope = _act_and_slope(g, ACT)
    tl.store(du_ptr + offs, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dh * u * slope).to(dg_ptr.dtype.element_ty), mask=mask)


def _block(x: torch.Tensor) -> int:
    return 1024 if x.is_cuda else 256


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for contiguous same-shape tensors."""
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate)
        _glu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, h, n, ACT=ACTIVATION_CODES[activation], BLOCK=block,
                                                   num_warps=4)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu"):
    """(d_gate, d_up) for contiguous same-shape tensors."""
    dg = torch.empty_like(gate)
    du = torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _block(gate)
        _glu_bwd_kernel[(triton.cdiv(n, block),)](dh, gate, up, dg, du, n, ACT=ACTIVATION_CODES[activation],
                                                   BLOCK=block, num_warps=4)
    return dg, du
