"""`linear_log_probs`: per-token log-probs of labels under softmax(h W^T + b), no [N, V] logits.

Algorithm: docs/design.md, "The fused head". Rows whose label is ignore_index are dropped first
(compaction). The remaining tokens are processed in token chunks; for each, the vocabulary
is swept in chunks: one GEMM (fp32 output) gives a [tokens, vocab-chunk] logit tile and the
online-softmax tile step folds it into the running max / sum / label logit.

Backward, frozen weight (the QLoRA case): the forward also accumulates, in fp32 and in the same
sweep, the expected embedding without the label column, ``E_excl = sum_{v != y} p_v W[v]``, so
the backward is elementwise: ``dlogp/dh = (1 - p_y) W[y] - E_excl`` (no logits recompute; the
excluded column avoids cancellation on confident tokens).

Backward, trainable weight or bias: the two-pass form; the backward recomputes each logit tile,
turns it into ``g * (onehot - p)`` and accumulates grad_h, grad_W (and grad_b) in fp32.

Final-logit softcapping (``softcap=c``, Gemma 2's ``final_logit_softcapping``): the softmax, the
log-probs and the statistics are over ``zc = c * tanh(z / c)`` with ``z = h W^T + b``. With the slope
``s_v = dzc_v / dz_v = 1 - tanh(z_v / c)^2`` the chain rule gives

    dlogp/dh = sum_v (onehot_v - p_v) s_v W[v] = (1 - p_y) s_y W[y] - sum_{v != y} p_v s_v W[v],

so the one-pass form keeps its shape: the sweep accumulates ``E_excl = sum_{v != y} p_v s_v W[v]``
(each P tile column scaled by its slope, the label column still left out) and multiplies
``1 - p_y`` (still the plain non-label sum over the total, free of cancellation) by the label's
slope ``s_y``. The two-pass backward's tile is ``g * (onehot - p) * s``. The running max (and the
argmax) stay on the raw z: tanh is increasing, so it orders the vocabulary the same way, and the
exponentials are shifted by ``c * tanh(m / c)``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

from dpo_fast.ops.backend import select_backend
from dpo_fast.ops.tiles import (
    addmm_f32_,
    logit_grad_tile,
    mm_f32,
    online_softmax_tile,
    softcap_slope,
    softcap_values,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STAT_NAMES = ("entropy", "mean_logit", "argmax", "log_sum_p2")


_chunk_override: Optional[Tuple[int, int]] = None


@contextlib.contextmanager
def chunking(tokens: int, vocab: int) -> Iterator[None]:
    """Use fixed (token, vocabulary) chunk sizes inside the block: for tests and tuning."""
    global _chunk_override
    if tokens < 1 or vocab < 1:
        raise ValueError("chunk sizes must be positive")
    previous, _chunk_override = _chunk_override, (tokens, vocab)
    try:
        yield
    finally:
        _chunk_override = previous


def _chunk_sizes(n: int, v: int, d: int, on_cuda: bool) -> Tuple[int, int]:
    """Token and vocabulary chunk sizes: the fp32 logit tile stays <= ~128 MB on GPU, 16 MB on CPU."""
    if _chunk_override is not None:
        return _chunk_override
    if on_cuda:
        return 4096, max(1024, min(v, (128 << 20) // (4 * 4096)))
    return 1024, max(512, min(v, (16 << 20) // (4 * 1024)))


def _tile_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype of the probability / logit-gradient tiles that feed the second GEMM.

    On CUDA, the weight's dtype, so the GEMM runs on tensor cores (bf16/fp16 inputs, fp32
    accumulation). On the CPU the GEMM upcasts to fp32 anyway, so rounding the tile to 16 bits
    would only add error.
    """
    return weight.dtype if weight.is_cuda else torch.float32


def _logits_tile(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    z = mm_f32(h, w.t())
    if b is not None:
        z += b.float()
    return z


def _forward_sweep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    want_e: bool,
    want_stats: bool,
    backend: str,
    softcap: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """One pass over the vocabulary: (label logit, lse, E_excl or None, 1 - p_label or None, raw stats or None).

    With `want_e`, 1 - p_label comes as (sum of the non-label exponentials) / (sum of all): accurate
    on confident tokens, where 1 - exp(logp) would cancel. With `softcap` everything is over the
    capped logits and the ``1 - p_label`` output is ``(1 - p_label) * s_label`` (module docstring).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    label_logit = torch.zeros(n, **f32)
    lse = torch.empty(n, **f32)
    e_excl = torch.empty(n, d, **f32) if want_e else None
    q_excl = torch.empty(n, **f32) if want_e else None
    stats = None
    if want_stats:
        stats = {k: torch.zeros(n, **f32) for k in ("sum_ez", "sum_z", "sum_e2")}
        stats["argmax"] = torch.zeros(n, device=dev, dtype=torch.int64)
    tn, tv = _chunk_sizes(n, v, d, hidden.is_cuda)
    for t0 in range(0, n, tn):
        t1 = min(n, t0 + tn)
        h = hidden[t0:t1]
        lab = labels[t0:t1]
        m = torch.full((t1 - t0,), float("-inf"), **f32)
        s = torch.zeros(t1 - t0, **f32)
        st = {k: x[t0:t1] for k, x in stats.items()} if stats is not None else None
        e = e_excl[t0:t1].zero_() if want_e else None
        alpha = torch.empty(t1 - t0, **f32) if want_e else None
        s_excl = q_excl[t0:t1].zero_() if want_e else None
        for v0 in range(0, v, tv):
            v1 = min(v, v0 + tv)
            w = weight[v0:v1]
            z = _logits_tile(h, w, bias[v0:v1] if bias is not None else None)
            p = torch.empty(z.shape, device=dev, dtype=_tile_dtype(weight)) if want_e else None
            online_softmax_tile(backend, z, lab, v0, m, s, label_logit[t0:t1], p, alpha, st, s_excl, softcap)
            if want_e:
                addmm_f32_(e.mul_(alpha[:, None]), p, w)
        if softcap:
            # the tile steps keep m and the label logit raw: cap them here, take the label's slope
            lse[t0:t1] = softcap_values(m, softcap) + torch.log(s)
            raw_label = label_logit[t0:t1]
            if want_e:
                s_excl.mul_(softcap_slope(raw_label, softcap))
            raw_label.copy_(softcap_values(raw_label, softcap))
        else:
            lse[t0:t1] = m + torch.log(s)
        if want_e:
            e.div_(s[:, None])
            s_excl.div_(s)
        if st is not None:
            # turn raw sums into statistics; sum_ez / s = E_p[z], sum_e2 / s^2 = sum p^2
            st["sum_ez"].div_(s)
            st["sum_e2"].div_(s * s)
    return label_logit, lse, e_excl, q_excl, stats


def _backward_recompute(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    need: Tuple[bool, bool, bool],
    backend: str,
    softcap: Optional[float] = None,
):
    """Two-pass backward: recompute logit tiles, accumulate grad_h / grad_W / grad_b in fp32."""
    n, d = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = need
    f32 = dict(device=hidden.device, dtype=torch.float32)
    grad_h = torch.zeros(n, d, **f32) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    tn, tv = _chunk_sizes(n, v, d, hidden.is_cuda)
    for v0 in range(0, v, tv):
        v1 = min(v, v0 + tv)
        w = weight[v0:v1]
        gw = torch.zeros(v1 - v0, d, **f32) if need_w else None
        gb = torch.zeros(v1 - v0, **f32) if need_b else None
        for t0 in range(0, n, tn):
            t1 = min(n, t0 + tn)
            h = hidden[t0:t1]
            z = _logits_tile(h, w, bias[v0:v1] if bias is not None else None)
            gz = torch.empty(z.shape, device=z.device, dtype=_tile_dtype(weight))
            logit_grad_tile(backend, z, labels[t0:t1], v0, lse[t0:t1], grad[t0:t1], gz, softcap)
            if need_h:
                addmm_f32_(grad_h[t0:t1], gz, w)
            if need_w:
                addmm_f32_(gw, gz.t(), h)
            if need_b:
                gb += gz.float().sum(0)
        if need_w:
            grad_w[v0:v1] = gw
        if need_b:
            grad_b[v0:v1] = gb
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b


def _no_autocast(t: torch.Tensor):
    """The sweep picks its own precisions (fp32 tiles and accumulators): autocast must not recast them."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class _LinearLogProbs(torch.autograd.Function):
    """Autograd node over the compacted valid tokens: inputs h [n, d], W [V, d], b [V] or None."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, grad_mode, want_stats, backend, softcap):
        # grad_mode: "none" (forward only), "expected" (frozen head: one pass, keep E_excl),
        # "recompute" (trainable head: keep inputs, recompute tiles in backward).
        # softcap: None, or c > 0 for logits c * tanh(z / c).
        want_e = grad_mode == "expected"
        trainable_head = grad_mode == "recompute"
        with _no_autocast(hidden):
            label_logit, lse, e_excl, q_excl, stats = _forward_sweep(hidden, weight, bias, labels, want_e, want_stats,
                                                                     backend, softcap)
        logp = label_logit - lse
        ctx.backend = backend
        ctx.softcap = softcap
        ctx.trainable_head = trainable_head
        ctx.has_bias = bias is not None
        if want_e:
            ctx.save_for_backward(weight, labels, q_excl, e_excl)
        elif trainable_head:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        outs = [logp]
        if want_stats:
            entropy = lse - stats["sum_ez"]
            mean_logit = stats["sum_z"] / weight.shape[0]
            log_sum_p2 = torch.log(stats["sum_e2"])
            extra = (entropy, mean_logit, stats["argmax"], log_sum_p2)
            ctx.mark_non_differentiable(*extra)
            outs.extend(extra)
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_logp = grad_logp.float().contiguous()
        if not ctx.trainable_head:
            if not need_h:
                return None, None, None, None, None, None, None, None
            weight, labels, q_excl, e_excl = ctx.saved_tensors  # q_excl = 1 - p_label (times s_label when capped)
            w_y = weight.index_select(0, labels).float()
            grad_h = grad_logp[:, None] * (q_excl[:, None] * w_y - e_excl)
            return grad_h.to(weight.dtype), None, None, None, None, None, None, None
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        with _no_autocast(hidden):
            grad_h, grad_w, grad_b = _backward_recompute(
                hidden, weight, bias, labels, lse, grad_logp, (need_h, need_w, need_b and bias is not None), ctx.backend,
                ctx.softcap,
            )
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _check_inputs(hidden, weight, labels, bias) -> None:
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("hidden, weight and labels must be torch.Tensor")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden_size], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1] if hidden.dim() else None}) must equal "
            f"weight.shape[1] ({weight.shape[1]}); hidden shape {tuple(hidden.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise TypeError("bias must be a float32, bfloat16 or float16 tensor")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def _checked_softcap(softcap) -> Optional[float]:
    """None for no capping (None or 0), else the cap as a float; anything else is a clear error."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(
            f"softcap must be a positive finite number (the model's final_logit_softcapping), or None / 0 "
            f"for no capping; got {softcap!r}"
        )
    return float(softcap) if softcap > 0 else None


def _finite_checks_requested(check_finite: Optional[bool]) -> bool:
    """The explicit keyword, else DPO_FAST_CHECK_FINITE (set and not "0")."""
    if check_finite is not None:
        return bool(check_finite)
    return os.environ.get("DPO_FAST_CHECK_FINITE", "") not in ("", "0")


def compacted_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    stats: bool = False,
    softcap: Optional[float] = None,
    check_finite: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """Log-probs of the valid tokens only: (logp [n] fp32, flat index [n] into labels, stats or None).

    The valid tokens are those whose label is not ``ignore_index``; ``index`` gives their
    positions in ``labels.reshape(-1)``, so callers can reduce per sequence with a segmented sum
    (``index // T``) without a dense [rows, T] detour. ``stats`` and ``softcap`` as in
    `linear_log_probs_with_stats`, over the valid tokens.

    NaN/Inf in hidden, weight or bias propagate as through materialized logits -> log_softmax ->
    gather (NaN in a hidden row makes that token's log-prob NaN, NaN in weight or bias every
    token's), with no host sync spent looking for them; positions whose label is ignore_index never
    enter, so nothing there matters. ``check_finite=True`` (default: the ``DPO_FAST_CHECK_FINITE=1``
    environment variable) raises a ValueError instead, at the cost of two extra host syncs.
    """
    _check_inputs(hidden, weight, labels, bias)
    softcap = _checked_softcap(softcap)
    d = weight.shape[1]
    vocab = weight.shape[0]
    flat_h = hidden.reshape(-1, d)
    flat_l = labels.reshape(-1).long()
    n_flat = flat_l.shape[0]
    valid = flat_l != ignore_index
    out_of_range = valid & ((flat_l < 0) | (flat_l >= vocab))
    # One host sync (the nonzero the compaction needs) also answers the label-range check: with
    # a bad label the mask is n_flat + 1 ones after n_flat zeros, so the count exceeds n_flat.
    any_bad = out_of_range.any()
    idx = torch.nonzero(torch.cat([valid & ~any_bad, any_bad.expand(n_flat + 1)])).squeeze(1)
    if idx.shape[0] > n_flat:
        bad = flat_l[out_of_range][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}"
        )
    check = _finite_checks_requested(check_finite)
    h = flat_h.index_select(0, idx)
    if check and not bool(torch.isfinite(h).all()):
        raise ValueError("hidden contains NaN or Inf at a position whose label is not ignore_index")
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    lab = flat_l.index_select(0, idx).contiguous()
    trainable_head = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or trainable_head):
        grad_mode = "none"
    else:
        grad_mode = "recompute" if trainable_head else "expected"
    backend = select_backend(h)
    outs = _LinearLogProbs.apply(h.contiguous(), weight, bias, lab, grad_mode, stats, backend, softcap)
    logp_valid = outs[0]
    if check and not bool(torch.isfinite(logp_valid).all()):
        raise ValueError("weight (or bias) produced non-finite logits: check it for NaN/Inf")
    extras = dict(zip(STAT_NAMES, outs[1:])) if stats else None
    return logp_valid, idx, extras


def scatter_valid(values: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Dense tensor of ``shape`` holding ``values`` at the flat positions ``index``, 0 elsewhere.

    The inverse of the compaction in `compacted_log_probs` (``index`` is its second output).
    """
    full = torch.zeros(shape.numel(), device=values.device, dtype=values.dtype).index_copy(0, index, values)
    return full.view(shape)


def linear_log_probs_with_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    stats: bool = False,
    softcap: Optional[float] = None,
    check_finite: Optional[bool] = None,
) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """`linear_log_probs` plus, when ``stats``, per-token statistics from the same vocabulary sweep.

    The statistics (no gradient; 0 at ignored positions) are ``entropy`` (of softmax(z)),
    ``mean_logit`` (mean of z over the vocabulary), ``argmax`` (int64 id of the largest logit)
    and ``log_sum_p2`` (log of sum_v p_v^2, for WPO weighting). They cost nothing when not asked for.
    With ``softcap`` each is taken over the capped logits (the argmax is the same).
    """
    logp_valid, idx, extras = compacted_log_probs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, stats=stats, softcap=softcap,
        check_finite=check_finite,
    )
    shape = labels.shape
    dense = scatter_valid(logp_valid, idx, shape)
    return dense, ({k: scatter_valid(v, idx, shape) for k, v in extras.items()} if extras else None)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    check_finite: Optional[bool] = None,
) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under ``softmax(hidden @ weight.T + bias)``.

    hidden [..., d], weight [V, d], labels [...] aligned with hidden (labels[i] is the token
    predicted from hidden[i]). Returns fp32 log-probs shaped like labels, 0.0 where
    labels == ignore_index. Differentiable in hidden (and weight / bias when they require
    grad). Never allocates a [tokens, V] tensor: logits exist one bounded tile at a time.
    hidden is cast to weight's dtype for the GEMMs. ``softcap=c`` (c > 0; None or 0: off) caps
    the logits to ``c * tanh(z / c)`` first, as Gemma 2's ``final_logit_softcapping``. NaN/Inf
    inputs give NaN log-probs where materialized logits would (``check_finite=True`` raises
    instead; see `compacted_log_probs`).
    """
    return linear_log_probs_with_stats(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap, check_finite=check_finite
    )[0]
