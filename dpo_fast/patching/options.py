"""The switches of the body patch, written once: `patch`, `patch_body`, the TRL integration and the
benchmarks all read them from `BodyOptions`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple


@dataclass(frozen=True)
class BodyOptions:
    """Which of dpo_fast's body changes `patch` applies (each can be switched off on its own).

    rms_norm, rope, swiglu: the RMSNorm, rotary-embedding and gated-MLP kernels (SwiGLU; GeGLU for Gemma).
    qlora_linear: the fused (Q)LoRA linear op on peft LoRA layers; q/k/v and gate/up run as one op.
    nf4_dequant: with qlora_linear, 4-bit bases dequantized by dpo_fast's kernel on CUDA.
    offload_checkpointing: checkpointed layer inputs parked in CPU memory (turns checkpointing on).
    prefix_sharing: attention modules accept packed [prompt | chosen | rejected] rows.
    recompute_tail_skip: with qlora_linear, checkpoint recomputes skip GEMMs whose output goes unread.
    """

    rms_norm: bool = True
    rope: bool = True
    swiglu: bool = True
    qlora_linear: bool = True
    nf4_dequant: bool = True
    offload_checkpointing: bool = False
    prefix_sharing: bool = False
    recompute_tail_skip: bool = True

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The switch names, in the order they are reported."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, options: Mapping[str, Any], caller: str) -> None:
        """Raise TypeError naming any key of `options` that is not a switch (`caller` names the function)."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller} got unknown option(s) {unknown}; body options are {sorted(cls.names())}")

    @classmethod
    def build(cls, caller: str, base: "BodyOptions | None" = None, **options: Any) -> "BodyOptions":
        """`base` (default: the defaults) with `options` replaced, after `check_names`; values made bool."""
        cls.check_names(options, caller)
        return dataclasses.replace(base or cls(), **{k: bool(v) for k, v in options.items()})

    @classmethod
    def only_prefix_sharing(cls) -> "BodyOptions":
        """Every kernel off, prefix sharing on: what ``patch(model, body=False, prefix_sharing=True)`` applies."""
        return cls(**{**{name: False for name in cls.names()}, "prefix_sharing": True})

    def as_dict(self) -> Dict[str, bool]:
        return dataclasses.asdict(self)


#: the switches and their defaults, as a plain dict (read-only view of `BodyOptions()`)
BODY_OPTIONS: Dict[str, bool] = BodyOptions().as_dict()
