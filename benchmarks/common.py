"""Shared benchmark machinery: timing, peak-memory metering, OOM handling, environment facts, results.

GPU (docs/design.md, "How things are measured"): time with CUDA events, median of several runs
after warm-up; memory with `torch.cuda.reset_peak_memory_stats` + `max_memory_allocated`, reported
as the peak *above* what was allocated before the call (the inputs, the model). Memory caps use
`torch.cuda.set_per_process_memory_fraction`.

CPU (tiny shapes, so the suite is exercised everywhere): wall-clock median with `perf_counter`, and the
peak extra memory comes from `AllocationMeter`, a dispatch mode that adds up the bytes of every fresh
(non-aliasing) tensor an op returns and subtracts them when the tensor dies. A cap on CPU is simulated
by the same meter, which raises `torch.OutOfMemoryError` when the live bytes pass it.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

OK, OOM, SKIPPED, ERROR = "ok", "OOM", "skipped", "error"
MB = float(1 << 20)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Cell:
    """One measured (level, case, method) cell. Numbers are None unless status == "ok"."""

    level: str
    case: str
    method: str
    tokens: int
    status: str = OK
    median_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    peak_total_mb: Optional[float] = None  # GPU: absolute max_memory_allocated during the metered call
    ratio_time: Optional[float] = None  # this method's time / dpo_fast's time in the same case
    ratio_memory: Optional[float] = None  # this method's peak extra memory / dpo_fast's
    note: str = ""
    params: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def add_ratios(cells: List[Cell], reference_method: str = "dpo_fast") -> None:
    """Fill ratio_time / ratio_memory of every ok cell against `reference_method` in the same case."""
    refs = {(c.level, c.case): c for c in cells if c.method == reference_method and c.status == OK}
    for c in cells:
        ref = refs.get((c.level, c.case))
        if c.status != OK or ref is None:
            continue
        if ref.median_ms:
            c.ratio_time = c.median_ms / ref.median_ms
        if ref.peak_extra_mb:
            c.ratio_memory = c.peak_extra_mb / ref.peak_extra_mb


def fmt_cap(gb: float) -> str:
    """A memory cap in GB, written in MB below 1 GB (the CPU's simulated caps are tiny)."""
    return f"{gb * 1024:g} MB" if gb < 1 else f"{gb:g} GB"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(cells: List[Cell]) -> str:
    """A plain-text table: one row per cell, grouped by level and case."""
    header = ("level", "case", "method", "tokens", "median ms", "tokens/s", "peak extra MB", "x time", "x mem", "status")
    rows = [header]
    for c in cells:
        status = c.status if not c.note else f"{c.status} ({c.note})"
        rows.append((c.level, c.case, c.method, str(c.tokens), _fmt(c.median_ms, ".2f"), _fmt(c.tokens_per_s, ".0f"),
                     _fmt(c.peak_extra_mb, ".1f"), _fmt(c.ratio_time, ".2f"), _fmt(c.ratio_memory, ".2f"), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1])
        if k == 0:
            lines.append("-" * len(lines[0]))
    lines.append("x time / x mem: the method's median time / peak extra memory divided by dpo_fast's in the same "
                 "case (> 1: dpo_fast is faster / leaner; *_ref rows compare reference-on-the-fly variants to "
                 "dpo_fast with a precomputed reference). tokens: scored tokens (head), all 2*pairs*seq_len (step).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Device and environment


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be auto, cpu or cuda[:i], got {name!r}")
    return dev


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dpo_fast_version() -> Optional[str]:
    try:
        import dpo_fast

        return getattr(dpo_fast, "__version__", None)
    except Exception:
        return None


def environment(device: torch.device, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Facts every result must carry: GPU, driver, versions, date and the exact command."""
    argv = sys.argv if argv is None else argv
    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "benchmarks"] + list(argv)),
        "device": str(device),
        "gpu": None,
        "gpu_memory_gb": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "unsloth": _version("unsloth"),
        "dpo_fast": _dpo_fast_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["driver"] = _driver_version()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop garbage and cached blocks so the next cell starts from what its inputs hold (GPU only: on CPU
    the AllocationMeter counts only what the measured call allocates, and a full gc costs ~1 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Timing


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of `fn()` in ms after `warmup` calls (CUDA events on GPU)."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


# ----------------------------------------------------------------------------------------------
# Memory


class AllocationMeter(TorchDispatchMode):
    """Tracks live bytes of tensors created inside the block (CPU stand-in for max_memory_allocated).

    Every non-aliasing output of an aten op is a fresh allocation; its storage is counted once and
    released when the last tensor holding it is garbage-collected. `peak` is the high-water mark of the
    live bytes. With `cap` set, an allocation that lifts the live bytes above it raises
    torch.OutOfMemoryError (a simulated memory cap).
    """

    def __init__(self, cap: Optional[int] = None) -> None:
        super().__init__()
        self.cap = cap
        self.live = 0
        self.peak = 0
        self._storages: Dict[int, List[int]] = {}  # data_ptr -> [nbytes, holders]

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        entry = self._storages.get(ptr)
        if entry is None:
            if self.cap is not None and self.live + nbytes > self.cap:
                raise torch.OutOfMemoryError(
                    f"out of memory (simulated cap): {self.live + nbytes} bytes would exceed {self.cap} bytes")
            entry = self._storages[ptr] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for k, o in enumerate(outs):
            aliasing = k < len(returns) and returns[k].alias_info is not None
            if isinstance(o, torch.Tensor) and not aliasing:
                self._track(o)
        return out


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory allocated by `fn()` above what was allocated before it (bytes)."""
    free_memory(device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    meter = AllocationMeter()
    with meter:
        fn()
    return meter.peak


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_bytes: int) -> Iterator[Optional[AllocationMeter]]:
    """Run the block as if the device had only `cap_bytes` (GPU: a fraction of the card, CPU: simulated)."""
    if device.type == "cuda":
        # set_per_process_memory_fraction wants an index: a bare "cuda" means the current device
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        total = torch.cuda.get_device_properties(device).total_memory
        if cap_bytes > total:
            raise ValueError(f"memory cap {cap_bytes / 1e9:.1f} GB exceeds the GPU's {total / 1e9:.1f} GB")
        free_memory(device)
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, device)
        try:
            yield None
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            free_memory(device)
    else:
        meter = AllocationMeter(cap=cap_bytes)
        with meter:
            yield meter


_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: torch's, or an allocator / cuBLAS workspace failure wrapped in a
    RuntimeError (what a library gets when the per-process memory fraction is reached)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def measure(level: str, case: str, method: str, tokens: int, make_step: Callable[[], Callable[[], Any]],
            device: torch.device, *, warmup: int, repeats: int, params: Optional[Dict[str, Any]] = None) -> Cell:
    """Build a method's step, time it, meter its peak extra memory; an OOM becomes an "OOM" cell."""
    cell = Cell(level=level, case=case, method=method, tokens=tokens, params=dict(params or {}))
    step = None
    try:
        step = make_step()
        cell.median_ms = time_ms(step, device, warmup=warmup, repeats=repeats)
        cell.peak_extra_mb = peak_extra_bytes(step, device) / MB
        if device.type == "cuda":  # peak_extra_bytes reset the peak just before its call
            cell.peak_total_mb = torch.cuda.max_memory_allocated(device) / MB
        cell.tokens_per_s = tokens / (cell.median_ms / 1e3) if cell.median_ms > 0 else None
        bad = [k for k in ("median_ms", "peak_extra_mb") if not math.isfinite(getattr(cell, k))]
        if bad:
            raise RuntimeError(f"non-finite measurement {bad}")
    except Exception as exc:  # one cell failing never stops the run
        cell.median_ms = cell.tokens_per_s = cell.peak_extra_mb = cell.peak_total_mb = None
        if is_oom(exc):
            cell.status = OOM
        else:
            cell.status, cell.note = ERROR, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        del step
        free_memory(device)
    return cell


def needs(*modules: str, cuda: bool = False) -> Callable[[torch.device], Optional[str]]:
    """An `unavailable(device)` check for a method: None when it can run, else why not."""
    def unavailable(device: torch.device) -> Optional[str]:
        if cuda and device.type != "cuda":
            return "needs CUDA"
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a package that fails at import without a GPU
                return f"{module} not importable ({type(exc).__name__})"
        return None

    return unavailable


def skipped(level: str, case: str, method: str, tokens: int, reason: str) -> Cell:
    return Cell(level=level, case=case, method=method, tokens=tokens, status=SKIPPED, note=reason)
