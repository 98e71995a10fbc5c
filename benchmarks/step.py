"""The step benchmark: one full QLoRA DPO step, unpatched vs dpo_fast.patch group by group.

    python benchmarks/step.py                      # the comparison below
    python benchmarks/step.py --shapes llama-3.1-8b --step-sizes 2x2048 --cap-gb 16   # the 16 GB target

Defaults (each overridable by the suite's flags, see `python -m benchmarks --help`):
  --shapes      llama-3.2-1b llama-3.2-3b llama-3.1-8b (random weights; 4-bit NF4 body when
                bitsandbytes has CUDA; gradient checkpointing on; LoRA r=16 on every projection)
  --step-sizes  2x1024 2x2048 (pairs x tokens)
  --methods     BODY_STEP_METHODS: naive, trl (the unpatched transformers+peft+bitsandbytes
                baselines), dpo_fast_head, each body group on its own with the head (dpo_fast_rms_norm,
                dpo_fast_rope, dpo_fast_swiglu, dpo_fast_qlora_linear, dpo_fast_offload,
                dpo_fast_prefix_sharing), dpo_fast (patch()'s defaults) and dpo_fast_all (every switch
                on); the table of all methods is `benchmarks.methods_step.METHODS`

Prints the suite's table (ratios to dpo_fast) and a second one with step time, tokens/s, peak
memory and each method's fraction of the unpatched TRL step (the 8B step target: <= 0.5).
`--cap-gb 16` runs every cell under a 16 GB cap and reports fits / OOM per method. Without a GPU
the same code runs on the tiny CPU model, and says that its numbers are not GPU numbers.
"""
import os
import sys
from typing import List, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.methods_step import BODY_STEP_METHODS  # noqa: E402
from benchmarks.suite import main  # noqa: E402

#: the model shapes and pairs x tokens the step comparison runs by default
STEP_SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
STEP_SIZES = ("2x1024", "2x2048")


def step_argv(argv: Sequence[str]) -> List[str]:
    """The suite's argv for the step benchmark: the defaults above unless the flag is given."""
    argv = list(argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = ["--level", "step"]
    if "--shapes" not in given:
        out += ["--shapes", *STEP_SHAPES]
    if "--step-sizes" not in given:
        out += ["--step-sizes", *STEP_SIZES]
    if "--methods" not in given:
        out += ["--methods", *BODY_STEP_METHODS]
    if "--out" not in given:
        out += ["--out", os.path.join("bench_out", "step")]
    return out + argv


if __name__ == "__main__":
    sys.exit(main(step_argv(sys.argv[1:])))
