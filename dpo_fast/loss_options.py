"""`LossOptions`: the options of the DPO loss, held and checked in one place.

`dpo_loss`, `fused_linear_dpo_loss` and `compute_dpo_loss` take these options as keyword
arguments; `dpo_loss` checks them by building a `LossOptions`, and `TrainConfig` builds one
from its loss fields so that a bad option fails when the configuration is made, not at the
first training step. Tensors and per-call switches (lengths, ``chosen_nll``,
``sample_weights``, ``bco_delta``, ``check_finite``) are not options.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpo_fast.loss_types import F_DIVERGENCE_TYPES, LOSSES, as_loss_types

__all__ = ["LossOptions", "check_real", "check_ld_alpha"]


def check_real(name: str, value: Any, *, low: float | None = None, low_open: bool = True) -> float:
    """``value`` as a finite float, > ``low`` (>= with ``low_open=False``); raises naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    return value


def check_ld_alpha(ld_alpha: float | None, average: bool) -> float | None:
    """LD-DPO's weight of the tokens past the shorter completion: None (off) or a float in [0, 1].

    It weights summed log-probs, so it cannot be combined with averaged ones (``average``).
    """
    if ld_alpha is None:
        return None
    ld_alpha = check_real("ld_alpha", ld_alpha, low=0.0, low_open=False)
    if ld_alpha > 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    if average:
        raise ValueError(
            "ld_alpha cannot be combined with averaged log-probs (average_log_prob=True / average=True): "
            "LD-DPO weights summed log-probs; drop one of the two"
        )
    return ld_alpha


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class LossOptions:
    """Every option of one DPO loss, checked on construction (see `dpo_fast.losses.dpo_loss` for meanings).

    Construction normalises the values (``loss_type`` to a tuple of names, ``loss_weights`` to a
    tuple of floats, numbers to float) and raises ValueError for a bad value or TypeError for a
    value of the wrong kind, naming the option. `from_kwargs` also rejects unknown names.
    The defaults are those of `dpo_loss` / `fused_linear_dpo_loss` / `compute_dpo_loss`.
    """

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    average_log_prob: bool = False
    ld_alpha: float | None = None
    use_weighting: bool = False

    def __post_init__(self) -> None:
        """The rules, each written once; stores the normalised values."""
        types = as_loss_types(self.loss_type)
        weights = None
        if self.loss_weights is not None:
            try:
                if isinstance(self.loss_weights, (str, bytes)):
                    raise TypeError
                given = tuple(self.loss_weights)
            except TypeError:
                raise TypeError(
                    f"loss_weights must be a list of numbers, got {type(self.loss_weights).__name__}"
                ) from None
            if len(given) != len(types):
                raise ValueError(
                    f"loss_weights has {len(given)} entries but loss_type has {len(types)} ({list(types)})"
                )
            weights = tuple(check_real("loss_weights", w) for w in given)

        beta = check_real("beta", self.beta, low=0.0)
        label_smoothing = check_real("label_smoothing", self.label_smoothing, low=0.0, low_open=False)
        # [0, 0.5): robust divides by 1 - 2*eps; cDPO/aot at 0.5 have no gradient and beyond flip the labels.
        if label_smoothing >= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        if "exo_pair" in types and label_smoothing == 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper suggests 1e-3)")
        discopop_tau = check_real("discopop_tau", self.discopop_tau, low=0.0)
        simpo_gamma = check_real("simpo_gamma", self.simpo_gamma)
        f_alpha_divergence_coef = check_real("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"f_divergence_type: unknown {self.f_divergence_type!r}; valid: {list(F_DIVERGENCE_TYPES)}"
            )
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in types if not LOSSES[t].f_divergence]
            if bad:
                valid = [t for t, spec in LOSSES.items() if spec.f_divergence]
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} is only defined for loss types {valid}; got {bad}"
                )
        reference_free = _check_bool("reference_free", self.reference_free)
        average_log_prob = _check_bool("average_log_prob", self.average_log_prob)
        ld_alpha = check_ld_alpha(self.ld_alpha, average_log_prob)
        use_weighting = _check_bool("use_weighting", self.use_weighting)

        normalised = dict(
            loss_type=types, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
            reference_free=reference_free, f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau, simpo_gamma=simpo_gamma, average_log_prob=average_log_prob,
            ld_alpha=ld_alpha, use_weighting=use_weighting,
        )
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LossOptions:
        """Build from keyword arguments; an unknown name raises ValueError listing the valid ones."""
        unknown = [name for name in kwargs if name not in cls.names()]
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown}; valid: {list(cls.names())}")
        return cls(**kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `compute_dpo_loss` / `fused_linear_dpo_loss` (a single loss type as a name)."""
        out = {name: getattr(self, name) for name in self.names()}
        out["loss_type"] = self.loss_type[0] if len(self.loss_type) == 1 else list(self.loss_type)
        out["loss_weights"] = None if self.loss_weights is None else list(self.loss_weights)
        return out
