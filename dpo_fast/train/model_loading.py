"""Load the model to train: a local checkpoint, a Hub id or a config (random init), optionally 4-bit, with LoRA.

The model is then patched with dpo_fast. With `adapter=PATH` an existing LoRA adapter (e.g.
from `dpo-fast sft`) is continued and a frozen "ref" copy of its starting weights becomes the
DPO reference; with a fresh adapter the reference is the base (adapters disabled).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from dpo_fast import hub, patching
from dpo_fast.errors import UserError
from dpo_fast.patching.support import check_supported

from .config import TrainConfig

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


@dataclass
class LoadedModel:
    """What the trainer needs from model loading."""

    model: torch.nn.Module
    tokenizer: Any
    model_id: str  # stable identity for the reference-log-prob cache key
    quantized: bool
    has_ref_adapter: bool
    # the starting weights' identity independent of where they lie (a run's identity; "" -> model_id)
    fingerprint: str = ""


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _has_weights(directory: str) -> bool:
    return any(glob.glob(os.path.join(directory, p)) for p in _WEIGHT_PATTERNS)


def _load_config(spec: Any):
    """A PretrainedConfig from a config object, a config JSON file, or a directory holding config.json."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(spec, PretrainedConfig):
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        return AutoConfig.for_model(spec.pop("model_type", "llama"), **spec)
    if isinstance(spec, str) and os.path.isfile(spec) and spec.endswith(".json"):
        with open(spec, encoding="utf-8") as fh:
            data = json.load(fh)
        return AutoConfig.for_model(data.pop("model_type", "llama"), **data)
    if isinstance(spec, str) and os.path.isdir(spec):
        return AutoConfig.from_pretrained(spec)
    raise ValueError(f"model: expected a checkpoint dir, a Hub model id, a config JSON file or a PretrainedConfig, "
                     f"got {spec!r}")


def is_checkpoint(spec: Any) -> bool:
    """A pretrained model to load with from_pretrained: a local folder holding weights, or a Hub model id."""
    return isinstance(spec, str) and ((os.path.isdir(spec) and _has_weights(spec)) or hub.is_hub_id(spec))


def model_identity(spec: Any, adapter: Optional[str], seed: int, *, revision: Optional[str] = None) -> str:
    """Stable string that changes when the weights the reference uses change (a Hub id: its resolved commit)."""
    parts: List[str] = []
    if hub.is_hub_id(spec):
        parts.append(hub.identity(spec, "config.json", flag="--model", revision=revision))
    elif isinstance(spec, str) and os.path.isdir(spec) and _has_weights(spec):
        parts.append(os.path.abspath(spec))
        for pattern in _WEIGHT_PATTERNS:
            for path in sorted(glob.glob(os.path.join(spec, pattern))):
                st = os.stat(path)
                parts.append(f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}")
    else:
        cfg = _load_config(spec).to_dict()
        for volatile in ("use_cache", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            cfg.pop(volatile, None)
        parts.append("random-init:" + json.dumps(cfg, sort_keys=True, default=str))
        parts.append(f"seed:{seed}")
    parts.extend(_adapter_parts(adapter))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _adapter_parts(adapter: Optional[str]) -> List[str]:
    """The adapter's identity: a Hub adapter's resolved commit, or a folder's adapter files' hashes."""
    if adapter and hub.is_hub_id(adapter):
        return [hub.identity(adapter, "adapter_config.json", flag="--adapter")]
    parts = []
    if adapter:
        for path in sorted(glob.glob(os.path.join(adapter, "adapter_*"))):
            with open(path, "rb") as fh:
                parts.append(hashlib.sha256(fh.read()).hexdigest())
    return parts


def model_fingerprint(spec: Any, adapter: Optional[str], seed: int, *, revision: Optional[str] = None) -> str:
    """Like `model_identity`, but from the weight files' contents (sampled), not their path or times.

    A Hub id is the commit it resolves to, ``hub:org/name@<commit>`` (a Hub commit names its files' contents
    wherever the cache lies), with its adapter's commit or files' hash after `` + ``.
    """
    from .run_identity import weights_fingerprint

    if hub.is_hub_id(spec):  # readable in run.json: which repo at which commit (and adapter)
        parts = [hub.identity(spec, "config.json", flag="--model", revision=revision)]
        adapter_parts = _adapter_parts(adapter)
        if adapter and hub.is_hub_id(adapter):
            parts.extend(adapter_parts)
        elif adapter_parts:
            parts.append("adapter:" + hashlib.sha256("\n".join(adapter_parts).encode()).hexdigest())
        return " + ".join(parts)
    if isinstance(spec, str) and os.path.isdir(spec) and _has_weights(spec):
        parts = ["weights:" + weights_fingerprint(spec, _WEIGHT_PATTERNS)]
    else:  # a random init: its config and seed, no files
        return model_identity(spec, adapter, seed, revision=revision)
    parts.extend(_adapter_parts(adapter))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def bnb_4bit_config():
    """nf4 weights, bf16 compute, double quantization (QLoRA's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_base_model(spec: Any, *, load_in_4bit: bool = False, device: torch.device, seed: int = 42,
                    dtype: Optional[torch.dtype] = None, revision: Optional[str] = None,
                    trust_remote_code: bool = False) -> torch.nn.Module:
    """The transformers causal LM named by spec (checkpoint dir, Hub id at `revision`, config, or config JSON)."""
    from transformers import AutoModelForCausalLM

    if isinstance(spec, torch.nn.Module):
        return spec
    if dtype is None:
        dtype = torch.bfloat16 if (device.type == "cuda" or load_in_4bit) else torch.float32
    if is_checkpoint(spec):
        kwargs: dict = {"dtype": dtype}
        if load_in_4bit:
            kwargs["quantization_config"] = bnb_4bit_config()
            if device.type == "cuda":  # each process's own GPU (cuda:LOCAL_RANK under torchrun), not always the first
                kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
            else:
                kwargs["device_map"] = {"": "cpu"}
        model = hub.from_pretrained(AutoModelForCausalLM.from_pretrained, spec, flag="--model", revision=revision,
                                    trust_remote_code=trust_remote_code, **kwargs)
        return model if load_in_4bit else model.to(device)
    import copy

    config = copy.deepcopy(_load_config(spec))  # the caller's config object is never mutated
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not load_in_4bit:
        return model.to(device)
    # bitsandbytes quantizes at load time: round-trip the random weights through a temp checkpoint.
    with tempfile.TemporaryDirectory(prefix="dpo_fast_random_") as tmp:
        model.save_pretrained(tmp)
        del model
        return load_base_model(tmp, load_in_4bit=True, device=device, seed=seed, dtype=dtype)


def load_tokenizer(spec: Any, tokenizer: Optional[str], *, revision: Optional[str] = None,
                   trust_remote_code: bool = False):
    """AutoTokenizer from cfg.tokenizer or the model (folder or Hub id); pad token falls back to EOS (as TRL).

    `revision` applies to the model's Hub id, so to the tokenizer only when it is taken from the model.
    """
    from transformers import AutoTokenizer

    path, flag = tokenizer, "--tokenizer"
    if path is None:
        if isinstance(spec, str) and (os.path.isdir(spec) or hub.is_hub_id(spec)):
            path, flag = spec, "--model"
        else:
            raise UserError("tokenizer: the model is given as a config (random init), which has no tokenizer; "
                            "pass a tokenizer directory or Hub id (--tokenizer DIR_OR_ID)")
    tok = hub.from_pretrained(AutoTokenizer.from_pretrained, path, flag=flag,
                              revision=revision if path == spec else None, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def default_target_modules(model: torch.nn.Module) -> List[str]:
    """Names (last component) of every linear layer inside the decoder blocks."""
    linear_types: List[type] = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb

        linear_types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:
        pass
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, tuple(linear_types)) and ".layers." in f".{name}":
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ValueError("target_modules: found no linear layers inside decoder blocks; pass them explicitly")
    return sorted(names)


@contextlib.contextmanager
def _peft_wrapping_quietly():
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, which
    prints a FutureWarning in every run; that warning alone is silenced while peft wraps the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, *, quantized: bool) -> torch.nn.Module:
    """Wrap in peft: a fresh LoRA adapter, or cfg.adapter continued with a frozen "ref" copy."""
    with _peft_wrapping_quietly():
        return _apply_lora(model, cfg, quantized=quantized)


def _apply_lora(model: torch.nn.Module, cfg: TrainConfig, *, quantized: bool) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapter:
        if not hub.is_hub_id(cfg.adapter) and not os.path.isfile(os.path.join(cfg.adapter, "adapter_config.json")):
            raise UserError(f"adapter: {cfg.adapter!r} holds no adapter_config.json; give the folder a LoRA run "
                            "(dpo-fast sft / peft's save_pretrained) wrote, or an adapter's Hub id")
        with hub.hub_errors(cfg.adapter, flag="--adapter", kind="adapter"):
            model = PeftModel.from_pretrained(model, cfg.adapter, adapter_name="default", is_trainable=True)
        if cfg.stage == "dpo" and not cfg.reference_free:
            patching.add_reference_adapter(model, source_adapter="default", name="ref")
            model.set_adapter("default")
        return model
    targets = cfg.target_modules or default_target_modules(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora)


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, *, quantized: bool = False) -> torch.nn.Module:
    """LoRA (or full fine-tune), gradient checkpointing and the dpo_fast patch on a loaded base model."""
    if cfg.use_lora:
        model = apply_lora(model, cfg, quantized=quantized)
    elif quantized:
        raise ValueError("use_lora: a 4-bit base can only be trained through LoRA")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing and not quantized:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    if cfg.patch:
        model = patching.patch(model, offload_checkpointing=cfg.offload_checkpointing,
                               prefix_sharing=cfg.prefix_sharing)
    return model


def load_model(cfg: TrainConfig, *, model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
               device: Optional[torch.device] = None) -> LoadedModel:
    """Everything model-side of a run: base model, tokenizer, LoRA, patch."""
    device = device or resolve_device(cfg.device)
    if model is None and cfg.model is None:
        raise ValueError("model: give a checkpoint dir or a config (or pass a model object)")
    given = model is not None
    base = model if given else load_base_model(cfg.model, load_in_4bit=cfg.load_in_4bit, device=device,
                                                seed=cfg.seed, revision=cfg.revision,
                                                trust_remote_code=cfg.trust_remote_code)
    check_supported(base)  # before LoRA: an unsupported model is named as such, not by a LoRA-target error
    quantized = bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                     or getattr(base, "is_quantized", False))
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model, cfg.tokenizer, revision=cfg.revision,
                                                                 trust_remote_code=cfg.trust_remote_code)
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    if given:
        model_id = "object:" + hashlib.sha256(
            (base.config.to_json_string(use_diff=False) if hasattr(base, "config") else repr(base)).encode()
            + _weights_fingerprint(base)
        ).hexdigest()
        if cfg.adapter:
            model_id += ":" + model_identity(base.config, cfg.adapter, cfg.seed)
    else:
        model_id = model_identity(cfg.model, cfg.adapter, cfg.seed, revision=cfg.revision)
    fingerprint = model_id if given else model_fingerprint(cfg.model, cfg.adapter, cfg.seed, revision=cfg.revision)
    model_obj = prepare_model(base, cfg, quantized=quantized)
    has_ref = "ref" in getattr(model_obj, "peft_config", {})
    return LoadedModel(model=model_obj, tokenizer=tok, model_id=model_id, quantized=quantized, has_ref_adapter=has_ref,
                       fingerprint=fingerprint)


def _weights_fingerprint(model: torch.nn.Module, max_tensors: int = 64) -> bytes:
    """Cheap fingerprint of an in-memory model's weights (sums of the first tensors)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for i, (name, t) in enumerate(model.state_dict().items()):
            if i >= max_tensors:
                break
            if t.is_floating_point():
                h.update(f"{name}:{float(t.float().sum()):.6e}:{float(t.float().abs().sum()):.6e}".encode())
    return h.digest()
