"""`python -m benchmarks`: the benchmark suite in one command (levels head, step, fit).

Every method runs in the same process on the same device, each only if importable; an out-of-memory
error is recorded as "OOM" for its cell and the run goes on. Output: a table on stdout (median time,
tokens/s, peak extra memory, ratios to dpo_fast), ``results.json`` with every number and the
environment (GPU, driver, versions, date, command), and PNG plots, all under ``--out``.

Without a GPU the suite runs the same code on tiny shapes ("tiny" model) so it cannot rot, and says
that GPU numbers need a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks import common
from benchmarks.models import MODELS, default_dtype

LEVELS = ("head", "step", "fit")
CPU_NOTICE = ("No CUDA GPU: running tiny shapes on CPU to exercise the suite. These are NOT GPU numbers; "
              "speed and memory results need a GPU (run the same command on a machine with CUDA).")

#: --quick on a GPU: the 8B head, the 1B step and one fit search (see the module docstring for timing).
GPU_QUICK = dict(
    head_models=["llama-3.1-8b"], kinds=["logps", "dpo"], modes=["frozen"], tokens=[2048, 8192],
    pairs_seq=[(4, 2048)], step_models=["llama-3.2-1b"], step_sizes=[(2, 1024)], fit_model="llama-3.2-1b",
    caps=[16.0], fit_what="seq_len", fit_methods=["naive", "trl", "dpo_fast"], max_seq_len=32768, max_pairs=32,
    batch_seq_len=1024, warmup=3, repeats=10, step_warmup=2, step_repeats=5,
)
GPU_FULL = dict(
    head_models=["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-0.5b"], kinds=["logps", "dpo"], modes=["frozen", "trainable"],
    tokens=[1024, 2048, 4096, 8192, 16384], pairs_seq=[(2, 512), (2, 2048), (4, 1024), (4, 4096), (8, 512), (8, 4096)],
    step_models=["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"], step_sizes=[(2, 1024), (2, 2048)],
    fit_model="llama-3.2-1b", caps=[16.0, 24.0], fit_what="both", fit_methods=None, max_seq_len=32768, max_pairs=64,
    batch_seq_len=1024, warmup=5, repeats=20, step_warmup=2, step_repeats=5,
)
# CPU: tiny shapes, 16-24 MB simulated caps on the step's own allocations (the model is tiny), few repeats.
CPU_QUICK = dict(
    head_models=["tiny"], kinds=["logps", "dpo"], modes=["frozen"], tokens=[128, 512], pairs_seq=[(2, 64)],
    step_models=["tiny"], step_sizes=[(1, 64)], fit_model="tiny", caps=[16 / 1024], fit_what="seq_len",
    fit_methods=["naive", "dpo_fast"], max_seq_len=2048, max_pairs=8, batch_seq_len=128,
    warmup=1, repeats=3, step_warmup=1, step_repeats=2,
)
CPU_FULL = dict(CPU_QUICK, modes=["frozen", "trainable"], tokens=[128, 512, 2048], pairs_seq=[(2, 64), (4, 256)],
                step_sizes=[(1, 64), (2, 128)], caps=[16 / 1024, 24 / 1024], fit_what="both", fit_methods=None,
                warmup=2, repeats=5)


def parse_size(text: str) -> tuple:
    """argparse type for PAIRSxSEQ_LEN, e.g. '4x2048' -> (4, 2048)."""
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PAIRSxSEQ_LEN such as 4x2048, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", nargs="+", choices=LEVELS + ("all",), default=["all"], help="levels to run")
    p.add_argument("--quick", action="store_true",
                   help="preset: 8B head, 1B step, one fit search (< 8 min on an H100); tiny shapes on CPU")
    p.add_argument("--shapes", nargs="+", choices=sorted(MODELS), help="models for the head and step levels")
    p.add_argument("--methods", nargs="+", help="only these methods (names as in the table)")
    p.add_argument("--kinds", nargs="+", choices=["logps", "dpo"], help="head: linear_log_probs and/or DPO head")
    p.add_argument("--modes", nargs="+", choices=["frozen", "trainable"], help="head: lm_head weight frozen/trainable")
    p.add_argument("--tokens", nargs="+", type=int, help="head logps: numbers of scored tokens")
    p.add_argument("--pairs-seq", nargs="+", type=parse_size, help="head dpo: PAIRSxSEQ_LEN sizes, e.g. 4x2048")
    p.add_argument("--step-sizes", nargs="+", type=parse_size, help="step: PAIRSxSEQ_LEN sizes, e.g. 2x1024")
    p.add_argument("--fit-model", choices=sorted(MODELS), help="fit: the model")
    p.add_argument("--caps", nargs="+", type=float, help="fit: memory caps in GB (on CPU: simulated, tiny)")
    p.add_argument("--fit-what", choices=["seq_len", "pairs", "both"], help="fit: what to search")
    p.add_argument("--max-seq-len", type=int, help="fit: upper limit of the sequence search")
    p.add_argument("--max-pairs", type=int, help="fit: upper limit of the batch search")
    p.add_argument("--batch-seq-len", type=int, help="fit: sequence length of the batch search")
    p.add_argument("--warmup", type=int, help="head: warm-up calls before timing")
    p.add_argument("--repeats", type=int, help="head: timed calls (the median is reported)")
    p.add_argument("--step-warmup", type=int, help="step: warm-up steps before timing (>= 1 on a GPU: the first "
                   "step compiles and autotunes the Triton kernels)")
    p.add_argument("--step-repeats", type=int, help="step: timed steps (the median is reported)")
    p.add_argument("--prompt-fraction", type=float, default=None,
                   help="step: the prompt's share of each row of the random batch (default 0.25); prefix sharing "
                        "computes it once per pair")
    p.add_argument("--cap-gb", type=float, metavar="GB",
                   help="step: run every step cell under this memory cap and report fits / OOM per method (GPU: "
                        "torch.cuda.set_per_process_memory_fraction, model weights included, the CUDA context "
                        "not; CPU: simulated on the step's allocations, so pass a tiny cap such as 0.016)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--no-quantize", action="store_true", help="step/fit: keep the body unquantized on GPU")
    quant.add_argument("--quantize", action="store_true",
                       help="step/fit: 4-bit NF4 body even without CUDA (bitsandbytes' CPU backend; slow)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--out", default="bench_out", help="directory for results.json and the PNG plots")
    return p


def _prompt_fraction(value: Optional[float]) -> float:
    """--prompt-fraction, checked (default: benchmarks.methods_step.PROMPT_FRACTION)."""
    from benchmarks.methods_step import PROMPT_FRACTION

    if value is None:
        return PROMPT_FRACTION
    if not 0.0 <= value < 1.0:
        raise ValueError(f"--prompt-fraction must be in [0, 1), got {value}")
    return value


def _settings(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """The preset for this device, overridden by the flags given."""
    on_gpu = device.type == "cuda"
    s = dict((GPU_QUICK if args.quick else GPU_FULL) if on_gpu else (CPU_QUICK if args.quick else CPU_FULL))
    if args.shapes:
        shapes = list(args.shapes)
        if not on_gpu and any(m != "tiny" for m in shapes):
            shapes = ["tiny"]  # GPU shapes on CPU would take hours; the notice says so
        s["head_models"] = s["step_models"] = shapes
    overrides = dict(kinds=args.kinds, modes=args.modes, tokens=args.tokens, pairs_seq=args.pairs_seq,
                     step_sizes=args.step_sizes, caps=args.caps, fit_what=args.fit_what,
                     max_seq_len=args.max_seq_len, max_pairs=args.max_pairs, batch_seq_len=args.batch_seq_len,
                     warmup=args.warmup, repeats=args.repeats, step_warmup=args.step_warmup,
                     step_repeats=args.step_repeats)
    s.update({k: v for k, v in overrides.items() if v is not None})
    if args.fit_model:
        s["fit_model"] = args.fit_model if on_gpu else "tiny"
    if args.methods:
        from benchmarks import methods_head, methods_step

        known = set(methods_head.method_names()) | set(methods_step.method_names())
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {sorted(known)}")
        s["fit_methods"] = [m for m in args.methods if m in methods_step.STEP_REGISTRY]
    if args.cap_gb is not None and not (args.cap_gb > 0 and math.isfinite(args.cap_gb)):
        raise ValueError(f"--cap-gb must be a positive number of GB, got {args.cap_gb}")
    if on_gpu and args.cap_gb is not None:
        total_gb = torch.cuda.get_device_properties(device).total_memory / (1 << 30)
        if args.cap_gb > total_gb:
            raise ValueError(f"--cap-gb {args.cap_gb:g} exceeds this GPU's {total_gb:.1f} GB")
    s["cap_gb"] = args.cap_gb
    s["prompt_fraction"] = _prompt_fraction(args.prompt_fraction)
    if s["step_warmup"] < 0:
        raise ValueError("--step-warmup must be >= 0")
    for key in ("tokens", "max_seq_len", "max_pairs", "batch_seq_len", "repeats", "step_repeats"):
        vals = s[key] if isinstance(s[key], list) else [s[key]]
        if any(v < 1 for v in vals):
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    s["levels"] = list(LEVELS) if "all" in args.level else [lv for lv in LEVELS if lv in args.level]
    return s


def _finite(x: Optional[float]) -> bool:
    return x is None or math.isfinite(x)


def run(argv: Optional[Sequence[str]] = None, *, log=print) -> Dict[str, Any]:
    """Run the suite; returns the JSON-able report (also written to <out>/results.json)."""
    args = build_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and memory stats follow the current device
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add contention noise
    try:
        return _run(args, list(sys.argv[1:] if argv is None else argv), device, log)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: List[str], device: torch.device, log) -> Dict[str, Any]:
    settings = _settings(args, device)
    dtype = default_dtype(device)
    os.makedirs(args.out, exist_ok=True)
    env = common.environment(device, argv)
    notice = None if device.type == "cuda" else CPU_NOTICE
    if notice:
        log(notice)
        if args.shapes and any(m != "tiny" for m in args.shapes):
            log(f"--shapes {' '.join(args.shapes)}: those shapes need a GPU; using 'tiny' instead.")
    log(f"device: {env['gpu'] or env['cpu']} | torch {env['torch']} | triton {env['triton']} | "
        f"transformers {env['transformers']} | levels {settings['levels']}")
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    cells: List[common.Cell] = []
    fit_results = []
    quantize = False if args.no_quantize else (True if args.quantize else None)
    step_rows: List[Dict[str, Any]] = []

    if "head" in settings["levels"]:
        from benchmarks import methods_head

        t0 = time.perf_counter()
        cases = methods_head.head_cases(settings["head_models"], settings["kinds"], settings["modes"],
                                        settings["tokens"], settings["pairs_seq"])
        cells += methods_head.run_head(cases, device, dtype, methods=args.methods, warmup=settings["warmup"],
                                       repeats=settings["repeats"], log=log)
        timings["head"] = time.perf_counter() - t0
    if "step" in settings["levels"]:
        from benchmarks import methods_step

        t0 = time.perf_counter()
        cases = methods_step.step_cases(settings["step_models"], settings["step_sizes"])
        cells += methods_step.run_step(cases, device, dtype, methods=args.methods, warmup=settings["step_warmup"],
                                       repeats=settings["step_repeats"], quantize=quantize,
                                       cap_gb=settings["cap_gb"], prompt_fraction=settings["prompt_fraction"],
                                       log=log)
        step_rows = methods_step.vs_baseline(cells)
        timings["step"] = time.perf_counter() - t0
    if "fit" in settings["levels"]:
        from benchmarks import fit as fit_mod
        from benchmarks.methods_step import QUICK_STEP_METHODS

        t0 = time.perf_counter()
        whats = ["seq_len", "pairs"] if settings["fit_what"] == "both" else [settings["fit_what"]]
        fit_results += fit_mod.run_fit(
            settings["fit_model"], device, dtype, caps_gb=settings["caps"],
            methods=settings["fit_methods"] or list(QUICK_STEP_METHODS), what=whats,
            max_seq_len=settings["max_seq_len"], max_pairs=settings["max_pairs"],
            batch_seq_len=settings["batch_seq_len"], quantize=quantize, log=log)
        timings["fit"] = time.perf_counter() - t0

    common.add_ratios(cells)
    bad = [c for c in cells if not all(_finite(getattr(c, k)) for k in ("median_ms", "peak_extra_mb", "peak_total_mb",
                                                                      "tokens_per_s"))]
    if bad:
        raise RuntimeError(f"non-finite numbers in {[(c.case, c.method) for c in bad]}")

    from benchmarks import plots

    label = env["gpu"] or f"CPU ({env['cpu']}), tiny shapes: not GPU numbers"
    plot_paths = plots.plot_cells(cells, args.out, device_label=label)
    plot_paths += plots.plot_fit(fit_results, args.out, device_label=label)
    timings["total"] = time.perf_counter() - t_start

    report = {
        "environment": env,
        "gpu_numbers": device.type == "cuda",
        "notice": notice,
        "settings": {k: v for k, v in settings.items()},
        "cells": [c.to_dict() for c in cells],
        "step_vs_baseline": step_rows,
        "fit": [r.to_dict() for r in fit_results],
        "plots": [os.path.basename(p) for p in plot_paths],
        "wall_seconds": timings,
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)

    log("")
    if cells:
        log(common.format_table(cells))
    if step_rows:
        from benchmarks.methods_step import format_vs_baseline

        log("")
        log(format_vs_baseline(step_rows))
    if fit_results:
        from benchmarks.fit import format_fit

        log(format_fit(fit_results))
    if notice:
        log(notice)
    log(f"wrote {path} and {len(plot_paths)} plot(s) in {timings['total']:.1f} s")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point for `python -m benchmarks` and `dpo-fast bench` (argv without the program name)."""
    try:
        run(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
