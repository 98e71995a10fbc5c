"""The `step` level: one full QLoRA DPO training step of a random-weight model of a named shape.

A step = policy forward on [chosen; rejected] + reference forward (adapters disabled, no grad) +
sigmoid DPO loss + backward + AdamW step on the LoRA weights. The model is built once per shape and
shared by all methods; each method installs its loss path, is measured, and is removed again.

Model: transformers Llama/Qwen2 built from `benchmarks.models` dimensions with random weights;
the decoder's linear layers are bitsandbytes 4-bit NF4 when CUDA is present (QLoRA), plain
otherwise; LoRA r=16 on all attention/MLP projections (peft); gradient checkpointing on; lm_head
frozen and unquantized, as in a QLoRA DPO run.

Methods, each only if importable:
  naive         unpatched transformers + peft: materialized logits, fp32 log_softmax, gather
  trl           TRL 1.x DPOTrainer's loss path: trl.trainer.utils.add_fused_lm_head + fused_lm_head=True
  liger         backbone hidden states + Liger's LigerFusedLinearDPOLoss (reference head on the fly)
  cce           backbone hidden states + Cut Cross-Entropy per-token NLL summed per sequence
  dpo_fast      dpo_fast.patch(model) (head + body kernels) + dpo_fast.compute_dpo_loss
  dpo_fast_head dpo_fast.patch(model, body=False): the fused head only
  dpo_fast_precomputed_ref  dpo_fast with reference log-probs precomputed (no reference forward)
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Cell, free_memory, is_oom, measure, skipped, ERROR, OOM
from benchmarks.models import ModelShape, get_model

BETA = 0.1
IGNORE = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def _quantize_4bit(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Swap every nn.Linear of the decoder layers for a bitsandbytes NF4 Linear4bit (lm_head stays)."""
    import bitsandbytes as bnb

    layers = model.model.layers
    for name, module in list(layers.named_modules()):
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
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its QLoRA LoRA class
    free_memory(device)


def build_model(shape: ModelShape, device: torch.device, dtype: torch.dtype, *, quantize: Optional[bool] = None,
                lora_r: int = 16, gradient_checkpointing: bool = True) -> nn.Module:
    """A random-weight peft LoRA model of `shape`; quantize=None means 4-bit NF4 when bitsandbytes has CUDA.

    quantize=True also works on CPU through bitsandbytes' CPU backend (slow; the tests use it on a tiny
    model so the QLoRA path cannot rot).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantize = bnb_has_cuda() if quantize is None else quantize
    config = shape.config()
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantize:
        _quantize_4bit(model, device, dtype)
    model.requires_grad_(False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, lora)
    model.train()
    return model


def make_batch(vocab: int, pairs: int, seq_len: int, device: torch.device, *, prompt_fraction: float = 0.25
               ) -> Dict[str, torch.Tensor]:
    """TRL preference-collator layout: [chosen; rejected] rows sharing a prompt, completion_mask 1 after it."""
    if pairs < 1 or seq_len < 4:
        raise ValueError(f"pairs must be >= 1 and seq_len >= 4, got {pairs}, {seq_len}")
    prompt = max(1, int(seq_len * prompt_fraction))
    ids = torch.randint(0, vocab, (2 * pairs, seq_len), device=device)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    completion = torch.ones_like(ids)
    completion[:, :prompt] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}


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
    causal_lm = model.get_base_model()
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    return body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state


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


def _dpo_fast_patch(body: bool):
    @contextlib.contextmanager
    def ctx(model: nn.Module) -> Iterator[None]:
        import dpo_fast.patching as patching

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patching.patch(model, body=body)
        try:
            yield
        finally:
            patching.unpatch(model)

    return ctx


def _needs(*modules: str, cuda: bool = False) -> Callable[[torch.device], Optional[str]]:
    def unavailable(device: torch.device) -> Optional[str]:
        if cuda and device.type != "cuda":
            return "needs CUDA"
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:
                return f"{module} not importable ({type(exc).__name__})"
        return None

    return unavailable


@dataclass
class StepMethod:
    name: str
    unavailable: Callable[[torch.device], Optional[str]]
    install: Callable[[nn.Module], Any]  # context manager factory: patches the model for the block
    make: Callable[[nn.Module, Dict[str, torch.Tensor], torch.optim.Optimizer], Callable[[], None]]
    description: str = ""
    options: Dict[str, Any] = field(default_factory=dict)


STEP_REGISTRY: Dict[str, StepMethod] = {}


def register(method: StepMethod) -> None:
    """Add or replace a step method (tests inject failing ones)."""
    STEP_REGISTRY[method.name] = method


for _m in (
    StepMethod("naive", lambda dev: None, _no_patch, _two_pass_step(_naive_seq_logps),
               "unpatched transformers+peft, materialized logits"),
    StepMethod("trl", _needs("trl.trainer.utils"), _trl_patch, _two_pass_step(_trl_seq_logps),
               "TRL 1.x DPOTrainer loss path (add_fused_lm_head, fused_lm_head=True)"),
    StepMethod("liger", _needs("liger_kernel.chunked_loss"), _no_patch, _liger_make,
               "Liger LigerFusedLinearDPOLoss on backbone hidden states, reference on the fly"),
    StepMethod("cce", _needs("cut_cross_entropy", cuda=True), _no_patch, _two_pass_step(_cce_seq_logps),
               "Cut Cross-Entropy per-token NLL, summed per sequence"),
    StepMethod("dpo_fast", _needs("dpo_fast.dpo", "dpo_fast.patching"), _dpo_fast_patch(True), _dpo_fast_make(False),
               "dpo_fast.patch (head + body kernels) + compute_dpo_loss", {"body": True, "ref": "on the fly"}),
    StepMethod("dpo_fast_head", _needs("dpo_fast.dpo", "dpo_fast.patching"), _dpo_fast_patch(False),
               _dpo_fast_make(False), "dpo_fast.patch(body=False): fused head only",
               {"body": False, "ref": "on the fly"}),
    StepMethod("dpo_fast_precomputed_ref", _needs("dpo_fast.dpo", "dpo_fast.patching"), _dpo_fast_patch(True),
               _dpo_fast_make(True), "dpo_fast with precomputed reference log-probs",
               {"body": True, "ref": "precomputed"}),
):
    register(_m)

#: What --quick runs at the step level (the options rows are opt-in through --methods).
QUICK_STEP_METHODS = ("naive", "trl", "liger", "cce", "dpo_fast")


def method_names() -> List[str]:
    return list(STEP_REGISTRY)


# ---------------------------------------------------------------------------------- runner


def step_cases(models: Sequence[str], sizes: Sequence[tuple]) -> List[Dict[str, Any]]:
    return [dict(model=m, pairs=p, seq_len=t) for m in models for p, t in sizes]


def case_label(case: Dict[str, Any]) -> str:
    return f"{case['model']} step {case['pairs']}x{case['seq_len']}"


def run_one(model: nn.Module, method: StepMethod, batch: Dict[str, torch.Tensor]) -> None:
    """One step of `method` (used by the fit search): install, run once, uninstall."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with method.install(model):
        step = method.make(model, batch, opt)
        try:
            step()
        finally:
            opt.zero_grad(set_to_none=True)
            del step, opt


def run_step(cases: Sequence[Dict[str, Any]], device: torch.device, dtype: torch.dtype, *,
             methods: Optional[Sequence[str]] = None, warmup: int = 2, repeats: int = 5,
             quantize: Optional[bool] = None, log: Callable[[str], None] = print) -> List[Cell]:
    """Measure every (case, method) on one shared model per shape."""
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
        quantized = bnb_has_cuda() if quantize is None else quantize
        for case in model_cases:
            label = case_label(case)
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
                params = dict(case, quantized_4bit=quantized, dtype=str(dtype).replace("torch.", ""),
                              lora_r=16, gradient_checkpointing=True, **method.options)
                batch = make_batch(shape.vocab_size, case["pairs"], case["seq_len"], device)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                try:
                    with method.install(model):
                        cell = measure("step", label, name, tokens, lambda: method.make(model, batch, opt), device,
                                       warmup=warmup, repeats=repeats, params=params)
                except Exception as exc:  # a patch that fails to install or uninstall
                    cell = Cell("step", label, name, tokens, status=ERROR, note=f"{type(exc).__name__}: {exc}"[:160])
                del opt, batch
                free_memory(device)
                log(f"  step {label:40s} {name:26s} {cell.status:7s} "
                    f"{'' if cell.median_ms is None else f'{cell.median_ms:9.1f} ms {cell.peak_extra_mb:9.1f} MB'}"
                    f" {cell.note}")
                cells.append(cell)
        del model
        free_memory(device)
    return cells
