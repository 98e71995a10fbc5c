"""The `fit` level: what fits under a memory cap, per method.

For each method and cap: the longest sequence (a multiple of `step` tokens, 256 by default) whose
DPO step with one pair runs, and the largest number of pairs whose step runs at `batch_seq_len`.
The cap is `torch.cuda.set_per_process_memory_fraction(cap / card)` on a GPU (so it covers the model
weights as a consumer card would), and on CPU a simulated cap on the bytes the step allocates
(`benchmarks.common.AllocationMeter`), so the search logic is exercised everywhere.

Search: grow geometrically until the first failure (or the limit), then bisect between the last
success and the first failure. Each probe is one step; an out-of-memory error is a failure, any other
error stops the search and is reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.common import fmt_cap, free_memory, is_oom, memory_cap
from benchmarks.methods_step import STEP_REGISTRY, build_model, make_batch, run_one
from benchmarks.models import get_model


@dataclass
class FitResult:
    model: str
    method: str
    cap_gb: float
    what: str  # "seq_len" (pairs=1) or "pairs" (at seq_len=batch_seq_len)
    best: Optional[int]  # None: not even the smallest size fits
    limit: int  # the search stopped here; best == limit means "at least"
    probes: int
    status: str = "ok"  # ok / skipped / error
    note: str = ""
    simulated: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def largest_fitting(fits: Callable[[int], bool], start: int, unit: int, limit: int) -> tuple:
    """Largest multiple of `unit` in [start, limit] for which `fits` holds, assuming monotonicity.

    Returns (best or None, number of probes).
    """
    if start < unit or start % unit or limit < start:
        raise ValueError(f"need unit <= start <= limit with start a multiple of unit, got {start}, {unit}, {limit}")
    probes = 0
    good, bad = None, None
    size = start
    while True:
        probes += 1
        if fits(size):
            good = size
            if size >= limit:
                return good, probes
            size = min(limit, size * 2)
        else:
            bad = size
            break
    if good is None:
        return None, probes
    while bad - good > unit:
        mid = (good + bad) // 2 // unit * unit
        if mid <= good:
            break
        probes += 1
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, probes


def run_fit(model_name: str, device: torch.device, dtype: torch.dtype, *, caps_gb: Sequence[float],
            methods: Sequence[str], max_seq_len: int, max_pairs: int, batch_seq_len: int, unit: int = 256,
            what: Sequence[str] = ("seq_len", "pairs"), quantize: Optional[bool] = None, log: Callable[[str], None] = print) -> List[FitResult]:
    """Search seq_len (1 pair) and/or pairs (at batch_seq_len) under each cap for each method."""
    bad = [w for w in what if w not in ("seq_len", "pairs")]
    if bad:
        raise ValueError(f"what: unknown search {bad}; choose seq_len and/or pairs")
    if max_seq_len < unit:
        raise ValueError(f"max_seq_len must be >= {unit}, got {max_seq_len}")
    shape = get_model(model_name)
    results: List[FitResult] = []
    simulated = device.type != "cuda"
    model = None
    try:
        for name in methods:
            if name not in STEP_REGISTRY:
                raise ValueError(f"--methods: unknown step method {name!r}; choose from {list(STEP_REGISTRY)}")
            method = STEP_REGISTRY[name]
            reason = method.unavailable(device)
            for cap in caps_gb:
                for search in what:
                    res = FitResult(model_name, name, cap, search, None,
                                    max_seq_len // unit * unit if search == "seq_len" else max_pairs,
                                    0, simulated=simulated)
                    if reason:
                        res.status, res.note = "skipped", reason
                        results.append(res)
                        continue
                    if model is None:
                        model = build_model(shape, device, dtype, quantize=quantize)
                    error: List[BaseException] = []

                    def fits(size: int, search: str = search) -> bool:
                        pairs, seq = (1, size) if search == "seq_len" else (size, batch_seq_len)
                        try:
                            with memory_cap(device, int(cap * (1 << 30))):
                                batch = make_batch(shape.vocab_size, pairs, seq, device)
                                run_one(model, method, batch)
                            return True
                        except Exception as exc:
                            if not is_oom(exc):
                                error.append(exc)
                                raise
                            return False
                        finally:
                            free_memory(device)

                    try:
                        if search == "seq_len":
                            res.best, res.probes = largest_fitting(fits, unit, unit, max_seq_len // unit * unit)
                        else:
                            res.best, res.probes = largest_fitting(fits, 1, 1, max_pairs)
                    except Exception as exc:
                        res.status, res.note = "error", f"{type(exc).__name__}: {str(exc)[:120]}"
                    log(f"  fit  {model_name} {name:14s} cap {fmt_cap(cap)}{' (simulated)' if simulated else ''} "
                        f"{search:7s} -> {res.best if res.best is not None else 'none'}"
                        f"{' (limit)' if res.best == res.limit else ''} [{res.probes} probes] {res.note}")
                    results.append(res)
    finally:
        model = None  # drop the model before emptying the cache
        free_memory(device)
    return results


def format_fit(results: Sequence[FitResult]) -> str:
    lines = ["fit: largest seq_len (1 pair, multiples of 256) and pairs (at the batch seq_len) per memory cap"]
    for r in results:
        best = "-" if r.status != "ok" else ("none" if r.best is None else
                                              f">={r.best}" if r.best == r.limit else str(r.best))
        cap = fmt_cap(r.cap_gb) + (" (simulated, step allocations only)" if r.simulated else "")
        lines.append(f"  {r.model:14s} {r.method:26s} {cap:40s} {r.what:8s} {best:8s} {r.status} {r.note}")
    return "\n".join(lines)
