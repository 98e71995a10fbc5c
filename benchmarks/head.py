"""The log-prob head benchmark: the fused log-prob head alone (`linear_log_probs` vs the alternatives).

    python benchmarks/head.py [--shapes llama-3.1-8b] [--tokens 1024 8192] [--modes frozen trainable] ...

Same flags as `python -m benchmarks`; this runs the head level with kind "logps".
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--level", "head", "--kinds", "logps", "--modes", "frozen", "trainable"] + sys.argv[1:]))
