"""The `head` level: the LM head alone, forward + backward, every method that is importable.

Two kinds of case:
  * ``logps``: hidden [N, d], weight [V, d], labels [N] (all scored); the loss is the sum of the
    per-token log-probs (what `dpo_fast.linear_log_probs` computes): benchmarks/head.py.
  * ``dpo``: hidden [2B, T, d] with the B chosen rows first, labels -100 on the prompt quarter of
    each row, a sigmoid DPO loss with precomputed reference log-probs: benchmarks/dpo_head.py.
Each runs with the weight frozen (the QLoRA case) and trainable.

A method is a `HeadMethod`: `unavailable(device)` says why it cannot run (import failed, needs
CUDA), `build(kind, inputs)` returns the step to time. Every method reads the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.common import ERROR, OOM, Cell, is_oom, measure, skipped
from benchmarks.common import needs as _needs
from benchmarks.models import get_model

KINDS = ("logps", "dpo")
MODES = ("frozen", "trainable")
BETA = 0.1
IGNORE = -100


@dataclass
class HeadInputs:
    """The tensors every method of one case reads. For kind "dpo", hidden/labels are [2B, T, ...]."""

    kind: str
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None
    ref_hidden: Optional[torch.Tensor] = None

    @property
    def scored_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def make_inputs(kind: str, d: int, vocab: int, *, tokens: int = 0, pairs: int = 0, seq_len: int = 0,
                trainable: bool = False, dtype: torch.dtype = torch.float32,
                device: torch.device = torch.device("cpu")) -> HeadInputs:
    """Random (never zero) inputs with realistic logit spread (~1 std)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    weight = (torch.randn(vocab, d, device=device) * d ** -0.5).to(dtype).requires_grad_(trainable)
    if kind == "logps":
        if tokens < 1:
            raise ValueError("tokens must be >= 1 for kind 'logps'")
        hidden = torch.randn(tokens, d, device=device).to(dtype).requires_grad_(True)
        labels = torch.randint(0, vocab, (tokens,), device=device)
        return HeadInputs(kind, hidden, weight, labels)
    if pairs < 1 or seq_len < 2:
        raise ValueError("pairs >= 1 and seq_len >= 2 are needed for kind 'dpo'")
    hidden = torch.randn(2 * pairs, seq_len, d, device=device).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device=device)
    labels[:, : seq_len // 4] = IGNORE  # the prompt is not scored
    ref = torch.randn(2 * pairs, device=device) - 5.0 * seq_len
    ref_hidden = torch.randn(2 * pairs, seq_len, d, device=device).to(dtype)
    return HeadInputs(kind, hidden, weight, labels, ref[:pairs], ref[pairs:], ref_hidden)


def _sequence_sums(token_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.where(labels != IGNORE, token_logps.float(), 0.0).sum(dim=-1)


def _dpo_from_sums(seq: torch.Tensor, inp: HeadInputs) -> torch.Tensor:
    chosen, rejected = seq.chunk(2)
    margin = (chosen - inp.ref_chosen) - (rejected - inp.ref_rejected)
    return -F.logsigmoid(BETA * margin).mean()


def _finish(loss: torch.Tensor, inp: HeadInputs) -> None:
    loss.backward()
    inp.hidden.grad = None
    inp.weight.grad = None


def _per_token_step(token_logps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """Build a step from a function (hidden2d, weight, labels1d) -> per-token log-probs (0 where ignored)."""

    def build(kind: str, inp: HeadInputs) -> Callable[[], None]:
        def step() -> None:
            d = inp.hidden.shape[-1]
            logps = token_logps_fn(inp.hidden.reshape(-1, d), inp.weight, inp.labels.reshape(-1))
            if kind == "logps":
                loss = logps.float().sum()
            else:
                loss = _dpo_from_sums(_sequence_sums(logps.view(inp.labels.shape), inp.labels), inp)
            _finish(loss, inp)

        return step

    return build


# ---------------------------------------------------------------------------------- methods


def _naive_logps(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = h @ w.t()  # [N, V] materialized, as an unpatched model does
    logp = logits.float().log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(y == IGNORE, 0.0)


def _trl_logps(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from trl.kernels import ChunkedLogProbFunction

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    mask = y != IGNORE  # TRL compacts -100 labels before the head, as its fused forward does
    # positional: hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
    out = ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0, chunk, None, 1.0, ())
    return torch.zeros(y.shape, device=h.device, dtype=out[0].dtype).masked_scatter(mask, out[0])


def _cce_logps(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="none")


def _unsloth_logps(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from unsloth.kernels.cross_entropy_loss import Fast_CrossEntropyLoss

    logits = h @ w.t()  # Unsloth's DPO path materializes the logits, then its fused CE kernel
    return -Fast_CrossEntropyLoss.apply(logits, y.masked_fill(y == IGNORE, -100)).view(y.shape)


def _dpo_fast_logps(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from dpo_fast.ops.linear_log_probs import linear_log_probs

    return linear_log_probs(h, w, y, ignore_index=IGNORE)


def _liger_build(use_ref_model: bool):
    def build(kind: str, inp: HeadInputs) -> Callable[[], None]:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compute_nll_loss=False,
                                          use_ref_model=use_ref_model)
        ref_kw = dict(ref_input=inp.ref_hidden, ref_weight=inp.weight.detach()) if use_ref_model else {}

        def step() -> None:
            out = loss_fn(inp.weight, inp.hidden, inp.labels, **ref_kw)
            _finish(out[0] if isinstance(out, (tuple, list)) else out, inp)

        return step

    return build


def _dpo_fast_fused_build(ref_on_the_fly: bool):
    def build(kind: str, inp: HeadInputs) -> Callable[[], None]:
        from dpo_fast.fused_dpo import fused_linear_dpo_loss

        if ref_on_the_fly:
            ref_kw = dict(ref_hidden=inp.ref_hidden, ref_weight=inp.weight.detach())
        else:
            ref_kw = dict(ref_chosen_logps=inp.ref_chosen, ref_rejected_logps=inp.ref_rejected)

        def step() -> None:
            loss, _ = fused_linear_dpo_loss(inp.hidden, inp.weight, inp.labels, beta=BETA, **ref_kw)
            _finish(loss, inp)

        return step

    return build


@dataclass
class HeadMethod:
    name: str
    kinds: Sequence[str]
    unavailable: Callable[[torch.device], Optional[str]]
    build: Callable[[str, HeadInputs], Callable[[], None]]
    description: str = ""
    default: bool = True  # run when --methods is not given


#: Registry keyed by (kind, name), in table order; "dpo_fast" is the reference of the ratios
#: (kind "dpo": fused_linear_dpo_loss). Two entries share that name, one per kind.
HEAD_REGISTRY: Dict[tuple, HeadMethod] = {}


def register(method: HeadMethod) -> None:
    """Add (or replace) a method for each kind it serves; tests use this to inject failing methods."""
    for kind in method.kinds:
        HEAD_REGISTRY[(kind, method.name)] = method


for _m in (
    HeadMethod("naive", KINDS, lambda dev: None, _per_token_step(_naive_logps),
               "materialized logits, fp32 log_softmax, gather"),
    HeadMethod("trl", KINDS, _needs("trl.kernels"), _per_token_step(_trl_logps),
               "TRL 1.x trl.kernels.ChunkedLogProbFunction (DPOTrainer's fused head), compacted tokens"),
    HeadMethod("liger", ("dpo",), _needs("liger_kernel.chunked_loss"), _liger_build(False),
               "Liger LigerFusedLinearDPOLoss, reference log-probs taken as 0 (the cost of precomputed ones)"),
    HeadMethod("cce", KINDS, _needs("cut_cross_entropy", cuda=True), _per_token_step(_cce_logps),
               "Cut Cross-Entropy linear_cross_entropy(reduction='none'), summed per sequence"),
    HeadMethod("unsloth", KINDS, _needs("unsloth.kernels.cross_entropy_loss", cuda=True),
               _per_token_step(_unsloth_logps), "materialized logits + Unsloth's fused CE kernel; opt-in "
               "(--methods unsloth ...) because importing unsloth patches transformers for the whole process",
               default=False),
    HeadMethod("dpo_fast", ("logps",), _needs("dpo_fast.ops.linear_log_probs"), _per_token_step(_dpo_fast_logps),
               "dpo_fast.linear_log_probs"),
    HeadMethod("dpo_fast", ("dpo",), _needs("dpo_fast.fused_dpo"), _dpo_fast_fused_build(False),
               "dpo_fast.fused_linear_dpo_loss, precomputed reference log-probs"),
    HeadMethod("liger_ref", ("dpo",), _needs("liger_kernel.chunked_loss"), _liger_build(True),
               "Liger LigerFusedLinearDPOLoss with the reference head computed on the fly"),
    HeadMethod("dpo_fast_ref", ("dpo",), _needs("dpo_fast.fused_dpo"), _dpo_fast_fused_build(True),
               "dpo_fast.fused_linear_dpo_loss with the reference head computed on the fly"),
):
    register(_m)


def method_names() -> List[str]:
    return list(dict.fromkeys(name for _, name in HEAD_REGISTRY))


# ---------------------------------------------------------------------------------- runner


def head_cases(models: Sequence[str], kinds: Sequence[str], modes: Sequence[str], tokens: Sequence[int],
               pairs_seq: Sequence[tuple]) -> List[Dict[str, Any]]:
    """The grid of cases: logps over `tokens`, dpo over (pairs, seq_len)."""
    cases = []
    for model in models:
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"head kind must be one of {KINDS}, got {kind!r}")
            for mode in modes:
                if mode not in MODES:
                    raise ValueError(f"head mode must be one of {MODES}, got {mode!r}")
                sizes = [dict(tokens=n) for n in tokens] if kind == "logps" else \
                    [dict(pairs=p, seq_len=t) for p, t in pairs_seq]
                for size in sizes:
                    cases.append(dict(model=model, kind=kind, mode=mode, **size))
    return cases


def case_label(case: Dict[str, Any]) -> str:
    size = f"N={case['tokens']}" if case["kind"] == "logps" else f"{case['pairs']}x{case['seq_len']}"
    return f"{case['model']} {case['kind']} {case['mode']} {size}"


def run_head(cases: Sequence[Dict[str, Any]], device: torch.device, dtype: torch.dtype, *,
             methods: Optional[Sequence[str]] = None, warmup: int = 3, repeats: int = 10,
             log: Callable[[str], None] = print) -> List[Cell]:
    """Measure every (case, method); unavailable methods give "skipped" cells, OOMs "OOM" cells."""
    cells: List[Cell] = []
    for case in cases:
        shape = get_model(case["model"])
        label = case_label(case)
        inputs: Optional[HeadInputs] = None
        for (kind, name), method in list(HEAD_REGISTRY.items()):
            if kind != case["kind"] or (name not in methods if methods else not method.default):
                continue
            tokens = case.get("tokens") or 2 * case["pairs"] * (case["seq_len"] - case["seq_len"] // 4)
            reason = method.unavailable(device)
            if reason:
                cells.append(skipped("head", label, name, tokens, reason))
                continue
            if inputs is None:
                try:
                    inputs = make_inputs(case["kind"], shape.hidden_size, shape.vocab_size,
                                         tokens=case.get("tokens", 0), pairs=case.get("pairs", 0),
                                         seq_len=case.get("seq_len", 0), trainable=case["mode"] == "trainable",
                                         dtype=dtype, device=device)
                except Exception as exc:
                    cells.append(Cell("head", label, name, tokens, status=OOM if is_oom(exc) else ERROR,
                                      note=f"inputs: {type(exc).__name__}"))
                    continue
            inp = inputs
            params = dict(case, d=shape.hidden_size, vocab=shape.vocab_size, dtype=str(dtype).replace("torch.", ""))
            cell = measure("head", label, name, inp.scored_tokens, lambda: method.build(case["kind"], inp), device,
                           warmup=warmup, repeats=repeats, params=params)
            log(f"  head {label:48s} {name:14s} {cell.status:7s} "
                f"{'' if cell.median_ms is None else f'{cell.median_ms:9.2f} ms {cell.peak_extra_mb:9.1f} MB'}"
                f" {cell.note}")
            cells.append(cell)
        del inputs
    return cells
