"""What identifies a training run, recorded in its output folder, and the checks that keep runs apart.

A run's identity is everything that makes its steps what they are: the data (a fingerprint of the
tokenized train and eval pairs), the model and adapter it starts from, the tokenizer, the seed, the loss,
LoRA and optimizer settings, the max lengths and the global batch. It is written to OUTPUT/run.json when a
run starts and into each checkpoint, so that

* a new run refuses an output folder that holds another run's outputs, unless told to clear them
  (`overwrite`) or to continue them (`resume`), and
* `resume` continues only a checkpoint of the same run, naming every setting that differs.

Settings a resumed run may change (max_steps, epochs, logging / eval / save frequency, progress, device,
precision, memory-saving options) are not part of the identity.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

from dpo_fast.errors import UserError

RUN_FILE = "run.json"
#: files and folders a run writes into its output folder (besides ref_cache/, a keyed and checked cache that
#: later runs may reuse); their presence means the folder holds a run's outputs
RUN_OUTPUT_PATTERNS = (
    RUN_FILE, "train_config.json", "config.yaml", "metrics.jsonl", "training_curves.png", "checkpoint-*", "runs",
    "merged",
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
)
#: what shows a folder holds a run (a tokenizer or a README alone could be anything the user keeps there)
_RUN_MARKERS = (RUN_FILE, "train_config.json", "metrics.jsonl", "checkpoint-*", "adapter_model.safetensors",
                "adapter_config.json", "model.safetensors", "model-*.safetensors")

#: TrainConfig fields that are part of a run's identity
IDENTITY_FIELDS = (
    "stage", "seed", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "load_in_4bit",
    "max_length", "max_prompt_length", "truncation_mode", "eval_fraction", "group_by_length",
    "learning_rate", "optimizer", "weight_decay", "adam_betas", "warmup_ratio", "scheduler", "max_grad_norm",
    "grad_accum",
)


def run_outputs(output: str) -> List[str]:
    """The run outputs present in `output` (paths), empty when the folder is new, empty or holds none."""
    if not os.path.isdir(output):
        return []
    found: List[str] = []
    for pattern in RUN_OUTPUT_PATTERNS:
        found.extend(sorted(glob.glob(os.path.join(glob.escape(output), pattern))))
    return found


def holds_a_run(output: str) -> bool:
    """Whether `output` holds the outputs of a run (a checkpoint, metrics, an adapter, a run record ...)."""
    return any(glob.glob(os.path.join(glob.escape(output), m)) for m in _RUN_MARKERS) if os.path.isdir(output) \
        else False


def check_output_folder(output: str, *, overwrite: bool, resume: Any) -> None:
    """Refuse a folder holding another run's outputs unless `overwrite` or `resume` says what to do with them."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"output: {output!r} is a file, not a folder; give a folder for the run's outputs")
    if overwrite or resume or not holds_a_run(output):
        return
    shown = ", ".join(os.path.basename(p) for p in run_outputs(output)[:6])
    raise UserError(f"output: {output!r} already holds a run's outputs ({shown}); pass --overwrite "
                    "(overwrite=True) to delete them and start a new run, --resume to continue that run, "
                    "or choose another --output")


def clear_run_outputs(output: str) -> List[str]:
    """Delete the run outputs in `output` (only those: other files and ref_cache/ stay); returns what went."""
    removed = []
    for path in run_outputs(output) + sorted(glob.glob(os.path.join(glob.escape(output), "checkpoint-*.tmp"))):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(path)
    return removed


def build_identity(cfg: Any, *, model: str, tokenizer: str, train_data: str, eval_data: str,
                   global_batch_size: int) -> Dict[str, Any]:
    """The identity of the run `cfg` describes, given the fingerprints of what it loaded (JSON-friendly)."""
    ident: Dict[str, Any] = {"model": model, "adapter": _adapter_name(cfg.adapter), "tokenizer": tokenizer,
                             "train_data": train_data, "eval_data": eval_data,
                             "global_batch_size": int(global_batch_size)}
    for name in IDENTITY_FIELDS:
        value = getattr(cfg, name)
        ident[name] = list(value) if isinstance(value, tuple) else value
    if cfg.stage == "dpo":
        loss = cfg.build_loss_options().as_kwargs()
        ident["loss"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(loss.items())}
    return json.loads(json.dumps(ident, default=str))


def _adapter_name(adapter: Optional[str]) -> Optional[str]:
    """The adapter folder's name (its contents are in the model fingerprint; the path may move)."""
    return os.path.basename(os.path.normpath(adapter)) if adapter else None


def differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'name: recorded -> current' for each identity entry that differs (entries in one only included)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<not recorded>"), current.get(key, "<not recorded>")
        if key == "loss" and isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"loss {d}" for d in differences(a, b))
        elif a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    if len(text) > 24 and isinstance(value, str) and all(c in "0123456789abcdef" for c in value):
        return text[:13] + '..."'  # a fingerprint: its start tells two apart
    return text if len(text) <= 120 else text[:117] + "..."


def check_same_run(recorded: Optional[Dict[str, Any]], current: Dict[str, Any], *, where: str) -> None:
    """Raise UserError naming every setting of `current` that differs from the run recorded at `where`."""
    if recorded is None:
        return
    diff = differences(recorded, current)
    if diff:
        raise UserError(f"resume: {where} belongs to another run; these settings differ (checkpoint -> this run): "
                        + "; ".join(diff) + ". Resume with the checkpoint's settings, or start a new run "
                        "(another --output, or --overwrite)")


def write_run_record(output: str, identity: Dict[str, Any]) -> str:
    """Write OUTPUT/run.json (atomically)."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, RUN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"identity": identity}, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_run_record(output: str) -> Optional[Dict[str, Any]]:
    """The identity in OUTPUT/run.json, or None when there is none (or it cannot be read)."""
    path = os.path.join(output, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data["identity"] if isinstance(data, dict) and isinstance(data.get("identity"), dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------- fingerprints
def file_sample_digest(path: str, samples: int = 64, chunk: int = 4096) -> str:
    """sha256 of a file's size and `samples` chunks spread evenly over it (the whole file when small).

    Independent of the file's path and modification time (a copied or moved model keeps it); reading
    64 x 4 KiB spread over a weights file tells apart two checkpoints of one architecture (a fine-tune
    changes most of the bytes) without reading gigabytes.
    """
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= samples * chunk:
            h.update(fh.read())
        else:
            stride = (size - chunk) // (samples - 1)
            for i in range(samples):
                fh.seek(i * stride)
                h.update(fh.read(chunk))
    return h.hexdigest()


def weights_fingerprint(directory: str, patterns: Sequence[str]) -> str:
    """Fingerprint of a checkpoint folder's weight files and config.json (names, sizes, sampled bytes)."""
    h = hashlib.sha256()
    names = sorted({p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(directory), pattern))})
    config = os.path.join(directory, "config.json")
    for path in names + ([config] if os.path.isfile(config) else []):
        h.update(os.path.basename(path).encode())
        h.update(file_sample_digest(path).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's class, vocabulary and special tokens (what turns text into the ids)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    try:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), separators=(",", ":")).encode())
    except Exception:  # a tokenizer without get_vocab: its length and special tokens only
        h.update(str(len(tokenizer)).encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side", "truncation_side"):
        h.update(f"{name}={getattr(tokenizer, name, None)}".encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(str(template).encode())
    return h.hexdigest()
