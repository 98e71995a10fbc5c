"""Per-tile steps of the fused head, dispatched to Triton or to their pure-torch mirrors.

The torch versions are line-for-line the same algorithm as the kernels in
`dpo_fast.kernels.online_softmax` / `dpo_fast.kernels.logit_grad`, so CPU training keeps the
bounded memory of the chunked design, and the kernels have an executable specification.
"""
from __future__ import annotations

from typing import Optional

import torch


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result, without rounding the product to a 16-bit dtype first."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


_fused_addmm_ok: Optional[bool] = None


def _probe_fused_addmm(device: torch.device) -> bool:
    """Does ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` work here (CUDA, torch >= 2.9)?

    Checked once against the unfused form on a small problem, so a torch without the fp32-output
    overload (or with different aliasing rules) silently gets the safe path instead.
    """
    try:
        a = torch.randn(64, 48, device=device, dtype=torch.bfloat16)
        b = torch.randn(48, 32, device=device, dtype=torch.bfloat16)
        acc = torch.randn(64, 32, device=device)
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b, accumulating in fp32 (acc is fp32); one fused GEMM epilogue where possible."""
    global _fused_addmm_ok
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and a.dtype == b.dtype:
        if _fused_addmm_ok is None:
            _fused_addmm_ok = _probe_fused_addmm(a.device)
        if _fused_addmm_ok:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


def softcap_values(z: torch.Tensor, cap: float) -> torch.Tensor:
    """Final-logit softcapping ``cap * tanh(z / cap)`` (a new tensor)."""
    return torch.tanh(z / cap).mul_(cap)


def softcap_slope(z: torch.Tensor, cap: float) -> torch.Tensor:
    """``d softcap_values / dz = 1 - tanh(z / cap)^2``, as ``4e / (1 + e)^2`` with ``e = exp(-2|z / cap|)``:
    accurate where tanh saturates (``1 - t*t`` from a rounded t near 1 is not); the kernels use the same form."""
    e = (z / cap).abs_().mul_(-2.0).exp_()
    return e.mul(4.0).div_((e + 1.0).square_())


def online_softmax_tile(
    backend: str,
    z: torch.Tensor,
    labels: torch.Tensor,
    v0: int,
    m: torch.Tensor,
    s: torch.Tensor,
    label_logit: torch.Tensor,
    p_out: Optional[torch.Tensor] = None,
    alpha_out: Optional[torch.Tensor] = None,
    stats: Optional[dict] = None,
    s_excl: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> None:
    """In-place online-softmax update with tile z = logits of ids [v0, v0 + z.shape[1]).

    With p_out: also alpha_out and s_excl, the running sum of exp(z - m) without the label column.
    With softcap: the softmax and the statistics are over zc = softcap * tanh(z / softcap); m, the
    argmax and label_logit stay on the raw z (the caller caps them); p_out carries dzc/dz.
    """
    if backend == "triton":
        from dpo_fast.kernels.online_softmax import online_softmax_tile as kernel

        kernel(z, labels, v0, m, s, label_logit, p_out, alpha_out, stats, s_excl, softcap)
        return
    n, c = z.shape
    if n == 0:
        return
    t_max, t_arg = z.max(dim=1)
    m_new = torch.maximum(m, t_max)
    raw = z
    if softcap:
        z = softcap_values(raw, softcap)
        shift = softcap_values(m_new, softcap)
        alpha = torch.exp(softcap_values(m, softcap) - shift)
        e = torch.sub(z, shift[:, None]).exp_()
    else:
        alpha = torch.exp(m - m_new)
        e = torch.sub(z, m_new[:, None]).exp_()
    local = labels - v0
    in_tile = (local >= 0) & (local < c)
    safe = torch.where(in_tile, local, torch.zeros_like(local))
    if stats is not None:
        def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # sum(a * b, 1) without a temporary tile
            return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)

        stats["sum_ez"].mul_(alpha).add_(row_dot(e, z))
        stats["sum_z"].add_(z.sum(1))
        stats["sum_e2"].mul_(alpha * alpha).add_(row_dot(e, e))
        stats["argmax"].copy_(torch.where(t_max > m, t_arg + v0, stats["argmax"]))
    s.mul_(alpha).add_(e.sum(1))
    label_logit.copy_(torch.where(in_tile, raw.gather(1, safe[:, None]).squeeze(1), label_logit))
    m.copy_(m_new)
    if p_out is not None:
        e.scatter_(1, safe[:, None], torch.where(in_tile[:, None], 0.0, e.gather(1, safe[:, None])))
        s_excl.mul_(alpha).add_(e.sum(1))
        p_out.copy_(e.mul_(softcap_slope(raw, softcap)) if softcap else e)
        alpha_out.copy_(alpha)


def logit_grad_tile(
    backend: str, z: torch.Tensor, labels: torch.Tensor, v0: int, lse: torch.Tensor, grad: torch.Tensor, out: torch.Tensor,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """out = grad * (onehot(labels - v0) - exp(z - lse)), for tile z of ids [v0, v0 + c).

    With softcap: grad * (onehot - exp(zc - lse)) * dzc/dz, zc = softcap * tanh(z / softcap).
    """
    if backend == "triton":
        from dpo_fast.kernels.logit_grad import logit_grad_tile as kernel

        return kernel(z, labels, v0, lse, grad, out, softcap)
    n, c = z.shape
    if n == 0:
        return out
    g = -torch.exp((softcap_values(z, softcap) if softcap else z) - lse[:, None])
    local = labels - v0
    in_tile = (local >= 0) & (local < c)
    rows = torch.nonzero(in_tile).squeeze(1)
    g[rows, local[rows]] += 1.0
    if softcap:
        g.mul_(softcap_slope(z, softcap))
    out.copy_(g.mul_(grad[:, None]))
    return out
