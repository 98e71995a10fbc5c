"""Checks of a run's paths and options that need no model and no data: a mistake costs seconds.

`check_before_loading(config)` runs them all and raises `UserError` naming the flag, the path and
what to do: the device exists, the data path is a file or a saved dataset, the model path exists and
is of a supported architecture (read from its config, not its weights), a config-only model has a
tokenizer, the adapter and the checkpoint to resume exist, the output folder can be written, and every
loss option given explicitly is read by the chosen loss types.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable

import torch

from dpo_fast.errors import UserError
from dpo_fast.loss_types import unread_options
from dpo_fast.patching.support import SUPPORTED_CLASSES, SUPPORTED_MODEL_TYPES, architecture_problem

from .checkpoint import STATE_FILE
from .config import TrainConfig

_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def check_before_loading(cfg: TrainConfig, *, explicit_loss_options: Iterable[str] = ()) -> None:
    """Raise UserError for the first mistake found without loading the model or reading the data.

    explicit_loss_options: the loss options the user set by name (--loss-kwarg, --simpo-gamma, ...),
    which must be read by one of the loss types.
    """
    check_device(cfg.device)
    if isinstance(cfg.data, (str, os.PathLike)):
        check_data_path(str(cfg.data))
    if isinstance(cfg.model, (str, os.PathLike)):
        check_model_path(str(cfg.model), cfg.tokenizer)
    if cfg.adapter is not None:
        check_adapter(str(cfg.adapter))
    check_output(str(cfg.output))
    if isinstance(cfg.resume, str):
        check_resume(cfg.resume)
    if cfg.stage == "dpo":
        problems = unread_options(cfg.loss_type, list(explicit_loss_options),
                                  f_divergence_type=cfg.loss_kwargs.get("f_divergence_type", "reverse_kl"))
        if problems:
            raise UserError(f"--loss-kwarg: {problems[0]}; drop it or choose a loss type that uses it (--loss-type)")


def check_device(name: str) -> None:
    """A device name torch knows, and CUDA only where there is a CUDA device."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False: no GPU, "
                            "or a torch build without CUDA); use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_data_path(path: str) -> None:
    """The data path exists and is a file or a folder written by datasets' save_to_disk."""
    if not os.path.exists(path):
        raise UserError(f"--data {path}: no such file or directory")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, m)) for m in _DATASET_MARKERS):
        raise UserError(f"--data {path}: a folder, but not a dataset saved by datasets' save_to_disk (no "
                        f"{' / '.join(_DATASET_MARKERS)}); give a .jsonl, .json or .parquet file")


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--model {path}: not a readable JSON model config ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"--model {path}: holds a JSON {type(value).__name__}, not a model config object")
    return value


def check_model_path(path: str, tokenizer: Any) -> None:
    """The model is a checkpoint folder (config.json) or a config JSON file of a supported architecture,
    and a config without a folder comes with a tokenizer."""
    if not os.path.exists(path):
        raise UserError(f"--model {path}: does not exist; give a local checkpoint folder (config.json and weights) "
                        "or a model config JSON file")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise UserError(f"--model {path}: a folder without config.json, so not a transformers checkpoint")
        config = _read_config(config_file)
    else:
        if not path.endswith(".json"):
            raise UserError(f"--model {path}: a file that is not a config JSON; give a checkpoint folder or a "
                            "config .json")
        config = _read_config(path)
        config.setdefault("model_type", "llama")  # as the loader reads a config file
        if tokenizer is None:
            raise UserError(f"--model {path}: a config (random init) has no tokenizer; pass --tokenizer DIR")
    if tokenizer is not None and not os.path.exists(str(tokenizer)):
        raise UserError(f"--tokenizer {tokenizer}: does not exist; give a tokenizer folder")
    architectures = config.get("architectures") or []
    problem = architecture_problem(config.get("model_type"), architectures[0] if architectures else None)
    if problem:
        raise UserError(f"--model {path}: {problem}; dpo_fast trains {', '.join(SUPPORTED_CLASSES)} (model_type "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}) only: its loss runs the fused LM head on every model, "
                        "with --no-patch too, so use a checkpoint of one of these architectures")


def check_adapter(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"--adapter {path}: no such folder; give the output folder of a LoRA run (dpo-fast sft)")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UserError(f"--adapter {path}: holds no adapter_config.json; give the folder a LoRA run "
                        "(dpo-fast sft / peft's save_pretrained) wrote")


def check_resume(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"--resume {path}: no such checkpoint folder; give a checkpoint-N folder of an earlier run, "
                        "or --resume alone for the latest one in --output")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UserError(f"--resume {path}: not a dpo_fast checkpoint (no {STATE_FILE}); give a checkpoint-N folder "
                        "of an earlier run")


def check_output(path: str) -> None:
    """The output is a folder, or can become one, that this process can write (probed, nothing left)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output {path}: is a file, not a folder; give a folder path")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output {path}: {existing} is a file, so no folder can be made under it")
    try:
        probe = tempfile.mkdtemp(prefix=".dpo_fast_write_probe_", dir=existing)
    except OSError as exc:
        raise UserError(f"--output {path}: cannot write in {existing} ({exc.strerror or exc}); choose a folder "
                        "you can write to") from None
    shutil.rmtree(probe, ignore_errors=True)
