"""Several LoRA linears that read the same input (q/k/v, gate/up), as one op with a manual backward.

    y_i = x W_i^T (+ bias_i) + scaling_i * (x A_i^T) B_i^T        for i = 1..n, dropout 0

Against n separate `dpo_fast.ops.qlora_linear.lora_linear` calls this reads x once for all the A
products (one GEMM with the stacked [sum r, in] A), and in backward it builds grad_x in one buffer: the
stacked LoRA term first (one GEMM), then each base GEMM accumulating onto it, where separate calls
would each write a grad_x that autograd then adds up. One autograd node instead of n, and a few
kernel launches fewer per layer and pass. Each base weight is still dequantized on its own, just
before its GEMM, so peak memory is that of the largest projection, as before.

Precision is that of `lora_linear` (same compute dtype, same casts, fp32 accumulation); dropout > 0
is not handled here (each projection has its own mask): callers use `lora_linear` then.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .qlora_linear import dense_weight, is_supported_base, lora_then_base, op_dtypes


class LoRAGroupFunction(torch.autograd.Function):
    """(y_1, ..., y_n) for n LoRA linears over frozen bases sharing x; grads for x and every A, B."""

    @staticmethod
    def forward(ctx, x, bases, scalings, *adapters):
        cdtype, _ = op_dtypes(bases[0], x)
        with torch.autocast(x.device.type, enabled=False):
            return LoRAGroupFunction._forward(ctx, x, bases, scalings, adapters, cdtype)

    @staticmethod
    def _forward(ctx, x, bases, scalings, adapters, cdtype):
        n = len(bases)
        lora_as, lora_bs = adapters[:n], adapters[n:]
        x2 = x.reshape(-1, x.shape[-1])
        xc = x2.to(cdtype)
        a_cat = torch.cat(lora_as).to(cdtype)               # [R, in], R = sum of the ranks
        h_cat = xc @ a_cat.t()                              # [N, R]: x read once for every A
        b_cs = [b.to(cdtype) for b in lora_bs]
        ranks = [a.shape[0] for a in lora_as]
        ys, off = [], 0
        for base, b_c, s, r in zip(bases, b_cs, scalings, ranks):
            ys.append(lora_then_base(xc, h_cat[:, off:off + r], b_c, s, base, cdtype))
            off += r
        ctx.bases, ctx.scalings, ctx.ranks, ctx.cdtype, ctx.x_shape = bases, scalings, ranks, cdtype, x.shape
        ctx.adapter_dtypes = (lora_as[0].dtype, lora_bs[0].dtype)
        ctx.save_for_backward(x2, h_cat, a_cat, *b_cs)
        return tuple(ys)  # 2-D each; the caller reshapes

    @staticmethod
    def backward(ctx, *dys):
        with torch.autocast(dys[0].device.type, enabled=False):
            return LoRAGroupFunction._backward(ctx, dys)

    @staticmethod
    def _backward(ctx, dys):
        x2, h_cat, a_cat, *b_cs = ctx.saved_tensors
        cdtype, ranks, n = ctx.cdtype, ctx.ranks, len(ctx.bases)
        a_dtype, b_dtype = ctx.adapter_dtypes
        need_x = ctx.needs_input_grad[0]
        need_a = ctx.needs_input_grad[3:3 + n]
        need_b = ctx.needs_input_grad[3 + n:]
        dycs = [dy.reshape(-1, dy.shape[-1]).to(cdtype) for dy in dys]
        g_parts, grad_bs, off = [], [], 0
        for i, (dyc, b_c, s, r) in enumerate(zip(dycs, b_cs, ctx.scalings, ranks)):
            g_parts.append((dyc @ b_c).mul_(s))                                   # [N, r_i] = dL/dh_i
            grad_bs.append((dyc.t() @ h_cat[:, off:off + r]).to(b_dtype).mul_(s) if need_b[i] else None)
            off += r
        g_cat = torch.cat(g_parts, dim=1)                                         # [N, R]
        grad_as: List = [None] * n
        if any(need_a):
            grad_a_cat = (g_cat.t() @ x2.to(cdtype)).to(a_dtype)                 # [R, in]
            grad_as = [g if need else None for g, need in zip(grad_a_cat.split(ranks), need_a)]
        grad_x = None
        if need_x:
            grad_x = g_cat @ a_cat                                                # the stacked LoRA term first
            for dyc, base in zip(dycs, ctx.bases):
                w = dense_weight(base, cdtype)
                grad_x.addmm_(dyc, w)
                del w
            grad_x = grad_x.to(x2.dtype).view(ctx.x_shape)
        return (grad_x, None, None, *grad_as, *grad_bs)


def can_group(bases: Sequence[nn.Module], lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor],
              x: torch.Tensor) -> bool:
    """Whether `lora_linear_group` reproduces the separate ops here: bases of one supported type with the
    same input size and compute dtype, the output in that dtype, adapters of one dtype each (A's, B's)."""
    if len(bases) < 2 or len({type(b) for b in bases}) != 1 or not all(is_supported_base(b) for b in bases):
        return False
    if len({b.in_features for b in bases}) != 1 or x.shape[-1] != bases[0].in_features:
        return False
    dtypes = {op_dtypes(b, x) for b in bases}
    if len(dtypes) != 1:
        return False
    cdtype, out_dtype = dtypes.pop()
    if cdtype != out_dtype:
        return False
    return len({a.dtype for a in lora_as}) == 1 and len({b.dtype for b in lora_bs}) == 1


def lora_linear_group(x: torch.Tensor, bases: Sequence[nn.Module], lora_as: Sequence[torch.Tensor],
                      lora_bs: Sequence[torch.Tensor], scalings: Sequence[float]) -> List[torch.Tensor]:
    """[base_i(x) + scaling_i * x @ lora_as[i].T @ lora_bs[i].T for each i], bases frozen, no dropout.

    Args:
        x: [..., in] input shared by every projection.
        bases: frozen nn.Linear or bitsandbytes Linear4bit layers, all of one type, each [out_i, in].
        lora_as: [r_i, in] and lora_bs: [out_i, r_i], the LoRA weights (grads come back in their dtypes).
        scalings: the LoRA scales (alpha / r).
    """
    if not (len(bases) == len(lora_as) == len(lora_bs) == len(scalings)):
        raise ValueError("bases, lora_as, lora_bs and scalings must have the same length")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    for base, a, b in zip(bases, lora_as, lora_bs):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features or \
                b.shape != (base.out_features, a.shape[0]):
            raise ValueError(f"lora A must be [r, {base.in_features}] and B [{base.out_features}, r], got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not can_group(bases, lora_as, lora_bs, x):
        raise ValueError("lora_linear_group needs frozen bases of one type, input size and compute dtype, an "
                         "output in that dtype, and adapters of one dtype; use lora_linear per projection")
    return apply_group(x, bases, lora_as, lora_bs, scalings)


def apply_group(x: torch.Tensor, bases: Sequence[nn.Module], lora_as: Sequence[torch.Tensor],
                lora_bs: Sequence[torch.Tensor], scalings: Sequence[float]) -> List[torch.Tensor]:
    """`lora_linear_group` without its checks, for a caller that has run `can_group` itself (the patched
    model, once per layer and pass)."""
    ys = LoRAGroupFunction.apply(x, tuple(bases), tuple(float(s) for s in scalings), *lora_as, *lora_bs)
    return [y.view(*x.shape[:-1], base.out_features) for y, base in zip(ys, bases)]
