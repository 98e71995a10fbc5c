"""Checks of a run's paths and options that need no model and no data: a mistake costs seconds.

`check_before_loading(config)` runs them all and raises `UserError` naming the flag, the path and
what to do: the device exists, the data path is a file, a saved dataset or a folder `datasets.load_dataset`
reads (a Hub dataset id is left to the data loading, which comes before the model's), the model (a path or a
Hub id) exists and is of a supported architecture (read from its config.json, for a Hub id from the cache or
downloaded alone, not its weights), a config-only model has a tokenizer, the adapter and the checkpoint to
resume exist, the output folder can be written, and every loss option given explicitly is read by the chosen
loss types. A Hub id that is not cached while the Hub is unreachable is its one-line error here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable

import torch

from dpo_fast import hub
from dpo_fast.data_sources import is_hub_dataset_id
from dpo_fast.errors import UserError
from dpo_fast.loss_types import unread_options
from dpo_fast.patching.support import SUPPORTED_CLASSES, SUPPORTED_MODEL_TYPES, architecture_problem

from .checkpoint import STATE_FILE
from .config import TrainConfig

_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
#: data files of a dataset repository folder that load_dataset reads (its parquet / json / csv / arrow builders)
_DATA_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".ndjson", ".csv", ".arrow",
                       ".parquet.gz", ".jsonl.gz", ".json.gz", ".csv.gz")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's from_pretrained reads


def check_before_loading(cfg: TrainConfig, *, explicit_loss_options: Iterable[str] = ()) -> None:
    """Raise UserError for the first mistake found without loading the model or reading the data.

    explicit_loss_options: the loss options the user set by name (--loss-kwarg, --simpo-gamma, ...),
    which must be read by one of the loss types.
    """
    check_device(cfg.device)
    if isinstance(cfg.data, (str, os.PathLike)):
        check_data_path(str(cfg.data))
    if isinstance(cfg.eval_data, (str, os.PathLike)):
        check_data_path(str(cfg.eval_data), flag="--eval-data")
    if isinstance(cfg.model, (str, os.PathLike)):
        check_model_path(str(cfg.model), cfg.tokenizer, revision=cfg.revision)
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


def check_data_path(path: str, *, flag: str = "--data") -> None:
    """The data is a Hub dataset id (checked when it loads, before the model), or a path that exists: a file,
    a folder written by datasets' save_to_disk, or a folder of data files `datasets.load_dataset` reads
    (laid out like a dataset repository: ``data/train-00000-of-00001.parquet``, ...)."""
    if is_hub_dataset_id(path):
        return
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file or directory (nor a Hub dataset id)")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, m)) for m in _DATASET_MARKERS) \
            and not _has_data_files(path):
        raise UserError(f"{flag} {path}: a folder, but neither a dataset saved by datasets' save_to_disk (no "
                        f"{' / '.join(_DATASET_MARKERS)}) nor a folder of data files datasets.load_dataset reads "
                        "(.parquet, .jsonl, .json, .csv, .arrow); give a .jsonl, .json or .parquet file")


def _has_data_files(path: str) -> bool:
    """Whether the folder holds data files `datasets.load_dataset` reads into rows that can be preference
    pairs (a .txt folder loads as a 'text' column, never as pairs); hidden folders (.git, .cache) aside."""
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(name.lower().endswith(_DATA_FILE_SUFFIXES) for name in files):
            return True
    return False


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--model {path}: not a readable JSON model config ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"--model {path}: holds a JSON {type(value).__name__}, not a model config object")
    return value


def check_model_path(path: str, tokenizer: Any, *, revision: Any = None) -> None:
    """The model is a checkpoint folder (config.json), a Hub model id or a config JSON file of a supported
    architecture, and a config without a folder comes with a tokenizer."""
    if hub.is_hub_id(path):
        config_file = hub.cached_file(path, "config.json", flag="--model", revision=revision)
        if config_file is None:
            raise UserError(f"--model {path}: the Hub repository holds no config.json, so it is not a transformers "
                            "checkpoint")
        config = _read_config(config_file)
    elif not os.path.exists(path):
        raise UserError(f"--model {path}: does not exist; give a Hub model id (org/name), a local checkpoint folder "
                        "(config.json and weights) or a model config JSON file")
    elif os.path.isdir(path):
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
    if tokenizer is not None and hub.is_hub_id(str(tokenizer)):
        hub.cached_file(str(tokenizer), "tokenizer_config.json", flag="--tokenizer")  # not cached offline: one line
    elif tokenizer is not None and not os.path.exists(str(tokenizer)):
        raise UserError(f"--tokenizer {tokenizer}: does not exist; give a tokenizer folder or Hub id")
    architectures = config.get("architectures") or []
    problem = architecture_problem(config.get("model_type"), architectures[0] if architectures else None)
    if problem:
        raise UserError(f"--model {path}: {problem}; dpo_fast trains {', '.join(SUPPORTED_CLASSES)} (model_type "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}) only: its loss runs the fused LM head on every model, "
                        "with --no-patch too, so use a checkpoint of one of these architectures")


def check_adapter(path: str) -> None:
    """A LoRA adapter folder or Hub id (holding adapter_config.json)."""
    if hub.is_hub_id(path):
        if hub.cached_file(path, "adapter_config.json", flag="--adapter", kind="adapter") is None:
            raise UserError(f"--adapter {path}: the Hub repository holds no adapter_config.json, so it is not a "
                            "LoRA adapter (peft's save_pretrained)")
        found = any(hub.cached_file(path, name, flag="--adapter", kind="adapter") for name in _ADAPTER_WEIGHTS)
        # none found: the Hub says the repo has none, or (offline) the cached snapshot lacks them: strict names which
        if not found and hub.cached_file(path, _ADAPTER_WEIGHTS[0], flag="--adapter", kind="adapter",
                                         strict=True) is None:
            raise UserError(f"--adapter {path}: the Hub repository holds no adapter weights "
                            f"({' / '.join(_ADAPTER_WEIGHTS)}), so it is not a LoRA adapter (peft's save_pretrained)")
        return
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
