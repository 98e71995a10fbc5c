"""Matrix-product FLOPs of one QLoRA DPO step, per method, counted as the ops run (any device, CPU included).

    python benchmarks/gemm_flops.py                      # llama-3.1-8b's proportions at 1/8 width, 4 layers
    python benchmarks/gemm_flops.py --shape llama-3.2-1b --divisor 4 --layers 2 --methods dpo_fast trl

What a change in the step's structure (prefix sharing, the recompute tail skip, ...) does to the GEMM work,
without a GPU: every mm / addmm / addmm_ / bmm / baddbmm that runs in one step (after one warm-up step) adds
2*M*N*K. Attention (SDPA) and elementwise work are not counted. The model keeps the shape's proportions
(head_dim, GQA ratio, MLP and vocabulary ratios to the width) at 1/divisor of its width, with fewer layers,
and plain (unquantized) linears: the FLOP shares match the full shape's, except that the head weighs more
with fewer layers. torch.utils.flop_counter.FlopCounterMode does not count ``addmm_``, which dpo_fast's
QLoRA linear uses, hence this counter. Not a timing: see benchmarks/step.py and profile_step.py for those.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.methods_step import STEP_REGISTRY, build_model, make_batch  # noqa: E402
from benchmarks.models import MODELS, ModelShape  # noqa: E402
from benchmarks.suite import parse_size  # noqa: E402

DEFAULT_METHODS = ("trl", "dpo_fast", "dpo_fast_all_unshared", "dpo_fast_all_no_tail_skip", "dpo_fast_all")


class GemmFlops(TorchDispatchMode):
    """Adds 2*M*N*K for every matrix product dispatched inside the block, by op name (``.flops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        flops = 0
        if name == "mm":
            flops = 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif name in ("addmm", "addmm_"):
            flops = 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        elif name == "bmm":
            flops = 2 * args[0].shape[0] * args[0].shape[1] * args[0].shape[2] * args[1].shape[2]
        elif name in ("baddbmm", "baddbmm_"):
            flops = 2 * args[1].shape[0] * args[1].shape[1] * args[1].shape[2] * args[2].shape[2]
        if flops:
            self.flops[name] = self.flops.get(name, 0) + flops
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.flops.values())


def scaled(shape: ModelShape, divisor: int, layers: int) -> ModelShape:
    """`shape` at 1/divisor of its width, MLP and vocabulary (same head_dim and GQA ratio), `layers` deep."""
    heads = max(1, shape.num_attention_heads // divisor)
    kv = max(1, shape.num_key_value_heads * heads // shape.num_attention_heads)
    width = heads * shape.head_size if shape.head_dim is None else shape.hidden_size // divisor  # Gemma: head_dim set
    return dataclasses.replace(shape, name=f"{shape.name}/{divisor}x{layers}L", hidden_size=width,
                               intermediate_size=shape.intermediate_size // divisor, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv,
                               vocab_size=shape.vocab_size // divisor)


def step_flops(model: torch.nn.Module, method: str, batch: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Matrix-product FLOPs by op of one step of `method` (installed for the call), after one warm-up step."""
    spec = STEP_REGISTRY[method]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    try:
        with spec.install(model):
            step = spec.make(model, batch, opt)
            step()
            with GemmFlops() as counter:
                step()
    finally:
        model.zero_grad(set_to_none=True)
    return dict(counter.flops)


def run(shape: ModelShape, methods: Sequence[str], pairs: int, seq_len: int, *, seed: int = 0) -> List[Dict[str, Any]]:
    """One row per method: GEMM GFLOP of one step and its ratio to the first method's."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = build_model(shape, device, torch.float32, quantize=False)
    batch = make_batch(shape.vocab_size, pairs, seq_len, device)
    rows: List[Dict[str, Any]] = []
    for method in methods:
        unavailable = STEP_REGISTRY[method].unavailable(device)
        if unavailable:
            rows.append(dict(method=method, status=f"skipped: {unavailable}"))
            continue
        by_op = step_flops(model, method, batch)
        rows.append(dict(method=method, status="ok", gflop=sum(by_op.values()) / 1e9,
                         by_op={k: v / 1e9 for k, v in by_op.items()}))
    first = next((r["gflop"] for r in rows if r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            r["vs_first"] = r["gflop"] / first
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gemm_flops.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(MODELS), default="llama-3.1-8b")
    p.add_argument("--divisor", type=int, default=8, help="width divisor (keeps head_dim and the GQA ratio)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", type=parse_size, default=(2, 512), help="PAIRSxSEQ_LEN (default 2x512)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(STEP_REGISTRY))
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.divisor < 1 or args.layers < 1:
        p.error("--divisor and --layers must be >= 1")
    shape = scaled(MODELS[args.shape], args.divisor, args.layers)
    pairs, seq_len = args.size
    rows = run(shape, args.methods, pairs, seq_len)
    print(f"GEMM FLOPs of one step, {shape.name} (hidden {shape.hidden_size}, MLP {shape.intermediate_size}, "
          f"vocab {shape.vocab_size}), {pairs}x{seq_len}, counted on the CPU")
    print(f"{'method':<28} {'GFLOP':>10} {'vs first':>9}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['method']:<28} {r['gflop']:>10.2f} {r['vs_first']:>9.4f}")
        else:
            print(f"{r['method']:<28} {r['status']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(shape=dataclasses.asdict(shape), size=[pairs, seq_len], rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
