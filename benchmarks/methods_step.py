"""The `step` level: one full QLoRA DPO training step of a random-weight model of a named shape.

A step = policy forward on [chosen; rejected] + reference forward (adapters disabled, no grad) +
sigmoid DPO loss + backward + AdamW step on the LoRA weights. The model is built once per shape and
shared by all methods; each method installs its loss path, is measured, and is removed again.

Model: transformers Llama/Qwen2 built from `benchmarks.models` dimensions with random weights;
the decoder's linear layers are bitsandbytes 4-bit NF4 when CUDA is present (QLoRA), plain
otherwise; LoRA r=16 on all attention/MLP projections (peft); gradient checkpointing on; lm_head
frozen and unquantized, as in a QLoRA DPO run.

Methods: `METHODS` below, one row per name: the loss path (unpatched baselines: naive, TRL's fused
head, Liger, Cut Cross-Entropy; or dpo_fast.patch + compute_dpo_loss), the `BodyOptions` patch applies,
and whether the reference log-probs are precomputed or gradient checkpointing is off. A method whose
packages are not importable is reported as skipped. What patch really changed (`patch_report`) is
recorded with each cell, and a body switch that changed no module fails the cell.

`BODY_STEP_METHODS` (benchmarks/step.py's default) compares the unpatched baselines with the fused
head alone, each body group on its own, patch()'s defaults and everything on; `vs_baseline` gives
each method's time and memory as a fraction of the unpatched TRL step.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (Cell, ERROR, OK, OOM, fmt_cap, free_memory, is_oom, measure, memory_cap,
                               skipped)
from benchmarks.common import needs as _needs
from benchmarks.models import ModelShape, get_model
from dpo_fast.forward import backbone_hidden
from dpo_fast.patching import BodyOptions, patch, patch_report, unpatch

BETA = 0.1
IGNORE = -100


def bnb_has_cuda() -> bool:
    """True when bitsandbytes is importable and a CUDA device is there for its 4-bit kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("bitsandbytes")
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------- model


def _has_4bit(model: nn.Module) -> bool:
    """Does the model hold bitsandbytes 4-bit layers (build_model(quantize=True))?"""
    from dpo_fast.ops.qlora_linear import is_4bit_base

    return any(is_4bit_base(m) for m in model.modules())


def _quantize_linears(root: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Swap every nn.Linear under `root` for a bitsandbytes NF4 Linear4bit on `device`."""
    import bitsandbytes as bnb

    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            q.to(device)  # quantizes the weight
            setattr(module, child_name, q)
            del child


def _decoder_layer_class(model: nn.Module) -> type:
    modeling = importlib.import_module(type(model).__module__)
    prefix = type(model).__name__.replace("ForCausalLM", "")
    return getattr(modeling, f"{prefix}DecoderLayer")


def build_model(shape: ModelShape, device: torch.device, dtype: torch.dtype, *, quantize: Optional[bool] = None,
                lora_r: int = 16, gradient_checkpointing: bool = True) -> nn.Module:
    """A random-weight peft LoRA model of `shape`; quantize=None means 4-bit NF4 when bitsandbytes has CUDA.

    quantize=True also works on CPU through bitsandbytes' CPU backend (slow; the tests use it on a tiny
    model so the QLoRA path cannot rot).

    The decoder is built one layer at a time and each layer is quantized before the next exists, as a
    QLoRA load does: the full-precision body is never on the device at once, so (on a GPU) the caching
    allocator is not left holding the freed bf16 segments around the 4-bit weights, which would count
    against a memory cap (set_per_process_memory_fraction limits reserved memory, not allocated).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantize = bnb_has_cuda() if quantize is None else quantize
    config = shape.config()
    config._attn_implementation = shape.attention
    n_layers = config.num_hidden_layers
    config.num_hidden_layers = 0
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.num_hidden_layers = n_layers
    layer_class = _decoder_layer_class(model)
    for index in range(n_layers):
        with torch.device(device):
            layer = layer_class(model.config, index).to(dtype)
        layer.apply(model._init_weights)  # the model's own init (normal, std=initializer_range)
        if quantize:
            _quantize_linears(layer, device, dtype)
        model.model.layers.append(layer)
        del layer
    if len(model.model.layers) != n_layers:
        raise RuntimeError(f"built {len(model.model.layers)} decoder layers, expected {n_layers}")
    if quantize:
        model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its QLoRA LoRA class
    free_memory(device)
    model.requires_grad_(False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=shape.lora_targets,
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, lora)
    model.train()
    return model


#: The prompt's share of each row in the benchmark batches (prefix sharing saves half of it).
PROMPT_FRACTION = 0.25


def make_batch(vocab: int, pairs: int, seq_len: int, device: torch.device, *,
               prompt_fraction: float = PROMPT_FRACTION) -> Dict[str, torch.Tensor]:
    """TRL preference-collator layout: [chosen; rejected] rows sharing a prompt, completion_mask 1 after it."""
    if pairs < 1 or seq_len < 4:
        raise ValueError(f"pairs must be >= 1 and seq_len >= 4, got {pairs}, {seq_len}")
    if not 0.0 <= prompt_fraction < 1.0:
        raise ValueError(f"prompt_fraction must be in [0, 1), got {prompt_fraction}")
    prompt = max(1, int(seq_len * prompt_fraction))
    completion = [seq_len - prompt] * pairs
    return make_pair_batch(vocab, [prompt] * pairs, completion, completion, seq_len, device)


def make_pair_batch(vocab: int, prompts: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
                    length: int, device: Union[str, torch.device]) -> Dict[str, torch.Tensor]:
    """Right-padded TRL layout [chosen; rejected] of random tokens: pair i shares prompts[i] tokens, then has
    chosen[i] and rejected[i] completion tokens (their first tokens differ when both exist)."""
    b = len(prompts)
    ids = torch.randint(0, vocab, (2 * b, length), device=device)
    am, cm = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if p + max(c, r) > length:
            raise ValueError(f"pair {i}: prompt {p} + completion {max(c, r)} exceeds length {length}")
        ids[b + i, :p] = ids[i, :p]
        if c and r:
            ids[b + i, p] = (ids[i, p] + 1) % vocab
        am[i, :p + c], am[b + i, :p + r] = 1, 1
        cm[i, p:p + c], cm[b + i, p:p + r] = 1, 1
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


# ---------------------------------------------------------------------------------- loss paths


def _dpo_loss(policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    pc, pr = policy.float().chunk(2)
    rc, rr = ref.float().chunk(2)
    return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()


def _labels(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)


def _naive_seq_logps(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = _labels(batch)[:, 1:]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE, logp, 0.0).sum(-1)


def _trl_seq_logps(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=_labels(batch),
                fused_lm_head=True, use_cache=False)
    return out.log_probs.float().sum(-1)


def _backbone_hidden(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states of the peft model's decoder stack (the input of the losses that take the head)."""
    return backbone_hidden(model.get_base_model(), input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _cce_seq_logps(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    hidden = _backbone_hidden(model, batch)[:, :-1]
    labels = _labels(batch)[:, 1:]
    weight = model.get_base_model().get_output_embeddings().weight
    nll = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none")
    return -nll.float().sum(-1)


def _two_pass_step(seq_logps: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]):
    """A DPO step from a per-sequence log-prob function: policy with grad, reference with adapters off."""

    def make(model: nn.Module, batch: Dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            policy = seq_logps(model, batch)
            with torch.no_grad(), model.disable_adapter():
                ref = seq_logps(model, batch)
            _dpo_loss(policy, ref).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return make


def _liger_make(model: nn.Module, batch: Dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compute_nll_loss=False, use_ref_model=True)
    weight = model.get_base_model().get_output_embeddings().weight
    labels = _labels(batch)[:, 1:].contiguous()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        hidden = _backbone_hidden(model, batch)[:, :-1]
        with torch.no_grad(), model.disable_adapter():
            ref_hidden = _backbone_hidden(model, batch)[:, :-1]
        out = loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=weight)
        (out[0] if isinstance(out, (tuple, list)) else out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _dpo_fast_make(precomputed_ref: bool):
    def make(model: nn.Module, batch: Dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        from dpo_fast.dpo import compute_dpo_loss

        b = dict(batch)
        if precomputed_ref:
            pairs = batch["input_ids"].shape[0] // 2
            n = int(batch["completion_mask"][:, 1:].sum()) // (2 * pairs)
            ref = torch.randn(2 * pairs, device=batch["input_ids"].device) - 5.0 * n
            b["ref_chosen_logps"], b["ref_rejected_logps"] = ref[:pairs], ref[pairs:]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = compute_dpo_loss(model, b, beta=BETA)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return make


@contextlib.contextmanager
def _no_patch(model: nn.Module) -> Iterator[None]:
    yield


@contextlib.contextmanager
def _trl_patch(model: nn.Module) -> Iterator[None]:
    from trl.trainer.utils import add_fused_lm_head

    causal_lm = model.get_base_model()
    had = "forward" in causal_lm.__dict__
    previous = causal_lm.__dict__.get("forward")
    # DPOTrainer's default per-token outputs (its logged metrics), as in TRL 1.x
    add_fused_lm_head(causal_lm, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    try:
        yield
    finally:
        if had:
            causal_lm.forward = previous
        else:
            del causal_lm.forward


#: Switches that act only together with another one: in a one-group method they follow that switch.
_PART_OF = {"nf4_dequant": "qlora_linear", "recompute_tail_skip": "qlora_linear"}


def only(switch: str) -> BodyOptions:
    """The body options of one group on its own: `switch` (and what is part of it) on, everything else off."""
    return BodyOptions(**{n: n == switch or _PART_OF.get(n) == switch for n in BodyOptions.names()})


def _dpo_fast_patch(body: Optional[BodyOptions]):
    """Context manager factory: dpo_fast.patch with `body` (None: the fused head only) for the block.

    Yields what `patch_report` says was applied: {"body": the options in effect (False: head only),
    "patched_modules": modules changed per switch}. A switch that is on but changed no module raises:
    the cell would otherwise silently measure the unpatched body under that name.
    """
    @contextlib.contextmanager
    def ctx(model: nn.Module) -> Iterator[Dict[str, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch(model, body=body is not None, **(body.as_dict() if body is not None else {}))
        try:
            report = patch_report(model)
            if report is None or report.body != body:
                raise RuntimeError(f"dpo_fast.patch applied {report and report.body}, asked for {body}")
            if body is None:
                yield {"body": False}
                return
            wanted = body.as_dict()
            for part, owner in _PART_OF.items():  # nothing to count without the switch they are part of
                wanted[part] = wanted[part] and wanted[owner]
            wanted["nf4_dequant"] = wanted["nf4_dequant"] and _has_4bit(model)
            empty = [k for k, on in wanted.items() if on and not report.counts.get(k)]
            if empty:
                raise RuntimeError(f"dpo_fast.patch changed no module for {empty} (counts {report.counts})")
            yield {"body": report.body.as_dict(), "patched_modules": dict(report.counts)}
        finally:
            unpatch(model)

    return ctx


def _no_checkpointing(install: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """Context manager factory: `install`'s patch, with every layer's gradient checkpointing off for the block.

    What no recompute at all would buy (an upper bound for partial recompute): the layers keep their
    activations, so this needs the memory of an uncheckpointed step.
    """
    @contextlib.contextmanager
    def ctx(model: nn.Module) -> Iterator[Any]:
        with install(model) as info:
            layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
            for m in layers:
                m.gradient_checkpointing = False
            try:
                yield info
            finally:
                for m in layers:
                    m.gradient_checkpointing = True

    return ctx


# ---------------------------------------------------------------------------------- the methods, as data


@dataclass(frozen=True)
class MethodSpec:
    """One named way to run the step.

    loss: the loss path: "naive", "trl", "liger", "cce" (unpatched baselines, see `_LOSS_PATHS`) or
        "dpo_fast" (dpo_fast.patch + compute_dpo_loss).
    body: with "dpo_fast", the body options patch applies; None patches the fused head only (body=False).
    precomputed_ref: the batch carries reference log-probs (no reference forward).
    checkpointing: False turns every layer's gradient checkpointing off for the step (no recompute).
    """

    description: str
    loss: str
    body: Optional[BodyOptions] = None
    precomputed_ref: bool = False
    checkpointing: bool = True


#: One body group per method: (method name, patch() switch). Each runs with the fused head and only it.
BODY_GROUPS = (("dpo_fast_rms_norm", "rms_norm"), ("dpo_fast_rope", "rope"), ("dpo_fast_swiglu", "swiglu"),
               ("dpo_fast_qlora_linear", "qlora_linear"), ("dpo_fast_offload", "offload_checkpointing"),
               ("dpo_fast_prefix_sharing", "prefix_sharing"))
#: Every switch on: the body kernels, offloaded checkpointing and prefix sharing.
ALL_ON = BodyOptions(**{n: True for n in BodyOptions.names()})

METHODS: Dict[str, MethodSpec] = {
    "naive": MethodSpec("unpatched transformers+peft: materialized logits, fp32 log_softmax, gather", "naive"),
    "trl": MethodSpec("TRL 1.x DPOTrainer's loss path (add_fused_lm_head, fused_lm_head=True)", "trl"),
    "liger": MethodSpec("Liger's LigerFusedLinearDPOLoss on backbone hidden states, reference head on the fly",
                        "liger"),
    "cce": MethodSpec("Cut Cross-Entropy per-token NLL on backbone hidden states, summed per sequence", "cce"),
    "dpo_fast": MethodSpec("dpo_fast.patch(model) (head + body kernels, patch()'s defaults) + compute_dpo_loss",
                           "dpo_fast", BodyOptions()),
    "dpo_fast_head": MethodSpec("dpo_fast.patch(model, body=False): the fused head only", "dpo_fast"),
    "dpo_fast_precomputed_ref": MethodSpec("dpo_fast with precomputed reference log-probs (no reference forward)",
                                           "dpo_fast", BodyOptions(), precomputed_ref=True),
    **{name: MethodSpec(f"the fused head + the {switch} body group only (what it buys on its own)", "dpo_fast",
                        only(switch)) for name, switch in BODY_GROUPS},
    "dpo_fast_all": MethodSpec("every switch on: head, body kernels, offloaded checkpointing, prefix sharing",
                               "dpo_fast", ALL_ON),
    "dpo_fast_no_checkpointing": MethodSpec(
        "every kernel and prefix sharing, gradient checkpointing off: what skipping the recompute would buy, "
        "at the memory of keeping every layer's activations", "dpo_fast",
        replace(ALL_ON, offload_checkpointing=False), checkpointing=False),
    "dpo_fast_all_no_tail_skip": MethodSpec(
        "dpo_fast_all with the checkpoint recompute running down_proj and o_proj in full (what the skips buy)",
        "dpo_fast", replace(ALL_ON, recompute_tail_skip=False)),
    "dpo_fast_all_unshared": MethodSpec("dpo_fast_all without prefix sharing", "dpo_fast",
                                        replace(ALL_ON, prefix_sharing=False)),
}

#: The unpatched loss paths: (unavailable, install, make) each.
_LOSS_PATHS = {
    "naive": (lambda dev: None, _no_patch, _two_pass_step(_naive_seq_logps)),
    "trl": (_needs("trl.trainer.utils"), _trl_patch, _two_pass_step(_trl_seq_logps)),
    "liger": (_needs("liger_kernel.chunked_loss"), _no_patch, _liger_make),
    "cce": (_needs("cut_cross_entropy", cuda=True), _no_patch, _two_pass_step(_cce_seq_logps)),
}


@dataclass
class StepMethod:
    name: str
    unavailable: Callable[[torch.device], Optional[str]]
    install: Callable[[nn.Module], Any]  # context manager factory: patches the model for the block
    make: Callable[[nn.Module, Dict[str, torch.Tensor], torch.optim.Optimizer], Callable[[], None]]
    description: str = ""
    options: Dict[str, Any] = field(default_factory=dict)  # recorded with each cell


def step_method(name: str, spec: MethodSpec) -> StepMethod:
    """The runnable method of one table row."""
    if spec.loss == "dpo_fast":
        unavailable, install, make = (_needs("dpo_fast.dpo", "dpo_fast.patching"), _dpo_fast_patch(spec.body),
                                      _dpo_fast_make(spec.precomputed_ref))
    elif spec.body is None and not spec.precomputed_ref:
        unavailable, install, make = _LOSS_PATHS[spec.loss]
    else:
        raise ValueError(f"{name}: only the dpo_fast loss path takes body options or a precomputed reference")
    if not spec.checkpointing:
        install = _no_checkpointing(install)
    options = {"ref": "precomputed" if spec.precomputed_ref else "on the fly",
               "gradient_checkpointing": spec.checkpointing}
    return StepMethod(name, unavailable, install, make, spec.description, options)


STEP_REGISTRY: Dict[str, StepMethod] = {}


def register(method: StepMethod) -> None:
    """Add or replace a step method (tests inject failing ones)."""
    STEP_REGISTRY[method.name] = method


for _name, _spec in METHODS.items():
    register(step_method(_name, _spec))

#: What --quick runs at the step level (the options rows are opt-in through --methods).
QUICK_STEP_METHODS = ("naive", "trl", "liger", "cce", "dpo_fast")
#: The step comparison (benchmarks/step.py's default): unpatched baselines, the head alone, each body group on
#: its own (with the head), patch()'s defaults, everything.
BODY_STEP_METHODS = ("naive", "trl", "dpo_fast_head") + tuple(n for n, _ in BODY_GROUPS) + ("dpo_fast", "dpo_fast_all")
#: The unpatched baseline the body comparison divides by, in order of preference.
BASELINES = ("trl", "naive")


def method_names() -> List[str]:
    return list(STEP_REGISTRY)


# ---------------------------------------------------------------------------------- runner


def step_cases(models: Sequence[str], sizes: Sequence[tuple]) -> List[Dict[str, Any]]:
    return [dict(model=m, pairs=p, seq_len=t) for m in models for p, t in sizes]


def case_label(case: Dict[str, Any], cap_gb: Optional[float] = None) -> str:
    label = f"{case['model']} step {case['pairs']}x{case['seq_len']}"
    return label if cap_gb is None else f"{label} cap {fmt_cap(cap_gb)}"


def run_one(model: nn.Module, method: StepMethod, batch: Dict[str, torch.Tensor]) -> None:
    """One step of `method` (used by the fit search): install, run once, uninstall."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    try:
        with method.install(model):
            step = method.make(model, batch, opt)
            step()
    finally:
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)  # a step that died mid-backward leaves gradients on the model
        del opt


def run_step(cases: Sequence[Dict[str, Any]], device: torch.device, dtype: torch.dtype, *,
             methods: Optional[Sequence[str]] = None, warmup: int = 2, repeats: int = 5,
             quantize: Optional[bool] = None, cap_gb: Optional[float] = None,
             prompt_fraction: float = PROMPT_FRACTION, log: Callable[[str], None] = print) -> List[Cell]:
    """Measure every (case, method) on one shared model per shape.

    cap_gb: run every cell under this memory cap (GPU: torch.cuda.set_per_process_memory_fraction, so
    the model's weights count; CPU: simulated on the step's own allocations); a cell that runs "fits",
    one that runs out of memory is an "OOM" cell. The model is built before the cap is set.
    prompt_fraction: the prompt's share of each row (what prefix sharing computes once instead of twice).
    """
    if cap_gb is not None and not (cap_gb > 0 and math.isfinite(cap_gb)):
        raise ValueError(f"cap_gb must be a positive number of GB, got {cap_gb}")
    cells: List[Cell] = []
    # names of other levels' methods are ignored here; the suite rejects names no level knows
    names = [n for n in methods if n in STEP_REGISTRY] if methods else list(QUICK_STEP_METHODS)
    by_model: Dict[str, List[Dict[str, Any]]] = {}
    for case in cases:
        by_model.setdefault(case["model"], []).append(case)
    for model_name, model_cases in by_model.items():
        shape = get_model(model_name)
        model = None
        try:
            model = build_model(shape, device, dtype, quantize=quantize)
            build_error = None
        except Exception as exc:
            build_error = exc
        free_memory(device)
        quantized = bnb_has_cuda() if quantize is None else quantize
        for case in model_cases:
            label = case_label(case, cap_gb)
            tokens = 2 * case["pairs"] * case["seq_len"]
            for name in names:
                method = STEP_REGISTRY[name]
                reason = method.unavailable(device)
                if reason:
                    cells.append(skipped("step", label, name, tokens, reason))
                    continue
                if model is None:
                    cells.append(Cell("step", label, name, tokens, status=OOM if is_oom(build_error) else ERROR,
                                      note=f"model build: {type(build_error).__name__}: {str(build_error)[:120]}"))
                    continue
                params = {**case, "quantized_4bit": quantized, "dtype": str(dtype).replace("torch.", ""),
                          "lora_r": 16, "gradient_checkpointing": True, "cap_gb": cap_gb,
                          "prompt_fraction": prompt_fraction, **method.options}
                cell = _measure_cell(model, method, shape, case, label, tokens, device, params, warmup, repeats,
                                     cap_gb)
                log(f"  step {label:40s} {name:26s} {cell.status:7s} "
                    f"{'' if cell.median_ms is None else f'{cell.median_ms:9.1f} ms {cell.peak_extra_mb:9.1f} MB'}"
                    f" {cell.note}")
                cells.append(cell)
        del model
        free_memory(device)
    return cells


def _measure_cell(model: nn.Module, method: StepMethod, shape: ModelShape, case: Dict[str, Any], label: str,
                  tokens: int, device: torch.device, params: Dict[str, Any], warmup: int, repeats: int,
                  cap_gb: Optional[float]) -> Cell:
    """One (case, method) cell: install the method's patch, measure (under the cap if any), clean up."""
    batch = opt = None
    try:
        cap = memory_cap(device, int(cap_gb * (1 << 30))) if cap_gb is not None else contextlib.nullcontext()
        with cap:
            batch = make_batch(shape.vocab_size, case["pairs"], case["seq_len"], device,
                               prompt_fraction=params.get("prompt_fraction", PROMPT_FRACTION))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            with method.install(model) as info:
                if isinstance(info, dict):
                    params.update(info)
                cell = measure("step", label, method.name, tokens, lambda: method.make(model, batch, opt), device,
                               warmup=warmup, repeats=repeats, params=params)
                if device.type == "cuda" and cell.status == OK:  # what a memory cap limits: reserved memory
                    cell.params["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / (1 << 20)
    except Exception as exc:  # a patch that fails to install or uninstall, or an OOM outside the step
        status = OOM if is_oom(exc) else ERROR
        cell = Cell("step", label, method.name, tokens, status=status, params=params,
                    note="" if status == OOM else f"{type(exc).__name__}: {exc}"[:160])
    finally:
        opt = batch = None  # drop them before emptying the cache
        model.zero_grad(set_to_none=True)  # an OOM mid-backward leaves LoRA gradients behind
        free_memory(device)
    if cap_gb is not None and cell.status in (OK, OOM):
        cell.note = (f"fits {fmt_cap(cap_gb)}" if cell.status == OK else f"does not fit {fmt_cap(cap_gb)}") + \
            (f"; {cell.note}" if cell.note else "")
    return cell


# ---------------------------------------------------------------------------------- vs the unpatched baseline


def vs_baseline(cells: Sequence[Cell], baselines: Sequence[str] = BASELINES) -> List[Dict[str, Any]]:
    """Each step cell's time, tokens/s and peak memory as a fraction of the unpatched baseline's.

    The baseline of a case is the first of `baselines` measured ok in that case (TRL's loss path on an
    unpatched model, else naive). The 8B step target reads: dpo_fast_all (or dpo_fast) time_vs_base <= 0.5
    and memory_vs_base <= 0.5 at the 8B shape. memory_vs_base uses the peak above the model, batch and
    optimizer state (peak extra); total_vs_base the absolute peak allocated (GPU only).
    """
    rows: List[Dict[str, Any]] = []
    by_case: Dict[str, List[Cell]] = {}
    for c in cells:
        if c.level == "step":
            by_case.setdefault(c.case, []).append(c)
    for case, ccells in by_case.items():
        ok = {c.method: c for c in ccells if c.status == OK}
        base_name = next((b for b in baselines if b in ok), None)
        base = ok.get(base_name) if base_name else None
        for c in ccells:
            row = {"case": case, "method": c.method, "status": c.status, "baseline": base_name,
                   "median_ms": c.median_ms, "tokens_per_s": c.tokens_per_s, "peak_extra_mb": c.peak_extra_mb,
                   "peak_total_mb": c.peak_total_mb, "time_vs_base": None, "memory_vs_base": None,
                   "total_vs_base": None, "note": c.note}
            if base is not None and c.status == OK:
                row["time_vs_base"] = c.median_ms / base.median_ms if base.median_ms else None
                row["memory_vs_base"] = c.peak_extra_mb / base.peak_extra_mb if base.peak_extra_mb else None
                if c.peak_total_mb is not None and base.peak_total_mb:
                    row["total_vs_base"] = c.peak_total_mb / base.peak_total_mb
            rows.append(row)
    return rows


def format_vs_baseline(rows: Sequence[Dict[str, Any]]) -> str:
    """The step table against the unpatched baseline (fractions: < 1 means less time / memory)."""
    def f(x: Optional[float], spec: str) -> str:
        return "-" if x is None else format(x, spec)

    header = ("case", "method", "step ms", "tokens/s", "peak extra MB", "peak total MB", "time/base",
              "mem/base", "total/base", "status")
    table = [header]
    for r in rows:
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        table.append((r["case"], r["method"], f(r["median_ms"], ".1f"), f(r["tokens_per_s"], ".0f"),
                      f(r["peak_extra_mb"], ".1f"), f(r["peak_total_mb"], ".1f"), f(r["time_vs_base"], ".3f"),
                      f(r["memory_vs_base"], ".3f"), f(r["total_vs_base"], ".3f"), status))
    widths = [max(len(t[i]) for t in table) for i in range(len(header) - 1)]
    lines = ["step vs the unpatched baseline (base = " + ", else ".join(BASELINES) + " in the same case)"]
    for k, t in enumerate(table):
        lines.append("  ".join(v.ljust(w) for v, w in zip(t[:-1], widths)) + "  " + t[-1])
        if k == 0:
            lines.append("-" * len(lines[-1]))
    lines.append("time/base, mem/base: the method's median step time / peak extra memory (above model, batch and "
                 "optimizer state) divided by the baseline's; total/base: absolute peak allocated (GPU only). "
                 "The 8B step target: all kernels on at <= 0.5 of the baseline for time and memory.")
    return "\n".join(lines)
