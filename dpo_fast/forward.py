"""Run a model and score tokens: the one forward path behind every log-prob dpo_fast computes.

The patched model's fused call (TRL's ``fused_lm_head=True`` contract, `dpo_fast.patching.head`),
`compute_dpo_loss` for the policy and the reference, the SFT loss, precomputed reference log-probs
and evaluation all come here:

1. `plan_packing` decides, with one policy, whether a call's rows run packed one row per pair
   (prefix sharing, `dpo_fast.prefix_sharing`);
2. `backbone_hidden` runs the decoder stack, packed or not, and returns the hidden states in the
   unshared layout;
3. `head_outputs` scores the positions whose label is not ignored with the fused head
   (`dpo_fast.ops.linear_log_probs`): per-token log-probs and, from the same vocabulary sweep,
   the statistics TRL logs;
4. `sequence_logps` reduces per-token log-probs to sequence log-probs with the one reduction,
   `dpo_fast.losses.reduce_sequence_logps`.

`token_outputs` is the entry for any supported model: a patched model is called through its own
forward (so wrappers around it see an ordinary call), an unpatched one runs `run_fused_head` on its
backbone directly. See docs/design.md, "The fused head" and "Prefix sharing".
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import state
from .families import final_logit_softcap
from .losses import reduce_sequence_logps
from .ops.linear_log_probs import linear_log_probs_with_stats
from .ops.prefix_attention import PREFIX_KWARG
from .prefix_sharing import PackedPairs, attention_problem, pack_pairs, rope_problem, window_problem

#: label value of positions that are not scored (prompt, padding), as in transformers and TRL
IGNORE_INDEX = -100
#: per-token fields the head can return (TRL's names). `log_probs` is always computed.
HEAD_OUTPUTS: Tuple[str, ...] = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
#: the head outputs behind TRL's logged metrics (logits/chosen, entropy, mean_token_accuracy)
METRIC_OUTPUTS: Tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")
# TRL's name for each per-token statistic -> the name `linear_log_probs_with_stats` gives it
_STAT_NAMES = {"entropy": "entropy", "mean_logits": "mean_logit", "log_sum_sq_probs": "log_sum_p2"}
#: the private keyword that carries a `FusedRequest` through wrappers into the patched forward
REQUEST_KWARG = "dpo_fast_request"


@dataclass(frozen=True)
class FusedRequest:
    """What a caller inside dpo_fast asks of one fused call, beyond TRL's contract.

    outputs: the per-token fields to compute (default: those `patch` was asked for);
    prefix_sharing: None follows the patch, True requires it, False runs unshared.
    """

    outputs: Optional[Tuple[str, ...]] = None
    prefix_sharing: Optional[bool] = None


def validate_outputs(outputs: Sequence[str]) -> Tuple[str, ...]:
    """Check a requested set of head outputs against HEAD_OUTPUTS; returns them as a tuple."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in HEAD_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: unknown head output(s) {unknown}; choose from {list(HEAD_OUTPUTS)}")
    return outputs


# ------------------------------------------------------------------------------------------ the head
def head_outputs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 labels: torch.Tensor, outputs: Sequence[str] = ("log_probs",), *,
                 softcap: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """Per-token outputs for aligned hidden [B, S, d] and labels [B, S] (labels[i] predicted from hidden[i]).

    `log_probs` is differentiable (fp32); the statistics other outputs need (`entropy`, `mean_logits`,
    `log_sum_sq_probs`, `is_top1`) come from the same vocabulary sweep, without gradient. Only positions
    whose label is not -100 are projected; every returned tensor has labels' shape and is 0 elsewhere.
    `label_mask` (bool) marks the scored positions. `softcap` (c, or None): every output is over the
    capped logits ``c * tanh(z / c)`` (Gemma 2's final_logit_softcapping).
    """
    labels = labels.to(hidden.device)
    mask = labels != IGNORE_INDEX
    extras = [o for o in outputs if o != "log_probs"]
    log_probs, stats = linear_log_probs_with_stats(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX,
                                                   stats=bool(extras), softcap=softcap)
    result = {"log_probs": log_probs}
    for key in extras:
        if key == "is_top1":
            result[key] = (stats["argmax"] == labels) & mask
        else:
            result[key] = stats[_STAT_NAMES[key]]
    result["label_mask"] = mask
    return result


# ------------------------------------------------------------------------------------------ packing
_MODEL_KEYS = {"input_ids", "attention_mask", "use_cache"}


def _unpackable(model_kwargs: Mapping[str, Any], args: tuple, labels: Optional[torch.Tensor],
                shift_labels: Optional[torch.Tensor]) -> Optional[str]:
    """Why a call cannot be packed before looking at its rows, or None."""
    if args:
        return "the inputs are passed positionally"
    if shift_labels is not None or labels is None:
        return "the labels are pre-shifted (shift_labels)"
    # peft's PeftModelForCausalLM passes inputs_embeds, output_attentions, ... as None: those are not inputs
    extra = sorted(key for key, value in model_kwargs.items() if key not in _MODEL_KEYS and value is not None)
    if extra:
        return f"the call passes {extra} (position ids of padding-free batches, embeddings or caches)"
    ids = model_kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or labels.shape != ids.shape:
        return "input_ids is not a [rows, T] tensor matching the labels"
    if ids.shape[0] % 2:
        return "the call has an odd number of rows (pairs are B chosen rows, then B rejected)"
    return None


def plan_packing(causal_lm: nn.Module, model_kwargs: Mapping[str, Any], labels: Optional[torch.Tensor], *,
                 request: Optional[bool] = None, args: tuple = (),
                 shift_labels: Optional[torch.Tensor] = None) -> Optional[PackedPairs]:
    """The packed rows for this call, or None to run it unshared: the one prefix-sharing policy.

    request: None follows the model's patch (``patch(model, prefix_sharing=True)``), False never packs,
    True packs and requires that patch (ValueError otherwise). When sharing is on, rows i and B + i are
    packed as one row; a call packing cannot reproduce exactly (left padding, odd rows, position ids,
    pre-shifted labels, rows longer than a sliding window, a length-dependent rotary scaling that the
    packed length would switch, or a model whose attention caps its scores: Gemma 2) runs unshared with
    a warning: its results are the same, only the saving is lost.
    """
    enabled = state.prefix_sharing_enabled(causal_lm)
    if request and not enabled:
        raise ValueError("prefix_sharing=True needs a model patched with dpo_fast.patch(model, prefix_sharing=True)")
    if not (enabled if request is None else request):
        return None
    reason = attention_problem(causal_lm) or _unpackable(model_kwargs, args, labels, shift_labels)
    packed = None
    if reason is None:
        ids = model_kwargs["input_ids"]
        mask = model_kwargs.get("attention_mask")
        try:
            packed = pack_pairs(ids, torch.ones_like(ids) if mask is None else mask,
                                labels.to(ids.device) != IGNORE_INDEX)
        except ValueError as exc:
            reason = str(exc)
        else:
            reason = window_problem(causal_lm, packed) or rope_problem(causal_lm, packed)
    if reason is not None:
        warnings.warn(f"prefix sharing: this call runs unshared (same results, the prompt is computed twice): {reason}",
                      stacklevel=3)
        return None
    return packed


# ------------------------------------------------------------------------------------------ backbone
def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack (e.g. LlamaModel) under a causal LM, looked up per call (peft may wrap it)."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


def backbone_hidden(causal_lm: nn.Module, *args: Any, packed: Optional[PackedPairs] = None,
                    **model_kwargs: Any) -> torch.Tensor:
    """Last hidden states [R, T, d] of the decoder stack, on the lm_head's device.

    With `packed` the stack runs on the packed rows (its attention modules must be patched with
    prefix_sharing=True) and the result is gathered back into the unshared [2B, T] layout.
    """
    head = causal_lm.get_output_embeddings()
    if packed is None:
        model_kwargs["use_cache"] = False
        hidden = backbone_of(causal_lm)(*args, **model_kwargs).last_hidden_state
        return hidden.to(head.weight.device)
    hidden = backbone_of(causal_lm)(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                    position_ids=packed.position_ids, use_cache=False,
                                    **{PREFIX_KWARG: packed.attention}).last_hidden_state
    d = hidden.shape[-1]
    flat = hidden.reshape(-1, d).index_select(0, packed.unshared_index.to(hidden.device))
    return flat.view(packed.rows, packed.length, d).to(head.weight.device)


def run_fused_head(causal_lm: nn.Module, *args: Any, labels: Optional[torch.Tensor],
                   shift_labels: Optional[torch.Tensor] = None, outputs: Sequence[str] = ("log_probs",),
                   prefix_sharing: Optional[bool] = None, **model_kwargs: Any) -> Dict[str, torch.Tensor]:
    """Run the backbone of `causal_lm` (packed when `plan_packing` says so) and score its labels.

    `labels` are unshifted (as for ``model(..., labels=...)``): the outputs have shape [B, T-1]. With
    `shift_labels` (already aligned with the positions) they have shape [B, T]. The head is the model's
    output embedding (the input embedding itself when they are tied), and its logits are capped as the
    model's own forward caps them (`dpo_fast.families.final_logit_softcap`).
    """
    if shift_labels is None and labels is None:
        raise ValueError("labels: fused_lm_head=True needs labels (or shift_labels)")
    packed = plan_packing(causal_lm, model_kwargs, labels, request=prefix_sharing, args=args,
                          shift_labels=shift_labels)
    hidden = backbone_hidden(causal_lm, *args, packed=packed, **({} if packed is not None else model_kwargs))
    if shift_labels is None:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match the input's {tuple(hidden.shape[:2])}")
        hidden, aligned = hidden[:, :-1], labels[:, 1:]
    else:
        if shift_labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"shift_labels: shape {tuple(shift_labels.shape)} does not match the input's {tuple(hidden.shape[:2])}")
        aligned = shift_labels
    head = causal_lm.get_output_embeddings()
    return head_outputs(hidden, head.weight, head.bias, aligned, outputs, softcap=final_logit_softcap(causal_lm))


# ------------------------------------------------------------------------------------------ any model
def token_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                  outputs: Sequence[str] = ("log_probs",), prefix_sharing: Optional[bool] = None
                  ) -> Dict[str, torch.Tensor]:
    """Per-token outputs [R, T-1] of the next-token `labels` (unshifted, -100 = not scored) under `model`.

    A patched model is called through its own forward with TRL's fused-head contract, so that whatever
    wraps it (DDP, FSDP, accelerate) sees an ordinary call; an unpatched supported model runs the same
    fused head on its backbone (a wrapped one must be patched).
    """
    outputs = validate_outputs(outputs)
    if state.head_patched(model):
        # through `model` itself, wrapper included: DDP prepares its gradient all-reduce, FSDP gathers
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                    use_cache=False, **{REQUEST_KWARG: FusedRequest(outputs, prefix_sharing)})
        return {key: getattr(out, key) for key in (*outputs, "label_mask")}
    if state.unwrap_parallel(model) is not model or state.is_wrapped_for_data_parallel(model):
        raise ValueError(f"model: a model wrapped by {type(model).__name__} must be patched with dpo_fast.patch(model) "
                         "(before or after wrapping) so that its forward runs through the wrapper, which "
                         "synchronises gradients and gathers sharded parameters")
    return run_fused_head(state.record_holder(model), input_ids=input_ids, attention_mask=attention_mask,
                          labels=labels, outputs=outputs, prefix_sharing=prefix_sharing)


def token_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [R, T-1] of the next-token `labels` (unshifted, -100 = not scored)."""
    return token_outputs(model, input_ids, attention_mask, labels)["log_probs"]


# ------------------------------------------------------------------------------------------ batches
def preference_tensors(batch: Mapping[str, Any], vocab_size: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check a preference batch (TRL's collator layout) and return (input_ids, attention_mask, completion_mask).

    input_ids [2B, T] (B chosen rows, then B rejected), attention_mask (default all ones) and
    completion_mask of the same shape, optional ref_chosen_logps / ref_rejected_logps [B] (both or
    neither). With `vocab_size`, token ids outside [0, vocab_size) are an error naming the value.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping (TRL's preference-collator output), got {type(batch).__name__}")
    for key in ("input_ids", "completion_mask"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; it needs input_ids, attention_mask, completion_mask")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"batch['input_ids'] must be an integer tensor [2B, T], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    rows, length = input_ids.shape
    if rows == 0 or rows % 2:
        raise ValueError(f"batch['input_ids'] must have an even, non-zero number of rows (B chosen then B rejected), "
                         f"got {rows}")
    if length < 2:
        raise ValueError(f"batch['input_ids'] needs at least 2 columns to score a next token, got {length}")
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    completion_mask = batch["completion_mask"]
    for key, val in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != (rows, length):
            raise ValueError(f"batch[{key!r}] must have input_ids' shape {(rows, length)}, got "
                             f"{tuple(getattr(val, 'shape', ()))}")
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        val = batch.get(key)
        if val is not None and (not isinstance(val, torch.Tensor) or tuple(val.shape) != (rows // 2,)):
            raise ValueError(f"batch[{key!r}] must have shape ({rows // 2},), got {tuple(getattr(val, 'shape', ()))}")
    if (batch.get("ref_chosen_logps") is None) != (batch.get("ref_rejected_logps") is None):
        raise ValueError("batch must carry both ref_chosen_logps and ref_rejected_logps, or neither")
    if vocab_size is not None:
        low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"batch['input_ids'] holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): "
                             "was the batch tokenized with another tokenizer?")
    return input_ids, attention_mask, completion_mask


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Unshifted next-token labels of a preference batch: the token ids on completion tokens, -100 elsewhere."""
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)


def sequence_logps(model: nn.Module, batch: Mapping[str, Any], *, average_log_prob: bool = False,
                   ld_alpha: Optional[float] = None, prefix_sharing: Optional[bool] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs [B], [B] of a preference batch under `model`.

    The reduction `compute_dpo_loss` uses (completion tokens only, next-token alignment), for callers
    that need the numbers alone: precomputing reference log-probs, evaluation. `prefix_sharing` as in
    `plan_packing`.
    """
    input_ids, attention_mask, completion_mask = preference_tensors(batch)
    per_token = token_log_probs_for(model, input_ids, attention_mask, completion_mask, prefix_sharing)
    chosen, rejected, _, _ = reduce_sequence_logps(per_token, completion_mask[:, 1:].to(per_token.device) != 0,
                                                   average=average_log_prob, ld_alpha=ld_alpha)
    return chosen, rejected


def token_log_probs_for(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, prefix_sharing: Optional[bool] = None) -> torch.Tensor:
    """Per-token log-probs [2B, T-1] of a preference batch's completion tokens (0 elsewhere)."""
    labels = completion_labels(input_ids, completion_mask)
    return token_outputs(model, input_ids, attention_mask, labels, prefix_sharing=prefix_sharing)["log_probs"]
