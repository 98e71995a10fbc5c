"""Where a QLoRA DPO step spends its GPU time: a torch.profiler breakdown, plus the nf4 dequantize share.

    python benchmarks/profile_step.py                       # 8B shape, 2x2048: trl, dpo_fast, dpo_fast_all
    python benchmarks/profile_step.py --shape llama-3.2-1b --methods trl dpo_fast --size 2x1024

For each method: one warm-up step, then one profiled step; the device kernels are summed by name and by
category (GEMM, nf4 dequantize, attention, dpo_fast's Triton kernels, copies, the rest), so the next
optimisation goes where the time is. On CUDA it also reports when the GPU waits (the gaps between kernels,
by size, and the largest ones) and the CUDA runtime's syncs and allocations during the step. Then, on
CUDA with bitsandbytes, the dequantize-then-cuBLAS split of each of the shape's projections at --size's
token count (what a fused nf4 dequant+matmul could save at most is the dequantize share), and the base
GEMM plus LoRA term with the LoRA term added after the GEMM or first. Last, the issue floor: the same
methods' step time on a model of the shape's depth and vocabulary but 256 wide (`narrow`), where the GPU's
own work is negligible, so the time is what the CPU needs to issue one step. A floor near the full step's
GPU busy time means the GPU waits for the CPU (fewer launches and less Python per layer help); a floor far
below it means the gaps are syncs or copies, or that the kernels themselves ran slower than when profiled.
Without CUDA the same code runs on the tiny CPU model (CPU op times; not GPU numbers). Writes profile.json
under --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, free_memory, resolve_device  # noqa: E402
from benchmarks.methods_step import (STEP_REGISTRY, _measure_cell, bnb_has_cuda, build_model,  # noqa: E402
                                    case_label, make_batch)
from benchmarks.models import MODELS, ModelShape, default_dtype, get_model  # noqa: E402
from benchmarks.suite import parse_size  # noqa: E402

#: kernel-name fragments per category, first match wins (lower-case)
CATEGORIES = (
    ("nf4 dequantize", ("dequant",)),
    ("dpo_fast triton", ("_rms_norm_", "_rope_kernel", "_swiglu_", "_online_softmax", "_logit_grad")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "ampere", "matmul", "addmm", "aten::mm", "bmm")),
    ("copy / offload", ("memcpy", "copy", "memset")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


#: CUDA runtime calls that block the CPU or the device (syncs, allocations) or count launches
RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                 "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost", "cudaLaunchKernel")
_GAP_BUCKETS = ((0.01, "<10us"), (0.1, "10-100us"), (1.0, "0.1-1ms"), (float("inf"), ">=1ms"))


def is_device_activity(evt: Any) -> bool:
    """A kernel, copy or memset on the GPU: not a CPU op, and not a GPU-side range of a user annotation
    (record_function, e.g. ``Optimizer.step#AdamW.step``), which spans kernels and gaps and would count
    them twice or hide the gaps."""
    return evt.device_type == torch.autograd.DeviceType.CUDA and not getattr(evt, "is_user_annotation", False)


def gpu_idle(kernels: Sequence[Tuple[float, float, str]], top: int = 10) -> Dict[str, Any]:
    """Where the GPU waits inside a profiled step, from its kernels' (start_us, end_us, name), any stream.

    Busy time is the union of the kernel intervals; each hole between them is a gap. Many small gaps
    mean launch-bound stretches; a few large ones mean host syncs, allocations or CPU-side work the GPU
    waits for. Returns span, busy and idle ms, gaps per size bucket (count, ms) and the largest gaps
    (ms, offset from the first kernel, the kernels around it).
    """
    if not kernels:
        return dict(span_ms=0.0, busy_ms=0.0, idle_ms=0.0, buckets={}, top=[])
    ks = sorted(kernels)
    t0 = ks[0][0]
    busy = 0.0
    gaps = []
    cur_start, cur_end, cur_name = ks[0]
    for start, end, name in ks[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append(((start - cur_end) / 1e3, (cur_end - t0) / 1e3, cur_name, name))
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
        if end >= cur_end:
            cur_name = name
    busy += cur_end - cur_start
    span = (max(e for _, e, _ in ks) - t0) / 1e3
    buckets: Dict[str, List[float]] = {label: [0, 0.0] for _, label in _GAP_BUCKETS}
    for ms, *_ in gaps:
        label = next(lb for lim, lb in _GAP_BUCKETS if ms < lim)
        buckets[label][0] += 1
        buckets[label][1] += ms
    largest = sorted(gaps, key=lambda g: -g[0])[:top]
    return dict(span_ms=span, busy_ms=busy / 1e3, idle_ms=span - busy / 1e3,
                buckets={k: dict(count=int(v[0]), ms=v[1]) for k, v in buckets.items()},
                top=[dict(ms=ms, at_ms=at, before=b[:100], after=a[:100]) for ms, at, b, a in largest])


def runtime_calls(events: Sequence[Any]) -> Dict[str, Dict[str, float]]:
    """Count and CPU ms of the CUDA runtime calls in RUNTIME_CALLS seen in a profile (syncs, allocations)."""
    out: Dict[str, Dict[str, float]] = {}
    for evt in events:
        name = getattr(evt, "name", "")
        if name in RUNTIME_CALLS or any(name.startswith(c + "_") or name.startswith(c + "Async") for c in
                                        ("cudaMemcpy", "cudaMalloc", "cudaFree")):
            row = out.setdefault(name, dict(count=0, ms=0.0))
            row["count"] += 1
            row["ms"] += evt.time_range.elapsed_us() / 1e3
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_method(model, method_name: str, batch, device: torch.device, top: int) -> Dict[str, Any]:
    """One warm-up step and one profiled step of `method_name`; kernel time by name and by category."""
    from torch.profiler import ProfilerActivity, profile

    method = STEP_REGISTRY[method_name]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    try:
        with method.install(model):
            step = method.make(model, batch, opt)
            step()
            _sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                step()
                _sync(device)
            wall_ms = (time.perf_counter() - t0) * 1e3
    finally:
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        del opt
        free_memory(device)
    by_name: Dict[str, float] = defaultdict(float)
    counts: Dict[str, int] = defaultdict(int)
    on_device = device.type == "cuda"
    events = prof.events()
    intervals = []
    for evt in events:
        if on_device:
            if not is_device_activity(evt):
                continue
            us = evt.time_range.elapsed_us()
            intervals.append((evt.time_range.start, evt.time_range.end, evt.name))
        else:  # CPU: each aten op's self time, so nested ops (mm inside linear) are not counted twice
            if not evt.name.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        by_name[evt.name] += us / 1e3
        counts[evt.name] += 1
    by_cat: Dict[str, float] = defaultdict(float)
    for name, ms in by_name.items():
        by_cat[category(name)] += ms
    total = sum(by_name.values())
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return dict(method=method_name, wall_ms=wall_ms, kernel_ms=total,
                categories={k: v for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
                top=[dict(name=n[:160], ms=ms, calls=counts[n], category=category(n)) for n, ms in kernels],
                idle=gpu_idle(intervals) if on_device else None, runtime=runtime_calls(events) if on_device else None)


def _timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Mean ms of fn() after 3 warm-up calls (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(3):
        fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        _sync(device)
        return start.elapsed_time(end) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1e3 / repeats


def nf4_split(shape_name: str, tokens: int, device: torch.device, dtype: torch.dtype,
              repeats: int = 20) -> List[Dict[str, Any]]:
    """Per projection shape: ms of bitsandbytes' dequantize_4bit and of dpo_fast's (dequant_triton_ms), of the dense
    GEMM, and of bitsandbytes' dequantize and the GEMM together (needs bitsandbytes); and
    base GEMM + LoRA term (r=16) with the LoRA term added after the GEMM or first, the GEMM accumulating onto it."""
    import bitsandbytes.functional as bnbF
    from torch import nn

    from benchmarks.methods_step import _quantize_linears

    shape = get_model(shape_name)
    d, f = shape.hidden_size, shape.intermediate_size
    kv = d * shape.num_key_value_heads // shape.num_attention_heads
    rows = []
    for label, (inp, out) in (("q/o_proj", (d, d)), ("k/v_proj", (d, kv)), ("gate/up_proj", (d, f)),
                              ("down_proj", (f, d))):
        holder = nn.Module()
        holder.proj = nn.Linear(inp, out, bias=False, device=device, dtype=dtype)
        _quantize_linears(holder, device, dtype)  # the same NF4 layer the step benchmark builds
        w4, qs = holder.proj.weight.data, holder.proj.weight.quant_state
        x = torch.randn(tokens, inp, device=device, dtype=dtype)
        w = bnbF.dequantize_4bit(w4, qs)
        deq = _timed_ms(lambda: bnbF.dequantize_4bit(w4, qs), device, repeats)
        deq_triton = None  # dpo_fast's one-kernel dequantize (what patch() uses on CUDA); CPU: interpreter only
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            from dpo_fast.kernels.dequant_4bit import dequantize_4bit
            deq_triton = _timed_ms(lambda: dequantize_4bit(w4, qs), device, repeats)
        mm = _timed_ms(lambda: x @ w.t(), device, repeats)
        both = _timed_ms(lambda: x @ bnbF.dequantize_4bit(w4, qs).t(), device, repeats)
        # the LoRA term (r = 16) added after the base GEMM (a read-modify-write pass over y), or computed
        # first with the base GEMM accumulating onto it (beta=1), which dpo_fast.ops.qlora_linear does
        h = torch.randn(tokens, 16, device=device, dtype=dtype)
        b = torch.randn(out, 16, device=device, dtype=dtype) / 4
        y = torch.empty(tokens, out, device=device, dtype=dtype)

        def lora_after():
            torch.mm(x, w.t(), out=y)
            y.addmm_(h, b.t(), alpha=2.0)

        def lora_first():
            y.addmm_(h, b.t(), beta=0, alpha=2.0)
            y.addmm_(x, w.t())

        after, first = _timed_ms(lora_after, device, repeats), _timed_ms(lora_first, device, repeats)
        rows.append(dict(proj=label, in_features=inp, out_features=out, tokens=tokens, weight_dtype=str(w.dtype),
                         dequant_ms=deq, dequant_triton_ms=deq_triton, gemm_ms=mm, dequant_then_gemm_ms=both,
                         dequant_share=deq / both if both else None, lora_after_ms=after, lora_first_ms=first))
        holder = w4 = qs = x = w = h = b = y = None  # free before the next projection
        free_memory(device)
    return rows


NARROW_WIDTH = 256


def narrow(shape: ModelShape, width: int = NARROW_WIDTH) -> ModelShape:
    """`shape` with its depth, vocabulary and GQA ratio but a `width`-wide body (heads of 64, MLP 2x width).

    A step of it runs the same modules, ops and kernel launches per layer as `shape`'s while the GPU's
    share of the work all but vanishes, so its step time is the CPU's time to issue such a step."""
    width = min(width, shape.hidden_size)
    heads = max(1, width // 64)
    kv = max(1, heads * shape.num_key_value_heads // shape.num_attention_heads)
    return dataclasses.replace(shape, name=f"{shape.name}@{width}", hidden_size=width, intermediate_size=2 * width,
                               num_attention_heads=heads, num_key_value_heads=kv)


def issue_floor(shape: ModelShape, methods: Sequence[str], pairs: int, seq: int, device: torch.device,
                dtype: torch.dtype, *, warmup: int = 2, repeats: int = 3) -> Dict[str, Any]:
    """Median step ms of each method on `narrow(shape)` at the same batch: the CPU's issue time per step."""
    small = narrow(shape)
    out: Dict[str, Any] = dict(shape=small.name, hidden_size=small.hidden_size, layers=small.num_hidden_layers,
                               step_ms={})
    case = dict(model=small.name, pairs=pairs, seq_len=seq)
    model = build_model(small, device, dtype)
    try:
        for name in methods:
            method = STEP_REGISTRY[name]
            if method.unavailable(device):
                continue
            # the step benchmark's own cell runner: install, time, uninstall (a failure becomes the cell's note)
            cell = _measure_cell(model, method, small, case, case_label(case), 2 * pairs * seq, device, {}, warmup,
                                 repeats, None)
            out["step_ms"][name] = cell.median_ms
            if cell.median_ms is None:
                out.setdefault("errors", {})[name] = f"{cell.status}: {cell.note}"[:300]
    finally:
        del model
        free_memory(device)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/profile_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(MODELS), help="model shape (default llama-3.1-8b on GPU, tiny on CPU)")
    p.add_argument("--size", type=parse_size, default=(2, 2048), help="PAIRSxSEQ_LEN (default 2x2048)")
    p.add_argument("--methods", nargs="+", default=["trl", "dpo_fast", "dpo_fast_all"], choices=sorted(STEP_REGISTRY))
    p.add_argument("--top", type=int, default=15, help="kernels listed per method")
    p.add_argument("--no-issue-floor", dest="issue_floor", action="store_false",
                   help="skip timing the methods on the narrow model of the same depth (the CPU issue floor)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join("bench_out", "profile"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    shape_name = args.shape or ("llama-3.1-8b" if on_gpu else "tiny")
    if not on_gpu:
        shape_name, args.size = "tiny", (min(args.size[0], 1), min(args.size[1], 64))
        print("No CUDA GPU: profiling the tiny model on CPU (aten op times; NOT GPU numbers).")
    dtype = default_dtype(device)
    pairs, seq = args.size
    report: Dict[str, Any] = dict(environment=environment(device), shape=shape_name, pairs=pairs, seq_len=seq,
                                  command=" ".join([os.path.basename(sys.argv[0])] + list(argv or sys.argv[1:])),
                                  methods=[], nf4=None, issue_floor=None)
    model = build_model(get_model(shape_name), device, dtype)
    batch = make_batch(get_model(shape_name).vocab_size, pairs, seq, device)
    for name in args.methods:
        reason = STEP_REGISTRY[name].unavailable(device)
        if reason:
            print(f"{name}: skipped ({reason})")
            continue
        try:
            r = profile_method(model, name, batch, device, args.top)
        except Exception as exc:  # report and go on: the other methods and the nf4 split still run
            print(f"{name}: profiling failed: {type(exc).__name__}: {exc}")
            report["methods"].append(dict(method=name, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        report["methods"].append(r)
        print(f"\n== {shape_name} {pairs}x{seq} {name}: profiled step {r['wall_ms']:.1f} ms wall, "
              f"{r['kernel_ms']:.1f} ms in {'GPU kernels' if on_gpu else 'CPU aten ops'}")
        for cat, ms in r["categories"].items():
            print(f"   {cat:18s} {ms:9.1f} ms  {100 * ms / max(r['kernel_ms'], 1e-9):5.1f}%")
        for k in r["top"]:
            print(f"     {k['ms']:9.2f} ms {k['calls']:6d}x  [{k['category']}] {k['name'][:110]}")
        idle = r.get("idle")
        if idle:
            print(f"   GPU busy {idle['busy_ms']:.1f} ms of a {idle['span_ms']:.1f} ms span: "
                  f"idle {idle['idle_ms']:.1f} ms; gaps "
                  + ", ".join(f"{k}: {v['count']} ({v['ms']:.1f} ms)" for k, v in idle["buckets"].items()))
            for g in idle["top"][:5]:
                print(f"     gap {g['ms']:7.2f} ms at {g['at_ms']:8.1f} ms: {g['before'][:45]} -> {g['after'][:45]}")
        if r.get("runtime"):
            print("   CUDA runtime: " + ", ".join(f"{k} {v['count']}x {v['ms']:.1f} ms" for k, v in
                                                    sorted(r["runtime"].items())))
    del model, batch
    free_memory(device)
    if on_gpu and bnb_has_cuda():
        try:
            report["nf4"] = nf4_split(shape_name, 2 * pairs * seq, device, dtype)
        except Exception as exc:
            print(f"nf4 split failed: {type(exc).__name__}: {exc}")
            report["nf4"] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    if isinstance(report["nf4"], list):
        print(f"\nnf4 dequantize vs GEMM, and where the LoRA term is added, at {2 * pairs * seq} tokens "
              f"({shape_name}, bf16):")
        for r in report["nf4"]:
            triton_ms = r.get("dequant_triton_ms")
            print(f"   {r['proj']:13s} {r['in_features']:6d}->{r['out_features']:<6d} dequant {r['dequant_ms']:7.3f} ms"
                  f" (dpo_fast's kernel {'-' if triton_ms is None else f'{triton_ms:.3f}'} ms)"
                  f"  gemm {r['gemm_ms']:7.3f} ms  both {r['dequant_then_gemm_ms']:7.3f} ms"
                  f"  dequant share {100 * r['dequant_share']:5.1f}%  base+LoRA: LoRA after "
                  f"{r['lora_after_ms']:7.3f} ms, LoRA first {r['lora_first_ms']:7.3f} ms")
    if args.issue_floor:
        try:
            floor = report["issue_floor"] = issue_floor(get_model(shape_name), args.methods, pairs, seq, device, dtype)
        except Exception as exc:
            print(f"issue floor failed: {type(exc).__name__}: {exc}")
            floor = report["issue_floor"] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
        busy = {m["method"]: (m.get("idle") or {}).get("busy_ms") for m in report["methods"]}
        if "step_ms" in floor:
            print(f"\nissue floor: the same step on {floor['shape']} ({floor['layers']} layers, "
                  f"{floor['hidden_size']} wide), where the device has almost nothing to do:")
            for name, ms in floor["step_ms"].items():
                vs = f"   (full step's GPU busy time {busy[name]:.1f} ms)" if busy.get(name) else ""
                print(f"   {name:28s} {'failed' if ms is None else f'{ms:9.1f} ms'}{vs}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "profile.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
