"""SwiGLU, ``h = silu(gate) * up``, forward and a backward that recomputes silu from gate.

Elementwise over flat contiguous buffers, in fp32 registers. The forward rounds silu(gate) to the
storage dtype before the product, as transformers' ``act_fn(gate_proj(x)) * up_proj(x)`` does.
Backward, with sg = sigmoid(g):  d_up = dh * silu(g),  d_gate = dh * up * sg * (1 + g * (1 - sg)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    act = g * sg
    tl.store(du_ptr + offs, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dh * u * sg * (1.0 + g * (1.0 - sg))).to(dg_ptr.dtype.element_ty), mask=mask)


def _block(x: torch.Tensor) -> int:
    return 1024 if x.is_cuda else 256


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous same-shape tensors."""
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, h, n, BLOCK=block, num_warps=4)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d_gate, d_up) for contiguous same-shape tensors."""
    dg = torch.empty_like(gate)
    du = torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _block(gate)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dh, gate, up, dg, du, n, BLOCK=block, num_warps=4)
    return dg, du
