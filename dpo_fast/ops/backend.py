"""Which implementation runs a fused op: Triton kernels or the pure-torch mirror.

Default: Triton for CUDA tensors, torch otherwise. `DPO_FAST_BACKEND=torch|triton` or the
`use_backend` context manager override it; tests force "triton" on CPU tensors, which then
run under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

_BACKENDS = ("triton", "torch")
_forced: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _triton_usable() -> bool:
    """Does triton import here? Asked once: a failed import would otherwise be retried per op."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _checked(choice: str, t: torch.Tensor, what: str) -> str:
    if choice not in _BACKENDS:
        raise ValueError(f"{what} must be one of {_BACKENDS}, got {choice!r}")
    if choice == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return choice


def select_backend(t: torch.Tensor, requested: Optional[str] = None) -> str:
    """The backend for an op whose main input is ``t``: ``requested`` (an op's ``backend=``
    argument) if given, else `use_backend` / DPO_FAST_BACKEND, else Triton for CUDA tensors."""
    if requested is not None:
        return _checked(requested, t, "backend")
    choice = _forced or os.environ.get("DPO_FAST_BACKEND") or None
    if choice is not None:
        return _checked(choice, t, "DPO_FAST_BACKEND" if _forced is None else "use_backend's name")
    return "triton" if t.is_cuda and _triton_usable() else "torch"


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend ("triton" or "torch") inside the block; None restores automatic choice."""
    global _forced
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
