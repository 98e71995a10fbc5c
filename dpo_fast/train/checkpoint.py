"""Checkpoints: the adapter in peft's format plus optimizer, scheduler, RNG and step state.

Layout of a checkpoint directory (`OUTPUT/checkpoint-<step>/`):
    adapter_config.json, adapter_model.safetensors   the trained LoRA adapter ("default" only)
      (or config.json + model.safetensors for a full fine-tune)
    trainer_state.pt                                  optimizer, scheduler, RNG, step, epoch, position
    trainer_state.json                                the human-readable part of the state
`PeftModel.from_pretrained(base, checkpoint_dir)` loads the adapter.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from dpo_fast.patching import unpatch
from dpo_fast.patching.support import is_peft_model

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_CKPT_RE = re.compile(r"checkpoint-(\d+)$")


@contextmanager
def _no_shard_bar() -> Iterator[None]:
    """transformers draws a "Writing model shards" progress bar on every save_pretrained; a checkpoint is one
    line of the run's own log, so the bar is off while we save (and restored after)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_model_weights(model: torch.nn.Module, directory: str,
                       state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The trainable weights: the "default" LoRA adapter (peft format) or the whole model.

    state_dict: the model's weights gathered beforehand (a sharded model's parameters are not whole).
    """
    os.makedirs(directory, exist_ok=True)
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    with _no_shard_bar():
        if is_peft_model(model):
            model.save_pretrained(directory, selected_adapters=["default"], **kwargs)
        else:
            model.save_pretrained(directory, **kwargs)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    scheduler: Any, state: Dict[str, Any], *, weights: Optional[Dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[Dict[str, Any]] = None,
                    rng_per_rank: Optional[List[Dict[str, Any]]] = None) -> str:
    """Write a complete, resumable checkpoint to directory (atomically: tmp dir then rename).

    A multi-process run passes what it gathered: `weights` and `optimizer_state` of a sharded model, and
    every process's RNG state (`rng_per_rank`, restored per rank on resume).
    """
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_weights(model, tmp, state_dict=weights)
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    payload = {
        "state": dict(state),
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state() if rng_per_rank is None else rng_per_rank[0],
    }
    if rng_per_rank is not None:
        payload["rng_per_rank"] = list(rng_per_rank)
    torch.save(payload, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, default=str)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def load_trainable_weights(model: torch.nn.Module, directory: str) -> None:
    """Load a checkpoint's weights into the (already built) model, in place."""
    if is_peft_model(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        weights = load_peft_weights(directory, device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"resume: checkpoint {directory!r} has unexpected adapter keys {unexpected[:3]}")
    else:
        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise ValueError(f"resume: no model weights in {directory!r}")
        sd: Dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(f))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # tied weights (lm_head) are saved once; anything else missing is an error
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"resume: weights mismatch, missing={missing[:3]} unexpected={unexpected[:3]}")


def load_checkpoint(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    scheduler: Any, *, restore_rng: bool = True, rank: int = 0,
                    load_weights: Optional[Callable[[torch.nn.Module, str], None]] = None,
                    load_optimizer: Optional[Callable[[torch.optim.Optimizer, Dict[str, Any]], None]] = None
                    ) -> Dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from directory; returns the saved step state.

    rank: the process whose RNG state to restore when the checkpoint holds one per process (a process
    beyond those saved keeps the common one). load_weights / load_optimizer replace the plain loaders (a
    sharded model loads whole tensors into its shards).
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"resume: {directory!r} is not a dpo_fast checkpoint (no {STATE_FILE})")
    (load_weights or load_trainable_weights)(model, directory)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if optimizer is not None and payload.get("optimizer") is not None:
        if load_optimizer is None:
            optimizer.load_state_dict(payload["optimizer"])
        else:
            load_optimizer(optimizer, payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        per_rank = payload.get("rng_per_rank") or []
        set_rng_state(per_rank[rank] if rank < len(per_rank) else payload["rng"])
    return payload["state"]


def latest_checkpoint(output: str) -> Optional[str]:
    """The checkpoint-<N> directory with the highest N in output, or None."""
    best, best_step = None, -1
    for path in glob.glob(os.path.join(output, "checkpoint-*")):
        m = _CKPT_RE.search(path)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)) and int(m.group(1)) > best_step:
            best, best_step = path, int(m.group(1))
    return best


def save_merged(model: torch.nn.Module, directory: str, tokenizer: Any = None) -> str:
    """Merge LoRA into a copy of the (non-quantized) base and save full weights to directory."""
    import copy

    if getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit", False):
        raise ValueError("merge: the base is quantized; merged weights need a non-quantized base")
    target = model
    if is_peft_model(model):
        clone = copy.deepcopy(model)
        if "ref" in clone.peft_config:
            clone.delete_adapter("ref")
        clone.set_adapter("default")
        target = clone.merge_and_unload()
    unpatch(target)
    with _no_shard_bar():
        target.save_pretrained(directory)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return directory

