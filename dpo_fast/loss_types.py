"""The DPO-family loss types: one small formula each and the table that names them.

Each loss type is a function of `Pairs` (the per-pair quantities `dpo_fast.losses.dpo_loss`
builds once) and one `LossSpec` row in `LOSSES` saying what it needs from the caller. Formulas
follow TRL 1.16's `DPOTrainer._compute_loss`, so at ``label_smoothing=0`` every type equals
TRL 1.x; the extras are:

* ``sigmoid`` with ``label_smoothing > 0``: the conservative cDPO form of TRL <= 0.28 and Liger.
* ``simpo``: SimPO (reference-free, length-normalised, target margin ``simpo_gamma``), as in
  TRL's CPO trainer with ``loss_type="simpo"`` (including its ``label_smoothing`` form).
* ``bco_pair`` subtracts ``bco_delta``, the running reward mean of TRL <= 0.2x (0 in TRL 1.x).

`f_divergence_scores` holds TRL's f-DPO transforms of the log-ratios (`F_DIVERGENCE_TYPES`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LOSSES",
    "LossSpec",
    "Pairs",
    "as_loss_types",
    "f_divergence_scores",
    "needs_reference",
    "per_token",
    "unread_options",
]

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class Pairs:
    """The quantities a loss function may read; tensors are [B] in the compute dtype."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor  # f-divergence transform of the log-ratios (== log-ratios for reverse_kl)
    rejected_scores: Tensor
    chosen_lengths: Tensor | None  # completion token counts, float, not clamped
    rejected_lengths: Tensor | None
    chosen_nll: Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    bco_delta: Tensor | float

    @property
    def delta(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sigmoid(z) - eps log sigmoid(-z): the cDPO / cSimPO form (plain DPO at eps=0)."""
    if eps == 0.0:
        return -F.logsigmoid(z)
    return -F.logsigmoid(z) * (1.0 - eps) - F.logsigmoid(-z) * eps


def per_token(scores: Tensor, lengths: Tensor) -> Tensor:
    return scores / lengths.clamp(min=1.0)


# ----------------------------------------------------------------------------- loss functions
def _sigmoid(p: Pairs) -> Tensor:
    return _smoothed_logistic(p.beta * p.delta, p.label_smoothing)


def _hinge(p: Pairs) -> Tensor:
    return torch.relu(1.0 - p.beta * p.delta)


def _ipo(p: Pairs) -> Tensor:
    # TRL normalises IPO's log-ratios by the completion length (agreed with the IPO authors).
    delta = per_token(p.chosen_scores, p.chosen_lengths) - per_token(p.rejected_scores, p.rejected_lengths)
    return (delta - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p: Pairs) -> Tensor:
    # EXO-pref (arXiv 2402.00856, eq. 16): KL(softmax(beta * scores) || [1 - eps, eps]).
    z = p.beta * p.delta
    eps = p.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(p: Pairs) -> Tensor:
    c, r = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _robust(p: Pairs) -> Tensor:
    z, eps = p.beta * p.delta, p.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _bco_pair(p: Pairs) -> Tensor:
    c = p.beta * p.chosen_logratios - p.bco_delta
    r = p.beta * p.rejected_logratios - p.bco_delta
    return -F.logsigmoid(c) - F.logsigmoid(-r)


def _sppo_hard(p: Pairs) -> Tensor:
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: Pairs) -> Tensor:
    # AOT (paired): sort policy and reference chosen-rejected margins over the batch independently.
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    ref = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(p.beta * (policy - ref), p.label_smoothing)


def _aot_unpaired(p: Pairs) -> Tensor:
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def _apo_zero(p: Pairs) -> Tensor:
    # APO-zero (arXiv 2408.06266, eq. 7): raise chosen, lower rejected.
    return 1.0 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: Pairs) -> Tensor:
    # APO-down (eq. 8): lower chosen, lower rejected more.
    return torch.sigmoid(p.beta * p.chosen_logratios) + 1.0 - torch.sigmoid(
        p.beta * (p.chosen_logratios - p.rejected_logratios)
    )


def _discopop(p: Pairs) -> Tensor:
    # DiscoPOP (arXiv 2406.08414, eq. 5): logistic / exponential blend gated by sigmoid(z / tau).
    z = p.beta * p.delta
    gate = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1.0 - gate) + torch.exp(-z) * gate


def _sft(p: Pairs) -> Tensor:
    # TRL: mean NLL over all chosen completion tokens of the batch, broadcast to every pair.
    batch = p.chosen_logps.shape[0]
    if p.chosen_nll is not None:
        return p.chosen_nll.expand(batch) if p.chosen_nll.dim() == 0 else p.chosen_nll
    nll = -p.chosen_logps.sum() / p.chosen_lengths.sum().clamp(min=1.0)
    return nll.expand(batch)


def _sigmoid_norm(p: Pairs) -> Tensor:
    delta = per_token(p.chosen_scores, p.chosen_lengths) - per_token(p.rejected_scores, p.rejected_lengths)
    return -F.logsigmoid(p.beta * delta)


def _simpo(p: Pairs) -> Tensor:
    # SimPO (arXiv 2405.14734): beta * (mean logp_c - mean logp_r) - gamma; reference-free.
    margin = per_token(p.chosen_logps, p.chosen_lengths) - per_token(p.rejected_logps, p.rejected_lengths)
    return _smoothed_logistic(p.beta * (margin - p.simpo_gamma / p.beta), p.label_smoothing)


@dataclass(frozen=True)
class LossSpec:
    """One loss type: its function and what it needs from the caller."""

    fn: Callable[[Pairs], Tensor]
    needs_lengths: bool = False  # completion lengths (chosen_lengths / rejected_lengths)
    needs_reference: bool = True  # reference log-probs (unless reference_free)
    f_divergence: bool = False  # valid with f_divergence_type != "reverse_kl" (TRL's rule)
    options: tuple[str, ...] = ()  # the options only some loss types read, that this one reads


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, f_divergence=True),
    "hinge": LossSpec(_hinge, f_divergence=True),
    "ipo": LossSpec(_ipo, needs_lengths=True, f_divergence=True),
    "exo_pair": LossSpec(_exo_pair, f_divergence=True),
    "nca_pair": LossSpec(_nca_pair),
    "robust": LossSpec(_robust, f_divergence=True),
    "bco_pair": LossSpec(_bco_pair),
    "sppo_hard": LossSpec(_sppo_hard),
    "aot": LossSpec(_aot),
    "aot_unpaired": LossSpec(_aot_unpaired),
    "apo_zero": LossSpec(_apo_zero),
    "apo_down": LossSpec(_apo_down),
    "discopop": LossSpec(_discopop, f_divergence=True, options=("discopop_tau",)),
    "sft": LossSpec(_sft, needs_lengths=True, needs_reference=False, f_divergence=True),
    "sigmoid_norm": LossSpec(_sigmoid_norm, needs_lengths=True, f_divergence=True),
    "simpo": LossSpec(_simpo, needs_lengths=True, needs_reference=False, options=("simpo_gamma",)),
}

LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)


# ----------------------------------------------------------------------------- f-divergences
def f_divergence_scores(logratios: Tensor, kind: str, alpha: float) -> Tensor:
    """TRL 1.x's f'(pi/pi_ref) for each f-divergence (f-DPO, arXiv 2309.16240)."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1.0 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    # alpha_divergence; alpha -> 1 is the reverse-KL limit
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0  # keep exp() representable, as TRL does
    t = torch.clamp((alpha - 1.0) * logratios, max=clamp_max)
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


# ----------------------------------------------------------------------------- queries on the table
def as_loss_types(loss_type: str | Sequence[str], *, name: str = "loss_type") -> tuple[str, ...]:
    """Validate ``loss_type`` (one name or a list of names) and return it as a tuple.

    ``name`` labels the errors (e.g. a command-line flag).
    """
    if isinstance(loss_type, str):
        types: tuple = (loss_type,)
    else:
        try:
            types = tuple(loss_type)
        except TypeError:
            raise TypeError(
                f"{name} must be a loss type name or a list of them, got {type(loss_type).__name__}"
            ) from None
    if not types:
        raise ValueError(f"{name} must name at least one loss type; valid: {list(LOSS_TYPES)}")
    for t in types:
        if not isinstance(t, str) or t not in LOSSES:
            raise ValueError(f"{name}: unknown loss type {t!r}; valid: {list(LOSS_TYPES)}")
    return types


def needs_reference(loss_type: str | Sequence[str], reference_free: bool = False) -> bool:
    """Whether these loss types need reference log-probs (so a reference pass must run)."""
    return not reference_free and any(LOSSES[t].needs_reference for t in as_loss_types(loss_type))


def unread_options(loss_type: str | Sequence[str], names: Sequence[str], *,
                   f_divergence_type: str = "reverse_kl") -> list[str]:
    """Of the option `names` given explicitly, those no loss type of `loss_type` reads, each as one sentence
    saying who reads it (an option that would be ignored is a mistake worth naming before a run starts)."""
    types = as_loss_types(loss_type)
    problems = []
    for name in names:
        if name == "f_alpha_divergence_coef":
            if f_divergence_type != "alpha_divergence":
                problems.append(f"{name} is only read with f_divergence_type='alpha_divergence' "
                                f"(here {f_divergence_type!r})")
            continue
        readers = [t for t, spec in LOSSES.items() if name in spec.options]
        if readers and not any(t in readers for t in types):
            problems.append(f"{name} is only read by loss type(s) {readers}, not by {list(types)}")
    return problems
