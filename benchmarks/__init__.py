"""dpo_fast's benchmark suite: `python -m benchmarks` (levels head, step, fit); see benchmarks/suite.py.

Results that were measured on a GPU go in benchmarks/RESULTS.md; nothing else does.
"""
from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite with command-line arguments `argv` (without the program name); returns an exit code."""
    from benchmarks.suite import main as _main

    return _main(argv)


__all__ = ["main"]
