"""Worker for tests/test_distributed.py, launched by torchrun on the CPU (gloo): one compute_dpo_loss step per mode.

    torchrun --standalone --nproc_per_node 2 compute_loss_worker.py MODES OUT_DIR

MODES: comma-separated, run in order in the same processes: ddp (DistributedDataParallel), fsdp2
(fully_shard), inner (a DDP model's .module: unsynchronised; last, since its warning is given once).
For each mode every rank builds the same tiny LoRA Llama (same seed), patches it, wraps it, takes its half
of one preference batch, runs compute_dpo_loss and backward, and saves its loss and full LoRA gradients
to OUT_DIR/MODE_rank<r>.pt.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multiproc.common import PAIRS, make_batch, make_model  # noqa: E402

import dpo_fast  # noqa: E402


def run(mode: str, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    dpo_fast.patch(model)
    if mode in ("ddp", "inner"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        net = wrapped.module if mode == "inner" else wrapped
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        net = fully_shard(model)
    else:
        raise SystemExit(f"unknown mode {mode}")
    batch = make_batch()
    per_rank = PAIRS // world
    rows = list(range(rank * per_rank, (rank + 1) * per_rank))
    local = {k: torch.cat([v[rows], v[[PAIRS + r for r in rows]]]) for k, v in batch.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, metrics = dpo_fast.compute_dpo_loss(net, local, beta=0.1)
        loss.backward()
    grads = {}
    for name, p in net.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            grads[name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1 if mode == "ddp" else 0)] = (
                g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    torch.save({"loss": loss.detach(), "grads": grads, "warnings": [str(w.message) for w in caught]},
               os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    dist.barrier()


def main(modes: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    for mode in modes.split(","):
        run(mode, out_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
