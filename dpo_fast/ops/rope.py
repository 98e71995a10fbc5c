"""Rotary position embedding for q and k with a rotate-back backward (no saved activations).

Same contract as transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``:
``q*cos + rotate_half(q)*sin``. cos/sin come from the model's own rotary module
(LlamaRotaryEmbedding), which already applies Llama-3 / linear / dynamic rope scaling and the
attention scaling factor, so every rope type transformers supports is supported by construction.
Only cos and sin (shared by all layers) are kept for backward. The Triton path can write q and k in
place (``inplace=True``), which autograd tracks with ``mark_dirty``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backend import select_backend


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """The transpose of rotate_half: [y1, y2] -> [y2, -y1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def _bhtd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """View x as [B, H, T, D] (it is [B, T, H, D] when unsqueeze_dim == 2)."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _unit_last_stride(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 or x.shape[-1] == 1


class RoPEFunction(torch.autograd.Function):
    """(q, k) -> (q*cos + rotate_half(q)*sin, same for k); backward rotates the gradients back."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim: int, backend: str):
        ctx.unsqueeze_dim, ctx.backend = unsqueeze_dim, backend
        ctx.save_for_backward(cos, sin)
        if backend == "triton":
            q_out, k_out = torch.empty_like(q), torch.empty_like(k)
            _triton_rotate(q, k, cos, sin, q_out, k_out, unsqueeze_dim, backward=False)
            return q_out, k_out
        return _torch_rotate(q, cos, sin, unsqueeze_dim), _torch_rotate(k, cos, sin, unsqueeze_dim)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        ud = ctx.unsqueeze_dim
        if ctx.backend == "triton":
            dq, dk = dq.contiguous(), dk.contiguous()
            dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
            _triton_rotate(dq, dk, cos, sin, dq_in, dk_in, ud, backward=True)
        else:
            dq_in, dk_in = _torch_rotate_back(dq, cos, sin, ud), _torch_rotate_back(dk, cos, sin, ud)
        return dq_in, dk_in, None, None, None, None


class RoPEInplaceFunction(torch.autograd.Function):
    """One tensor rotated in place by the Triton kernel (autograd allows in-place on a view only
    for single-output functions, so q and k go through one call each)."""

    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim: int):
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.save_for_backward(cos, sin)
        _triton_rotate(x, None, cos, sin, x, None, unsqueeze_dim, backward=False)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        dx = dx.contiguous()
        dx_in = torch.empty_like(dx)
        _triton_rotate(dx, None, cos, sin, dx_in, None, ctx.unsqueeze_dim, backward=True)
        return dx_in, None, None, None


def _triton_rotate(q, k, cos, sin, q_out, k_out, unsqueeze_dim: int, backward: bool) -> None:
    from ..kernels.rope import rope_apply
    qv, q_outv = _bhtd(q, unsqueeze_dim), _bhtd(q_out, unsqueeze_dim)
    kv = None if k is None else _bhtd(k, unsqueeze_dim)
    k_outv = None if k_out is None else _bhtd(k_out, unsqueeze_dim)
    if not _unit_last_stride(qv):
        qv = qv.contiguous()
    if kv is not None and not _unit_last_stride(kv):
        kv = kv.contiguous()
    rope_apply(qv, kv, cos, sin, q_outv, k_outv, backward=backward)


def _torch_rotate(x, cos, sin, ud: int):
    c, s = cos.unsqueeze(ud).float(), sin.unsqueeze(ud).float()
    return (x.float() * c + _rotate_half(x.float()) * s).to(x.dtype)


def _torch_rotate_back(dy, cos, sin, ud: int):
    c, s = cos.unsqueeze(ud).float(), sin.unsqueeze(ud).float()
    return (dy.float() * c + _rotate_half_t(dy.float() * s)).to(dy.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
               *, inplace: bool = False, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by the angles in cos/sin [B or 1, T, D].

    unsqueeze_dim: 1 for the [B, H, T, D] layout (Llama's), 2 for [B, T, H, D], as in transformers.
    inplace: let the Triton path overwrite q and k (saves two activations' worth of writes).
    backend: "triton", "torch" or None (automatic, see dpo_fast.ops.backend).
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 4-D floating-point tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, T, D]) or 2 ([B, T, H, D]), got {unsqueeze_dim}")
    dim = q.shape[-1]
    if dim % 2 or k.shape[-1] != dim:
        raise ValueError(f"q and k need the same even head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    seq_axis = 2 if unsqueeze_dim == 1 else 1
    batch, seq = q.shape[0], q.shape[seq_axis]
    if (cos.dim() != 3 or cos.shape != sin.shape or cos.shape[-1] != dim or cos.shape[1] != seq
            or cos.shape[0] not in (1, batch) or k.shape[0] != batch or k.shape[seq_axis] != seq):
        raise ValueError(f"cos/sin must be [B or 1, T, D] = [{batch} or 1, {seq}, {dim}] matching q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}, got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    backend = select_backend(q, backend)
    cos, sin = cos.contiguous(), sin.contiguous()
    if inplace and backend == "triton" and _unit_last_stride(q) and _unit_last_stride(k):
        return RoPEInplaceFunction.apply(q, cos, sin, unsqueeze_dim), RoPEInplaceFunction.apply(k, cos, sin, unsqueeze_dim)
    return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim, backend)
