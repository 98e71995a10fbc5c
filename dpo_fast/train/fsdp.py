"""Sharded LoRA / QLoRA training (`fsdp=True`, `--fsdp`): the model split over the processes with FSDP2.

Each decoder layer is one `fully_shard` group and the rest of the model (embeddings, final norm,
lm_head) is the root group; the input embeddings get a group of their own when they are not tied to
lm_head. A process keeps 1/N of every parameter and gathers a layer's parameters only while the layer
runs. lm_head stays in the root group: the root's forward gathers it, and dpo_fast's fused head, which
runs inside the patched forward of the causal LM, receives the whole weight (no vocabulary-parallel head).

Loading, memory-efficient (`load_sharded_model`):
1. The base is opened on the CPU as transformers loads a local checkpoint there: memory-mapped
   safetensors in the checkpoint's dtype, so no process copies the weights (the page cache is shared).
2. With `load_in_4bit`, every linear layer but lm_head becomes a bitsandbytes `Linear4bit` that still
   holds the unquantized CPU weight; its packed storage dtype is the compute dtype
   (`bnb_4bit_quant_storage`, as the FSDP-QLoRA recipe sets it) so that FSDP shards packed weights
   like any other tensor. nf4, double quantization, compute in bf16: the same weights `load_in_4bit`
   gives without FSDP, bit for bit.
3. LoRA is added on the CPU model by peft exactly as without FSDP (same initial adapter for a seed).
4. Layer by layer: the layer's weights go to this process's device (4-bit ones quantized there, the
   others cast as the unsharded path casts them: the compute dtype, fp32 beside a 4-bit base as
   peft's `prepare_model_for_kbit_training` does), then `fully_shard` keeps this process's shard and the
   whole layer is freed. Then the root modules, then the dpo_fast patch.
So a process holds at most its shards plus one whole layer (plus the root group, whole, while it is
being sharded). Limits: a model given as a config (random init) or as an object is built whole in every
process first (tests, small models); the bitsandbytes quantization statistics (absmax, about 1/32 of
the packed bytes with double quantization) are kept whole on every process; a full fine-tune and
`merge` are not supported with FSDP.

Checkpoints: the adapter's shards and the optimizer state are gathered whole to the main process, which
writes the same files as an unsharded run (`full_trainable_state`, `full_optimizer_state`); resuming loads
them back into the shards.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from dpo_fast import patching
from dpo_fast.forward import backbone_of
from dpo_fast.ops.qlora_linear import is_4bit_base
from dpo_fast.state import record_holder

from .config import TrainConfig
from .distributed import Parallel
from .model_loading import (LoadedModel, _load_config, _weights_fingerprint, is_checkpoint, load_tokenizer,
                            model_fingerprint, model_identity, prepare_model)


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the unsharded path loads the base in: bf16 on CUDA or for a 4-bit base, else fp32."""
    return torch.bfloat16 if (device.type == "cuda" or cfg.load_in_4bit) else torch.float32


def _open_base(cfg: TrainConfig, given: Optional[nn.Module], dtype: torch.dtype) -> nn.Module:
    """The base model on the CPU: memory-mapped from a checkpoint, or built whole (config / object)."""
    from transformers import AutoModelForCausalLM

    if given is not None:
        return given
    spec = cfg.model
    if is_checkpoint(spec):
        from dpo_fast import hub

        # the checkpoint's own dtype keeps the tensors memory-mapped; they are cast on their way to the device
        return hub.from_pretrained(AutoModelForCausalLM.from_pretrained, spec, flag="--model", revision=cfg.revision,
                                   trust_remote_code=cfg.trust_remote_code, dtype="auto", device_map={"": "cpu"})
    import copy

    config = copy.deepcopy(_load_config(spec))
    torch.manual_seed(cfg.seed)  # the same random weights as dpo_fast.train.model_loading.load_base_model
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _linear_to_4bit(base: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear but the output head by a bitsandbytes Linear4bit holding the unquantized weight
    (quantized when it reaches its device). Returns how many were replaced."""
    import bitsandbytes as bnb

    head = base.get_output_embeddings()
    count = 0
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                    quant_storage=dtype, device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", quant_storage=dtype, module=new)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new)
            count += 1
    base.is_loaded_in_4bit = True  # what peft reads to give 4-bit layers its bitsandbytes LoRA class
    return count


def _place(modules: Iterable[nn.Module], device: torch.device, dtype: torch.dtype, *, cast: bool, upcast_half: bool,
           keep: set, done: set) -> None:
    """Move the `modules`' own parameters and buffers to `device` as the unsharded path has them: 4-bit weights
    quantized from the compute dtype, other base weights in the compute dtype (fp32 when `upcast_half`,
    beside a 4-bit base), the parameters in `keep` (adapters: fp32, as peft made them) and buffers in
    their dtype; with `cast` False (a model given as an object) no dtype changes. `done` holds the ids of the
    parameters already placed (a tied weight is placed once)."""
    for sub in modules:
        if is_4bit_base(sub) and id(sub.weight) not in done:
            w = sub.weight
            if not w.bnb_quantized:
                import bitsandbytes as bnb

                sub.weight = bnb.nn.Params4bit(w.data.to(dtype), requires_grad=False, blocksize=w.blocksize,
                                               compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                               quant_storage=w.quant_storage, module=sub).to(device)
            done.add(id(sub.weight))
        for name, p in list(sub.named_parameters(recurse=False)):
            if id(p) in done:
                continue
            data = p.data
            if cast and p.is_floating_point() and id(p) not in keep:
                data = data.to(dtype)  # as loaded without FSDP (then upcast as prepare_model_for_kbit_training does)
                if upcast_half and dtype in (torch.float16, torch.bfloat16):
                    data = data.float()
            p.data = data.to(device)
            done.add(id(p))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b.device != device:
                sub._buffers[name] = b.to(device)


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM: the units FSDP shards one at a time."""
    layers = getattr(backbone_of(record_holder(model)), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"fsdp: found no decoder layers (.layers) in {type(record_holder(model)).__name__}")
    return list(layers)


def load_sharded_model(cfg: TrainConfig, parallel: Parallel, *, model: Optional[nn.Module] = None,
                       tokenizer: Any = None) -> LoadedModel:
    """The model of a `fsdp=True` run, sharded over the processes (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = parallel.device
    dtype = compute_dtype(cfg, device)
    if model is None and cfg.model is None:
        raise ValueError("model: give a checkpoint dir or a config (or pass a model object)")
    base = _open_base(cfg, model, dtype)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model, cfg.tokenizer, revision=cfg.revision,
                                                                 trust_remote_code=cfg.trust_remote_code)
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    if model is not None:
        import hashlib

        model_id = "object:" + hashlib.sha256(base.config.to_json_string(use_diff=False).encode()
                                              + _weights_fingerprint(base)).hexdigest()
    else:
        model_id = model_identity(cfg.model, cfg.adapter, cfg.seed, revision=cfg.revision)
    if model is not None:  # an object is used as it is, as without FSDP
        quantized = bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_quantized", False))
    else:
        quantized = bool(cfg.load_in_4bit)
        if quantized and not _linear_to_4bit(base, dtype):
            raise ValueError("load_in_4bit: found no linear layer to quantize")
    # LoRA (and gradient checkpointing) on the CPU model, exactly as without FSDP; dpo_fast patches after sharding
    net = prepare_model(base, dataclasses.replace(cfg, patch=False), quantized=False)
    keep = {id(p) for name, p in net.named_parameters() if "lora_" in name}  # peft's adapter weights
    mesh = init_device_mesh(device.type, (parallel.world_size,))
    done: set = set()
    layers = decoder_layers(net)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    for layer in layers:
        _place(layer.modules(), device, dtype, cast=model is None, upcast_half=quantized, keep=keep, done=done)
        fully_shard(layer, mesh=mesh)
    causal_lm = record_holder(net)
    embed, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    _place([m for m in net.modules() if id(m) not in in_layers], device, dtype, cast=model is None,
           upcast_half=quantized, keep=keep, done=done)
    if head is None or embed.weight is not head.weight:
        fully_shard(embed, mesh=mesh)  # gathered for the embedding lookup only, not for the whole step
    fully_shard(net, mesh=mesh)  # the root: lm_head and the final norm, gathered for the step's forward/backward
    if cfg.patch:
        net = patching.patch(net, offload_checkpointing=cfg.offload_checkpointing, prefix_sharing=cfg.prefix_sharing)
    return LoadedModel(model=net, tokenizer=tok, model_id=model_id, quantized=quantized,
                       has_ref_adapter="ref" in getattr(net, "peft_config", {}),
                       fingerprint=model_id if model is not None else model_fingerprint(
                           cfg.model, cfg.adapter, cfg.seed, revision=cfg.revision))


# ---------------------------------------------------------------------------------- checkpoints
def full_trainable_state(model: nn.Module, parallel: Parallel) -> Optional[Dict[str, torch.Tensor]]:
    """The trainable parameters, whole, on the main process's CPU (None elsewhere); every process must call it."""
    out: Dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective: same order on every process
        if parallel.is_main:
            out[name] = full.detach().to("cpu", copy=True)
    return out if parallel.is_main else None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
    """The optimizer state gathered whole (keyed by parameter name), on the main process's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a whole optimizer state (from `full_optimizer_state`) into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_full_trainable_state(model: nn.Module, directory: str) -> None:
    """Load a checkpoint's adapter (peft's files, whole tensors) into this process's shards."""
    from peft.utils import load_peft_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    saved = load_peft_weights(directory, device="cpu")
    state, used = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".default", "")  # peft's file keys drop the adapter name
        if key not in saved:
            raise ValueError(f"resume: checkpoint {directory!r} has no weight for {key!r}")
        state[name] = saved[key]
        used.add(key)
    unexpected = sorted(set(saved) - used)
    if unexpected:
        raise ValueError(f"resume: checkpoint {directory!r} has unexpected adapter keys {unexpected[:3]}")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
