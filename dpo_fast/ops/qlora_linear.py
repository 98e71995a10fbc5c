"""LoRA linear over a frozen (optionally bitsandbytes 4-bit) base, with a manual backward.

    y = x W^T (+ bias) + scaling * (dropout(x) A^T) B^T

Forward dequantizes W (nf4/fp4, double quant included; see below) and multiplies with cuBLAS; it
saves only x (plus a bool dropout mask when dropout > 0), the tiny [N, r] product ``dropout(x) A^T``
and the rank-r adapters in the compute dtype. Backward dequantizes W again for ``grad_x`` and
computes gradients for A and B only: the base weight and bias are frozen, so no grad_W is formed.
Autograd through peft + bitsandbytes instead keeps the LoRA branch's intermediates and casts. Each
operand is cast once, where it is made: on a GPU every cast is a kernel launch the CPU has to issue,
and a step runs this op 7 times per layer and pass.

With ``output=False`` (a gradient-checkpointing recompute of a layer's last projection, whose output
nobody reads: dpo_fast.patching.checkpointing) forward skips both GEMMs and returns an uninitialized y.

The LoRA term is computed first and the base GEMM accumulates onto it (cuBLAS beta=1), in forward
(y) and backward (grad_x): adding it after the GEMM instead would be a separate read-modify-write
pass over the [N, out] result. `benchmarks/profile_step.py` times both orders per projection.

Dequantize-then-matmul is used on every device (the dequantization itself is
dpo_fast.kernels.dequant_4bit on CUDA once `patch` marks the base, bitsandbytes' otherwise): the
dequantization is a small, memory-bound share of a QLoRA step while cuBLAS runs the GEMMs near peak,
so a fused Triton dequant+GEMM could save little and would have to match cuBLAS to save anything.
The profile behind this decision is in benchmarks/RESULTS.md; design: docs/design.md, "Body kernels".

Precision: the base matmul runs in the base layer's compute dtype (bitsandbytes' ``compute_dtype``,
else x's dtype) like bitsandbytes; the adapters are cast to that dtype once per call and the LoRA
products run in it too, with fp32 accumulation (no fp32 copies of activations), as Unsloth does
(only when x's dtype differs from the compute dtype, e.g. fp32 x over a bf16-compute 4-bit base, is
the LoRA term added in x's dtype, as peft does); the adapters' gradients come back in their own
dtype (fp32 by peft's default); in fp32 this is exact.
Under autocast (HF/TRL ``bf16=True``, dpo_fast's trainer on a GPU) the matmuls run in the autocast dtype
and y comes out in the dtype peft's forward gives (the autocast dtype over a plain linear, x's dtype
over bitsandbytes' 4-bit layer, which casts back); the op itself runs with autocast off and casts
explicitly, so forward and backward use the same precisions.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backend import select_backend


@functools.lru_cache(maxsize=None)
def _bnb_linear4bit_type():
    """bitsandbytes' Linear4bit class, or None; looked up once (this op runs 7 times per layer and pass)."""
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover - bitsandbytes is optional
        return None
    return bnb.nn.Linear4bit


def is_4bit_base(base: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit."""
    l4 = _bnb_linear4bit_type()
    return l4 is not None and isinstance(base, l4)


def quant_state(base: nn.Module):
    """A 4-bit base's bitsandbytes QuantState: on its weight, or on the layer when a wrapper replaced the weight
    (FSDP registers a plain tensor while it gathers a sharded layer; bitsandbytes keeps the state on the layer)."""
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


def is_supported_base(base: nn.Module) -> bool:
    """True for a frozen nn.Linear or bitsandbytes Linear4bit (the bases this op handles)."""
    if is_4bit_base(base):
        qs = quant_state(base)
        return qs is not None and not getattr(qs, "packing_format_for_cpu", False) and not base.weight.requires_grad
    if type(base) is nn.Linear:
        return not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    return False


def base_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the base matmul runs in: the autocast dtype under autocast, else bitsandbytes'
    compute_dtype, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if is_4bit_base(base):
        return getattr(base, "compute_dtype", None) or x.dtype
    return x.dtype


def op_dtypes(base: nn.Module, x: torch.Tensor) -> Tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype) of the op over `base` for input x: the output dtype is what peft's
    forward gives, the autocast dtype over a plain linear under autocast, else x's dtype (bitsandbytes'
    Linear4bit casts its output back to the input's dtype)."""
    cdtype = base_compute_dtype(base, x)
    autocast_out = torch.is_autocast_enabled(x.device.type) and type(base) is nn.Linear
    return cdtype, cdtype if autocast_out else x.dtype


def lora_then_base(x_c: torch.Tensor, h: torch.Tensor, b_c: torch.Tensor, scaling: float, base: nn.Module,
                   cdtype: torch.dtype) -> torch.Tensor:
    """x_c W^T (+ bias) + scaling * h B^T in `cdtype`, [N, out]: the LoRA term first, then the base GEMM
    accumulates onto it (cuBLAS beta=1), so the [N, out] partial sum is read inside the compute-bound GEMM
    instead of in a separate memory-bound pass over y. `h` may be a column slice of a wider [N, R] product."""
    w = dense_weight(base, cdtype)
    if base.bias is None:
        y = torch.empty(x_c.shape[0], w.shape[0], dtype=cdtype, device=x_c.device)
        y.addmm_(h, b_c.t(), beta=0, alpha=scaling)
    else:
        y = torch.addmm(base.bias.to(cdtype), h, b_c.t(), alpha=scaling)
    y.addmm_(x_c, w.t())
    return y


#: set on a bitsandbytes 4-bit base (by `patch_body(nf4_dequant=True)`): dequantize it with dpo_fast's kernel
TRITON_DEQUANT = "_dpo_fast_triton_dequant"


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] as a dense tensor of `dtype` (dequantized for 4-bit layers: by
    dpo_fast.kernels.dequant_4bit, bitwise bitsandbytes' values in one kernel instead of three, for a base
    marked TRITON_DEQUANT on the Triton backend; by bitsandbytes otherwise)."""
    if is_4bit_base(base):
        w = base.weight
        if base.__dict__.get(TRITON_DEQUANT) and select_backend(w.data) == "triton":
            from ..kernels.dequant_4bit import dequantize_4bit
            return dequantize_4bit(w.data, quant_state(base)).to(dtype)
        import bitsandbytes.functional as bnbF
        return bnbF.dequantize_4bit(w.data, quant_state(base)).to(dtype)
    if isinstance(base, nn.Linear):
        return base.weight.to(dtype)
    raise TypeError(f"base must be nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}")


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep-mask shaped like x, each entry kept with probability 1 - p (from torch's RNG)."""
    return torch.rand(x.shape, device=x.device) >= p


def _dropped(x2: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """dropout(x) from the saved keep-mask (x itself when p == 0)."""
    if p == 0:
        return x2
    return x2 * mask.reshape(x2.shape).to(x2.dtype) * (1.0 / (1.0 - p))


class LoRALinearFunction(torch.autograd.Function):
    """y = base(x) + scaling * dropout(x) A^T B^T with base frozen; grads for x, A and B only."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, mask: Optional[torch.Tensor],
                output: bool = True):
        cdtype, out_dtype = op_dtypes(base, x)
        with torch.autocast(x.device.type, enabled=False):
            return LoRALinearFunction._forward(ctx, x, lora_a, lora_b, base, scaling, p, mask, cdtype, out_dtype,
                                               output)

    @staticmethod
    def _forward(ctx, x, lora_a, lora_b, base, scaling, p, mask, cdtype, out_dtype, output):
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)
        xc = x2.to(cdtype)
        xd = xc if p == 0 else _dropped(x2, mask, p).to(cdtype)
        a_c, b_c = lora_a.to(cdtype), lora_b.to(cdtype)
        # [N, r] in the compute dtype: every later use (the LoRA term, grad_b) reads it in that dtype
        h = xd @ a_c.t()
        del xd
        if not output:  # nobody reads y (see lora_linear): backward needs only what is saved below
            y = torch.empty(x2.shape[0], base.out_features, dtype=out_dtype, device=x.device)
        elif out_dtype == cdtype:
            y = lora_then_base(xc, h, b_c, scaling, base, cdtype)
        else:  # e.g. fp32 x over a bf16-compute 4-bit base: the LoRA term is added in x's dtype, as peft does
            bias = base.bias.to(cdtype) if base.bias is not None else None
            y = F.linear(xc, dense_weight(base, cdtype), bias).to(out_dtype)
            y.addmm_(h.to(y.dtype), lora_b.t().to(y.dtype), alpha=scaling)
        del xc
        ctx.base, ctx.scaling, ctx.p, ctx.x_shape, ctx.cdtype = base, scaling, p, x.shape, cdtype
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        # the adapters' compute-dtype copies (rank-r, small) go to backward too, so it casts nothing
        ctx.save_for_backward(x2, h, a_c, b_c, mask if p > 0 else None)
        return y  # 2-D; the caller reshapes (a view made here would forbid in-place ops on it later)

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return LoRALinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, h, a_c, b_c, mask = ctx.saved_tensors
        base, s, p, cdtype = ctx.base, ctx.scaling, ctx.p, ctx.cdtype
        a_dtype, b_dtype = ctx.adapter_dtypes
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dyc = dy2.to(cdtype)
        g_h = (dyc @ b_c).mul_(s)                                  # [N, r] = dL/dh, compute dtype
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (dyc.t() @ h).to(b_dtype).mul_(s)             # [out, r]
        if need_a:
            xd = _dropped(x2, mask, p).to(cdtype)
            grad_a = (g_h.t() @ xd).to(a_dtype)                    # [r, in]
            del xd
        if need_x:
            # the LoRA term first and the base GEMM accumulating onto it, as in forward
            grad_x = g_h @ a_c if p == 0 else _dropped(g_h @ a_c, mask, p)
            w = dense_weight(base, cdtype)
            grad_x.addmm_(dyc, w)
            del w
            grad_x = grad_x.to(x2.dtype).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def lora_linear(x: torch.Tensor, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                dropout_p: float = 0.0, mask: Optional[torch.Tensor] = None, output: bool = True) -> torch.Tensor:
    """base(x) + scaling * dropout(x) @ lora_a.T @ lora_b.T, base frozen.

    Args:
        x: [..., in] input.
        base: frozen nn.Linear or bitsandbytes Linear4bit with weight [out, in].
        lora_a: [r, in] and lora_b: [out, r], the LoRA weights (any float dtype; grads come back in it).
        scaling: the LoRA scale (alpha / r).
        dropout_p: LoRA dropout probability, applied to x on the LoRA branch only.
        mask: optional bool keep-mask shaped like x (drawn with `dropout_mask` when None and p > 0).
        output: False when the caller will never read y's values, only back-propagate through it (a
            gradient-checkpointing recompute of a layer's last projection, dpo_fast.patching.checkpointing):
            y is then an uninitialized tensor of the right shape and dtype, the GEMMs that would fill it
            are skipped, and backward is unchanged.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if not is_supported_base(base):
        raise TypeError(f"base must be a frozen nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}")
    out_f, in_f = (base.out_features, base.in_features)
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features but base expects {in_f}")
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != in_f or lora_b.shape != (out_f, lora_a.shape[0]):
        raise ValueError(f"lora_a must be [r, {in_f}] and lora_b [{out_f}, r], got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        if mask is None:
            mask = dropout_mask(x, dropout_p)
        elif mask.shape != x.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor shaped like x {tuple(x.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    else:
        mask = None
    y = LoRALinearFunction.apply(x, lora_a, lora_b, base, float(scaling), float(dropout_p), mask, bool(output))
    return y.view(*x.shape[:-1], out_f)
