"""Data-parallel training on torch.distributed: one process per device, launched by torchrun or accelerate.

    torchrun --nproc_per_node N -m dpo_fast train ...
    accelerate launch --num_processes N -m dpo_fast train ...

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `init_parallel` reads them,
initialises the default process group (nccl on CUDA, gloo on CPU) and gives this process its own device
(cuda:LOCAL_RANK). Without a launcher (WORLD_SIZE unset or 1) it returns a one-process `Parallel` whose
methods change nothing, and the trainer runs exactly as before.

Batches. `--batch-size` is per process. The trainer orders the data as a one-process run with
batch_size * world_size does, and each process takes a contiguous share of every global micro-batch
(`Parallel.share`). Its loss is scaled by world_size * its weight / the global weight (`loss_scale`), so
that the mean DDP / FSDP takes over processes is the one-process mean, also when a global batch does not
split evenly (the last of an epoch). A process whose share is empty runs one pair at weight 0, so that
every process runs the same forwards and collectives. The weight is the number of pairs for the DPO loss
(a mean over pairs) and the number of scored tokens for the SFT loss (a mean over tokens).
Step metrics are combined over processes per micro-batch in one all-reduce per step
(`Parallel.reduce_micro_batches`), each weighted by what it is a mean of (pairs, or scored tokens for
TRL's logits / entropy / token accuracy, `metric_weights`), the loss like its gradient: the values of
the one-process run.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

#: metrics that are totals over a micro-batch (summed over processes), not means
SUMMED_METRICS = ("num_tokens",)
#: metrics that are means over scored tokens (TRL's): which rows' tokens (chosen, rejected or all)
TOKEN_METRICS = {"logits/chosen": "chosen", "logits/rejected": "rejected", "entropy": "all",
                 "mean_token_accuracy": "all"}


@dataclass
class Parallel:
    """This process's place among the training processes (world_size 1: a plain one-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # init_parallel initialised the process group (and `shutdown` destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------ data shares
    def share_bounds(self, n: int, rank: Optional[int] = None) -> Tuple[int, int]:
        """[start, end) of `rank`'s contiguous share of n items: sizes differ by at most one, larger first."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def share(self, items: Sequence[Any]) -> List[Any]:
        """This process's contiguous share of `items` (possibly empty when there are fewer items than processes)."""
        start, end = self.share_bounds(len(items))
        return list(items[start:end])

    def most_batches(self, n: int, batch_size: int) -> int:
        """The largest number of batches of `batch_size` any process's share of n items makes."""
        start, end = self.share_bounds(n, 0)
        return -(-(end - start) // batch_size)

    # ------------------------------------------------------------------------------ collectives
    @property
    def comm_device(self) -> torch.device:
        """Where small collective tensors live: the process's GPU for nccl, else the CPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sums over processes (float64), in one all-reduce."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on at least one."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0 if self.enabled else bool(flag)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------------------ metrics
    def reduce_micro_batches(self, items: Sequence[Tuple[Dict[str, Any], float, float, float, Dict[str, float]]]
                             ) -> Tuple[List[Tuple[Dict[str, float], float]], float]:
        """Each global micro-batch's metrics from the processes' shares, and the total token count.

        items: per micro-batch (metrics of this process's share, its pairs, its loss weight, its tokens,
        its `metric_weights`); all 0 for an empty share. Returns per micro-batch (metrics, global pairs),
        ready for the pair-weighted mean over micro-batches a one-process run takes, and the tokens.
        """
        keys = sorted(_scalar_metrics(items[0][0])) if items else []
        flat: List[float] = []
        for metrics, pairs, weight, tokens, weights in items:
            values = _scalar_metrics(metrics)
            if sorted(values) != keys:
                raise RuntimeError(f"metrics: micro-batches report different metrics ({sorted(values)} vs {keys})")
            flat += [pairs, weight, tokens]
            for key in keys:
                flat += [values[key] * _weight_of(key, pairs, weight, weights), _weight_of(key, pairs, weight, weights)]
        # the all-reduce below needs the same metric names on every process: compare their count first
        if self.all_sum([len(keys)])[0] != len(keys) * self.world_size:
            raise RuntimeError(f"metrics: processes report different metrics (this one: {keys})")
        total = self.all_sum(flat)
        out, tokens_total, width = [], 0.0, 3 + 2 * len(keys)
        for i in range(len(items)):
            row = total[i * width:(i + 1) * width]
            pairs, tokens = row[0], row[2]
            merged = {}
            for j, key in enumerate(keys):
                value, weight = row[3 + 2 * j], row[4 + 2 * j]
                merged[key] = value if key in SUMMED_METRICS else (value / weight if weight else 0.0)
            out.append((merged, pairs))
            tokens_total += tokens
        return out, tokens_total

    def reduce_mean(self, items: Sequence[Tuple[Dict[str, Any], float]]) -> Dict[str, float]:
        """Pair-weighted means over every process's (metrics, pairs) items (eval): one all-reduce."""
        keys = sorted(_scalar_metrics(items[0][0])) if items else []
        sums = [0.0] * (len(keys) + 1)
        for metrics, pairs in items:
            values = _scalar_metrics(metrics)
            for j, key in enumerate(keys):
                sums[j] += values[key] * pairs
            sums[-1] += pairs
        total = self.all_sum(sums)
        return {key: total[j] / total[-1] for j, key in enumerate(keys)} if total[-1] else {}


def _weight_of(key: str, pairs: float, loss_weight: float, weights: Dict[str, float]) -> float:
    """What `key` is a mean over in one share: the loss weight for the loss, 1 (present) or 0 for a total,
    the scored tokens for TRL's token metrics, else pairs."""
    if key == "loss":
        return loss_weight
    if key in SUMMED_METRICS:
        return 1.0 if pairs else 0.0
    return weights.get(key, pairs) if pairs else 0.0


def metric_weights(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The scored-token counts behind TRL's token metrics of a preference batch (`TOKEN_METRICS`): completion
    tokens after the first column, of the chosen rows, the rejected rows and all rows."""
    scored = batch["completion_mask"][:, 1:].bool()
    if "attention_mask" in batch:
        scored = scored & batch["attention_mask"][:, 1:].bool()
    half = scored.shape[0] // 2
    counts = {"chosen": float(scored[:half].sum()), "rejected": float(scored[half:].sum())}
    counts["all"] = counts["chosen"] + counts["rejected"]
    return {key: counts[rows] for key, rows in TOKEN_METRICS.items()}


def _scalar_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The scalar numbers among metrics (tensors of one element become floats), as `loop._mean_metrics` reads."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


SINGLE = Parallel()


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when not launched by one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def init_parallel(device_name: str = "auto", *, sharded: bool = False, timeout_minutes: float = 30.0) -> Parallel:
    """This process's `Parallel`: from an initialised process group, else from the launcher's environment.

    device_name: 'auto' (cuda:LOCAL_RANK when CUDA is there, else cpu), 'cuda' (cuda:LOCAL_RANK) or 'cpu'.
    A device with an index ('cuda:0') is refused on several processes: they would all share it.
    sharded: FSDP needs a process group even for one process (launched by torchrun --nproc_per_node 1).
    """
    from .model_loading import resolve_device

    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else launched_world_size()
    if world <= 1 and not sharded:
        return Parallel(device=resolve_device(device_name))
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run one process")
    requested = resolve_device(device_name)
    if requested.index is not None and world > 1:
        raise ValueError(f"device: {device_name!r} would put all {world} processes on one device; use "
                         f"--device {requested.type} (each process takes {requested.type}:LOCAL_RANK)")
    if not initialised and "MASTER_ADDR" not in os.environ:
        if world <= 1:
            raise ValueError("fsdp: sharding needs processes started by a launcher: torchrun --nproc_per_node N -m "
                             "dpo_fast train ... (or accelerate launch); one process trains unsharded without --fsdp")
        raise ValueError(f"WORLD_SIZE is {world} but MASTER_ADDR is not set: start the processes with torchrun "
                         f"--nproc_per_node N -m dpo_fast ... or accelerate launch")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s); start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = requested
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: Dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        owns = True
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                    owns_group=owns)


def shutdown(parallel: Parallel) -> None:
    """Destroy the process group if `init_parallel` created it (after a barrier, so no process leaves early)."""
    if parallel.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- wrapping and syncing
def wrap_ddp(model: torch.nn.Module, parallel: Parallel) -> torch.nn.Module:
    """DistributedDataParallel over `model` (already on parallel.device).

    Buffers are not broadcast on every forward (nothing trains them, and a forward-time collective would
    make the ranks' forward counts matter); DDP still broadcasts rank 0's parameters once, here.
    """
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    # newer torch renames the switch (forward_sync_buffers); both keep the one broadcast at construction
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    kwargs: Dict[str, Any] = {name: False}
    if parallel.device.type == "cuda":
        kwargs["device_ids"] = [parallel.device.index]
        kwargs["output_device"] = parallel.device.index
    return DistributedDataParallel(model, **kwargs)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """For the block (a micro-batch's forward and backward): synchronise gradients only when `sync`.

    DDP: `no_sync()` for the micro-batches before the last of a step; FSDP2: `set_requires_gradient_sync`.
    Other models: nothing to do.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with (contextlib.nullcontext() if sync else model.no_sync()):
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    yield


def loss_scale(parallel: Parallel, local_weight: float, global_weight: float) -> float:
    """Factor on this process's mean loss so that the processes' averaged gradient is the global mean's."""
    if global_weight <= 0:
        raise ValueError("loss weight: the global micro-batch has nothing to score")
    return parallel.world_size * local_weight / global_weight
