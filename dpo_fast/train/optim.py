"""Optimizer and learning-rate schedule.

AdamW over the trainable parameters (no weight decay on biases and norms); on CUDA with
bitsandbytes installed, its paged 8-bit AdamW (optimizer state in 8 bits, paged to CPU
under memory pressure). Warmup then cosine/linear decay via transformers.get_scheduler.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Tuple

import torch

from .config import TrainConfig


def trainable_parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Two groups of the parameters that require grad: decayed (matrices) and not (bias, norms)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError("model: has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def resolve_optimizer_name(name: str, device: torch.device) -> str:
    """'auto' -> paged 8-bit AdamW on CUDA when bitsandbytes imports, else plain AdamW."""
    if name != "auto":
        return name
    if device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401

            return "paged_adamw_8bit"
        except Exception:
            return "adamw"
    return "adamw"


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer over the model's trainable parameters."""
    groups = trainable_parameter_groups(model, cfg.weight_decay)
    name = resolve_optimizer_name(cfg.optimizer, device)
    betas = tuple(float(b) for b in cfg.adam_betas)
    if name == "adamw":
        kwargs = {}
        if device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, **kwargs)
    import bitsandbytes as bnb

    if device.type != "cuda":
        raise ValueError(f"optimizer: {name!r} needs a CUDA device")
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.learning_rate, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Warmup (ceil(warmup_ratio * total_steps) steps) then cfg.scheduler decay to zero."""
    from transformers import get_scheduler

    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm) -> Tuple[float, bool]:
    """Clip to max_norm (None: only measure). Returns (total norm before clipping, finite?)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0, True
    if max_norm is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP's sharded gradients give a distributed norm
        norm = norm.full_tensor()
    value = float(norm)
    return value, math.isfinite(value)
