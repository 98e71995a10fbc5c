"""Swap dpo_fast's kernels into the decoder body of a supported model (and swap them back).

`patch_body` replaces, per module instance, the bound ``forward`` of (the modules of every family in
`dpo_fast.families`: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3)
  * LlamaRMSNorm and its copies                          -> dpo_fast.ops.rms_norm (GemmaRMSNorm's fp32
                                                            ``1 + w`` scale for the Gemma families; their
                                                            pre/post-feedforward and q/k norms too)
  * LlamaMLP with a SiLU or tanh-GeLU activation         -> down_proj(swiglu(gate, up)): SwiGLU, or GeGLU for
                                                            Gemma; Phi-3's one gate_up_proj is chunked into
                                                            gate and up as its own forward does
  * LlamaAttention                                       -> same forward, rotary embedding by dpo_fast.ops.rope;
                                                            with ``prefix_sharing=True`` it also accepts
                                                            packed [prompt | chosen | rejected] rows
                                                            (dpo_fast.ops.prefix_attention)
  * peft LoRA Linear over nn.Linear / bitsandbytes 4-bit  -> dpo_fast.ops.qlora_linear; sibling projections
                                                            that read the same input (q/k/v, gate/up) run as
                                                            one dpo_fast.ops.qlora_group op (_LoRAGroup);
                                                            4-bit bases dequantized by
                                                            dpo_fast.kernels.dequant_4bit on CUDA
and, with ``offload_checkpointing=True``, installs dpo_fast.ops.offload_checkpoint as the decoder
layers' gradient-checkpointing function (enabling checkpointing if it was off). With the QLoRA linear
on, each decoder layer's checkpoint function (whichever it is) is wrapped so that the layer's recompute
in backward skips its last projection's GEMMs, whose output nobody reads (with offloading, o_proj's
too: the post-attention norm parks the mid residual); not in Gemma 2 / 3 layers, which normalise those
outputs (`dpo_fast.families.Family.tail_skip`). Both stay in place when a trainer re-enables
checkpointing later (dpo_fast.patching.checkpointing).

Only instance attributes change: classes, parameters, buffers and state-dict keys stay exactly as
they were, so saving and loading are unaffected; `unpatch_body` deletes the instance forwards (or
restores the ones that were there before). The rotary embedding is applied by a module-level
function in each modeling file (``apply_rotary_pos_emb``); while any model is patched that function
is replaced by a dispatcher which uses dpo_fast's kernel only inside a patched attention module's
forward and calls the original everywhere else; the original is put back when the last patched model
is unpatched. Partial rotary (Phi-4-mini's, cos/sin narrower than the head) goes to the original. The
attention function itself (eager, SDPA, flash; Gemma 2's attention softcapping, sliding windows) stays
the model's own. Each patched forward falls back to the original one for cases the kernels do not cover
(merged or disabled adapters, several active adapters, DoRA, 8-bit bases, ...). Under autocast the
QLoRA linear runs in the autocast dtype, as peft + bitsandbytes do.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import sys
import types
from typing import Any, Dict, Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import AttentionInterface

from .. import state
from ..families import module_role
from ..ops.prefix_attention import PREFIX_KWARG, prefix_shared_attention
from ..ops.qlora_group import apply_group, can_group
from ..ops.qlora_linear import TRITON_DEQUANT, is_4bit_base, is_supported_base, lora_linear
from ..ops.rms_norm import rms_norm
from ..ops.rope import apply_rope
from ..ops.swiglu import swiglu
from ..state import is_patched_lora, lora_bypassed, prefix_sharing_enabled, record_holder
from . import checkpointing as layer_checkpointing
from .checkpointing import END, MID, mid_residual, output_unread
from .options import BodyOptions

__all__ = ["patch_body", "unpatch_body", "BODY_KERNELS", "prefix_sharing_enabled", "lora_bypassed", "is_patched_lora"]

#: The switches of patch_body, in the order they are reported.
BODY_KERNELS = BodyOptions.names()

#: the gated-MLP activation modules the kernel reproduces, by class name -> dpo_fast.ops.swiglu's activation
_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}

_PREV = "_dpo_fast_prev_forward"   # on a patched module: (attribute name, previous instance value or _MISSING)
_ATTN = "_dpo_fast_attention"      # on a patched attention module: {"rope": bool, "prefix": bool}
_NORM = "_dpo_fast_norm"           # on a patched norm: (name of its eps attribute, Gemma's 1 + w scale)
_MLP = "_dpo_fast_mlp"             # on a patched MLP: (one fused gate_up_proj, activation name)
_PREFIX_IMPL = "dpo_fast_prefix_sdpa"  # the AttentionInterface name of dpo_fast.ops.prefix_attention
_GROUP = "_dpo_fast_lora_group"  # on a patched LoRA layer: (its _LoRAGroup, its index in it)
_TAIL = "_dpo_fast_tail"  # on a patched LoRA down_proj (END) or o_proj (MID): see patching.checkpointing
_MISSING = "<no instance forward>"
#: sibling projections that read the same input, run as one grouped op (dpo_fast.ops.qlora_group)
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_rope_installs: Dict[str, list] = {}   # modeling module name -> [original function, number of patched models]


# --------------------------------------------------------------------------------------------------
# The patched forwards (plain functions bound with types.MethodType, so deepcopy rebinds them).

def _original_forward(module: nn.Module):
    return type(module).forward.__get__(module)


def _norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    eps_attr, gemma = self.__dict__[_NORM]
    return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset=1.0 if gemma else 0.0,
                    scale_in_fp32=gemma)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _norm(self, hidden_states)


def _mid_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """post_attention_layernorm of an offloaded layer whose recompute skips o_proj (patching.checkpointing)."""
    return _norm(self, mid_residual(hidden_states))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    fused, activation = self.__dict__[_MLP]
    if fused:  # Phi-3: one projection, chunked as Phi3MLP.forward does
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(swiglu(gate, up, activation=activation))


class _PrefixConfigView:
    """The attention module's config as seen during a prefix-shared call: only the attention function differs.

    The original forward picks its attention function by ``self.config._attn_implementation``; for a
    call carrying a prefix layout the module sees this view instead, for that call only, so the
    projections, norms and rotary embedding stay transformers' own.
    """

    _attn_implementation = _PREFIX_IMPL

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _attention_forward(self, *args: Any, **kwargs: Any):
    opts = self.__dict__.get(_ATTN, {"rope": True, "prefix": False})
    prefix = kwargs.get(PREFIX_KWARG) is not None
    if prefix and not opts["prefix"]:
        raise RuntimeError(f"{type(self).__name__}: a prefix-shared batch reached an attention module that was "
                           "not patched with prefix_sharing=True")
    token = state.ROPE_ACTIVE.set(opts["rope"])
    config = self.__dict__.get("config")
    if prefix:
        self.__dict__["config"] = _PrefixConfigView(config)
    try:
        return _original_forward(self)(*args, **kwargs)
    finally:
        if prefix:
            self.__dict__["config"] = config
        state.ROPE_ACTIVE.reset(token)


def _lora_plan(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict):
    """(A, B, scaling, dropout p) when the fused LoRA op reproduces peft's forward, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if getattr(layer, "fan_in_fan_out", False) or not is_supported_base(layer.base_layer):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None \
            or lora_b.bias is not None:
        return None
    drop = layer.lora_dropout[name]
    if isinstance(drop, nn.Identity):
        p = 0.0
    elif type(drop) is nn.Dropout:
        p = drop.p if drop.training else 0.0
    else:
        return None
    return lora_a.weight, lora_b.weight, float(layer.scaling[name]), p


class _LoRAGroup:
    """Sibling LoRA projections of one module that read the same input (q/k/v, gate/up).

    The attention and MLP forwards call them one after the other with the same tensor. The first call
    runs all of them as one op (`dpo_fast.ops.qlora_group`) and keeps the others' outputs; each sibling
    called next with that same tensor gets its output from here. Any other call (another input, a
    layer that cannot be grouped, dropout > 0) runs on its own, exactly as without the group.
    """

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.pending: Optional[tuple] = None  # (x, [outputs by index, None once taken])

    def take(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        pending = self.pending
        if pending is None or pending[0] is not x or pending[1][index] is None:
            return None
        out, pending[1][index] = pending[1][index], None
        if all(left is None for left in pending[1]):
            self.pending = None
        return out

    def run(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """All projections for x (the first one's output returned, the rest kept), or None to go one by one."""
        self.pending = None
        plans = [_lora_plan(layer, x, (), {}) for layer in self.layers]
        if any(plan is None or plan[3] != 0.0 for plan in plans):
            return None
        bases = [layer.base_layer for layer in self.layers]
        lora_as, lora_bs = [plan[0] for plan in plans], [plan[1] for plan in plans]
        if not can_group(bases, lora_as, lora_bs, x):
            return None
        ys = apply_group(x, bases, lora_as, lora_bs, [plan[2] for plan in plans])
        self.pending = (x, [None] + ys[1:])
        return ys[0]


def _lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if state.LORA_OFF.get():
        return self.base_layer(x, *args, **kwargs)  # peft's forward with adapters disabled, unmerged
    grouped = self.__dict__.get(_GROUP)
    if grouped is not None and not args and not kwargs:
        group, index = grouped
        y = group.take(index, x) if index else group.run(x)
        if y is not None:
            return y
    plan = _lora_plan(self, x, args, kwargs)
    if plan is None:
        return _original_forward(self)(x, *args, **kwargs)
    lora_a, lora_b, scaling, p = plan
    # in a checkpoint recompute a layer's tail output is never read: skip its GEMMs (patching.checkpointing)
    output = not output_unread(self.__dict__.get(_TAIL))
    return lora_linear(x, self.base_layer, lora_a, lora_b, scaling, dropout_p=p, output=output)


setattr(_lora_forward, state.LORA_FORWARD_MARK, True)  # what state.is_patched_lora looks for

_PATCHED_FUNCS = (_rms_norm_forward, _mid_norm_forward, _mlp_forward, _attention_forward, _lora_forward)


# --------------------------------------------------------------------------------------------------
# Module discovery

def _lora_linear_types() -> tuple:
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:  # pragma: no cover - peft is a dependency
        return ()
    types_ = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb
        if hasattr(lora_bnb, "Linear4bit"):
            types_.append(lora_bnb.Linear4bit)
    except ImportError:  # pragma: no cover - bitsandbytes missing
        pass
    return tuple(types_)


def _norm_spec(m: nn.Module) -> Optional[tuple]:
    """(eps attribute name, Gemma's 1 + w scale) for a norm the kernel reproduces, else None."""
    family, role = module_role(m)
    w = getattr(m, "weight", None)
    if role != "norm" or not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    eps_attr = "eps" if family.gemma_norm else "variance_epsilon"
    eps = getattr(m, eps_attr, None)
    return (eps_attr, family.gemma_norm) if isinstance(eps, numbers.Real) and not isinstance(eps, bool) else None


def _gated_mlp_spec(m: nn.Module) -> Optional[tuple]:
    """(one fused gate_up_proj, activation) for a gated MLP the kernel reproduces, else None."""
    family, role = module_role(m)
    if role != "mlp":
        return None
    if family.fused_gate_up:
        names, act = ("gate_up_proj", "down_proj"), getattr(m, "activation_fn", None)
    else:
        names, act = ("gate_proj", "up_proj", "down_proj"), getattr(m, "act_fn", None)
    activation = _ACTIVATIONS.get(type(act).__name__)
    if activation is None or not all(isinstance(getattr(m, n, None), nn.Module) for n in names):
        return None
    return family.fused_gate_up, activation


def _is_attention(m: nn.Module) -> bool:
    return module_role(m)[1] == "attention" and "config" in m.__dict__


def _rope_function_owner(m: nn.Module) -> Optional[types.ModuleType]:
    if module_role(m)[1] != "attention":
        return None
    owner = sys.modules.get(type(m).__module__)
    return owner if owner is not None and callable(getattr(owner, "apply_rotary_pos_emb", None)) else None


# --------------------------------------------------------------------------------------------------
# Instance-forward swapping

def _set_forward(module: nn.Module, func) -> None:
    # accelerate's hooks put a wrapper in `forward` and call `_old_forward`: patch underneath them.
    attr = "_old_forward" if ("forward" in module.__dict__ and "_old_forward" in module.__dict__) else "forward"
    module.__dict__[_PREV] = (attr, module.__dict__.get(attr, _MISSING))
    module.__dict__[attr] = types.MethodType(func, module)


def _restore_forward(module: nn.Module) -> bool:
    prev = module.__dict__.pop(_PREV, None)
    if prev is None:
        return False
    attr, value = prev
    current = module.__dict__.get(attr)
    if getattr(current, "__func__", None) not in _PATCHED_FUNCS:
        return False  # replaced by someone else after us: leave theirs
    if value is _MISSING:
        del module.__dict__[attr]
    else:
        module.__dict__[attr] = value
    for key in (_ATTN, _NORM, _MLP, _GROUP):
        module.__dict__.pop(key, None)
    module.__dict__.pop(_TAIL, None)
    return True


# --------------------------------------------------------------------------------------------------
# The rotary dispatcher

def _make_rope_dispatch(original):
    sig = inspect.signature(original)
    default_ud = sig.parameters["unsqueeze_dim"].default if "unsqueeze_dim" in sig.parameters else 1

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not state.ROPE_ACTIVE.get():
            return original(q, k, cos, sin, *args, **kwargs)
        if not args and not kwargs:
            ud = default_ud
        else:
            try:
                bound = sig.bind(q, k, cos, sin, *args, **kwargs)
            except TypeError:
                return original(q, k, cos, sin, *args, **kwargs)
            bound.apply_defaults()
            ud = bound.arguments.get("unsqueeze_dim", 1)
        if ud not in (1, 2) or q.shape[-1] != cos.shape[-1]:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rope(q, k, cos, sin, ud, inplace=True)

    apply_rotary_pos_emb._dpo_fast_original = original
    return apply_rotary_pos_emb


def _install_rope(owner: types.ModuleType) -> None:
    entry = _rope_installs.get(owner.__name__)
    if entry is None:
        original = owner.apply_rotary_pos_emb
        _rope_installs[owner.__name__] = [original, 1]
        owner.apply_rotary_pos_emb = _make_rope_dispatch(original)
    else:
        entry[1] += 1


def _uninstall_rope(owner_name: str) -> None:
    entry = _rope_installs.get(owner_name)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        owner = sys.modules.get(owner_name)
        if owner is not None and getattr(owner.apply_rotary_pos_emb, "_dpo_fast_original", None) is entry[0]:
            owner.apply_rotary_pos_emb = entry[0]
        del _rope_installs[owner_name]


# --------------------------------------------------------------------------------------------------
# Public API

def patch_body(model: nn.Module, options: Optional[BodyOptions] = None, **switches: bool) -> Dict[str, int]:
    """Swap dpo_fast's body kernels into `model` in place; returns how many modules each switch changed.

    model: a supported transformers causal LM (`dpo_fast.families`), bare or in a peft PeftModel. Patching an already patched model first undoes the previous patch.
    options / switches: a `BodyOptions` (default: its defaults), with any switch given by keyword
    replaced (``patch_body(model, rms_norm=False)``). Counts: nf4_dequant per 4-bit base the kernel
    dequantizes (CUDA only at run time), recompute_tail_skip per decoder layer whose checkpoint recompute
    skips down_proj's GEMMs (and, with offload_checkpointing and rms_norm, o_proj's: see
    `dpo_fast.patching.checkpointing`), prefix_sharing per attention module that takes packed rows.
    """
    opts = BodyOptions.build("patch_body()", options, **switches)
    rms_norm, rope, swiglu, qlora_linear = opts.rms_norm, opts.rope, opts.swiglu, opts.qlora_linear
    nf4_dequant, prefix_sharing = opts.nf4_dequant, opts.prefix_sharing
    offload_checkpointing, recompute_tail_skip = opts.offload_checkpointing, opts.recompute_tail_skip
    holder = record_holder(model)
    if state.BODY_RECORD in holder.__dict__:
        unpatch_body(model)
    counts = dict.fromkeys(BODY_KERNELS, 0)
    lora_types = _lora_linear_types()
    rope_owners: Dict[str, types.ModuleType] = {}
    for module in model.modules():
        if _PREV in module.__dict__:
            continue
        norm_spec = _norm_spec(module) if rms_norm else None
        mlp_spec = _gated_mlp_spec(module) if swiglu else None
        if norm_spec is not None:
            _set_forward(module, _rms_norm_forward)
            module.__dict__[_NORM] = norm_spec
            counts["rms_norm"] += 1
        elif mlp_spec is not None:
            _set_forward(module, _mlp_forward)
            module.__dict__[_MLP] = mlp_spec
            counts["swiglu"] += 1
        elif (rope and _rope_function_owner(module) is not None) or (prefix_sharing and _is_attention(module)):
            owner = _rope_function_owner(module) if rope else None
            if owner is not None:
                rope_owners[owner.__name__] = owner
                counts["rope"] += 1
            _set_forward(module, _attention_forward)
            module.__dict__[_ATTN] = {"rope": owner is not None, "prefix": prefix_sharing}
            counts["prefix_sharing"] += int(prefix_sharing)
        elif qlora_linear and lora_types and isinstance(module, lora_types):
            _set_forward(module, _lora_forward)
            counts["qlora_linear"] += 1
            base = getattr(module, "base_layer", None)
            if nf4_dequant and isinstance(base, nn.Module) and is_4bit_base(base):
                base.__dict__[TRITON_DEQUANT] = True  # dense_weight dequantizes it with dpo_fast's kernel
                counts["nf4_dequant"] += 1
    if qlora_linear:
        _make_groups(model)
    for owner in rope_owners.values():
        _install_rope(owner)
    if counts["prefix_sharing"]:
        AttentionInterface.register(_PREFIX_IMPL, prefix_shared_attention)
    checkpointing = []
    if offload_checkpointing:
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        any_on = any(m.gradient_checkpointing for m in layers)
        for m in layers:
            checkpointing.append((m, m.__dict__.get("_gradient_checkpointing_func", _MISSING),
                                  m.__dict__.get("gradient_checkpointing", _MISSING)))
            if not any_on:
                m.gradient_checkpointing = True
        counts["offload_checkpointing"] = len(layers)
    tails = _mark_tails(model, mid=offload_checkpointing) if qlora_linear and recompute_tail_skip else []
    counts["recompute_tail_skip"] = len(tails)
    layer_checkpointing.install(holder, offload=[m for m, _, _ in checkpointing], tail_skip=tails)  # sets them
    holder.__dict__[state.BODY_RECORD] = {"rope_owners": sorted(rope_owners), "checkpointing": checkpointing,
                                          "counts": dict(counts), "options": opts}
    return counts


def _make_groups(model: nn.Module) -> None:
    """Tie each module's sibling projections (_GROUPS) into a _LoRAGroup when all of them are patched here."""
    for module in model.modules():
        for names in _GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if all(isinstance(m, nn.Module) and is_patched_lora(m) and _GROUP not in m.__dict__ for m in layers):
                group = _LoRAGroup(layers)
                for index, layer in enumerate(layers):
                    layer.__dict__[_GROUP] = (group, index)


def _mark_tails(model: nn.Module, mid: bool) -> list:
    """Mark the patched down_proj of each decoder layer whose family allows it (`Family.tail_skip`) as its
    layer's tail (END); returns those layers. With `mid` (offloaded checkpointing) also its patched o_proj
    (MID), whose layer then parks the mid residual at a patched post_attention_layernorm."""
    layers = []
    for module in model.modules():
        family, role = module_role(module)
        mlp = getattr(module, "mlp", None)
        if role != "layer" or not family.tail_skip or not isinstance(mlp, nn.Module) or _gated_mlp_spec(mlp) is None:
            continue
        down = mlp.down_proj
        if isinstance(down, nn.Module) and is_patched_lora(down):
            down.__dict__[_TAIL] = END
            layers.append(module)
            if mid:
                _mark_mid(module)
    return layers


def _mark_mid(layer: nn.Module) -> None:
    """Mark `layer`'s o_proj MID and let its post_attention_layernorm park the residual, when both are patched here."""
    o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
    norm = getattr(layer, "post_attention_layernorm", None)
    if not (isinstance(o_proj, nn.Module) and is_patched_lora(o_proj) and isinstance(norm, nn.Module)):
        return
    attr = norm.__dict__.get(_PREV, (None,))[0]
    if attr is None or getattr(norm.__dict__.get(attr), "__func__", None) is not _rms_norm_forward:
        return
    norm.__dict__[attr] = types.MethodType(_mid_norm_forward, norm)
    o_proj.__dict__[_TAIL] = MID


def unpatch_body(model: nn.Module) -> nn.Module:
    """Undo `patch_body`: restore every original forward and checkpointing setting; returns model."""
    holder = record_holder(model)
    record = holder.__dict__.pop(state.BODY_RECORD, None)
    layer_checkpointing.uninstall(holder)
    for module in model.modules():
        if _PREV in module.__dict__:
            _restore_forward(module)
        module.__dict__.pop(TRITON_DEQUANT, None)
    if record is None:
        return model
    for name in record["rope_owners"]:
        _uninstall_rope(name)
    for m, func, flag in record["checkpointing"]:
        for attr, value in (("_gradient_checkpointing_func", func), ("gradient_checkpointing", flag)):
            if value is _MISSING:
                m.__dict__.pop(attr, None)
            else:
                setattr(m, attr, value)
    return model
