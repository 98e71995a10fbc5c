"""The optimisation loop shared by the DPO and SFT stages.

Micro-batches come from a per-epoch batch order (length-grouped, seeded by seed + epoch), laid end
to end over epochs; optimizer step s consumes micro-batches [s * grad_accum, (s + 1) * grad_accum).
That makes the position a single integer, so a resumed run sees exactly the batches it would have
seen. bf16 autocast runs on GPU only; gradients are clipped; a SIGINT finishes the current step,
then the caller saves a checkpoint. A step whose loss or gradient norm is NaN / Inf (a diverged run)
stops the loop with NonFiniteError before the optimizer applies it, or, with on_nonfinite="skip", is
skipped (no update).
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from dpo_fast.errors import UserError

from .distributed import Parallel, gradient_sync, loss_scale, metric_weights
from .optim import clip_gradients

LossFn = Callable[[torch.nn.Module, Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, Any]]]
OrderFn = Callable[[int], List[List[int]]]


class NonFiniteError(UserError, FloatingPointError):
    """A step's loss or gradient norm is NaN or Inf: the run diverged. Raised before that step's update."""

    def __init__(self, message: str, *, step: int, what: str, value: float = float("nan")) -> None:
        super().__init__(message)
        self.step = step
        self.what = what  # "loss", "gradient norm" or "weights"
        self.value = value


NONFINITE_HINT = ("lower --lr, or enable gradient clipping (--max-grad-norm 1.0; a smaller value clips harder); "
                  "--on-nonfinite skip skips such steps instead of stopping")


def nonfinite_error(what: str, value: float, step: int, hint: str = NONFINITE_HINT) -> NonFiniteError:
    """The error of a step whose `what` ("loss" / "gradient norm") is `value` (NaN or Inf)."""
    return NonFiniteError(f"{what} is not finite ({value}) at step {step}: the training diverged; {hint}",
                          step=step, what=what, value=value)


class ZeroGradWatch:
    """Spots a collapsed run: the gradient norm exactly 0 for `patience` steps in a row (every update is 0).

    `update` returns a one-line warning the first time that happens (naming the steps), None otherwise.
    """

    def __init__(self, patience: int = 5) -> None:
        self.patience = patience
        self.first: Optional[int] = None
        self.warned = False

    def update(self, step: int, grad_norm: float) -> Optional[str]:
        if grad_norm != 0.0:
            self.first = None
            return None
        if self.first is None:
            self.first = step
        if self.warned or step - self.first + 1 < self.patience:
            return None
        self.warned = True
        return (f"warning: the gradient norm has been exactly 0 for {step - self.first + 1} steps in a row (steps "
                f"{self.first}-{step}): the run has collapsed and its updates change nothing (e.g. a learning rate "
                "so large that the loss saturated); lower --lr and keep --max-grad-norm on (warned once)")


@dataclass
class LoopState:
    """Where training stands: optimizer steps done and micro-batches consumed."""

    step: int = 0
    micro: int = 0
    total_steps: int = 0
    batches_per_epoch: int = 1
    interrupted: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)
    skipped: Optional[str] = None  # why the last step's update was skipped (on_nonfinite="skip"), else None

    @property
    def epoch(self) -> float:
        return self.micro / max(1, self.batches_per_epoch)

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "micro": self.micro, "total_steps": self.total_steps,
                "batches_per_epoch": self.batches_per_epoch, "epoch": self.epoch}


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """bf16 on CUDA ('auto' or 'bf16'); None (fp32, no autocast) on CPU or with 'fp32'."""
    if precision == "fp32" or device.type != "cuda":
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def micro_batches(order_fn: OrderFn, start: int) -> Iterator[Tuple[int, List[int]]]:
    """(global micro-batch index, example indices) from `start` on, epoch after epoch."""
    first = order_fn(0)
    per_epoch = len(first)
    if per_epoch == 0:
        raise ValueError("examples: no batches to train on (is the dataset empty?)")
    epoch, offset = divmod(start, per_epoch)
    index = start
    while True:
        order = first if epoch == 0 else order_fn(epoch)
        for batch in order[offset:]:
            yield index, batch
            index += 1
        epoch, offset = epoch + 1, 0


def _mean_metrics(items: Sequence[Tuple[Dict[str, Any], float]]) -> Dict[str, float]:
    """Weighted mean of metric dicts (weights: pairs per micro-batch)."""
    total: Dict[str, float] = {}
    weight: Dict[str, float] = {}
    for metrics, w in items:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if not isinstance(value, (int, float)):
                continue
            total[key] = total.get(key, 0.0) + float(value) * w
            weight[key] = weight.get(key, 0.0) + w
    return {k: total[k] / weight[k] for k in total}


def pairs_in(batch: Dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0]) // 2


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Sequence[Dict[str, Any]], collate: Callable, loss_fn: LossFn, *,
             batch_size: int, device: torch.device, precision: str = "auto", prefix: str = "eval_",
             parallel: Optional[Parallel] = None) -> Dict[str, float]:
    """Mean loss and metrics over examples (eval mode, no grad), keys prefixed as TRL does.

    With a multi-process `parallel`, each process evaluates its contiguous share (every process runs the
    same number of batches, padding with weight-0 batches) and the pair-weighted means are taken over all.
    """
    if not examples:
        return {}
    multi = parallel is not None and parallel.enabled
    mine = parallel.share(examples) if multi else list(examples)
    n_batches = parallel.most_batches(len(examples), batch_size) if multi else -(-len(mine) // batch_size)
    was_training = model.training
    model.eval()
    dtype = autocast_dtype(device, precision)
    items = []
    try:
        for j in range(n_batches):
            part = mine[j * batch_size:(j + 1) * batch_size]
            batch = to_device(collate(part or list(examples[:1])), device)
            with autocast(device, dtype):
                loss, metrics = loss_fn(model, batch)
            metrics = dict(metrics)
            metrics["loss"] = loss.detach()
            items.append((metrics, float(pairs_in(batch)) if part else 0.0))
    finally:
        model.train(was_training)
    means = parallel.reduce_mean(items) if multi else _mean_metrics(items)
    return {prefix + k: v for k, v in means.items()}


class StopFlag:
    """Set by SIGINT (Ctrl-C) while installed: the loop stops after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once, unless `escalate` is False: under torchrun each
    process gets Ctrl-C twice (from the terminal, and forwarded by the launcher), and a process that left
    mid-step would leave the others waiting in a collective.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.requested = False
        self.escalate = escalate
        self._previous = None

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and self.escalate:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def run_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
             examples: Sequence[Dict[str, Any]], collate: Callable, order_fn: OrderFn, loss_fn: LossFn,
             state: LoopState, grad_accum: int, max_grad_norm: Optional[float], device: torch.device,
             precision: str = "auto", on_step: Optional[Callable[[LoopState, Dict[str, float]], None]] = None,
             stop: Optional[StopFlag] = None, parallel: Optional[Parallel] = None,
             loss_weight: Optional[Callable[[Dict[str, torch.Tensor]], float]] = None,
             on_nonfinite: str = "stop") -> LoopState:
    """Run optimizer steps until state.total_steps (or a stop request). `on_step` sees each step's metrics.

    A NaN / Inf loss or gradient norm raises NonFiniteError before the step's update (on_nonfinite="stop"),
    or skips the update (on_nonfinite="skip"; state.skipped says why, the record has skipped_update=1).

    With a multi-process `parallel` (dpo_fast.train.distributed), `order_fn` gives the global micro-batches,
    each process runs its share, gradients synchronise on a step's last micro-batch only, and the metrics
    are those of the global micro-batches. `loss_weight(batch)` is what the loss is a mean over (default:
    pairs).
    """
    dtype = autocast_dtype(device, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = micro_batches(order_fn, state.micro)
    multi = parallel is not None and parallel.enabled
    model.train()
    while state.step < state.total_steps:
        requested = stop is not None and stop.requested
        if parallel.any(requested) if multi else requested:  # every process stops after the same step
            state.interrupted = True
            break
        t0 = time.perf_counter()
        items, tokens = [], 0
        bad_loss: Optional[float] = None  # a micro-batch's non-finite loss
        optimizer.zero_grad(set_to_none=True)
        if multi:
            items, tokens, bad_loss = _parallel_micro_batches(
                model, stream, parallel, examples=examples, collate=collate, loss_fn=loss_fn, state=state,
                grad_accum=grad_accum, device=device, dtype=dtype, loss_weight=loss_weight)
        else:
            for _ in range(grad_accum):
                index, indices = next(stream)
                batch = to_device(collate([examples[i] for i in indices]), device)
                with autocast(device, dtype):
                    loss, metrics = loss_fn(model, batch)
                state.micro = index + 1
                if not torch.isfinite(loss.detach()):
                    if on_nonfinite == "stop":
                        raise nonfinite_error("loss", loss.item(), state.step + 1)
                    bad_loss = loss.item() if bad_loss is None else bad_loss
                else:
                    (loss / grad_accum).backward()
                metrics = dict(metrics)
                metrics["loss"] = loss.detach()
                items.append((metrics, float(pairs_in(batch))))
                tokens += int(batch["attention_mask"].sum())
        grad_norm, finite = clip_gradients(params, max_grad_norm)
        state.skipped = None
        if bad_loss is not None:  # several processes agree on it here; one process stopped at the micro-batch
            if on_nonfinite == "stop":
                raise nonfinite_error("loss", bad_loss, state.step + 1)
            state.skipped = f"loss is not finite ({bad_loss})"
        elif not finite:
            if on_nonfinite == "stop":
                raise nonfinite_error("gradient norm", grad_norm, state.step + 1)
            state.skipped = f"gradient norm is not finite ({grad_norm})"
        if state.skipped is None:
            optimizer.step()
        lr = scheduler.get_last_lr()[0] if scheduler is not None else optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        record = _mean_metrics(items)
        record.update({"learning_rate": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan"),
                       "epoch": state.epoch, "tokens_per_second": tokens / max(elapsed, 1e-9),
                       "skipped_update": float(state.skipped is not None)})
        if on_step is not None:
            on_step(state, record)
    return state


def _parallel_micro_batches(model: torch.nn.Module, stream: Iterator[Tuple[int, List[int]]], parallel: Parallel, *,
                            examples: Sequence[Dict[str, Any]], collate: Callable, loss_fn: LossFn, state: LoopState,
                            grad_accum: int, device: torch.device, dtype: Optional[torch.dtype],
                            loss_weight: Optional[Callable[[Dict[str, torch.Tensor]], float]]
                            ) -> Tuple[List[Tuple[Dict[str, float], float]], float, Optional[float]]:
    """One optimizer step's forwards and backwards on this process's shares of the global micro-batches.

    Returns the global micro-batches' (metrics, pairs), the step's token count over all processes and a
    non-finite loss of any process (None when all are finite). A process whose loss is NaN / Inf still runs
    its backward (the gradients, and so everyone's gradient norm, turn non-finite): the processes run the
    same collectives and agree on the step.
    """
    local = []
    bad = float("nan")
    any_bad = False
    for k in range(grad_accum):
        index, indices = next(stream)
        part = parallel.share(indices)
        # an empty share still runs (one pair at weight 0) so that every process runs the same collectives
        batch = to_device(collate([examples[i] for i in (part or indices[:1])]), device)
        pairs = float(pairs_in(batch)) if part else 0.0
        weight = (pairs if loss_weight is None else float(loss_weight(batch))) if part else 0.0
        global_weight = float(len(indices)) if loss_weight is None else parallel.all_sum([weight])[0]
        with gradient_sync(model, sync=k == grad_accum - 1):
            with autocast(device, dtype):
                loss, metrics = loss_fn(model, batch)
            if part and not torch.isfinite(loss.detach()):
                any_bad, bad = True, loss.item()
            (loss * (loss_scale(parallel, weight, global_weight) / grad_accum)).backward()
        metrics = dict(metrics)
        metrics["loss"] = loss.detach()
        local.append((metrics, pairs, weight, float(batch["attention_mask"].sum()) if part else 0.0,
                      metric_weights(batch)))
        state.micro = index + 1
    items, tokens = parallel.reduce_micro_batches(local)
    return items, tokens, (bad if parallel.any(any_bad) else None)
