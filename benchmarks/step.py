"""A full QLoRA DPO step of a random-weight model, per method.

    python benchmarks/step.py [--shapes llama-3.2-1b llama-3.1-8b] [--step-sizes 2x1024] [--methods ...]

Same flags as `python -m benchmarks`; this runs the step level.
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--level", "step"] + sys.argv[1:]))
