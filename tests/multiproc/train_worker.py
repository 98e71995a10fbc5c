"""Worker for tests/test_distributed.py: several runs on 2 CPU processes in one torchrun launch (each launch
costs tens of seconds of start-up on a small machine).

    torchrun --standalone --nproc_per_node 2 train_worker.py PLAN_JSON

PLAN_JSON is a list of runs, each {"kind": ..., ...}:
  compute_loss {"modes": "ddp,fsdp2,inner", "out": dir}: tests/multiproc/compute_loss_worker.py's modes
  cli     {"argv": [...]}: `dpo-fast` itself (dpo_fast.cli.main) with these arguments
  ctrl_c  {"argv": [...], "at_call": k}: `dpo-fast train` whose process 1 gets SIGINT in its k-th loss call;
          then the same command with --resume (writes stop_step / resumed_steps to OUT/ctrl_c.json)
  packed  {"model": dir, "out": file}: load the model 4-bit and sharded (fsdp=True) and save layer 0's q_proj
          packed weight, gathered whole, with its quantization statistics
  trl     {"out": dir}: tests/multiproc/trl_worker.py (TRL's DPOTrainer, DDP through accelerate)
  copy    {"src": dir, "dst": dir}: process 0 copies a finished run's output (to compare a resumed run with it)
  syncs   {"argv": [...], "out": file}: `dpo-fast train` with --grad-accum 1 and 2, DDP and --fsdp, counting
          the gradient collectives (DDP's bucket all-reduces, FSDP's reduce-scatters) of the whole run
The process group is set up here, once, so that every run joins the same one.
"""
import gc
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_fast.cli as cli  # noqa: E402
from dpo_fast.train import DPOFastTrainer  # noqa: E402
from dpo_fast.train.distributed import init_parallel  # noqa: E402


def ctrl_c(run: dict) -> None:
    args = cli.build_parser().parse_args(run["argv"])
    config = cli.config_from_args(args, "dpo")
    trainer = DPOFastTrainer(config, log=lambda s: None)
    trainer.setup()
    calls = {"n": 0}
    real = trainer.loss_fn

    def loss_fn(model, batch):
        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] == run["at_call"]:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch)

    trainer.loss_fn = loss_fn
    first = trainer.train()
    resumed = cli.main(run["argv"] + ["--resume"])
    if dist.get_rank() == 0:
        with open(os.path.join(config.output, "ctrl_c.json"), "w") as fh:
            json.dump({"stop_step": first.steps, "interrupted": first.interrupted, "resumed_exit": resumed}, fh)


def packed(run: dict) -> None:
    from dpo_fast.ops.qlora_linear import is_supported_base
    from dpo_fast.state import record_holder
    from dpo_fast.train import TrainConfig
    from dpo_fast.train.fsdp import load_sharded_model

    cfg = TrainConfig(model=run["model"], data=[{}], output="unused", load_in_4bit=True, fsdp=True, seed=3)
    parallel = init_parallel("cpu", sharded=True)
    loaded = load_sharded_model(cfg, parallel)
    layer = record_holder(loaded.model).model.layers[0].self_attn.q_proj.base_layer
    weight = layer.weight.full_tensor()
    qs = layer.quant_state
    if dist.get_rank() == 0:
        torch.save({"packed": weight.detach().contiguous().view(torch.uint8).clone(), "absmax": qs.absmax.clone(),
                    "nested_absmax": qs.state2.absmax.clone(), "offset": qs.offset.clone(),
                    "local_rows": layer.weight.to_local().shape[0], "rows": weight.shape[0],
                    "fused_op_serves_it": is_supported_base(layer)}, run["out"])


def syncs(run: dict) -> None:
    """Gradient collectives of a whole run, per (DDP / FSDP, grad-accum): accumulation must not add any."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counts = {}
    real_reduce_scatter = dist.reduce_scatter_single
    for fsdp in (False, True):
        for accum in (1, 2):
            argv = run["argv"] + ["--grad-accum", str(accum), "--output", f"{run['out']}_{fsdp}_{accum}"]
            trainer = DPOFastTrainer(cli.config_from_args(cli.build_parser().parse_args(
                argv + (["--fsdp"] if fsdp else [])), "dpo"), log=lambda s: None).setup()
            key = f"{'fsdp' if fsdp else 'ddp'}_accum{accum}"
            counts[key] = 0

            def count(*args, _key=key, **kwargs):
                counts[_key] += 1
                return real_reduce_scatter(*args, **kwargs)

            def hook(state, bucket, _key=key):
                counts[_key] += 1
                return allreduce_hook(None, bucket)

            if fsdp:
                dist.reduce_scatter_single = count
            else:
                trainer.net.register_comm_hook(None, hook)
            try:
                trainer.train()
            finally:
                dist.reduce_scatter_single = real_reduce_scatter
            del trainer
    if dist.get_rank() == 0:
        with open(run["out"] + ".json", "w") as fh:
            json.dump(counts, fh)


def main(plan_path: str) -> None:
    with open(plan_path) as fh:
        plan = json.load(fh)
    dist.init_process_group("gloo")
    for run in plan:
        if run["kind"] == "cli":
            code = cli.main(run["argv"])
            if code != 0:
                raise SystemExit(f"dpo-fast {' '.join(run['argv'])} exited with {code}")
        elif run["kind"] == "ctrl_c":
            ctrl_c(run)
        elif run["kind"] == "packed":
            packed(run)
        elif run["kind"] == "compute_loss":
            import compute_loss_worker

            for mode in run["modes"].split(","):
                compute_loss_worker.run(mode, run["out"])
        elif run["kind"] == "syncs":
            syncs(run)
        elif run["kind"] == "copy":
            if dist.get_rank() == 0:
                shutil.copytree(run["src"], run["dst"])
        elif run["kind"] == "trl":
            import trl_worker

            trl_worker.main(run["out"])
        else:
            raise SystemExit(f"unknown run kind {run['kind']!r}")
        dist.barrier()
    gc.collect()  # models hold the process group: free them before it is destroyed
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
