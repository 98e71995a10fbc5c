"""The DPO head benchmark: the fused DPO head (`fused_linear_dpo_loss` vs Liger, TRL-style, materialized).

    python benchmarks/dpo_head.py [--shapes llama-3.1-8b] [--pairs-seq 2x512 4x2048 8x4096] ...

Same flags as `python -m benchmarks`; this runs the head level with kind "dpo".
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--level", "head", "--kinds", "dpo"] + sys.argv[1:]))
