"""The DPO loss family, with TRL's loss-type names and formulas.

`dpo_loss` maps per-sequence log-probs to per-pair losses and rewards. Each loss type is a
small named function in `_LOSSES` (one table row each, see `LossSpec`); `dpo_loss` only
validates, builds the shared quantities (log-ratios, f-divergence scores, lengths) once and
sums the selected rows. Formulas follow TRL 1.16's `DPOTrainer._compute_loss`, so at
``label_smoothing=0`` every type equals TRL 1.x; the extras are:

* ``sigmoid`` with ``label_smoothing > 0``: the conservative cDPO form of TRL <= 0.28 and Liger.
* ``simpo``: SimPO (reference-free, length-normalised, target margin ``simpo_gamma``), as in
  TRL's CPO trainer with ``loss_type="simpo"`` (including its ``label_smoothing`` form).
* ``reference_free=True`` for any type: reference log-probs are taken as 0.
* ``bco_delta``: the running reward mean that TRL <= 0.2x subtracted in ``bco_pair``
  (TRL 1.x uses 0, the default here); `BCORunningMean` keeps it.
* ``sample_weights``: per-pair weights, e.g. WPO's from `wpo_weights`.

Helpers for the callers that hold per-token log-probs: `reduce_sequence_logps` (TRL's
concatenated [chosen; rejected] layout, sums / means / LD-DPO), `preference_metrics`
(TRL's logged metric names) and `wpo_weights`.
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
    "LossSpec",
    "dpo_loss",
    "reduce_sequence_logps",
    "preference_metrics",
    "wpo_weights",
    "BCORunningMean",
]

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class _Pairs:
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


def _per_token(scores: Tensor, lengths: Tensor) -> Tensor:
    return scores / lengths.clamp(min=1.0)


# ----------------------------------------------------------------------------- loss functions
def _sigmoid(p: _Pairs) -> Tensor:
    return _smoothed_logistic(p.beta * p.delta, p.label_smoothing)


def _hinge(p: _Pairs) -> Tensor:
    return torch.relu(1.0 - p.beta * p.delta)


def _ipo(p: _Pairs) -> Tensor:
    # TRL normalises IPO's log-ratios by the completion length (agreed with the IPO authors).
    delta = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return (delta - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> Tensor:
    # EXO-pref (arXiv 2402.00856, eq. 16): KL(softmax(beta * scores) || [1 - eps, eps]).
    z = p.beta * p.delta
    eps = p.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(p: _Pairs) -> Tensor:
    c, r = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _robust(p: _Pairs) -> Tensor:
    z, eps = p.beta * p.delta, p.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _bco_pair(p: _Pairs) -> Tensor:
    c = p.beta * p.chosen_logratios - p.bco_delta
    r = p.beta * p.rejected_logratios - p.bco_delta
    return -F.logsigmoid(c) - F.logsigmoid(-r)


def _sppo_hard(p: _Pairs) -> Tensor:
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> Tensor:
    # AOT (paired): sort policy and reference chosen-rejected margins over the batch independently.
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    ref = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(p.beta * (policy - ref), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> Tensor:
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def _apo_zero(p: _Pairs) -> Tensor:
    # APO-zero (arXiv 2408.06266, eq. 7): raise chosen, lower rejected.
    return 1.0 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> Tensor:
    # APO-down (eq. 8): lower chosen, lower rejected more.
    return torch.sigmoid(p.beta * p.chosen_logratios) + 1.0 - torch.sigmoid(
        p.beta * (p.chosen_logratios - p.rejected_logratios)
    )


def _discopop(p: _Pairs) -> Tensor:
    # DiscoPOP (arXiv 2406.08414, eq. 5): logistic / exponential blend gated by sigmoid(z / tau).
    z = p.beta * p.delta
    gate = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1.0 - gate) + torch.exp(-z) * gate


def _sft(p: _Pairs) -> Tensor:
    # TRL: mean NLL over all chosen completion tokens of the batch, broadcast to every pair.
    batch = p.chosen_logps.shape[0]
    if p.chosen_nll is not None:
        return p.chosen_nll.expand(batch) if p.chosen_nll.dim() == 0 else p.chosen_nll
    nll = -p.chosen_logps.sum() / p.chosen_lengths.sum().clamp(min=1.0)
    return nll.expand(batch)


def _sigmoid_norm(p: _Pairs) -> Tensor:
    delta = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return -F.logsigmoid(p.beta * delta)


def _simpo(p: _Pairs) -> Tensor:
    # SimPO (arXiv 2405.14734): beta * (mean logp_c - mean logp_r) - gamma; reference-free.
    margin = _per_token(p.chosen_logps, p.chosen_lengths) - _per_token(p.rejected_logps, p.rejected_lengths)
    return _smoothed_logistic(p.beta * (margin - p.simpo_gamma / p.beta), p.label_smoothing)


@dataclass(frozen=True)
class LossSpec:
    """One loss type: its function and what it needs from the caller."""

    fn: Callable[[_Pairs], Tensor]
    needs_lengths: bool = False  # completion lengths (chosen_lengths / rejected_lengths)
    needs_reference: bool = True  # reference log-probs (unless reference_free)
    f_divergence: bool = False  # valid with f_divergence_type != "reverse_kl" (TRL's rule)


_LOSSES: dict[str, LossSpec] = {
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
    "discopop": LossSpec(_discopop, f_divergence=True),
    "sft": LossSpec(_sft, needs_lengths=True, needs_reference=False, f_divergence=True),
    "sigmoid_norm": LossSpec(_sigmoid_norm, needs_lengths=True, f_divergence=True),
    "simpo": LossSpec(_simpo, needs_lengths=True, needs_reference=False),
}

LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)


# ----------------------------------------------------------------------------- f-divergences
def _f_divergence_scores(logratios: Tensor, kind: str, alpha: float) -> Tensor:
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


# ----------------------------------------------------------------------------- validation helpers
def as_loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """Validate ``loss_type`` (one name or a list of names) and return it as a tuple."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError(f"loss_type must name at least one loss type; valid: {list(LOSS_TYPES)}")
    for name in types:
        if not isinstance(name, str) or name not in _LOSSES:
            raise ValueError(f"loss_type: unknown loss type {name!r}; valid: {list(LOSS_TYPES)}")
    return types


def needs_reference(loss_type: str | Sequence[str], reference_free: bool = False) -> bool:
    """Whether these loss types need reference log-probs (so a reference pass must run)."""
    return not reference_free and any(_LOSSES[t].needs_reference for t in as_loss_types(loss_type))


def _check_scalar(name: str, value: float, *, low: float | None = None, low_open: bool = True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    return value


def _check_vector(name: str, t: object, batch: int | None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has batch size {t.shape[0]}, expected {batch} (the size of chosen_logps)")
    return t


def _check_values(named: dict[str, Tensor], lengths: dict[str, Tensor]) -> None:
    """NaN/Inf in any input, negative lengths: one device sync in all; names the offending argument."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in (*named.values(), *lengths.values())])
    ok = torch.isfinite(flat).all()
    for t in lengths.values():
        ok = ok & (t >= 0).all()
    if bool(ok):
        return
    for name, t in {**named, **lengths}.items():
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    for name, t in lengths.items():
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0 (token counts)")


# ----------------------------------------------------------------------------- the dispatcher
def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    bco_delta: float | Tensor = 0.0,
    chosen_nll: Tensor | None = None,
    sample_weights: Tensor | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses with TRL's loss types; returns (losses, chosen_rewards, rejected_rewards).

    Args:
        chosen_logps, rejected_logps: [B] summed completion log-probs of the policy (sums, as
            `reduce_sequence_logps` returns them with ``average=False``; LD-DPO sums are fine).
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model; required
            unless ``reference_free`` or every loss type is reference-free (``simpo``, ``sft``).
        beta: the DPO temperature (IPO's tau; SimPO's beta), > 0.
        loss_type: one name from `LOSS_TYPES` or a list of them (e.g. MPO:
            ``["sigmoid", "bco_pair", "sft"]``); the returned losses are the weighted sum.
        loss_weights: one weight per loss type (default all 1.0, as TRL).
        label_smoothing: in [0, 0.5). cDPO for ``sigmoid``, flip rate for ``robust``, epsilon for
            ``exo_pair`` (must be > 0 there), smoothing for ``aot``/``aot_unpaired``/``simpo``;
            other types ignore it, as TRL does.
        reference_free: treat the reference log-probs as 0 for every type.
        chosen_lengths, rejected_lengths: [B] completion token counts; needed by ``ipo``,
            ``sigmoid_norm``, ``simpo`` and ``sft`` (unless ``chosen_nll`` is given).
        f_divergence_type, f_alpha_divergence_coef: TRL's f-DPO scores; only with the types TRL
            allows (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft).
        discopop_tau: DiscoPOP's temperature, > 0.
        simpo_gamma: SimPO's target reward margin (TRL CPOConfig's name and default).
        bco_delta: running mean of the rewards subtracted in ``bco_pair`` (TRL <= 0.2x kept it
            with `RunningMoments`; TRL 1.x uses 0, the default). See `BCORunningMean`.
        chosen_nll: the ``sft`` term, scalar or [B]; default: mean NLL per chosen token,
            ``-sum(chosen_logps) / sum(chosen_lengths)`` (TRL's batch token mean). Pass it when
            chosen_logps are not plain sums (e.g. LD-DPO).
        sample_weights: [B] per-pair weights multiplying the losses (WPO: `wpo_weights`).
        check_finite: raise on NaN/Inf inputs and negative lengths (one device sync; pass
            False to skip these value checks, e.g. under CUDA graphs).

    Returns:
        losses [B] (``losses.mean()`` is TRL's loss), chosen_rewards [B], rejected_rewards [B],
        rewards = beta * (logps - ref_logps), detached; for ``loss_type="simpo"`` alone,
        beta * length-normalised logps, as TRL's CPO trainer and Liger log them. Computed in
        float32 at least (float64 inputs stay float64).
    """
    types = as_loss_types(loss_type)
    specs = [_LOSSES[t] for t in types]
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = list(loss_weights)
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({list(types)})"
            )
        weights = [_check_scalar("loss_weights", w) for w in weights]

    beta = _check_scalar("beta", beta, low=0.0)
    label_smoothing = _check_scalar("label_smoothing", label_smoothing, low=0.0, low_open=False)
    # [0, 0.5): robust divides by 1 - 2*eps; cDPO/aot at 0.5 have no gradient and beyond flip the labels.
    if label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper suggests 1e-3)")
    discopop_tau = _check_scalar("discopop_tau", discopop_tau, low=0.0)
    simpo_gamma = _check_scalar("simpo_gamma", simpo_gamma)
    f_alpha_divergence_coef = _check_scalar("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type: unknown {f_divergence_type!r}; valid: {list(F_DIVERGENCE_TYPES)}")
    if f_divergence_type != "reverse_kl":
        bad = [t for t, s in zip(types, specs) if not s.f_divergence]
        if bad:
            valid = [t for t, s in _LOSSES.items() if s.f_divergence]
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is only defined for loss types {valid}; got {bad}"
            )

    chosen_logps = _check_vector("chosen_logps", chosen_logps, None)
    batch = chosen_logps.shape[0]
    if batch == 0:
        raise ValueError("chosen_logps is empty; dpo_loss needs at least one pair")
    rejected_logps = _check_vector("rejected_logps", rejected_logps, batch)
    for name, t in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")

    needs_ref = not reference_free and any(s.needs_reference for s in specs)
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is required for loss_type {list(types)} unless reference_free=True")
    named: dict[str, Tensor] = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}
    if not reference_free:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is not None:
                named[name] = _check_vector(name, t, batch)

    needs_lengths = [t for t, s in zip(types, specs) if s.needs_lengths and not (t == "sft" and chosen_nll is not None)]
    if needs_lengths:
        for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if t is None:
                raise ValueError(f"{name} is required for loss_type {needs_lengths} (completion token counts)")
    lengths: dict[str, Tensor] = {}
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            lengths[name] = _check_vector(name, t, batch)
    if chosen_nll is not None:
        if not isinstance(chosen_nll, Tensor):
            raise TypeError(f"chosen_nll must be a torch.Tensor, got {type(chosen_nll).__name__}")
        if chosen_nll.dim() != 0:
            _check_vector("chosen_nll", chosen_nll, batch)
        named["chosen_nll"] = chosen_nll
    if sample_weights is not None:
        named["sample_weights"] = _check_vector("sample_weights", sample_weights, batch)
    if isinstance(bco_delta, Tensor):
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must be a scalar, got shape {tuple(bco_delta.shape)}")
        named["bco_delta"] = bco_delta.reshape(())
    else:
        bco_delta = _check_scalar("bco_delta", bco_delta)
    if check_finite:
        _check_values(named, lengths)

    dtype = torch.promote_types(torch.promote_types(chosen_logps.dtype, rejected_logps.dtype), torch.float32)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    chosen, rejected = cast(chosen_logps), cast(rejected_logps)
    if reference_free or ref_chosen_logps is None or ref_rejected_logps is None:
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    else:
        ref_chosen, ref_rejected = cast(ref_chosen_logps), cast(ref_rejected_logps)
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    pairs = _Pairs(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=_f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef),
        rejected_scores=_f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef),
        chosen_lengths=cast(lengths.get("chosen_lengths")),
        rejected_lengths=cast(lengths.get("rejected_lengths")),
        chosen_nll=cast(chosen_nll),
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        simpo_gamma=simpo_gamma,
        bco_delta=cast(bco_delta.reshape(())) if isinstance(bco_delta, Tensor) else bco_delta,
    )

    losses = None
    for spec, weight in zip(specs, weights):
        term = spec.fn(pairs)
        term = term if weight == 1.0 else term * weight
        losses = term if losses is None else losses + term
    if sample_weights is not None:
        losses = losses * cast(sample_weights)

    if types == ("simpo",):
        chosen_rewards = beta * _per_token(chosen, pairs.chosen_lengths).detach()
        rejected_rewards = beta * _per_token(rejected, pairs.rejected_lengths).detach()
    else:
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- per-token helpers
def _check_pair_rows(name: str, t: object, like: Tensor | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [2B, T], got shape {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    if like is None and (t.shape[0] == 0 or t.shape[0] % 2):
        raise ValueError(
            f"{name} must have an even, non-zero number of rows [2B, T] (B chosen rows first), got {t.shape[0]}"
        )
    return t


def reduce_sequence_logps(
    token_logps: Tensor,
    loss_mask: Tensor,
    *,
    average: bool = False,
    ld_alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sequence log-probs from per-token ones in TRL's [chosen; rejected] layout.

    token_logps, loss_mask: [2B, T], the B chosen rows first; token_logps[i, t] is the
    log-prob of the token the mask marks (already aligned: no shift is done here). Values
    outside the mask are ignored (even NaN). ``average=True`` divides by the token count
    (TRL's ``average_log_prob``). ``ld_alpha`` (LD-DPO, in [0, 1]) keeps each pair's first
    min(len_chosen, len_rejected) completion tokens at weight 1 and the rest at ``ld_alpha``,
    as TRL 1.x does. An all-masked row gives log-prob 0 and length 0.

    Returns chosen_logps [B], rejected_logps [B] (float32 at least) and chosen_lengths,
    rejected_lengths [B] (int64 token counts).
    """
    _check_pair_rows("token_logps", token_logps)
    _check_pair_rows("loss_mask", loss_mask, token_logps)
    if not token_logps.is_floating_point():
        raise TypeError(f"token_logps must be a floating-point tensor, got {token_logps.dtype}")
    if ld_alpha is not None:
        ld_alpha = _check_scalar("ld_alpha", ld_alpha, low=0.0, low_open=False)
        if ld_alpha > 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
        if average:
            raise ValueError("ld_alpha and average=True cannot be combined (LD-DPO weights summed log-probs)")

    mask = loss_mask != 0
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    logps = torch.where(mask, token_logps.to(dtype), torch.zeros((), dtype=dtype, device=token_logps.device))
    lengths = mask.sum(dim=1)
    if ld_alpha is None:
        seq = logps.sum(dim=1)
    else:
        position = mask.cumsum(dim=1)  # 1-based index among the completion tokens
        chosen_len, rejected_len = lengths.chunk(2)
        shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
        shared_sum = torch.where(mask & (position <= shared), logps, 0.0).sum(dim=1)
        tail_sum = torch.where(mask & (position > shared), logps, 0.0).sum(dim=1)
        seq = shared_sum + ld_alpha * tail_sum
    if average:
        seq = seq / lengths.clamp(min=1).to(dtype)
    chosen, rejected = seq.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return chosen, rejected, chosen_lengths, rejected_lengths


def preference_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, float]:
    """TRL's logged DPO metrics (batch means, python floats)."""
    chosen_rewards = _check_vector("chosen_rewards", chosen_rewards, None)
    batch = chosen_rewards.shape[0]
    if batch == 0:
        raise ValueError("chosen_rewards is empty")
    rejected_rewards = _check_vector("rejected_rewards", rejected_rewards, batch)
    chosen_logps = _check_vector("chosen_logps", chosen_logps, batch)
    rejected_logps = _check_vector("rejected_logps", rejected_logps, batch)
    with torch.no_grad():
        cr, rr = chosen_rewards.float(), rejected_rewards.float()
        values = torch.stack(
            [
                cr.mean(),
                rr.mean(),
                (cr > rr).float().mean(),
                (cr - rr).mean(),
                chosen_logps.float().mean(),
                rejected_logps.float().mean(),
            ]
        ).tolist()
    names = (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"
    )
    return dict(zip(names, values))


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, loss_mask: Tensor) -> Tensor:
    """WPO pair weights (arXiv 2406.11827, eq. 2) as TRL 1.x computes them for ``use_weighting``.

    Per sequence w = exp(mean over completion tokens of (logp_t - log sum_v p_tv^2)); the pair
    weight is w_chosen * w_rejected. Inputs [2B, T] (chosen rows first); returns [B], detached.
    """
    _check_pair_rows("token_logps", token_logps)
    _check_pair_rows("log_sum_sq_probs", log_sum_sq_probs, token_logps)
    _check_pair_rows("loss_mask", loss_mask, token_logps)
    with torch.no_grad():
        mask = loss_mask != 0
        dtype = torch.promote_types(token_logps.dtype, torch.float32)
        aligned = torch.where(mask, token_logps.to(dtype) - log_sum_sq_probs.to(dtype), 0.0)
        mean = aligned.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(dtype)
        chosen, rejected = torch.exp(mean).chunk(2)
        return chosen * rejected


class BCORunningMean:
    """Running mean of the batch-mean reward, the ``delta`` of TRL <= 0.2x's ``bco_pair``.

    Call ``delta = tracker.update(chosen_rewards, rejected_rewards)`` before the loss and pass
    ``bco_delta=delta`` to `dpo_loss` (TRL updated first, then used the new mean). Each update
    adds one sample, the mean of the concatenated rewards, as TRL's RunningMoments did.
    Single-process; gather the rewards across ranks first when running distributed.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
        rewards = torch.cat([chosen_rewards.detach().reshape(-1), rejected_rewards.detach().reshape(-1)])
        batch_mean = float(rewards.float().mean())
        if not math.isfinite(batch_mean):
            raise ValueError("rewards contain NaN or Inf")
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
