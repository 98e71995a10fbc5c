"""Gemma, Gemma 2, Gemma 3 (text), Phi-3 / Phi-4 and tied embeddings: the Llama guarantees on tiny random models.

Plain calls return the model's own logits, ``fused_lm_head=True`` its log-probs (softcapped as Gemma 2 / 3
cap them), `compute_dpo_loss` its loss and gradients (LoRA, 4-bit LoRA, full fine-tuning of a tied
embedding), with gradient checkpointing, offloading and prefix sharing, and `unpatch` restores the model
exactly. References: float64 copies of the same models with materialized logits (`truth`), or the
unpatched model (for what the body patch must leave unchanged).

Tolerances (fp32): over 40 random models per family the patched model's error against the float64 truth
reached 3.4e-6 (loss), 1.1e-5 (all gradients as one vector) and 1.6e-5 (worst single tensor); the unpatched
fp32 model's own error reaches 1.2e-5 there (Gemma 3). Patched against unpatched: 1.5e-5 worst tensor.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F

import dpo_fast.patching as P
from benchmarks.methods_step import make_pair_batch
from dpo_fast.dpo import compute_dpo_loss
from dpo_fast.families import final_logit_softcap
from dpo_fast.ops.backend import use_backend
from dpo_fast.patching.support import UnsupportedModelError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 211
FAMILIES = ["gemma", "gemma2", "gemma3", "phi3"]
#: the families above plus Phi-4-mini's shape (partial rotary, tied) and tied-embedding Qwen2 / Llama (Qwen2.5
#: 0.5B-3B, Llama-3.2 1B/3B)
VARIANTS = FAMILIES + ["phi4mini", "qwen2-tied", "llama-tied"]
SOFTCAP = 2.0
LOSS_TOL, GRAD_TOL, WORST_TOL = 2e-5, 5e-5, 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def family_config(variant: str, **kw):
    """A tiny config of `variant` (odd vocabulary; Gemma 2 / 3 with a final-logit softcap that bends the logits)."""
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gemma = dict(head_dim=12, query_pre_attn_scalar=12, final_logit_softcapping=SOFTCAP, sliding_window=64)
    if variant == "gemma":
        cfg = transformers.GemmaConfig(head_dim=12, **common)
    elif variant == "gemma2":
        cfg = transformers.Gemma2Config(**gemma, attn_logit_softcapping=5.0, **common)
    elif variant == "gemma3":
        cfg = transformers.Gemma3TextConfig(**gemma, layer_types=["sliding_attention", "full_attention"], **common)
    elif variant == "phi3":
        cfg = transformers.Phi3Config(**common)
    elif variant == "phi4mini":  # Phi-4-mini: partial rotary, tied embeddings (Phi3ForCausalLM)
        cfg = transformers.Phi3Config(tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **common)
    elif variant == "qwen2-tied":
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
    elif variant == "llama-tied":
        cfg = transformers.LlamaConfig(tie_word_embeddings=True, **common)
    else:
        raise ValueError(variant)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def family_model(variant: str, *, lora: bool = True, dtype: torch.dtype = torch.float32, **kw):
    """A random model of `variant` with non-trivial norm weights and logits large enough for the softcap to bend,
    in a peft LoRA wrapper on every linear layer of the body (`lora`), in train mode."""
    model = transformers.AutoModelForCausalLM.from_config(family_config(variant, **kw), dtype=dtype)
    gemma = variant.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if gemma else 1.0, 0.3)  # Gemma stores its scale as 1 + w
        model.get_output_embeddings().weight.normal_(0.0, 0.3)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules="all-linear", init_lora_weights=False))
    return model.train()


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def random_batch(pairs: int = 3, length: int = 15):
    """TRL layout, right padding, random prompt / completion lengths (a pair may share no prompt)."""
    prompts = [int(torch.randint(0, 6, ())) for _ in range(pairs)]
    chosen = [int(torch.randint(1, length - p + 1, ())) for p in prompts]
    rejected = [int(torch.randint(1, length - p + 1, ())) for p in prompts]
    return make_pair_batch(V, prompts, chosen, rejected, length, "cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _sequence_logps(model, batch):
    """Materialized logits (the model's own forward: softcapped where it caps), float64 log-softmax and gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.where(batch["completion_mask"][:, 1:].bool(), lp, 0.0).sum(1).chunk(2)


def truth_loss_and_grads(model, batch, beta, ref_model=None, untie=False):
    """Sigmoid DPO loss and gradients of a float64 copy of `model` (reference: adapters disabled, or ref_model);
    `untie` gives the copy's head its own weight (same values), to see each use's share of a tied gradient."""
    truth = copy.deepcopy(model).double()
    if untie:
        head = causal_lm(truth).get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    chosen, rejected = _sequence_logps(truth, batch)
    with torch.no_grad():
        if ref_model is None:
            with truth.disable_adapter():
                ref_c, ref_r = _sequence_logps(truth, batch)
        else:
            ref_c, ref_r = _sequence_logps(copy.deepcopy(ref_model).double(), batch)
    loss = -F.logsigmoid(beta * ((chosen - ref_c) - (rejected - ref_r))).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in truth.named_parameters() if p.grad is not None}, (chosen, rejected)


def run_dpo(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, metrics = compute_dpo_loss(model, batch, **kw)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    return loss.detach(), metrics, grads


def assert_grads_close(got: dict, want: dict, grad_tol: float = GRAD_TOL, worst_tol: float = WORST_TOL) -> None:
    assert got.keys() == want.keys()
    names = sorted(want)
    flat = lambda g: torch.cat([g[n].double().flatten() for n in names])  # noqa: E731
    assert rel(flat(got), flat(want)) < grad_tol
    worst = max(rel(got[n], want[n]) for n in names)
    assert worst < worst_tol, worst


def graph_ops(loss: torch.Tensor) -> set:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


#: what patch() swaps in the tiny 2-layer models: norms (Gemma 2 / 3: 4 per layer, Gemma 3: + q/k norms),
#: attention modules (rotary), gated MLPs, LoRA linears (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj),
#: and decoder layers whose recompute skips down_proj (not Gemma 2 / 3)
EXPECTED_COUNTS = {
    "gemma": dict(rms_norm=5, rope=2, swiglu=2, qlora_linear=14, recompute_tail_skip=2),
    "gemma2": dict(rms_norm=9, rope=2, swiglu=2, qlora_linear=14, recompute_tail_skip=0),
    "gemma3": dict(rms_norm=13, rope=2, swiglu=2, qlora_linear=14, recompute_tail_skip=0),
    "phi3": dict(rms_norm=5, rope=2, swiglu=2, qlora_linear=8, recompute_tail_skip=2),
    "phi4mini": dict(rms_norm=5, rope=2, swiglu=2, qlora_linear=8, recompute_tail_skip=2),
    "qwen2-tied": dict(rms_norm=5, rope=2, swiglu=2, qlora_linear=14, recompute_tail_skip=2),
    "llama-tied": dict(rms_norm=5, rope=2, swiglu=2, qlora_linear=14, recompute_tail_skip=2),
}


# ------------------------------------------------------------------------------------------ the head
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_logits_and_fused_log_probs(variant, dtype):
    """body=False: plain calls are the model's own; fused log-probs and metrics are those of its (capped) logits."""
    model = family_model(variant, lora=False, dtype=dtype).eval()
    outputs = ("entropy", "mean_logits", "is_top1")
    batch = random_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        P.patch(model, body=False, outputs=outputs)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    if variant in ("gemma2", "gemma3"):
        assert final_logit_softcap(model) == SOFTCAP and before.abs().max() > 0.8 * SOFTCAP  # the cap bends them
    else:
        assert final_logit_softcap(model) is None
    logits = before[:, :-1].double()
    y, valid = labels[:, 1:], labels[:, 1:] != -100
    lp = torch.log_softmax(logits, -1)
    want = lp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * valid
    # seen over 12 models per variant: 5e-8 (fp32) and 1.9e-3 (bf16) for the log-probs, 1.9e-6 and 3e-3 for the
    # statistics on the logits' scale
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert rel(out.log_probs, want) < (1e-6 if dtype == torch.float32 else tol)
    assert (out.log_probs[~valid] == 0).all()
    # the statistics carry the rounding of the fp32 logits: entropy = lse - E[z] loses digits when the
    # distribution is peaked (tied embeddings: the input token's logit stands out), so judge them on the logits'
    # scale
    p, scale = lp.exp(), logits.abs().max().item()
    assert ((out.entropy.double() - (-(p * lp).sum(-1) * valid)).abs().max() < tol * scale)
    assert ((out.mean_logits.double() - logits.mean(-1) * valid).abs().max() < tol * scale)
    if dtype == torch.float32:
        assert torch.equal(out.is_top1, (logits.argmax(-1) == y) & valid)
    P.unpatch(model)


# ------------------------------------------------------------------------------------------ DPO loss
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_dpo_matches_float64_truth(variant):
    """LoRA on every body linear, the default patch (body kernels): loss, log-probs and LoRA gradients."""
    model = family_model(variant)
    batch, beta = random_batch(), 0.3
    want_loss, want_grads, (chosen, rejected) = truth_loss_and_grads(model, batch, beta)
    P.patch(model)
    counts = P.patch_report(model).counts
    assert {k: counts[k] for k in EXPECTED_COUNTS[variant]} == EXPECTED_COUNTS[variant]
    loss, metrics, grads = run_dpo(model, batch, beta=beta)
    assert rel(loss, want_loss) < LOSS_TOL
    assert metrics["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=LOSS_TOL, abs=1e-6)
    assert metrics["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=LOSS_TOL, abs=1e-6)
    assert_grads_close(grads, want_grads)
    ops = graph_ops(compute_dpo_loss(model, batch, beta=beta)[0])  # the kernels really ran
    assert {"RMSNormFunctionBackward", "SwiGLUFunctionBackward", "LoRALinearFunctionBackward"} <= ops
    if variant != "phi4mini":  # partial rotary goes to transformers' own function
        assert "RoPEFunctionBackward" in ops


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi4mini", "qwen2-tied", "llama-tied"])
def test_full_fine_tune_of_a_tied_embedding(variant):
    """Every parameter trainable, head weight = input embedding: its gradient sums the head's (fused, two-pass)
    and the embedding lookup's, as in the float64 model; a separate frozen reference model."""
    model = family_model(variant, lora=False)
    lm = causal_lm(model)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # policy != reference
    batch, beta = random_batch(), 0.3
    want_loss, want_grads, _ = truth_loss_and_grads(model, batch, beta, ref_model=ref_model)
    _, parts, _ = truth_loss_and_grads(model, batch, beta, ref_model=ref_model, untie=True)
    P.patch(model)
    P.patch(ref_model)
    loss, _, grads = run_dpo(model, batch, beta=beta, ref_model=ref_model)
    assert rel(loss, want_loss) < LOSS_TOL
    assert_grads_close(grads, want_grads)
    # each use carries a good share of the shared weight's gradient: one use alone would miss the tolerance
    name = next(n for n, p in model.named_parameters() if p is lm.get_input_embeddings().weight)
    head_part = parts["lm_head.weight"]
    lookup_part = parts[name]
    assert rel(head_part + lookup_part, want_grads[name]) < 1e-12
    total = want_grads[name].norm()
    assert head_part.norm() > 0.01 * total and lookup_part.norm() > 0.01 * total
    assert rel(grads[name], want_grads[name]) < WORST_TOL


@pytest.mark.parametrize("variant", FAMILIES)
def test_bf16_autocast_error_is_that_of_the_unpatched_model(variant):
    """Under bf16 autocast (HF / TRL bf16=True) the patched model is as far from the float64 truth as the
    unpatched one: both round in bf16, at different places (the fused LoRA linear rounds base + LoRA once, peft
    rounds base, LoRA and their sum), so they differ from each other by about their distance to the truth."""
    model = family_model(variant)
    batch, beta = random_batch(), 0.3
    _, want_grads, (chosen, rejected) = truth_loss_and_grads(model, batch, beta)
    want_logps = torch.stack([chosen.mean(), rejected.mean()]).detach()
    names = sorted(want_grads)
    flat = lambda g: torch.cat([g[n].double().flatten() for n in names])  # noqa: E731
    errors = []
    for patched in (False, True):
        if patched:
            P.patch(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, metrics, grads = run_dpo(model, batch, beta=beta)
            ops = graph_ops(compute_dpo_loss(model, batch, beta=beta)[0])
        logps = torch.tensor([metrics["logps/chosen"], metrics["logps/rejected"]], dtype=torch.float64)
        errors.append((rel(logps, want_logps), rel(flat(grads), flat(want_grads))))
    assert "LoRALinearFunctionBackward" in ops  # no silent fallback to peft under autocast
    (lp_plain, g_plain), (lp_patched, g_patched) = errors
    # over 30 models per family (CPU): log-probs 2.2e-4 (Gemma) to 2.1e-3 (Phi-3) from the truth, patched or
    # not; LoRA gradients up to 0.11 (patched) and 0.17 (unpatched), the ratio of the two up to 1.9
    assert lp_patched < 6e-3, errors
    assert g_patched < 0.3 and g_patched <= 2 * g_plain + 2e-2, errors


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi3"])
def test_qlora_4bit_matches_unpatched(variant):
    """bitsandbytes nf4 base (CPU backend), LoRA on every body linear: the patched model's loss and LoRA
    gradients are the unpatched peft + bitsandbytes model's; the tied head stays a plain linear."""
    pytest.importorskip("bitsandbytes")
    with tempfile.TemporaryDirectory() as tmp:
        family_model(variant, lora=False).save_pretrained(tmp)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=torch.float32,
                                                                 device_map="cpu")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules="all-linear", init_lora_weights=False)).train()
    batch = random_batch()
    want = run_dpo(model, batch)
    P.patch(model)
    counts = P.patch_report(model).counts
    assert counts["nf4_dequant"] == counts["qlora_linear"] == EXPECTED_COUNTS[variant]["qlora_linear"]
    got = run_dpo(model, batch)
    assert rel(got[0], want[0]) < LOSS_TOL
    assert_grads_close(got[2], want[2])


# ------------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("checkpointing", ["transformers", "offload"])
def test_checkpointing_and_the_tail_skip(variant, checkpointing, monkeypatch):
    """Gradient checkpointing (transformers', or offloaded): same loss and gradients as unpatched. Gemma and
    Phi-3 layers skip down_proj (and o_proj with offloading) in the recompute; Gemma 2 / 3 layers normalise
    those outputs, so nothing is skipped there."""
    from test_checkpointing import _count_tail_skips

    model = family_model(variant, sliding_window=8)  # sliding layers really slide (rows up to 15 tokens)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = random_batch()
    want = run_dpo(model, batch)
    P.patch(model, offload_checkpointing=checkpointing == "offload")
    skips = _count_tail_skips(monkeypatch)
    got = run_dpo(model, batch)
    layers = EXPECTED_COUNTS[variant]["recompute_tail_skip"]
    assert P.patch_report(model).counts["recompute_tail_skip"] == layers
    assert skips[False] == layers * (2 if checkpointing == "offload" else 1)
    assert rel(got[0], want[0]) < LOSS_TOL
    assert_grads_close(got[2], want[2], grad_tol=WORST_TOL)


@pytest.mark.parametrize("variant", FAMILIES)
def test_triton_body_kernels(variant):
    """The body kernels under Triton (the interpreter on CPU): the model's own loss and LoRA gradients."""
    model = family_model(variant, sliding_window=8)
    ids = torch.randint(0, V, (2, 11))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss

    want = loss_and_grads()
    P.patch(model)
    with use_backend("triton"):
        got = loss_and_grads()
    assert {"RMSNormFunctionBackward", "SwiGLUFunctionBackward"} <= graph_ops(got[2])
    assert rel(got[0], want[0]) < LOSS_TOL
    assert_grads_close(got[1], want[1], grad_tol=WORST_TOL)


# ------------------------------------------------------------------------------------------ prefix sharing
class _RowCounter:
    def __init__(self, model):
        self.rows = []
        causal_lm(model).get_input_embeddings().register_forward_hook(lambda m, a, o: self.rows.append(a[0].shape[0]))


@pytest.mark.parametrize("variant", ["gemma", "gemma3", "phi3"])
def test_prefix_sharing_equals_unshared(variant):
    """Rows within Gemma 3's sliding window: the packed rows give the unshared loss, metrics and gradients."""
    model = family_model(variant)
    batch = random_batch(length=17)
    want = run_dpo(model, batch)
    P.patch(model, prefix_sharing=True)
    counter = _RowCounter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "runs unshared" warning
        got = run_dpo(model, batch)
    assert counter.rows == [3, 3]  # policy and reference: one packed row per pair
    assert rel(got[0], want[0]) < LOSS_TOL
    for key, value in want[1].items():
        assert got[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert_grads_close(got[2], want[2], grad_tol=WORST_TOL)


@pytest.mark.parametrize("case", ["attention softcap", "sliding window", "longrope switch", "longrope same side"])
def test_prefix_sharing_declines_what_packing_would_change(case):
    """Calls whose packed rows would compute something else run unshared, with a warning naming why, and give
    the unshared results: Gemma 2's attention-score softcapping, rows longer than a sliding window, and a
    LongRoPE model (Phi-3 128k / 3.5 / Phi-4-mini) whose packed length falls on the other side of its
    original context than the unshared one. On the same side it packs."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0] * 6, "long_factor": [3.0, 2.5, 2.0, 1.5, 1.2, 1.1]}
    if case == "attention softcap":
        model, layout, why = family_model("gemma2"), ([4, 2], [6, 9], [7, 3], 16), "caps its attention scores"
    elif case == "sliding window":
        model, layout, why = family_model("gemma3", sliding_window=8), ([4, 2], [6, 9], [7, 3], 16), "sliding window"
    else:
        model = family_model("phi3", rope_parameters=rope, original_max_position_embeddings=16)
        # unshared rows of 12 tokens, packed rows of 20 (> 16): other factors; 20 and 24 (> 16): the same ones
        layout = ([2, 2], [10, 8], [10, 8], 12) if case == "longrope switch" else ([2, 2], [14, 8], [12, 8], 20)
        why = "LongRoPE" if case == "longrope switch" else None
    batch = make_pair_batch(V, *layout, "cpu")
    want = run_dpo(model, batch)
    P.patch(model, prefix_sharing=True)
    counter = _RowCounter(model)
    if why is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = run_dpo(model, batch)
        assert counter.rows == [2, 2]
    else:
        with pytest.warns(UserWarning, match=f"runs unshared.*{why}"):
            got = run_dpo(model, batch)
        assert counter.rows == [4, 4]
    assert rel(got[0], want[0]) < LOSS_TOL
    assert_grads_close(got[2], want[2], grad_tol=WORST_TOL)


# ------------------------------------------------------------------------------------------ unpatch
@pytest.mark.parametrize("variant", FAMILIES)
def test_unpatch_restores_exactly(variant):
    model = family_model(variant).eval()
    ids = torch.randint(0, V, (2, 11))
    modules = list(model.modules())
    before = {id(m): set(m.__dict__) for m in modules}
    attention = next(m for m in modules if type(m).__name__.endswith("Attention"))
    owner = sys.modules[type(attention).__module__]
    rope_fn = owner.apply_rotary_pos_emb  # the original, or the dispatcher while another model is patched
    original = getattr(rope_fn, "_dpo_fast_original", rope_fn)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        P.patch(model, prefix_sharing=True, offload_checkpointing=True)
        assert owner.apply_rotary_pos_emb._dpo_fast_original is original  # the dispatcher
        assert rel(model(input_ids=ids).logits, want) < 1e-5
        P.unpatch(model)
        assert torch.equal(model(input_ids=ids).logits, want)
    assert owner.apply_rotary_pos_emb is rope_fn
    for m in modules:
        assert set(m.__dict__) == before[id(m)], type(m).__name__
    assert not any(getattr(m, "gradient_checkpointing", False) for m in modules)


# ------------------------------------------------------------------------------------------ unsupported
def test_unsupported_variants_are_clear_errors():
    bidirectional = family_model("gemma3", lora=False, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        P.patch(bidirectional)
    scaled = family_model("phi3", lora=False, logit_scale=0.5)
    with pytest.raises(UnsupportedModelError, match="logit_scale"):
        P.patch(scaled)
    llama = family_model("llama-tied", lora=False, final_logit_softcapping=30.0)  # its forward would not cap
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        P.patch(llama)
