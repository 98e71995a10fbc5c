"""`python3 -m benchmarks.gpu_check [--out DIR] [--tiny]`: every Triton kernel path, checked and timed on a GPU.

Meant for the few minutes a session gets on a GPU machine (see scripts/gpu_session.sh):

1. prints the environment (GPU, driver, torch / triton / transformers / bitsandbytes / trl versions);
2. runs every Triton path of dpo_fast with the triton backend on CUDA and compares outputs and
   gradients with a float64 reference computed on the CPU, at the tests' tolerances (fp32 1e-5,
   bf16 1e-2 relative, norm-wise; QLoRA bf16 3e-2 as in tests/test_body_kernels.py):
   linear_log_probs forward + backward (frozen and trainable head, with and without bias, fp32 and
   bf16, odd sizes, ignored rows), the per-token statistics, fused_linear_dpo_loss, rms_norm,
   apply_rope, swiglu, and the QLoRA linear (skipped, with the reason, without bitsandbytes on CUDA);
3. at the Llama-3-8B head shape (d=4096, V=128256, N=8192, bf16, frozen) compares the triton backend
   with the torch backend on the same GPU and with a float64 reference on a sample of rows, then
   times forward + backward of dpo_fast, TRL's chunked log-prob head (benchmarks/methods_head.py) and
   the naive materialized-logits head, with their peak extra memory (benchmarks/common.py); issue 2's
   target is >= 1.3x TRL's speed at no more than its peak memory.

Every check runs under try/except (a failure is recorded and the rest still run) and the JSON
(``<out>/gpu_check.json``) is rewritten after each group, so a run cut short still leaves its results.
The exit code is 1 when any correctness check fails or errors; a missed speed target is reported,
not an error. ``--tiny`` (automatic without CUDA) runs the same correctness checks on CPU tensors under
the Triton interpreter at tiny shapes and skips the timing: that is how tests/test_gpu_check.py
exercises this script on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

FP32_TOL, BF16_TOL = 1e-5, 1e-2
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
QLORA_TOL = {torch.float32: FP32_TOL, torch.bfloat16: 3 * BF16_TOL}  # as tests/test_body_kernels.py
IGNORE = -100
PASS, FAIL, ERROR, SKIPPED = "pass", "fail", "error", "skipped"
SPEED_TARGET = 1.3  # issue 2: dpo_fast >= 1.3x faster than TRL's chunked head, at most its peak memory
JSON_NAME = "gpu_check.json"


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Sizes:
    """The shapes of one mode. head: (token shape, d, vocab, (token chunk, vocab chunk) or None)."""

    head: Tuple[Tuple[Tuple[int, ...], int, int, Optional[Tuple[int, int]]], ...]
    stats: Tuple[Tuple[int, ...], int, int, Optional[Tuple[int, int]]]
    dpo: Tuple[int, int, int, int, Optional[Tuple[int, int]]]  # pairs, seq_len, d, vocab, chunks
    rms: Tuple[Tuple[int, ...], ...]
    rope: Tuple[int, int, int, int, int]  # batch, q heads, kv heads, seq_len, head_dim
    swiglu: Tuple[int, ...]
    qlora: Tuple[int, int, int, int]  # in, out, rank, tokens
    dequant: Tuple[Tuple[int, int], ...]  # 4-bit weight shapes [out, in]
    realistic: bool


TINY = Sizes(
    head=(((3, 23), 72, 1013, (16, 300)), ((2, 9), 33, 269, None)),
    stats=((2, 17), 40, 777, (8, 200)),
    dpo=(2, 13, 24, 301, (16, 128)),
    rms=((2, 13, 72),),
    rope=(2, 4, 2, 13, 18),
    swiglu=(3, 13, 77),
    qlora=(72, 40, 8, 39),
    dequant=((40, 128), (3, 64)),  # rows of whole 64-blocks: bitsandbytes' CPU kernel mis-reads other shapes
    realistic=False,
)
GPU = Sizes(
    head=(((3, 23), 72, 1013, (16, 300)), ((2, 9), 33, 1000 + 13, None), ((4, 250), 264, 32000 + 13, None)),
    stats=((3, 111), 200, 20000 + 7, None),
    dpo=(4, 97, 136, 5000 + 11, None),
    rms=((2, 13, 72), (2, 333, 4096)),
    rope=(2, 32, 8, 257, 128),
    swiglu=(2, 257, 14336),
    qlora=(4096, 1024 + 8, 16, 515),
    dequant=((14336, 4096), (1024, 4096), (4096, 14336), (77, 33)),  # 8B gate/up, k/v, down; odd
    realistic=True,
)
#: The Llama-3-8B head of issue 2 (DESIGN.md section 3).
REAL_D, REAL_V, REAL_N = 4096, 128256, 8192


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class Check:
    """One compared quantity. rel_err: ||got - want|| / ||want|| (the tests' norm-wise measure), inf when
    `got` holds NaN/Inf; for exact checks, the number of mismatching entries."""

    name: str
    status: str
    rel_err: Optional[float] = None
    tol: Optional[float] = None
    detail: str = ""
    seconds: Optional[float] = None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error of `got` against `want`, both moved to the CPU in float64; inf if `got`
    is not finite or the shapes differ."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


class Recorder:
    """Collects checks, prints each as it lands, and rewrites the JSON report after every group."""

    def __init__(self, out_dir: str, report: Dict[str, Any], log: Callable[[str], None] = print) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, JSON_NAME)
        self.report = report
        self.checks: List[Check] = []
        self.log = log

    def add(self, check: Check) -> None:
        self.checks.append(check)
        err = "" if check.rel_err is None else f"rel_err {check.rel_err:.3e} tol {check.tol:.1e}"
        self.log(f"  {check.status.upper():7s} {check.name:78s} {err} {check.detail}".rstrip())

    def record(self, name: str, err: float, tol: float, detail: str = "") -> bool:
        ok = math.isfinite(err) and err <= tol
        self.add(Check(name, PASS if ok else FAIL, err, tol, detail))
        return ok

    def compare(self, name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
        return self.record(name, rel_err(got, want), tol)

    def exact(self, name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
        """Entries must be equal (e.g. zeros at ignored positions, argmax ids)."""
        got, want = got.detach().cpu(), want.detach().cpu()
        bad = float((got != want).sum().item()) if got.shape == want.shape else math.inf
        return self.record(name, bad, 0.0, "(count of unequal entries)")

    def skip(self, name: str, reason: str) -> None:
        self.add(Check(name, SKIPPED, detail=reason))

    def run(self, group: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run one group of checks; an exception becomes an "error" check and the run goes on."""
        t0 = time.perf_counter()
        n_before = len(self.checks)
        try:
            fn(self, *args, **kwargs)
        except Exception as exc:  # one failing group never stops the others
            tb = traceback.format_exc().strip().splitlines()
            self.add(Check(group, ERROR, detail=f"{type(exc).__name__}: {str(exc)[:300]} | {' / '.join(tb[-4:])[:600]}"))
        finally:
            for c in self.checks[n_before:]:  # the group's wall time, on each of its checks
                c.seconds = round(time.perf_counter() - t0, 3)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.write()

    def summary(self) -> Dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in (PASS, FAIL, ERROR, SKIPPED)}
        return dict(counts, total=len(self.checks), ok=counts[FAIL] == 0 and counts[ERROR] == 0)

    def write(self) -> None:
        self.report["checks"] = [asdict(c) for c in self.checks]
        self.report["summary"] = self.summary()
        os.makedirs(self.out_dir, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=2, default=str)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _chunk_ctx(chunks: Optional[Tuple[int, int]]):
    from dpo_fast.ops.linear_log_probs import chunking

    return chunking(*chunks) if chunks else contextlib.nullcontext()


def _head_inputs(shape: Sequence[int], d: int, vocab: int, dtype: torch.dtype, *, with_bias: bool,
                 ignore_frac: float = 0.25):
    """CPU tensors: hidden, weight (logit std ~3), bias or None, labels with ignored entries, a label in
    the first and in the last (ragged) vocabulary tile, and for 2-D token shapes an entirely ignored row."""
    hidden = torch.randn(*shape, d).to(dtype)
    weight = (torch.randn(vocab, d) / d ** 0.5 * 3).to(dtype)
    bias = (torch.randn(vocab) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, tuple(shape))
    flat = labels.view(-1)
    flat[torch.rand(flat.shape) < ignore_frac] = IGNORE
    flat[0], flat[-1] = 0, vocab - 1
    if len(shape) == 2 and shape[0] > 1:
        labels[1, :] = IGNORE
    return hidden, weight, bias, labels


def _leaf(t: Optional[torch.Tensor], dev: torch.device, requires_grad: bool) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dev).clone().requires_grad_(requires_grad)


def _ref_log_probs(hidden, weight, bias, labels, trainable: bool):
    """float64 autograd on the CPU: materialized logits, log_softmax, gather; 0 where ignored."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_(trainable)
    b = bias.detach().cpu().double().requires_grad_(trainable) if bias is not None else None
    labels = labels.cpu()
    z = h @ w.t() + (b if b is not None else 0)
    logp = torch.log_softmax(z, -1)
    mask = labels != IGNORE
    out = torch.where(mask, logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    return out, (h, w, b), z, mask


# ---------------------------------------------------------------------------------------------- head checks


def check_linear_log_probs(rec: Recorder, dev: torch.device, shape, d: int, vocab: int, chunks, dtype: torch.dtype,
                           trainable: bool, with_bias: bool, backend: str = "triton") -> None:
    """linear_log_probs forward + backward against float64 autograd; bf16 also against materialized bf16."""
    from dpo_fast.ops.backend import use_backend
    from dpo_fast.ops.linear_log_probs import linear_log_probs

    name = (f"linear_log_probs[{backend}] {'trainable' if trainable else 'frozen'} "
            f"{'bias' if with_bias else 'nobias'} {_dtype_name(dtype)} N={'x'.join(map(str, shape))} d={d} V={vocab}"
            f"{f' chunks={chunks[0]}x{chunks[1]}' if chunks else ''}")
    hidden, weight, bias, labels = _head_inputs(shape, d, vocab, dtype, with_bias=with_bias)
    grad_out = torch.randn(tuple(shape))
    h, w, b, y = _leaf(hidden, dev, True), _leaf(weight, dev, trainable), _leaf(bias, dev, trainable), labels.to(dev)
    with use_backend(backend), _chunk_ctx(chunks):
        out = linear_log_probs(h, w, y, bias=b)
        (out * grad_out.to(dev)).sum().backward()
    ref, (h64, w64, b64), _, mask = _ref_log_probs(hidden, weight, bias, labels, trainable)
    (ref * grad_out).sum().backward()
    tol = TOL[dtype]
    if out.dtype != torch.float32 or tuple(out.shape) != tuple(labels.shape) or out.device != h.device:
        rec.record(f"{name}/output dtype+shape+device", math.inf, 0.0, f"{out.dtype} {tuple(out.shape)} {out.device}")
    errs = {"logp": rel_err(out, ref), "grad_h": rel_err(h.grad, h64.grad)}
    rec.record(f"{name}/logp", errs["logp"], tol)
    rec.record(f"{name}/grad_h", errs["grad_h"], tol)
    if trainable:
        errs["grad_w"] = rel_err(w.grad, w64.grad)
        rec.record(f"{name}/grad_w", errs["grad_w"], tol)
        if with_bias:
            rec.compare(f"{name}/grad_b", b.grad, b64.grad, tol)
    elif w.grad is not None:
        rec.record(f"{name}/frozen weight gets no grad", math.inf, 0.0, "weight.grad is set")
    rec.exact(f"{name}/logp is 0 where ignored", out.cpu()[~mask], torch.zeros(int((~mask).sum())))
    hg = h.grad.cpu().reshape(-1, d)[~mask.reshape(-1)]
    rec.exact(f"{name}/grad_h is 0 where ignored", hg, torch.zeros_like(hg))
    if dtype != torch.float32:  # never worse than materializing the logits in the same dtype on the same device
        hb, wb = _leaf(hidden, dev, True), _leaf(weight, dev, trainable)
        z = (hb @ wb.t() + (b.detach() if b is not None else 0)).float()
        yd = y.clamp_min(0).unsqueeze(-1)
        base = torch.where(y != IGNORE, torch.log_softmax(z, -1).gather(-1, yd).squeeze(-1), 0.0)
        (base * grad_out.to(dev)).sum().backward()
        base_errs = {"logp": rel_err(base, ref), "grad_h": rel_err(hb.grad, h64.grad)}
        if trainable:
            base_errs["grad_w"] = rel_err(wb.grad, w64.grad)
        for k, e in errs.items():
            rec.record(f"{name}/{k} vs materialized {_dtype_name(dtype)}", e, 1.05 * base_errs[k] + 1e-6,
                       f"(tol = 1.05 x the materialized path's error {base_errs[k]:.3e})")


def check_stats(rec: Recorder, dev: torch.device, shape, d: int, vocab: int, chunks) -> None:
    """The per-token statistics of the same vocabulary sweep (entropy, mean logit, log sum p^2, argmax)."""
    from dpo_fast.ops.backend import use_backend
    from dpo_fast.ops.linear_log_probs import linear_log_probs_with_stats

    name = f"linear_log_probs_with_stats[triton] float32 bias N={'x'.join(map(str, shape))} d={d} V={vocab}"
    hidden, weight, bias, labels = _head_inputs(shape, d, vocab, torch.float32, with_bias=True)
    with use_backend("triton"), _chunk_ctx(chunks), torch.no_grad():
        out, stats = linear_log_probs_with_stats(hidden.to(dev), weight.to(dev), labels.to(dev), bias=bias.to(dev),
                                                 stats=True)
    stats = {k: v.cpu() for k, v in stats.items()}
    ref, _, z, mask = _ref_log_probs(hidden, weight, bias, labels, False)
    z = z.detach()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    zero = torch.zeros((), dtype=torch.float64)
    rec.compare(f"{name}/logp", out, ref, FP32_TOL)
    rec.compare(f"{name}/entropy", stats["entropy"], torch.where(mask, -(p * logp).sum(-1), zero), FP32_TOL)
    rec.compare(f"{name}/mean_logit", stats["mean_logit"], torch.where(mask, z.mean(-1), zero), FP32_TOL)
    rec.compare(f"{name}/log_sum_p2", stats["log_sum_p2"], torch.where(mask, torch.log((p * p).sum(-1)), zero),
                FP32_TOL)
    rec.exact(f"{name}/argmax", stats["argmax"], torch.where(mask, z.argmax(-1), 0))


def check_fused_dpo(rec: Recorder, dev: torch.device, pairs: int, t: int, d: int, vocab: int, chunks,
                    dtype: torch.dtype, trainable: bool) -> None:
    """fused_linear_dpo_loss (sigmoid, reference head on the fly) against the unfused float64 path."""
    from dpo_fast.fused_dpo import fused_linear_dpo_loss
    from dpo_fast.ops.backend import use_backend

    beta = 0.3
    name = (f"fused_linear_dpo_loss[triton] sigmoid {'trainable' if trainable else 'frozen'} {_dtype_name(dtype)} "
            f"{pairs}x{t} d={d} V={vocab}")
    hidden = torch.randn(2 * pairs, t, d).to(dtype)
    weight = (torch.randn(vocab, d) / d ** 0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, (2 * pairs, t))
    prompt = torch.randint(1, max(2, t // 2), (2 * pairs,))
    prompt[pairs:] = prompt[:pairs]  # chosen and rejected share the prompt
    for r in range(2 * pairs):
        labels[r, : prompt[r]] = IGNORE
    labels[-1] = IGNORE  # one rejected completion entirely masked
    ref_hidden = (hidden.float() + 0.1 * torch.randn(hidden.shape)).to(dtype)
    h, w = _leaf(hidden, dev, True), _leaf(weight, dev, trainable)
    with use_backend("triton"), _chunk_ctx(chunks):
        loss, metrics = fused_linear_dpo_loss(h, w, labels.to(dev), ref_hidden=ref_hidden.to(dev), beta=beta)
        loss.backward()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_(trainable)

    def seq(hh: torch.Tensor, ww: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax((hh @ ww.t()).float() if hh.dtype != torch.float64 else hh @ ww.t(), -1)
        lp = lp.gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1)
        return torch.where(lab != IGNORE, lp, 0.0).sum(1)

    def dpo(hh: torch.Tensor, ww: torch.Tensor, rh: torch.Tensor, lab: torch.Tensor):
        pol = seq(hh, ww, lab)
        with torch.no_grad():
            ref = seq(rh, ww.detach(), lab)
        margin = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
        return -torch.nn.functional.logsigmoid(beta * margin).mean(), beta * (pol[:pairs] - ref[:pairs]).mean()

    ref_loss, ref_chosen = dpo(h64, w64, ref_hidden.double(), labels)
    ref_loss.backward()
    # The unfused path in the same dtype on the same device: a sequence's log-prob is a sum of ~100 terms of
    # magnitude ~8, so fp32 already loses ~1e-5 relative on the margin and ~3e-5 on grad_h (measured on an
    # H200 and on the CPU). The fused path may be at most 2x that error (and never needs to beat TOL).
    hb, wb = _leaf(hidden, dev, True), _leaf(weight, dev, trainable)
    base_loss, base_chosen = dpo(hb, wb, ref_hidden.to(dev), labels.to(dev))
    base_loss.backward()
    base = {"loss": rel_err(base_loss.reshape(1), ref_loss.reshape(1)), "grad_h": rel_err(hb.grad, h64.grad),
            "rewards/chosen": abs(base_chosen.item() - ref_chosen.item())}
    if trainable:
        base["grad_w"] = rel_err(wb.grad, w64.grad)

    def tol(key: str, floor: float) -> float:
        return max(floor, 2 * base[key])

    how = "(tol = max({:.0e}, 2 x the unfused {} path's error {:.3e}))"
    t0 = TOL[dtype]
    rec.record(f"{name}/loss", rel_err(loss.reshape(1), ref_loss.reshape(1)), tol("loss", t0),
               how.format(t0, _dtype_name(dtype), base["loss"]))
    rec.record(f"{name}/grad_h", rel_err(h.grad, h64.grad), tol("grad_h", t0),
               how.format(t0, _dtype_name(dtype), base["grad_h"]))
    if trainable:
        rec.record(f"{name}/grad_w", rel_err(w.grad, w64.grad), tol("grad_w", t0),
                   how.format(t0, _dtype_name(dtype), base["grad_w"]))
    rec.exact(f"{name}/grad_h is 0 on the masked row", h.grad[-1].cpu(), torch.zeros_like(h.grad[-1].cpu()))
    floor = t0 * max(1.0, abs(ref_chosen.item()))
    rec.record(f"{name}/rewards/chosen", abs(metrics["rewards/chosen"] - ref_chosen.item()),
               tol("rewards/chosen", floor), "(absolute difference) " + how.format(floor, _dtype_name(dtype),
                                                                                  base["rewards/chosen"]))


# ---------------------------------------------------------------------------------------------- body checks


def check_rms_norm(rec: Recorder, dev: torch.device, shape, dtype: torch.dtype) -> None:
    """rms_norm forward + backward (x and weight) against transformers' LlamaRMSNorm in float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dpo_fast.ops.rms_norm import rms_norm

    name = f"rms_norm[triton] {_dtype_name(dtype)} {'x'.join(map(str, shape))}"
    x = torch.randn(shape).to(dtype)
    wt = (1 + 0.3 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape).to(dtype)
    xa, wa = _leaf(x, dev, True), _leaf(wt, dev, True)
    y = rms_norm(xa, wa, 1e-5, backend="triton")
    y.backward(dy.to(dev))
    ref = LlamaRMSNorm(shape[-1], eps=1e-5).to(torch.float64)
    ref.weight.data.copy_(wt.double())
    xr = x.double().requires_grad_()
    yr = ref(xr)
    yr.backward(dy.double())
    tol = TOL[dtype]
    if y.dtype != dtype:
        rec.record(f"{name}/output dtype", math.inf, 0.0, str(y.dtype))
    rec.compare(f"{name}/y", y, yr, tol)
    rec.compare(f"{name}/grad_x", xa.grad, xr.grad, tol)
    rec.compare(f"{name}/grad_w", wa.grad, ref.weight.grad, tol)


def _rope_cos_sin(batch: int, seq: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 cos, sin [B, T, D] as Llama builds them, with a different position offset per row."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(seq, dtype=torch.float64)[None] + torch.randint(0, 100, (batch, 1)).double()
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos(), emb.sin()


def check_rope(rec: Recorder, dev: torch.device, b: int, hq: int, hk: int, t: int, d: int, dtype: torch.dtype,
               inplace: bool, layout: int) -> None:
    """apply_rope on q, k (transposed views of a projection, as LlamaAttention makes them) against
    transformers' apply_rotary_pos_emb in float64."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dpo_fast.ops.rope import apply_rope

    name = f"apply_rope[triton] {_dtype_name(dtype)} {'inplace' if inplace else 'out-of-place'} layout={layout} " \
           f"B={b} Hq={hq} Hk={hk} T={t} D={d}"
    cos, sin = _rope_cos_sin(b, t, d)
    q_src, k_src = torch.randn(b, t, hq * d).to(dtype), torch.randn(b, t, hk * d).to(dtype)
    dq, dk = torch.randn(b, hq, t, d).to(dtype), torch.randn(b, hk, t, d).to(dtype)

    def views(qs: torch.Tensor, ks: torch.Tensor):
        q, k = qs.view(b, t, hq, d), ks.view(b, t, hk, d)
        return (q.transpose(1, 2), k.transpose(1, 2)) if layout == 1 else (q, k)

    def as_layout(g: torch.Tensor) -> torch.Tensor:
        return g if layout == 1 else g.transpose(1, 2)

    qa, ka = _leaf(q_src, dev, True), _leaf(k_src, dev, True)
    q, k = views(qa * 1, ka * 1)  # non-leaf, so the in-place path is legal
    qo, ko = apply_rope(q, k, cos.to(dtype).to(dev), sin.to(dtype).to(dev), layout, inplace=inplace,
                        backend="triton")
    torch.autograd.backward((qo, ko), (as_layout(dq).to(dev), as_layout(dk).to(dev)))
    qr_, kr_ = q_src.double().requires_grad_(), k_src.double().requires_grad_()
    qr, kr = apply_rotary_pos_emb(*views(qr_, kr_), cos, sin, unsqueeze_dim=layout)
    torch.autograd.backward((qr, kr), (as_layout(dq).double(), as_layout(dk).double()))
    tol = TOL[dtype]
    rec.compare(f"{name}/q", qo, qr, tol)
    rec.compare(f"{name}/k", ko, kr, tol)
    rec.compare(f"{name}/grad_q", qa.grad, qr_.grad, tol)
    rec.compare(f"{name}/grad_k", ka.grad, kr_.grad, tol)


def check_swiglu(rec: Recorder, dev: torch.device, shape, dtype: torch.dtype) -> None:
    """swiglu(gate, up) = silu(gate) * up, forward + backward, against float64."""
    from dpo_fast.ops.swiglu import swiglu

    name = f"swiglu[triton] {_dtype_name(dtype)} {'x'.join(map(str, shape))}"
    g, u, dh = (2 * torch.randn(shape)).to(dtype), torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    ga, ua = _leaf(g, dev, True), _leaf(u, dev, True)
    h = swiglu(ga, ua, backend="triton")
    h.backward(dh.to(dev))
    gr, ur = g.double().requires_grad_(), u.double().requires_grad_()
    hr = torch.nn.functional.silu(gr) * ur
    hr.backward(dh.double())
    tol = TOL[dtype]
    rec.compare(f"{name}/h", h, hr, tol)
    rec.compare(f"{name}/grad_gate", ga.grad, gr.grad, tol)
    rec.compare(f"{name}/grad_up", ua.grad, ur.grad, tol)


def bnb_unavailable(dev: torch.device) -> Optional[str]:
    """Why the 4-bit QLoRA check cannot run here (None when bitsandbytes works on `dev`)."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception as exc:
        return f"bitsandbytes not importable ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        w = torch.randn(64, 64, device=dev)
        q, state = bnbF.quantize_4bit(w, quant_type="nf4")
        bnbF.dequantize_4bit(q, state)
    except Exception as exc:
        return f"bitsandbytes has no working 4-bit backend on {dev.type} ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def check_dequant_4bit(rec: Recorder, dev: torch.device, shapes: Sequence[Tuple[int, int]]) -> None:
    """dpo_fast.kernels.dequant_4bit against bitsandbytes' dequantize_4bit: bitwise, nf4 and fp4, with and
    without double quantization, bf16 and fp16 weights."""
    import bitsandbytes.functional as bnbF

    from dpo_fast.kernels.dequant_4bit import dequantize_4bit

    for (out_f, in_f), quant_type, nested, dtype in itertools.product(
            shapes, ("nf4", "fp4"), (True, False), (torch.bfloat16, torch.float16)):
        w = (torch.randn(out_f, in_f, device=dev) / in_f ** 0.5).to(dtype)
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
        rec.exact(f"dequant_4bit {quant_type} nested={nested} {_dtype_name(dtype)} {out_f}x{in_f}",
                  dequantize_4bit(packed, qs), bnbF.dequantize_4bit(packed, qs))


def _qlora_base(kind: str, in_f: int, out_f: int, dtype: torch.dtype, dev: torch.device):
    """A frozen base with a bias: nn.Linear, or bitsandbytes nf4 with double quantization."""
    from torch import nn

    w = torch.randn(out_f, in_f) / in_f ** 0.5
    if kind == "linear":
        base = nn.Linear(in_f, out_f, bias=True, dtype=dtype)
        base.weight.data.copy_(w)
        base.bias.data.normal_()
        return base.requires_grad_(False).to(dev)
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    base.bias = nn.Parameter(torch.randn(out_f, dtype=dtype), requires_grad=False)
    return base.to(dev)


def _lora_reference(x: torch.Tensor, base, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """float64 base(x) + scaling * x A^T B^T on the CPU (x, a, b: float64 leaves)."""
    from dpo_fast.ops.qlora_linear import dense_weight

    wd = dense_weight(base, torch.float64).detach().cpu()
    return torch.nn.functional.linear(x, wd, base.bias.detach().cpu().double()) + scaling * (x @ a.t()) @ b.t()


def check_qlora(rec: Recorder, dev: torch.device, in_f: int, out_f: int, r: int, tokens: int, kind: str,
                dtype: torch.dtype) -> None:
    """lora_linear over a frozen base (nn.Linear, or bitsandbytes nf4 with double quantization) against
    float64: y, grad_x, grad_A, grad_B (the base is frozen)."""
    from dpo_fast.ops.qlora_linear import lora_linear

    name = f"lora_linear {kind} {_dtype_name(dtype)} in={in_f} out={out_f} r={r} N={tokens}"
    base = _qlora_base(kind, in_f, out_f, dtype, dev)
    a = torch.randn(r, in_f) / in_f ** 0.5  # adapters stay fp32, as peft keeps them
    bw = torch.randn(out_f, r) / r ** 0.5
    x = torch.randn(tokens, in_f).to(dtype)
    x[1] = 0.0  # a fully zero row
    dy = torch.randn(tokens, out_f).to(dtype)
    xa, aa, ba = _leaf(x, dev, True), _leaf(a, dev, True), _leaf(bw, dev, True)
    scaling = 2.0
    y = lora_linear(xa, base, aa, ba, scaling)
    y.backward(dy.to(dev))
    xr, ar, br = x.double().requires_grad_(), a.double().requires_grad_(), bw.double().requires_grad_()
    yr = _lora_reference(xr, base, ar, br, scaling)
    yr.backward(dy.double())
    tol = QLORA_TOL[dtype]
    rec.compare(f"{name}/y", y, yr, tol)
    rec.compare(f"{name}/grad_x", xa.grad, xr.grad, tol)
    rec.compare(f"{name}/grad_A", aa.grad, ar.grad, tol)
    rec.compare(f"{name}/grad_B", ba.grad, br.grad, tol)


def check_qlora_group(rec: Recorder, dev: torch.device, in_f: int, out_f: int, r: int, tokens: int, kind: str,
                      dtype: torch.dtype) -> None:
    """lora_linear_group (what q/k/v run as once patched) against float64: three projections of different
    widths (GQA-like) and ranks over one x; every output, grad_x and each grad_A, grad_B."""
    from dpo_fast.ops.qlora_group import lora_linear_group

    outs, ranks, scalings = (out_f, out_f // 4 + 3, out_f // 4 + 3), (r, r, max(1, r // 2)), (2.0, 2.0, 4.0)
    name = f"lora_linear_group {kind} {_dtype_name(dtype)} in={in_f} outs={outs} N={tokens}"
    bases = [_qlora_base(kind, in_f, o, dtype, dev) for o in outs]
    a_s = [torch.randn(q, in_f) / in_f ** 0.5 for q in ranks]
    b_s = [torch.randn(o, q) / q ** 0.5 for o, q in zip(outs, ranks)]
    x = torch.randn(tokens, in_f).to(dtype)
    dys = [torch.randn(tokens, o).to(dtype) for o in outs]
    xa = _leaf(x, dev, True)
    aas, bas = [_leaf(a, dev, True) for a in a_s], [_leaf(b, dev, True) for b in b_s]
    ys = lora_linear_group(xa, bases, aas, bas, scalings)
    torch.autograd.backward(ys, [dy.to(dev) for dy in dys])
    xr = x.double().requires_grad_()
    ars, brs = [a.double().requires_grad_() for a in a_s], [b.double().requires_grad_() for b in b_s]
    yrs = [_lora_reference(xr, base, ar, br, s) for base, ar, br, s in zip(bases, ars, brs, scalings)]
    torch.autograd.backward(yrs, [dy.double() for dy in dys])
    tol = QLORA_TOL[dtype]
    for i, (y, yr) in enumerate(zip(ys, yrs)):
        rec.compare(f"{name}/y{i}", y, yr, tol)
        rec.compare(f"{name}/grad_A{i}", aas[i].grad, ars[i].grad, tol)
        rec.compare(f"{name}/grad_B{i}", bas[i].grad, brs[i].grad, tol)
    rec.compare(f"{name}/grad_x", xa.grad, xr.grad, tol)


# ---------------------------------------------------------------------------------------------- realistic shape


def _f64_rows_reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, g: torch.Tensor, chunk: int = 16384):
    """float64 logp and d(sum g*logp)/dh for a few rows, sweeping the vocabulary in chunks (no float64
    copy of the whole weight): logp = z_y - lse(z), grad_h = g * (W[y] - softmax(z) W)."""
    h64 = h.double()
    z = torch.cat([h64 @ w[v0:v0 + chunk].double().t() for v0 in range(0, w.shape[0], chunk)], dim=1)
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, y[:, None]).squeeze(1) - lse
    p = torch.exp(z - lse[:, None])
    e = torch.zeros_like(h64)
    for v0 in range(0, w.shape[0], chunk):
        e += p[:, v0:v0 + chunk] @ w[v0:v0 + chunk].double()
    grad = g.double()[:, None] * (w.index_select(0, y).double() - e)
    return logp, grad


def check_patched_model(rec: Recorder, dev: torch.device, quantize: bool, offload: bool) -> None:
    """A whole patched model: the tiny benchmark Llama (NF4 body when `quantize`, LoRA on every projection,
    gradient checkpointing on) gives the same loss and LoRA gradients with every body kernel patched in
    (and, with `offload`, the layer inputs offloaded to pinned CPU memory) as unpatched. fp32."""
    from benchmarks.methods_step import build_model
    from benchmarks.models import get_model
    from dpo_fast.ops.backend import use_backend
    from dpo_fast.patching.body import patch_body, unpatch_body

    shape = get_model("tiny")
    name = f"patched model {'nf4' if quantize else 'fp32'} body, {'offloaded' if offload else 'plain'} checkpointing"
    model = build_model(shape, dev, torch.float32, quantize=quantize, lora_r=8)
    with torch.no_grad():  # peft starts B at 0, which would leave every A gradient 0
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    ids = torch.randint(0, shape.vocab_size, (2, 37), device=dev)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: prm.grad.detach().clone() for n, prm in model.named_parameters()
                               if prm.requires_grad}

    want_loss, want = loss_and_grads()
    counts = patch_body(model, offload_checkpointing=offload)
    try:
        layers = shape.num_hidden_layers
        rec.record(f"{name}/modules patched", 0.0 if counts["qlora_linear"] == 7 * layers and counts["swiglu"] == layers
                   and counts["offload_checkpointing"] == (layers if offload else 0) else math.inf, 0.0, str(counts))
        with use_backend("triton"):
            got_loss, got = loss_and_grads()
    finally:
        unpatch_body(model)
    rec.compare(f"{name}/loss", got_loss.reshape(1), want_loss.reshape(1), FP32_TOL)
    worst = max(rel_err(got[n], want[n]) for n in want) if got.keys() == want.keys() else math.inf
    rec.record(f"{name}/LoRA grads (worst of {len(want)})", worst, FP32_TOL)


def check_prefix_sharing(rec: Recorder, dev: torch.device, quantize: bool, dtype: torch.dtype) -> None:
    """Prefix sharing (packed [prompt | chosen | rejected] rows, two causal SDPA calls per layer) against
    TRL's two-row layout: the tiny benchmark Llama with every body kernel patched, checkpointing on.

    fp32 (NF4 body when `quantize`): same loss and LoRA gradients as unshared, to FP32_TOL. bf16 (flash
    attention on a GPU; a bf16 copy of an fp32 model): the shared path's error against the fp32 model is
    at most 1.5x the unshared bf16 path's, plus BF16_TOL."""
    import copy

    import dpo_fast
    from dpo_fast.dpo import compute_dpo_loss

    from benchmarks.methods_step import build_model, make_pair_batch
    from benchmarks.models import get_model

    shape = get_model("tiny")
    name = f"prefix sharing {'nf4' if quantize else 'plain'} {_dtype_name(dtype)}"

    model = build_model(shape, dev, torch.float32, quantize=quantize, lora_r=8)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    batch = make_pair_batch(shape.vocab_size, [9, 0, 23], [30, 17, 4], [12, 41, 20], 64, dev)

    def run(net, **kw):
        net.zero_grad(set_to_none=True)
        loss, _ = compute_dpo_loss(net, batch, **kw)
        loss.backward()
        return loss.detach().float().reshape(1), {n: prm.grad.detach().float().clone()
                                                  for n, prm in net.named_parameters() if prm.requires_grad}

    fp32_loss, fp32_grads = run(model)
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    dpo_fast.patch(net, prefix_sharing=True)
    try:
        unshared = run(net, prefix_sharing=False)
        shared = run(net)
    finally:
        dpo_fast.unpatch(net)

    def worst(grads):
        return max(rel_err(grads[n], fp32_grads[n]) for n in fp32_grads) if grads.keys() == fp32_grads.keys() \
            else math.inf

    if dtype == torch.float32:
        rec.compare(f"{name}/loss vs unshared", shared[0], unshared[0], FP32_TOL)
        grads = max(rel_err(shared[1][n], unshared[1][n]) for n in unshared[1])
        rec.record(f"{name}/LoRA grads vs unshared (worst of {len(unshared[1])})", grads, FP32_TOL)
    else:
        rec.record(f"{name}/loss vs fp32", rel_err(shared[0], fp32_loss), BF16_TOL)
        rec.record(f"{name}/LoRA grads vs fp32 (worst)", worst(shared[1]), 1.5 * worst(unshared[1]) + BF16_TOL,
                   f"unshared bf16: {worst(unshared[1]):.3g}")


def check_realistic_head(rec: Recorder, dev: torch.device) -> None:
    """The 8B head (bf16, frozen): triton backend vs the torch backend on the same GPU, and vs float64 on
    a sample of rows."""
    from dpo_fast.ops.backend import use_backend
    from dpo_fast.ops.linear_log_probs import linear_log_probs

    name = f"linear_log_probs[triton] frozen bfloat16 N={REAL_N} d={REAL_D} V={REAL_V}"
    hidden = torch.randn(REAL_N, REAL_D, device=dev).to(torch.bfloat16)
    weight = (torch.randn(REAL_V, REAL_D, device=dev) * REAL_D ** -0.5 * 3).to(torch.bfloat16)
    labels = torch.randint(0, REAL_V, (REAL_N,), device=dev)
    labels[torch.rand(REAL_N, device=dev) < 0.1] = IGNORE
    g = torch.randn(REAL_N, device=dev)
    outs = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_()
        with use_backend(backend):
            out = linear_log_probs(h, weight, labels)
            (out * g).sum().backward()
        outs[backend] = (out.detach(), h.grad)
        del h
    rec.compare(f"{name}/logp vs torch backend", outs["triton"][0], outs["torch"][0], BF16_TOL)
    rec.compare(f"{name}/grad_h vs torch backend", outs["triton"][1], outs["torch"][1], BF16_TOL)
    rows = torch.nonzero(labels != IGNORE).squeeze(1)
    rows = rows[torch.randperm(rows.numel(), device=dev)[:64]]
    logp64, grad64 = _f64_rows_reference(hidden[rows], weight, labels[rows], g[rows])
    for backend in ("triton", "torch"):
        rec.compare(f"{name}/logp[64 rows] vs float64 ({backend} backend)", outs[backend][0][rows], logp64, BF16_TOL)
        rec.compare(f"{name}/grad_h[64 rows] vs float64 ({backend} backend)", outs[backend][1][rows], grad64,
                    BF16_TOL)


def time_realistic_head(rec: Recorder, dev: torch.device, warmup: int = 3, repeats: int = 10) -> None:
    """fwd+bwd median ms and peak extra memory: dpo_fast vs TRL's chunked head vs naive, same inputs."""
    from benchmarks import common
    from benchmarks.methods_head import HEAD_REGISTRY, make_inputs
    from dpo_fast.ops.backend import use_backend

    case = f"llama-3.1-8b logps frozen N={REAL_N} bf16"
    inp = make_inputs("logps", REAL_D, REAL_V, tokens=REAL_N, dtype=torch.bfloat16, device=dev)
    cells = []
    for method in ("dpo_fast", "trl", "naive"):
        spec = HEAD_REGISTRY[("logps", method)]
        reason = spec.unavailable(dev)
        if reason:
            cells.append(common.skipped("gpu_check", case, method, REAL_N, reason))
        else:
            with use_backend("triton" if method == "dpo_fast" else None):
                cells.append(common.measure("gpu_check", case, method, REAL_N, lambda: spec.build("logps", inp), dev,
                                            warmup=warmup, repeats=repeats, params=dict(d=REAL_D, vocab=REAL_V)))
        c = cells[-1]
        rec.log(f"  TIMING  {method:10s} {c.status:8s} "
                f"{'' if c.median_ms is None else f'{c.median_ms:9.2f} ms  peak extra {c.peak_extra_mb:9.1f} MB'} {c.note}")
    common.add_ratios(cells)
    by = {c.method: c for c in cells}
    timing: Dict[str, Any] = {"case": case, "d": REAL_D, "vocab": REAL_V, "tokens": REAL_N, "dtype": "bfloat16",
                              "warmup": warmup, "repeats": repeats, "cells": [c.to_dict() for c in cells]}
    ours, trl = by["dpo_fast"], by["trl"]
    if ours.status == common.OK and trl.status == common.OK:
        speedup = trl.median_ms / ours.median_ms
        mem_ratio = ours.peak_extra_mb / trl.peak_extra_mb if trl.peak_extra_mb else math.inf
        timing["target"] = {"speedup_vs_trl": speedup, "peak_memory_vs_trl": mem_ratio,
                            "wanted": f">= {SPEED_TARGET}x faster, memory ratio <= 1",
                            "met": bool(speedup >= SPEED_TARGET and mem_ratio <= 1.0)}
        rec.log(f"  TARGET  dpo_fast is {speedup:.2f}x TRL's speed (want >= {SPEED_TARGET}) at "
                f"{mem_ratio:.2f}x its peak extra memory (want <= 1): {'MET' if timing['target']['met'] else 'NOT MET'}")
    else:
        timing["target"] = {"met": None, "why": f"dpo_fast {ours.status}, trl {trl.status} {trl.note}".strip()}
    if by.get("naive") is not None and by["naive"].status == common.OK and ours.status == common.OK:
        timing["speedup_vs_naive"] = by["naive"].median_ms / ours.median_ms
    rec.report["timing"] = timing
    rec.log(common.format_table(cells))
    if ours.status != common.OK:  # dpo_fast crashing at the real shape is a correctness failure
        rec.add(Check(f"timing/{case}/dpo_fast runs", FAIL, detail=f"{ours.status} {ours.note}"))


# ---------------------------------------------------------------------------------------------- driver


def run_checks(rec: Recorder, dev: torch.device, sizes: Sizes) -> None:
    """Every correctness group, each isolated by Recorder.run."""
    dtypes = (torch.float32, torch.bfloat16)
    for shape, d, vocab, chunks in sizes.head:
        for dtype in dtypes:
            for trainable in (False, True):
                for with_bias in (False, True):
                    rec.run(f"linear_log_probs {shape} {_dtype_name(dtype)} trainable={trainable} bias={with_bias}",
                            check_linear_log_probs, dev, shape, d, vocab, chunks, dtype, trainable, with_bias)
    if dev.type == "cuda":  # the torch mirror on CUDA is the realistic shape's reference: check it too
        shape, d, vocab, chunks = sizes.head[-1]
        for dtype in dtypes:
            rec.run(f"linear_log_probs[torch] {_dtype_name(dtype)}", check_linear_log_probs, dev, shape, d, vocab,
                    chunks, dtype, False, False, backend="torch")
    rec.run("linear_log_probs_with_stats", check_stats, dev, *sizes.stats)
    for dtype, trainable in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        rec.run(f"fused_linear_dpo_loss {_dtype_name(dtype)} trainable={trainable}", check_fused_dpo, dev,
                *sizes.dpo, dtype, trainable)
    for shape in sizes.rms:
        for dtype in dtypes:
            rec.run(f"rms_norm {shape} {_dtype_name(dtype)}", check_rms_norm, dev, shape, dtype)
    for dtype in dtypes:
        for layout in (1, 2):
            for inplace in (False, True):
                rec.run(f"apply_rope {_dtype_name(dtype)} layout={layout} inplace={inplace}", check_rope, dev,
                        *sizes.rope, dtype, inplace, layout)
    for dtype in dtypes:
        rec.run(f"swiglu {_dtype_name(dtype)}", check_swiglu, dev, sizes.swiglu, dtype)
    bnb_reason = bnb_unavailable(dev)
    if bnb_reason:
        rec.skip("dequant_4bit", bnb_reason)
    else:
        rec.run("dequant_4bit", check_dequant_4bit, dev, sizes.dequant)
    for kind in ("linear", "nf4-dq"):
        for dtype in dtypes:
            if kind != "linear" and bnb_reason:
                rec.skip(f"lora_linear {kind} {_dtype_name(dtype)}", bnb_reason)
                rec.skip(f"lora_linear_group {kind} {_dtype_name(dtype)}", bnb_reason)
                continue
            rec.run(f"lora_linear {kind} {_dtype_name(dtype)}", check_qlora, dev, *sizes.qlora, kind, dtype)
            rec.run(f"lora_linear_group {kind} {_dtype_name(dtype)}", check_qlora_group, dev, *sizes.qlora, kind,
                    dtype)
    quantize = bnb_reason is None
    for offload in (False, True):
        rec.run(f"patched model offload={offload}", check_patched_model, dev, quantize, offload)
    rec.run("prefix sharing fp32", check_prefix_sharing, dev, quantize, torch.float32)
    rec.run("prefix sharing bf16", check_prefix_sharing, dev, False, torch.bfloat16)
    if sizes.realistic:
        rec.run("realistic head correctness", check_realistic_head, dev)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("bench_out", "gpu_check"), help=f"directory for {JSON_NAME}")
    p.add_argument("--tiny", action="store_true",
                   help="CPU tensors under the Triton interpreter at tiny shapes, no timing (automatic without CUDA)")
    p.add_argument("--no-timing", action="store_true", help="skip the realistic-shape timing")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per method (median reported)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the checks; returns 0 when every correctness check passed (or was skipped with a reason), else 1."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    if tiny:
        # CPU tensors through the triton backend need the interpreter, set before triton is first imported
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --tiny needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    dev = torch.device("cpu" if tiny else "cuda")
    from benchmarks import common

    t_start = time.perf_counter()
    env = common.environment(dev, [])
    env["command"] = " ".join(["python3", "-m", "benchmarks.gpu_check"] + list(sys.argv[1:] if argv is None else argv))
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    mode = "tiny-cpu-interpreter" if tiny else ("cuda-interpreted" if interpreted else "cuda-compiled")
    print(f"gpu_check: mode {mode} | device {env['gpu'] or env['cpu']} | driver {env['driver']} | CUDA {env['cuda']}")
    print(f"  python {env['python']} | torch {env['torch']} | triton {env['triton']} | transformers "
          f"{env['transformers']} | peft {env['peft']} | bitsandbytes {env['bitsandbytes']} | trl {env['trl']} | "
          f"liger {env['liger_kernel']}")
    if cuda and not tiny and interpreted:
        print("  WARNING: TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled for the GPU")
    if not cuda and not args.tiny:
        print("  no CUDA: running the tiny CPU checks under the Triton interpreter, no timing")
    report: Dict[str, Any] = {"environment": env, "mode": mode, "tolerances": {"float32": FP32_TOL,
                              "bfloat16": BF16_TOL, "qlora_bfloat16": QLORA_TOL[torch.bfloat16]},
                              "checks": [], "summary": {}, "timing": None}
    # fresh random inputs every run, reproducible from the recorded seed (or DPO_FAST_TEST_SEED)
    seed = int(os.environ.get("DPO_FAST_TEST_SEED") or (time.time_ns() ^ os.getpid()) & 0xFFFFFFF)
    torch.manual_seed(seed)
    report["seed"] = seed
    rec = Recorder(args.out, report)
    rec.write()
    threads = torch.get_num_threads()
    if tiny:
        torch.set_num_threads(1)  # tiny matmuls: one thread is fastest
    try:
        run_checks(rec, dev, TINY if tiny else GPU)
        if tiny or args.no_timing:
            report["timing"] = {"status": "skipped", "reason": "--tiny / no CUDA" if tiny else "--no-timing"}
        else:
            rec.run("realistic head timing", time_realistic_head, dev, repeats=args.repeats)
    finally:
        torch.set_num_threads(threads)
        report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        rec.write()
    s = rec.summary()
    failed = [c.name for c in rec.checks if c.status in (FAIL, ERROR)]
    print(f"gpu_check: {s[PASS]} passed, {s[FAIL]} failed, {s[ERROR]} errors, {s[SKIPPED]} skipped "
          f"in {report['wall_seconds']:.1f} s; wrote {rec.path}")
    for n in failed:
        print(f"  FAILED: {n}")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
