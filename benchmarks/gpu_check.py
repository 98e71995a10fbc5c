"""`python3 -m benchmarks.gpu_check [--out DIR]`: the kernel tests on a GPU, then the Llama-3-8B head timed.

Meant for the few minutes a session gets on a GPU machine (see scripts/gpu_session.sh):

1. prints the environment (GPU, driver, torch / triton / transformers / bitsandbytes / trl versions);
2. runs the tests marked ``kernels`` (pytest.ini) in a pytest subprocess, on CUDA: every Triton kernel
   compiled for the GPU against its float64 reference at the test's own tolerance, the GPU-sized cases
   (tests/gpu_cases.py) included, the nf4 dequantization bit for bit against bitsandbytes' CUDA kernel,
   and whole patched models against their unpatched selves. Each test outcome is one check;
3. times forward + backward of the frozen bf16 head at the Llama-3-8B shape (d=4096, V=128256, N=8192)
   for dpo_fast, TRL's chunked log-prob head (benchmarks/methods_head.py) and the naive materialized-
   logits head, with their peak extra memory (docs/design.md, "How things are measured"). The head's
   speed target is >= 1.3x TRL's speed at no more than its peak memory.

``<out>/gpu_check.json`` is rewritten as results come in, so a run cut short still leaves what it did.
The exit code is 1 when a test fails or errors or nothing is selected; a missed speed target is
reported, not an error. Without CUDA, or with ``--tiny``, the same selection runs on CPU tensors under
the Triton interpreter (what CI runs; the GPU-sized cases skip) and nothing is timed. ``--collect-only``
lists the selection without running it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.pytest_log import LOG_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "kernels"
PASS, FAIL, ERROR, SKIPPED = "pass", "fail", "error", "skipped"
#: the head's speed target: dpo_fast >= this many times TRL's chunked head's speed, at most its peak memory
SPEED_TARGET = 1.3
JSON_NAME = "gpu_check.json"
#: The Llama-3-8B head (hidden size, vocabulary) and the tokens of the timed call.
HEAD_D, HEAD_V, HEAD_N = 4096, 128256, 8192


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class Check:
    """One test outcome (name: its pytest node id) or one failure of the script's own timing code."""

    name: str
    status: str
    detail: str = ""
    seconds: Optional[float] = None


class Recorder:
    """Collects checks, prints the ones that did not pass as they land, and rewrites the JSON report."""

    def __init__(self, out_dir: str, report: Dict[str, Any], log: Callable[[str], None] = print) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, JSON_NAME)
        self.report = report
        self.checks: List[Check] = []
        self.log = log

    def add(self, check: Check) -> None:
        self.checks.append(check)
        if check.status in (FAIL, ERROR):
            self.log(f"  {check.status.upper():7s} {check.name} {check.detail}".rstrip())

    def run(self, group: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run one group (the timing); an exception becomes an "error" check and the script goes on."""
        try:
            fn(self, *args, **kwargs)
        except Exception as exc:
            tb = traceback.format_exc().strip().splitlines()
            self.add(Check(group, ERROR, detail=f"{type(exc).__name__}: {str(exc)[:300]} | {' / '.join(tb[-4:])[:600]}"))
        finally:
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


# ---------------------------------------------------------------------------------------------- the tests


def pytest_command(tests: Sequence[str], keyword: Optional[str], collect_only: bool) -> List[str]:
    """The pytest run of the kernel selection, reporting through benchmarks.pytest_log."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-c", os.path.join(ROOT, "pytest.ini"), "-p", "no:cacheprovider",
           "-p", "benchmarks.pytest_log", "--continue-on-collection-errors", "-m", MARKER, *tests]
    if keyword:
        cmd += ["-k", keyword]
    if collect_only:
        cmd.append("--collect-only")
    return cmd


def _ingest(rec: Recorder, line: str) -> None:
    event = json.loads(line)
    if event["event"] == "collected":
        rec.report["selection"]["tests"] = event["nodeids"]
        rec.report["selection"]["collected"] = len(event["nodeids"])
    elif event["event"] == "collect_error":
        rec.add(Check(f"collecting {event['nodeid']}", ERROR, event["detail"]))
    else:
        rec.add(Check(event["nodeid"], event["status"], event["detail"], event["seconds"]))


def run_tests(rec: Recorder, cmd: Sequence[str], env: Dict[str, str], poll_s: float = 2.0) -> int:
    """Run `cmd` (pytest with the log plugin), turning each logged event into the report as it comes;
    returns pytest's exit code. The test output itself goes to this process's stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "tests.jsonl")
        open(log_path, "w").close()
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env={**env, LOG_ENV: log_path})
        done = 0
        while True:
            finished = proc.poll() is not None
            with open(log_path, "rb") as f:
                f.seek(done)
                text = f.read()
            complete = text[:text.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            for line in complete.decode().splitlines():
                _ingest(rec, line)
            done += len(complete)
            rec.write()
            if finished:
                return proc.returncode
            time.sleep(poll_s)


def check_outcome(rec: Recorder, rc: int, collect_only: bool) -> None:
    """Turn what pytest's exit code says and the checks do not (nothing selected, a crash) into an error."""
    selected = rec.report["selection"].get("collected")
    if not selected:
        rec.add(Check("selection", ERROR, f"no test is marked {MARKER!r} among {rec.report['selection']['tests_from']}"
                                          f" (pytest exit code {rc})"))
    elif rc != 0 and rec.summary()["ok"]:
        rec.add(Check("pytest", ERROR, f"pytest exited with code {rc} without a failing test (see its output above)"))
    elif collect_only:
        rec.log(f"  {selected} tests selected")


# ---------------------------------------------------------------------------------------------- the timing


def time_realistic_head(rec: Recorder, dev: torch.device, warmup: int = 3, repeats: int = 10) -> None:
    """fwd+bwd median ms and peak extra memory: dpo_fast vs TRL's chunked head vs naive, same inputs."""
    from benchmarks import common
    from benchmarks.methods_head import HEAD_REGISTRY, make_inputs
    from dpo_fast.ops.backend import use_backend

    case = f"llama-3.1-8b logps frozen N={HEAD_N} bf16"
    inp = make_inputs("logps", HEAD_D, HEAD_V, tokens=HEAD_N, dtype=torch.bfloat16, device=dev)
    cells = []
    for method in ("dpo_fast", "trl", "naive"):
        spec = HEAD_REGISTRY[("logps", method)]
        reason = spec.unavailable(dev)
        if reason:
            cells.append(common.skipped("gpu_check", case, method, HEAD_N, reason))
        else:
            with use_backend("triton" if method == "dpo_fast" else None):
                cells.append(common.measure("gpu_check", case, method, HEAD_N, lambda: spec.build("logps", inp), dev,
                                            warmup=warmup, repeats=repeats, params=dict(d=HEAD_D, vocab=HEAD_V)))
        c = cells[-1]
        rec.log(f"  TIMING  {method:10s} {c.status:8s} "
                f"{'' if c.median_ms is None else f'{c.median_ms:9.2f} ms  peak extra {c.peak_extra_mb:9.1f} MB'} {c.note}")
    common.add_ratios(cells)
    by = {c.method: c for c in cells}
    timing: Dict[str, Any] = {"case": case, "d": HEAD_D, "vocab": HEAD_V, "tokens": HEAD_N, "dtype": "bfloat16",
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("bench_out", "gpu_check"), help=f"directory for {JSON_NAME}")
    p.add_argument("--tiny", action="store_true", help="run the tests on CPU tensors under the Triton interpreter, "
                   "GPU-sized cases skipped, no timing (automatic without CUDA)")
    p.add_argument("--collect-only", action="store_true", help=f"list the tests marked {MARKER!r}, run nothing")
    p.add_argument("-k", dest="keyword", default=None, help="only the selected tests matching this pytest -k expression")
    p.add_argument("--tests", nargs="+", default=[os.path.join(ROOT, "tests")],
                   help="test files or folders to select from (default: the repository's tests/)")
    p.add_argument("--no-timing", action="store_true", help="skip the Llama-3-8B head timing")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per method (median reported)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the selection and the timing; 0 when every selected test passed or skipped, 1 if not, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    from benchmarks import common

    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    t_start = time.perf_counter()
    env = common.environment(torch.device("cpu" if tiny else "cuda"), [])
    env["command"] = " ".join(["python3", "-m", "benchmarks.gpu_check"] + list(sys.argv[1:] if argv is None else argv))
    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if tiny:  # CPU tensors through the Triton interpreter, as CI runs them
        child_env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    interpreted = child_env.get("TRITON_INTERPRET") == "1"
    env["triton_interpret"] = child_env.get("TRITON_INTERPRET")
    mode = "tiny-cpu-interpreter" if tiny else ("cuda-interpreted" if interpreted else "cuda-compiled")
    print(f"gpu_check: mode {mode} | device {env['gpu'] or env['cpu']} | driver {env['driver']} | CUDA {env['cuda']}")
    print(f"  python {env['python']} | torch {env['torch']} | triton {env['triton']} | transformers "
          f"{env['transformers']} | peft {env['peft']} | bitsandbytes {env['bitsandbytes']} | trl {env['trl']} | "
          f"liger {env['liger_kernel']}")
    if not tiny and interpreted:
        print("  WARNING: TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled for the GPU")
    if not cuda and not args.tiny:
        print("  no CUDA: running the kernel tests on the CPU under the Triton interpreter, no timing")
    # fresh inputs every run, reproducible from the recorded seed (or a given DPO_FAST_TEST_SEED)
    seed = int(os.environ.get("DPO_FAST_TEST_SEED") or (time.time_ns() ^ os.getpid()) & 0xFFFFFFF)
    child_env["DPO_FAST_TEST_SEED"] = str(seed)
    torch.manual_seed(seed)
    tests = [os.path.abspath(t) for t in args.tests]  # pytest runs in the repository root
    cmd = pytest_command(tests, args.keyword, args.collect_only)
    report: Dict[str, Any] = {"environment": env, "mode": mode, "collect_only": args.collect_only, "seed": seed,
                              "selection": {"marker": MARKER, "tests_from": tests, "keyword": args.keyword,
                                            "command": " ".join(cmd[1:]), "collected": None, "tests": []},
                              "checks": [], "summary": {}, "timing": None}
    rec = Recorder(args.out, report)
    rec.write()
    try:
        rc = run_tests(rec, cmd, child_env)
        check_outcome(rec, rc, args.collect_only)
        if tiny or args.no_timing or args.collect_only:
            why = "--tiny / no CUDA" if tiny else ("--no-timing" if args.no_timing else "--collect-only")
            report["timing"] = {"status": "skipped", "reason": why}
        else:
            rec.run("realistic head timing", time_realistic_head, torch.device("cuda"), repeats=args.repeats)
    finally:
        report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        rec.write()
    s = rec.summary()
    print(f"gpu_check: {s[PASS]} passed, {s[FAIL]} failed, {s[ERROR]} errors, {s[SKIPPED]} skipped of "
          f"{report['selection']['collected'] or 0} selected in {report['wall_seconds']:.1f} s; wrote {rec.path}")
    for c in rec.checks:
        if c.status in (FAIL, ERROR):
            print(f"  FAILED: {c.name}")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
