"""The DPO loss family, with TRL's loss-type names and formulas.

`dpo_loss` maps per-sequence log-probs to per-pair losses and rewards: it checks its options
(`dpo_fast.loss_options.LossOptions`) and tensors, builds the shared quantities (log-ratios,
f-divergence scores, lengths) once and sums the selected rows of the loss table
(`dpo_fast.loss_types`, one small formula per type, TRL 1.16's). On top of TRL 1.x:

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
from collections.abc import Sequence

import torch
from torch import Tensor

from dpo_fast.loss_options import LossOptions, check_ld_alpha, check_real
from dpo_fast.loss_types import (
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    LOSSES,
    LossSpec,
    Pairs,
    as_loss_types,
    f_divergence_scores,
    needs_reference,
    per_token,
)

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LossSpec",
    "as_loss_types",
    "needs_reference",
    "dpo_loss",
    "reduce_sequence_logps",
    "preference_metrics",
    "wpo_weights",
    "BCORunningMean",
]


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
    options = LossOptions(
        loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        reference_free=reference_free, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
    )
    types, beta, reference_free = options.loss_type, options.beta, options.reference_free
    specs = [LOSSES[t] for t in types]
    weights = options.loss_weights if options.loss_weights is not None else (1.0,) * len(types)

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
        bco_delta = check_real("bco_delta", bco_delta)
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
    f_divergence = (options.f_divergence_type, options.f_alpha_divergence_coef)
    pairs = Pairs(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, *f_divergence),
        rejected_scores=f_divergence_scores(rejected_logratios, *f_divergence),
        chosen_lengths=cast(lengths.get("chosen_lengths")),
        rejected_lengths=cast(lengths.get("rejected_lengths")),
        chosen_nll=cast(chosen_nll),
        beta=beta,
        label_smoothing=options.label_smoothing,
        discopop_tau=options.discopop_tau,
        simpo_gamma=options.simpo_gamma,
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
        chosen_rewards = beta * per_token(chosen, pairs.chosen_lengths).detach()
        rejected_rewards = beta * per_token(rejected, pairs.rejected_lengths).detach()
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
    ld_alpha = check_ld_alpha(ld_alpha, average)

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
