"""Shared assertions of the head tests: a `linear_log_probs` result and its gradients against the float64
autograd reference (the plain head in test_linear_log_probs.py, the softcapped one in test_softcap_head.py)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1e-30), compared on the CPU in float64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_head_matches(out, ref, mask, hidden, weight, bias, grads64, *, trainable: bool, with_bias: bool,
                        tol: float) -> None:
    """fp32 log-probs, 0 at ignored labels, and the hidden / weight / bias gradients within `tol` (relative)
    of the float64 reference; a frozen weight gets no gradient and ignored rows get a zero hidden gradient."""
    h64, w64, b64 = grads64
    d = hidden.shape[-1]
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.device == hidden.device
    assert (out.cpu()[~mask] == 0).all()
    assert rel_err(out, ref) < tol
    assert rel_err(hidden.grad, h64.grad) < tol
    assert (hidden.grad.cpu().reshape(-1, d)[~mask.reshape(-1)] == 0).all()
    if trainable:
        assert rel_err(weight.grad, w64.grad) < tol
        if with_bias:
            assert rel_err(bias.grad, b64.grad) < tol
    else:
        assert weight.grad is None
