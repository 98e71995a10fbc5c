"""Torch threads for a CPU training run started from the command line: one, unless the user says otherwise.

The models that train on a CPU are small (the demo's Llama has 0.8M parameters): their matmuls gain
little from a second thread, and when another process holds a core the OpenMP threads wait on each
other and a step slows down many times over. Measured with `dpo-fast train` on the demo-sized model
(batch 2, 40 steps, 5 interleaved repeats, on a 2-core machine shared with other work), median wall
time for the whole command, torch's default (2 threads) against 1 thread: 51.5 s vs 29.2 s with
other work using about two cores, 143 s vs 71 s with a busy loop on one more core; a 12.7M-parameter
model: 94 s vs 23 s. A second thread never won on the wall clock.

`--threads N` sets the count; OMP_NUM_THREADS or MKL_NUM_THREADS in the environment is the user's
choice and is left alone. The Python API (DPOFastTrainer) never changes the thread count.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
DEFAULT_CPU_THREADS = 1


def cpu_thread_count(requested: Optional[int], environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """The torch thread count for a CPU run, or None to leave torch's own (set from the environment)."""
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ValueError(f"--threads: expected a positive number of threads, got {requested!r}")
        return requested
    if any(environ.get(name, "").strip() for name in THREAD_ENV_VARS):
        return None
    return DEFAULT_CPU_THREADS


def set_cpu_threads(device: str, requested: Optional[int], environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """Apply `cpu_thread_count` when `device` ("auto", "cpu", "cuda", ...) resolves to the CPU; returns what was set."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return None
    count = cpu_thread_count(requested, environ)
    if count is not None:
        torch.set_num_threads(count)
    return count
